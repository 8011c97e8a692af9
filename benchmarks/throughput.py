"""Frames per second of recurrent PPO for each core, rollout and update included.

MiniGrid-DoorKey-5x5-v0: 16 envs x 128 steps, 4 epochs, 8 minibatches, with the shipped
configs/minigrid/doorkey-<core>-ppo.yaml (LSTM of 128, RIMs 6x32 with 4 active, ...), twice: with minibatches
of 2 whole 128-step sequences (``algo.seq_len=null``, the setting of the goals below) and with the
shipped 16-step chunks (16 chunks per minibatch, each from its stored start state).
ALE/Breakout-v5: 8 envs, for lstm and rims (configs/atari/breakout-<core>-ppo.yaml).

    python benchmarks/throughput.py [--updates 6] [--cores lstm gru rims brims thalnet] [--no-atari]

Prints the median frames/s over the updates after the first (which pays one-off costs).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from _common import config_for, train_and_read


def measure(core: str, env: str, updates: int, overrides: list[str]) -> tuple[float, float, float]:
    """Median (frames/s, rollout s, update s) over ``updates`` PPO updates after a warm-up one."""
    config = config_for(core, env, overrides)
    frames = (updates + 1) * config["algo"]["n_steps"] * config["env"]["n_envs"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = train_and_read(config, Path(tmp), stop_at_frames=frames)[1:]
    return (statistics.median(r["time/fps"] for r in rows),
            statistics.median(r["time/rollout_seconds"] for r in rows),
            statistics.median(r["time/update_seconds"] for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=6, help="timed updates per core (after one warm-up)")
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
        baseline = None
        for core in cores:
            fps, rollout, update = measure(core, env, args.updates, overrides)
            baseline = fps if core == "lstm" else baseline
            ratio = f"{fps / baseline:.2f}x" if baseline else "-"
            env_id = "MiniGrid-DoorKey-5x5-v0" if env == "doorkey" else "ALE/Breakout-v5"
            print(f"{env_id:<26}{minibatch:<17}{core:<10}{fps:>10.0f}{rollout:>11.2f}{update:>10.2f}{ratio:>9}",
                  flush=True)
    print("goals (2-core CPU, 2 whole sequences per minibatch): DoorKey lstm >= 2100 frames/s; rims >= 0.7x lstm")


if __name__ == "__main__":
    main()
