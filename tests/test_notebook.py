"""The quickstart notebook runs top to bottom (trains, loads, runs an episode, plots), so it cannot rot."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    # The kernel inherits this environment: the package is importable from a temporary working
    # directory, where the notebook's run directory goes.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    assert (tmp_path / "runs" / "quickstart" / "checkpoint.pt").is_file()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "episode return" in text and "MiniGrid-DoorKey-6x6-v0: mean return" in text
    # The module-activation plot is shown inline.
    assert any("image/png" in o.get("data", {}) for o in outputs)
