"""Train a recurrent agent from the command line.

    python train.py                                   # embedded default: RIMs + PPO on DoorKey-5x5
    python train.py --config configs/minigrid/doorkey-lstm-ppo.yaml total_frames=200000 core.hidden_size=64
    python train.py --resume runs/doorkey-5x5-rims-ppo [total_frames=300000]

Any config field can be overridden with a dotted ``key=value``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agents.config import ConfigError, load_config, parse_overrides
from agents.trainer import Trainer, TrainingError
from policies.checkpoint import CheckpointError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML config file (default: the embedded DoorKey-5x5 RIMs PPO)")
    parser.add_argument("--run-dir", type=Path, help="output directory (default: runs/<config name>)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. core.k_active=3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.resume is not None:
            if args.config is not None or args.run_dir is not None:
                raise ConfigError("--resume takes the run's own config and directory: drop --config/--run-dir")
            trainer = Trainer.resume(args.resume, parse_overrides(args.overrides))
        else:
            config = load_config(args.config, args.overrides)
            run_dir = args.run_dir if args.run_dir is not None else Path("runs") / config["name"]
            trainer = Trainer(config, run_dir)
        print(f"training {trainer.config['name']}: {trainer.config['core']['name']} core, "
              f"{trainer.config['algo']['name']} on {trainer.config['env']['id']} -> {trainer.run_dir}")
        checkpoint = trainer.run()
    except (ConfigError, CheckpointError, TrainingError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: the last checkpoint written is intact (atomic writes)
        if args.debug:
            raise
        print("interrupted; the last checkpoint written is intact", file=sys.stderr)
        return 130
    print(f"done: {trainer.frames} frames, checkpoint {checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
