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
