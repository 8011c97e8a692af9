"""Evaluating a trained policy: episodes in a vector env, raw scores, success rates, videos and traces.

Read :func:`evaluate_policy` for the loop: every episode has its own seeds
(:func:`episode_seeds` for the env's reset, :func:`step_uniforms` for its sampled
actions), and the episodes run side by side in one in-process vector env whose
sub-envs take the next unstarted episode as they finish one, so the results do not
depend on how many run at once. The rest decides *where* to evaluate (a suite's train
and held-out envs, given ids, or the policy's own training env) and with which env
options, checks that the env's spaces fit the policy before any episode runs, and
builds the env a notebook runs a policy in (:func:`make_policy_env`).
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from tqdm import tqdm

from agents.config import SAME_ENV_OPTIONS, env_options
from agents.meta_config import task_specs
from envs import check_env_id, get_suite, make_vec_env
from envs.names import short_env_name
from policies.cores import frozen_parameters
from policies.policy import Policy

__all__ = [
    "CARRIED_OPTIONS",
    "DEFAULT_N_ENVS",
    "SPLIT_WORDS",
    "EvalTarget",
    "EvaluationError",
    "bootstrap_ci",
    "check_spaces",
    "episode_seeds",
    "evaluate_policy",
    "evaluation_options",
    "make_policy_env",
    "resolve_targets",
    "save_video",
    "short_env_name",
    "step_uniforms",
    "summarize",
    "wilson_interval",
]

# make_vec_env options that define the observation/action interface the policy was trained with:
# they go with the policy to any env it is evaluated on.
CARRIED_OPTIONS: tuple[str, ...] = ("vec_env", "frame_stack", "mission", "terminal_on_life_loss")
# SAME_ENV_OPTIONS (agents.config): they apply only when evaluating on the training env id, outside a suite.

# Frames larger than this (pixels per side) are subsampled in videos: a 16x16 MiniGrid renders at
# 512x512 and thousands of such frames would not fit in memory.
MAX_VIDEO_SIDE = 256

# Parallel envs by default. The policy's forward pass costs nearly the same for 10 or 100 envs on a
# CPU, so more envs amortise it until the env steps dominate. Measured on the project's 2-core
# machine (RIMs 6x32 on DoorKey-16x16, one torch thread), microseconds per episode step: 226 with
# 10 envs, 153 with 25, 122 with 50, 100 with 100, 94 with 200; 100 keeps Atari's memory modest.
DEFAULT_N_ENVS = 100


# How a suite's splits read in tables and figures.
SPLIT_WORDS: dict[str, str] = {"train": "suite train env", "held-out": "held-out"}


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked (unknown env or suite, spaces that do not fit, ...)."""


@dataclass
class EvalTarget:
    """One env to evaluate on.

    :param env_id: gymnasium id.
    :param options: ``make_vec_env`` options that define this env (a suite entry's ``env_kwargs``,
        ``level_seeds``...); they override the policy's training options.
    :param name: short display name (e.g. ``"DoorKey-6x6"``).
    :param split: ``"train"``, ``"held-out"``, or ``""`` when the env is not part of a suite.
    """

    env_id: str
    options: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    split: str = ""

    @property
    def label(self) -> str:
        """Display name with the split in words, e.g. ``"DoorKey-6x6 (held-out)"``.

        A suite's ``"train"`` split reads "suite train env": it is the env the suite trains
        on, not necessarily the one a given checkpoint was trained on (see :meth:`is_training_env`).
        """
        return f"{self.name} ({SPLIT_WORDS.get(self.split, self.split)})" if self.split else self.name

    def is_training_env(self, policy: Policy) -> bool:
        """Whether this is an env ``policy`` was trained on: its env, or one of a multi-task run's tasks (the
        same id, and no option of its own that the training env did not have)."""
        return _training_task(policy, self) is not None


@dataclass
class TrainingTask:
    """An env a policy was trained on: ``options`` all its ``make_vec_env`` options in training (the env
    section's with the task's own on top), ``own`` the task's own (none for a plain run)."""

    env_id: str
    options: dict[str, Any]
    own: dict[str, Any]
    name: str


def training_tasks(policy: Policy) -> list[TrainingTask]:
    """The envs ``policy`` was trained on: its env, or, for a meta_ppo or multitask_ppo run, each of its
    tasks (``meta.tasks`` or ``meta.suite``'s training list), with the options each was trained with (a
    checkpoint records only the task it ended on; the others' come from its config, as training built them)."""
    config = policy.config if isinstance(policy.config, dict) else {}
    meta, env = config.get("meta"), config.get("env")
    try:
        specs = task_specs(meta) if isinstance(meta, dict) and isinstance(env, dict) else []
    except (ValueError, TypeError, KeyError, AttributeError):  # a suite this version lacks, a damaged section
        specs = []
    if not specs:
        return [TrainingTask(policy.env_id, dict(policy.env_options), {}, short_env_name(policy.env_id))]
    base = env_options(env)
    return [TrainingTask(spec.env_id, {**base, **spec.options}, dict(spec.options), spec.name) for spec in specs]


def _training_task(policy: Policy, target: EvalTarget) -> TrainingTask | None:
    """The training task ``target`` is: same env id, and every option of the target's own as in training (a task
    whose own options are exactly the target's first: one env id can be two tasks, with and without options).
    A suite's row of the training id counts though it runs without the training's step limit, levels or
    env_kwargs (:func:`target_options`): its layouts were trained on, so it is not held out."""
    missing = object()
    tasks = [task for task in training_tasks(policy) if task.env_id == target.env_id]
    exact = [task for task in tasks if task.own == target.options]
    within = [task for task in tasks if all(task.options.get(k, missing) == v for k, v in target.options.items())]
    return (exact or within or [None])[0]


def resolve_targets(
    suite: str | None = None,
    env_ids: list[str] | None = None,
    suite_params: dict[str, Any] | None = None,
) -> list[EvalTarget] | None:
    """Turn ``--suite`` / ``--env`` into the envs to evaluate on.

    :param suite: a suite name (``envs.list_suites``): its train envs then its held-out envs.
    :param env_ids: gymnasium ids, evaluated in order (repeats are dropped).
    :param suite_params: parameters of a parametric suite (e.g. ``{"game": "Breakout"}``).
    :return: the targets, or None when neither is given (each policy's own training env).
    :raises EvaluationError: unknown suite or env id (with the known names / close matches).
    """
    targets: list[EvalTarget] = []
    if suite is not None:
        try:
            built = get_suite(suite, **(suite_params or {}))
        except ValueError as exc:
            raise EvaluationError(str(exc)) from None
        targets += [EvalTarget(s.env_id, dict(s.options), s.name, "train") for s in built.train]
        targets += [EvalTarget(s.env_id, dict(s.options), s.name, "held-out") for s in built.heldout]
    for env_id in dict.fromkeys(env_ids or []):
        try:
            check_env_id(env_id)
        except ValueError as exc:
            raise EvaluationError(str(exc)) from None
        targets.append(EvalTarget(env_id, {}, short_env_name(env_id)))
    return targets or None


def own_targets(policy: Policy) -> list[EvalTarget]:
    """The envs the policy was trained on (:func:`training_tasks`), not part of a suite; evaluated with the
    options each was trained with (:func:`evaluation_options`)."""
    return [EvalTarget(task.env_id, dict(task.own), task.name, "") for task in training_tasks(policy)]


def evaluation_options(policy: Policy, target: EvalTarget, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``make_vec_env`` options for evaluating ``policy`` on ``target``.

    Preprocessing options (frame stack, mission tokens, ...) always come from the policy's
    training options; options describing the training env itself (``env_kwargs``,
    ``level_seeds``, ``max_episode_steps``) only when the target is the same env id and not a
    suite's env, since a 5x5 step limit or a list of training levels means nothing for another
    env, and a suite's envs are what the suite defines whatever a checkpoint trained on (so every
    checkpoint meets the same envs, and a suite's rows differ only as the suite says). Then the
    target's own options, raw rewards (``clip_rewards=False``) and ``overrides`` on top.

    :param policy: the policy to evaluate.
    :param target: the env to evaluate it on.
    :param overrides: options that win over everything (e.g. ``{"max_episode_steps": 50}``).
    """
    # A multi-task run's training envs each with their own training options; any other env with the options of
    # the env the checkpoint ended on (the interface options, frame stack and the like, are the same for all).
    task = _training_task(policy, target)
    train_id, train_options = (task.env_id, task.options) if task else (policy.env_id, policy.env_options)
    return {**target_options(train_id, train_options, target), "clip_rewards": False, **(overrides or {})}


def target_options(train_env_id: str, train_options: dict[str, Any], target: EvalTarget) -> dict[str, Any]:
    """The options of ``target`` for a policy trained on ``train_env_id`` with ``train_options``: those
    that define its interface (always) and its training env (same id, outside a suite, only), then the
    target's own."""
    same_env = target.env_id == train_env_id and not target.split
    carried = CARRIED_OPTIONS + (SAME_ENV_OPTIONS if same_env else ())
    return {**{key: value for key, value in train_options.items() if key in carried}, **target.options}


def _spaces_error(policy: Policy, env_id: str, venv: VecEnv) -> str | None:
    problems = []
    if venv.observation_space != policy.observation_space:
        problems.append(f"observation space {venv.observation_space} (the policy expects {policy.observation_space})")
    if venv.action_space != policy.action_space:
        problems.append(f"action space {venv.action_space} (the policy expects {policy.action_space})")
    if not problems:
        return None
    where = f" from {policy.path}" if policy.path is not None else ""
    return (f"env {env_id!r} does not fit the policy{where}, trained on {policy.env_id!r}: "
            f"it has {' and '.join(problems)}")


def check_spaces(policy: Policy, env_id: str, options: dict[str, Any]) -> None:
    """Build one copy of the env and check its spaces equal the policy's, without running it.

    :param policy: the policy to evaluate.
    :param env_id: the env id.
    :param options: its ``make_vec_env`` options (``evaluation_options``).
    :raises EvaluationError: naming both spaces when they differ, or when the env cannot be built.
    """
    venv = _make_venv(env_id, 1, 0, {**options, "vec_env": "dummy"})  # no subprocess just to read spaces
    try:
        message = _spaces_error(policy, env_id, venv)
    finally:
        venv.close()
    if message is not None:
        raise EvaluationError(message)


def _make_venv(env_id: str, n_envs: int, seed: int, options: dict[str, Any]) -> VecEnv:
    try:
        return make_vec_env(env_id, n_envs, seed, **options)
    except (ValueError, TypeError) as exc:  # TypeError: an env_kwargs key the env does not take
        raise EvaluationError(f"cannot build env {env_id!r} with options {options}: {exc}") from None


def make_policy_env(
    policy: Policy, n_envs: int = 1, seed: int = 10_000, env_id: str | None = None, **overrides: Any
) -> VecEnv:
    """Build a vector env with the wrappers ``policy`` was trained with, raw (unclipped) rewards.

    The agents-level home of what the notebook API needs (``policies`` imports no ``envs``)::

        policy = load_policy("runs/doorkey-5x5-rims-ppo/checkpoint.pt")
        venv = make_policy_env(policy, n_envs=1)

    :param policy: the policy (``policies.load_policy``).
    :param n_envs: number of parallel envs.
    :param seed: env i is seeded with ``envs.env_seeds(seed, n_envs)[i]`` at its first reset (a training
        run of seed s starts its envs on the same seeds: the default, evaluate.py's, is no training seed).
    :param env_id: another env to build with the same preprocessing (default: the training env,
        with all its training options; another id gets only the preprocessing, see
        :func:`evaluation_options`).
    :param overrides: ``envs.make_vec_env`` options replacing those (e.g. ``render_mode="rgb_array"``,
        ``max_episode_steps=100``).
    :return: a Stable-Baselines3 ``VecEnv``.
    :raises EvaluationError: when the env cannot be built with these options.
    """
    target_id = env_id if env_id is not None else policy.env_id
    options = evaluation_options(policy, EvalTarget(target_id), overrides)
    return _make_venv(target_id, n_envs, seed, options)


# -- per-episode seeding ----------------------------------------------------------------------

# SplitMix64's constants (Steele et al. 2014): a counter-based generator, so the random number of
# (episode, step) is a pure function of the two, computed for a whole batch at once.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def episode_seeds(seed: int, episodes: int) -> tuple[np.ndarray, np.ndarray]:
    """The env seed and the action-sampling key of each evaluation episode.

    Episode i takes child i of ``numpy.random.SeedSequence(seed)``: its first 64-bit word seeds
    the env's reset (the same number ``envs.env_seeds(seed, n)[i]`` gives), its second keys the
    episode's action samples. Child i does not depend on how many children are drawn, so episode
    i is the same episode in a run of 10 episodes or of 100, in one env or in many.

    :param seed: the evaluation seed (>= 0).
    :param episodes: how many episodes.
    :return: ``(env_seeds, action_keys)``, two ``uint64`` arrays of length ``episodes``.
    """
    words = np.array([child.generate_state(2, dtype=np.uint64)
                      for child in np.random.SeedSequence(seed).spawn(episodes)], dtype=np.uint64)
    words = words.reshape(episodes, 2)
    return words[:, 0].copy(), words[:, 1].copy()


def step_uniforms(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Uniform numbers in (0, 1), one per (key, counter) pair, from SplitMix64 (elementwise).

    :param keys: ``uint64`` stream keys (e.g. an episode's action key per env).
    :param counters: non-negative ints broadcastable with ``keys`` (e.g. the step in the episode).
    :return: float64 array of the broadcast shape, strictly between 0 and 1.
    """
    # uint64 arrays wrap on overflow without warnings, which is the arithmetic SplitMix64 wants.
    z = np.asarray(keys, dtype=np.uint64) + (np.asarray(counters).astype(np.uint64) + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53


class _Schedule:
    """Which episode each sub-env runs, the finished episodes, and what is recorded of the drawn one.

    Shared by the sub-envs' :class:`_EpisodeSlot` wrappers (which take episodes from it as they
    reset) and the evaluation loop (which reads ``slot_episode`` as one array).
    """

    def __init__(self, env_seeds: np.ndarray, n_slots: int, watched: int | None, record_frames: bool,
                 max_frames: int | None) -> None:
        self.env_seeds = env_seeds
        self.next_episode = 0
        self.slot_episode = np.full(n_slots, -1, dtype=np.int64)  # -1: idle, every episode handed out
        self.results: list[dict[str, Any] | None] = [None] * len(env_seeds)
        self.finished = 0
        self.watched = watched  # the episode whose frames and behaviour events are kept
        self.record_frames = record_frames
        self.max_frames = max_frames
        self.frames: list[np.ndarray] = []
        self.frames_seen = 0  # frames of the drawn episode, kept or not (more than kept: the video is cut)
        self.events: list[tuple[int, str]] = []

    def take(self, slot: int) -> int | None:
        """The next episode for ``slot``, or None when all are handed out (the slot idles)."""
        if self.next_episode >= len(self.env_seeds):
            self.slot_episode[slot] = -1
            return None
        episode = self.next_episode
        self.next_episode += 1
        self.slot_episode[slot] = episode
        return episode

    def add_frame(self, render: Callable[[], np.ndarray]) -> None:
        """Count a frame of the drawn episode; draw and keep it while under ``max_frames``."""
        self.frames_seen += 1
        if self.max_frames is None or len(self.frames) < self.max_frames:
            self.frames.append(render())  # drawn only when kept: drawing is most of a video's cost


def _minigrid(env: gym.Env) -> Any | None:
    """The MiniGrid env under the wrappers, or None for other families."""
    base = env.unwrapped
    return base if hasattr(base, "grid") and hasattr(base, "carrying") and hasattr(base, "get_frame") else None


def _minigrid_state(base: Any) -> tuple[str | None, frozenset[int]]:
    """What the agent carries (object type) and which doors are open (grid cell indices)."""
    carrying = base.carrying.type if base.carrying is not None else None
    doors = frozenset(i for i, cell in enumerate(base.grid.grid)
                      if cell is not None and cell.type == "door" and cell.is_open)
    return carrying, doors


def _minigrid_events(base: Any, before: tuple[str | None, frozenset[int]],
                     after: tuple[str | None, frozenset[int]], terminated: bool) -> list[str]:
    """Behaviour events of one MiniGrid step, in words ("picks up key", "opens door", "reaches goal")."""
    events = []
    if after[0] != before[0]:
        if before[0] is not None:
            events.append(f"drops {before[0]}")
        if after[0] is not None:
            events.append(f"picks up {after[0]}")
    if after[1] - before[1]:
        events.append("opens door")
    if before[1] - after[1]:
        events.append("closes door")
    if terminated:
        cell = base.grid.get(*base.agent_pos)
        if cell is not None and cell.type == "goal":
            events.append("reaches goal")
        elif cell is not None and cell.type == "lava":
            events.append("steps into lava")
    return events


def _step_limit(env: gym.Env) -> int | None:
    """The most agent steps an episode of ``env`` can last (a TimeLimit or MiniGrid's own), if known."""
    limits = []
    layer: Any = env
    while isinstance(layer, gym.Wrapper):
        if isinstance(getattr(layer, "_max_episode_steps", None), int):
            limits.append(layer._max_episode_steps)
        layer = layer.env
    if isinstance(getattr(env.unwrapped, "max_steps", None), int):
        limits.append(env.unwrapped.max_steps)
    return min(limits) if limits else None


class _EpisodeSlot(gym.Wrapper):
    """Outermost wrapper of one sub-env: each real episode starts from its own episode seed.

    At every reset that starts a new episode (the first one, and each after the Monitor reported
    a finished episode), the wrapper takes the next episode index from the shared schedule and
    resets the env with that episode's seed, so an episode plays out the same whichever sub-env
    runs it. A reset after a lost life (``terminal_on_life_loss``) continues the same game and
    episode. When no episode is left the sub-env idles: it no longer steps the env and returns
    its last observation, never done.
    """

    def __init__(self, env: gym.Env, schedule: _Schedule, slot: int) -> None:
        super().__init__(env)
        self.schedule = schedule
        self.slot = slot
        self.episode: int | None = None
        self.real_end = True  # the next reset starts a new episode
        self.last_obs: Any = None
        self.t = 0
        self.base = _minigrid(env)
        self.before: tuple[str | None, frozenset[int]] | None = None

    def _frame(self) -> np.ndarray:
        if self.base is not None:
            # MiniGrid draws at 32 px per cell (512 px for 16x16): draw small tiles instead of
            # drawing large and subsampling, 4x fewer pixels to draw for the big grids.
            tile = max(1, min(self.base.tile_size, MAX_VIDEO_SIDE // max(self.base.width, self.base.height)))
            return self.base.get_frame(self.base.highlight, tile, self.base.agent_pov)
        frame = np.asarray(self.env.render())
        step = max(1, math.ceil(max(frame.shape[:2]) / MAX_VIDEO_SIDE))
        return frame[::step, ::step] if step > 1 else frame

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Start the slot's next episode with its own seed (the vec env's ``seed`` is not used)."""
        if not self.real_end:  # a lost life under EpisodicLifeEnv: the same game goes on
            obs, info = self.env.reset(options=options)
            self.last_obs = obs
            return obs, info
        self.real_end = False
        self.episode = self.schedule.take(self.slot)
        if self.episode is None:
            return self.last_obs, {}
        obs, _info = self.env.reset(seed=int(self.schedule.env_seeds[self.episode]), options=options)
        self.t = 0
        self.last_obs = obs
        if self.episode == self.schedule.watched:
            if self.schedule.record_frames:
                self.schedule.add_frame(self._frame)
            if self.base is not None:
                self.before = _minigrid_state(self.base)
        return obs, {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        """Step the env (not when idle) and report a finished episode to the schedule."""
        if self.episode is None:
            return self.last_obs, 0.0, False, False, {}
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.episode == self.schedule.watched:
            if self.schedule.record_frames:
                self.schedule.add_frame(self._frame)
            if self.base is not None and self.before is not None:
                after = _minigrid_state(self.base)
                self.schedule.events += [(self.t, event) for event in
                                         _minigrid_events(self.base, self.before, after, terminated)]
                self.before = after
        self.t += 1
        if "episode" in info:  # the Monitor's end of a whole episode (a whole game on Atari, lives or not)
            episode = {"r": float(info["episode"]["r"]), "l": int(info["episode"]["l"]),
                       "truncated": bool(truncated and not terminated)}
            if "is_success" in info["episode"] or "is_success" in info:
                episode["is_success"] = float(info["episode"].get("is_success", info.get("is_success")))
            self.schedule.results[self.episode] = episode
            self.schedule.finished += 1
            self.real_end = True
        self.last_obs = obs
        # The episode is recorded above; an empty info spares DummyVecEnv's deepcopy of every
        # sub-env's info at every step (a tenth of the evaluation time on MiniGrid).
        return obs, reward, terminated, truncated, {}


def _dummy_vec_env(venv: VecEnv) -> DummyVecEnv:
    """The DummyVecEnv under VecEnv wrappers (frame stacking, transposes)."""
    layer: Any = venv
    while not isinstance(layer, DummyVecEnv):
        layer = layer.venv
    return layer


def _episode_progress(schedule: _Schedule, steps: np.ndarray, limit: int | None) -> float:
    """Finished episodes plus the fraction of its step limit each running episode has used."""
    if limit is None:
        return float(schedule.finished)
    running = schedule.slot_episode >= 0
    return schedule.finished + float(np.minimum(steps[running] / limit, 0.99).sum())


def _index(obs: Any, rows: np.ndarray | None) -> Any:
    """Rows of an observation batch (a dict of arrays for mission observations); all when None."""
    if rows is None:
        return obs
    return {key: value[rows] for key, value in obs.items()} if isinstance(obs, dict) else obs[rows]


def evaluate_policy(
    policy: Policy,
    env_id: str,
    options: dict[str, Any] | None = None,
    episodes: int = 100,
    seed: int = 10_000,  # evaluate.py's --seed default: a training run of seed s resets its envs with the
    # seeds episode_seeds(s) gives episodes 0.., so a small seed here would replay its first training levels
    deterministic: bool = False,
    record_video: bool = False,
    record_info: bool = False,
    n_envs: int | None = None,
    progress: bool = False,
    desc: str | None = None,
    max_video_frames: int | None = 1000,
) -> dict[str, Any]:
    """Run exactly ``episodes`` episodes of ``policy`` on ``env_id`` and summarise them.

    Episode i is seeded by its own seeds (:func:`episode_seeds`): the env is reset with
    episode i's env seed when the episode starts, and its sampled actions come from episode
    i's own random stream (:func:`step_uniforms` of its key and the step). So each episode's
    return is the same whether the episodes run one at a time in one env or side by side in
    ``n_envs`` envs (up to the rounding of the batched forward pass), and the result lists them
    in episode order. The sub-envs take the next unstarted episode as they finish one and idle
    (no env step, no forward pass) when none is left, so exactly ``episodes`` episodes run and
    no kind of episode is favoured.

    The recurrent state is carried from step to step and reset where an episode starts (and on
    a lost life with ``terminal_on_life_loss``), exactly as in training.

    :param policy: the policy (``policies.load_policy``).
    :param env_id: gymnasium id of the env.
    :param options: ``make_vec_env`` options; None means ``evaluation_options`` for ``env_id``
        (the policy's training options that apply). ``clip_rewards`` defaults to False, so
        returns are raw scores. ``vec_env`` is always ``"dummy"`` (the sub-envs share the schedule).
    :param episodes: number of episodes to run.
    :param seed: the evaluation seed (>= 0); it fixes every episode's seeds.
    :param deterministic: take the most likely action instead of sampling.
    :param record_video: keep the frames of episode 0 (``"frames"``; ``"frames_total"`` counts
        them all when ``max_video_frames`` cut the recording).
    :param record_info: keep the core's diagnostics over episode 0 (``"trace"``: info key ->
        array, time first, plus ``"state_norm"`` (T,), the recurrent state's norm).
    :param n_envs: parallel envs, at most ``episodes``; None picks ``min(episodes, DEFAULT_N_ENVS)``.
    :param progress: show a progress bar (episodes done, and the share of their step limit the
        running episodes have used, so the time left is an estimate from the start).
    :param desc: the bar's label.
    :param max_video_frames: keep at most this many frames (None: all).
    :return: ``{"env_id", "options", "episodes", "returns", "lengths", "successes" (None when
        the env does not report ``is_success``), "truncated", "mean_return", "std_return",
        "mean_return_ci", "success_rate", "success_rate_ci", "mean_length", "seconds", "n_envs",
        "first_episode" (episode 0's summary and its ``"events"``: (step, what the agent did) on
        MiniGrid)}`` plus ``"frames"``/``"frames_total"`` and ``"trace"`` when recorded.
    :raises EvaluationError: if the env cannot be built or its spaces do not fit the policy.
    """
    if episodes < 1:
        raise EvaluationError(f"episodes must be >= 1, got {episodes}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise EvaluationError(f"seed must be an integer >= 0, got {seed!r}")
    if options is None:
        options = evaluation_options(policy, EvalTarget(env_id))
    # The wrappers share the schedule object: the sub-envs must live in this process.
    options = {"clip_rewards": False, **options, "vec_env": "dummy"}
    if record_video:
        options["render_mode"] = "rgb_array"
    n_envs = max(1, min(n_envs if n_envs is not None else DEFAULT_N_ENVS, episodes))

    venv = _make_venv(env_id, n_envs, seed, options)
    message = _spaces_error(policy, env_id, venv)
    if message is not None:
        venv.close()
        raise EvaluationError(message)
    env_seeds, action_keys = episode_seeds(int(seed), episodes)
    watched = 0 if (record_video or record_info) else None
    schedule = _Schedule(env_seeds, n_envs, watched, record_video, max_video_frames)
    dummy = _dummy_vec_env(venv)
    dummy.envs = [_EpisodeSlot(env, schedule, slot) for slot, env in enumerate(dummy.envs)]
    limit = _step_limit(dummy.envs[0])
    action_space = policy.action_space
    box_dims = int(np.prod(action_space.shape)) if isinstance(action_space, spaces.Box) else 0
    actions = np.zeros((n_envs, *action_space.shape), dtype=action_space.dtype)  # idle slots' are ignored

    steps_info: list[dict[str, np.ndarray]] = []
    label = desc or short_env_name(env_id)
    # The bar moves with the episodes done and the share of its step limit each running episode has
    # used, so it advances (and estimates the time left) before the first parallel episode ends.
    bar = tqdm(total=episodes, desc=f"{label}: 0/{episodes} episodes", disable=not progress, dynamic_ncols=True,
               leave=True, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, {remaining} left")
    shown_finished = 0
    started = time.perf_counter()
    # torch.manual_seed below seeds the accelerators' generators too: the policy's device is forked with the
    # CPU's, so a caller training on a GPU (evaluation during training) keeps its stream there as well.
    device = policy.device
    forked = ({"devices": [device.index if device.index is not None else torch.cuda.current_device()]}
              if device.type == "cuda" else {"devices": [0], "device_type": "mps"} if device.type == "mps"
              else {"devices": []})
    try:
        with torch.random.fork_rng(**forked), torch.inference_mode(), frozen_parameters():
            # Actions are sampled from the per-episode streams, not torch's RNG; fork and seed it
            # anyway, so anything in a policy that draws from it is seeded and the caller's stream
            # stays untouched. inference_mode: nothing here needs autograd, and acting is faster without it;
            # frozen_parameters: nor changes the policy, so a core may keep its set-up between steps.
            torch.manual_seed(int(seed) % 2**63)
            obs = venv.reset()
            state = policy.initial_state(n_envs)
            starts = np.ones(n_envs, dtype=bool)
            step_in_episode = np.zeros(n_envs, dtype=np.int64)
            running = schedule.slot_episode.copy()
            while schedule.finished < episodes:
                active = np.flatnonzero(running >= 0)
                rows = None if active.size == n_envs else active  # index only once some slots idle
                keys = action_keys[running[active]]
                if box_dims:
                    uniforms = step_uniforms(keys[:, None], step_in_episode[active, None] * box_dims
                                             + np.arange(box_dims))
                else:
                    uniforms = step_uniforms(keys, step_in_episode[active])
                watch_row = np.flatnonzero(running[active] == watched) if record_info else np.empty(0)
                rows_t = None if rows is None else torch.as_tensor(rows, device=state.device)
                sub_state = state if rows_t is None else state[rows_t]
                if watch_row.size:
                    acted, new_state, info = policy.act(_index(obs, rows), sub_state, starts[active], deterministic,
                                                        return_info=True, uniforms=uniforms)
                    row = int(watch_row[0])
                    step = {key: value[row] for key, value in info.items()}
                    step["state_norm"] = np.asarray(float(new_state[row].norm()))
                    steps_info.append(step)
                else:
                    acted, new_state = policy.act(_index(obs, rows), sub_state, starts[active], deterministic,
                                                  uniforms=uniforms)
                if rows_t is None:
                    state = new_state
                else:
                    state[rows_t] = new_state
                actions[active] = acted
                step_in_episode[active] += 1
                obs, _rewards, dones, _infos = venv.step(actions)
                starts = np.asarray(dones, dtype=bool)
                changed = schedule.slot_episode != running  # a new episode (or idling) in these slots
                step_in_episode[changed] = 0
                running = schedule.slot_episode.copy()
                if progress:
                    if schedule.finished != shown_finished:
                        shown_finished = schedule.finished
                        bar.set_description_str(f"{label}: {shown_finished}/{episodes} episodes", refresh=False)
                    bar.update(_episode_progress(schedule, step_in_episode, limit) - bar.n)
    finally:
        bar.close()
        venv.close()

    per_episode = [episode for episode in schedule.results if episode is not None]
    results = summarize(per_episode)
    results.update(env_id=env_id, options=options, seconds=time.perf_counter() - started, n_envs=n_envs)
    if watched is not None:
        first = schedule.results[watched] or {}
        results["first_episode"] = {
            "index": watched, "return": first.get("r"), "length": first.get("l"),
            "success": None if "is_success" not in first else bool(first["is_success"]),
            "truncated": first.get("truncated"),
            # None where the env has no behaviour events to report (not MiniGrid); [] where it has but none happened.
            "events": list(schedule.events) if dummy.envs[0].base is not None else None,
        }
    if record_video:
        results["frames"] = schedule.frames
        results["frames_total"] = schedule.frames_seen
    if record_info and steps_info:
        results["trace"] = {key: np.stack([step[key] for step in steps_info]) for key in steps_info[0]}
    return results


def bootstrap_ci(
    values: np.ndarray | list[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling episodes with replacement).

    A pure function: the resampling generator is seeded with ``seed``, so the same values give
    the same interval.

    :param values: one number per episode (returns, or 0/1 successes).
    :param confidence: the interval's coverage (0.95: the 2.5th and 97.5th percentiles).
    :param resamples: bootstrap resamples.
    :param seed: seed of the resampling generator.
    :return: ``(low, high)``; ``(nan, nan)`` for no values, ``(v, v)`` for one value.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return float("nan"), float("nan")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if np.all(data == data[0]):  # no spread: the interval is the value itself, not its rounding
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a success rate: ``successes`` of ``trials`` episodes.

    Used for success rates rather than :func:`bootstrap_ci`, whose resamples of 5 failures are all
    failures: "0% [0%, 0%]", where 0 of 5 leaves rates up to ~43% possible. Closed form, no scipy.

    :return: ``(low, high)`` within [0, 1]; ``(nan, nan)`` for no trials.
    """
    if trials == 0:
        return float("nan"), float("nan")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
    rate, z2 = successes / trials, z * z / trials
    centre = (rate + z2 / 2.0) / (1.0 + z2)
    half = z / (1.0 + z2) * math.sqrt(rate * (1.0 - rate) / trials + z2 / (4.0 * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/std return (with a 95% bootstrap interval), success rate (with its 95% Wilson interval) and mean
    length of episodes.

    :param episodes: ``{"r": return, "l": length, "is_success"?: 0/1, "truncated"?: bool}`` per episode.
    :return: per-episode lists and the summary numbers; ``success_rate``, ``success_rate_ci`` and
        ``successes`` are None unless every episode reports ``is_success``.
    """
    returns = [e["r"] for e in episodes]
    lengths = [e["l"] for e in episodes]
    has_success = bool(episodes) and all("is_success" in e for e in episodes)
    successes = [e["is_success"] for e in episodes] if has_success else None
    return {
        "episodes": len(episodes),
        "returns": returns,
        "lengths": lengths,
        "successes": successes,
        "truncated": [bool(e.get("truncated", False)) for e in episodes],
        "mean_return": float(np.mean(returns)) if returns else float("nan"),
        "mean_return_ci": list(bootstrap_ci(returns)),
        "std_return": float(np.std(returns)) if returns else float("nan"),
        "success_rate": float(np.mean(successes)) if successes else None,
        "success_rate_ci": list(wilson_interval(int(sum(successes)), len(successes))) if successes else None,
        "mean_length": float(np.mean(lengths)) if lengths else float("nan"),
    }


def video_format_available(suffix: str) -> bool:
    """Whether imageio can write a video with this file suffix here (MP4 needs imageio-ffmpeg)."""
    if suffix == ".gif":
        return True
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def save_video(frames: list[np.ndarray], path: str | Path, fps: int = 10) -> Path:
    """Write RGB frames as a GIF (no ffmpeg needed) or an MP4 (needs imageio-ffmpeg).

    :param frames: ``(H, W, 3)`` uint8 frames, all the same size.
    :param path: output file; its suffix (``.gif`` or ``.mp4``) picks the format.
    :param fps: frames per second.
    :raises EvaluationError: no frames, or MP4 without imageio-ffmpeg.
    """
    import imageio.v3 as iio  # imported here: only video writing needs it

    path = Path(path)
    if not frames:
        raise EvaluationError(f"no frames to write to {path}")
    if not video_format_available(path.suffix):
        raise EvaluationError(f"writing {path.suffix} videos needs imageio-ffmpeg (pip install imageio-ffmpeg); "
                              "use GIF instead")
    path.parent.mkdir(parents=True, exist_ok=True)
    stack = np.stack(frames).astype(np.uint8)
    if path.suffix == ".gif":
        # Pillow's GIF writer takes the frame duration in milliseconds; loop=0 repeats forever.
        iio.imwrite(path, stack, duration=int(1000 / fps), loop=0)
    else:
        iio.imwrite(path, stack, fps=fps)
    return path
