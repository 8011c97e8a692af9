"""Shared helpers of the benchmark scripts: run a config for a while and read its metrics back."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python benchmarks/x.py` from a source checkout

from agents.config import load_config  # noqa: E402
from agents.trainer import Trainer  # noqa: E402


def config_for(core: str, env: str = "doorkey", overrides: list[str] | None = None) -> dict[str, Any]:
    """The shipped PPO config of ``env`` x ``core`` (gru reuses the lstm one), with overrides."""
    family = "atari" if env in ("pong", "breakout") else "minigrid"
    base = "lstm" if core == "gru" else core
    extra = ["core.name=gru", "core.hidden_size=128"] if core == "gru" else []
    return load_config(REPO / "configs" / family / f"{env}-{base}-ppo.yaml",
                       [*extra, "log.progress_bar=false", *(overrides or [])])


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics rows (one per update) a run wrote into ``run_dir``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_and_read(config: dict[str, Any], run_dir: Path, stop_at_frames: int | None = None) -> list[dict[str, Any]]:
    """Train ``config`` into ``run_dir`` and return its metrics rows (one per update)."""
    Trainer(config, run_dir).run(stop_at_frames=stop_at_frames)
    return read_metrics(run_dir)
