"""End to end, in seconds: recurrent PPO learns a task that needs memory.

The cue-recall task shows one of two cues at the first step, blanks for ``DELAY`` steps, then asks which cue
it was; the answer is rewarded 1 when right. A policy without memory scores 0.5 on average, one that carries
the cue in its recurrent state 1.0. The unit tests of the update rules (tests/test_update_rules.py) check each
term; this checks that the pieces together (rollout, GAE, replay of the stored sequences, the update, the
state reset at episode starts) learn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from agents.config import load_config
from agents.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENV_ID = "TestCueRecall-v0"
DELAY = 4  # steps between the cue and the question (the question comes with the last)


class CueRecall(gym.Env):
    """Observation ``[cue is 0, cue is 1, question]``; the action at the question (0 or 1) names the cue."""

    observation_space = spaces.Box(0.0, 1.0, (3,), np.float32)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(2)), 0
        obs = np.zeros(3, np.float32)
        obs[self.cue] = 1.0
        return obs, {}

    def step(self, action: int):
        self.t += 1
        if self.t <= DELAY:
            obs = np.zeros(3, np.float32)
            obs[2] = float(self.t == DELAY)  # the question comes with the last blank
            return obs, 0.0, False, False, {}
        return np.zeros(3, np.float32), float(int(action) == self.cue), True, False, {}


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=CueRecall)

# Small networks and short rollouts. On the tuning seeds 100-104 both cores reached a mean of 0.9 within 3.3k-4.6k
# frames and ended at 1.0; the budget is 3.5 times the slowest. (At lr 3e-3 they learned twice as fast, but one
# RIMs seed fell back to 0.54 after reaching 0.9; with DELAY 8 one LSTM seed had not learned by 16k frames.)
CORES = {
    "lstm": ["core.name=lstm", "core.hidden_size=16"],
    "rims": ["core.name=rims", "core.num_modules=4", "core.module_size=8", "core.k_active=2"],
}


@pytest.mark.parametrize("core", list(CORES))
def test_recurrent_ppo_learns_to_recall_a_cue(core: str, tmp_path: Path) -> None:
    config = load_config(None, [*CORES[core], f"env.id={ENV_ID}", "env.n_envs=8", "algo.n_steps=32",
                                "algo.num_minibatches=2", "algo.seq_len=null", "algo.lr=1e-3",
                                "algo.ent_coef=0.01", "total_frames=16384", "seed=1", "log.progress_bar=false"])
    trainer = Trainer(config, tmp_path / core)
    trainer.run()
    returns = [episode["r"] for episode in trainer.recent_episodes][-100:]
    assert len(returns) == 100
    # Without memory the mean is 0.5 (at most 0.62 over 100 episodes, p < 0.01); with it, near 1.
    assert np.mean(returns) >= 0.9, f"{core}: mean return {np.mean(returns):.2f} over the last 100 episodes"
