"""Wrappers shared by every environment family."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np


class LevelSeedWrapper(gym.Wrapper):
    """Draw the seed of every reset from a fixed list of level seeds.

    A level seed fully determines the procedurally generated level (for
    MiniGrid/BabyAI: the layout, objects and agent start; for ALE: the no-op
    count and the sticky-action stream). A model can then be trained on one set
    of level seeds and evaluated on a disjoint one.

    Which seed of the list each reset uses is drawn by a private random
    generator, so the sequence of levels is reproducible: it is seeded with
    ``seed`` at construction and re-seeded whenever ``reset`` receives an
    explicit ``seed`` (as Stable-Baselines3 vec envs do on their first reset,
    with env i's seed from ``env_seeds``). The seed given to the wrapped env is always a
    member of ``level_seeds``.

    Args:
        env: the environment to wrap.
        level_seeds: the level seeds to draw from (non-empty, ints).
        seed: seed of the generator that picks seeds from the list.
    """

    def __init__(self, env: gym.Env, level_seeds: Sequence[int], seed: int | None = None) -> None:
        super().__init__(env)
        if len(level_seeds) == 0:
            raise ValueError("level_seeds must not be empty")
        self.level_seeds = np.asarray([int(s) for s in level_seeds], dtype=np.int64)
        self._picker = np.random.default_rng(seed)
        self.current_level_seed: int | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self._picker = np.random.default_rng(seed)
        level = int(self.level_seeds[self._picker.integers(len(self.level_seeds))])
        self.current_level_seed = level
        obs, info = self.env.reset(seed=level, options=options)
        info = dict(info)
        info["level_seed"] = level
        return obs, info
