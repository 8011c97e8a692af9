"""Run logging: TensorBoard event files and a JSONL file of the same scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    """Writes scalars to TensorBoard and to ``metrics.jsonl`` (one JSON object per log call).

    :param run_dir: the run's directory; event files go to ``run_dir/tb``.
    :param purge_step: on resume, the frame count of the checkpoint: TensorBoard drops any
        events a killed run wrote after it, so curves do not fold back on themselves.
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge_step)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        if purge_step is not None and self.jsonl_path.exists():
            # Same for the JSONL: keep only the rows up to the checkpoint being resumed.
            rows = [line for line in self.jsonl_path.read_text().splitlines()
                    if line and json.loads(line)["frames"] <= purge_step]
            self.jsonl_path.write_text("".join(row + "\n" for row in rows))
        self.jsonl = self.jsonl_path.open("a")

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
        """Flush and close both outputs."""
        self.writer.close()
        self.jsonl.close()
