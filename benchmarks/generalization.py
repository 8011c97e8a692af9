"""Generalisation benchmark: train LSTM and RIMs on DoorKey-5x5, evaluate on held-out 6x6, 8x8, 16x16.

Usage::

    python benchmarks/generalization.py                  # 3 seeds x 150k frames per core (~35 min, 2-core CPU)
    python benchmarks/generalization.py --quick          # 1 seed, tiny budget: checks the pipeline in a minute
    python benchmarks/generalization.py --seeds 5 --frames 300000 --override algo.lr=5e-4

Each (core, seed) trains from ``configs/minigrid/doorkey-<core>-ppo.yaml`` (plus the speed
overrides below and ``--override``), then is evaluated with ``agents.evaluation.evaluate_policy``
on every env of the ``doorkey`` suite, raw returns, sampled actions. A finished run is reused
when its checkpoint already has the asked frames (rerun with ``--retrain`` to start over), so an
interrupted benchmark picks up where it stopped.

Writes ``docs/results.md`` (only its "Generalisation: DoorKey" section; other sections of
the file are kept), ``docs/generalization.png`` (bar plot) and ``<out>/results.json``.
``--quick`` writes under ``<out>/docs`` instead, unless ``--docs`` is given, so a smoke
run never overwrites the real results page.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Run from anywhere: the package lives one folder up.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents.config import load_config  # noqa: E402
from agents.evaluation import EvalTarget, evaluate_policy, evaluation_options, resolve_targets  # noqa: E402
from agents.plots import plot_bars, save_figure  # noqa: E402
from agents.trainer import Trainer  # noqa: E402
from policies.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from policies.policy import load_policy  # noqa: E402

SUITE = "doorkey"
SECTION = "Generalisation: DoorKey"
EVAL_SEED = 10_000  # as evaluate.py: away from the training env seeds

# On top of the configs: one torch thread per run, since runs go in parallel (--jobs).
SPEED_OVERRIDES = ["torch_threads=1", "log.progress_bar=false"]
# --quick: rollouts of 8 envs x 32 steps, so a few thousand frames still make several updates.
QUICK_OVERRIDES = ["env.n_envs=8", "algo.n_steps=32", "algo.num_minibatches=2"]
QUICK_DEFAULTS = {"frames": 2048, "seeds": 1, "episodes": 10, "max_episode_steps": 100}

# A public re-implementation's DoorKey numbers (mean return; trained on 5x5), for reference only:
# different code, budget and evaluation protocol.
REFERENCE = {
    "rims": {"DoorKey-5x5": 0.90, "DoorKey-6x6": 0.68, "DoorKey-8x8": 0.38, "DoorKey-16x16": 0.18},
    "lstm": {"DoorKey-5x5": 0.90, "DoorKey-6x6": 0.63, "DoorKey-8x8": 0.35, "DoorKey-16x16": 0.12},
}
CORE_NAMES = {"lstm": "LSTM", "rims": "RIMs", "gru": "GRU", "brims": "BRIMs", "thalnet": "ThalNet"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: defaults become {QUICK_DEFAULTS}, output under <out>/docs")
    parser.add_argument("--frames", type=int, help="training frames per run (default 150000)")
    parser.add_argument("--seeds", type=int, help="seeds per core (default 3)")
    parser.add_argument("--episodes", type=int, help="evaluation episodes per env (default 100)")
    parser.add_argument("--max-episode-steps", type=int, help="cap evaluation episodes (default: the envs' own limits)")
    parser.add_argument("--cores", nargs="+", default=["lstm", "rims"], help="cores to compare (default lstm rims)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained in parallel (default 2, one per core)")
    parser.add_argument("--eval-envs", type=int, default=16, help="parallel envs during evaluation (default 16)")
    parser.add_argument("--out", type=Path, help="run directories (default runs/generalization[-quick])")
    parser.add_argument("--docs", type=Path, help="where results.md and generalization.png go (default docs/)")
    parser.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    args = parser.parse_args(argv)
    defaults = QUICK_DEFAULTS if args.quick else {"frames": 150_000, "seeds": 3, "episodes": 100,
                                                  "max_episode_steps": None}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = ROOT / "runs" / ("generalization-quick" if args.quick else "generalization")
    if args.docs is None:
        args.docs = args.out / "docs" if args.quick else ROOT / "docs"
    if args.quick:
        args.jobs = 1  # two process start-ups cost more than the tiny runs themselves
    return args


def run_one(core: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one (core, seed) (or reuse its finished run) and evaluate it on the suite.

    :return: ``{"core", "seed", "run_dir", "frames", "train_seconds", "results": [per env]}``.
    """
    torch.set_num_threads(1)
    run_dir = args.out / f"{core}-seed{seed}"
    overrides = [*SPEED_OVERRIDES, *(QUICK_OVERRIDES if args.quick else []), *args.override,
                 f"total_frames={args.frames}", f"seed={seed}", f"name={core}-seed{seed}"]
    config = load_config(ROOT / "configs" / "minigrid" / f"doorkey-{core}-ppo.yaml", overrides)
    train_seconds = 0.0
    if args.retrain or not _finished(run_dir, config):
        started = time.perf_counter()
        Trainer(config, run_dir).run()
        train_seconds = time.perf_counter() - started

    policy = load_policy(run_dir)
    targets = resolve_targets(SUITE)
    assert targets is not None
    extra = {"max_episode_steps": args.max_episode_steps} if args.max_episode_steps else {}
    results = []
    for target in targets:
        result = evaluate_policy(policy, target.env_id, evaluation_options(policy, target, extra),
                                 episodes=args.episodes, seed=EVAL_SEED, deterministic=False, n_envs=args.eval_envs)
        results.append({"name": target.name, "split": target.split, "env_id": target.env_id,
                        **{k: result[k] for k in ("mean_return", "std_return", "success_rate", "mean_length",
                                                  "episodes", "seconds")}})
    print(f"{core} seed {seed}: " + ", ".join(f"{r['name']} {r['mean_return']:.2f}" for r in results), flush=True)
    return {"core": core, "seed": seed, "run_dir": str(run_dir), "frames": args.frames,
            "train_seconds": train_seconds, "results": results}


def _finished(run_dir: Path, config: dict[str, Any]) -> bool:
    """Whether ``run_dir`` holds a usable checkpoint of this very config that reached its frames."""
    try:
        checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
        load_policy(run_dir)  # still loadable by this version of the code (a core may have changed)
    except CheckpointError:
        return False
    return checkpoint["config"] == config and checkpoint["frames"] >= config["total_frames"]


def aggregate(runs: list[dict[str, Any]], cores: list[str], envs: list[EvalTarget]) -> dict[str, dict[str, dict]]:
    """core -> env name -> {"mean", "std" (over seeds of per-seed mean returns), "success", "seeds"}."""
    table: dict[str, dict[str, dict]] = {}
    for core in cores:
        table[core] = {}
        for target in envs:
            rows = [r for run in runs if run["core"] == core for r in run["results"] if r["name"] == target.name]
            returns = [r["mean_return"] for r in rows]
            successes = [r["success_rate"] for r in rows if r["success_rate"] is not None]
            table[core][target.name] = {
                "mean": float(np.mean(returns)) if returns else float("nan"),
                "std": float(np.std(returns)) if len(returns) > 1 else float("nan"),
                "success": float(np.mean(successes)) if successes else None,
                "seeds": len(returns),
            }
    return table


def _cell(entry: dict[str, Any]) -> str:
    text = f"{entry['mean']:.2f}"
    if not np.isnan(entry["std"]):
        text += f" ± {entry['std']:.2f}"
    if entry["success"] is not None:
        text += f" ({100 * entry['success']:.0f}%)"
    return text


def render_section(args: argparse.Namespace, runs: list[dict[str, Any]], envs: list[EvalTarget],
                   table: dict[str, dict[str, dict]], wall_seconds: float, plot_name: str) -> str:
    """The markdown of the results section (heading included)."""
    headers = [f"{t.name} ({t.split})" for t in envs]
    lines = [f"## {SECTION}", ""]
    if args.quick:
        lines += ["**Smoke run (`--quick`): a tiny budget that checks the pipeline, not a result.**", ""]
    seeds = sorted({run["seed"] for run in runs})
    lines += [
        f"Trained on MiniGrid-DoorKey-5x5-v0 with recurrent PPO, evaluated on the held-out "
        f"{', '.join(t.name for t in envs if t.split == 'held-out')} (`{args.command}`).",
        "",
        f"- Budget: {args.frames:,} training frames per run; training seeds {', '.join(map(str, seeds))} "
        "for each core; "
        f"configs `configs/minigrid/doorkey-<core>-ppo.yaml` with overrides "
        f"`{' '.join([*SPEED_OVERRIDES, *(QUICK_OVERRIDES if args.quick else []), *args.override])}`.",
        f"- Evaluation: {args.episodes} episodes per env and run, sampled actions, raw returns, env seeds "
        f"{EVAL_SEED}+i" + (f", episodes capped at {args.max_episode_steps} steps" if args.max_episode_steps else "")
        + ".",
        f"- Machine: {platform.machine()} CPU, {multiprocessing.cpu_count()} cores, torch {torch.__version__}; "
        f"wall time {wall_seconds / 60:.1f} min ({args.jobs} run{'s' if args.jobs != 1 else ''} at a time); "
        f"{_training_times(runs)}; {datetime.now(timezone.utc).strftime('%Y-%m-%d')}.",
        "",
        "Mean return over seeds ± standard deviation over seeds (success rate):",
        "",
        "| core | " + " | ".join(headers) + " |",
        "|---|" + "---|" * len(headers),
    ]
    for core, by_env in table.items():
        n_seeds = by_env[envs[0].name]["seeds"]
        name = f"{CORE_NAMES.get(core, core)} (ours, {n_seeds} seed{'s' if n_seeds != 1 else ''})"
        lines.append(f"| {name} | " + " | ".join(_cell(by_env[t.name]) for t in envs) + " |")
    for core in table:
        if core in REFERENCE:
            cells = [f"{REFERENCE[core][t.name]:.2f}" if t.name in REFERENCE[core] else "" for t in envs]
            lines.append(f"| {CORE_NAMES[core]} (public re-implementation) | " + " | ".join(cells) + " |")
    lines += ["", _reading(table, envs), "", f"![DoorKey generalisation]({plot_name})", "",
              "Per run (mean return, success rate):", "",
              "| core | seed | " + " | ".join(headers) + " |", "|---|---|" + "---|" * len(headers)]
    for run in sorted(runs, key=lambda r: (r["core"], r["seed"])):
        by_name = {r["name"]: r for r in run["results"]}
        cells = []
        for t in envs:
            r = by_name[t.name]
            success = f" ({100 * r['success_rate']:.0f}%)" if r["success_rate"] is not None else ""
            cells.append(f"{r['mean_return']:.2f}{success}")
        lines.append(f"| {CORE_NAMES.get(run['core'], run['core'])} | {run['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "The public re-implementation's numbers come from other code, budget and evaluation protocol; "
              "they are a reference point, not a like-for-like comparison.", ""]
    return "\n".join(lines)


def _training_times(runs: list[dict[str, Any]]) -> str:
    """Mean training time per run, and how many runs were reused from an earlier invocation."""
    timed = [run["train_seconds"] for run in runs if run["train_seconds"] > 0]
    parts = [f"training {np.mean(timed) / 60:.1f} min per run on average"] if timed else []
    if len(timed) < len(runs):
        parts.append(f"{len(runs) - len(timed)} run(s) reused from an earlier invocation (not timed here)")
    return "; ".join(parts)


def _reading(table: dict[str, dict[str, dict]], envs: list[EvalTarget]) -> str:
    """One factual sentence comparing RIMs with LSTM on the held-out envs, with the seed spread."""
    if not {"rims", "lstm"} <= set(table):
        return ""
    heldout = [t.name for t in envs if t.split == "held-out"]
    better = [name for name in heldout if table["rims"][name]["mean"] > table["lstm"][name]["mean"]]
    # A difference counts as clear only when larger than the seed spread of both cores.
    clear = [name for name in heldout
             if abs(table["rims"][name]["mean"] - table["lstm"][name]["mean"])
             > max(np.nan_to_num(table["rims"][name]["std"]), np.nan_to_num(table["lstm"][name]["std"]))
             and table["rims"][name]["seeds"] > 1]
    text = (f"In these runs RIMs has the higher mean held-out return on {len(better)} of {len(heldout)} sizes"
            f"{' (' + ', '.join(better) + ')' if better else ''}; ")
    if min(table["rims"][name]["seeds"] for name in heldout) < 2:
        text += "with one seed per core there is no seed spread to judge the differences against."
    elif clear:
        text += f"the difference exceeds the seed standard deviation on {', '.join(clear)}."
    else:
        text += "no difference exceeds the seed standard deviation, so these runs do not separate the two cores."
    return text


def write_section(path: Path, section: str) -> None:
    """Replace the ``## Generalisation: DoorKey`` section of ``path`` (or append it), keeping the rest."""
    heading = f"## {SECTION}"
    text = path.read_text() if path.is_file() else "# Results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new_text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        # The section runs to the next heading of the same or a higher level.
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines))
        kept_after = "\n".join(lines[end:])
        new_text = "\n".join(lines[:start]) + ("\n" if start else "") + section.rstrip("\n") + "\n"
        if kept_after:
            new_text += "\n" + kept_after + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new_text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.command = " ".join(["python benchmarks/generalization.py", *(sys.argv[1:] if argv is None else argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    envs = resolve_targets(SUITE)
    assert envs is not None
    jobs = [(core, seed) for seed in range(1, args.seeds + 1) for core in args.cores]
    print(f"{len(jobs)} runs of {args.frames:,} frames ({', '.join(args.cores)} x {args.seeds} seeds), "
          f"{args.jobs} at a time -> {args.out}", flush=True)
    started = time.perf_counter()
    if args.jobs > 1:
        # spawn: fresh interpreters, no torch thread pools inherited through fork.
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(run_one, *zip(*jobs, strict=True), [args] * len(jobs)))
    else:
        runs = [run_one(core, seed, args) for core, seed in jobs]
    wall = time.perf_counter() - started

    table = aggregate(runs, args.cores, envs)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                                for k, v in vars(args).items()},
                                                       "runs": runs, "table": table}, indent=2) + "\n")
    # Our bars with the seed std as error bars; the reference numbers hatched, in the same colour per core.
    series: dict[str, tuple[list[float], list[float]]] = {}
    colors: dict[str, str] = {}
    hatched: list[str] = []
    for i, core in enumerate(args.cores):
        ours = f"{CORE_NAMES.get(core, core)} (ours)"
        series[ours] = ([table[core][t.name]["mean"] for t in envs], [table[core][t.name]["std"] for t in envs])
        colors[ours] = f"C{i}"
        if core in REFERENCE:
            reference = f"{CORE_NAMES[core]} (public re-impl.)"
            series[reference] = ([REFERENCE[core].get(t.name, np.nan) for t in envs], [np.nan] * len(envs))
            colors[reference] = f"C{i}"
            hatched.append(reference)
    plot_name = "generalization.png"
    fig = plot_bars([f"{t.name}\n({t.split})" for t in envs], series, "mean return",
                    f"DoorKey: trained on 5x5, {args.frames:,} frames, {args.seeds} seed(s) per core",
                    colors=colors, hatched=hatched)
    save_figure(fig, args.docs / plot_name)
    write_section(args.docs / "results.md", render_section(args, runs, envs, table, wall, plot_name))
    print(f"wrote {args.docs / 'results.md'} and {args.docs / plot_name} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
