"""How fast do agents adapt to a held-out task? Meta-RIMs against RIMs and LSTM trained on the same tasks.

Usage::

    python benchmarks/adaptation.py                       # 3 seeds, the config's frame budget (hours on a CPU)
    python benchmarks/adaptation.py --seeds 1 2 --frames 300000 --finetune-frames 150000
    python benchmarks/adaptation.py --quick                # tiny settings, 1 seed, ~1-2 minutes: checks it works

For every seed:

1. train three models on the tasks of ``--config`` (default ``configs/meta/doorkey-sizes.yaml``:
   DoorKey 5x5 and 6x6) with the same frame budget ``--frames`` and the same task schedule:

   * ``Meta-RIMs``: the config as it is (``meta_ppo``: fast modules, slow attention);
   * ``RIMs``: the same core with plain PPO on all parameters (``multitask_ppo``, ``--baseline-lr``),
     changing task as often as Meta-RIMs does (every ``inner_updates + 1`` rollouts);
   * ``LSTM``: an LSTM core of ``--lstm-hidden`` units, trained like ``RIMs``;

2. fine-tune each on the held-out task (``--heldout``, default DoorKey-8x8) for ``--finetune-frames``:
   a new run on that task that starts from the trained weights (fresh optimisers). Meta-RIMs keeps its
   own update rule (``meta_ppo`` on the one task); the baselines use plain PPO;

3. print, per model and seed, the frames the fine-tuning took until the mean return of the last 100
   episodes reached ``--threshold``, and the return curve; save the curves to ``docs/adaptation.png``
   and a summary to the "Adaptation (Meta-RIMs)" section of ``docs/results.md`` (other sections are kept).

``--quick`` writes its plot and markdown under ``--out-dir`` instead of ``docs/`` (its numbers mean
nothing), unless ``--docs-dir`` is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Run from anywhere: the package lives one folder up.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents.config import read_yaml, resolve_config  # noqa: E402
from agents.trainer import Trainer  # noqa: E402
from policies.checkpoint import load_checkpoint  # noqa: E402

MODELS: tuple[str, ...] = ("Meta-RIMs", "RIMs", "LSTM")
SECTION_TITLE = "Adaptation (Meta-RIMs)"
RETURN_KEY = "rollout/ep_return_mean"
FULL_WINDOW = 100  # episodes behind RETURN_KEY (log.return_window's default)
# Small enough to finish in a minute or two on a loaded 2-core machine, large enough to run every phase.
# Short episodes (max_episode_steps) so that even the tiny fine-tuning finishes some and draws a curve.
QUICK = {"frames": 3200, "finetune_frames": 1280, "n_envs": 4, "n_steps": 32, "num_minibatches": 2,
         "max_episode_steps": 48, "seeds": [1]}


@dataclass
class FinetuneResult:
    """One fine-tuning run: its return curve and when it crossed the threshold.

    :param model: one of :data:`MODELS`.
    :param seed: the seed of both the training and the fine-tuning run.
    :param frames: fine-tuning frames at each logged point.
    :param returns: mean return of the last 100 episodes at each point (nan before any episode ended).
    :param frames_to_threshold: first frame count at which the return reached the threshold, or None.
    """

    model: str
    seed: int
    frames: list[int] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    frames_to_threshold: int | None = None

    @property
    def final_return(self) -> float:
        """Return at the end of fine-tuning."""
        return self.returns[-1] if self.returns else math.nan


# -- configs ---------------------------------------------------------------------------------------
def training_configs(raw: dict[str, Any], args: argparse.Namespace, seed: int) -> dict[str, dict[str, Any]]:
    """The three resolved training configs, from the meta config file ``raw`` (as read from YAML).

    :param raw: the meta config (``algo.name: meta_ppo`` with a ``meta`` section).
    :param args: the command-line arguments (frames, sizes, baseline settings).
    :param seed: the run seed.
    """
    raw = copy.deepcopy(raw)
    raw["seed"], raw["total_frames"] = seed, args.frames
    raw.setdefault("log", {})["progress_bar"] = False
    raw["torch_threads"] = args.torch_threads
    if args.quick:
        raw.setdefault("env", {}).update(n_envs=QUICK["n_envs"], max_episode_steps=QUICK["max_episode_steps"])
        raw["algo"].update(n_steps=QUICK["n_steps"], num_minibatches=QUICK["num_minibatches"])
    meta = raw["meta"]
    task_keys = ("tasks", "suite", "task_schedule", "curriculum_frames", "curriculum_return", "return_window")
    inner_updates = resolve_config(raw)["meta"]["inner_updates"]  # the default when the file leaves it out
    # The baselines see the same tasks in the same schedule, switching as often as Meta-RIMs can.
    baseline_meta = {key: meta[key] for key in task_keys if key in meta}
    baseline_meta["rollouts_per_task"] = inner_updates + 1
    baseline_algo = {**raw["algo"], "name": "multitask_ppo", "lr": args.baseline_lr}
    rims = {**raw, "name": f"rims-s{seed}", "algo": baseline_algo, "meta": baseline_meta}
    lstm = {**rims, "name": f"lstm-s{seed}", "core": {"name": "lstm", "hidden_size": args.lstm_hidden}}
    configs = {"Meta-RIMs": {**raw, "name": f"meta-rims-s{seed}"}, "RIMs": rims, "LSTM": lstm}
    return {model: resolve_config(configs[model]) for model in args.models}


def finetune_config(trained: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The config that fine-tunes a model trained with ``trained`` on the held-out task.

    Meta-RIMs keeps ``meta_ppo`` with the held-out task as its only task; the baselines use plain PPO.
    """
    raw = copy.deepcopy(trained)
    raw["name"] = f"{trained['name']}-finetune"
    raw["total_frames"] = args.finetune_frames
    raw["env"]["id"] = args.heldout
    if raw["algo"]["name"] == "meta_ppo":
        raw["meta"] = {**raw["meta"], "tasks": [args.heldout], "suite": None, "task_schedule": "sample"}
    else:
        raw["algo"]["name"] = "ppo"
        raw.pop("meta", None)
    return resolve_config(raw)


# -- runs ------------------------------------------------------------------------------------------
def train(config: dict[str, Any], run_dir: Path, init_from: Path | None = None) -> Path:
    """Train ``config`` into ``run_dir`` and return its checkpoint.

    :param config: a resolved config.
    :param run_dir: the run's directory; whatever it held is deleted first.
    :param init_from: a checkpoint whose policy weights the run starts from (fine-tuning);
        its architecture must be the one ``config`` builds (``load_state_dict`` checks every tensor).
    """
    # A fresh run each time: a Trainer appends to the metrics of a directory it finds.
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = Trainer(config, run_dir)
    if init_from is not None:
        trainer.policy.load_state_dict(load_checkpoint(init_from)["policy"]["state_dict"])
    return trainer.run()


def read_curve(run_dir: Path, model: str, seed: int, threshold: float) -> FinetuneResult:
    """The return curve of a fine-tuning run from its ``metrics.jsonl``."""
    result = FinetuneResult(model, seed)
    value = math.nan
    episodes = 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        # The trainer logs the windowed mean only after rollouts that finished an episode; in between
        # the window (and so the mean) is unchanged.
        if row.get(RETURN_KEY) is not None:
            value = float(row[RETURN_KEY])
        episodes += int(row.get("rollout/episodes") or 0)
        result.frames.append(row["frames"])
        result.returns.append(value)
        # Only a full window counts: the mean of the first few (lucky) episodes is not adaptation.
        if result.frames_to_threshold is None and episodes >= FULL_WINDOW and value >= threshold:
            result.frames_to_threshold = row["frames"]
    return result


# -- reporting -------------------------------------------------------------------------------------
def curve_points(result: FinetuneResult, points: int = 5) -> str:
    """The return at ``points`` evenly spaced fractions of the budget, as ``frames:return`` pairs."""
    if not result.frames:
        return "-"
    picks = sorted({min(len(result.frames) - 1, round(i * (len(result.frames) - 1) / (points - 1)))
                    for i in range(points)})
    return "  ".join(f"{result.frames[i]}:{result.returns[i]:.2f}" for i in picks)


def format_frames(frames: int | None, budget: int) -> str:
    return f"> {budget}" if frames is None else str(frames)


def results_table(results: list[FinetuneResult], budget: int) -> list[str]:
    """Markdown rows: per model and seed, frames to threshold, first and final return."""
    lines = ["| model | seed | frames to threshold | first return | final return |", "|---|---|---|---|---|"]
    for r in results:
        first = next((v for v in r.returns if not math.isnan(v)), math.nan)
        lines.append(f"| {r.model} | {r.seed} | {format_frames(r.frames_to_threshold, budget)} | "
                     f"{first:.3f} | {r.final_return:.3f} |")
    return lines


def summary_table(results: list[FinetuneResult], budget: int) -> list[str]:
    """Markdown rows: per model, how many seeds reached the threshold, median frames, mean final return."""
    lines = ["| model | seeds reaching threshold | median frames to threshold | mean final return |",
             "|---|---|---|---|"]
    for model in MODELS:
        runs = [r for r in results if r.model == model]
        if not runs:
            continue
        # A seed that never reached the threshold counts as the whole budget (a lower bound on its time).
        frames = [r.frames_to_threshold if r.frames_to_threshold is not None else budget for r in runs]
        reached = sum(r.frames_to_threshold is not None for r in runs)
        median = int(np.median(frames))
        finals = [r.final_return for r in runs if not math.isnan(r.final_return)]
        lines.append(f"| {model} | {reached}/{len(runs)} | {format_frames(median if reached else None, budget)} | "
                     f"{np.mean(finals) if finals else math.nan:.3f} |")
    return lines


def plot(results: list[FinetuneResult], threshold: float, heldout: str, path: Path) -> None:
    """Fine-tuning return curves: thin lines per seed, a thick line for each model's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for color, model in zip(("tab:red", "tab:blue", "tab:gray"), MODELS, strict=True):
        runs = [r for r in results if r.model == model and r.frames]
        if not runs:
            continue
        for r in runs:
            ax.plot(r.frames, r.returns, color=color, alpha=0.3, linewidth=0.8)
        grid = np.array(runs[0].frames)
        # Before a seed's first finished episode its return counts as 0 in the mean (it has not succeeded).
        curves = np.array([np.interp(grid, r.frames, np.nan_to_num(r.returns, nan=0.0)) for r in runs])
        ax.plot(grid, curves.mean(0), color=color, linewidth=2, label=f"{model} (mean of {len(runs)})")
    ax.axhline(threshold, color="black", linestyle="--", linewidth=0.8, label=f"threshold {threshold}")
    ax.set_xlabel(f"fine-tuning frames on {heldout}")
    ax.set_ylabel("mean return (last 100 episodes)")
    ax.set_title("Adaptation to a held-out task")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of a markdown file, keeping every other section."""
    text = path.read_text() if path.is_file() else "# Results\n"
    lines = text.splitlines(keepends=True)
    header = f"## {title}"
    start = next((i for i, line in enumerate(lines) if line.rstrip() == header), None)
    section = [f"{header}\n", "\n", body.rstrip("\n") + "\n"]
    if start is None:
        if lines and lines[-1].strip():
            lines.append("\n")
        lines += section
    else:
        # The section ends where the next heading of the same or a higher level begins.
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= 2), len(lines))
        after = ["\n", *lines[end:]] if end < len(lines) else []
        lines = lines[:start] + section + after
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))


def markdown_body(results: list[FinetuneResult], args: argparse.Namespace, tasks: list[str], image: str,
                  minutes: float) -> str:
    command = "python benchmarks/adaptation.py " + " ".join(sys.argv[1:])
    lines = [
        f"Written by `{command.strip()}` ({minutes:.0f} min).",
        "",
        f"Each model is trained on {', '.join(f'`{t}`' for t in tasks)} for {args.frames} frames with the same "
        f"task schedule (`{args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}`), "
        f"then fine-tuned on the held-out `{args.heldout}` for {args.finetune_frames} frames from its trained weights "
        "(fresh optimisers). Meta-RIMs trains and fine-tunes with `meta_ppo` (fast module cells, encoder and heads; "
        f"slow attention); RIMs and LSTM (hidden size {args.lstm_hidden}) train with `multitask_ppo` "
        f"(plain PPO on the same tasks, lr {args.baseline_lr}) and fine-tune with `ppo`.",
        "",
        f"Frames to threshold: fine-tuning frames until the mean return of the last 100 episodes reached "
        f"{args.threshold} (`> budget`: never). First return: that mean after the first fine-tuning rollout "
        "with finished episodes (close to zero-shot transfer).",
        "",
        *summary_table(results, args.finetune_frames),
        "",
        *results_table(results, args.finetune_frames),
        "",
        f"![fine-tuning return curves]({image})",
    ]
    if not any(r.frames_to_threshold is not None for r in results):
        # Said with the numbers, so that a reader of a run where nothing adapted does not read a ranking into it.
        lines[1:1] = [
            "",
            f"No model reached {args.threshold} within {args.finetune_frames} fine-tuning frames, so this run does "
            "not rank them: the budget is too small for the held-out task (a fresh PPO agent needs on the order of "
            "1M frames on DoorKey-8x8). \"First return\" is the mean of the few episodes that end first, mostly "
            "short and successful ones.",
        ]
    if args.quick:
        lines[0:0] = ["**Quick mode: tiny settings, the numbers are meaningless.**", ""]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "meta" / "doorkey-sizes.yaml",
                        help="meta_ppo config giving the training tasks, core and PPO settings")
    parser.add_argument("--heldout", default="MiniGrid-DoorKey-8x8-v0", help="env id to fine-tune on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="run seeds")
    parser.add_argument("--frames", type=int, help="training frames per model (default: the config's total_frames)")
    parser.add_argument("--finetune-frames", type=int, default=200_000, help="fine-tuning frames per model")
    parser.add_argument("--threshold", type=float, default=0.5, help="return that counts as adapted")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models to run")
    parser.add_argument("--baseline-lr", type=float, default=1e-3, help="PPO learning rate of RIMs and LSTM")
    parser.add_argument("--lstm-hidden", type=int, default=128, help="LSTM hidden size (RIMs 4x32 = 128)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch CPU threads (1, the default, is fastest for these small models on a busy CPU; "
                             "0 keeps torch's default)")
    parser.add_argument("--out-dir", type=Path, help="where runs go (default runs/adaptation[-quick])")
    parser.add_argument("--docs-dir", type=Path, help="where adaptation.png and results.md go "
                        "(default docs/, or the out dir with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, one seed: checks that it all runs")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rebuild the report from the runs already in --out-dir")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames = args.frames or QUICK["frames"]
        if args.finetune_frames == parser.get_default("finetune_frames"):
            args.finetune_frames = QUICK["finetune_frames"]
        if args.seeds == parser.get_default("seeds"):
            args.seeds = QUICK["seeds"]
    args.out_dir = args.out_dir or ROOT / "runs" / ("adaptation-quick" if args.quick else "adaptation")
    args.docs_dir = args.docs_dir or (args.out_dir if args.quick else ROOT / "docs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw = read_yaml(args.config)
    if (raw.get("algo") or {}).get("name") != "meta_ppo":
        raise SystemExit(f"{args.config} must be a meta_ppo config (algo.name: meta_ppo)")
    args.frames = args.frames or resolve_config(raw)["total_frames"]
    started = time.perf_counter()
    results: list[FinetuneResult] = []
    tasks: list[str] = []
    for seed in args.seeds:
        for model, config in training_configs(raw, args, seed).items():
            run_dir = args.out_dir / config["name"]
            print(f"[{time.perf_counter() - started:6.0f}s] {model} seed {seed}: training {args.frames} frames "
                  f"-> {run_dir}", flush=True)
            checkpoint = run_dir / "checkpoint.pt" if args.report_only else train(config, run_dir)
            tasks = tasks or [task if isinstance(task, str) else task["id"] for task in config["meta"]["tasks"] or []] \
                or [f"suite {config['meta']['suite']}"]
            tuned = finetune_config(config, args)
            tuned_dir = args.out_dir / tuned["name"]
            print(f"[{time.perf_counter() - started:6.0f}s] {model} seed {seed}: fine-tuning on {args.heldout} "
                  f"for {args.finetune_frames} frames -> {tuned_dir}", flush=True)
            if not args.report_only:
                train(tuned, tuned_dir, init_from=checkpoint)
            result = read_curve(tuned_dir, model, seed, args.threshold)
            results.append(result)
            print(f"    frames to {args.threshold}: {format_frames(result.frames_to_threshold, args.finetune_frames)}"
                  f"; curve (frames:return) {curve_points(result)}", flush=True)

    minutes = (time.perf_counter() - started) / 60
    print()
    print("\n".join(summary_table(results, args.finetune_frames)))
    print()
    print("\n".join(results_table(results, args.finetune_frames)))
    image = args.docs_dir / "adaptation.png"
    plot(results, args.threshold, args.heldout, image)
    results_md = args.docs_dir / "results.md"
    write_section(results_md, SECTION_TITLE, markdown_body(results, args, tasks, image.name, minutes))
    print(f"\nplot: {image}\nsection '{SECTION_TITLE}' written to {results_md} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
