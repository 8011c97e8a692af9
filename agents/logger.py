"""Run logging: TensorBoard event files and a JSONL file of the same scalars."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from agents.run_dir import atomic_write


def _frames_of(line: str) -> int | None:
    """The ``frames`` of a metrics.jsonl row, or None for a line that is not a complete row."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    frames = row.get("frames") if isinstance(row, dict) else None
    return frames if isinstance(frames, int) else None


class RunLogger:
    """Writes scalars to TensorBoard and to ``metrics.jsonl`` (one JSON object per log call).

    :param run_dir: the run's directory; event files go to ``run_dir/tb``.
    :param purge_step: on resume, the frame count of the checkpoint: TensorBoard drops any
        events a killed run wrote after it, so curves do not fold back on themselves, and
        ``metrics.jsonl`` keeps only the rows up to it (rewritten atomically; a partial last
        line that a kill or a full disk left is dropped with a warning).
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        if purge_step is not None and self.jsonl_path.exists():
            self._purge(purge_step)
        # TensorBoard purges the steps >= its purge_step; the checkpoint's own row (logged before it was saved)
        # stays, as in metrics.jsonl.
        tb_purge = None if purge_step is None else purge_step + 1
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=tb_purge)
        self.jsonl = self.jsonl_path.open("a")

    def _purge(self, purge_step: int) -> None:
        """Keep the rows up to ``purge_step``; a line that is not a complete row is dropped with a warning."""
        text = self.jsonl_path.read_text(encoding="utf-8", errors="replace")
        kept, dropped = [], []
        lines = text.split("\n")
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            frames = _frames_of(line)
            if frames is None:
                # The last line without its newline is what a kill or a full disk leaves mid-write.
                dropped.append("a partial last line" if number == len(lines) else f"line {number} (not a JSON row)")
            elif frames <= purge_step:
                kept.append(line)
        if dropped:
            print(f"warning: {self.jsonl_path}: dropped {', '.join(dropped)}", file=sys.stderr)
        atomic_write(self.jsonl_path, "".join(row + "\n" for row in kept).encode())

    def log(self, frames: int, scalars: dict[str, float]) -> None:
        """Record ``scalars`` (name -> value, e.g. ``"train/entropy"``) at step ``frames``."""
        for name, value in scalars.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(name, value, frames)
        row = {"frames": frames}
        row.update({k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                    for k, v in scalars.items()})
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        """Flush and close both outputs.

        A failing last flush (a full disk) is not raised: close runs while an error that already
        names the problem is on its way out, and the rows written before stay.
        """
        for close in (self.writer.close, self.jsonl.close):
            try:
                close()
            except OSError:
                pass
