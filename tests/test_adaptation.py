"""Adaptation: the measures on hand-computed curves, and a tiny adaptation study run end to end
(pre-train, fine-tune, report) with a rerun that trains nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from agents.adaptation import (
    area_under_curve,
    fill_curve,
    final_return,
    frames_to_threshold,
    read_curve,
    zero_shot_return,
)

NAN = math.nan


# -- the measures on known curves ---------------------------------------------------------------------


def test_rollouts_without_a_finished_episode_carry_the_last_value_and_count_0_before_the_first() -> None:
    assert fill_curve([NAN, 0.5, NAN, 1.0]).tolist() == [0.0, 0.5, 0.5, 1.0]
    assert fill_curve([NAN, NAN, 0.3], initial=-1.0).tolist() == [-1.0, -1.0, 0.3]
    assert fill_curve([0.2, 0.4]).tolist() == [0.2, 0.4]


def test_area_under_the_curve_is_the_frame_weighted_mean_return_over_the_budget() -> None:
    # Equal rollouts of 100 frames: filled values 0, 0.5, 0.5, 1.0 -> mean 0.5.
    assert area_under_curve([100, 200, 300, 400], [NAN, 0.5, NAN, 1.0]) == pytest.approx(0.5)
    # Unequal widths (100, 200, 100): (0.2*100 + 0.2*200 + 0.8*100) / 400 = 0.35.
    assert area_under_curve([100, 300, 400], [0.2, NAN, 0.8]) == pytest.approx(0.35)
    assert area_under_curve([50, 100], [1.0, 1.0]) == pytest.approx(1.0)
    assert area_under_curve([50, 100], [NAN, NAN]) == 0.0
    for frames, values in (([100, 100], [0.1, 0.2]), ([0, 100], [0.1, 0.2]), ([100], [0.1, 0.2]),
                           ([100, 200], [0.1, math.inf])):
        with pytest.raises(ValueError):
            area_under_curve(frames, values)


def test_frames_to_threshold_is_the_first_rollout_whose_own_episodes_reach_it() -> None:
    frames = [100, 200, 300, 400]
    assert frames_to_threshold(frames, [NAN, 0.5, NAN, 1.0], 0.5) == 200
    assert frames_to_threshold(frames, [NAN, 0.5, NAN, 1.0], 0.9) == 400
    assert frames_to_threshold(frames, [NAN, 0.5, NAN, 1.0], 1.1) is None
    # A rollout without a finished episode never reaches it by carrying an older value.
    assert frames_to_threshold([100, 200, 300], [0.4, NAN, 0.7], 0.5) == 300
    assert frames_to_threshold([100, 200, 300], [0.6, NAN, NAN], 0.6) == 100


def test_zero_shot_and_final_return() -> None:
    assert zero_shot_return([0.0, 1.0, 1.0, 0.5]) == pytest.approx(0.625)
    with pytest.raises(ValueError):
        zero_shot_return([])
    # The last half of the filled curve [0, 0.5, 0.5, 1.0].
    assert final_return([100, 200, 300, 400], [NAN, 0.5, NAN, 1.0], fraction=0.5) == pytest.approx(0.75)
    assert final_return([100, 200, 300, 400], [NAN, 0.5, NAN, 1.0], fraction=0.1) == pytest.approx(1.0)


def test_read_curve_from_metrics_rows(tmp_path: Path) -> None:
    rows = [{"frames": 64, "time/fps": 1.0},
            {"frames": 128, "rollout/episodes": 2.0, "rollout/ep_return_mean": 0.1, "rollout/ep_return_rollout": 0.3},
            {"frames": 192, "time/fps": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"frames": 25')
    frames, values = read_curve(tmp_path)
    assert frames.tolist() == [64, 128, 192]
    assert np.isnan(values[0]) and values[1] == 0.3 and np.isnan(values[2])
    old = [{"frames": 64, "rollout/episodes": 2.0, "rollout/ep_return_mean": 0.1}]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(old[0]) + "\n")
    with pytest.raises(ValueError, match="written before the trainer logged"):
        read_curve(tmp_path)


# -- init_from: a new run that starts from another run's weights ---------------------------------------


def test_init_from_loads_the_weights_only_and_refuses_another_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    import train
    from agents.config import load_config
    from agents.trainer import Trainer
    from policies.checkpoint import load_checkpoint

    tiny = ["core.name=lstm", "core.hidden_size=16", "env.n_envs=2", "algo.n_steps=16", "algo.num_minibatches=1",
            "algo.n_epochs=1", "log.progress_bar=false", "total_frames=32"]
    threads = torch.get_num_threads()
    try:
        assert train.main([*tiny, "--run-dir", str(tmp_path / "a")]) == 0
        source = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
        tuned = Trainer(load_config(None, [*tiny, "seed=7", f"init_from={tmp_path / 'a'}"]), tmp_path / "b")
        for key, value in tuned.policy.state_dict().items():
            assert torch.equal(value, source["policy"]["state_dict"][key]), key
        assert tuned.frames == 0 and not tuned.updater.optimizer.state_dict()["state"]  # a fresh optimiser
        # Another core size, or a file that is not there: one line, exit 2, before any training.
        for extra, message in ((["core.hidden_size=24"], "holds a policy with core_kwargs="),
                               ([], "checkpoint file not found")):
            target = tmp_path / "a" if extra else tmp_path / "missing"
            code = train.main([*tiny, *extra, f"init_from={target}", "--run-dir", str(tmp_path / f"c{len(extra)}")])
            err = capsys.readouterr().err
            assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, err
    finally:
        torch.set_num_threads(threads)
