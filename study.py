"""Run a study (models x seeds, trained and evaluated as ordinary runs) and report it with rliable statistics.

    python study.py run configs/studies/doorkey-generalization.yaml             # this machine, one run per core
    python study.py run configs/studies/doorkey-generalization.yaml --workers 1
    python study.py run configs/studies/doorkey-generalization.yaml --executor ray --address auto
    python study.py status doorkey-generalization                               # what is done, what is left
    python study.py report doorkey-generalization                               # rebuild report.md, train nothing
    python study.py publish doorkey-generalization multiroom-generalization --out docs/results.md

Outputs go to studies/<study>/ (--root to change): runs/<model>/seed_<s>/ (what train.py writes,
plus eval/point_<frames>.json from evaluate.py and provenance.json), logs/, sessions.jsonl (each `run`:
command, start, end, machine), report.md, plots/, scores.csv (every run's scores; an adaptation study's
fine-tuning measures in finetune_scores.csv). `publish` writes a results page (docs/results.md) from finished
studies' reports, their PNGs and scores files under docs/results/<study>/; it refuses a study with unfinished
runs or runs of more than one code version, a page edited by hand (unless --force), and a
docs/results/<study>/ holding files it did not copy there (it replaces only its own PNGs and scores files).
`run` refuses a non-empty studies/<study>/ that holds no study (no study.yaml).
A `kind: adaptation` study (configs/studies/adaptation-*.yaml) pre-trains its models there, then
fine-tunes them into finetune/<run>/<task>/seed_<s>/, and reports how fast each adapted.
Running the same command again skips finished work and resumes interrupted runs; Ctrl-C stops
cleanly (every run checkpoints) and prints the command that continues.

Exit status: 0 done, 1 some runs failed (their logs say why), 2 bad input (one line), 130/143/129
stopped by SIGINT/SIGTERM/SIGHUP (a SIGHUP under nohup is ignored).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agents.config import ConfigError
from agents.run_dir import cli_path, nearest_existing, os_error_text
from agents.study import DEFAULT_ROOT, StudyError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (no torch, no Ray)."""
    parser = _Parser(prog="study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    # --debug after the command too (`study.py run F --debug`); SUPPRESS keeps the value given before it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="train and evaluate every unfinished run of a study file", parents=[debug])
    run.add_argument("study", type=cli_path, help="study file (configs/studies/*.yaml)")
    run.add_argument("--executor", help="local (default: the study file's) or ray")
    run.add_argument("--workers", type=int, help="runs at a time (local; default: the CPU count) or the CPUs of a new "
                                                 "local Ray instance")
    run.add_argument("--address", help="Ray cluster address, or 'auto' for the one `ray start` set up on this machine")
    run.add_argument("--root", type=cli_path, default=DEFAULT_ROOT,
                     help="where study directories go (default studies/)")
    run.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    for name, text in (("status", "show which runs are finished, partly done or not started"),
                       ("report", "rebuild studies/<study>/report.md, its plots and scores files from finished runs")):
        sub = commands.add_parser(name, help=text, parents=[debug])
        sub.add_argument("study", help="study name, study directory, or study file")
        sub.add_argument("--root", type=cli_path, default=DEFAULT_ROOT,
                         help="where study directories are (default studies/)")
        if name == "report":
            sub.add_argument("--split-versions", action="store_true",
                             help="list runs of one model made by different code or configs apart instead of refusing")
            sub.add_argument("--reps", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    publish = commands.add_parser("publish", help="write the results page from finished studies' reports",
                                  parents=[debug])
    publish.add_argument("studies", nargs="*", metavar="study",
                         help="study names or directories (none: a page saying no study is published yet)")
    publish.add_argument("--out", type=cli_path, required=True,
                         help="the page to write, e.g. docs/results.md (its PNGs go to "
                              "<its folder>/<its stem>/<study>/)")
    publish.add_argument("--root", type=cli_path, default=DEFAULT_ROOT,
                         help="where study directories are (default studies/)")
    publish.add_argument("--reps", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    publish.add_argument("--force", action="store_true", help="replace a page that was edited by hand")
    others = publish.add_mutually_exclusive_group()
    others.add_argument("--keep", action="store_true",
                        help="keep the studies already on the page that are not named (as they were published), "
                             "so studies whose runs are on other machines stay on it")
    others.add_argument("--drop", action="store_true",
                        help="take the studies already on the page that are not named off it, deleting their "
                             "published plots and scores (without --keep or --drop such studies are refused)")
    return parser


def _check_not_a_moved_copy(given: Path, name: str, root: Path) -> None:
    """Refuse ``study.py run`` of a study folder's own copy of its file when that folder is not ``root/<name>``
    (a copied or renamed study folder): the runs would go to ``root/<name>``, not the folder it names."""
    from agents.study import STUDY_COPY, study_dir

    if given.name != STUDY_COPY:  # an ordinary study file: study_dir would only read it again
        return
    folder = study_dir(given, root)
    if folder.resolve() != (root / name).resolve() and folder == given.parent:
        fix = (f"run with --root {folder.parent}" if folder.name == name
               else f"rename or move that folder to {root / name}")
        raise StudyError(f"{given} is the file of study {name!r} in {folder}, but `study.py run` works in "
                         f"--root/<name> = {root / name}: {fix} to continue its runs")


def _status(study_arg: str, root: Path) -> int:
    import dataclasses

    from agents.config import locate_config
    from agents.study import (STUDY_COPY, all_jobs, check_existing_run, job_state, load_study, load_study_dir, study_dir,
                              unplanned_runs)

    directory = study_dir(study_arg, root)
    given = Path(study_arg)
    copy = directory / STUDY_COPY
    own_copy = given.name == STUDY_COPY and directory == given.parent  # a study folder's own file: its study
    if given.suffix in (".yaml", ".yml") and locate_config(given).is_file() and not own_copy:
        study = load_study(given, check_envs=False)  # counted as the file asks: what `run` would go on with
        if copy.is_file():
            stored = load_study_dir(directory)
            if dataclasses.replace(study, source=stored.source) != stored:
                print(f"note: {given} differs from {copy}, the study the runs so far were made for; counted here "
                      f"as {given} asks (what `study.py run {given}` would go on with)")
    else:
        study = load_study_dir(directory)
    jobs = all_jobs(study, directory)  # an adaptation study's fine-tuning runs included
    done = 0
    for job in jobs:
        state = job_state(job)
        try:
            check_existing_run(job)
        except StudyError:  # the study file changed this run's config: `run` refuses it, so it is not done
            print(f"{job.key:<40} trained with another config than the study file now asks (run refuses it)")
            continue
        done += state.done
        if state.done:
            what = "done"
        elif not state.started:
            what = "not started"
        else:
            what = f"trained {state.trained_frames:,}/{job.total_frames:,} frames"
            if state.evals_missing:
                what += f", evaluations missing at {', '.join(f'{p:,}' for p in state.evals_missing)}"
        print(f"{job.key:<40} {what}")
    print(f"{done}/{len(jobs)} runs done")
    unplanned = unplanned_runs(study, directory)
    if unplanned:
        print(f"note: {len(unplanned)} run folder(s) the study file does not plan (left out of its report): "
              + ", ".join(str(path.relative_to(directory)) for path in unplanned))
    return 0


def _check_root(root: Path) -> None:
    """Refuse a --root that is, or lies under, a regular file: creating the study folder there fails with a
    bare "Not a directory" naming the study folder, not the option that is wrong."""
    folder = nearest_existing(root)
    if not folder.is_dir():
        raise StudyError(f"--root {root} is a file, not a folder" if folder == root
                         else f"--root {root}: {folder} is a file, not a folder")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            from agents.study import check_executor, load_study, run_study

            if args.executor is not None:
                check_executor(args.executor)
            if args.workers is not None and args.workers < 1:
                raise StudyError(f"--workers must be >= 1, got {args.workers}")
            _check_root(args.root)
            study = load_study(args.study)
            _check_not_a_moved_copy(Path(args.study), study.name, args.root)
            return run_study(study, args.root / study.name, executor=args.executor, workers=args.workers,
                             address=args.address, report=not args.no_report)
        if args.command == "status":
            return _status(args.study, args.root)
        from agents.report import publish, published_studies, write_report

        if args.reps < 100:
            raise StudyError(f"--reps must be >= 100, got {args.reps}")
        if args.command == "publish":
            command = " ".join(["python study.py publish", *map(str, args.studies), "--out", str(args.out),
                                *(["--keep"] if args.keep else []), *(["--drop"] if args.drop else [])])
            before = published_studies(args.out) if args.drop and args.out.is_file() else []
            path = publish(args.studies, args.out, args.root, reps=args.reps, force=args.force, command=command,
                           keep=args.keep, drop=args.drop)
            after = published_studies(path)
            kept = f", {len(after) - len(args.studies)} kept" if args.keep else ""
            dropped = [name for name in before if name not in after]
            kept += f", {len(dropped)} taken off ({', '.join(dropped)})" if dropped else ""
            count = len(args.studies)
            print(f"results page written to {path} ({count} {'study' if count == 1 else 'studies'} published{kept})")
            return 0
        path = write_report(args.study, args.root, split_versions=args.split_versions, reps=args.reps)
        print(f"report written to {path}")
        return 0
    except (StudyError, ConfigError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.debug:
            raise
        # One that names no file (a write to an open file on a full disk) happened under the output or root folder.
        print(f"error: {os_error_text(exc, getattr(args, 'out', None) or args.root)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
