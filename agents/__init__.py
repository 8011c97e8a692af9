"""Agents: rollout storage, GAE, recurrent PPO and A2C, and the training loop."""

from agents.a2c import RecurrentA2C
from agents.config import ConfigError, load_config, resolve_config
from agents.optim import NonFiniteError
from agents.ppo import RecurrentPPO
from agents.storage import RolloutStorage, compute_gae
from agents.trainer import Trainer, TrainingError, train

__all__ = [
    "ConfigError",
    "NonFiniteError",
    "RecurrentA2C",
    "RecurrentPPO",
    "RolloutStorage",
    "Trainer",
    "TrainingError",
    "compute_gae",
    "load_config",
    "resolve_config",
    "train",
]
