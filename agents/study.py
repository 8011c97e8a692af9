"""Studies: many seeds of several models, trained and evaluated as ordinary runs, with a resumable plan.

A study file (``configs/studies/*.yaml``) names models (a label, a train.py config file and
overrides), seeds, a training budget, the points during training at which to evaluate, the
evaluation envs and the episodes per env. ``python study.py run FILE`` turns it into one job
per (model, seed):

- training is ``python train.py --config C --run-dir studies/<study>/runs/<model>/seed_<s> seed=S
  total_frames=T ...`` (or ``python train.py --resume DIR`` for a run that has a checkpoint), so
  every run is an ordinary run with the files train.py writes;
- evaluation is ``python evaluate.py CHECKPOINT... --env ... --episodes N --seed E --json ...``
  on the numbered checkpoints train.py keeps (``checkpoints/checkpoint_<frames>.pt``; the study
  sets ``log.checkpoint_interval_frames`` to the greatest common divisor of the evaluation points
  and ``log.keep_checkpoints`` high enough that none of them is deleted). Each point's result is
  an evaluate.py JSON in ``<run_dir>/eval/point_<frames>.json``.

The study never copies train.py's or evaluate.py's logic; it runs them. Running a study again
skips finished work (a run whose last checkpoint reached the budget, an evaluation whose JSON
exists) and resumes interrupted runs with ``--resume``. Every run records its provenance (the git
commit, whether the tree was modified and a hash of the modification, a hash of its resolved
config) in ``<run_dir>/provenance.json``; a run whose resolved config no longer matches the study
is refused rather than continued.

A study file of ``kind: adaptation`` (``configs/studies/adaptation-*.yaml``) asks how fast
pre-trained models adapt to held-out tasks. Its ``models`` are pre-trained (``meta_ppo`` or
``multitask_ppo``, the same tasks and budget) as the jobs above, each then evaluated on its
training tasks (the pre-training return) and on the held-out tasks (the zero-shot return). Its
``finetune`` section lists fine-tuning runs: a pre-trained model's weights (``init_from``, a fresh
optimiser) trained on one held-out task by a rule, ``ppo`` (plain PPO on all parameters, the same
``finetune.ppo`` settings for every model) or ``meta`` (Meta-RIMs' own meta_ppo rule), or the same
architecture from random weights (``scratch: true``). Each fine-tuning run is one more ordinary
run directory under ``studies/<study>/finetune/<run>/<task>/seed_<s>``, started once its
pre-training run is done, skipped when finished and resumed when interrupted like every job.
``agents.adaptation`` turns them into the report.

This module imports no torch: a study file is checked (configs included, with ``agents.config``)
in about a second, before any work starts.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from agents.config import (ENV_FIELDS, PACKAGE_ROOT, SAME_ENV_OPTIONS, ConfigError, config_search_text, dotted_items,
                           load_config, load_written_yaml, locate_config, parse_yaml, yaml_file_problem, yaml_problem)
from agents.run_dir import (atomic_write, holds_run, is_foreign_lock, open_lock_file, os_error_text, script_as_started,
                            write_failure)
from policies.checkpoint import numbered_checkpoints
from envs.names import short_env_name, short_name_clash

try:
    import fcntl
except ImportError:  # Windows: no advisory lock on the study directory
    fcntl = None  # type: ignore[assignment]

# The repository root (agents.config defines it): train.py and evaluate.py are run from here.
REPO = PACKAGE_ROOT
DEFAULT_ROOT = Path("studies")
# evaluate.py's default: far from the small seeds training configs use (see README, Studies).
DEFAULT_EVAL_SEED = 10_000
EXECUTORS = ("local", "ray")
PROVENANCE_FILE = "provenance.json"
STOP_FILE = ".stop"
SESSIONS_FILE = "sessions.jsonl"  # one line per `study.py run` that ran something: when, where, how long
SESSION_HEARTBEAT_SECONDS = 60.0  # how often a running session renews its record (study_session)
# What a run executes: a change here changes the code version a run records.
CODE_PATHS = ("agents", "policies", "envs", "train.py", "evaluate.py")
CODE_SUFFIXES = (".py", ".c", ".h")  # the C kernel's source is code too
# Modules of CODE_PATHS that train.py and evaluate.py never import (tests/test_study.py checks; evaluate.py's
# --plot draws with agents.plots, which a study never asks for): the study runner and its report. Fixing a
# report between two sessions of a study must not split it into two versions (the report refuses to mix
# them); what they compute is rebuilt from the runs by `report`. The runner's choices that do shape a run
# (its command lines, the settings it adds: agents/study.py's study_overrides, eval_arguments) are
# recorded in each run's config hash and each evaluation's study_eval instead.
REPORT_ONLY_PATHS = ("agents/study.py", "agents/executors.py", "agents/report.py", "agents/plots.py",
                     "agents/adaptation.py")
STUDY_COPY = "study.yaml"
RUNS_FOLDER = "runs"  # <study dir>/runs/<model>/seed_<s>: made when the study's first run starts
# Config keys the study sets itself for every run; a model may not override them.
STUDY_KEYS = ("seed", "total_frames", "log.checkpoint_interval_frames", "log.keep_checkpoints",
              "log.progress_bar", "torch_threads")
# Left out of the config hash: they differ between the runs of one model (seed) or do not change
# what is learned (the run's name, logging and checkpoint cadence, torch's thread count, the device: a run
# may move from a GPU to a CPU on resume). init_from's path holds the study directory and the seed, so only
# whether it is set is hashed (config_hash).
UNHASHED_KEYS = ("seed", "name", "log", "torch_threads", "device", "init_from")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_GIT_OBJECT_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# The adaptation measures' window in fine-tuning frames: 5 rollouts of 16 envs x 128 steps (the ppo rule),
# 20 of 16 x 32 (the meta configs' rule); and 640 steps per env, so that with episodes of at most 640
# steps every env has ended one (a success or a time-out) within the first window.
DEFAULT_WINDOW_FRAMES = 10_240


class StudyError(ValueError):
    """A study that cannot be run or reported as asked; the message says what and where."""


# -- the study file -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One model of a study: a label, a train.py config file and its overrides."""

    label: str
    config: Path
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalSpec:
    """What evaluate.py runs at each evaluation point.

    :param points: frames at which to evaluate during training (the budget is always added).
    :param suite: an evaluate.py suite (its held-out envs are held out), or None.
    :param suite_params: parameters of a parametric suite (``--suite-param``).
    :param envs: env ids (``--env``), when no suite is given.
    :param held_out: the names of the held-out envs (short names, e.g. ``DoorKey-6x6``).
    :param episodes: episodes per env at the intermediate points.
    :param final_episodes: episodes per env at the end of the budget.
    :param seed: evaluate.py's ``--seed``: the same for every run, so every model meets the same levels.
    :param deterministic: greedy actions instead of sampled ones.
    """

    points: tuple[int, ...]
    suite: str | None = None
    suite_params: tuple[tuple[str, Any], ...] = ()
    envs: tuple[str, ...] = ()
    held_out: tuple[str, ...] = ()
    episodes: int = 20
    final_episodes: int = 100
    seed: int = DEFAULT_EVAL_SEED
    deterministic: bool = False


@dataclass(frozen=True)
class ExecutorSpec:
    """Where the jobs run: ``local`` (a process pool here) or ``ray`` (a Ray cluster)."""

    name: str = "local"
    workers: int | None = None
    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0


@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tuning row of an adaptation study.

    :param label: the row's name (a directory name).
    :param source: the pre-trained model whose architecture (and, unless ``scratch``, weights) it uses.
    :param rule: ``ppo`` (plain PPO on all parameters, a fresh optimiser, the study's ``finetune.ppo``
        settings) or ``meta`` (the source's own meta_ppo rule, on the held-out task alone).
    :param scratch: start from random weights instead of the pre-trained ones.
    """

    label: str
    source: str
    rule: str = "ppo"
    scratch: bool = False


@dataclass(frozen=True)
class Question:
    """A question the report answers: does each row of ``x`` beat each row of ``y``?"""

    text: str
    x: tuple[str, ...]
    y: tuple[str, ...]


@dataclass(frozen=True)
class AdaptationSpec:
    """The ``finetune`` and ``pretrain`` sections of a ``kind: adaptation`` study.

    :param train_tasks: the pre-training tasks (env ids), the same for every model.
    :param tasks: the held-out fine-tuning tasks (env ids); one fine-tuning run per task.
    :param total_frames: the fine-tuning budget of every run.
    :param threshold: the windowed return whose first crossing times the adaptation.
    :param criterion: the return on the training tasks a pre-trained model must reach (else it is flagged).
    :param episodes: evaluation episodes per env at the end of pre-training (training tasks and zero-shot).
    :param ppo: the plain-PPO rule as ``algo.<key>=<value>`` overrides (after ``algo.name=ppo``).
    :param overrides: for every fine-tuning run (env settings such as ``env.n_envs``).
    :param runs: the fine-tuning rows.
    :param questions: what the report answers with probabilities of improvement.
    :param window_frames: the measures' window (``agents.adaptation.window_curve``): the same for every
        rule, so that rows with short rollouts (the meta rule's) are not measured on noisier points.
    """

    train_tasks: tuple[str, ...]
    tasks: tuple[str, ...]
    total_frames: int
    threshold: float
    criterion: float
    episodes: int
    ppo: tuple[str, ...]
    overrides: tuple[str, ...]
    runs: tuple[FinetuneRun, ...]
    questions: tuple[Question, ...] = ()
    window_frames: int = DEFAULT_WINDOW_FRAMES

    def run(self, label: str) -> FinetuneRun:
        """The fine-tuning row with this label."""
        for item in self.runs:
            if item.label == label:
                return item
        raise StudyError(f"no fine-tuning run {label!r} (runs: {', '.join(r.label for r in self.runs)})")


@dataclass(frozen=True)
class Study:
    """A parsed, checked study file (``adaptation`` is set for ``kind: adaptation``)."""

    name: str
    description: str
    models: tuple[ModelSpec, ...]
    seeds: tuple[int, ...]
    total_frames: int
    eval: EvalSpec
    executor: ExecutorSpec
    overrides: tuple[str, ...] = ()
    source: Path | None = None
    adaptation: AdaptationSpec | None = None

    @property
    def points(self) -> tuple[int, ...]:
        """Every evaluation point, the end of the budget included, ascending."""
        return tuple(sorted({*self.eval.points, self.total_frames}))

    def model(self, label: str) -> ModelSpec:
        """The model with this label."""
        for model in self.models:
            if model.label == label:
                return model
        known = ", ".join(m.label for m in self.models)
        raise StudyError(f"study {self.name} has no model {label!r} (models: {known})")


TOP_KEYS = {"name", "kind", "description", "models", "seeds", "total_frames", "budget", "eval", "executor",
            "overrides"}
ADAPTATION_TOP_KEYS = (TOP_KEYS - {"eval"}) | {"pretrain", "finetune", "questions"}
PRETRAIN_KEYS = {"criterion", "episodes", "eval_seed"}
FINETUNE_KEYS = {"tasks", "total_frames", "threshold", "ppo", "overrides", "runs", "window_frames"}
FINETUNE_RUN_KEYS = {"label", "from", "rule", "scratch"}
QUESTION_KEYS = {"text", "x", "y"}
KINDS = ("training", "adaptation")
# What a fine-tuning run's overrides may not set: the study sets them (or, for algo/meta, the rule does).
FINETUNE_RESERVED = (*STUDY_KEYS, "init_from", "env.id")
# The env settings finetune.overrides may give: how many envs and how they are stepped, not what the task is.
FINETUNE_ENV_KEYS = ("env.n_envs", "env.vec_env", "env.backend")
# Settings that make a variant of a task (SAME_ENV_OPTIONS, which evaluate.py applies only on the training env
# itself, outside a suite): a fine-tuning run does not inherit them from its model's pre-training overrides, so it
# trains on the held-out task as its id makes it, the task its zero-shot return was measured on.
TASK_VARIANT_KEYS = tuple(f"env.{key}" for key in SAME_ENV_OPTIONS)


def _sets_a_task_variant(override: str) -> bool:
    """Whether a ``key=value`` override sets a ``TASK_VARIANT_KEYS`` setting (or a key inside one)."""
    key = override.partition("=")[0].strip()
    return any(key == k or key.startswith(f"{k}.") for k in TASK_VARIANT_KEYS)


MODEL_KEYS = {"label", "config", "overrides"}
EVAL_KEYS = {"points", "suite", "suite_params", "envs", "episodes", "final_episodes", "seed", "deterministic"}
ENV_KEYS = {"id", "held_out"}
EXECUTOR_KEYS = {"name", "workers", "address", "cpus_per_run", "gpus_per_run"}
BUDGET_KEYS = {"total_frames"}


def _count(n: int, noun: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _where(path: Path | None) -> str:
    return f"{path}: " if path is not None else ""


def _unknown(keys: Any, allowed: set[str], section: str, path: Path | None) -> None:
    unknown = sorted(set(keys) - allowed)
    if unknown:
        raise StudyError(f"{_where(path)}unknown key {section}{unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _int(value: Any, what: str, path: Path | None, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StudyError(f"{_where(path)}{what} must be an integer >= {minimum}, got {value!r}")
    return value


MAX_STUDY_SEEDS = 10_000  # in one range: more is a typo (1-100000000), not a study


def parse_seeds(value: Any, path: Path | None = None) -> tuple[int, ...]:
    """Seeds from a study file: a list of ints and ``"a-b"`` ranges, or one such string (``"1-10"``)."""
    items = value if isinstance(value, list) else [value]
    seeds: list[int] = []
    for item in items:
        if isinstance(item, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", item):
            first, last = (int(part) for part in item.split("-"))
            if last < first:
                raise StudyError(f"{_where(path)}seeds: empty range {item!r}")
            if last - first >= MAX_STUDY_SEEDS or last >= 2**32:
                raise StudyError(f"{_where(path)}seeds: range {item!r} is longer than {MAX_STUDY_SEEDS:,} seeds "
                                 "or ends beyond 2**32 - 1")
            seeds.extend(range(first, last + 1))
        elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item < 2**32:
            seeds.append(item)
        elif item is None and value is None:
            break
        else:
            raise StudyError(f"{_where(path)}seeds: {item!r} is not a seed (an integer in [0, 2**32)) or a range 'a-b'")
    if not seeds:
        raise StudyError(f"{_where(path)}seeds is empty: list at least one seed (e.g. seeds: 1-10)")
    repeated = sorted(s for s, n in collections.Counter(seeds).items() if n > 1)
    if repeated:
        raise StudyError(f"{_where(path)}seeds: seed {repeated[0]} is listed twice")
    return tuple(seeds)


def _overrides(value: Any, what: str, path: Path | None) -> tuple[str, ...]:
    """Overrides as ``key=value`` strings, from a mapping or a list of strings."""
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(f"{key}={json.dumps(item)}" for key, item in value.items())  # JSON is YAML
    if isinstance(value, list) and all(isinstance(item, str) and "=" in item for item in value):
        return tuple(value)
    raise StudyError(f"{_where(path)}{what} must be a mapping (key: value) or a list of 'key=value' strings")


def _resolve_config_path(text: Any, path: Path | None, package_relative: bool = False) -> Path:
    """The config file a study names: absolute, or relative to the working directory, the package root or the
    study file; a study directory's copy (``package_relative``) names it relative to the package root only."""
    if not isinstance(text, str) or not text:
        raise StudyError(f"{_where(path)}a model's config must be a file path, got {text!r}")
    if Path(text).is_absolute():
        candidates = [Path(text)]
    elif package_relative:
        candidates = [REPO / text]
    else:
        candidates = [Path.cwd() / text, REPO / text] + ([path.parent / text] if path is not None else [])
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked = ", ".join(dict.fromkeys(map(str, candidates)))  # once each: the working directory may be the root
    raise StudyError(f"{_where(path)}config file not found: {text} (looked for {looked})")


def _new_label(label: Any, field: str, taken: list[str], what: str, path: Path | None) -> str:
    """``label`` if it can name a directory and is not in ``taken``; else a StudyError naming ``field``."""
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise StudyError(f"{_where(path)}{field} must be a plain name (letters, digits, '_', '.', '+', '-'; "
                         f"it names a directory), got {label!r}")
    if label in taken:
        raise StudyError(f"{_where(path)}{what} label {label!r} is used twice; each {what} needs its own label")
    return label


def parse_study(raw: Any, path: Path | None = None, check_envs: bool = True, package_relative: bool = False) -> Study:
    """Check a study file's contents and return the Study, or raise StudyError naming the first problem.

    Every model's config is resolved with its overrides and the study's own settings (as train.py
    would, ``agents.config.load_config``), so a mistyped key fails here, before any work starts.

    :param raw: the parsed YAML.
    :param path: the file it came from (for messages and relative config paths).
    :param check_envs: also check the evaluation env ids / suite (imports gymnasium: about a second).
    :param package_relative: relative config paths are relative to the package root only (a study
        directory's copy, which must not pick up a same-named file in the working directory).
    """
    if not isinstance(raw, dict):
        raise StudyError(f"{_where(path)}a study file must be a YAML mapping (name, models, seeds, ...)")
    if "models" not in raw and {"core", "algo", "env"} & set(raw):
        where = path if path is not None else "<file>"
        raise StudyError(f"{_where(path)}this is a training config, not a study file (it has no models): train it "
                         f"with `python train.py --config {where}`, or name it as a model's config in a study file")
    kind = raw.get("kind", "training")
    if kind not in KINDS:
        raise StudyError(f"{_where(path)}kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "adaptation" and "eval" in raw:
        raise StudyError(f"{_where(path)}an adaptation study has no eval section: it evaluates every pre-trained "
                         "model on its training tasks and the fine-tuning tasks (pretrain.episodes)")
    _unknown(raw, ADAPTATION_TOP_KEYS if kind == "adaptation" else TOP_KEYS, "", path)
    name = raw.get("name")
    if not isinstance(name, str) or not _LABEL.fullmatch(name):
        raise StudyError(f"{_where(path)}name must be a plain name (letters, digits, '_', '.', '+', '-'), got {name!r}")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise StudyError(f"{_where(path)}description must be text")

    if "budget" in raw and "total_frames" in raw:
        raise StudyError(f"{_where(path)}give the budget once: total_frames or budget.total_frames")
    budget = raw.get("budget", {"total_frames": raw.get("total_frames")})
    if not isinstance(budget, dict):
        raise StudyError(f"{_where(path)}budget must be a mapping with total_frames")
    _unknown(budget, BUDGET_KEYS, "budget.", path)
    total_frames = _int(budget.get("total_frames"), "total_frames", path)

    seeds = parse_seeds(raw.get("seeds"), path)
    common = _overrides(raw.get("overrides"), "overrides", path)

    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise StudyError(f"{_where(path)}models must be a non-empty list of {{label, config, overrides}}")
    models: list[ModelSpec] = []
    for index, item in enumerate(models_raw):
        if not isinstance(item, dict):
            raise StudyError(f"{_where(path)}models[{index}] must be a mapping with label and config")
        _unknown(item, MODEL_KEYS, f"models[{index}].", path)
        label = _new_label(item.get("label"), f"models[{index}].label", [m.label for m in models], "model", path)
        config = _resolve_config_path(item.get("config"), path, package_relative)
        overrides = _overrides(item.get("overrides"), f"models[{index}].overrides", path)
        for text in (*overrides, *common):
            key = text.partition("=")[0].strip()
            if key in STUDY_KEYS:
                raise StudyError(f"{_where(path)}model {label}: {key} is set by the study "
                                 f"(seeds, total_frames, eval points), not by overrides")
        models.append(ModelSpec(label, config, overrides))

    adaptation = None
    if kind == "adaptation":
        adaptation, evaluation = _parse_adaptation(raw, models, common, path)
    else:
        evaluation = _parse_eval(raw.get("eval"), total_frames, path)
    if evaluation.seed in seeds:
        # Evaluation episode i and training env i of run `seed` would both take child i of SeedSequence(seed).
        raise StudyError(f"{_where(path)}eval.seed {evaluation.seed} is also a training seed: its evaluation "
                         f"levels would be that run's training levels; pick one outside seeds (default "
                         f"{DEFAULT_EVAL_SEED})")
    executor = _parse_executor(raw.get("executor"), path)
    study = Study(name, description, tuple(models), seeds, total_frames, evaluation, executor, common, path,
                  adaptation)
    for model in study.models:  # every config, as train.py will resolve it
        try:
            resolved_config(study, model, study.seeds[0])
        except ConfigError as exc:
            raise StudyError(f"{_where(path)}model {model.label} ({model.config}): {exc}") from None
    if adaptation is not None:
        _check_finetune_configs(study)
    if check_envs:
        eval_envs(study)
    return study


def _number(value: Any, what: str, path: Path | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StudyError(f"{_where(path)}{what} must be a number, got {value!r}")
    return float(value)


def _task_ids(config: dict[str, Any], label: str, path: Path | None) -> tuple[str, ...]:
    """A pre-training model's tasks as env ids (evaluate.py runs env ids with their default options)."""
    meta = config.get("meta") or {}
    if meta.get("suite") is not None or not meta.get("tasks"):
        raise StudyError(f"{_where(path)}model {label}: an adaptation study needs meta.tasks as a list of env ids "
                         "(not meta.suite), so that every model provably trains on the same tasks")
    ids = []
    for entry in meta["tasks"]:
        if isinstance(entry, dict):
            if set(entry) - {"id", "name"}:
                raise StudyError(f"{_where(path)}model {label}: task {entry['id']} sets env options "
                                 f"({', '.join(sorted(set(entry) - {'id', 'name'}))}); the study evaluates env ids "
                                 "with their default options, so list plain env ids")
            entry = entry["id"]
        ids.append(entry)
    return tuple(ids)


def _parse_adaptation(raw: dict[str, Any], models: list[ModelSpec], common: tuple[str, ...],
                      path: Path | None) -> tuple[AdaptationSpec, EvalSpec]:
    """The ``pretrain``, ``finetune`` and ``questions`` sections, and the evaluation at the end of pre-training."""
    pretrain = raw.get("pretrain") or {}
    if not isinstance(pretrain, dict):
        raise StudyError(f"{_where(path)}pretrain must be a mapping (criterion, episodes, eval_seed)")
    _unknown(pretrain, PRETRAIN_KEYS, "pretrain.", path)
    criterion = _number(pretrain.get("criterion", 0.5), "pretrain.criterion", path)
    episodes = _int(pretrain.get("episodes", 50), "pretrain.episodes", path)
    eval_seed = _int(pretrain.get("eval_seed", DEFAULT_EVAL_SEED), "pretrain.eval_seed", path, minimum=0)

    train_tasks: tuple[str, ...] | None = None
    for model in models:
        try:
            config = load_config(model.config, [*common, *model.overrides])
        except ConfigError as exc:
            raise StudyError(f"{_where(path)}model {model.label} ({model.config}): {exc}") from None
        if config["algo"]["name"] not in ("meta_ppo", "multitask_ppo"):
            raise StudyError(f"{_where(path)}model {model.label}: pre-training needs algo.name meta_ppo or "
                             f"multitask_ppo (a task distribution), got {config['algo']['name']!r}")
        tasks = _task_ids(config, model.label, path)
        if train_tasks is not None and tasks != train_tasks:
            raise StudyError(f"{_where(path)}model {model.label} trains on {', '.join(tasks)}, model "
                             f"{models[0].label} on {', '.join(train_tasks)}: every model must pre-train on the "
                             "same tasks")
        train_tasks = tasks
    assert train_tasks is not None  # models is non-empty

    section = raw.get("finetune")
    if not isinstance(section, dict):
        raise StudyError(f"{_where(path)}finetune must be a mapping (tasks, total_frames, threshold, ppo, "
                         "overrides, runs)")
    _unknown(section, FINETUNE_KEYS, "finetune.", path)
    tasks_raw = section.get("tasks")
    if isinstance(tasks_raw, str):
        tasks_raw = [tasks_raw]
    if not isinstance(tasks_raw, list) or not tasks_raw or not all(isinstance(t, str) for t in tasks_raw):
        raise StudyError(f"{_where(path)}finetune.tasks must be a non-empty list of env ids (the held-out tasks)")
    if len(set(tasks_raw)) < len(tasks_raw):
        raise StudyError(f"{_where(path)}finetune.tasks lists a task twice")
    seen = [t for t in tasks_raw if t in train_tasks]
    if seen:
        raise StudyError(f"{_where(path)}finetune.tasks: {seen[0]} is a pre-training task; fine-tuning tasks must "
                         "be held out")
    _check_short_names([*train_tasks, *tasks_raw], "the pre-training and fine-tuning tasks", path)
    frames = _int(section.get("total_frames"), "finetune.total_frames", path)
    threshold = _number(section.get("threshold"), "finetune.threshold", path)
    window = _int(section.get("window_frames", DEFAULT_WINDOW_FRAMES), "finetune.window_frames", path)
    if window > frames:
        raise StudyError(f"{_where(path)}finetune.window_frames ({window:,}) is longer than the fine-tuning budget "
                         f"({frames:,})")
    ppo_raw = section.get("ppo") or {}
    if not isinstance(ppo_raw, dict):
        raise StudyError(f"{_where(path)}finetune.ppo must be a mapping of algo settings (lr, n_steps, ...)")
    if "name" in ppo_raw:
        raise StudyError(f"{_where(path)}finetune.ppo: name is set by the rule (ppo)")
    ppo = tuple(f"algo.{key}={json.dumps(value)}" for key, value in ppo_raw.items())
    overrides = _overrides(section.get("overrides"), "finetune.overrides", path)
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key in FINETUNE_RESERVED or key.split(".")[0] in ("algo", "meta", "log"):
            raise StudyError(f"{_where(path)}finetune.overrides: {key} is set by the study or the rule "
                             "(algo settings of the ppo rule go in finetune.ppo)")
        if key.split(".")[0] == "env" and key not in FINETUNE_ENV_KEYS:
            # The zero-shot return is measured on the task as its id makes it: a fine-tuning run on another
            # variant (other env_kwargs, step limit, levels) would be reported beside it as the same task.
            raise StudyError(f"{_where(path)}finetune.overrides: {key} would change the held-out task itself, "
                             f"which the zero-shot evaluation runs as its id makes it; only "
                             f"{', '.join(FINETUNE_ENV_KEYS)} may change (how the envs are run)")

    runs_raw = section.get("runs")
    if not isinstance(runs_raw, list) or not runs_raw:
        raise StudyError(f"{_where(path)}finetune.runs must be a non-empty list of {{label, from, rule, scratch}}")
    labels = {m.label for m in models}
    runs: list[FinetuneRun] = []
    for index, item in enumerate(runs_raw):
        if not isinstance(item, dict):
            raise StudyError(f"{_where(path)}finetune.runs[{index}] must be a mapping with label, from and rule")
        _unknown(item, FINETUNE_RUN_KEYS, f"finetune.runs[{index}].", path)
        label = _new_label(item.get("label"), f"finetune.runs[{index}].label", [r.label for r in runs],
                           "fine-tuning run", path)
        source = item.get("from")
        if not isinstance(source, str) or source not in labels:
            raise StudyError(f"{_where(path)}finetune.runs[{index}].from must be a model label "
                             f"({', '.join(sorted(labels))}), got {source!r}")
        rule = item.get("rule", "ppo")
        if rule not in ("ppo", "meta"):
            raise StudyError(f"{_where(path)}finetune.runs[{index}].rule must be ppo or meta, got {rule!r}")
        scratch = item.get("scratch", False)
        if not isinstance(scratch, bool):
            raise StudyError(f"{_where(path)}finetune.runs[{index}].scratch must be true or false")
        runs.append(FinetuneRun(label, source, rule, scratch))

    questions: list[Question] = []
    questions_raw = raw.get("questions") or []
    if not isinstance(questions_raw, list):
        raise StudyError(f"{_where(path)}questions must be a list of {{text, x, y}}")
    run_labels = [r.label for r in runs]
    for index, item in enumerate(questions_raw):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise StudyError(f"{_where(path)}questions[{index}] must be a mapping with text, x and y")
        _unknown(item, QUESTION_KEYS, f"questions[{index}].", path)
        sides = []
        for side in ("x", "y"):
            value = item.get(side)
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not value or any(v not in run_labels for v in value):
                raise StudyError(f"{_where(path)}questions[{index}].{side} must list fine-tuning run labels "
                                 f"({', '.join(run_labels)}), got {item.get(side)!r}")
            sides.append(tuple(value))
        questions.append(Question(item["text"], sides[0], sides[1]))

    spec = AdaptationSpec(train_tasks, tuple(tasks_raw), frames, threshold, criterion, episodes, ppo, overrides,
                          tuple(runs), tuple(questions), window)
    # Pre-training runs are evaluated once, at the end: on the training tasks (the pre-training return)
    # and on the held-out tasks before any update (the zero-shot return), with the same episodes.
    evaluation = EvalSpec(points=(), envs=(*train_tasks, *tasks_raw),
                          held_out=tuple(short_env_name(t) for t in tasks_raw), episodes=episodes,
                          final_episodes=episodes, seed=eval_seed)
    return spec, evaluation


def _check_short_names(env_ids: Sequence[str], what: str, path: Path | None) -> None:
    """Refuse two env ids with one short name (``MiniGrid-Unlock-v0`` and ``BabyAI-Unlock-v0``, or ``-v0`` and
    ``-v1``): a study keys its evaluation results, run folders and report columns by it, so the second env's
    results would be filed as the first's."""
    clash = short_name_clash(env_ids)
    if clash is not None:
        first, env_id = clash
        raise StudyError(f"{_where(path)}{what}: {first} and {env_id} have the same short name "
                         f"{short_env_name(env_id)!r}, which keys a study's results; a study cannot hold both")


def _parse_eval(raw: Any, total_frames: int, path: Path | None) -> EvalSpec:
    if not isinstance(raw, dict):
        raise StudyError(f"{_where(path)}eval must be a mapping (points, envs or suite, episodes, final_episodes)")
    _unknown(raw, EVAL_KEYS, "eval.", path)
    points_raw = raw.get("points") or []
    if not isinstance(points_raw, list):
        raise StudyError(f"{_where(path)}eval.points must be a list of frame counts")
    points = tuple(sorted({_int(p, f"eval.points[{index}]", path) for index, p in enumerate(points_raw)}))
    if points and points[-1] > total_frames:
        raise StudyError(f"{_where(path)}eval.points: {points[-1]} is beyond total_frames {total_frames}")
    suite, envs_raw = raw.get("suite"), raw.get("envs")
    if (suite is None) == (envs_raw is None):
        raise StudyError(f"{_where(path)}eval needs exactly one of suite (an evaluate.py suite) or envs (env ids)")
    envs: list[str] = []
    held_out: list[str] = []
    if envs_raw is not None:
        if not isinstance(envs_raw, list) or not envs_raw:
            raise StudyError(f"{_where(path)}eval.envs must be a non-empty list of {{id, held_out}}")
        for index, item in enumerate(envs_raw):
            if isinstance(item, str):
                item = {"id": item, "held_out": True}
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                raise StudyError(f"{_where(path)}eval.envs[{index}] must be an env id or {{id: ..., held_out: ...}}")
            _unknown(item, ENV_KEYS, f"eval.envs[{index}].", path)
            if not isinstance(item.get("held_out", True), bool):
                raise StudyError(f"{_where(path)}eval.envs[{index}].held_out must be true or false")
            if item["id"] in envs:
                raise StudyError(f"{_where(path)}eval.envs: {item['id']} is listed twice")
            envs.append(item["id"])
            if item.get("held_out", True):
                held_out.append(short_env_name(item["id"]))
        if not held_out:
            raise StudyError(f"{_where(path)}eval.envs: mark at least one env held_out: true")
        _check_short_names(envs, "eval.envs", path)
    elif not isinstance(suite, str):
        raise StudyError(f"{_where(path)}eval.suite must be a suite name (python evaluate.py --list-suites)")
    params = raw.get("suite_params") or {}
    if not isinstance(params, dict) or (params and suite is None):
        raise StudyError(f"{_where(path)}eval.suite_params must be a mapping, and needs eval.suite")
    episodes = _int(raw.get("episodes", 20), "eval.episodes", path)
    final_episodes = _int(raw.get("final_episodes", 100), "eval.final_episodes", path)
    seed = _int(raw.get("seed", DEFAULT_EVAL_SEED), "eval.seed", path, minimum=0)
    deterministic = raw.get("deterministic", False)
    if not isinstance(deterministic, bool):
        raise StudyError(f"{_where(path)}eval.deterministic must be true or false")
    return EvalSpec(points, suite, tuple(sorted(params.items())), tuple(envs), tuple(held_out), episodes,
                    final_episodes, seed, deterministic)


def _parse_executor(raw: Any, path: Path | None) -> ExecutorSpec:
    if raw is None:
        return ExecutorSpec()
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise StudyError(f"{_where(path)}executor must be a mapping "
                         "(name, workers, address, cpus_per_run, gpus_per_run)")
    _unknown(raw, EXECUTOR_KEYS, "executor.", path)
    name = raw.get("name", "local")
    check_executor(name, path)
    workers = raw.get("workers")
    if workers is not None:
        _int(workers, "executor.workers", path)
    address = raw.get("address")
    if address is not None and not isinstance(address, str):
        raise StudyError(f"{_where(path)}executor.address must be text (an address or 'auto')")
    resources = {}
    for key, default in (("cpus_per_run", 1.0), ("gpus_per_run", 0.0)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                (key == "cpus_per_run" and value == 0):
            bound = "> 0" if key == "cpus_per_run" else ">= 0"
            raise StudyError(f"{_where(path)}executor.{key} must be a number {bound}")
        resources[key] = float(value)
    return ExecutorSpec(name, workers, address, resources["cpus_per_run"], resources["gpus_per_run"])


def check_executor(name: Any, path: Path | None = None) -> None:
    """Raise StudyError for an executor name other than ``local`` or ``ray``."""
    if name not in EXECUTORS:
        raise StudyError(f"{_where(path)}unknown executor {name!r} (executors: {', '.join(EXECUTORS)})")


def load_study(path: str | Path, check_envs: bool = True, package_relative: bool = False) -> Study:
    """Read and check a study file (see :func:`parse_study`; ``package_relative`` for a study directory's copy).

    A relative path not found here that names one of the package's own files (``configs/studies/...``) is that
    file, as train.py's ``--config`` finds shipped configs from any directory."""
    path = Path(path) if package_relative else locate_config(path)
    problem = yaml_file_problem(path, "study file")
    if problem is not None:
        raise StudyError(problem)
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    except UnicodeDecodeError:
        raise StudyError(f"{path}: not a text file (not UTF-8); give a study's YAML file") from None
    return parse_study(raw, path, check_envs=check_envs, package_relative=package_relative)


def eval_envs(study: Study) -> list[tuple[str, bool]]:
    """The evaluation envs as ``(name, held_out)``, in evaluate.py's order; checks ids and suites.

    :raises StudyError: an unknown env id or suite, or suite parameters it does not take.
    """
    spec = study.eval
    targets = _eval_targets(study)
    if spec.suite is not None:
        return [(t.name, t.split == "held-out") for t in targets]
    return [(t.name, t.name in spec.held_out) for t in targets]


def _eval_targets(study: Study) -> list[Any]:
    """The study's evaluation targets (``agents.evaluation.EvalTarget``), in evaluate.py's order.

    :raises StudyError: an unknown env id or suite, or suite parameters it does not take.
    """
    from agents.evaluation import EvaluationError, resolve_targets  # gymnasium: about a second

    spec = study.eval
    try:
        return resolve_targets(spec.suite, list(spec.envs) or None, dict(spec.suite_params)) or []
    except EvaluationError as exc:
        raise StudyError(f"{_where(study.source)}eval: {exc}") from None


# -- runs: directories, configs, provenance --------------------------------------------------------


def study_dir(name_or_path: str | Path, root: str | Path = DEFAULT_ROOT) -> Path:
    """The output directory of a study: ``root/<name>``, or the given directory / study file's study (a study
    directory's own ``study.yaml`` names that directory, whatever ``root`` is)."""
    text = str(name_or_path)
    candidate = Path(text)
    if candidate.is_dir() and (candidate / STUDY_COPY).is_file():
        return candidate
    if candidate.name == STUDY_COPY and candidate.is_file() and (candidate.parent / RUNS_FOLDER).is_dir():
        return candidate.parent  # a study directory's own copy of its file names that study, wherever it is
    if candidate.suffix in (".yaml", ".yml") and locate_config(candidate).is_file():
        return Path(root) / load_study(candidate, check_envs=False).name
    if candidate.suffix in (".yaml", ".yml") and not locate_config(candidate).exists():
        where = "" if candidate.is_absolute() else f" (looked in {config_search_text()})"
        raise StudyError(f"study file not found: {text}{where}")
    if not _LABEL.fullmatch(text):
        raise StudyError(f"{text!r} is neither a study name, a study directory nor a study file")
    return Path(root) / text


def run_dir(root: Path, model: str, seed: int) -> Path:
    """``<study dir>/runs/<model>/seed_<seed>``."""
    return root / RUNS_FOLDER / model / f"seed_{seed}"


def checkpoint_interval(study: Study) -> int:
    """The greatest common divisor of the evaluation points: train.py saves a checkpoint at each multiple.

    An adaptation study evaluates its pre-training runs only at the end (train.py always checkpoints
    there), so they checkpoint every quarter of the budget: a killed run loses at most that much.
    """
    if study.adaptation is not None:
        return math.ceil(study.total_frames / 4)
    return math.gcd(*study.points)


def keep_checkpoints(study: Study) -> int:
    """Numbered checkpoints to keep: every one the interval makes, plus room for stops and resumes."""
    return study.total_frames // checkpoint_interval(study) + 1 + 1000


def study_overrides(study: Study, seed: int) -> list[str]:
    """The settings the study gives every run (after the model's own overrides, so they win)."""
    return [f"seed={seed}", f"total_frames={study.total_frames}",
            f"log.checkpoint_interval_frames={checkpoint_interval(study)}",
            f"log.keep_checkpoints={keep_checkpoints(study)}", "log.progress_bar=false", "torch_threads=1"]


def resolved_config(study: Study, model: ModelSpec, seed: int) -> dict[str, Any]:
    """The config train.py will resolve for this run (raises ConfigError as train.py would).

    Precedence, lowest first: the model's config file, the study's ``overrides`` (for every model),
    the model's own ``overrides``, then the study's settings (``study_overrides``).
    """
    return load_config(model.config, [*study.overrides, *model.overrides, *study_overrides(study, seed)])


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of a resolved config without the keys that differ between a model's runs (``UNHASHED_KEYS``).

    Whether ``init_from`` is set is hashed (not its path): a fine-tuning row switched between
    pre-trained and random weights under the same label must not pass for the finished run of the other.
    A config without ``init_from`` hashes as before the key existed.
    """
    kept = {key: value for key, value in config.items() if key not in UNHASHED_KEYS}
    if config.get("init_from"):
        kept["init_from"] = True
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def code_version(repo: Path = REPO) -> dict[str, Any]:
    """The git commit of ``repo``, whether the code differs from it, and a hash of the code itself.

    ``code_sha256`` hashes the files of the code a run executes (``CODE_PATHS``: the packages,
    train.py and evaluate.py, less the study runner and report, ``REPORT_ONLY_PATHS``; not tests,
    docs or configs, whose effect the config hash covers) as
    they are on disk; it is what :func:`version_tag` groups runs by, so a study continued after a
    commit that did not touch that code (or that committed it as it ran) stays one version.
    ``diff_sha256`` hashes ``git diff HEAD`` over the same paths. Outside a git checkout the commit
    is None. ``$MODULAR_RL_CODE_VERSION``, when set, is recorded instead (an install without git
    history, a release tag).
    """
    configured = os.environ.get("MODULAR_RL_CODE_VERSION")
    if configured:
        return {"commit": configured, "dirty": False, "diff_sha256": None}
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "diff_sha256": None, "code_sha256": None}
    excluded = [f":(exclude){path}" for path in REPORT_ONLY_PATHS]
    diff = git("diff", "HEAD", "--", *CODE_PATHS, *excluded) or ""
    # The code itself, as it is on disk (CODE_PATHS' files that git tracks or would track), so a
    # commit that touches only docs, tests or configs, or that commits the code as it ran, is the same version.
    listed = git("ls-files", "--cached", "--others", "--exclude-standard", "--", *CODE_PATHS, *excluded)
    if listed is None:  # git failed: hashing no files would give every such session the same bogus version
        return {"commit": commit.strip(), "dirty": None, "diff_sha256": None, "code_sha256": None}
    # Source files only: an editor's swap file or a stray note is not code.
    files = sorted({name for name in listed.splitlines() if name.endswith(CODE_SUFFIXES)})
    code = hashlib.sha256()
    for name in files:
        try:
            code.update(name.encode() + b"\0" + (repo / name).read_bytes() + b"\0")
        except OSError:  # deleted in the working tree: its absence is part of the version
            code.update(name.encode() + b"\0deleted\0")
    return {"commit": commit.strip(), "dirty": bool(diff),
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
            "code_sha256": code.hexdigest()}


def short_commit(commit: str) -> str:
    """A recorded ``commit`` as reports show it: a git object name (40 or 64 hex digits) cut to 10, any
    other value (``$MODULAR_RL_CODE_VERSION``'s) whole."""
    return commit[:10] if _GIT_OBJECT_NAME.fullmatch(commit) else commit


def version_tag(version: dict[str, Any]) -> str:
    """``code.<hash>`` of the code a run executed (``unknown`` outside git).

    Provenance written before the code hash existed is tagged by its commit, cut to 10 hex digits
    (``abc1234567``, or ``abc1234567+dirty.<hash>``). A ``$MODULAR_RL_CODE_VERSION`` value is used as
    it is, whole: it is a name someone chose (a release tag), and cutting it could merge two
    versions that differ only after the 10th character (``release-2026-01`` and ``release-2026-02``).
    """
    if version.get("code_sha256"):
        return f"code.{version['code_sha256'][:10]}"
    commit = version.get("commit")
    if not commit:
        return "unknown"
    tag = short_commit(commit)
    if version.get("dirty"):
        tag += f"+dirty.{(version.get('diff_sha256') or '')[:8]}"
    return tag


def read_json(path: Path) -> Any:
    """A JSON file's contents, or None if it is missing or unreadable (a partial write never is: writes are atomic)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_provenance(directory: Path) -> dict[str, Any] | None:
    """A run directory's ``provenance.json``, or None."""
    data = read_json(directory / PROVENANCE_FILE)
    return data if isinstance(data, dict) else None


def record_session(directory: Path, step: str, config_sha256: str, version: dict[str, Any]) -> None:
    """Append this session (train or eval step, code version) to the run's provenance.json."""
    data = read_provenance(directory) or {"config_sha256": config_sha256, "sessions": []}
    data.setdefault("sessions", []).append({"step": step, **version, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / PROVENANCE_FILE, (json.dumps(data, indent=2) + "\n").encode())


def code_versions(provenance: dict[str, Any] | None) -> list[str]:
    """The distinct code versions (``version_tag``) that trained or evaluated a run, in order of first use."""
    tags = [version_tag(s) for s in (provenance or {}).get("sessions", [])]
    return list(dict.fromkeys(tags))


def check_eval_spaces(study: Study, jobs: Sequence[Job]) -> None:
    """Refuse an evaluation env that does not fit a model (another observation or action space) before
    any run trains: evaluate.py would refuse it only once the model is trained, hours later. An env
    this process cannot build (a dependency only the workers have) is left to evaluate.py, with a note.
    In an adaptation study the envs checked are the fine-tuning tasks (also the zero-shot evaluation's).

    :raises StudyError: naming the model, the env and both spaces.
    """
    from agents.config import check_frame_stack, env_options
    from agents.evaluation import target_options
    from agents.meta_config import task_specs
    from envs import check_env_id, env_family, env_spaces

    targets = _eval_targets(study)
    known: dict[str, tuple[Any, Any] | None] = {}

    def spaces(env_id: str, options: dict[str, Any]) -> tuple[Any, Any] | None:
        key = f"{env_id} {sorted(options.items())!r}"
        if key not in known:
            try:
                known[key] = env_spaces(env_id, options)
            except Exception as exc:  # noqa: BLE001 - not this study's fault: the workers may have what we lack
                print(f"note: cannot build {env_id} here to check its spaces ({type(exc).__name__}: {exc}); "
                      "evaluate.py checks them after training", file=sys.stderr)
                known[key] = None
        return known[key]

    if study.adaptation is not None:
        if jobs:
            _check_finetune_spaces(study, spaces)
        return
    checked: set[str] = set()
    for job in jobs:
        if job.model in checked:  # a model's env options are those of every seed
            continue
        checked.add(job.model)
        try:
            config = load_config(job.config, list(job.overrides))
            env = config["env"]
            check_frame_stack(env)
        except ConfigError as exc:
            raise StudyError(f"model {job.model}: {exc}") from None
        if env_family(env["id"]) == "minigrid":
            # minigrid is this package's own dependency, so an id it lacks is a typo here and on every worker
            # (an env of another family may be registered only where the runs go: left to train.py there).
            try:
                check_env_id(env["id"])
            except ValueError as exc:
                raise StudyError(f"{_where(study.source)}model {job.model}: {exc}") from None
        trained = env_options(env)
        # An eval.envs entry is an id alone (a suite's entries, which may carry options, name their own split),
        # evaluated with the training env's options: with a training id it is a training env. A plain id is
        # marked held out, so this is an easy slip, and the report would count training scores as held-out ones.
        # Held out is the study's, not a model's: an env one model trains on is held out for none.
        trained_ids = {env["id"], *(spec.env_id for spec in task_specs(config.get("meta") or {}))}
        for target in targets if study.eval.suite is None else []:
            if target.name in study.eval.held_out and target.env_id in trained_ids:
                raise StudyError(f"{_where(study.source)}eval env {target.env_id!r} is marked held out (a plain id "
                                 f"in eval.envs is), but model {job.model} trains on it, and a held-out env must "
                                 f"be one no model trains on; write it as {{id: {target.env_id}, held_out: false}}")
        own = spaces(env["id"], trained)
        for target in targets if own is not None else []:
            other = spaces(target.env_id, target_options(env["id"], trained, target))
            if other is not None and other != own:
                raise StudyError(f"{_where(study.source)}eval env {target.env_id!r} does not fit model {job.model} "
                                 f"(trained on {env['id']}): observation space {other[0]} and action space "
                                 f"{other[1]}, where the model has {own[0]} and {own[1]}")


def _check_finetune_spaces(study: Study, spaces: Callable[[str, dict[str, Any]], tuple[Any, Any] | None]) -> None:
    """Refuse a fine-tuning task whose spaces differ from its model's (``check_eval_spaces``): the study would
    otherwise fail only after every model had pre-trained, at the zero-shot evaluation or the fine-tuning."""
    from agents.config import env_options

    spec = study.adaptation
    assert spec is not None
    for run in spec.runs:
        model = study.model(run.source)
        trained = load_config(model.config, [*study.overrides, *model.overrides])["env"]
        own = spaces(trained["id"], env_options(trained))
        for task in spec.tasks:
            try:
                env = load_config(model.config, finetune_overrides(study, run, task, study.seeds[0], Path("x")))["env"]
            except ConfigError as exc:
                raise StudyError(f"{_where(study.source)}fine-tuning run {run.label} on {task}: {exc}") from None
            other = spaces(env["id"], env_options(env))
            if own is not None and other is not None and own != other:
                raise StudyError(f"{_where(study.source)}fine-tuning task {task!r} does not fit model {model.label} "
                                 f"(pre-trained on {trained['id']}): observation space {other[0]} and action space "
                                 f"{other[1]}, where the model has {own[0]} and {own[1]}")


def check_code_version(jobs: Sequence[Job], version: dict[str, Any]) -> None:
    """Refuse to continue a study whose existing runs were trained or evaluated with other code.

    A report refuses to mix code versions within a model, so going on would spend hours on runs that
    could never be reported beside the ones already there.

    :raises StudyError: naming a run, its version and the current one.
    """
    current = version_tag(version)
    for job in jobs:
        found = [tag for tag in code_versions(read_provenance(Path(job.run_dir))) if tag != current]
        if found:
            raise StudyError(f"{job.run_dir} was made with code version {found[0]}, and the code is now {current} "
                             f"(agents/, policies/, envs/, train.py or evaluate.py changed); a study's runs must "
                             f"come from one version. Restore that code, or run the study under a new name")


def checkpoint_frames(directory: Path) -> dict[int, Path]:
    """Frames -> numbered checkpoint (``checkpoints/checkpoint_<frames>.pt``) of a run."""
    return numbered_checkpoints(directory / "checkpoints")


def check_points_reachable(job: Job) -> None:
    """Refuse, before anything trains, a started run that cannot give a checkpoint for each point still to
    evaluate: ``--resume`` keeps the run's own ``log.checkpoint_interval_frames``, so a point added since on
    another grid (or one passed without a checkpoint) failed only once the run had trained to its budget.

    :raises StudyError: naming the run, the point and the run's checkpoint interval.
    """
    directory = Path(job.run_dir)
    try:
        config = load_written_yaml((directory / "config.yaml").read_text())
        interval = int(config["log"]["checkpoint_interval_frames"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return  # not started, or unreadable: check_existing_run and the job itself say so
    checkpoints = checkpoint_frames(directory)
    trained, rollout = max(checkpoints, default=0), _rollout_frames(directory)
    for point in job.evals_missing():
        if point <= trained:
            reachable = _is_points_checkpoint(checkpoint_for_point(checkpoints, point), point, rollout)
        else:  # saved at each multiple of the interval on the way, and at the end of the budget
            reachable = point % interval == 0 or point >= job.total_frames
        if not reachable:
            raise StudyError(f"{directory} cannot be evaluated at {point:,} frames: the run saves a checkpoint every "
                             f"{interval:,} frames (its interval when it started; --resume keeps it) and "
                             f"{'has none within a rollout after that point' if point <= trained else 'would pass it'}"
                             ". The study's eval points changed after the run started: restore them, or move the "
                             "run away to train it again")


def checkpoint_for_point(checkpoints: dict[int, Path], point: int) -> tuple[int, Path] | None:
    """The first checkpoint at or after ``point`` frames (train.py saves after whole rollouts)."""
    for frames, path in checkpoints.items():
        if frames >= point:
            return frames, path
    return None


def _is_points_checkpoint(found: tuple[int, Path] | None, point: int, rollout: int | None) -> bool:
    """Whether ``found`` (:func:`checkpoint_for_point`'s) holds the model at ``point``: train.py saves at the first
    rollout boundary at or after each multiple of the interval, so a checkpoint a rollout or more past the point
    is another point's (``rollout`` None: the run's rollout size is unknown, and any later checkpoint counts)."""
    return found is not None and (rollout is None or found[0] - point < rollout)


def eval_path(directory: Path, point: int) -> Path:
    """Where the evaluate.py JSON of one evaluation point goes."""
    return directory / "eval" / f"point_{point:012d}.json"


def eval_settings(eval_args: Sequence[str], episodes: int) -> dict[str, Any]:
    """What one evaluation point runs with, recorded in its JSON as ``study_eval``: a point evaluated
    with other settings (the study file's eval section changed since) counts as not evaluated, so it
    is evaluated again instead of mixing unpaired levels or episode counts into one report."""
    return {"episodes": int(episodes), "args": list(eval_args)}


def point_settings(study: Study, point: int) -> dict[str, Any]:
    """:func:`eval_settings` of ``study``'s evaluation at ``point`` (see :func:`episodes_at`)."""
    spec = study.eval
    episodes = episodes_at(point, study.total_frames, spec.episodes, spec.final_episodes)
    return eval_settings(eval_arguments(spec), episodes)


def episodes_at(point: int, total_frames: int, episodes: int, final_episodes: int) -> int:
    """Episodes per env at an evaluation point: ``final_episodes`` at the end of the budget, else ``episodes``."""
    return final_episodes if point == total_frames else episodes


def has_eval(directory: Path, point: int, settings: dict[str, Any]) -> bool:
    """Whether the run in ``directory`` has its evaluation at ``point`` with these ``eval_settings``."""
    data = read_json(eval_path(directory, point))
    return isinstance(data, dict) and data.get("study_eval") == settings


# -- jobs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One (model, seed) of a study: train (or resume), then evaluate at each point.

    Plain data (paths as strings) so it travels to another process or a Ray worker.
    """

    study: str
    model: str
    seed: int
    run_dir: str
    config: str
    overrides: tuple[str, ...]
    total_frames: int
    points: tuple[int, ...]
    episodes: int
    final_episodes: int
    eval_args: tuple[str, ...]
    config_sha256: str
    log: str
    version: str = "{}"  # JSON of code_version() when the study was started
    stop_file: str = ""  # <study dir>/.stop: its level (1 stop, 2 abort) tells jobs on any node to stop
    repo: str = str(REPO)
    python: str = sys.executable

    @property
    def key(self) -> str:
        """``model/seed_<s>``."""
        return f"{self.model}/seed_{self.seed}"

    def eval_settings(self, point: int) -> dict[str, Any]:
        """:func:`eval_settings` of one of this job's points (the end of the budget takes ``final_episodes``)."""
        return eval_settings(self.eval_args, episodes_at(point, self.total_frames, self.episodes, self.final_episodes))

    def evals_missing(self) -> list[int]:
        """The points without an evaluation made with this job's settings."""
        return [p for p in self.points if not has_eval(Path(self.run_dir), p, self.eval_settings(p))]


def eval_arguments(spec: EvalSpec) -> tuple[str, ...]:
    """evaluate.py's options for a study's evaluation (the same for every run: paired levels)."""
    args = ["--seed", str(spec.seed), "--no-progress", "--torch-threads", "1"]
    if spec.suite is not None:
        args += ["--suite", spec.suite]
        for key, value in spec.suite_params:
            args += ["--suite-param", f"{key}={json.dumps(value)}"]
    for env in spec.envs:
        args += ["--env", env]
    if spec.deterministic:
        args.append("--deterministic")
    return tuple(args)


def plan(study: Study, root: Path, version: dict[str, Any] | None = None) -> list[Job]:
    """One job per (model, seed), in seed-major order (every model advances together).

    :param version: the code version to record for the runs (``code_version()``, computed once when
        the study starts, so every run of one invocation records the same one).
    """
    jobs = []
    version_text = json.dumps(version or {}, sort_keys=True)
    for seed in study.seeds:
        for model in study.models:
            config = resolved_config(study, model, seed)
            directory = run_dir(root, model.label, seed)
            jobs.append(Job(
                study=study.name, model=model.label, seed=seed, run_dir=str(directory.resolve()),
                config=str(model.config), overrides=(*study.overrides, *model.overrides, *study_overrides(study, seed)),
                total_frames=study.total_frames, points=study.points, episodes=study.eval.episodes,
                final_episodes=study.eval.final_episodes, eval_args=eval_arguments(study.eval),
                config_sha256=config_hash(config),
                log=str((root / "logs" / f"{model.label}-seed_{seed}.log").resolve()), version=version_text,
                stop_file=str((root / STOP_FILE).resolve()),
            ))
    return jobs


@dataclass
class JobState:
    """How far a job has got, read from its run directory."""

    trained_frames: int = 0
    started: bool = False
    training_done: bool = False
    evals_missing: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """Training reached the budget and every evaluation point has its JSON."""
        return self.training_done and not self.evals_missing


def job_state(job: Job) -> JobState:
    """Read a job's progress from its run directory (checkpoints and evaluation JSONs only: no torch)."""
    directory = Path(job.run_dir)
    checkpoints = checkpoint_frames(directory)
    frames = max(checkpoints, default=0)
    return JobState(trained_frames=frames, started=(directory / "config.yaml").is_file(),
                    training_done=frames >= job.total_frames,
                    evals_missing=job.evals_missing())


def check_existing_run(job: Job) -> None:
    """Refuse a run directory that holds a run of another config (the study or a config file changed).

    :raises StudyError: naming the run, the recorded and the planned config hash.
    """
    directory = Path(job.run_dir)
    config_file = directory / "config.yaml"
    if not config_file.is_file():
        # Its config.yaml lost (by hand, or a damaged disk): the hash the run's provenance recorded stands for it,
        # so a run of another config is not resumed from its checkpoint under this one.
        recorded = (read_provenance(directory) or {}).get("config_sha256")
        if recorded is not None and recorded != job.config_sha256:
            raise StudyError(f"{directory} lacks its config.yaml, and its provenance records another config than "
                             "the study now asks; refusing to continue or mix it. Give the study a new name, or move "
                             "that run away")
        return
    try:
        config = load_written_yaml(config_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise StudyError(f"{config_file} cannot be read ({exc}); move the run away to start it again") from None
    found = config_hash(config) if isinstance(config, dict) else "unreadable"
    if found != job.config_sha256:
        changed = _changed_keys(config, job) if isinstance(config, dict) else []
        detail = f" (differs in {', '.join(changed[:4])})" if changed else ""
        raise StudyError(f"{directory} was trained with another config than the study now asks{detail}; "
                         f"refusing to continue or mix it. Give the study a new name, or move that run away")


def _changed_keys(config: dict[str, Any], job: Job) -> list[str]:
    try:
        planned = load_config(job.config, list(job.overrides))
    except ConfigError:
        return []
    return config_differences(config, planned)


def config_differences(config: dict[str, Any], planned: dict[str, Any]) -> list[str]:
    """The dotted keys in which two resolved configs differ, among those :func:`config_hash` covers."""
    a, b = dotted_items(config), dotted_items(planned)
    changed = [k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k.split(".")[0] not in UNHASHED_KEYS]
    if bool(a.get("init_from")) != bool(b.get("init_from")):  # hashed as set or not (config_hash)
        changed.append("init_from")
    return sorted(changed)


# -- adaptation studies: the fine-tuning runs ---------------------------------------------------------


def finetune_dir(root: Path, label: str, task: str, seed: int) -> Path:
    """``<study dir>/finetune/<run>/<task short name>/seed_<seed>``."""
    return root / "finetune" / label / short_env_name(task) / f"seed_{seed}"


def finetune_overrides(study: Study, run: FinetuneRun, task: str, seed: int, root: Path) -> list[str]:
    """The overrides (on the source model's config file) of one fine-tuning run, in precedence order.

    ``ppo``: the source's own overrides without their ``algo.*``/``meta.*`` keys (what pre-training
    used does not carry over), then ``algo.name=ppo`` (which starts the algo section from PPO's
    defaults, see ``agents.config.load_config``), the study's ``finetune.ppo`` settings and no
    ``meta`` section: every model gets the same rule. ``meta``: the source's config as it is, with
    the held-out task as its only task. Then the task, ``finetune.overrides``, the pre-trained weights
    (``init_from``, unless ``scratch``) and the study's settings (seed, budget, checkpoints). Overrides that
    make a variant of the pre-training tasks (``TASK_VARIANT_KEYS``) are not inherited: the held-out task is
    trained as its id makes it, as the zero-shot evaluation runs it.
    """
    spec = study.adaptation
    assert spec is not None
    model = study.model(run.source)
    inherited = [o for o in [*study.overrides, *model.overrides] if not _sets_a_task_variant(o)]
    if run.rule == "ppo":
        inherited = [o for o in inherited if o.partition("=")[0].strip().split(".")[0] not in ("algo", "meta")]
        rule = ["algo.name=ppo", *spec.ppo, "meta=null"]
    else:
        # One task, drawn every cycle: a curriculum's settings of the source (refused without one) do not apply.
        rule = [f"meta.tasks={json.dumps([task])}", "meta.suite=null", "meta.task_schedule=sample",
                "meta.curriculum_frames=null", "meta.curriculum_return=null"]
    weights = [] if run.scratch else [f"init_from={(run_dir(root, run.source, seed) / 'checkpoint.pt').resolve()}"]
    interval = math.ceil(spec.total_frames / 4)
    return [*inherited, *rule, f"env.id={task}", *spec.overrides, *weights, f"seed={seed}",
            f"total_frames={spec.total_frames}", f"log.checkpoint_interval_frames={interval}",
            "log.keep_checkpoints=1010", "log.progress_bar=false", "torch_threads=1"]


def _check_finetune_configs(study: Study) -> None:
    """Resolve every fine-tuning config (as train.py will) and check that the ``ppo`` rule is one rule.

    :raises StudyError: a config train.py would refuse, a ``meta`` rule on a model that is not
        meta_ppo, ``ppo`` runs whose algo or env settings differ (other than env.id), or a model config file
        that makes a variant of the task (``TASK_VARIANT_KEYS``).
    """
    spec = study.adaptation
    assert spec is not None
    where = _where(study.source)
    seen: dict[str, tuple[str, str]] = {}
    for run in spec.runs:
        model = study.model(run.source)
        for task in spec.tasks:
            try:
                config = load_config(model.config, finetune_overrides(study, run, task, study.seeds[0], Path("x")))
            except ConfigError as exc:
                raise StudyError(f"{where}fine-tuning run {run.label} on {task}: {exc}") from None
            variant = [f"env.{key}" for key in SAME_ENV_OPTIONS if config["env"][key] != ENV_FIELDS[key].default]
            if variant:  # set in the model's config file, or by a whole `env` mapping in its overrides
                raise StudyError(f"{where}fine-tuning run {run.label} on {task}: the model's config would give the "
                                 f"held-out task {', '.join(variant)} (from {model.config} or an env mapping in its "
                                 "overrides), a variant of the task the zero-shot evaluation runs as its id makes it; "
                                 f"set them as {', '.join(k + '.*' for k in variant)} overrides of the model, which "
                                 "fine-tuning does not inherit")
            if run.rule == "meta" and config["algo"]["name"] != "meta_ppo":
                raise StudyError(f"{where}fine-tuning run {run.label}: rule meta needs a meta_ppo model; "
                                 f"{run.source} is {config['algo']['name']}")
            if run.rule != "ppo":
                continue
            settings = json.dumps({"algo": config["algo"], "env": {**config["env"], "id": None}}, sort_keys=True)
            first = seen.setdefault(task, (run.label, settings))
            if first[1] != settings:
                raise StudyError(f"{where}fine-tuning runs {first[0]} and {run.label} (rule ppo) would train with "
                                 "different algo or env settings; the ppo rule must be the same for every model "
                                 "(set algo settings in finetune.ppo and env.n_envs, env.vec_env or env.backend in "
                                 "finetune.overrides, not in a model's overrides)")


def finetune_plan(study: Study, root: Path, version: dict[str, Any] | None = None) -> list[Job]:
    """One job per (seed, fine-tuning run, task), seed-major like :func:`plan`; empty for other studies.

    A job trains only (no evaluation points): its measures come from its own learning curve.
    """
    spec = study.adaptation
    if spec is None:
        return []
    jobs = []
    version_text = json.dumps(version or {}, sort_keys=True)
    for seed in study.seeds:
        for run in spec.runs:
            model = study.model(run.source)
            for task in spec.tasks:
                overrides = finetune_overrides(study, run, task, seed, root)
                config = load_config(model.config, overrides)
                short = short_env_name(task)
                jobs.append(Job(
                    study=study.name, model=f"{run.label}/{short}", seed=seed,
                    run_dir=str(finetune_dir(root, run.label, task, seed).resolve()), config=str(model.config),
                    overrides=tuple(overrides), total_frames=spec.total_frames, points=(), episodes=1,
                    final_episodes=1, eval_args=(), config_sha256=config_hash(config),
                    log=str((root / "logs" / f"finetune-{run.label}-{short}-seed_{seed}.log").resolve()),
                    version=version_text, stop_file=str((root / STOP_FILE).resolve()),
                ))
    return jobs


def all_jobs(study: Study, root: Path, version: dict[str, Any] | None = None) -> list[Job]:
    """Every job of a study: the training (pre-training) jobs, then any fine-tuning jobs."""
    return [*plan(study, root, version), *finetune_plan(study, root, version)]


def unplanned_runs(study: Study, root: Path) -> list[Path]:
    """Run folders in a study directory that no job of its plan owns: runs of seeds, models or fine-tuning
    runs taken out of the study file after they trained. Reports leave them out, and name them.

    Folders set aside by a study (``seed_<s>.unfinished-<n>``) are not runs of the plan's kind and are not listed.
    """
    planned = {Path(job.run_dir).resolve() for job in all_jobs(study, root)}
    candidates = [*root.glob(f"{RUNS_FOLDER}/*/seed_*"), *root.glob("finetune/*/*/seed_*")]
    return sorted(path for path in candidates
                  if re.fullmatch(r"seed_\d+", path.name) and path.resolve() not in planned and holds_run(path))


def pretrain_job_for(study: Study, job: Job, root: Path) -> str | None:
    """The run directory a fine-tuning job takes its weights from (None: from scratch or not a fine-tuning job)."""
    if study.adaptation is None or not any(o.startswith("init_from=") for o in job.overrides):
        return None
    return str(run_dir(root, study.adaptation.run(job.model.split("/")[0]).source, job.seed).resolve())


# -- running one job (in a worker thread, process or Ray task) --------------------------------------


@dataclass
class JobResult:
    """What running a job came to: ``done``, ``stopped`` (by a signal) or ``failed`` (with a message)."""

    key: str
    status: str
    message: str = ""
    trained: bool = False


# train.py's and evaluate.py's exits after a stop signal they handled (checkpoint written): 128 + SIGINT/SIGTERM.
STOPPED_EXITS = (128 + signal.SIGINT, 128 + signal.SIGTERM)
# A process killed by the signal itself (subprocess's negative status): one still importing, or already done.
KILLED_BY_STOP = (-signal.SIGINT, -signal.SIGTERM)


class StopRequested(Exception):
    """Raised inside a job when the study is being stopped."""


def train_command(job: Job) -> list[str]:
    """The train.py command line: ``--resume`` for a run that has a checkpoint, a new run otherwise."""
    train = str(Path(job.repo) / "train.py")
    if (Path(job.run_dir) / "checkpoint.pt").is_file():
        return [job.python, train, "--resume", job.run_dir]
    return [job.python, train, "--config", job.config, "--run-dir", job.run_dir, *job.overrides]


def eval_commands(job: Job) -> list[tuple[list[int], list[str], Path]]:
    """The evaluate.py calls a job still needs: ``(points, command, batch JSON)``.

    Points evaluated with the same number of episodes share one call (the intermediate points take
    ``episodes``, the end of the budget ``final_episodes``); each call writes one batch JSON that
    :func:`split_batch` cuts into one evaluate.py JSON per point.
    """
    directory = Path(job.run_dir)
    checkpoints = checkpoint_frames(directory)
    rollout = _rollout_frames(directory)
    groups: dict[int, list[int]] = {}
    for point in job.evals_missing():  # points with the same number of episodes share one call
        groups.setdefault(job.eval_settings(point)["episodes"], []).append(point)
    calls = []
    for episodes, points in groups.items():
        paths = []
        for point in points:
            found = checkpoint_for_point(checkpoints, point)
            if not _is_points_checkpoint(found, point, rollout):
                nearest = "none" if found is None else f"the nearest is at {found[0]:,} frames"
                raise StudyError(f"{directory}: no checkpoint within a rollout after {point:,} frames to evaluate "
                                 f"({nearest}); the study's eval points changed after the run was trained. "
                                 "Restore them, or move the run away to train it again")
            paths.append(str(found[1]))
        batch = directory / "eval" / f".batch-{os.getpid()}-{points[0]}.json"
        command = [job.python, str(Path(job.repo) / "evaluate.py"), *paths, "--episodes", str(episodes),
                   *job.eval_args, "--json", str(batch), "--overwrite"]
        calls.append((points, command, batch))
    return calls


def _rollout_frames(directory: Path) -> int | None:
    """Frames one rollout of the run in ``directory`` adds (n_envs x n_steps), or None if unreadable."""
    try:
        config = load_written_yaml((directory / "config.yaml").read_text())
        return int(config["env"]["n_envs"]) * int(config["algo"]["n_steps"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def split_batch(batch: Path, points: list[int], job: Job) -> None:
    """Cut one evaluate.py JSON over several checkpoints into one JSON per evaluation point of ``job``
    (each recording the job's :func:`eval_settings`)."""
    directory = Path(job.run_dir)
    data = read_json(batch)
    if not isinstance(data, dict) or len(data.get("checkpoints", [])) != len(points):
        raise StudyError(f"{batch}: evaluate.py wrote no usable result")
    for point, checkpoint in zip(points, data["checkpoints"], strict=True):
        single = {**{k: v for k, v in data.items() if k != "checkpoints"}, "point": point,
                  "study_eval": job.eval_settings(point), "checkpoints": [checkpoint]}
        target = eval_path(directory, point)
        if target.is_file():  # made with other settings, or damaged: kept aside, not replaced
            aside = replaced_evaluation(directory, point)
            aside.parent.mkdir(exist_ok=True)
            os.replace(target, aside)
        atomic_write(target, (json.dumps(single, indent=2) + "\n").encode())
    batch.unlink(missing_ok=True)


def replaced_evaluation(directory: Path, point: int) -> Path:
    """Where the next evaluation JSON of ``point`` that a new evaluation replaces is kept:
    ``eval/replaced/point_<frames>.<n>.json``, the first ``n`` free."""
    return _first_free(lambda n: directory / "eval" / "replaced" / f"point_{point:012d}.{n}.json")


def _child_env() -> dict[str, str]:
    # One thread per run: BLAS/OpenMP pools would oversubscribe the cores the pool shares out.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_command(command: list[str], cwd: str, log: IO[str], should_stop: Callable[[], int]) -> int:
    """Run one command in its own process group and return its exit status.

    ``should_stop()`` is polled twice a second and returns 0 (go on), 1 (stop) or 2 (abort): each
    rise sends the child one SIGINT (train.py checkpoints and exits 130 on the first, aborts on the
    second; its last checkpoint is intact either way). A KeyboardInterrupt in this thread (a Ray
    cancel) counts as one more step.
    """
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(),
                               start_new_session=True)
    sent, interrupts = 0, 0
    while True:
        try:
            return process.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:
            interrupts += 1
        wanted = min(2, max(int(should_stop()), interrupts))
        while sent < wanted:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            sent += 1


def stop_level(stop_file: str | Path) -> int:
    """The level written in a study's stop file: 0 (none: go on), 1 (stop after a checkpoint), 2 (abort)."""
    if not stop_file:
        return 0
    try:
        text = Path(stop_file).read_text().strip()
    except OSError:
        return 0
    return 2 if text == "2" else 1


def request_stop(stop_file: str | Path, level: int) -> None:
    """Ask every job of a study, on any node of a shared file system, to stop (1) or abort (2)."""
    atomic_write(Path(stop_file), f"{level}\n".encode())


def execute_job(job: Job, should_stop: Callable[[], int] | None = None) -> JobResult:
    """Train (or resume) the job's run to its budget, then evaluate every point that has no result.

    Runs train.py and evaluate.py as subprocesses from the repository root; their output goes to
    the job's log file. Safe to call again after any stop: finished steps are skipped.

    :param should_stop: polled while a subprocess runs (0 go on, 1 stop, 2 abort); by default the
        level in the study's stop file (``request_stop``), which reaches jobs on every node.
    """
    if should_stop is None:
        def should_stop() -> int:
            return stop_level(job.stop_file) if job.stop_file else 0
    if should_stop():
        return JobResult(job.key, "stopped", "the study is stopping")
    directory = Path(job.run_dir)
    Path(job.log).parent.mkdir(parents=True, exist_ok=True)
    planned = json.loads(job.version)
    version, changed = _current_version(job, planned)
    if changed:
        return JobResult(job.key, "failed", changed)
    trained = False
    with contextlib.ExitStack() as stack:
        try:
            log = stack.enter_context(_job_log(job.log))
            log.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.key} (pid {os.getpid()})\n")
        except OSError as exc:  # the log itself cannot be opened or written (a full disk)
            return JobResult(job.key, "failed", os_error_text(exc, Path(job.log).parent), trained)
        try:
            state = job_state(job)
            if not state.training_done:
                check_existing_run(job)
                try:
                    now = config_hash(load_config(job.config, list(job.overrides)))
                except ConfigError as exc:
                    raise StudyError(f"{job.config} changed while the study ran and no longer loads: {exc}") from None
                if now != job.config_sha256:
                    raise StudyError(f"{job.config} changed while the study ran; restore it, or start the study "
                                     "under a new name")
                moved = set_aside_unresumable(directory)
                if moved is not None:
                    log.write(f"note: {directory} held a run killed before its first checkpoint; moved it to "
                              f"{moved} and starting the run again\n")
                command = train_command(job)
                if "--resume" not in command and (directory / "eval").is_dir():
                    # A run started from nothing beside evaluations of an earlier one (its checkpoints lost): they
                    # describe other weights, so they go aside and the new run's points are evaluated again.
                    aside = _first_free(lambda n: directory / f"eval.earlier-{n}")
                    os.replace(directory / "eval", aside)
                    log.write(f"note: {directory / 'eval'} held evaluations of an earlier run; moved to {aside}\n")
                record_session(directory, "train", job.config_sha256, version)
                code = run_command(command, job.repo, log, should_stop)
                trained = True
                if code in STOPPED_EXITS or (code in KILLED_BY_STOP and should_stop()):
                    # A stop that reached train.py while it was still importing, or after it had finished,
                    # kills it with the signal itself: stopped, and its last checkpoint stands.
                    return JobResult(job.key, "stopped", f"train.py stopped by a signal (exit {code})", trained)
                if code != 0:
                    return JobResult(job.key, "failed", f"train.py exit {code}: {_last_error(job.log)}", trained)
                if not job_state(job).training_done:
                    return JobResult(job.key, "failed", "train.py ended before the budget", trained)
            for stale in (directory / "eval").glob(".batch-*.json"):  # left by a killed study (one study at a time)
                stale.unlink(missing_ok=True)
            calls = eval_commands(job)
            if calls:
                # Hours may have passed since training started: the evaluation records the code it runs.
                version, changed = _current_version(job, planned)
                if changed:
                    return JobResult(job.key, "failed", changed, trained)
                record_session(directory, "eval", job.config_sha256, version)
            for points, command, batch in calls:
                if should_stop():
                    return JobResult(job.key, "stopped", "stopped before evaluating", trained)
                code = run_command(command, job.repo, log, should_stop)
                if code in STOPPED_EXITS or (code in KILLED_BY_STOP and should_stop()):
                    batch.unlink(missing_ok=True)
                    return JobResult(job.key, "stopped", f"evaluate.py stopped by a signal (exit {code})", trained)
                if code != 0:
                    batch.unlink(missing_ok=True)
                    return JobResult(job.key, "failed", f"evaluate.py exit {code}: {_last_error(job.log)}", trained)
                split_batch(batch, points, job)
        except StudyError as exc:
            log.write(f"error: {exc}\n")
            return JobResult(job.key, "failed", str(exc), trained)
        except OSError as exc:
            message = os_error_text(exc, Path(job.log).parent.parent)  # the study folder (runs/ and logs/)
            with contextlib.suppress(OSError):  # the log may be what cannot be written
                log.write(f"error: {message}\n")
            return JobResult(job.key, "failed", message, trained)
    return JobResult(job.key, "done", "", trained)


@contextlib.contextmanager
def _job_log(path: str) -> Iterator[IO[str]]:
    """A job's log, opened for appending and closed without raising: on a full disk the close flushes the
    lines that failed to go out again, and its error would replace the job's own message about that failure."""
    log = open(path, "a", encoding="utf-8")
    try:
        yield log
    finally:
        with contextlib.suppress(OSError):
            log.close()


def _current_version(job: Job, planned: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The code version to record for a step of ``job`` now, and why it may not run (None: it may).

    A study plans its jobs with the code version of its start; a job that would run other code (an edit
    or checkout while the study ran) must not record one version and execute another. Compared only
    like with like (two code hashes, or two ``$MODULAR_RL_CODE_VERSION`` names): a node without git, or
    one where the variable is set on one side only (a Ray worker), has nothing to compare, and the
    planned version is recorded.
    """
    version = code_version(Path(job.repo))
    if not planned:
        return version, None
    if (planned.get("commit") is None or version.get("commit") is None
            or bool(planned.get("code_sha256")) != bool(version.get("code_sha256"))):
        return planned, None
    if version_tag(version) != version_tag(planned):
        return version, (f"the code changed while the study ran ({version_tag(planned)} when it started, "
                         f"{version_tag(version)} now); restore that code, or start the study under a new name")
    return version, None


def _first_free(numbered: Callable[[int], Path]) -> Path:
    """The first of ``numbered(1)``, ``numbered(2)``, ... that does not exist: where a file or folder is put
    aside without replacing one put there before."""
    n = 1
    while numbered(n).exists():
        n += 1
    return numbered(n)


def set_aside_unresumable(directory: Path) -> Path | None:
    """Move a run killed before its first checkpoint (train.py files but no ``checkpoint.pt``) to
    ``<dir>.unfinished-<n>``, so the run can start again; nothing is deleted. Returns the new path.

    :raises StudyError: if a live process still trains there (say, a run a killed study left behind):
        moving its directory away would make it fail at its next write.
    """
    from agents.run_dir import lock_holder

    if (directory / "checkpoint.pt").is_file() or not holds_run(directory):
        return None
    holder = lock_holder(directory)
    if holder is not None:
        raise StudyError(f"{directory} is being trained by another process (pid {holder}), perhaps a run a "
                         "killed study left behind; stop it (it has no checkpoint yet), then run the study again")
    numbered = checkpoint_frames(directory)
    if numbered:  # not killed before its first checkpoint: checkpoint.pt was lost, its training is not
        frames, newest = max(numbered.items())
        raise StudyError(f"{directory} has no checkpoint.pt but numbered checkpoints up to {frames:,} frames: copy "
                         f"{newest} to {directory / 'checkpoint.pt'} to continue the run from there, or move the run "
                         "away to train it again")
    target = _first_free(lambda n: directory.with_name(f"{directory.name}.unfinished-{n}"))
    os.replace(directory, target)
    return target


def _last_error(log_path: str) -> str:
    """The last line starting with ``error:`` in a job's log (or its last line), for the summary."""
    try:
        lines = [line.strip() for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "see its log"
    errors = [line for line in lines if line.startswith("error:")]
    message = errors[-1] if errors else lines[-1] if lines else "no output"
    if len(message) > 300:  # the whole line is in the log; cut at a space unless that loses too much (a long path)
        cut = message.rfind(" ", 200, 297)
        message = message[: cut if cut > 0 else 297] + " ..."
    return f"{message} (log: {log_path})"


# -- the study directory ----------------------------------------------------------------------------


@contextlib.contextmanager
def study_lock(root: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``<study dir>/.lock``: one ``study.py run`` per study at a time."""
    root.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    handle = open_lock_file(root / ".lock")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise StudyError(f"study {root} is being run by another process (pid {holder}); "
                             f"wait for it or stop it, then run again") from None
        handle.seek(0)
        if is_foreign_lock(handle.read(64)):
            raise StudyError(f"{root / '.lock'} exists and is not a study lock (study.py run locks a study with a "
                             "file of that name and would overwrite it); move it away, then run again")
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        except OSError as exc:  # a full disk: the write names no file
            raise StudyError(write_failure(root / ".lock", exc)) from None
        yield
    finally:
        with contextlib.suppress(OSError):  # a failed flush is raised again by close: the message above stands
            handle.close()


def check_study_folder(root: Path) -> None:
    """Refuse an output directory that exists and is not a study's: it holds something, but no study copy.

    ``run_study`` writes into the folder (report.md, plots/, runs/, logs/), so a folder made for something
    else would have its files replaced. The only state a study leaves without its copy is that of a first
    session stopped between taking the lock (``study_lock`` makes the folder and ``.lock``) and
    ``save_study_copy``, or killed while writing the copy (its temporary file, ``.study.yaml.<pid>.<hex>.tmp``,
    is left): a folder holding only those is accepted, so that study still starts.

    :raises StudyError: one line naming the folder and one thing in it.
    """
    # A study's copy, or an older one (save_study_copy moves the old copy aside before writing the new one).
    if (root / STUDY_COPY).is_file() or any(root.glob(f"{STUDY_COPY}.[0-9]*")):
        return
    if root.exists() and not root.is_dir():
        raise StudyError(f"{root} is a file, not a study folder; move it away or give another --root")
    if not root.is_dir():
        return
    others = sorted(entry.name for entry in root.iterdir()
                    if entry.name not in (".lock", ".DS_Store") and not re.fullmatch(rf"\.{re.escape(STUDY_COPY)}\.\d+\.[0-9a-f]+\.tmp",
                                                                     entry.name))
    if others:
        raise StudyError(f"{root} is not empty ({others[0]}{f' and {len(others) - 1} more' if len(others) > 1 else ''})"
                         f" and holds no study (no {STUDY_COPY}); refusing to write into it: move it away or give "
                         "another --root")


def stale_evaluations(jobs: Sequence[Job]) -> int:
    """How many evaluation JSONs of ``jobs`` were made with other evaluation settings than the jobs' own
    (the study file's eval section changed since): those points are evaluated again (the files replaced are kept
    in ``eval/replaced/``)."""
    return sum(eval_path(Path(job.run_dir), point).is_file()
               and not has_eval(Path(job.run_dir), point, job.eval_settings(point))
               for job in jobs for point in job.points)


def save_study_copy(study: Study, root: Path) -> None:
    """Keep the study file in its output directory (what ``report`` reads); an older, different copy
    is kept as ``study.yaml.<n>``, never replaced silently."""
    text = study.source.read_text(encoding="utf-8") if study.source else yaml.safe_dump(dataclasses.asdict(study))
    # The copy must mean the same from any directory, and in another checkout of the package (a copy of
    # the study directory, a git worktree): config paths inside the package relative to its root
    # (load_study looks there), others absolute.
    raw = parse_yaml(text)
    for item, model in zip(raw.get("models", []), study.models, strict=False):
        if isinstance(item, dict):
            item["config"] = _portable_path(model.config)
    text = f"# copy of {study.source} made by study.py run\n" + yaml.safe_dump(raw, sort_keys=False)
    target = root / STUDY_COPY
    if target.is_file():
        try:
            old = load_written_yaml(target.read_text(encoding="utf-8"))
            damaged = None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:  # edited or damaged: kept aside like a changed one
            old = None
            damaged = yaml_problem(exc) if isinstance(exc, yaml.YAMLError) else "not UTF-8 text"
        # A copy that differs only in how it spells the same config files (older copies held absolute
        # paths) is the same study: rewritten in the portable form, not kept as a changed one.
        if damaged is None and (old == raw or _with_portable_configs(old, target) == raw):
            if old != raw:
                atomic_write(target, text.encode())
            return
        kept = _first_free(lambda n: root / f"{STUDY_COPY}.{n}")
        # Copied, then replaced atomically: a full disk on either step leaves study.yaml in place.
        atomic_write(kept, target.read_bytes())
        print(f"note: the study file changed since the last run; the previous copy is kept as {kept}" if damaged
              is None else f"note: the previous copy of the study file could not be read ({damaged}); it is kept "
              f"as {kept}")
    atomic_write(target, text.encode())


def _portable_path(path: Path) -> str:
    """``path`` relative to the package root when it lies inside it, else absolute."""
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path.resolve())


def _with_portable_configs(raw: Any, source: Path) -> Any:
    """A parsed study file with each model's config path in ``_portable_path`` form (as it was when unreadable)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        return raw
    models = []
    for item in raw["models"]:
        if isinstance(item, dict):
            try:
                item = {**item, "config": _portable_path(_resolve_config_path(item.get("config"), source, True))}
            except StudyError:
                pass
        models.append(item)
    return {**raw, "models": models}


def load_study_dir(directory: Path) -> Study:
    """The study kept in a study directory (``study.yaml``), without re-checking envs."""
    path = directory / STUDY_COPY
    if not path.is_file():
        shipped = PACKAGE_ROOT / "configs" / "studies" / f"{directory.name}.yaml"
        file = shipped.relative_to(PACKAGE_ROOT) if shipped.is_file() else "FILE"
        # study.py run makes <--root>/<name>: the command must name a --root other than the default, or it would
        # start the study under studies/ instead.
        if directory.parent.resolve() != DEFAULT_ROOT.resolve():
            file = f"{file} --root {shlex.quote(str(directory.parent))}"
        older = sorted(directory.glob(f"{STUDY_COPY}.[0-9]*")) if directory.is_dir() else []
        if older:  # a session stopped between moving the old copy aside and writing the new one
            raise StudyError(f"{directory} holds only an older copy of its study file ({older[-1].name}); "
                             f"`python study.py run {file}` writes the current one and continues the study")
        raise StudyError(f"{directory} holds no study (no {STUDY_COPY}): it has not been run yet; "
                         f"`python study.py run {file}` starts it")
    return load_study(path, check_envs=False, package_relative=True)


def machine_description() -> dict[str, Any]:
    """This machine in a few words (no host name): OS, architecture, CPU model, widest vector instructions
    (the C kernels' speed depends on them: AVX-512 hosts run 16-wide products), CPU count, Python and torch.

    torch's version is read from its installed metadata, so nothing heavy is imported.
    """
    import platform
    from importlib import metadata

    from policies.cpu import cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    cpu = model or platform.processor()
    vector = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse2", "SSE2"),
                                           ("asimd", "NEON"), ("neon", "NEON")) if flag in flags), None)
    if vector is None:  # no /proc/cpuinfo (macOS, Windows): 64-bit ARM always has NEON
        vector = "NEON" if platform.machine().lower() in ("arm64", "aarch64") else "unknown"
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"system": f"{platform.system()} {platform.machine()}", "cpu": cpu or "unknown CPU", "vector": vector,
            "cpus": os.cpu_count() or 1, "python": platform.python_version(), "torch": torch_version}


def record_study_session(root: Path, record: dict[str, Any]) -> None:
    """Append one ``study.py run`` session (command, start, end, seconds, machine...) to ``<root>/sessions.jsonl``."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / SESSIONS_FILE
    with open(path, "ab") as handle:
        # A partial last line (a kill or a full disk mid-append) would swallow this record: end it first.
        if handle.tell() > 0:
            with open(path, "rb") as reader:
                reader.seek(-1, os.SEEK_END)
                if reader.read(1) != b"\n":
                    handle.write(b"\n")
        handle.write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))


def update_study_session(root: Path, session: str, fields: dict[str, Any]) -> None:
    """Set ``fields`` in the ``sessions.jsonl`` record whose ``"session"`` is ``session`` (the file is
    rewritten whole through a temporary file, so a kill mid-write leaves the old one)."""
    path = root / SESSIONS_FILE
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("session") == session:
            lines[number] = json.dumps({**data, **fields}, sort_keys=True)
    atomic_write(path, "".join(f"{line}\n" for line in lines).encode("utf-8"))


@contextlib.contextmanager
def study_session(root: Path, record: dict[str, Any], heartbeat_seconds: float = SESSION_HEARTBEAT_SECONDS
                  ) -> Iterator[dict[str, Any]]:
    """Record a ``study.py run`` session in ``sessions.jsonl`` from its start, not only at its end.

    The record is written at once (``"ended": null``) and its ``"last_seen"`` and ``"seconds"`` are
    renewed every ``heartbeat_seconds`` while the body runs, so a session killed outright (SIGKILL, a
    sandbox that stops) still counts in the report's provenance, up to its last recorded heartbeat.
    The body adds its closing fields (``done``, ``stopped``, ...) to the yielded dict; on leaving,
    ``"ended"`` is set and they are written.
    """
    import threading
    import uuid

    started = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    session = uuid.uuid4().hex
    record_study_session(root, {**record, "session": session, "started": stamp, "ended": None,
                                "last_seen": stamp, "seconds": 0.0})
    stop = threading.Event()

    def renew() -> dict[str, Any]:
        now = time.time()
        return {"last_seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "seconds": round(now - started, 1)}

    def beat() -> None:
        while not stop.wait(heartbeat_seconds):
            try:
                update_study_session(root, session, renew())
            except OSError:
                pass  # a full disk must not stop the study; the end of the session writes again

    thread = threading.Thread(target=beat, name="study-session-heartbeat", daemon=True)
    thread.start()
    closing: dict[str, Any] = {}
    try:
        yield closing
    finally:
        stop.set()
        thread.join()  # a heartbeat write under way ends before the closing one (no older record over it)
        fields = renew()
        try:
            update_study_session(root, session, {**closing, **fields, "ended": fields["last_seen"]})
        except OSError as exc:  # must not hide the body's own error, nor turn a finished study into one
            print(f"warning: could not record the end of this session in {root / SESSIONS_FILE} ({exc}); "
                  "the report counts it up to its last heartbeat", file=sys.stderr, flush=True)


def read_study_sessions(root: Path) -> list[dict[str, Any]]:
    """The sessions :func:`run_study` recorded in ``<root>/sessions.jsonl`` (unreadable lines skipped)."""
    try:
        lines = (root / SESSIONS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    sessions = []
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            sessions.append(data)
    return sessions


def continue_command(study: Study, executor: str, workers: int | None, address: str | None,
                     root: Path | None = None, as_started: bool = False) -> str:
    """The command that continues a stopped study.

    :param as_started: name study.py as this process was started with it (``python /repo/study.py``), for a
        message to the user; otherwise ``study.py``, as the study's provenance records its commands.
    :param root: the study's directory; where it is ``<--root>/<name>`` (as ``study.py run`` makes it) a
        ``--root`` other than the default is named, or the command would start the study afresh under
        ``studies/``. A directory named otherwise (``run_study`` called from Python) cannot be given to
        ``study.py run`` at all, and adds nothing.
    """
    script = script_as_started("study.py") if as_started else "study.py"
    parts = ["python", script, "run", shlex.quote(str(study.source or study.name))]
    if root is not None and root.name == study.name and root.parent != DEFAULT_ROOT:
        parts += ["--root", shlex.quote(str(root.parent))]
    if executor != study.executor.name:
        parts += ["--executor", executor]
    if workers is not None:
        parts += ["--workers", str(workers)]
    if address is not None:
        parts += ["--address", shlex.quote(address)]
    return " ".join(parts)


def summarize_states(jobs: Sequence[Job]) -> dict[str, int]:
    """Counts of finished, started (partly trained or evaluated) and untouched jobs."""
    counts = {"done": 0, "partial": 0, "new": 0}
    for job in jobs:
        state = job_state(job)
        counts["done" if state.done else "partial" if state.started else "new"] += 1
    return counts


# -- running a study --------------------------------------------------------------------------------


def run_study(study: Study, root: Path, executor: str | None = None, workers: int | None = None,
              address: str | None = None, ray_init: Callable[..., Any] | None = None,
              report: bool = True) -> int:
    """Run every unfinished job of ``study`` and return the exit status (0 done, 1 some failed,
    130/143/129 stopped by SIGINT/SIGTERM/SIGHUP; the printed command continues it).

    Everything is checked before any work starts: the executor (Ray installed?), every model's
    config and every existing run's config hash. Finished jobs are skipped, interrupted ones resumed.

    :param root: the study's output directory (``studies/<name>``).
    :param ray_init: passed to the Ray executor in place of ``ray.init`` (tests).
    :param report: write ``report.md`` once every job is done.
    """
    from agents import executors  # imports this module: imported here, not at the top

    executor = executor or study.executor.name
    check_executor(executor)
    if executor == "ray":
        executors.import_ray()
    if workers is not None and workers < 1:
        raise StudyError(f"--workers must be >= 1, got {workers}")
    if address is not None and executor != "ray":
        raise StudyError(f"--address is for the ray executor; this study runs with executor {executor!r} "
                         "(add --executor ray)")
    address = address or (study.executor.address if executor == "ray" else None)
    workers = workers or study.executor.workers
    version = code_version()
    jobs = all_jobs(study, root, version)
    for job in jobs:
        check_existing_run(job)
    unfinished = [job for job in jobs if not job_state(job).done]
    for job in unfinished:
        check_points_reachable(job)
    if unfinished:  # a finished study runs nothing, so other code now mixes nothing: rerunning it just says so
        check_code_version(jobs, version)
    check_eval_spaces(study, unfinished)
    if address and unfinished:  # before any folder is made: ray.init would retry it for many minutes
        executors.check_ray_reachable(address)
    # The study file is checked first (its errors are the likelier ones); then, before the lock writes anything,
    # the folder: one that is not this study's stays untouched.
    check_study_folder(root)
    with study_lock(root):
        (root / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier session
        save_study_copy(study, root)
        # Evaluations made with other settings are redone (never mixed into one report); say so, since the
        # files they replace may be the only record of results someone has looked at.
        stale = stale_evaluations(jobs)
        if stale:
            print(f"note: {stale} evaluation result(s) (eval/point_*.json) were made with other evaluation "
                  "settings (the study file's eval section changed) or cannot be read (damaged); those points are "
                  "evaluated again, and each file replaced is kept in its run's eval/replaced/", flush=True)
        states = {job.key: job_state(job) for job in jobs}
        todo = [job for job in jobs if not states[job.key].done]
        partial = sum(states[job.key].started and not states[job.key].done for job in jobs)
        where = f"ray{f' at {address}' if address else ' (local instance)'}" if executor == "ray" else \
            f"local, {_count(workers or executors.default_workers(), 'worker')}"
        if study.adaptation is None:
            shape = (f"{_count(len(study.models), 'model')} x {_count(len(study.seeds), 'seed')}, "
                     f"{study.total_frames:,} frames each")
        else:
            spec = study.adaptation
            seeds = _count(len(study.seeds), "seed")
            shape = (f"pre-training {_count(len(study.models), 'model')} x {seeds} x {study.total_frames:,} frames, "
                     f"fine-tuning {_count(len(spec.runs), 'run')} x {_count(len(spec.tasks), 'task')} x {seeds} x "
                     f"{spec.total_frames:,} frames")
        print(f"study {study.name}: {len(jobs)} runs ({shape}) in {root}; {len(jobs) - len(todo)} finished, "
              f"{partial} to continue, {len(todo) - partial} to start; executor {where}", flush=True)
        # Fine-tuning runs that start from pre-trained weights wait for their pre-training run: a first
        # phase runs everything else, a second one the fine-tuning runs whose weights are then ready.
        waiting = [job for job in todo if pretrain_job_for(study, job, root) is not None]
        phases = [[job for job in todo if job not in waiting], waiting]
        results: list[JobResult] = []
        stopped: str | None = None
        blocked: list[str] = []
        done_before = len(jobs) - len(todo)
        display = executors.Display(study.name, len(jobs), done_before, todo=todo) if todo else None
        # Recorded from its start (and renewed each minute), so a killed session still counts in the report.
        session_record = {"command": continue_command(study, executor, workers, address, root), "executor": executor,
                          "workers": workers if executor == "ray" else workers or executors.default_workers(),
                          "address": address, "machine": machine_description(), "jobs": len(jobs),
                          "done": done_before, "jobs_run": 0, "stopped": None}
        with (study_session(root, session_record) if todo else contextlib.nullcontext({})) as closing:
            for number, phase in enumerate(phases):
                if number == 1:
                    finished = {job.run_dir for job in jobs if job_state(job).done}
                    ready = [job for job in phase if pretrain_job_for(study, job, root) in finished]
                    blocked = [f"{job.key} (its pre-training run {Path(pretrain_job_for(study, job, root) or '')} "
                               "is not done)" for job in phase if job not in ready]
                    phase = ready
                if not phase:
                    continue
                assert display is not None
                display.done_before = done_before + sum(r.status == "done" for r in results)
                if executor == "ray":
                    outcome = executors.run_ray(phase, address=address, workers=workers,
                                                cpus_per_run=study.executor.cpus_per_run,
                                                gpus_per_run=study.executor.gpus_per_run, display=display,
                                                init=ray_init)
                else:
                    outcome = executors.run_local(phase, workers=workers, display=display)
                results += outcome.results
                if outcome.stopped is not None:
                    stopped = outcome.stopped
                    break
            counts = summarize_states(jobs)
            closing.update(jobs_run=len(results), done=counts["done"], stopped=stopped)
        failed = [r for r in results if r.status == "failed"]
        # A run stopped while the study was not stopping got its signal from outside (a user's kill of its
        # train.py): it keeps its checkpoint and continues next time, but is named, not passed over.
        stopped_outside = [r for r in results if r.status == "stopped"] if stopped is None else []
        print(f"study {study.name}: {counts['done']}/{len(jobs)} runs done, {counts['partial']} partly done, "
              f"{counts['new']} not started" + (f", {len(failed)} failed this time" if failed else "")
              + (f", {len(stopped_outside)} stopped from outside the study" if stopped_outside else ""), flush=True)
        for result in failed:
            print(f"  failed: {result.key}: {result.message}", flush=True)
        for result in stopped_outside:
            again = ("its evaluation runs again" if result.message.startswith("evaluate.py") else
                     "it continues from its last checkpoint")
            print(f"  stopped: {result.key}: {result.message}, not by this study ({again} next time)", flush=True)
        for text in blocked:
            print(f"  not started: {text}", flush=True)
        if stopped is not None:
            print(f"stopped ({stopped}); every run keeps its last checkpoint. Continue with: "
                  f"{continue_command(study, executor, workers, address, root, as_started=True)}", flush=True)
            return executors.stop_exit_status(stopped)
        if counts["done"] < len(jobs):
            print(f"some runs did not finish; see their logs in {root / 'logs'}, then continue with: "
                  f"{continue_command(study, executor, workers, address, root, as_started=True)}", flush=True)
            return 1
    if report:
        from agents.report import write_report

        try:
            path = write_report(root, root=root.parent)
        except StudyError as exc:
            print(f"note: no report written: {exc}", flush=True)
        else:
            print(f"report written to {path}", flush=True)
    return 0
