"""sb3-contrib's RecurrentPPO driving this package's RIMs core (policies/sb3.py) on MiniGrid-DoorKey-5x5.

    python benchmarks/sb3_interop.py                                  # learning (seeds 1-5) and frames/s
    python benchmarks/sb3_interop.py --only learning --seeds 1-5 --frames 300000
    python benchmarks/sb3_interop.py --only fps --fps-frames 20000     # frames/s only (a few minutes)

Learning: for each seed, ``RecurrentPPO(RecurrentCorePolicy, core="rims")`` trains for ``--frames``
frames on DoorKey-5x5 (SB3's own ``make_vec_env`` with this package's ``wrap_minigrid``), and the
script prints the frames at which the mean return of the last 100 episodes first reached
``--threshold`` (0.9; at least 100 episodes finished), the lowest that mean fell to after it (a run that
learned and collapsed) and that mean at the end, and draws every seed's curve of that mean into
``--out/curves.png``. ``--anneal-lr`` anneals the learning rate linearly to 0 over the budget (as this
package's ``algo.anneal_lr``), in runs of their own (``--out/<policy>-anneal/``, ``curves-anneal.png``).
Seeds run one after the other, one torch thread. Each run saves its model and episode log under
``--out/<policy>/seed_<s>/`` every ``--checkpoint-frames``; running the same command again skips
finished seeds and continues an interrupted one from its last save (fresh episodes: the envs'
unfinished episodes are not saved). ``--learn-policies rims peer`` also trains the peer (sb3-contrib's own
LSTM policy, benchmarks/peer.py) for comparison.

Frames/s: the peer of benchmarks/peer.py (sb3-contrib's own ``CnnLstmPolicy``: the MiniGrid CNN, one
LSTM of 128 shared by actor and critic, heads of one hidden layer of 64; the same peer as
benchmarks/throughput.py's), against ``RecurrentCorePolicy`` with the RIMs core (6 modules of 32, 4
active; this package's grid encoder, a separate critic core, as sb3-contrib's default) and with an
LSTM core built exactly as the peer (same extractor, width, shared core and heads: the adapter's own
overhead). The policies train in turns of ``--fps-chunk`` frames until each has done
``--fps-frames`` (after one untimed warm-up rollout each), so load from other work on the machine
falls on all of them alike. Frames/s counts rollouts and updates, as SB3's ``time/fps``; the rollout
share is given too.

PPO settings are the peer's (benchmarks/peer.py's ``PPO_KWARGS``: 16 envs, 128 steps, 4 epochs, 8
minibatches of 256, lr 1e-3, entropy 0.01, ...), which follow the package's DoorKey config where
sb3-contrib has them. sb3-contrib trains on whole rollout sequences cut at episode starts, not on the
package's 16-step chunks, so the figures are not those of ``python train.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import check_out_folder  # benchmarks/ is on sys.path when a benchmark runs as a script
from learning import parse_seeds
from peer import ENV_ID, LSTM_HIDDEN_SIZE, N_ENVS, PEER_NAME, POLICY_KWARGS, PPO_KWARGS, make_peer, make_peer_env

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python benchmarks/sb3_interop.py` from a source checkout

import torch  # noqa: E402
from sb3_contrib import RecurrentPPO  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.vec_env import VecEnv  # noqa: E402

from policies.sb3 import RecurrentCorePolicy  # noqa: E402

WINDOW = 100  # episodes in the mean return
RIMS = {"num_modules": 6, "module_size": 32, "k_active": 4}  # the package's DoorKey RIMs config
# The peer's policy arguments without its LSTM's: the adapter's LSTM core is built exactly as the peer.
PEER_AS_CORE = {key: value for key, value in POLICY_KWARGS.items() if key not in ("lstm_hidden_size", "n_lstm_layers")}
# Policy label -> (policy class, policy_kwargs); "peer" is benchmarks/peer.py's make_peer.
POLICIES: dict[str, tuple[Any, dict[str, Any]]] = {
    "rims": (RecurrentCorePolicy, {"core": "rims", "core_kwargs": RIMS}),
    "lstm-core": (RecurrentCorePolicy, {"core": "lstm", "core_kwargs": {"hidden_size": LSTM_HIDDEN_SIZE},
                                        **PEER_AS_CORE}),
    "peer": (None, {}),
}
POLICY_NAMES = {"rims": f"RecurrentCorePolicy(rims {RIMS['num_modules']}x{RIMS['module_size']}, "
                        f"{RIMS['k_active']} active)",
                "lstm-core": f"RecurrentCorePolicy(lstm {LSTM_HIDDEN_SIZE}, as the peer)",
                "peer": PEER_NAME}


def make_env(seed: int) -> VecEnv:
    """DoorKey-5x5 through SB3's make_vec_env and this package's MiniGrid wrapper (the peer's env)."""
    return make_peer_env(seed)


def linear_schedule(initial: float) -> Callable[[float], float]:
    """A learning rate in SB3's schedule form: ``initial`` times the progress remaining, 1 -> 0 over the budget
    (as this package's ``algo.anneal_lr``). A resumed run (``reset_num_timesteps=False``) keeps its place on it."""
    def schedule(progress_remaining: float) -> float:
        return initial * progress_remaining
    return schedule


def make_model(label: str, env: VecEnv, seed: int, anneal_lr: bool = False) -> RecurrentPPO:
    """A RecurrentPPO with the policy ``label`` of :data:`POLICIES` and the peer's PPO settings (its learning
    rate annealed linearly to 0 with ``anneal_lr``)."""
    overrides = {"learning_rate": linear_schedule(PPO_KWARGS["learning_rate"])} if anneal_lr else {}
    if label == "peer":
        return make_peer(env, seed=seed, **overrides)
    policy, policy_kwargs = POLICIES[label]
    return RecurrentPPO(policy, env, seed=seed, device="cpu", policy_kwargs=policy_kwargs,
                        **{**PPO_KWARGS, **overrides})


class EpisodeLog(BaseCallback):
    """Records (frames, return) of every finished episode, and saves model and log every ``save_every`` frames."""

    def __init__(self, episodes: list[list[float]], save_every: int, save: Any) -> None:
        super().__init__()
        self.episodes, self.save_every, self.save = episodes, save_every, save
        self.next_save = 0

    def _on_training_start(self) -> None:
        self.next_save = self.num_timesteps + self.save_every

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info:
                self.episodes.append([self.num_timesteps, float(info["episode"]["r"])])
        return True

    def _on_rollout_end(self) -> None:
        # After a whole rollout, so a resumed run restarts at a rollout boundary.
        if self.num_timesteps >= self.next_save:
            self.save()
            self.next_save = self.num_timesteps + self.save_every


def frames_to_threshold(episodes: list[list[float]], threshold: float) -> int | None:
    """Frames at which the mean of the last 100 episode returns (100 finished at least) first reached ``threshold``."""
    return next((frames for frames, mean in mean_return_curve(episodes) if mean >= threshold), None)


def lowest_after_threshold(episodes: list[list[float]], threshold: float) -> float | None:
    """The lowest mean return of the last 100 episodes after it first reached ``threshold`` (None: never
    reached): how far a run that had learned fell again, which the final mean alone does not show."""
    curve = mean_return_curve(episodes)
    first = next((i for i, (_, mean) in enumerate(curve) if mean >= threshold), None)
    return None if first is None else min(mean for _, mean in curve[first:])


def final_return(episodes: list[list[float]]) -> float | None:
    """The mean return of the last 100 episodes (None before any ended)."""
    last = [ret for _, ret in episodes[-WINDOW:]]
    return statistics.fmean(last) if last else None


def mean_return_curve(episodes: list[list[float]]) -> list[tuple[int, float]]:
    """``(frames, mean of the last 100 returns)`` at every episode end once 100 have ended: what
    :func:`frames_to_threshold` scans and :func:`final_return` ends with."""
    window: deque[float] = deque(maxlen=WINDOW)
    curve = []
    for frames, ret in episodes:
        window.append(ret)
        if len(window) == WINDOW:
            curve.append((int(frames), statistics.fmean(window)))
    return curve


def plot_learning_curves(out: Path, labels: list[str], seeds: list[int], threshold: float,
                         anneal_lr: bool = False) -> Path | None:
    """Every seed's mean-return curve, a panel per policy, into ``out/curves.png`` (``curves-anneal.png`` for the
    annealed runs; None: no run has a point yet).
    The table's two numbers per seed hide a run that learned, collapsed and recovered; the curve shows it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from agents.plots import save_figure_atomic

    fig = Figure(figsize=(4.2 * len(labels), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(labels), squeeze=False, sharey=True).ravel()
    drawn = False
    for ax, label in zip(axes, labels):
        for i, seed in enumerate(seeds):
            log = out / run_name(label, anneal_lr) / f"seed_{seed}" / "episodes.json"
            curve = mean_return_curve(json.loads(log.read_text())) if log.is_file() else []
            if not curve:
                continue
            ax.plot([f / 1000 for f, _ in curve], [m for _, m in curve], color=f"C{i % 10}", linewidth=1.2,
                    label=f"seed {seed}")
            drawn = True
        ax.axhline(threshold, color="grey", linewidth=0.8, linestyle=":")
        title = f"RecurrentPPO + {POLICY_NAMES[label]}" if label != "peer" else PEER_NAME
        ax.set_title(title + (",\nlearning rate annealed" if anneal_lr else ""), fontsize=8)
        ax.set_xlabel("frames (thousands)")
        ax.set_ylabel(f"mean return, last {WINDOW} episodes", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=5, frameon=False)
    return save_figure_atomic(fig, out / f"{run_name('curves', anneal_lr)}.png") if drawn else None


def run_name(label: str, anneal_lr: bool) -> str:
    """The folder under ``--out`` of a policy's learning runs: a variant of the PPO settings gets its own."""
    return f"{label}-anneal" if anneal_lr else label


def learn_seed(label: str, seed: int, frames: int, out: Path, save_every: int, threshold: float,
               anneal_lr: bool = False) -> dict[str, Any]:
    """Train one seed to ``frames`` frames (continuing a saved run) and return its result, saved as result.json."""
    run_dir = out / run_name(label, anneal_lr) / f"seed_{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result["frames"] >= frames:
            if "lowest_after_threshold" not in result and (run_dir / "episodes.json").is_file():  # an older result
                episodes = json.loads((run_dir / "episodes.json").read_text())
                result["lowest_after_threshold"] = lowest_after_threshold(episodes, result["threshold"])
            return result
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path, log_path = run_dir / "model.zip", run_dir / "episodes.json"
    env = make_env(seed)
    episodes: list[list[float]] = []
    if model_path.is_file() and log_path.is_file():
        model = RecurrentPPO.load(model_path, env=env, device="cpu")
        episodes = json.loads(log_path.read_text())
        print(f"  {label} seed {seed}: continuing from {model.num_timesteps} frames", flush=True)
    else:
        model = make_model(label, env, seed, anneal_lr)

    def save() -> None:
        # Model first, then the log: a kill in between leaves a log behind its model, never ahead of it.
        model.save(run_dir / "model.tmp.zip")
        os.replace(run_dir / "model.tmp.zip", model_path)
        (run_dir / "episodes.tmp.json").write_text(json.dumps(episodes))
        os.replace(run_dir / "episodes.tmp.json", log_path)

    started = time.perf_counter()
    done_before = model.num_timesteps
    if model.num_timesteps < frames:
        model.learn(frames - model.num_timesteps, callback=EpisodeLog(episodes, save_every, save),
                    reset_num_timesteps=False)
        save()
    result = {"policy": label, "seed": seed, "frames": int(model.num_timesteps),
              "frames_to_threshold": frames_to_threshold(episodes, threshold), "threshold": threshold,
              "final_return": final_return(episodes),
              "lowest_after_threshold": lowest_after_threshold(episodes, threshold), "episodes": len(episodes),
              "fps": (model.num_timesteps - done_before) / max(time.perf_counter() - started, 1e-9)}
    result_path.write_text(json.dumps(result, indent=1))
    env.close()
    return result


class RolloutClock(BaseCallback):
    """Adds up the wall time spent collecting rollouts (the rest of ``learn`` is updates)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self._start = 0.0

    def _on_rollout_start(self) -> None:
        self._start = time.perf_counter()

    def _on_rollout_end(self) -> None:
        self.seconds += time.perf_counter() - self._start

    def _on_step(self) -> bool:
        return True


def measure_fps(labels: list[str], frames: int, chunk: int) -> list[str]:
    """Train the policies in turns of ``chunk`` frames to ``frames`` each; one table row per policy."""
    rollout = PPO_KWARGS["n_steps"] * N_ENVS
    models = {label: make_model(label, make_env(0), seed=0) for label in labels}
    clocks = {label: RolloutClock() for label in labels}
    seconds = dict.fromkeys(labels, 0.0)
    done = dict.fromkeys(labels, 0)
    for model in models.values():  # untimed warm-up: kernel build, first allocations
        model.learn(rollout)
    while any(done[label] < frames for label in labels):
        for label in labels:
            if done[label] >= frames:
                continue
            model = models[label]
            before = model.num_timesteps
            started = time.perf_counter()
            model.learn(chunk, callback=clocks[label], reset_num_timesteps=False)
            seconds[label] += time.perf_counter() - started
            done[label] += model.num_timesteps - before
    rows = [f"{'policy':<72}{'params':>9}{'frames':>8}{'seconds':>9}{'frames/s':>10}{'rollout share':>15}"]
    for label in labels:
        params = sum(p.numel() for p in models[label].policy.parameters())
        rows.append(f"{POLICY_NAMES[label]:<72}{params:>9}{done[label]:>8}{seconds[label]:>9.1f}"
                    f"{done[label] / seconds[label]:>10.0f}{clocks[label].seconds / seconds[label]:>15.0%}")
    return rows


def main() -> None:
    """Run the learning benchmark and/or the frames/s comparison and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("learning", "fps"), help="run one half only")
    parser.add_argument("--seeds", nargs="+", default=["1-5"], help="seeds or ranges, e.g. 1-5 7")
    parser.add_argument("--frames", type=int, default=300_000, help="learning budget per seed")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--learn-policies", nargs="+", default=["rims"], choices=list(POLICIES))
    parser.add_argument("--anneal-lr", action="store_true",
                        help="learning runs anneal the learning rate linearly to 0 over the budget (runs go to "
                             "OUT/<policy>-anneal)")
    parser.add_argument("--checkpoint-frames", type=int, default=32_768, help="save a learning run this often")
    parser.add_argument("--fps-frames", type=int, default=20_480, help="timed frames per policy")
    parser.add_argument("--fps-chunk", type=int, default=4096, help="frames per turn in the frames/s comparison")
    parser.add_argument("--fps-policies", nargs="+", default=["rims", "peer", "lstm-core"], choices=list(POLICIES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "sb3_interop")
    args = parser.parse_args()
    for option in ("frames", "checkpoint_frames", "fps_frames", "fps_chunk"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be positive")
    if not 0 < args.threshold <= 1:  # DoorKey's returns lie in [0, 1]
        parser.error(f"--threshold must be in (0, 1], got {args.threshold}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        parser.error(str(exc))
    if args.only != "fps":
        check_out_folder(parser, args.out)
    torch.set_num_threads(1)  # agent-sized batches; the other cores stay free for other runs

    print(f"sb3-contrib RecurrentPPO on {ENV_ID}, {N_ENVS} envs, {PPO_KWARGS}"
          + (" (learning runs: the learning rate annealed linearly to 0)" if args.anneal_lr else ""), flush=True)
    if args.only != "fps":
        kept_bar = round(args.threshold - 0.05, 6)  # as benchmarks/learning.py's --final
        rows = [f"{'policy':<14}{'seed':>5}{'frames':>9}{'to ' + str(args.threshold):>10}{'lowest after':>14}"
                f"{'final':>8}{'fps':>7}"]
        for label in args.learn_policies:
            name = run_name(label, args.anneal_lr)
            results = [learn_seed(label, seed, args.frames, args.out, args.checkpoint_frames, args.threshold,
                                  args.anneal_lr) for seed in seeds]
            for r in results:
                final = "-" if r["final_return"] is None else f"{r['final_return']:.3f}"
                lowest = r.get("lowest_after_threshold")
                lowest = "-" if lowest is None else f"{lowest:.3f}"
                rows.append(f"{name:<14}{r['seed']:>5}{r['frames']:>9}{r['frames_to_threshold'] or '-':>10}"
                            f"{lowest:>14}{final:>8}{r['fps']:>7.0f}")
            reached = sum(r["frames_to_threshold"] is not None for r in results)
            kept = sum(r["frames_to_threshold"] is not None and r["final_return"] >= kept_bar for r in results)
            rows.append(f"{name:<14} reached {args.threshold} on {reached}/{len(results)} seeds within {args.frames} "
                        f"frames, and still >= {kept_bar} at the end on {kept}/{len(results)}")
        print("\n".join(rows), flush=True)
        curves = plot_learning_curves(args.out, args.learn_policies, seeds, args.threshold,
                                      args.anneal_lr)
        if curves is not None:
            print(f"curves: {curves}", flush=True)
    if args.only != "learning":
        print(f"frames/s, {args.fps_frames} frames each in turns of {args.fps_chunk}, one torch thread:", flush=True)
        print("\n".join(measure_fps(args.fps_policies, args.fps_frames, args.fps_chunk)), flush=True)


if __name__ == "__main__":
    main()
