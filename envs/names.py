"""Short display names of env ids (no heavy imports: the study runner uses them without gymnasium)."""

from __future__ import annotations


def short_env_name(env_id: str) -> str:
    """``"DoorKey-5x5"`` for ``"MiniGrid-DoorKey-5x5-v0"``, ``"Pong"`` for ``"ALE/Pong-v5"``: evaluate.py's
    result ``name`` for an ``--env``, and what studies key their envs by."""
    short = env_id.split("/")[-1]
    for prefix in ("MiniGrid-", "BabyAI-"):
        short = short.removeprefix(prefix)
    return short.rsplit("-v", 1)[0]
