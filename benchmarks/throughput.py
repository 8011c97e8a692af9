"""Frames per second of recurrent PPO for each core, rollout and update included.

MiniGrid-DoorKey-5x5-v0: 16 envs x 128 steps, 4 epochs, 8 minibatches, with the shipped
configs/minigrid/doorkey-<core>-ppo.yaml (LSTM of 128, RIMs 6x32 with 4 active, ...), twice: with minibatches
of 2 whole 128-step sequences (``algo.seq_len=null``, the setting of the goals below) and with the
shipped 16-step chunks (16 chunks per minibatch, each from its stored start state).
ALE/Breakout-v5: 8 envs, for lstm and rims (configs/atari/breakout-<core>-ppo.yaml).

    python benchmarks/throughput.py [--updates 8] [--cores lstm gru rims brims thalnet] [--no-atari]

Prints the median frames/s over the updates after the first (which pays one-off costs). The cores
of a row group take turns, one update each, so that the machine's drift in speed hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from _common import Trainer, config_for, read_metrics


def measure(cores: list[str], env: str, updates: int, overrides: list[str]) -> dict[str, tuple[float, float, float]]:
    """Median (frames/s, rollout s, update s) per core over ``updates`` PPO updates after a warm-up one.

    The cores take turns, one update each: this machine's speed drifts by tens of percent over
    minutes, and timing the cores one after the other made their ratio drift with it.
    """
    if len(set(cores)) < len(cores):
        raise SystemExit(f"each core once, please: {cores}")
    configs = {core: config_for(core, env, overrides) for core in cores}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = [Trainer(config, Path(tmp) / core) for core, config in configs.items()]
        for update in range(1, updates + 2):
            # Rounds alternate direction, so that a core does not always follow the same one.
            for trainer in trainers if update % 2 else trainers[::-1]:
                trainer.run(stop_at_frames=update * trainer.frames_per_rollout)
                if trainer.stop_signal is not None:
                    raise SystemExit(f"stopped by {trainer.stop_signal}")
        rows = {core: read_metrics(Path(tmp) / core)[1:] for core in cores}
    return {
        core: (
            statistics.median(r["time/fps"] for r in core_rows),
            statistics.median(r["time/rollout_seconds"] for r in core_rows),
            statistics.median(r["time/update_seconds"] for r in core_rows),
        )
        for core, core_rows in rows.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=8, help="timed updates per core (after one warm-up)")
    parser.add_argument("--cores", nargs="+", default=["lstm", "gru", "rims", "brims", "thalnet"])
    parser.add_argument("--atari-cores", nargs="+", default=["lstm", "rims"])
    parser.add_argument("--no-atari", action="store_true", help="skip the Breakout measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, torch_threads={args.threads}")
    print(f"{'env':<26}{'minibatch':<17}{'core':<10}{'frames/s':>10}{'rollout s':>11}{'update s':>10}{'vs lstm':>9}")
    threads = [f"torch_threads={args.threads}"]
    runs = [("doorkey", "2 whole seqs", args.cores, [*threads, "algo.seq_len=null"]),
            ("doorkey", "16 chunks of 16", args.cores, threads)]
    if not args.no_atari:
        runs.append(("breakout", "2 whole seqs", args.atari_cores, [*threads, "algo.anneal_lr=false"]))
    for env, minibatch, cores, overrides in runs:
        results = measure(cores, env, args.updates, overrides)
        baseline = results["lstm"][0] if "lstm" in results else None
        env_id = "MiniGrid-DoorKey-5x5-v0" if env == "doorkey" else "ALE/Breakout-v5"
        for core, (fps, rollout, update) in results.items():
            ratio = f"{fps / baseline:.2f}x" if baseline else "-"
            print(f"{env_id:<26}{minibatch:<17}{core:<10}{fps:>10.0f}{rollout:>11.2f}{update:>10.2f}{ratio:>9}",
                  flush=True)
    print("goals (2-core CPU, 2 whole sequences per minibatch): DoorKey lstm >= 2100 frames/s; rims >= 0.7x lstm")


if __name__ == "__main__":
    main()
