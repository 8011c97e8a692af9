"""The config of the meta-learning algorithms: the ``meta`` section, ``meta_ppo`` and ``multitask_ppo``.

Kept apart from ``agents/meta.py`` (which imports torch) so that a mistyped key of a meta config
is reported before the training stack is imported; importing this module registers the two
algorithm names and the section with ``agents.config``.
"""

from __future__ import annotations

from typing import Any

from agents.config import (
    ALGO_FIELDS,
    BOOL,
    ENV_FIELDS,
    EXTRA_SECTIONS,
    FLOAT,
    FLOAT32_POSITIVE,
    INT,
    OPT_STR,
    SECTION_CHECKS,
    ConfigError,
    Field,
    _algo_fields,
    _coerce,
    core_defines,
    is_float32_positive,
)

# make_vec_env options a task entry of ``meta.tasks`` may set for itself (the env section's are the default).
TASK_OPTION_KEYS: tuple[str, ...] = tuple(key for key in ENV_FIELDS if key not in ("id", "n_envs"))


# ---------------------------------------------------------------------------------------------
# Config: the ``meta`` section and the two algorithm names
# ---------------------------------------------------------------------------------------------
def _is_task_list(value: list) -> bool:
    """Each entry is an env id or a mapping with an ``id`` (and optional ``name`` and env options).

    A task's name and env options are checked here as the ``env`` section's own settings are (a ConfigError
    naming the entry: ``mission: "no"`` would otherwise train with the mission on, a name of 5 fail later
    with a traceback); a number spelled as text ("1e3") is converted in the entry, as it is in the section.
    """
    if not value:
        return False
    for i, entry in enumerate(value):
        if isinstance(entry, str):
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            return False
        if set(entry) - {"id", "name", *TASK_OPTION_KEYS}:
            return False
        if "name" in entry and not isinstance(entry["name"], str):
            raise ConfigError(f"meta.tasks[{i}].name must be a string, got {entry['name']!r}")
        for key in TASK_OPTION_KEYS:
            if key in entry:
                entry[key] = _coerce(f"meta.tasks[{i}].{key}", entry[key], ENV_FIELDS[key])
    return True


def task_specs(meta: dict[str, Any]) -> list[Any]:
    """The training tasks of a ``meta`` section as ``envs.EnvSpec`` (id, the task's own options, name): the
    training list of ``meta.suite``, or the entries of ``meta.tasks``; [] when it names neither.

    :raises ValueError: for an unknown ``meta.suite`` (``envs.get_suite``'s message).
    """
    from envs import EnvSpec, get_suite  # here, not at the top: this module stays light (see its docstring)

    if meta.get("suite") is not None:
        return list(get_suite(meta["suite"]).train)
    specs = []
    for entry in meta.get("tasks") or []:
        if isinstance(entry, str):
            specs.append(EnvSpec(entry))
        else:
            options = {key: value for key, value in entry.items() if key not in ("id", "name")}
            specs.append(EnvSpec(entry["id"], options, entry.get("name", "")))
    return specs


def _positive_or_none(value: Any) -> bool:
    return value is None or value > 0


# Where the tasks come from and in which order; shared by meta_ppo and multitask_ppo.
TASK_FIELDS: dict[str, Field] = {
    # The training tasks (exactly one of tasks and suite): env ids, or {id, name?, <env option>...} mappings.
    "tasks": Field(None, (list, type(None)), _is_task_list,
                   f"a non-empty list of env ids or mappings with an 'id' (optional: name, "
                   f"{', '.join(TASK_OPTION_KEYS)})"),
    # ... or the training list of a held-out suite of envs/suites.py (e.g. doorkey).
    "suite": Field(None, OPT_STR),
    # sample: a uniformly drawn task per cycle; curriculum: the tasks in order.
    "task_schedule": Field("sample", (str,), choices=("sample", "curriculum")),
    # The curriculum moves on after this many frames on a task ...
    "curriculum_frames": Field(None, (int, type(None)), _positive_or_none, "> 0 or null"),
    # ... or once the mean return of the last return_window episodes on it reaches this.
    "curriculum_return": Field(None, (float, int, type(None))),
    # Episodes per task in meta/return/<task> and the curriculum's return test.
    "return_window": Field(20, INT, lambda v: v > 0, "> 0"),
}

META_FIELDS: dict[str, Field] = {
    **TASK_FIELDS,
    "fast_lr": Field(1e-3, FLOAT, is_float32_positive, FLOAT32_POSITIVE),  # learning rate of the inner updates
    "slow_lr": Field(2.5e-4, FLOAT, is_float32_positive, FLOAT32_POSITIVE),  # learning rate of the outer update
    "inner_updates": Field(4, INT, lambda v: v > 0, "> 0"),  # fast updates (rollouts) per outer update
    "reverse": Field(False, BOOL),  # fast attention, slow modules (the paper's ablation)
    "encoder_heads": Field("fast", (str,), choices=("fast", "slow")),  # group of the encoder and the heads
}

MULTITASK_FIELDS: dict[str, Field] = {
    **TASK_FIELDS,
    "rollouts_per_task": Field(5, INT, lambda v: v > 0, "> 0"),  # rollouts between two schedule decisions
}


def has_parameter_split(core_name: str) -> bool:
    """Whether the core class named ``core_name`` splits its parameters into modules and attention
    (defines ``parameter_groups``; read from the source, no torch import)."""
    return core_defines(core_name, "parameter_groups")


def _meta_section(config: dict[str, Any]) -> dict[str, Field] | None:
    """The ``meta`` section's fields for the resolved-so-far ``config`` (None: the section does not apply)."""
    algo = config["algo"]["name"]
    if algo == "meta_ppo":
        core = config["core"]["name"]
        # Fail at config time, before any env or policy is built.
        if not has_parameter_split(core):
            raise ConfigError(
                f"algo.name='meta_ppo' needs a modular core whose parameters split into modules and attention, "
                f"but core.name={core!r} has no such split; use core.name=rims, brims or thalnet "
                f"(or algo.name=multitask_ppo to train {core!r} on the same tasks with plain PPO)"
            )
        return META_FIELDS
    if algo == "multitask_ppo":
        return MULTITASK_FIELDS
    return None


def _meta_algo_fields() -> dict[str, Field]:
    # meta_ppo has two learning rates (meta.fast_lr, meta.slow_lr); a third, unused algo.lr would mislead.
    fields = _algo_fields()
    del fields["lr"]
    return fields


def _check_schedule(meta: dict[str, Any]) -> None:
    """The schedule's settings agree: a curriculum needs a criterion to advance, and a sampled schedule has
    none (they would be ignored silently: the tasks are drawn at random)."""
    no_criterion = meta["curriculum_frames"] is None and meta["curriculum_return"] is None
    if meta["task_schedule"] == "sample" and not no_criterion:
        given = [key for key in ("curriculum_frames", "curriculum_return") if meta[key] is not None]
        raise ConfigError(f"meta.{' and meta.'.join(given)} {'apply' if len(given) > 1 else 'applies'} only with "
                          "meta.task_schedule='curriculum'; this run draws its tasks at random (task_schedule "
                          "'sample'): set the schedule or remove them")
    if meta["task_schedule"] == "curriculum" and no_criterion:
        raise ConfigError("meta.task_schedule='curriculum' needs meta.curriculum_frames and/or "
                          "meta.curriculum_return to know when to move to the next task")


# Registration: config validation knows the algorithms and the section (agents.meta adds the update rules).
ALGO_FIELDS["meta_ppo"] = _meta_algo_fields()
ALGO_FIELDS["multitask_ppo"] = _algo_fields()
EXTRA_SECTIONS["meta"] = _meta_section
SECTION_CHECKS["meta"] = _check_schedule
