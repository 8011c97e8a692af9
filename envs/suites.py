"""Held-out suites: train on some environments, evaluate generalisation on others.

A :class:`Suite` lists the env(s) an agent is trained on and the held-out envs
it is evaluated on. Each entry is an :class:`EnvSpec`: an env id plus the
:func:`~envs.factory.make_vec_env` options that distinguish it (``env_kwargs``,
``level_seeds``, ...), so ``spec.make(n_envs, seed)`` builds it.

Built-in suites (``get_suite(name, **params)``; the parametric ones take the
keyword arguments of their builder):

* ``doorkey``: DoorKey 5x5 -> 6x6, 8x8, 16x16
* ``multiroom``: MultiRoom N2-S4 -> N4-S5, N6
* ``memory``: MemoryS7 -> S9, S11, S13
* ``distshift``: DistShift1 -> DistShift2
* ``lavacrossing``: LavaCrossing S9N1 -> S9N2, S9N3, S11N5
* ``seeds(env_id, ...)``: one env id, disjoint ranges of level seeds
* ``atari-modes(game)``: default mode/difficulty -> every other mode/difficulty pair
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stable_baselines3.common.vec_env import VecEnv

from .atari import atari_modes
from .factory import check_env_id, env_family, make_vec_env

__all__ = ["SUITES", "EnvSpec", "Suite", "get_suite", "list_suites"]


@dataclass
class EnvSpec:
    """One environment of a suite.

    Attributes:
        env_id: a registered gymnasium id.
        options: :func:`~envs.factory.make_vec_env` keyword options that define
            this env (e.g. {"env_kwargs": {"mode": 1}} or {"level_seeds": [...]}).
        name: short display name (defaults to the env id without its prefix/version).
    """

    env_id: str
    options: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            short = self.env_id.split("/")[-1]
            for prefix in ("MiniGrid-", "BabyAI-"):
                short = short.removeprefix(prefix)
            self.name = short.rsplit("-v", 1)[0]

    def make(self, n_envs: int = 1, seed: int = 0, **overrides: Any) -> VecEnv:
        """Build this env with :func:`~envs.factory.make_vec_env`.

        Args:
            n_envs: number of parallel envs.
            seed: the envs' seed (env i gets ``env_seeds(seed, n_envs)[i]``).
            **overrides: further make_vec_env options (e.g. clip_rewards=False
                for evaluation, frame_stack=1); they take precedence over ``options``.
        """
        return make_vec_env(self.env_id, n_envs, seed, **{**self.options, **overrides})


@dataclass
class Suite:
    """A generalisation benchmark: train envs and held-out envs.

    Attributes:
        name: registry name (see :data:`SUITES`).
        description: one line saying what is held out.
        train: envs the agent is trained on.
        heldout: envs it is evaluated on and never trained on.
        params: the builder parameters that produced it (``get_suite(name, **params)``
            rebuilds the same suite).
    """

    name: str
    description: str
    train: list[EnvSpec]
    heldout: list[EnvSpec]
    params: dict[str, Any] = field(default_factory=dict)

    def all_specs(self) -> list[EnvSpec]:
        """Train specs followed by held-out specs."""
        return [*self.train, *self.heldout]


def _ids(prefix: str, names: list[str]) -> list[EnvSpec]:
    return [EnvSpec(f"{prefix}{n}-v0") for n in names]


def doorkey() -> Suite:
    """Train on DoorKey 5x5; hold out the larger DoorKey rooms."""
    return Suite(
        "doorkey",
        "MiniGrid DoorKey: train 5x5, held out 6x6, 8x8, 16x16 (larger rooms, longer horizons)",
        _ids("MiniGrid-DoorKey-", ["5x5"]),
        _ids("MiniGrid-DoorKey-", ["6x6", "8x8", "16x16"]),
    )


def multiroom() -> Suite:
    """Train on MultiRoom N2-S4; hold out more and larger rooms."""
    return Suite(
        "multiroom",
        "MiniGrid MultiRoom: train 2 rooms of size <= 4, held out N4-S5 and N6 (more rooms)",
        _ids("MiniGrid-MultiRoom-", ["N2-S4"]),
        # N4-S5-v1, not -v0: MiniGrid keeps the legacy id MultiRoom-N4-S5-v0 configured for 6 rooms.
        [EnvSpec("MiniGrid-MultiRoom-N4-S5-v1"), EnvSpec("MiniGrid-MultiRoom-N6-v0")],
    )


def memory() -> Suite:
    """Train on MemoryS7; hold out longer hallways."""
    return Suite(
        "memory",
        "MiniGrid Memory: train S7, held out S9, S11, S13 (longer hallway to remember the cue over)",
        _ids("MiniGrid-Memory", ["S7"]),
        _ids("MiniGrid-Memory", ["S9", "S11", "S13"]),
    )


def distshift() -> Suite:
    """Train on DistShift1; hold out DistShift2 (the lava strip moves)."""
    return Suite(
        "distshift",
        "MiniGrid DistShift: train DistShift1, held out DistShift2 (shifted lava)",
        _ids("MiniGrid-", ["DistShift1"]),
        _ids("MiniGrid-", ["DistShift2"]),
    )


def lavacrossing() -> Suite:
    """Train on LavaCrossing S9N1; hold out more lava rivers and a larger grid."""
    return Suite(
        "lavacrossing",
        "MiniGrid LavaCrossing: train S9N1, held out S9N2, S9N3, S11N5 (more crossings, larger grid)",
        _ids("MiniGrid-LavaCrossing", ["S9N1"]),
        _ids("MiniGrid-LavaCrossing", ["S9N2", "S9N3", "S11N5"]),
    )


MAX_LEVEL_SEEDS = 1_000_000  # level seeds a `seeds` suite lists (training and held out together)
LEVEL_SEED_LIMIT = 2**32  # level seeds lie in [0, 2**32), numpy's seed range


def seeds(
    env_id: str = "MiniGrid-DoorKey-8x8-v0",
    train_start: int = 0,
    num_train: int = 1000,
    heldout_start: int = 10000,
    num_heldout: int = 200,
) -> Suite:
    """Same env id, disjoint level seeds for training and evaluation.

    Args:
        env_id: a procedurally generated env id (MiniGrid/BabyAI).
        train_start: first training level seed.
        num_train: number of training level seeds (train_start .. train_start + num_train - 1).
        heldout_start: first held-out level seed.
        num_heldout: number of held-out level seeds.
    """
    check_env_id(env_id)
    if num_train < 1 or num_heldout < 1 or train_start < 0 or heldout_start < 0:
        raise ValueError("seed ranges must be non-empty and start at a non-negative seed")
    if num_train + num_heldout > MAX_LEVEL_SEEDS:  # 10^8 seeds took minutes to list before any message
        raise ValueError(f"num_train + num_heldout must be at most {MAX_LEVEL_SEEDS:,}, "
                         f"got {num_train + num_heldout:,}")
    if max(train_start + num_train, heldout_start + num_heldout) > LEVEL_SEED_LIMIT:
        raise ValueError(f"level seeds must be below 2**32 = {LEVEL_SEED_LIMIT:,}: train_start + num_train and "
                         "heldout_start + num_heldout are past it")
    train_seeds = list(range(train_start, train_start + num_train))
    heldout_seeds = list(range(heldout_start, heldout_start + num_heldout))
    if max(train_start, heldout_start) < min(train_start + num_train, heldout_start + num_heldout):
        raise ValueError(
            f"training seeds [{train_start}, {train_start + num_train}) and held-out seeds "
            f"[{heldout_start}, {heldout_start + num_heldout}) overlap"
        )
    short = EnvSpec(env_id).name
    return Suite(
        "seeds",
        f"{env_id}: train on level seeds {train_start}..{train_start + num_train - 1}, "
        f"held out {heldout_start}..{heldout_start + num_heldout - 1}",
        [EnvSpec(env_id, {"level_seeds": train_seeds}, f"{short} train seeds")],
        [EnvSpec(env_id, {"level_seeds": heldout_seeds}, f"{short} held-out seeds")],
        params={
            "env_id": env_id,
            "train_start": train_start,
            "num_train": num_train,
            "heldout_start": heldout_start,
            "num_heldout": num_heldout,
        },
    )


@functools.cache
def _cached_modes(env_id: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    modes, difficulties = atari_modes(env_id)
    return tuple(modes), tuple(difficulties)


def atari_modes_suite(game: str = "Pong") -> Suite:
    """Train on a game's default mode/difficulty; hold out every other pair ALE offers.

    Args:
        game: the ALE game name as in its v5 id ("Pong" for "ALE/Pong-v5");
            a full "ALE/<Game>-v5" id is accepted too.
    """
    env_id = game if game.startswith("ALE/") else f"ALE/{game}-v5"
    check_env_id(env_id)
    if env_family(env_id) != "atari":
        raise ValueError(f"{env_id!r} is not an ALE id")
    short = env_id.split("/")[-1].rsplit("-v", 1)[0]
    modes, difficulties = _cached_modes(env_id)
    default = (modes[0], difficulties[0])
    heldout = [
        EnvSpec(env_id, {"env_kwargs": {"mode": m, "difficulty": d}}, f"{short} m{m} d{d}")
        for m in modes
        for d in difficulties
        if (m, d) != default
    ]
    return Suite(
        "atari-modes",
        f"{env_id}: train on the default mode {default[0]} / difficulty {default[1]}, "
        f"held out the other {len(heldout)} mode/difficulty pairs",
        [EnvSpec(env_id, {}, f"{short} m{default[0]} d{default[1]}")],
        heldout,
        params={"game": game},
    )


#: Suite builders by name; call ``get_suite(name, **params)`` rather than these directly.
SUITES: dict[str, Callable[..., Suite]] = {
    "doorkey": doorkey,
    "multiroom": multiroom,
    "memory": memory,
    "distshift": distshift,
    "lavacrossing": lavacrossing,
    "seeds": seeds,
    "atari-modes": atari_modes_suite,
}


def get_suite(name: str, **params: Any) -> Suite:
    """Build a held-out suite by name.

    Args:
        name: one of :data:`SUITES` ("doorkey", "multiroom", "memory",
            "distshift", "lavacrossing", "seeds", "atari-modes").
        **params: parameters of parametric suites, e.g.
            ``get_suite("seeds", env_id="MiniGrid-KeyCorridorS3R1-v0")`` or
            ``get_suite("atari-modes", game="Breakout")``.

    Raises:
        ValueError: unknown name (the message lists the names) or parameters
            the suite does not take.
    """
    if name not in SUITES:
        raise ValueError(f"Unknown suite {name!r}; available suites: {', '.join(SUITES)}")
    builder = SUITES[name]
    signature = inspect.signature(builder)
    try:
        signature.bind(**params)
    except TypeError as exc:
        accepted = ", ".join(signature.parameters) or "none"
        raise ValueError(f"Bad parameters {params} for suite {name!r} (accepted: {accepted}): {exc}") from None
    checked = {}
    for key, value in params.items():  # each parameter's type is its default's (a YAML value may be anything)
        default = signature.parameters[key].default
        if isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"suite {name!r}: parameter {key} must be a string, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy integers are fine
                raise ValueError(f"suite {name!r}: parameter {key} must be an integer, got {value!r}")
            value = int(value)
        checked[key] = value
    return builder(**checked)


def list_suites() -> list[Suite]:
    """Build every registered suite with its default parameters."""
    return [get_suite(name) for name in SUITES]
