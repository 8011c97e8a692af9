"""Which env ids exist and which family each belongs to, without SB3 or torch.

Importing this module registers the MiniGrid, BabyAI and ALE ids with gymnasium (about half a
second), so ``train.py`` can check ``env.id`` before it imports the training stack.
"""

from __future__ import annotations

import difflib
from typing import Literal

import ale_py
import gymnasium as gym
import minigrid  # noqa: F401  (importing minigrid registers the MiniGrid and BabyAI ids)

__all__ = ["EnvFamily", "check_env_id", "env_family"]

gym.register_envs(ale_py)
# ALE logs an "A.L.E: ..." / "[Powered by Stella]" banner at Info level on the first env a process builds,
# which landed on stderr beside our one-line errors and --list-suites; its warnings and errors still show.
ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Warning)

EnvFamily = Literal["minigrid", "atari", "other"]


def _spec(env_id: str) -> gym.envs.registration.EnvSpec | None:
    return gym.registry.get(env_id)


def env_family(env_id: str) -> EnvFamily:
    """Return which preprocessing family an env id belongs to.

    Args:
        env_id: a gymnasium id. Registered ids are classified by their entry
            point (``minigrid.*`` -> "minigrid", ``ale_py.*`` -> "atari");
            unregistered ones by their prefix ("MiniGrid-"/"BabyAI-" or "ALE/").

    Returns:
        "minigrid" (MiniGrid and BabyAI), "atari" (ale-py) or "other".
    """
    spec = _spec(env_id)
    entry = spec.entry_point if spec is not None and isinstance(spec.entry_point, str) else ""
    if entry.startswith("minigrid") or env_id.startswith(("MiniGrid-", "BabyAI-")):
        return "minigrid"
    if entry.startswith("ale_py") or env_id.startswith("ALE/"):
        return "atari"
    return "other"


def _close_matches(env_id: str, n: int = 5) -> list[str]:
    ids = list(gym.registry.keys())
    lowered: dict[str, str] = {}
    for i in ids:
        lowered.setdefault(i.lower(), i)
    matches = difflib.get_close_matches(env_id.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[m] for m in matches]


def check_env_id(env_id: str) -> None:
    """Raise ValueError unless ``env_id`` can be built by :func:`make_vec_env`.

    Checks that the id is registered with gymnasium (MiniGrid, BabyAI and ALE
    ids are registered when this module is imported), suggesting close
    matches when it is not, and, for ALE ids, that the game's ROM and OpenCV
    (used by the frame resize) are installed.
    Nothing is created.

    Args:
        env_id: a gymnasium id, e.g. "MiniGrid-DoorKey-5x5-v0" or "ALE/Pong-v5".
    """
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env_id must be a non-empty string, got {env_id!r}")
    spec = _spec(env_id)
    if spec is None:
        matches = _close_matches(env_id)
        hint = (
            f" Did you mean: {', '.join(repr(m) for m in matches)}?"
            if matches
            else " MiniGrid ids look like 'MiniGrid-DoorKey-5x5-v0', BabyAI ids like 'BabyAI-GoToLocal-v0',"
            " Atari ids like 'ALE/Pong-v5'."
        )
        raise ValueError(f"Unknown environment id {env_id!r}: it is not in the gymnasium registry.{hint}")
    if env_family(env_id) == "atari":
        from .atari import check_atari_opencv, check_atari_rom  # imports SB3's Atari wrappers

        game = spec.kwargs.get("game")
        if game is not None:
            check_atari_rom(env_id, game)
        check_atari_opencv()
