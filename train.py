"""Train a recurrent agent from the command line.

    python train.py                                   # embedded default: RIMs + PPO on DoorKey-5x5
    python train.py --config configs/minigrid/doorkey-lstm-ppo.yaml total_frames=200000 core.hidden_size=64
    python train.py core.name=brims --run-dir runs/memory-brims env.id=MiniGrid-MemoryS7-v0
    python train.py --resume runs/doorkey-5x5-rims-ppo [total_frames=300000]

Any config field can be overridden with a dotted ``key=value``, anywhere on the line.
A new run never writes into a directory that holds a run: the default runs/<name> takes the
next free suffix (runs/<name>_2, ...), an explicit --run-dir holding a run is refused.

Exit status: 0 done, 2 bad input or training stopped by an error (the last good checkpoint is
kept), 130 stopped by Ctrl-C (SIGINT), 143 stopped by SIGTERM (both after saving a checkpoint once
training has begun; while starting up, at once, removing the new run's empty folder).

    torchrun --standalone --nproc_per_node=2 train.py ...   # one agent trained by 2 processes

Under torchrun (agents/distributed.py) every rank runs this script; rank 0 prints and writes the
run, and each rank exits with the status above (torchrun then reports a non-zero one as a failure).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Only light modules here: the config and the run directory are checked before torch, gymnasium
# and SB3 are imported (seconds), so --help and a mistyped key answer at once.
from agents.config import ConfigError, check_config_env_id, load_config, parse_overrides
from agents.distributed import DistributedError, env_rank, env_world_size
from agents.run_dir import (
    RunDirError,
    RunLock,
    check_run_dir_path,
    cli_path,
    default_run_dir,
    prepare_run_dir,
    refuse_existing_run,
)
from policies.checkpoint import CheckpointError

# Exit status of a run stopped by a signal: 128 + the signal number, as a shell reports it.
SIGNAL_EXIT = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


class _Once(argparse.Action):
    """Store an option's value, refusing the option a second time (argparse would keep the last one silently:
    ``--config a.yaml --config b.yaml`` trained b alone)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): give it once")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (importing it does not import torch)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=cli_path, action=_Once,
                        help="YAML config file (default: the embedded DoorKey-5x5 RIMs PPO)")
    parser.add_argument("--run-dir", type=cli_path, action=_Once,
                        help="output directory, which must not hold a run (default: runs/<config name>, "
                             "or the next free runs/<config name>_<n>)")
    parser.add_argument("--resume", type=cli_path, action=_Once, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. core.k_active=3")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may come before, between or after the options."""
    return build_parser().parse_intermixed_args(argv)


# How long a rank that stays quiet about bad input waits before exiting (see main's error branch). It
# costs nothing when rank 0 reports: torchrun stops the other ranks as soon as rank 0 has exited.
_QUIET_RANK_EXIT_DELAY_S = 10.0


def _several_processes() -> bool:
    """Whether torchrun started this process among several (a ``WORLD_SIZE`` that is no number: not)."""
    try:
        return env_world_size() > 1
    except DistributedError:
        return False


def _reporting_rank() -> int:
    """The rank that reports an error: this process's, or 0 where torchrun's variables are no numbers
    (that is then the error being reported)."""
    try:
        return env_rank()
    except DistributedError:
        return 0


def _folders_to_make(run_dir: Path) -> list[Path]:
    """The folders ``prepare_run_dir`` will create for ``run_dir``, deepest first: it and its missing parents.
    A path whose existence cannot even be asked (too long, no permission) gives none: prepare_run_dir says why."""
    missing = []
    try:
        for folder in (run_dir, *run_dir.parents):
            if folder.exists():
                break
            missing.append(folder)
    except OSError:
        return []
    return missing


def _remove_if_empty(made: list[Path]) -> None:
    """Remove the run folder (and the parents) this call made for a run that was refused before writing anything
    (an env or core the config asks for cannot be built): an empty folder would look like a run. Anything in
    one keeps it and the folders above it; under torchrun only the reporting rank (0) removes them."""
    if _reporting_rank() != 0:
        return
    for folder in made:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone
            return


def _what_it_trains_on(trainer: Any) -> str:
    """The env id, or for an updater with a task schedule (meta-PPO, multi-task PPO) its tasks, the first few named."""
    names = list(getattr(getattr(trainer.updater, "schedule", None), "names", None) or [])
    if not names:
        return trainer.config["env"]["id"]
    if len(names) == 1:  # env.id only fixes the spaces: the one task may be another env
        return f"1 task ({names[0]})"
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{len(names)} tasks ({shown})"


class _Terminated(BaseException):
    """A SIGTERM outside the trainer's loop (which handles it by checkpointing): while starting up, mostly."""


def _raise_terminated(_signum: int, _frame: Any) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    """Run train.py with ``argv`` (``sys.argv[1:]`` by default) and return its exit status."""
    # A SIGTERM while starting up (imports, envs: seconds) killed the process silently and left the new run's
    # folder empty: it ends as a Ctrl-C does (exit 143, the folder removed). Not under torchrun, whose
    # SIGTERM to the other ranks when one exits is part of how a failed start ends (see the error branch).
    handle = threading.current_thread() is threading.main_thread() and not _several_processes()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if handle else None
    try:
        return _main(argv)
    finally:
        if previous is not None and signal.getsignal(signal.SIGTERM) is _raise_terminated:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    made: list[Path] = []  # the run folder and parents this call creates: removed again if refused before any file
    run_dir: str | Path | None = args.resume  # where this run writes, once known
    try:
        # Everything the user typed is checked here, before the heavy imports and any env is built.
        if args.resume is not None:
            if args.config is not None or args.run_dir is not None:
                raise ConfigError("--resume takes the run's own config and directory: drop --config/--run-dir")
            overrides = parse_overrides(args.overrides)
            try:
                is_file, is_dir = args.resume.is_file(), args.resume.is_dir()
            except OSError as exc:  # Python 3.11 raises for a name too long
                raise CheckpointError(f"cannot use --resume {args.resume}: {exc.strerror or exc}") from None
            if is_file:
                # The run's folder: the file's own, or the one above it for a numbered checkpoint
                # (<run>/checkpoints/checkpoint_<frames>.pt).
                parent = args.resume.parent
                run = parent.parent if parent.name == "checkpoints" else parent
                raise CheckpointError(f"--resume takes a run directory, not a file: {args.resume} is a file "
                                      f"(give the run's folder, {run}; a run resumes from its latest checkpoint.pt)")
            if not is_dir:
                raise CheckpointError(f"checkpoint file not found: {args.resume / 'checkpoint.pt'} "
                                      f"(--resume takes a run directory)")
            RunLock(args.resume).probe()  # another process training there: say so before loading anything
        else:
            config = load_config(args.config, args.overrides)
            check_config_env_id(config)
            if args.run_dir is not None:
                run_dir = args.run_dir
                refuse_existing_run(run_dir)
            else:
                run_dir = default_run_dir(config["name"])
            check_run_dir_path(run_dir)
            made = _folders_to_make(Path(run_dir))
            prepare_run_dir(run_dir)

        from agents import distributed
        from agents.trainer import Trainer, TrainingError  # torch, gymnasium, SB3: seconds

        main_rank = distributed.is_main()
        if args.resume is None and distributed.env_world_size() > 1:
            # Under torchrun every rank trains into rank 0's choice of directory (runs/<name>_<n>).
            distributed.setup(config["device"])
            run_dir = distributed.broadcast_object(run_dir)
        try:
            trainer = Trainer.resume(args.resume, overrides) if args.resume is not None else Trainer(config, run_dir)
            nothing_to_train = trainer.nothing_to_train  # run() then returns at once, writing no file
            if main_rank and not nothing_to_train:
                processes = f", {trainer.world_size} processes" if trainer.world_size > 1 else ""
                print(f"training {trainer.config['name']}: {trainer.config['core']['name']} core, "
                      f"{trainer.config['algo']['name']} on {_what_it_trains_on(trainer)}{processes} -> "
                      f"{trainer.run_dir}")
            checkpoint = trainer.run()
            if trainer.world_size > 1:
                # Every rank is done (rank 0 wrote the checkpoint). The first rank to exit makes torchrun
                # SIGTERM the others: that must not turn their own status (0, 143) into a kill mid-exit.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except TrainingError as exc:
            if args.debug:
                raise
            # Training errors can be one rank's own (its envs): every rank says what stopped it.
            where = "" if distributed.world_size() == 1 else f" (rank {distributed.rank()})"
            print(f"error{where}: {exc}", file=sys.stderr)
            _remove_if_empty(made)
            return 2
        finally:
            distributed.shutdown()
    except (ConfigError, CheckpointError, RunDirError) as exc:
        if args.debug:
            raise
        # Bad input is the same on every rank (same command line, same files): rank 0 alone says it.
        # The first rank to exit makes torchrun SIGTERM the others, so a silent rank that exited at once
        # could have rank 0 stopped before it said anything (a loaded machine or node can put rank 0
        # behind): a silent rank waits for rank 0 to report and exit, and rank 0, once here, ignores the
        # SIGTERM until it has.
        if _reporting_rank() == 0:
            if _several_processes():
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print(f"error: {exc}", file=sys.stderr)
        elif getattr(exc, "rank_specific", False):  # e.g. this rank has no GPU of its own
            print(f"error (rank {_reporting_rank()}): {exc}", file=sys.stderr)
        else:
            time.sleep(_QUIET_RANK_EXIT_DELAY_S)
        _remove_if_empty(made)
        return 2
    except (KeyboardInterrupt, _Terminated) as exc:  # a second Ctrl-C, or a signal while starting up
        if args.debug:
            raise
        written = run_dir is not None and (Path(run_dir) / "checkpoint.pt").is_file()
        stopped = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
        print(("interrupted; " if stopped == "SIGINT" else "stopped by SIGTERM; ") +
              ("the last checkpoint written is intact" if written else "no checkpoint had been written yet"),
              file=sys.stderr)  # the checkpoint writes are atomic
        _remove_if_empty(made)  # interrupted while starting up: no empty folder left to look like a run
        return SIGNAL_EXIT[stopped]
    if not main_rank:
        return SIGNAL_EXIT.get(trainer.stop_signal, 1) if trainer.stopped_early else 0
    if trainer.stopped_early:
        # The trainer printed where the checkpoint is and the resume command; a scheduler that
        # preempted the job must see that it did not finish.
        return SIGNAL_EXIT.get(trainer.stop_signal, 1)
    if nothing_to_train:
        print(f"nothing to train: the run has already done {trainer.frames} frames of its total_frames="
              f"{trainer.config['total_frames']} (give a larger total_frames=... to extend it); its files are as "
              "they were")
    print(f"done: {trainer.frames} frames, checkpoint {checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
