"""Meta-learning mode (Meta-RIMs): fast module parameters, slow attention parameters, a task distribution.

The parameters of the policy are split in two groups (see shared/DESIGN.md, "Meta-learning mode"):

* fast: the per-module recurrent cells of the core (``core.parameter_groups()["modules"]``), plus the
  encoder and the actor/critic heads unless ``meta.encoder_heads: slow``;
* slow: the input- and communication-attention parameters (``["attention"]``).

``meta.reverse: true`` swaps the two core groups (fast attention, slow modules), the paper's ablation.

The trainer calls ``update(storage)`` once per rollout, so :class:`MetaPPO` is a phase machine over
cycles of ``meta.inner_updates + 1`` rollouts on one task:

1. rollouts 1 .. ``inner_updates``: one PPO update each that changes only the fast group, at
   ``meta.fast_lr`` (the inner loop);
2. the next rollout, gathered with the adapted parameters: one PPO update of the slow group at
   ``meta.slow_lr`` (the outer loop). It is first order: the loss is that of fresh experience
   after the inner loop, and no gradient flows through the inner updates;
3. then the task may change: ``next_task`` (the trainer's hook) returns the task the
   :class:`TaskSchedule` picks, and the trainer switches the envs to it (each task keeps its own
   envs, parked between visits, so an episode cut by a switch goes on when its task returns).

:class:`MultiTaskPPO` (``algo.name: multitask_ppo``) is the baseline for the same task distribution:
plain PPO on all parameters at ``algo.lr``, switching tasks every ``meta.rollouts_per_task``
rollouts. It works with every core, LSTM and GRU included.

Importing this module registers both update rules (``agents/__init__.py`` imports it).
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from agents.config import ConfigError, env_options, refusal_reason
import agents.meta_config  # noqa: F401  (registers meta_ppo, multitask_ppo and the meta section with the config)
from agents.meta_config import task_specs
from agents.ppo import RecurrentPPO
from agents.rollout import RolloutStats
from agents.storage import RolloutStorage
from agents.trainer import UPDATERS
from envs import EnvSpec, check_env_id, env_spaces

# A task is what the trainer builds envs from: (env id, make_vec_env options).
Task = tuple[str, dict[str, Any]]

# ---------------------------------------------------------------------------------------------
# Tasks and their schedule
# ---------------------------------------------------------------------------------------------
def resolve_tasks(config: dict[str, Any]) -> tuple[list[Task], list[str]]:
    """The tasks of a resolved config with a ``meta`` section, and their display names.

    Each task's options are the ``env`` section's ``make_vec_env`` options, updated by the
    task's own (a suite entry's options, or the keys of a mapping in ``meta.tasks``).

    :param config: a resolved config (``agents.config.load_config``).
    :raises ConfigError: if neither or both of ``meta.tasks`` and ``meta.suite`` are given, or an env id
        is unknown (the schedule's settings are checked with the config: ``agents.meta_config``).
    """
    meta = config["meta"]
    base = env_options(config["env"])
    if (meta["tasks"] is None) == (meta["suite"] is None):
        raise ConfigError("give exactly one of meta.tasks (a list of env ids) and meta.suite (a suite name, "
                          "whose training list becomes the tasks)")
    try:
        specs: list[EnvSpec] = task_specs(meta)
    except ValueError as exc:
        raise ConfigError(f"meta.suite: {exc}") from None
    tasks: list[Task] = []
    for i, spec in enumerate(specs):
        try:
            check_env_id(spec.env_id)
        except ValueError as exc:
            key = "meta.suite" if meta["suite"] is not None else f"meta.tasks[{i}]"
            raise ConfigError(f"{key}: {exc}") from None
        tasks.append((spec.env_id, {**base, **spec.options}))
    names = [spec.name.replace(" ", "_") for spec in specs]
    if len(set(names)) < len(names):  # e.g. one env id twice with other options: keep the curves apart
        names = [f"{i}_{name}" for i, name in enumerate(names)]
    return tasks, names


class TaskSchedule:
    """Which task the envs run, changed only between cycles (one cycle = the rollouts of one outer update).

    * ``sample``: every cycle draws a task uniformly from the list, with its own seeded generator.
    * ``curriculum``: the tasks in order; at the end of a cycle it moves to the next task once it has
      spent ``curriculum_frames`` frames on the current one, or once the mean return of the last
      ``return_window`` episodes on it reaches ``curriculum_return`` (whichever comes first).
      It stays on the last task.

    :param tasks: the tasks, ``(env id, make_vec_env options)``.
    :param names: a display name per task (TensorBoard tags ``meta/return/<name>``).
    :param schedule: ``"sample"`` or ``"curriculum"``.
    :param curriculum_frames: frames on a task after which the curriculum advances (None: no budget).
    :param curriculum_return: mean return at which the curriculum advances (None: no threshold).
    :param return_window: episodes per task averaged for ``meta/return/<name>`` and the threshold.
    :param seed: seed of the task sampler.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        names: Sequence[str],
        schedule: str = "sample",
        curriculum_frames: int | None = None,
        curriculum_return: float | None = None,
        return_window: int = 20,
        seed: int = 0,
    ) -> None:
        if not tasks or len(names) != len(tasks):
            raise ValueError("a task schedule needs at least one task and one name per task")
        if schedule not in ("sample", "curriculum"):
            raise ValueError(f"schedule must be 'sample' or 'curriculum', got {schedule!r}")
        self.tasks, self.names = list(tasks), list(names)
        self.schedule = schedule
        self.curriculum_frames, self.curriculum_return = curriculum_frames, curriculum_return
        self.returns: list[deque[float]] = [deque(maxlen=return_window) for _ in self.tasks]
        self.generator = torch.Generator().manual_seed(seed)
        self.index = self._draw() if schedule == "sample" else 0
        self.task_started_frames = 0  # trainer frame count when the current task began
        self.switches = 0

    @property
    def current(self) -> Task:
        """The task the envs should run now."""
        return self.tasks[self.index]

    def _draw(self) -> int:
        return int(torch.randint(len(self.tasks), (1,), generator=self.generator))

    def observe(self, rollout_stats: RolloutStats | None) -> None:
        """Record the returns of the episodes a rollout on the current task finished."""
        if rollout_stats is not None:
            self.returns[self.index].extend(episode["r"] for episode in rollout_stats.episodes)

    def mean_return(self, index: int) -> float:
        """Mean return of the last ``return_window`` episodes on task ``index`` (nan if none yet)."""
        returns = self.returns[index]
        return float(np.mean(returns)) if returns else math.nan

    def end_cycle(self, frames: int) -> None:
        """A cycle ended after ``frames`` trainer frames: pick the task of the next one."""
        previous = self.index
        if self.schedule == "sample":
            self.index = self._draw()
        elif self.index + 1 < len(self.tasks) and self._curriculum_done(frames):
            self.index += 1
        if self.index != previous:
            self.task_started_frames = frames
            self.switches += 1

    def _curriculum_done(self, frames: int) -> bool:
        if self.curriculum_frames is not None and frames - self.task_started_frames >= self.curriculum_frames:
            return True
        window = self.returns[self.index]
        # A full window, so that a few lucky first episodes do not end a task.
        return (self.curriculum_return is not None and len(window) == window.maxlen
                and self.mean_return(self.index) >= self.curriculum_return)

    def stats(self) -> dict[str, float]:
        """``meta/task_index``, and for every task with finished episodes ``meta/return/<name>`` and
        ``meta/return_episodes/<name>`` (how many episodes that mean is over, at most ``return_window``:
        the first episodes to end on a new task are its short, successful ones, so a mean over a few
        of them overstates the policy)."""
        stats = {"meta/task_index": float(self.index), "meta/task_switches": float(self.switches)}
        for index, name in enumerate(self.names):
            if self.returns[index]:
                stats[f"meta/return/{name}"] = self.mean_return(index)
                stats[f"meta/return_episodes/{name}"] = float(len(self.returns[index]))
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the schedule exactly (plain types and tensors)."""
        return {
            "index": self.index,
            "task_started_frames": self.task_started_frames,
            "switches": self.switches,
            "returns": [list(window) for window in self.returns],
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if len(state["returns"]) != len(self.tasks):
            raise ValueError(f"the saved schedule has {len(state['returns'])} tasks, this one {len(self.tasks)}")
        self.index, self.task_started_frames = state["index"], state["task_started_frames"]
        self.switches = state["switches"]
        for window, saved in zip(self.returns, state["returns"], strict=True):
            window.clear()
            window.extend(saved)
        self.generator.set_state(state["generator"])


def _spaces(env_id: str, options: dict[str, Any], where: str) -> tuple[Any, Any]:
    """The observation and action spaces of the training vec env of ``env_id`` with ``options``, from an env
    built and reset once: options that fail only at the first reset (a MiniGrid size too small for its
    objects) are refused before training, not when the schedule first reaches the task.

    :param where: the config key the task comes from, as the message names it (``meta.tasks[1]``).
    """
    try:
        return env_spaces(env_id, options, reset=True)
    except (ValueError, TypeError, AssertionError) as exc:
        raise ConfigError(f"{where} cannot be built: {refusal_reason(exc)}") from None
    except Exception as exc:
        if not options.get("env_kwargs"):
            raise  # not the user's options: an env bug keeps its traceback
        # env_kwargs the env takes but cannot reset with fail in the env's own way (an IndexError...)
        raise ConfigError(f"{where} cannot be built: {type(exc).__name__}: {refusal_reason(exc)}") from None


def check_task_spaces(config: dict[str, Any], tasks: Sequence[Task]) -> None:
    """Refuse a task list with a task that cannot be built and reset, or whose observation or action
    spaces differ from those of ``env.id``.

    The policy is built once, for ``env.id``'s spaces; every task must fit it. Checked when the
    update rule is built (before the first rollout), rather than when the schedule first reaches
    an odd task, which could be many updates into a run that then could not resume past it.

    :raises ConfigError: naming the first task that fails or differs (its key, its own settings and
        spaces against ``env.id``'s).
    """
    env_id = config["env"]["id"]
    base = env_options(config["env"])
    reference = _spaces(env_id, base, f"env.id {env_id}")
    key = "meta.suite" if config["meta"].get("suite") is not None else "meta.tasks"

    def described(index: int, task: Task) -> str:
        task_id, options = task
        own = {k: v for k, v in options.items() if base.get(k) != v}  # what the task sets itself
        return f"{key}[{index}] ({task_id}{f' with {own}' if own else ''})"

    seen: dict[str, tuple[Any, Any]] = {}
    differing: list[tuple[int, Task, tuple[Any, Any]]] = []
    for index, task in enumerate(tasks):
        identity = repr(task)
        if identity not in seen:
            seen[identity] = _spaces(*task, described(index, task))
        if seen[identity] != reference:
            differing.append((index, task, seen[identity]))
    if differing:
        index, task, spaces = differing[0]
        parts = [f"{name} space {mine} where env.id {env_id} has {theirs}"
                 for name, mine, theirs in zip(("observation", "action"), spaces, reference, strict=True)
                 if mine != theirs]
        more = f"; {len(differing) - 1} more task(s) differ too" if len(differing) > 1 else ""
        raise ConfigError(f"{described(index, task)} has {' and '.join(parts)}"
                          f"{more}: every task of a run must have env.id's observation and action spaces, "
                          "the ones the policy is built for")


def schedule_from_config(config: dict[str, Any]) -> TaskSchedule:
    """The :class:`TaskSchedule` a resolved config's ``meta`` section describes (seeded from ``seed``).

    :raises ConfigError: a task list as :func:`resolve_tasks` refuses it, or with spaces that differ
        (:func:`check_task_spaces`).
    """
    meta = config["meta"]
    tasks, names = resolve_tasks(config)
    check_task_spaces(config, tasks)
    # Its own stream, apart from the trainer's minibatch generator that shares the config seed.
    return TaskSchedule(tasks, names, meta["task_schedule"], meta["curriculum_frames"], meta["curriculum_return"],
                        meta["return_window"], seed=config["seed"] + 104_729)


# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------
def split_parameters(
    policy: nn.Module, reverse: bool = False, encoder_heads: str = "fast"
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split a policy's parameters into the (fast, slow) groups of meta-learning.

    :param policy: an actor-critic with a ``core`` that implements ``parameter_groups()``.
    :param reverse: swap the core's groups (fast attention, slow modules).
    :param encoder_heads: ``"fast"`` or ``"slow"``: the group of every parameter outside the core
        (encoder, actor and critic heads, a Gaussian policy's log-std).
    :return: ``(fast, slow)``; together they hold every parameter of the policy exactly once.
    :raises ValueError: if the core has no split (LSTM, GRU) or its groups do not cover it exactly once.
    """
    if encoder_heads not in ("fast", "slow"):
        raise ValueError(f"encoder_heads must be 'fast' or 'slow', got {encoder_heads!r}")
    core: nn.Module = policy.core
    groups = core.parameter_groups()
    modules, attention = list(groups["modules"]), list(groups["attention"])
    _check_exact_cover(core, modules + attention, f"{type(core).__name__}.parameter_groups()")
    core_ids = {id(p) for p in core.parameters()}
    outside = [p for p in policy.parameters() if id(p) not in core_ids]
    fast, slow = (attention, modules) if reverse else (modules, attention)
    if encoder_heads == "fast":
        fast = fast + outside
    else:
        slow = slow + outside
    _check_exact_cover(policy, fast + slow, "the fast and slow groups")
    return fast, slow


def _check_exact_cover(module: nn.Module, params: list[nn.Parameter], what: str) -> None:
    ids = [id(p) for p in params]
    expected = {id(p) for p in module.parameters()}
    if len(ids) != len(set(ids)) or set(ids) != expected:
        raise ValueError(f"{what} must hold each parameter of {type(module).__name__} exactly once "
                         f"({len(ids)} listed, {len(set(ids))} distinct, {len(expected)} expected)")


@contextlib.contextmanager
def _frozen(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Switch off the gradients of ``params`` (the group not being updated) for the duration.

    That group would not change anyway (each optimiser steps its own parameters only); this
    spares the backward pass the gradients nobody uses.
    """
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, previous, strict=True):
            p.requires_grad_(flag)


def _change_norm(before: Sequence[torch.Tensor], params: Sequence[nn.Parameter]) -> float:
    """L2 norm of the change of ``params`` since ``before`` (their copies), over the whole group."""
    with torch.no_grad():
        squares = [(p - old).pow(2).sum() for p, old in zip(params, before, strict=True)]
        return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


# ---------------------------------------------------------------------------------------------
# The update rules
# ---------------------------------------------------------------------------------------------
class MetaPPO:
    """First-order meta-PPO over a fast and a slow parameter group (Meta-RIMs), as a phase machine.

    Each call of :meth:`update` does one PPO update (``algo``'s epochs and minibatches) of one group:
    ``inner_updates`` calls update the fast group, the next one the slow group, and so on. Between
    cycles :meth:`next_task` lets the schedule change the task.

    It has the interface of a ``PolicyUpdater`` (``update``, ``set_lr_scale``, ``state_dict``,
    ``load_state_dict``) but holds two of them, :attr:`fast` and :attr:`slow`, each a
    :class:`~agents.ppo.RecurrentPPO` with its own optimiser, parameters and learning rate.

    :param policy: the actor-critic; its core must implement ``parameter_groups()``.
    :param algo: the resolved ``algo`` section (PPO settings shared by both groups; no ``lr``).
    :param schedule: the task schedule (``schedule_from_config``).
    :param fast_lr: learning rate of the fast group (inner loop).
    :param slow_lr: learning rate of the slow group (outer loop).
    :param inner_updates: fast-group updates per cycle, each on its own rollout.
    :param reverse: swap the core's groups (fast attention, slow modules).
    :param encoder_heads: ``"fast"`` or ``"slow"``: the group of the encoder and the heads.
    :param generator: random generator for the minibatch shuffles (the trainer's).
    :raises ConfigError: if the core has no module/attention split.
    """

    def __init__(
        self,
        policy: nn.Module,
        algo: dict[str, Any],
        schedule: TaskSchedule,
        fast_lr: float,
        slow_lr: float,
        inner_updates: int,
        reverse: bool = False,
        encoder_heads: str = "fast",
        generator: torch.Generator | None = None,
    ) -> None:
        if inner_updates < 1:
            raise ValueError(f"inner_updates must be >= 1, got {inner_updates}")
        try:
            self.fast_params, self.slow_params = split_parameters(policy, reverse, encoder_heads)
        except ValueError as exc:
            core_name = getattr(policy, "spec", {}).get("core", type(policy.core).__name__)
            raise ConfigError(f"meta_ppo cannot use core.name={core_name!r}: {exc}") from None
        self.policy, self.algo, self.schedule = policy, algo, schedule
        self.inner_updates = inner_updates
        self.fast = RecurrentPPO(policy, algo, parameters=self.fast_params, lr=fast_lr, generator=generator)
        self.slow = RecurrentPPO(policy, algo, parameters=self.slow_params, lr=slow_lr, generator=generator)
        self.step = 0  # position in the cycle: 0 .. inner_updates-1 inner, inner_updates outer
        self.outer_updates = 0
        self.cycle_ended = False  # set by the outer update, consumed by next_task

    @classmethod
    def from_config(
        cls, config: dict[str, Any], policy: nn.Module, generator: torch.Generator | None = None
    ) -> MetaPPO:
        """Build from a resolved config (``algo`` and ``meta`` sections; the trainer calls this)."""
        meta = config["meta"]
        return cls(policy, config["algo"], schedule_from_config(config), meta["fast_lr"], meta["slow_lr"],
                   meta["inner_updates"], meta["reverse"], meta["encoder_heads"], generator)

    @property
    def phase(self) -> str:
        """``"inner"`` if the next update changes the fast group, ``"outer"`` if the slow one."""
        return "inner" if self.step < self.inner_updates else "outer"

    def update(self, storage: RolloutStorage) -> dict[str, float]:
        """One PPO update of the group whose turn it is, on the rollout in ``storage``.

        :return: PPO's statistics plus ``meta/*``: the phase (0 inner, 1 outer), each group's parameter
            change norm in this update (the other group's is exactly 0), the task index and the
            per-task mean returns (as of the previous rollout: episodes reach the schedule through
            ``next_task``, after this update).
        """
        inner = self.phase == "inner"
        updater, frozen = (self.fast, self.slow_params) if inner else (self.slow, self.fast_params)
        before_fast = [p.detach().clone() for p in self.fast_params]
        before_slow = [p.detach().clone() for p in self.slow_params]
        with _frozen(frozen):
            stats = updater.update(storage)
        stats["meta/phase"] = 0.0 if inner else 1.0
        stats["meta/inner_step"] = float(self.step)
        stats["meta/fast_update_norm"] = _change_norm(before_fast, self.fast_params)
        stats["meta/slow_update_norm"] = _change_norm(before_slow, self.slow_params)
        stats["meta/fast_lr"] = self.fast.optimizer.param_groups[0]["lr"]
        stats["meta/slow_lr"] = self.slow.optimizer.param_groups[0]["lr"]
        stats.update(self.schedule.stats())
        if inner:
            self.step += 1
        else:
            self.step, self.cycle_ended = 0, True
            self.outer_updates += 1
        stats["meta/outer_updates"] = float(self.outer_updates)
        return stats

    def next_task(self, frames: int, rollout_stats: RolloutStats | None) -> Task:
        """The trainer's hook after each update: record the rollout's returns; after an outer update,
        let the schedule pick the next cycle's task. Returns the task the envs should run.

        :param frames: the trainer's frame count so far.
        :param rollout_stats: the episodes of the rollout just used (None when the trainer only asks).
        """
        self.schedule.observe(rollout_stats)
        if self.cycle_ended:
            self.cycle_ended = False
            self.schedule.end_cycle(frames)
        return self.schedule.current

    def set_lr_scale(self, scale: float) -> None:
        """Scale both learning rates by ``scale`` (``algo.anneal_lr``)."""
        self.fast.set_lr_scale(scale)
        self.slow.set_lr_scale(scale)

    def state_dict(self) -> dict[str, Any]:
        """Both optimisers, the phase and the task schedule (index, frames on it, sampler RNG, returns)."""
        return {
            "fast": self.fast.state_dict(),
            "slow": self.slow.state_dict(),
            "step": self.step,
            "outer_updates": self.outer_updates,
            "cycle_ended": self.cycle_ended,
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (``--resume``)."""
        self.fast.load_state_dict(state["fast"])
        self.slow.load_state_dict(state["slow"])
        self.step, self.outer_updates = state["step"], state["outer_updates"]
        self.cycle_ended = state["cycle_ended"]
        self.schedule.load_state_dict(state["schedule"])


class MultiTaskPPO(RecurrentPPO):
    """Plain PPO on all parameters, on the task distribution of a ``meta`` section (the baseline).

    It sees the tasks as :class:`MetaPPO` does: the schedule may change the task every
    ``rollouts_per_task`` rollouts (``meta.inner_updates + 1`` gives the same exposure).

    :param policy: the actor-critic (any core).
    :param algo: the resolved ``algo`` section (``lr`` included).
    :param schedule: the task schedule.
    :param rollouts_per_task: rollouts (updates) between two schedule decisions.
    :param generator: random generator for the minibatch shuffles.
    """

    def __init__(
        self,
        policy: nn.Module,
        algo: dict[str, Any],
        schedule: TaskSchedule,
        rollouts_per_task: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(policy, algo, generator=generator)
        self.schedule = schedule
        self.rollouts_per_task = rollouts_per_task
        self.step = 0
        self.cycle_ended = False

    @classmethod
    def from_config(
        cls, config: dict[str, Any], policy: nn.Module, generator: torch.Generator | None = None
    ) -> MultiTaskPPO:
        """Build from a resolved config (``algo`` and ``meta`` sections; the trainer calls this)."""
        return cls(policy, config["algo"], schedule_from_config(config), config["meta"]["rollouts_per_task"],
                   generator)

    def update(self, storage: RolloutStorage) -> dict[str, float]:
        """PPO's update, plus ``meta/task_index`` and the per-task returns."""
        stats = super().update(storage)
        stats.update(self.schedule.stats())
        self.step += 1
        if self.step == self.rollouts_per_task:
            self.step, self.cycle_ended = 0, True
        return stats

    def next_task(self, frames: int, rollout_stats: RolloutStats | None) -> Task:
        """Same hook as :meth:`MetaPPO.next_task`."""
        self.schedule.observe(rollout_stats)
        if self.cycle_ended:
            self.cycle_ended = False
            self.schedule.end_cycle(frames)
        return self.schedule.current

    def state_dict(self) -> dict[str, Any]:
        """The optimiser, the position in the cycle and the schedule."""
        return {**super().state_dict(), "step": self.step, "cycle_ended": self.cycle_ended,
                "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        super().load_state_dict(state)
        self.step, self.cycle_ended = state["step"], state["cycle_ended"]
        self.schedule.load_state_dict(state["schedule"])


# Registration: the trainer knows the update rules (agents.meta_config registers the config side).
UPDATERS["meta_ppo"] = MetaPPO  # type: ignore[assignment]  # two PolicyUpdaters inside, same interface
UPDATERS["multitask_ppo"] = MultiTaskPPO
