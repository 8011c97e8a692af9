"""The quickstart notebook runs top to bottom (trains, loads, runs an episode, plots), and the README's
notebook snippet finishes an episode, so neither can rot."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from readme_blocks import readme_python_block

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    # The kernel inherits this environment: the package is importable from a temporary working
    # directory, where the notebook's run directory goes.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for _ in range(2):  # run a second time, as a user does: a new run directory, not an error
        executed = nbformat.from_dict(notebook)
        NotebookClient(executed, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    notebook = executed

    assert (tmp_path / "runs" / "quickstart" / "checkpoint.pt").is_file()
    assert (tmp_path / "runs" / "quickstart_2" / "checkpoint.pt").is_file()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "episode return" in text and "MiniGrid-DoorKey-6x6-v0: mean return" in text
    # The module-activation plot is shown inline.
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_readme_snippet_finishes_an_episode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The snippet runs verbatim against a tiny checkpoint trained where it looks for the default one
    # (runs/doorkey-5x5-rims-ppo/ under the working directory). It runs in this interpreter, whose
    # imports are already loaded: a fresh one would only add seconds of importing torch.
    from agents.config import load_config
    from agents.trainer import Trainer

    snippet = readme_python_block("notebook-snippet")
    match = re.search(r'load_policy\("([^"]+)"\)', snippet)
    assert match is not None and "deterministic=True" not in snippet
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["core.num_modules=2", "core.module_size=8", "core.k_active=1", "env.n_envs=2",
                                "algo.n_steps=16", "algo.num_minibatches=1", "total_frames=32",
                                "log.progress_bar=false"])
    Trainer(config, Path(match.group(1)).parent).run()
    capsys.readouterr()
    exec(compile(snippet, "README.md notebook snippet", "exec"), {"__name__": "__readme_snippet__"})
    printed = capsys.readouterr().out
    found = re.fullmatch(r"episode return (-?\d+\.\d\d) after (\d+) steps\n", printed)
    assert found is not None, printed
    # DoorKey-5x5 ends an episode within 250 steps (its own limit), terminated or truncated.
    assert 1 <= int(found.group(2)) <= 250
