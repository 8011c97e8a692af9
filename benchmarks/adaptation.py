"""How fast do agents adapt to a held-out task? Now a thin wrapper over the adaptation study.

The protocol (pre-training Meta-RIMs, its reversed split, RIMs and LSTM on the same tasks; fine-tuning
each with the same plain-PPO rule, Meta-RIMs also with its own rule, against from-scratch agents; the
area under the fine-tuning curve, frames to a threshold and the zero-shot return with rliable
intervals) lives in ``configs/studies/adaptation-doorkey.yaml`` and is run by ``study.py``, one code
path for every result::

    python benchmarks/adaptation.py                 # = python study.py run configs/studies/adaptation-doorkey.yaml
    python benchmarks/adaptation.py --report-only   # = python study.py report adaptation-doorkey
    python benchmarks/adaptation.py --study configs/studies/adaptation-doorkey.yaml --workers 1

The report goes to ``studies/<study>/report.md``. The older script that lived here fine-tuned
untrained agents for too few frames to reach its threshold; its table in ``docs/results.md``
predates the study.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from anywhere: the package lives one folder up.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import study as study_cli  # noqa: E402

DEFAULT_STUDY = ROOT / "configs" / "studies" / "adaptation-doorkey.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The wrapper's options (the rest is the study file's)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="adaptation study file")
    parser.add_argument("--workers", type=int, help="runs at a time (default: the CPU count)")
    parser.add_argument("--root", type=Path, default=Path("studies"), help="where study directories go")
    parser.add_argument("--report-only", action="store_true", help="train nothing: rebuild the report")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run (or report) the adaptation study through study.py and return its exit status."""
    args = parse_args(argv)
    if args.report_only:
        return study_cli.main(["report", str(args.study), "--root", str(args.root)])
    command = ["run", str(args.study), "--root", str(args.root)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    return study_cli.main(command)


if __name__ == "__main__":
    sys.exit(main())
