"""benchmarks/sb3_interop.py's learning measures and curves, on hand-written episode logs."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from readme_blocks import readme_python_block

pytest.importorskip("sb3_contrib")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # as when the benchmark runs as a script: it imports learning, peer
_spec = importlib.util.spec_from_file_location("sb3_interop_benchmark", REPO / "benchmarks" / "sb3_interop.py")
interop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(interop)


def test_the_curve_is_the_window_mean_the_table_reads() -> None:
    # 100 failures, then 100 successes: the window mean climbs by 0.01 per episode from the 100th on.
    episodes = [[10 * i, 0.0] for i in range(1, 101)] + [[10 * i, 1.0] for i in range(101, 201)]
    curve = interop.mean_return_curve(episodes)
    assert curve[0] == (1000, 0.0), "no point before 100 episodes have ended"
    assert len(curve) == 101 and curve[-1] == (2000, 1.0)
    first_above = next(frames for frames, mean in curve if mean >= 0.9)
    assert interop.frames_to_threshold(episodes, 0.9) == first_above == 1900
    assert interop.final_return(episodes) == curve[-1][1]


def test_curves_are_drawn_once_a_seed_has_a_point(tmp_path: Path) -> None:
    run = tmp_path / "rims" / "seed_1"
    run.mkdir(parents=True)
    (run / "episodes.json").write_text(json.dumps([[10 * i, 0.5] for i in range(1, 50)]))
    assert interop.plot_learning_curves(tmp_path, ["rims"], [1, 2], 0.9) is None, "49 episodes: no point yet"
    assert not (tmp_path / "curves.png").exists()
    (run / "episodes.json").write_text(json.dumps([[10 * i, 0.5] for i in range(1, 150)]))
    path = interop.plot_learning_curves(tmp_path, ["rims"], [1, 2], 0.9)
    assert path == tmp_path / "curves.png" and path.read_bytes().startswith(b"\x89PNG")


def test_the_lowest_point_after_the_threshold_shows_a_collapse_the_final_mean_hides() -> None:
    # Learned (1.0), collapsed (0.0 for 100 episodes), recovered (1.0): the final mean is 1.0 again.
    episodes = [[i, 1.0] for i in range(100)] + [[100 + i, 0.0] for i in range(100)] + \
               [[200 + i, 1.0] for i in range(100)]
    assert interop.final_return(episodes) == 1.0
    assert interop.lowest_after_threshold(episodes, 0.9) == 0.0
    assert interop.lowest_after_threshold([[i, 0.5] for i in range(150)], 0.9) is None, "never reached"


def test_the_annealed_learning_rate_survives_a_save_and_load(tmp_path: Path) -> None:
    from sb3_contrib import RecurrentPPO

    initial = interop.PPO_KWARGS["learning_rate"]
    assert interop.linear_schedule(initial)(1.0) == initial and interop.linear_schedule(initial)(0.25) == initial / 4
    assert interop.run_name("rims", True) == "rims-anneal" and interop.run_name("rims", False) == "rims"
    env = interop.make_env(0)
    try:
        model = interop.make_model("rims", env, seed=0, anneal_lr=True)
        assert model.lr_schedule(0.5) == pytest.approx(initial / 2)
        model.save(tmp_path / "model.zip")
        loaded = RecurrentPPO.load(tmp_path / "model.zip", env=env, device="cpu")
        assert loaded.lr_schedule(0.5) == pytest.approx(initial / 2), "a resumed run keeps annealing"
        assert interop.make_model("rims", env, seed=0).lr_schedule(0.5) == pytest.approx(initial), "constant"
    finally:
        env.close()


def test_the_readme_snippet_is_the_learning_table_s_annealed_setting(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The README advises the annealed rate from the table under it: its snippet must build that run
    # (seed 1 of `benchmarks/sb3_interop.py --only learning --anneal-lr --frames 300000`). It runs verbatim
    # but for its learn call (tests/test_sb3.py trains the adapter).
    snippet = readme_python_block("sb3-snippet")
    budget = re.findall(r"model\.learn\(([\d_]+)\)", snippet)
    assert budget == ["300_000"], "the table's runs learn for 300,000 frames"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme_snippet__"}
    exec(compile(snippet.replace("model.learn(300_000)", ""), "README.md sb3 snippet", "exec"), namespace)
    model, env = namespace["model"], namespace["env"]
    reference_env = interop.make_env(1)
    try:
        reference = interop.make_model("rims", reference_env, seed=1, anneal_lr=True)
        assert type(model.policy) is type(reference.policy)
        assert model.policy_kwargs == reference.policy_kwargs
        for key in ("n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "ent_coef", "vf_coef",
                    "max_grad_norm", "seed"):
            assert getattr(model, key) == getattr(reference, key), key
        assert env.num_envs == reference_env.num_envs
        assert model.clip_range(1.0) == reference.clip_range(1.0)
        for progress_remaining in (1.0, 0.5, 0.0):
            assert model.lr_schedule(progress_remaining) == pytest.approx(reference.lr_schedule(progress_remaining))
        # The same levels as the table's seed 1 (the model seeds its env with its own seed; building it resets nothing).
        assert np.array_equal(env.reset(), reference_env.reset())
    finally:
        env.close()
        reference_env.close()
