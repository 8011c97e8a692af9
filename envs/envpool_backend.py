"""EnvPool backend (``env.backend: envpool``): an SB3 ``VecEnv`` over an envpool pool.

``make_vec_env(..., backend="envpool")`` builds :class:`EnvPoolVecEnv`, which gives the
rollout what the gymnasium backend's SB3 vec env gives it:

* the same observation and action spaces (taken from a one-env gymnasium-backend vec env
  built with the same options): MiniGrid/BabyAI (7, 7, 3) uint8 views (or the Dict with
  mission token ids), Atari (frame_stack, 84, 84) uint8 with SB3 ``VecFrameStack``'s
  stacking (zeros before an episode's first frame);
* SB3 auto-reset semantics: envpool resets an env one step after its episode ended (that
  step's action is ignored and the reset observation returned); here the step that ends an
  episode returns ``done=True``, ``info["terminal_observation"]`` (the last observation),
  ``info["TimeLimit.truncated"]`` (truncated and not terminated) and, as its next
  observation, the reset observation, obtained at once with a step of the finished envs
  only (envpool's own auto-reset, so a lost life with ``terminal_on_life_loss`` continues
  the game as SB3's ``EpisodicLifeEnv`` does);
* ``info["episode"] = {"r", "l", "t"}`` (plus ``"is_success"`` for MiniGrid) at the end of
  an episode, like SB3's ``Monitor``: the raw game score of a whole game for Atari (rewards
  are clipped to their sign only in what the rollout sees, when ``clip_rewards``).

Atari settings are passed explicitly, as the gymnasium backend uses them for
``ALE/<Game>-v5``: sticky actions with the id's ``repeat_action_probability`` (0.25;
envpool's default is 0), frame skip 4 (max over the last two frames), up to 30 no-op
starts, FIRE on reset for games that have it, no episode end on a lost life (unless
``terminal_on_life_loss``), the minimal action set, 84x84 grayscale with INTER_AREA
resizing, and raw rewards.

MiniGrid/BabyAI differ from upstream ``minigrid`` in one documented way: envpool generates
its levels with its own random number generator, so the same seed gives other levels than
``minigrid`` does (the dynamics and observations of a given level are the same; see
``tests/test_envpool.py``). Runs with the two backends are therefore not seed-for-seed
comparable on MiniGrid, and the backend stays ``gymnasium`` by default for every family.
Two smaller differences: envpool reports an episode that ends on its time-limit step as
truncated only; the adapter recovers the termination where the step's reward shows it (a
goal reached) but not a failure with reward 0 on that very step (lava, a wrong object), which
is then bootstrapped as a truncation, one step in such an episode. And an Atari episode's
length (and a ``max_episode_steps`` limit) counts the agent's steps only, where the gymnasium
backend's Monitor and time limit also count the FIRE steps of a reset (2 per game start, 3 per
lost life with ``terminal_on_life_loss``; see ``envs.atari.wrap_atari``).

``import envpool`` takes seconds, so it happens only in :func:`import_envpool`, when an
envpool env is built, and imports only the registrations of the families used here.
"""

from __future__ import annotations

import importlib
import sys
import time
import types
import warnings
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from .minigrid import tokenize_mission

__all__ = ["ENVPOOL_INSTALL_HINT", "EnvPoolVecEnv", "envpool_seeds", "envpool_task_id", "import_envpool"]

ENVPOOL_INSTALL_HINT = 'pip install -e ".[envpool]"'

# gymnasium ALE kwargs that mean the same in envpool's Atari config.
_ATARI_KWARGS = ("mode", "difficulty", "repeat_action_probability", "full_action_space")
_MINIGRID_WARNED = False
# envpool's registration modules for the families this backend runs (see import_envpool).
_REGISTRATIONS = ("envpool.minigrid.registration", "envpool.atari.registration")


def import_envpool() -> Any:
    """Import envpool with the MiniGrid/BabyAI and Atari registrations only, or raise ValueError naming the extra.

    ``import envpool`` imports ``envpool.entry``, which registers every family envpool has; Jumanji's
    registration alone imports matplotlib (of ~1.3 s in all on this project's machine; ~0.15 s for the
    two families this backend runs). So a placeholder stands in for ``envpool.entry`` while envpool is
    imported, the two registrations run, and the placeholder is removed: ``import envpool.entry``
    afterwards registers the other families as usual. Where envpool was imported already, it is used as
    it is; where its layout differs from 1.2.5's, the whole registry is imported.
    """
    loaded = sys.modules.get("envpool")
    if loaded is not None:
        return loaded
    placeholder = types.ModuleType("envpool.entry")
    sys.modules["envpool.entry"] = placeholder
    try:
        import envpool
    except ImportError as exc:
        raise ValueError(f"env.backend=envpool needs the envpool package, which is not installed here ({exc}): "
                         f"install it with `{ENVPOOL_INSTALL_HINT}`") from None
    finally:
        if sys.modules.get("envpool.entry") is placeholder:
            del sys.modules["envpool.entry"]
    try:
        for name in _REGISTRATIONS:
            importlib.import_module(name)
    except ImportError:
        try:
            importlib.import_module("envpool.entry")  # another layout: every registration, as `import envpool` does
        except ImportError as exc:  # a broken install (an asset package missing, a mismatched version)
            raise ValueError(f"env.backend=envpool: envpool {getattr(envpool, '__version__', '?')} is installed but "
                             f"its registry does not import ({exc}); reinstall it with "
                             f"`{ENVPOOL_INSTALL_HINT}`") from None
    return envpool


def envpool_task_id(env_id: str, family: str) -> str:
    """The envpool task id of a gymnasium id (``ALE/Pong-v5`` -> ``Pong-v5``; MiniGrid ids unchanged).

    Raises:
        ValueError: for ids the envpool backend cannot run (checked against envpool's registry
            when the id is built, see :class:`EnvPoolVecEnv`).
    """
    if family == "atari":
        spec = gym.spec(env_id)
        game = spec.kwargs.get("game")
        if not (env_id.startswith("ALE/") and env_id.endswith("-v5")) or not isinstance(game, str):
            raise ValueError(f"env.backend=envpool runs Atari ids of the form 'ALE/<Game>-v5' only, not {env_id!r}; "
                             "use env.backend=gymnasium")
        return "".join(part.capitalize() for part in game.split("_")) + "-v5"
    if family == "minigrid":
        return env_id
    raise ValueError(f"env.backend=envpool runs MiniGrid/BabyAI and Atari (ALE/<Game>-v5) ids only, not {env_id!r}; "
                     "use env.backend=gymnasium")


def envpool_seeds(seeds: Sequence[int]) -> list[int]:
    """envpool's per-env seeds (int32) from the run's 64-bit env seeds (``envs.env_seeds``): their low 31 bits."""
    return [int(s) & 0x7FFFFFFF for s in seeds]


class EnvPoolVecEnv(VecEnv):
    """An SB3 ``VecEnv`` over one synchronous envpool pool (see the module docstring).

    Build it with ``make_vec_env(env_id, n_envs, seed, backend="envpool", ...)``.

    Args:
        env_id: a gymnasium id (``MiniGrid-...``, ``BabyAI-...`` or ``ALE/<Game>-v5``).
        seeds: one seed per env (``envs.env_seeds``); envpool takes their low 31 bits.
        family: ``envs.env_family(env_id)``.
        observation_space, action_space: the gymnasium backend's spaces for these options.
        frame_stack: Atari: frames stacked (as SB3's ``VecFrameStack``).
        clip_rewards: Atari: rewards the rollout sees are clipped to {-1, 0, 1}.
        mission: MiniGrid: Dict observation with mission token ids.
        env_kwargs: Atari: ``mode``, ``difficulty``, ``repeat_action_probability``,
            ``full_action_space``; MiniGrid: none.
        max_episode_steps: truncate an episode after this many agent steps (on top of the env's own limit).
        terminal_on_life_loss: Atari: a lost life ends the learning episode (not the game).
    """

    render_mode: str | None = None  # read by VecEnv.__init__; envpool's pools here do not render

    def __init__(
        self,
        env_id: str,
        seeds: Sequence[int],
        *,
        family: str,
        observation_space: gym.Space,
        action_space: gym.Space,
        frame_stack: int = 4,
        clip_rewards: bool = True,
        mission: bool = False,
        env_kwargs: dict[str, Any] | None = None,
        max_episode_steps: int | None = None,
        terminal_on_life_loss: bool = False,
    ) -> None:
        self.env_id = env_id
        self.family = family
        self.task_id = envpool_task_id(env_id, family)
        self.frame_stack = frame_stack if family == "atari" else 1
        self.clip_rewards = clip_rewards and family == "atari"
        self.mission = mission
        self.max_episode_steps = max_episode_steps
        self.terminal_on_life_loss = terminal_on_life_loss
        self._make_kwargs = self._pool_kwargs(env_id, family, dict(env_kwargs or {}), terminal_on_life_loss)
        super().__init__(len(seeds), observation_space, action_space)
        self._seeds = [int(s) for s in seeds]
        self._pool: Any = None
        self._pool_seeds: list[int] | None = None
        self._build_pool()  # a bad id or option fails here, not at the first reset
        n = self.num_envs
        self._actions: np.ndarray | None = None
        self._ep_return = np.zeros(n, np.float64)
        self._ep_length = np.zeros(n, np.int64)
        self._ep_start = np.full(n, time.time())
        self._limit_steps = np.zeros(n, np.int64)  # agent steps of the current game, for max_episode_steps
        self._t_start = time.time()
        self._mission_bytes: np.ndarray | None = None
        self._mission_tokens: np.ndarray | None = None
        self._stack: np.ndarray | None = None

    # -- construction ------------------------------------------------------------------------
    @staticmethod
    def _pool_kwargs(env_id: str, family: str, env_kwargs: dict[str, Any], life_loss: bool) -> dict[str, Any]:
        if family == "minigrid":
            if env_kwargs:
                raise ValueError(f"env.backend=envpool takes no env_kwargs for MiniGrid/BabyAI ids (got {env_kwargs}): "
                                 "envpool's tasks are fixed by their id; use env.backend=gymnasium")
            return {}
        unknown = sorted(set(env_kwargs) - set(_ATARI_KWARGS))
        if unknown:
            raise ValueError(f"env.backend=envpool does not take env_kwargs {unknown} for Atari (it takes "
                             f"{list(_ATARI_KWARGS)}); use env.backend=gymnasium")
        spec_kwargs = gym.spec(env_id).kwargs
        options = {**spec_kwargs, **env_kwargs}
        kwargs: dict[str, Any] = {
            # Passed explicitly: envpool's defaults differ from ALE v5's (sticky actions 0.0 there).
            "repeat_action_probability": float(options.get("repeat_action_probability", 0.25)),
            "full_action_space": bool(options.get("full_action_space", False)),
            "frame_skip": 4,
            "noop_max": 30,
            "use_fire_reset": True,
            "episodic_life": bool(life_loss),
            "zero_discount_on_life_loss": False,
            "reward_clip": False,  # raw scores; the adapter clips what the rollout sees
            "stack_num": 1,  # the adapter stacks frames as SB3's VecFrameStack does (zeros at a reset)
            "img_height": 84,
            "img_width": 84,
            "gray_scale": True,
            "use_inter_area_resize": True,  # SB3's WarpFrame resizes with cv2.INTER_AREA
        }
        for key in ("mode", "difficulty"):
            if options.get(key) is not None:
                kwargs[key] = int(options[key])
        return kwargs

    def _build_pool(self) -> None:
        envpool = import_envpool()
        if self.task_id not in envpool.list_all_envs():
            raise ValueError(f"env.backend=envpool cannot run {self.env_id!r}: envpool {envpool.__version__} has no "
                             f"task {self.task_id!r}; use env.backend=gymnasium")
        seeds = envpool_seeds(self._seeds)
        pool = envpool.make_gymnasium(self.task_id, num_envs=self.num_envs, batch_size=self.num_envs,
                                      seed=seeds, **self._make_kwargs)
        if self.family == "atari":
            pool_n = int(pool.action_space.n)
            if pool_n != int(self.action_space.n):  # type: ignore[attr-defined]
                pool.close()
                raise ValueError(f"envpool's {self.task_id} has {pool_n} actions, the gymnasium backend's "
                                 f"{self.env_id} {self.action_space}; use env.backend=gymnasium")
        if self._pool is not None:
            self._pool.close()
        self._pool, self._pool_seeds = pool, list(self._seeds)

    # -- observations ------------------------------------------------------------------------
    def _frames(self, obs: Any, rows: np.ndarray | None = None) -> Any:
        """The unstacked per-env observation of envpool's ``obs`` (rows: the envs it holds)."""
        if self.family == "atari":
            return obs  # (k, 1, 84, 84)
        image = np.array(obs["image"], dtype=np.uint8, copy=True)
        if not self.mission:
            return image
        raw = np.asarray(obs["mission"], dtype=np.uint8)
        idx = np.arange(self.num_envs) if rows is None else rows
        assert self._mission_bytes is not None and self._mission_tokens is not None
        changed = np.flatnonzero((raw != self._mission_bytes[idx]).any(axis=1))
        for j in changed:  # missions change only at resets: tokenize those
            text = raw[j].tobytes().split(b"\0", 1)[0].decode("utf-8")
            self._mission_bytes[idx[j]] = raw[j]
            self._mission_tokens[idx[j]] = tokenize_mission(text)
        return {"image": image, "mission": self._mission_tokens[idx].copy()}

    def _push(self, frames: np.ndarray, rows: np.ndarray | None = None) -> None:
        assert self._stack is not None
        if rows is None:
            self._stack[:, :-1] = self._stack[:, 1:]
            self._stack[:, -1:] = frames
        else:
            self._stack[rows] = 0
            self._stack[rows, -1:] = frames

    def _observation(self, frames: Any) -> Any:
        if self.family == "atari":
            assert self._stack is not None
            return self._stack.copy()
        return frames

    @staticmethod
    def _ordered(info: dict[str, Any], expected: np.ndarray) -> np.ndarray | None:
        env_ids = np.asarray(info["env_id"])
        if np.array_equal(env_ids, expected):
            return None
        return np.argsort(env_ids)  # envpool returned the envs in another order

    # -- VecEnv API --------------------------------------------------------------------------
    def reset(self) -> Any:
        if self._pool_seeds != self._seeds:  # VecEnv.seed() gave new seeds: envpool seeds only at creation
            self._build_pool()
        obs, info = self._pool.reset()
        order = self._ordered(info, np.arange(self.num_envs))
        if order is not None:
            obs = _take(obs, order)
        n = self.num_envs
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        self._limit_steps[:] = 0
        self._ep_start[:] = time.time()
        if self.mission:
            width = np.asarray(obs["mission"]).shape[1]
            self._mission_bytes = np.full((n, width), 255, np.uint8)  # no mission matches: all tokenized
            self._mission_tokens = np.zeros((n, *self.observation_space["mission"].shape), np.int64)  # type: ignore[index]
        frames = self._frames(obs)
        if self.family == "atari":
            self._stack = np.zeros((n, self.frame_stack, *frames.shape[2:]), np.uint8)
            self._push(frames, np.arange(n))
        return self._observation(frames)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs).astype(np.int32)

    def step_wait(self) -> tuple[Any, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        assert self._actions is not None, "step_async must come before step_wait"
        n = self.num_envs
        all_ids = np.arange(n)
        obs, reward, terminated, truncated, info = self._pool.step(self._actions)
        order = self._ordered(info, all_ids)
        if order is not None:
            obs, reward, terminated, truncated = _take(obs, order), reward[order], terminated[order], truncated[order]
            info = {k: np.asarray(v)[order] for k, v in info.items() if k in ("terminated", "lives")}
        reward = np.asarray(reward, np.float64)
        terminated = np.asarray(terminated, bool)
        truncated = np.asarray(truncated, bool).copy()
        # envpool reports terminated = done & ~truncated: an episode that ends on its time-limit step
        # reads as truncated only, where gymnasium says terminated and truncated (SB3: terminal, no
        # bootstrap). Recovered where envpool leaves a trace: a MiniGrid/BabyAI reward is non-zero only on
        # a terminal step (goal reached, Dynamic-Obstacles' collision); Atari's info["terminated"] is game over.
        # Not recovered: a MiniGrid failure with reward 0 on the time-limit step (lava, a wrong object picked
        # or chosen) is bootstrapped as a truncation (the module docstring says so).
        if self.family == "minigrid":
            late = truncated & (reward != 0)
        else:
            late = truncated & (np.asarray(info["terminated"]) != 0)
        terminated |= late
        self._ep_return += reward
        self._ep_length += 1
        self._limit_steps += 1
        # The adapter's own step limit (gymnasium backend: a TimeLimit on top of the env's own limit).
        limited = np.zeros(n, bool)
        if self.max_episode_steps is not None:
            limited = (self._limit_steps >= self.max_episode_steps) & ~terminated & ~truncated
            truncated |= limited
        done = terminated | truncated
        # A whole game ended (with terminal_on_life_loss a lost life ends only the learning episode).
        if self.family == "atari" and self.terminal_on_life_loss:
            game_over = truncated | (terminated & (np.asarray(info["terminated"]) != 0))
        else:
            game_over = done
        frames = self._frames(obs)
        if self.family == "atari":
            self._push(frames)
        infos: list[dict[str, Any]] = [{"TimeLimit.truncated": bool(truncated[i] and not terminated[i])}
                                       for i in range(n)]
        if self.family == "minigrid":
            success = terminated & (reward > 0)
            for i in range(n):
                infos[i]["is_success"] = bool(success[i])
        done_ids = np.flatnonzero(done)
        if done_ids.size:
            now = time.time()
            last = self._stack if self.family == "atari" else frames
            for i in done_ids:
                infos[i]["terminal_observation"] = _row(last, i)
            for i in np.flatnonzero(game_over):
                episode = {"r": round(float(self._ep_return[i]), 6), "l": int(self._ep_length[i]),
                           "t": round(now - self._t_start, 6)}
                if self.family == "minigrid":
                    episode["is_success"] = infos[i]["is_success"]
                infos[i]["episode"] = episode
                self._ep_return[i] = 0.0
                self._ep_length[i] = 0
                self._limit_steps[i] = 0
            self._reset_envs(done_ids, limited, frames)
        if self.clip_rewards:
            reward = np.sign(reward)
        return self._observation(frames), reward.astype(np.float32), done, infos

    def _reset_envs(self, done_ids: np.ndarray, limited: np.ndarray, frames: Any) -> None:
        """Put the first observation of the finished envs' next episodes in ``frames`` (Atari: the frame stack)."""
        # Ended by envpool itself: its auto-reset (a step of those envs whose action is ignored) gives
        # the next observation, and with terminal_on_life_loss it continues the game after a lost life.
        # Ended by this adapter's step limit only: envpool does not know, so those envs are reset.
        for ids, forced in ((done_ids[~limited[done_ids]], False), (done_ids[limited[done_ids]], True)):
            if ids.size == 0:
                continue
            ids32 = ids.astype(np.int32)
            if forced:
                obs, info = self._pool.reset(ids32)
                self._limit_steps[ids] = 0
            else:
                obs, _reward, _terminated, _truncated, info = self._pool.step(np.zeros(ids.size, np.int32), ids32)
            got_ids = np.asarray(info["env_id"])
            if not np.array_equal(got_ids, ids):
                obs = _take(obs, _reorder(got_ids, ids))
            got = self._frames(obs, ids)
            if self.family == "atari":
                self._push(got, ids)
            elif isinstance(frames, dict):
                for key in frames:
                    frames[key][ids] = got[key]
            else:
                frames[ids] = got

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """New seeds (``seed + i``, SB3's rule) for the next reset, which rebuilds the envpool pool (also when
        the seeds are the ones the pool has: seeding twice with one seed gives the same levels twice)."""
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        self._seeds = [seed + i for i in range(self.num_envs)]
        self._pool_seeds = None  # the next reset rebuilds the pool
        return list(self._seeds)

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        raise AttributeError(f"EnvPoolVecEnv cannot set {attr_name!r} on its envs (they live in envpool)")

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any) -> list[Any]:
        raise AttributeError(f"EnvPoolVecEnv cannot call {method_name!r} on its envs (they live in envpool)")

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    @property
    def pool_config(self) -> dict[str, Any]:
        """The envpool pool's config (sticky actions, frame skip, ...), for checks and logs."""
        return dict(self._pool.config)


def _take(obs: Any, index: np.ndarray) -> Any:
    if isinstance(obs, dict):
        return {key: np.asarray(value)[index] for key, value in obs.items()}
    return np.asarray(obs)[index]


def _reorder(got_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    position = {int(e): j for j, e in enumerate(got_ids)}
    return np.array([position[int(e)] for e in wanted])


def _row(obs: Any, i: int) -> Any:
    if isinstance(obs, dict):
        return {key: value[i].copy() for key, value in obs.items()}
    return obs[i].copy()


def warn_minigrid_levels(env_id: str) -> None:
    """Warn once per process that envpool's MiniGrid levels differ from minigrid's for the same seeds."""
    global _MINIGRID_WARNED
    if not _MINIGRID_WARNED:
        _MINIGRID_WARNED = True
        warnings.warn(f"env.backend=envpool on {env_id}: envpool generates MiniGrid/BabyAI levels with its own "
                      "random number generator, so a seed gives other levels than with env.backend=gymnasium "
                      "(same dynamics and observations on a given level)", UserWarning, stacklevel=3)
