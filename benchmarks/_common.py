"""Shared helpers of the benchmark scripts: check their options before measuring, run a config for a while and read
its metrics back, write their JSON results."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python benchmarks/x.py` from a source checkout

from agents.config import ConfigError, check_config_env_id, load_config  # noqa: E402
from agents.run_dir import (  # noqa: E402
    atomic_write,
    holds_run,
    output_file_problem,
    output_folder_problem,
    write_new_file,
)


def checked_config(parser: argparse.ArgumentParser, path: Path | None, overrides: list[str]) -> dict[str, Any]:
    """The config ``path`` and ``overrides`` give, its env id checked, or ``parser.error`` naming the problem
    (before a benchmark starts measuring, not after its first runs)."""
    try:
        config = load_config(path, overrides)
        check_config_env_id(config)
    except ConfigError as exc:
        parser.error(str(exc))
    return config


def check_json_option(parser: argparse.ArgumentParser, path: Path | None, overwrite: bool) -> None:
    """``parser.error`` unless ``--json path`` can take a new file (an existing one only with ``overwrite``):
    checked before the runs, which take minutes to hours, not after them."""
    if path is not None:
        problem = output_file_problem(path, overwrite)
        if problem:
            parser.error(f"--json {problem}")


def write_json_output(path: Path, results: Any, overwrite: bool, program: str) -> int:
    """Write ``results`` as JSON to ``path`` (checked by :func:`check_json_option`); return the exit status.

    A file that appeared there during the runs is kept unless ``overwrite``; a failed write says so in one
    line (the printed table still has the results) and returns 1.
    """
    data = json.dumps(results, indent=1).encode()
    try:
        if overwrite:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        else:
            write_new_file(path, data)
    except OSError as exc:
        print(f"{program}: could not write --json {path}: {exc.strerror or exc} (the table above has the results)",
              file=sys.stderr)
        return 1
    return 0


def check_out_folder(parser: argparse.ArgumentParser, folder: Path, run_names: Sequence[str] = ()) -> None:
    """``parser.error`` unless ``--out folder`` can hold the benchmark's run folders ``run_names`` (none of
    them may already hold a run: a benchmark never writes over one)."""
    problem = output_folder_problem(folder)
    if problem:
        parser.error(f"--out {problem}")
    if len(set(run_names)) < len(run_names):
        parser.error(f"two runs would share a folder of --out {folder}: {', '.join(run_names)}")
    for name in run_names:
        if holds_run(folder / name):
            parser.error(f"--out {folder}: {folder / name} already holds a run; give another --out or move it away")


def _config_family(env: str) -> str:
    return "atari" if env in ("pong", "breakout") else "minigrid"


def shipped_cores(env: str = "doorkey") -> list[str]:
    """The cores :func:`config_for` can give for ``env``: those with a shipped ``<env>-<core>-ppo.yaml``
    (sorted), then gru where lstm has one (it runs from the lstm config)."""
    folder = REPO / "configs" / _config_family(env)
    cores = sorted({path.name.split("-")[1] for path in folder.glob(f"{env}-*-ppo.yaml")})
    return cores + (["gru"] if "lstm" in cores else [])


def config_for(core: str, env: str = "doorkey", overrides: list[str] | None = None) -> dict[str, Any]:
    """The shipped PPO config of ``env`` x ``core`` (gru reuses the lstm one, under a name of its own), with
    overrides."""
    base = "lstm" if core == "gru" else core
    extra = ["core.name=gru", "core.hidden_size=128"] if core == "gru" else []
    config = load_config(REPO / "configs" / _config_family(env) / f"{env}-{base}-ppo.yaml",
                         [*extra, "log.progress_bar=false", *(overrides or [])])
    if core == "gru":  # its runs must not go where the lstm config's do
        config["name"] = config["name"].replace("lstm", "gru")
    return config


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics rows (one per update) a run wrote into ``run_dir``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_and_read(config: dict[str, Any], run_dir: Path, stop_at_frames: int | None = None) -> list[dict[str, Any]]:
    """Train ``config`` into ``run_dir`` and return its metrics rows (one per update)."""
    from agents.trainer import Trainer  # here: the scripts that only check their options start without torch

    Trainer(config, run_dir).run(stop_at_frames=stop_at_frames)
    return read_metrics(run_dir)
