"""Adaptation measures: how fast a (pre-trained) agent learns a held-out task, from its fine-tuning run.

Small pure functions over arrays (as rliable's), so that they can be checked on hand-computed
curves and called from a notebook; no torch. The input is a fine-tuning run's learning curve,
one point per rollout (``metrics.jsonl``):

- ``frames[i]``: the run's frame count after rollout i (increasing, the last one the budget);
- ``values[i]``: the mean return of the episodes that *finished* during rollout i
  (``rollout/ep_return_rollout``), nan when none finished.

**A rollout in which no episode finished** carries the value of the last rollout that had one
(the best estimate of the policy's return is still the last one measured); **before the first
finished episode** it counts as ``initial`` (0 by default: on the sparse-reward MiniGrid tasks a
failed episode scores 0, and an agent none of whose episodes has ended has not reached the goal,
which would have ended the episode). :func:`fill_curve` applies that rule; every measure below
uses it.

Measures (each one number per run, so a study aggregates them over runs with rliable):

- :func:`area_under_curve`: the mean return over the fine-tuning budget, each rollout's value
  weighted by the frames it took (equal rollouts: the plain mean). Higher = adapted earlier and better.
- :func:`frames_to_threshold`: the frames after the first rollout whose value reaches
  ``threshold`` (None: never within the budget; a study counts it as the budget, a lower bound).
- :func:`zero_shot_return`: the mean return of a fixed number of evaluation episodes of the
  pre-trained agent on the held-out task, before any update.
- :func:`final_return`: the mean of the last rollouts' values (the end of the curve).

:func:`read_curve` reads ``(frames, values)`` from a run directory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The per-rollout return the trainer logs: the mean return of the episodes that ended in that rollout.
ROLLOUT_RETURN_KEY = "rollout/ep_return_rollout"


def _curve(frames: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    frames_array = np.asarray(frames, dtype=np.float64)
    values_array = np.asarray(values, dtype=np.float64)
    if frames_array.ndim != 1 or frames_array.shape != values_array.shape or frames_array.size == 0:
        raise ValueError(f"frames and values must be non-empty 1-d arrays of one length, got shapes "
                         f"{frames_array.shape} and {values_array.shape}")
    if not np.isfinite(frames_array).all() or frames_array[0] <= 0 or (np.diff(frames_array) <= 0).any():
        raise ValueError("frames must be positive and strictly increasing (the frame count after each rollout)")
    if np.isinf(values_array).any():
        raise ValueError("values must be finite or nan (nan: no episode finished in that rollout)")
    return frames_array, values_array


def fill_curve(values: Sequence[float] | np.ndarray, initial: float = 0.0) -> np.ndarray:
    """Per-rollout values with each nan (a rollout where no episode finished) replaced by the last
    finite value before it, or by ``initial`` before the first one."""
    out = np.asarray(values, dtype=np.float64).copy()
    last = float(initial)
    for i, value in enumerate(out):
        if math.isnan(value):
            out[i] = last
        else:
            last = float(value)
    return out


def area_under_curve(frames: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray,
                     initial: float = 0.0) -> float:
    """Mean return over the budget: ``sum_i v_i * (f_i - f_{i-1}) / f_last`` with ``f_{-1} = 0`` and the
    values filled by :func:`fill_curve` (a rollout with no finished episode carries the last value, 0
    before the first). In return units: 1.0 means every rollout's episodes all scored 1."""
    frames_array, values_array = _curve(frames, values)
    filled = fill_curve(values_array, initial)
    widths = np.diff(frames_array, prepend=0.0)
    return float(np.sum(filled * widths) / frames_array[-1])


def frames_to_threshold(frames: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray,
                        threshold: float) -> int | None:
    """The frame count after the first rollout whose finished episodes' mean return is at least
    ``threshold``; None if no rollout reaches it. A rollout with no finished episode never counts
    (it carries an older value, which was below the threshold or the search would have stopped)."""
    frames_array, values_array = _curve(frames, values)
    reached = np.flatnonzero(np.nan_to_num(values_array, nan=-np.inf) >= threshold)
    return int(frames_array[reached[0]]) if reached.size else None


def zero_shot_return(episode_returns: Sequence[float] | np.ndarray) -> float:
    """Mean return of the evaluation episodes run before any fine-tuning update."""
    returns = np.asarray(episode_returns, dtype=np.float64)
    if returns.ndim != 1 or returns.size == 0 or not np.isfinite(returns).all():
        raise ValueError("zero-shot return needs a non-empty 1-d array of finite episode returns")
    return float(returns.mean())


def final_return(frames: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray,
                 fraction: float = 0.1, initial: float = 0.0) -> float:
    """Mean of the filled values of the last ``fraction`` of the rollouts (at least one)."""
    _, values_array = _curve(frames, values)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    filled = fill_curve(values_array, initial)
    count = max(1, math.ceil(fraction * filled.size))
    return float(filled[-count:].mean())


def read_curve(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(frames, values)`` of a run from its ``metrics.jsonl``: one point per rollout, nan where no
    episode finished. A row logged twice for one frame count (never after train.py's purge on resume,
    but cheap to guard) keeps its last copy.

    :raises ValueError: if the file is missing, empty, or was written before the trainer logged
        ``rollout/ep_return_rollout`` (a run whose curve cannot be read this way).
    """
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    by_frames: dict[int, float] = {}
    has_key = had_episodes = False
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a partial last line of a killed run
        if not isinstance(row, dict) or not isinstance(row.get("frames"), int):
            continue
        episodes = row.get("rollout/episodes") or 0
        value = row.get(ROLLOUT_RETURN_KEY)
        has_key, had_episodes = has_key or value is not None, had_episodes or bool(episodes)
        by_frames[row["frames"]] = float(value) if episodes and value is not None else math.nan
    if not by_frames:
        raise ValueError(f"{path}: no metrics rows")
    if had_episodes and not has_key:
        raise ValueError(f"{path}: written before the trainer logged {ROLLOUT_RETURN_KEY}; its per-rollout "
                         "returns cannot be read")
    frames = sorted(by_frames)
    return np.array(frames, dtype=np.float64), np.array([by_frames[f] for f in frames], dtype=np.float64)


__all__ = ["ROLLOUT_RETURN_KEY", "area_under_curve", "fill_curve", "final_return", "frames_to_threshold",
           "read_curve", "zero_shot_return"]
