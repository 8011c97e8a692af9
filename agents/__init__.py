"""Agents: rollout storage, GAE, recurrent PPO and A2C, meta-learning (Meta-RIMs), and the training loop.

The public names below are imported on first use (PEP 562), so ``import agents.config`` (what
``train.py`` needs to validate a config) does not pull in torch, gymnasium or SB3.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it. agents.meta registers algo.name meta_ppo / multitask_ppo
# and the config's meta section when imported; agents.config imports it when a config names them.
_EXPORTS: dict[str, str] = {
    "ConfigError": "agents.config",
    "EvaluationError": "agents.evaluation",
    "MetaPPO": "agents.meta",
    "MultiTaskPPO": "agents.meta",
    "NonFiniteError": "agents.optim",
    "RecurrentA2C": "agents.a2c",
    "RecurrentPPO": "agents.ppo",
    "RolloutStorage": "agents.storage",
    "TaskSchedule": "agents.meta",
    "Trainer": "agents.trainer",
    "TrainingError": "agents.trainer",
    "compute_gae": "agents.storage",
    "evaluate_policy": "agents.evaluation",
    "load_config": "agents.config",
    "make_policy_env": "agents.evaluation",
    "resolve_config": "agents.config",
    "train": "agents.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the module defining a public name on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'agents' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    """The module's attributes, the lazily imported public names included."""
    return sorted({*globals(), *__all__})
