"""Evaluate trained checkpoints: raw scores and success rates, on held-out envs too.

    python evaluate.py runs/doorkey-rims/checkpoint.pt                  # its own training env
    python evaluate.py runs/doorkey-rims --suite doorkey --episodes 100  # train + held-out envs
    python evaluate.py runs/*/checkpoint.pt --suite doorkey --json results.json   # side by side
    python evaluate.py CKPT --env MiniGrid-DoorKey-8x8-v0 --video videos --plot plots
    python evaluate.py --list-suites

Episodes run with the checkpoint's own env preprocessing but unclipped rewards, the
recurrent state reset at every episode start. Exactly --episodes finished episodes are
counted per env (each parallel env has a fixed quota, so short episodes are not favoured).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from agents.evaluation import (
    EvalTarget,
    EvaluationError,
    check_spaces,
    evaluate_policy,
    evaluation_options,
    own_target,
    resolve_targets,
    save_video,
    short_env_name,
    video_format_available,
)
from envs import list_suites
from policies.checkpoint import CheckpointError
from policies.policy import Policy, load_policy

# Seeds away from the small ones training configs use, so evaluation episodes are not the
# first training levels replayed.
DEFAULT_SEED = 10_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", type=Path, metavar="CHECKPOINT",
                        help="checkpoint files (or run directories holding checkpoint.pt)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--suite", help="evaluate on this held-out suite's train and held-out envs (see --list-suites)")
    where.add_argument("--env", action="append", dest="envs", metavar="ID", help="evaluate on this env id (repeatable)")
    parser.add_argument("--suite-param", action="append", default=[], metavar="KEY=VALUE",
                        help="parameter of a parametric suite, e.g. --suite atari-modes --suite-param game=Breakout")
    parser.add_argument("--list-suites", action="store_true", help="list the held-out suites and exit")
    parser.add_argument("--episodes", type=int, default=100, help="finished episodes per env (default 100)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"env i is seeded with SEED+i (default {DEFAULT_SEED})")
    parser.add_argument("--deterministic", action="store_true", help="take the most likely action instead of sampling")
    parser.add_argument("--n-envs", type=int, default=8, help="parallel envs (default 8, at most --episodes)")
    parser.add_argument("--max-episode-steps", type=int, metavar="N", help="truncate episodes after N steps")
    parser.add_argument("--video", type=Path, metavar="DIR", help="write a video of the first episode per env here")
    parser.add_argument("--video-format", choices=("gif", "mp4"), default="gif",
                        help="gif (default, needs nothing more) or mp4 (needs imageio-ffmpeg)")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write a PNG of module activity per env here")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--device", default="cpu", help="torch device for the policies (default cpu)")
    parser.add_argument("--torch-threads", type=int, default=1, metavar="N",
                        help="CPU threads for torch (default 1: acting on a few envs gains nothing from more, "
                             "and on a busy machine extra threads make it many times slower); 0 keeps torch's default")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = parser.parse_args(argv)
    if not args.list_suites and not args.checkpoints:
        parser.error("give at least one CHECKPOINT (or --list-suites)")
    if args.episodes < 1 or args.n_envs < 1:
        parser.error("--episodes and --n-envs must be >= 1")
    if args.max_episode_steps is not None and args.max_episode_steps < 1:
        parser.error("--max-episode-steps must be >= 1")
    if args.suite_param and args.suite is None:
        parser.error("--suite-param needs --suite")
    return args


def print_suites() -> None:
    """Print every suite with its train and held-out env ids."""
    for suite in list_suites():
        print(f"{suite.name}: {suite.description}")
        for split, specs in (("train", suite.train), ("held-out", suite.heldout)):
            shown = ", ".join(f"{spec.env_id}" + (f" [{spec.name}]" if spec.options else "") for spec in specs)
            print(f"  {split:9s} {shown}")


def parse_suite_params(items: list[str]) -> dict[str, Any]:
    """``["game=Breakout", "num_train=50"]`` -> ``{"game": "Breakout", "num_train": 50}`` (YAML values)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise EvaluationError(f"--suite-param {item!r} must look like KEY=VALUE")
        try:
            params[key] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise EvaluationError(f"--suite-param {key}: value {text!r} is not valid YAML ({exc})") from None
    return params


def checkpoint_labels(paths: list[Path]) -> list[str]:
    """Short names for checkpoints: the run directory's name, or the full path where names repeat."""
    def short(path: Path) -> str:
        if path.is_dir():
            return path.name
        return path.parent.name if path.name == "checkpoint.pt" else path.stem
    labels = [short(p) for p in paths]
    return [str(p) if labels.count(label) > 1 else label for p, label in zip(paths, labels, strict=True)]


def _file_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _number(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain-text table, columns padded to their widest cell (first column left-aligned)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    def line(cells: list[str]) -> str:
        padded = (str(c).ljust(w) if i == 0 else str(c).rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _env_cell(result: dict[str, Any]) -> str:
    """The env id, plus the suite entry's name where one id has several variants (modes, level seeds)."""
    plain = short_env_name(result["env_id"])
    return result["env_id"] if result["name"] == plain else f"{result['env_id']} [{result['name']}]"


def single_table(results: list[dict[str, Any]]) -> str:
    """One checkpoint: a row per env."""
    headers = ["env", "split", "episodes", "mean return", "std", "success", "mean length"]
    rows = [[_env_cell(r), r["split"] or "-", str(r["episodes"]), _number(r["mean_return"]),
             _number(r["std_return"]), _percent(r["success_rate"]), _number(r["mean_length"], 1)] for r in results]
    return format_table(headers, rows)


def comparison_table(runs: list[dict[str, Any]]) -> str:
    """Several checkpoints: a row per checkpoint, a column per env ("mean return / success")."""
    columns: list[str] = []
    for run in runs:
        for r in run["results"]:
            if r["env_label"] not in columns:
                columns.append(r["env_label"])
    headers = ["checkpoint", "core", *columns]
    rows = []
    for run in runs:
        by_label = {r["env_label"]: r for r in run["results"]}
        cells = []
        for column in columns:
            r = by_label.get(column)
            if r is None:
                cells.append("")
            elif r["success_rate"] is None:
                cells.append(_number(r["mean_return"]))
            else:
                cells.append(f"{_number(r['mean_return'])} / {_percent(r['success_rate'])}")
        rows.append([run["label"], run["core"], *cells])
    note = "cells: mean return / success rate"
    return format_table(headers, rows) + f"\n({note})"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 ok, 2 bad input)."""
    args = parse_args(argv)
    if args.list_suites:
        print_suites()
        return 0
    try:
        return _evaluate(args)
    except (CheckpointError, EvaluationError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _evaluate(args: argparse.Namespace) -> int:
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise EvaluationError(f"--device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda, but no CUDA GPU is available here; use --device cpu")
    overrides = {"max_episode_steps": args.max_episode_steps} if args.max_episode_steps is not None else {}
    if args.video is not None and not video_format_available(f".{args.video_format}"):
        raise EvaluationError("--video-format mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg); use gif")
    suite_targets = resolve_targets(args.suite, args.envs, parse_suite_params(args.suite_param))

    # Load every checkpoint and check every (checkpoint, env) pair before running any episode,
    # so a bad last argument does not surface after minutes of evaluation.
    labels = checkpoint_labels(args.checkpoints)
    plans: list[tuple[str, Policy, list[tuple[EvalTarget, dict[str, Any]]]]] = []
    for label, path in zip(labels, args.checkpoints, strict=True):
        policy = load_policy(path, device=args.device)
        targets = suite_targets if suite_targets is not None else [own_target(policy)]
        pairs = []
        for target in targets:
            options = evaluation_options(policy, target, overrides)
            check_spaces(policy, target.env_id, options)
            pairs.append((target, options))
        plans.append((label, policy, pairs))

    runs: list[dict[str, Any]] = []
    for label, policy, pairs in plans:
        run: dict[str, Any] = {"checkpoint": str(policy.path), "label": label, "core": policy.core_name,
                               "train_env": policy.env_id, "results": []}
        for target, options in pairs:
            result = evaluate_policy(
                policy, target.env_id, options, episodes=args.episodes, seed=args.seed,
                deterministic=args.deterministic, record_video=args.video is not None,
                record_info=args.plot is not None, n_envs=args.n_envs, progress=not args.no_progress,
                desc=f"{label} {target.name}",
            )
            stem = _file_stem(f"{label}-{target.name}")
            frames, trace = result.pop("frames", None), result.pop("trace", None)
            if frames is not None:
                result["video"] = str(save_video(frames, args.video / f"{stem}.{args.video_format}"))
            if trace is not None:
                result["plot"] = str(_save_plot(trace, args.plot / f"{stem}.png", f"{label} on {target.label}",
                                                policy.core_name))
            result.update(name=target.name, split=target.split, env_label=target.label)
            run["results"].append(result)
        runs.append(run)

    protocol = (f"{args.episodes} episode{'s' if args.episodes != 1 else ''} per env, "
                f"{'deterministic' if args.deterministic else 'sampled'} actions")
    if len(runs) == 1:
        print(f"{runs[0]['label']} ({runs[0]['core']}, trained on {runs[0]['train_env']}), {protocol}:")
        print(single_table(runs[0]["results"]))
    else:
        print(f"{protocol}:")
        print(comparison_table(runs))
    if args.json is not None:
        report = {"episodes": args.episodes, "seed": args.seed, "deterministic": args.deterministic,
                  "suite": args.suite, "checkpoints": runs}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
        print(f"results written to {args.json}")
    return 0


def _save_plot(trace: dict[str, Any], path: Path, title: str, core: str) -> Path:
    # matplotlib is imported only when --plot asks for it (it is slow to import).
    from agents.plots import plot_episode_info, save_figure

    if set(trace) == {"state_norm"}:
        print(f"note: the {core} core reports no module diagnostics; {path} shows the hidden-state norm only")
    return save_figure(plot_episode_info(trace, title), path)


def _jsonable(value: Any) -> Any:
    """JSON fallback for numpy scalars and paths in the report."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
