"""PPO with LSTM and RIMs cores on ALE/Pong-v5 for a frame budget; prints the return curve.

    python benchmarks/atari.py --frames 2000000 [--cores lstm rims] [--device cuda] [--game pong]

Uses configs/atari/<game>-<core>-ppo.yaml (8 envs, frame stack 4, sticky actions). Runs on a CPU
(slowly) or a CUDA GPU. The curve is the mean raw game score of the last 100 episodes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import check_out_folder, config_for, shipped_cores, train_and_read

from agents.config import ConfigError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, required=True, help="agent steps per core (x4 emulator frames)")
    parser.add_argument("--cores", nargs="+", default=["lstm", "rims"])
    parser.add_argument("--game", default="pong", choices=["pong", "breakout"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--points", type=int, default=20, help="rows of the printed curve")
    parser.add_argument("--out", type=Path, help="keep the runs here instead of a temporary directory")
    args = parser.parse_args()
    if args.frames < 1 or args.points < 1:
        parser.error("--frames and --points must be positive")
    shipped = shipped_cores(args.game)
    if any(core not in shipped for core in args.cores) or len(set(args.cores)) < len(args.cores):
        parser.error(f"--cores: each of {', '.join(shipped)} (configs/atari/{args.game}-<core>-ppo.yaml) "
                     f"at most once, got {' '.join(args.cores)}")
    # Every core's config, and where its run goes, before the first run (hours on a CPU) starts.
    configs = []
    for core in args.cores:
        try:
            configs.append(config_for(core, args.game, [f"total_frames={args.frames}", f"device={args.device}",
                                                        f"seed={args.seed}"]))
        except ConfigError as exc:
            parser.error(str(exc))
    if args.out is not None:
        check_out_folder(parser, args.out, [config["name"] for config in configs])
    for config in configs:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = args.out / config["name"] if args.out else Path(tmp)
            rows = train_and_read(config, run_dir)
        curve = [(r["frames"], r["rollout/ep_return_mean"]) for r in rows
                 if r.get("rollout/ep_return_mean") is not None]
        step = max(1, len(curve) // args.points)
        print(f"\n{config['name']} on {config['env']['id']} ({args.device}): frames, mean return of last 100 episodes")
        for frames, ret in curve[::step] + curve[-1:]:
            print(f"{frames:>10} {ret:>8.2f}")
        if not curve:
            print(f"  no episode finished within {args.frames} frames (a Pong game lasts thousands)")


if __name__ == "__main__":
    main()
