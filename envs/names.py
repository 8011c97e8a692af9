"""Short display names of env ids (no heavy imports: the study runner uses them without gymnasium)."""

from __future__ import annotations

from collections.abc import Sequence


def short_env_name(env_id: str) -> str:
    """``"DoorKey-5x5"`` for ``"MiniGrid-DoorKey-5x5-v0"``, ``"Pong"`` for ``"ALE/Pong-v5"``: evaluate.py's
    result ``name`` for an ``--env``, and what studies key their envs by."""
    short = env_id.split("/")[-1]
    for prefix in ("MiniGrid-", "BabyAI-"):
        short = short.removeprefix(prefix)
    return short.rsplit("-v", 1)[0]


def short_name_clash(env_ids: Sequence[str]) -> tuple[str, str] | None:
    """The first two of ``env_ids`` with one :func:`short_env_name` (``MiniGrid-Unlock-v0`` and
    ``BabyAI-Unlock-v0``, or ``-v0`` and ``-v1``), or None: results keyed by short name would file the second
    env's under the first's."""
    seen: dict[str, str] = {}
    for env_id in env_ids:
        first = seen.setdefault(short_env_name(env_id), env_id)
        if first != env_id:
            return first, env_id
    return None
