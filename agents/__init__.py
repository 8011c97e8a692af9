"""Agents: rollout storage, GAE, recurrent PPO and A2C, meta-learning (Meta-RIMs), and the training loop."""

from agents.a2c import RecurrentA2C
from agents.config import ConfigError, load_config, resolve_config
from agents.evaluation import EvaluationError, evaluate_policy

# Importing agents.meta registers algo.name meta_ppo / multitask_ppo and the config's meta section.
from agents.meta import MetaPPO, MultiTaskPPO, TaskSchedule
from agents.optim import NonFiniteError
from agents.ppo import RecurrentPPO
from agents.storage import RolloutStorage, compute_gae
from agents.trainer import Trainer, TrainingError, train

__all__ = [
    "ConfigError",
    "EvaluationError",
    "MetaPPO",
    "MultiTaskPPO",
    "NonFiniteError",
    "RecurrentA2C",
    "RecurrentPPO",
    "RolloutStorage",
    "TaskSchedule",
    "Trainer",
    "TrainingError",
    "compute_gae",
    "evaluate_policy",
    "load_config",
    "resolve_config",
    "train",
]
