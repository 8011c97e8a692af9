"""Policies: recurrent cores, observation encoders, the actor-critic and checkpoint loading.

The public names below are imported on first use (PEP 562): importing a light submodule (or
``CheckpointError``) does not pull in torch until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "CORES": "policies.cores",
    "BRIMs": "policies.cores",
    "CheckpointError": "policies.checkpoint",
    "GRUCore": "policies.cores",
    "LSTMCore": "policies.cores",
    "Policy": "policies.policy",
    "RIMs": "policies.cores",
    "RecurrentActorCritic": "policies.actor_critic",
    "RecurrentCore": "policies.cores",
    "ThalNet": "policies.cores",
    "load_checkpoint": "policies.checkpoint",
    "load_policy": "policies.policy",
    "make_core": "policies.cores",
    "make_encoder": "policies.encoders",
    "obs_to_tensor": "policies.actor_critic",
    "save_checkpoint": "policies.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the module defining a public name on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'policies' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    """The module's attributes, the lazily imported public names included."""
    return sorted({*globals(), *__all__})
