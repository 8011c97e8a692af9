"""Environments: Stable-Baselines3 vec envs for MiniGrid/BabyAI and Atari, and held-out suites.

Public API::

    make_vec_env(env_id, n_envs=1, seed=0, *, vec_env="dummy", frame_stack=4, clip_rewards=True,
                 mission=False, env_kwargs=None, level_seeds=None, render_mode=None,
                 max_episode_steps=None, terminal_on_life_loss=False,
                 backend="gymnasium") -> VecEnv  # or "envpool": envs.envpool_backend
    make_env(env_id, seed=None, **same per-env options) -> gym.Env
    env_seeds(seed, n_envs) -> list[int]  # env i's seed: SeedSequence(seed).spawn(n_envs)[i]
    env_spaces(env_id, options) -> (observation_space, action_space)  # of make_vec_env's envs
    check_env_id(env_id) -> None          # ValueError with close matches / ROM help
    env_family(env_id) -> "minigrid" | "atari" | "other"
    Suite, EnvSpec, SUITES, list_suites(), get_suite(name, **params)

This package imports neither ``agents`` nor ``policies``.
"""

import importlib
from typing import Any

# Public name -> the submodule that defines it, imported on first use (PEP 562): ``envs.registry``
# (env ids, no SB3 or torch) can then be used before the training stack is imported.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["VEC_ENV_TYPES", "env_seeds", "env_spaces", "make_env", "make_vec_env"], "envs.factory"),
    **dict.fromkeys(["EnvFamily", "check_env_id", "env_family"], "envs.registry"),
    **dict.fromkeys(["MISSION_MAX_LEN", "MISSION_VOCAB", "PAD_ID", "UNK_ID", "VOCAB_SIZE", "tokenize_mission"],
                    "envs.minigrid"),
    **dict.fromkeys(["SUITES", "EnvSpec", "Suite", "get_suite", "list_suites"], "envs.suites"),
    "LevelSeedWrapper": "envs.wrappers",
}

__all__ = [
    "MISSION_MAX_LEN",
    "MISSION_VOCAB",
    "PAD_ID",
    "SUITES",
    "UNK_ID",
    "VEC_ENV_TYPES",
    "VOCAB_SIZE",
    "EnvFamily",
    "EnvSpec",
    "LevelSeedWrapper",
    "Suite",
    "check_env_id",
    "env_family",
    "env_seeds",
    "env_spaces",
    "get_suite",
    "list_suites",
    "make_env",
    "make_vec_env",
    "tokenize_mission",
]


def __getattr__(name: str) -> Any:
    """Import the submodule defining a public name on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'envs' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    """The module's attributes, the lazily imported public names included."""
    return sorted({*globals(), *__all__})
