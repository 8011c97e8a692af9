"""Build Stable-Baselines3 vec envs for MiniGrid, BabyAI and ALE ids.

Every option of :func:`make_vec_env` is a plain type (str, int, bool, dict,
list), so a training config can store them and a checkpoint can rebuild the
same env later with ``make_vec_env(env_id, **options)``.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable, Sequence
import numbers
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import (
    DummyVecEnv,
    SubprocVecEnv,
    VecEnv,
    VecFrameStack,
    VecTransposeImage,
)

from .atari import atari_modes, wrap_atari
from .minigrid import wrap_minigrid
from .registry import EnvFamily, check_env_id, env_family
from .wrappers import LevelSeedWrapper

__all__ = ["BACKENDS", "VEC_ENV_TYPES", "EnvFamily", "InProcessVecEnv", "check_env_id", "env_family", "make_env",
           "make_vec_env"]

VEC_ENV_TYPES: tuple[str, ...] = ("dummy", "subproc")
#: Who steps the envs: gymnasium envs in an SB3 vec env, or an envpool pool (envs/envpool_backend.py).
BACKENDS: tuple[str, ...] = ("gymnasium", "envpool")


class InProcessVecEnv(DummyVecEnv):
    """SB3's DummyVecEnv (the envs stepped one after the other in this process), except that a step returns
    each env's info dict copied one level deep instead of ``copy.deepcopy`` of all of them: the deep copy
    took ~3% of a whole DoorKey PPO run. The copy keeps a returned info from changing under the caller
    even if an env reuses its dict; values inside are shared (an env's info values and terminal
    observations are new objects each step in gymnasium, MiniGrid, ALE and SB3's wrappers)."""

    def step_wait(self) -> tuple[Any, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Step every env with the actions given to ``step_async``; reset those whose episode ended."""
        for env_idx in range(self.num_envs):
            obs, self.buf_rews[env_idx], terminated, truncated, info = self.envs[env_idx].step(self.actions[env_idx])
            self.buf_infos[env_idx] = info
            self.buf_dones[env_idx] = terminated or truncated
            info["TimeLimit.truncated"] = truncated and not terminated  # SB3's VecEnv API
            if self.buf_dones[env_idx]:
                info["terminal_observation"] = obs
                obs, self.reset_infos[env_idx] = self.envs[env_idx].reset()
            self._save_obs(env_idx, obs)
        infos = [dict(info) for info in self.buf_infos]
        return self._obs_from_buf(), np.copy(self.buf_rews), np.copy(self.buf_dones), infos


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_options(
    env_id: str,
    n_envs: int,
    vec_env: str,
    frame_stack: int,
    mission: bool,
    env_kwargs: dict[str, Any] | None,
    level_seeds: list[int] | None,
    max_episode_steps: int | None,
    terminal_on_life_loss: bool = False,
) -> None:
    check_env_id(env_id)
    family = env_family(env_id)
    if not _is_int(n_envs) or n_envs < 1:
        raise ValueError(f"n_envs must be an integer >= 1, got {n_envs!r}")
    if not _is_int(frame_stack) or frame_stack < 1:
        raise ValueError(f"frame_stack must be an integer >= 1, got {frame_stack!r}")
    if vec_env not in VEC_ENV_TYPES:
        raise ValueError(f"vec_env must be one of {list(VEC_ENV_TYPES)}, got {vec_env!r}")
    if mission and family != "minigrid":
        raise ValueError(f"mission=True only applies to MiniGrid/BabyAI ids, not {env_id!r}")
    if env_kwargs is not None and not isinstance(env_kwargs, dict):
        raise ValueError(f"env_kwargs must be a dict or None, got {type(env_kwargs).__name__}")
    if terminal_on_life_loss and family != "atari":
        raise ValueError(f"terminal_on_life_loss=True only applies to Atari ids, not {env_id!r}")
    if family == "atari" and env_kwargs:
        _check_atari_kwargs(env_kwargs)
    if level_seeds is not None:
        if len(level_seeds) == 0:
            raise ValueError("level_seeds must be a non-empty list of ints (or None)")
        if not all(_is_int(s) and 0 <= s < 2**63 for s in level_seeds):
            raise ValueError("level_seeds must contain non-negative ints below 2**63")
    if max_episode_steps is not None and (not _is_int(max_episode_steps) or max_episode_steps < 1):
        raise ValueError(f"max_episode_steps must be an integer >= 1 or None, got {max_episode_steps!r}")


def _check_atari_kwargs(env_kwargs: dict[str, Any]) -> None:
    """Refuse the ALE options the preprocessing cannot take, or ALE would take silently or with a C++ dump."""
    if "frameskip" in env_kwargs:
        raise ValueError(
            "env_kwargs must not set 'frameskip' for Atari: the env is created with frameskip=1 and "
            "SB3's MaxAndSkipEnv skips 4 frames (a total frame skip of 4)."
        )
    if env_kwargs.get("obs_type", "rgb") != "rgb":
        raise ValueError(f"env_kwargs must not set obs_type={env_kwargs['obs_type']!r} for Atari: the preprocessing "
                         "makes 84x84 grayscale frames from ALE's 'rgb' screens")
    if "repeat_action_probability" in env_kwargs:
        p = env_kwargs["repeat_action_probability"]
        if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            raise ValueError(f"env_kwargs repeat_action_probability must be a number in [0, 1] (ALE v5: 0.25), "
                             f"got {p!r}")


def _make_atari(env_id: str, kwargs: dict[str, Any]) -> gym.Env:
    """``gym.make`` of an ALE id, with ALE's refusal of a game mode or difficulty as a ValueError naming the choices."""
    try:
        return gym.make(env_id, **kwargs)
    except RuntimeError as exc:
        if "mode" not in kwargs and "difficulty" not in kwargs:
            raise
        modes, difficulties = atari_modes(env_id)
        raise ValueError(f"{env_id} rejected mode={kwargs.get('mode')!r}, difficulty={kwargs.get('difficulty')!r} "
                         f"({exc}): its modes are {modes}, its difficulties {difficulties}") from None


def make_env(
    env_id: str,
    seed: int | None = None,
    *,
    clip_rewards: bool = True,
    mission: bool = False,
    env_kwargs: dict[str, Any] | None = None,
    level_seeds: list[int] | None = None,
    render_mode: str | None = None,
    max_episode_steps: int | None = None,
    terminal_on_life_loss: bool = False,
) -> gym.Env:
    """Build one env with all the per-env wrappers (Monitor included).

    Frame stacking and the channel-first transpose of Atari frames are vec-env
    wrappers and are added by :func:`make_vec_env` only. The env is not reset
    here; seed it with its first ``reset(seed=...)`` (the vec env does so).

    Args:
        env_id: a registered gymnasium id (MiniGrid, BabyAI, ALE or other).
        seed: seeds the action space and the level-seed picker; None for random.
        clip_rewards: Atari only: clip rewards to {-1, 0, 1} above the Monitor.
        mission: MiniGrid/BabyAI only: Dict observation with mission token ids.
        env_kwargs: keyword arguments for ``gym.make`` (e.g. {"size": 8}, or
            {"mode": 1, "difficulty": 1} for ALE).
        level_seeds: every reset draws its level seed from this list.
        render_mode: passed to ``gym.make`` ("rgb_array", "human" or None).
        max_episode_steps: truncate episodes after this many agent steps (on MiniGrid and Atari a shorter
            limit only: MiniGrid's own ``max_steps``, an ``env_kwargs`` key, and ALE's frame limit still apply;
            for other ids it replaces the registered ``TimeLimit``).
        terminal_on_life_loss: Atari only: a lost life ends the learning episode.

    Raises:
        ValueError: as :func:`make_vec_env`.
    """
    _check_options(env_id, 1, "dummy", 1, mission, env_kwargs, level_seeds, max_episode_steps, terminal_on_life_loss)
    family = env_family(env_id)
    kwargs: dict[str, Any] = dict(env_kwargs or {})
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    if family == "atari":
        kwargs["frameskip"] = 1
        env = _make_atari(env_id, kwargs)
    else:
        env = gym.make(env_id, max_episode_steps=max_episode_steps, **kwargs)
    if seed is not None:
        env.action_space.seed(seed)
    if level_seeds is not None:
        env = LevelSeedWrapper(env, level_seeds, seed=seed)
    if family == "minigrid":
        return wrap_minigrid(env, mission=mission)
    if family == "atari":
        return wrap_atari(
            env,
            clip_rewards=clip_rewards,
            terminal_on_life_loss=terminal_on_life_loss,
            max_episode_steps=max_episode_steps,
        )
    return Monitor(env)


def _ignoring_stop_signals(make: Callable[[], gym.Env]) -> gym.Env:
    """Build an env in a subprocess worker that ignores SIGINT and SIGTERM: the parent handles them (it finishes
    its update and checkpoints, then closes the workers); a worker whose parent died ends at its pipe's EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return make()


def env_seeds(seed: int | Sequence[int], n_envs: int) -> list[int]:
    """The seeds of ``n_envs`` envs of a run with seed ``seed``: one independent stream per env.

    Each env's seed comes from its own child of ``numpy.random.SeedSequence(seed)``
    (64 bits), so runs with nearby seeds share no env: with ``seed + i`` (SB3's rule) runs
    with seeds 1 and 2 shared all but one of their envs' level streams.

    Args:
        seed: the run's seed (a non-negative int), or a sequence of them (``[seed, frames]``
            gives a run a fresh set of streams later on).
        n_envs: how many env seeds to draw.
    """
    children = np.random.SeedSequence(seed).spawn(n_envs)
    return [int(child.generate_state(1, dtype=np.uint64)[0]) for child in children]


def make_vec_env(
    env_id: str,
    n_envs: int = 1,
    seed: int | Sequence[int] = 0,
    *,
    vec_env: str = "dummy",
    frame_stack: int = 4,
    clip_rewards: bool = True,
    mission: bool = False,
    env_kwargs: dict[str, Any] | None = None,
    level_seeds: list[int] | None = None,
    render_mode: str | None = None,
    max_episode_steps: int | None = None,
    terminal_on_life_loss: bool = False,
    backend: str = "gymnasium",
) -> VecEnv:
    """Build a Stable-Baselines3 vec env of ``n_envs`` copies of ``env_id``.

    Observations:
      * MiniGrid/BabyAI: (n_envs, 7, 7, 3) uint8 symbolic view (object,
        colour, state indices); with ``mission=True`` a Dict
        {"image": (n_envs, 7, 7, 3) uint8, "mission": (n_envs, L) int64 token ids}.
      * Atari: (n_envs, frame_stack, 84, 84) uint8 grayscale, channel first.
      * other ids: the env's own observations.

    Every env is wrapped in SB3's Monitor, so at the end of an episode
    ``info["episode"]`` holds the return "r" (raw game score for Atari), the
    length "l", the time "t" and, for MiniGrid/BabyAI, "is_success".

    Args:
        env_id: a registered gymnasium id (see :func:`check_env_id`).
        n_envs: number of parallel envs (>= 1).
        seed: env i is seeded with ``env_seeds(seed, n_envs)[i]`` at the first reset
            (env, action space and level-seed picker): reproducible, and no two seeds
            share an env stream.
        vec_env: "dummy" (DummyVecEnv, in process) or "subproc" (SubprocVecEnv).
        frame_stack: Atari only: number of stacked frames (1 makes memory
            necessary, 4 is the usual protocol); ignored by other families.
        clip_rewards: Atari only: clip training rewards to {-1, 0, 1}; use
            False for evaluation. The Monitor's return is raw either way.
        mission: MiniGrid/BabyAI only: add the mission as token ids (Dict obs).
        env_kwargs: keyword arguments for ``gym.make``, e.g. {"size": 8} or, for
            ALE, {"mode": 1, "difficulty": 1} ("frameskip" is refused for ALE).
        level_seeds: when given, every reset of every env draws its level seed
            from this list (train and held-out levels can be disjoint ranges).
        render_mode: passed to ``gym.make`` ("rgb_array", "human" or None).
        max_episode_steps: truncate episodes after this many agent steps
            (None: the env's own limit).
        terminal_on_life_loss: Atari only: a lost life ends the learning
            episode (SB3's EpisodicLifeEnv). Off by default (ALE v5 protocol).
        backend: "gymnasium" (the wrappers above in an SB3 vec env) or "envpool"
            (``envs.envpool_backend.EnvPoolVecEnv``: same spaces, episode boundaries and
            infos, stepped by envpool; MiniGrid/BabyAI and ALE/<Game>-v5 ids only; needs
            ``pip install -e ".[envpool]"``; ``vec_env``, ``level_seeds`` and
            ``render_mode`` do not apply).

    Raises:
        ValueError: unknown env id (with close matches), missing Atari ROM,
            n_envs < 1, frame_stack < 1, unknown vec_env, or an option that
            does not apply to the env's family.
    """
    _check_options(env_id, n_envs, vec_env, frame_stack, mission, env_kwargs, level_seeds, max_episode_steps,
                   terminal_on_life_loss)
    family = env_family(env_id)
    seeds = env_seeds(seed, n_envs)
    if backend != "gymnasium":
        return _make_envpool_vec_env(env_id, seeds, family, backend, vec_env=vec_env, frame_stack=frame_stack,
                                     clip_rewards=clip_rewards, mission=mission, env_kwargs=env_kwargs,
                                     level_seeds=level_seeds, render_mode=render_mode,
                                     max_episode_steps=max_episode_steps, terminal_on_life_loss=terminal_on_life_loss)
    env_fns = [
        functools.partial(
            make_env,
            env_id,
            seeds[i],
            clip_rewards=clip_rewards,
            mission=mission,
            env_kwargs=dict(env_kwargs) if env_kwargs else None,
            level_seeds=[int(s) for s in level_seeds] if level_seeds is not None else None,
            render_mode=render_mode,
            max_episode_steps=max_episode_steps,
            terminal_on_life_loss=terminal_on_life_loss,
        )
        for i in range(n_envs)
    ]
    if vec_env == "subproc":
        # Ctrl-C, and a scheduler's SIGTERM, reach the whole process group: workers ignore them, so the
        # trainer can finish its update and checkpoint instead of finding its envs dead.
        env_fns = [functools.partial(_ignoring_stop_signals, fn) for fn in env_fns]
    venv: VecEnv = SubprocVecEnv(env_fns) if vec_env == "subproc" else InProcessVecEnv(env_fns)
    # Env i gets seeds[i] at its next (first) reset; VecEnv.seed would give it seed + i.
    venv._seeds = list(seeds)
    if family == "atari":
        if frame_stack > 1:
            venv = VecFrameStack(venv, n_stack=frame_stack)
        venv = VecTransposeImage(venv)
    return venv


def _make_envpool_vec_env(env_id: str, seeds: list[int], family: str, backend: str, *, vec_env: str,
                          level_seeds: list[int] | None, render_mode: str | None, **options: Any) -> VecEnv:
    """``make_vec_env(..., backend="envpool")``: check what envpool cannot do, then build the adapter."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    from . import envpool_backend  # no envpool import yet: that happens when the pool is built

    envpool_backend.envpool_task_id(env_id, family)  # MiniGrid/BabyAI and ALE/<Game>-v5 only
    refused = [(vec_env != "dummy", f"vec_env={vec_env!r} (envpool steps its envs in its own threads: "
                                    "leave vec_env at 'dummy')"),
               (level_seeds is not None, "level_seeds (envpool seeds each env once, when it is built)"),
               (render_mode is not None, f"render_mode={render_mode!r}")]
    for bad, what in refused:
        if bad:
            raise ValueError(f"backend=envpool does not support {what}; use backend=gymnasium")
    envpool_backend.import_envpool()  # the install hint before any env is built
    # The spaces (and the check that the options suit the id) come from the gymnasium backend itself.
    reference = make_vec_env(env_id, 1, 0, **options)
    try:
        observation_space, action_space = reference.observation_space, reference.action_space
    finally:
        reference.close()
    if family == "minigrid":
        envpool_backend.warn_minigrid_levels(env_id)
    return envpool_backend.EnvPoolVecEnv(env_id, seeds, family=family, observation_space=observation_space,
                                         action_space=action_space, **options)


def env_spaces(env_id: str, options: dict[str, Any], reset: bool = False) -> tuple[gym.Space, gym.Space]:
    """The observation and action spaces of ``make_vec_env(env_id, **options)``'s envs.

    Read from one in-process gymnasium env: subprocess workers would cost a process for nothing, and
    the envpool backend reports the gymnasium backend's spaces (so envpool need not be installed).
    Raises what ``make_vec_env`` raises for options the env refuses, and with ``reset`` what its first
    reset raises (some ``env_kwargs``, a MiniGrid size too small for its objects, fail only there).
    """
    venv = make_vec_env(env_id, 1, 0, **{**options, "vec_env": "dummy", "backend": "gymnasium"})
    try:
        if reset:
            venv.reset()
        return venv.observation_space, venv.action_space
    finally:
        venv.close()
