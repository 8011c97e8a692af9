"""Does a modular core generalise better than LSTM? Now a thin wrapper over the DoorKey generalisation study.

The protocol (LSTM 128 and a parameter-matched LSTM 174, RIMs, BRIMs and ThalNet trained with PPO on
DoorKey-5x5, seeds 1-10, 300k frames, evaluated during and at the end of training on the held-out
DoorKey-6x6, 8x8 and 16x16 with paired evaluation levels; IQM, mean and probability of improvement
with rliable intervals) lives in ``configs/studies/doorkey-generalization.yaml`` and is run by
``study.py``, one code path for every result::

    python benchmarks/generalization.py                # study.py run configs/studies/doorkey-generalization.yaml
    python benchmarks/generalization.py --report-only  # study.py report doorkey-generalization
    python benchmarks/generalization.py --study configs/studies/multiroom-generalization.yaml --workers 1

The report goes to ``studies/<study>/report.md``; ``python study.py publish <study> --out
docs/results.md`` puts finished studies on the results page. The older script that lived here
trained 3 seeds per core and wrote docs/results.md itself; its tables predate the study.

Exit status: study.py's (0 done, 1 some runs failed, 2 bad input with one line, 130/143 stopped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from anywhere: the package lives one folder up.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import study as study_cli  # noqa: E402

DEFAULT_STUDY = ROOT / "configs" / "studies" / "doorkey-generalization.yaml"


def build_parser() -> argparse.ArgumentParser:
    """The wrapper's options (the rest is the study file's); errors are one line and exit 2."""
    parser = study_cli._Parser(prog="benchmarks/generalization.py", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY,
                        help="study file (default configs/studies/doorkey-generalization.yaml)")
    parser.add_argument("--workers", type=int, help="runs at a time (default: the study file's, else the CPU count)")
    parser.add_argument("--root", type=Path, default=Path("studies"),
                        help="where study directories go (default studies/)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: rebuild the report of the runs made")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run (or report) the generalisation study through study.py and return its exit status."""
    args = build_parser().parse_args(argv)
    if args.report_only:
        if not (args.study.is_file() or args.study.is_dir()):
            print(f"error: study file not found: {args.study}", file=sys.stderr)
            return 2
        return study_cli.main(["report", str(args.study), "--root", str(args.root)])
    command = ["run", str(args.study), "--root", str(args.root)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    return study_cli.main(command)


if __name__ == "__main__":
    sys.exit(main())
