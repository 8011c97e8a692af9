"""The training loop: rollouts, updates, logging, checkpoints, interruption and resume.

Read ``Trainer.run`` top to bottom for the whole algorithm around the update rule:
collect a rollout with the current policy, compute GAE, let the updater (PPO, A2C,
meta-PPO) change the parameters, log, and checkpoint at intervals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import hmac
import importlib
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecEnvWrapper
from tqdm import tqdm

from agents import distributed
from agents.a2c import RecurrentA2C
from agents.config import (
    ENV_FIELDS,
    PPO_ONLY_KEYS,
    ConfigError,
    dotted_items,
    env_options,
    load_plugins,
    load_written_yaml,
    merge,
    refusal_reason,
    resolve_config,
    yaml_problem,
)
from agents.logger import RunLogger
from agents.optim import NonFiniteError, PolicyUpdater
from agents.ppo import RecurrentPPO
from agents.rollout import RolloutState, collect_rollout, start_rollouts
from agents.run_dir import (
    RunDirError,
    RunLock,
    atomic_write,
    default_run_dir,
    load_snapshot_key,
    prepare_run_dir,
    refuse_existing_run,
    remove_stale_temp_files,
    train_py,
    usable_snapshot_key,
    write_failure,
)
from agents.storage import RolloutStorage
from envs import check_env_id, make_env, make_vec_env
from policies.actor_critic import RecurrentActorCritic, obs_to_tensor
from policies.encoders import GridEncoder
from policies.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    DamagedCheckpointError,
    load_checkpoint,
    non_finite_weights_problem,
    numbered_checkpoints,
    save_checkpoint,
    space_from_dict,
    space_to_dict,
    underlying_os_error,
)

try:
    PACKAGE_VERSION = metadata.version("modular-memory-rl")
except metadata.PackageNotFoundError:  # running from a source checkout that was not installed
    PACKAGE_VERSION = "0.1.0"

# Update rules by ``algo.name``; agents.meta adds "meta_ppo" and "multitask_ppo". A rule with a
# ``from_config(config, policy, generator)`` classmethod is built by it, others as (policy, algo, generator=...).
UPDATERS: dict[str, type[PolicyUpdater]] = {"ppo": RecurrentPPO, "a2c": RecurrentA2C}
# The modules that add an update rule to UPDATERS when imported (their config side is torch-free).
PLUGIN_UPDATERS: dict[str, str] = {"meta_ppo": "agents.meta", "multitask_ppo": "agents.meta"}

ENVS_STATE_FILE = "envs_state.pkl"
# Task envs kept alive between visits (meta-learning); beyond this many the least recently run is
# closed, so that a long task list (a suite, subprocess envs) does not keep every task's envs open.
MAX_PARKED_TASKS = 8
# What may change on --resume: the budget, and where and how fast the run computes (as SB3's load(device=...)).
# Settings that change how a run is watched or where it runs, not what it computes (evaluation during training
# plays with its own random streams), so a resume may change them, as an SB3 user adds an EvalCallback.
RESUME_MAY_CHANGE: tuple[str, ...] = ("total_frames", "device", "torch_threads", "log.eval_envs",
                                      "log.eval_interval_frames", "log.eval_episodes", "log.progress_bar")
_RESUME_MAY_CHANGE_WORDS = ", ".join(RESUME_MAY_CHANGE[:-1]) + " and " + RESUME_MAY_CHANGE[-1]
# The env options that ``envs.make_env`` (one env) takes; the others are vec-env options.
SINGLE_ENV_OPTIONS: tuple[str, ...] = ("mission", "env_kwargs", "level_seeds", "max_episode_steps",
                                       "terminal_on_life_loss")


def snapshot_key() -> bytes:
    """This user's secret key for authenticating env snapshots (``agents.run_dir.load_snapshot_key``).

    :raises SnapshotKeyError: if it cannot be read or created, or is not a 32-byte key.
    """
    return load_snapshot_key()


def numerics_build(policy: RecurrentActorCritic) -> dict[str, str]:
    """What a run's floating-point rounding depends on: torch's version and the engines that run.

    RIMs/BRIMs run their time loop in the C kernel or in Python (``engine``), and the MiniGrid grid
    encoder in the C kernel or in torch's layers (``encoder``). The C kernels are built for the CPU
    they run on (``-march=native``), so the same seed rounds differently on another machine or with
    the other engine; where a kernel runs, its build (flags, compiler, CPU) is recorded too.

    :param policy: the policy being trained (its core, encoder and device decide the engines).
    """
    from policies.native import DISABLE_ENV, kernel_build, native_library

    build = {"torch": str(torch.__version__)}
    no_kernel = f"{DISABLE_ENV}=0 or no C compiler"
    kernel_runs = False
    core = policy.core
    kernel_for = getattr(core, "kernel_for", None)
    if kernel_for is not None:  # RIMs and BRIMs: asked exactly as their forward asks
        device = next(core.parameters()).device
        if kernel_for(torch.zeros(1, 1, core.input_size, device=device)) is not None:
            build["engine"] = "c-kernel"
            kernel_runs = True
        else:
            reason = (no_kernel if core.native and device.type == "cpu" and native_library() is None
                      else "the kernel does not apply to this core or device")
            build.update(engine="python", reason=reason)
    grid = next((module for module in policy.modules() if isinstance(module, GridEncoder)), None)
    if grid is not None:
        if grid.uses_kernel():
            build["encoder"] = "c-kernel"
            kernel_runs = True
        else:
            on_cpu = grid.embedding.weight.device.type == "cpu"
            build["encoder"] = "torch (" + (no_kernel if grid.native and on_cpu and native_library() is None
                                            else "the kernel does not apply to this encoder or device") + ")"
    if kernel_runs:
        build.update({key: value for key, value in kernel_build().items() if key != "engine"})
    return build


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must see (non-finite values, crashed env, full disk).

    The message says what was kept: the last good checkpoint is never replaced by a bad one.
    """


def build_policy(config: dict[str, Any], observation_space: Any, action_space: Any) -> RecurrentActorCritic:
    """Build the actor-critic a config describes for the given spaces.

    :raises ConfigError: if the core arguments or the observation space cannot be used.
    """
    core = dict(config["core"])
    name = core.pop("name")
    try:
        return RecurrentActorCritic(
            observation_space, action_space, core=name, core_kwargs=core,
            head_hidden_size=config["policy"]["head_hidden_size"],
        )
    except ValueError as exc:
        raise ConfigError(f"cannot build the policy for env {config['env']['id']!r}: {exc}") from None


def check_run_consistency(checkpoint: dict[str, Any], config: dict[str, Any], run_dir: str | Path) -> None:
    """Refuse a checkpoint whose config does not describe its own policy or rollout state.

    A checkpoint's config and policy spec are written together, so a mismatch means a file was
    edited or files of different runs were mixed: resuming would train a policy other than the
    one the config (and evaluate.py) describes.

    :raises CheckpointError: naming the field that disagrees, or a training-state field missing or of the
        wrong kind (the file edited by hand, or written by other code).
    """
    for key, valid, kind in (
        ("frames", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a frame count >= 0"),
        ("updates", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an update count >= 0"),
        ("env", lambda v: isinstance(v, dict) and isinstance(v.get("id"), str) and isinstance(v.get("options"), dict),
         "the env id and options"),
        ("rng", lambda v: isinstance(v, dict), "the RNG states"),
        ("updater", lambda v: isinstance(v, dict), "the optimiser state"),
    ):
        value = checkpoint.get(key)
        if not valid(value):
            found = "has none" if key not in checkpoint else f"has {type(value).__name__} {value!r:.60}"
            raise CheckpointError(f"the checkpoint in {run_dir} is damaged or not a training checkpoint: its "
                                  f"{key!r} should be {kind} and {found}")
    spec = checkpoint.get("policy", {}).get("spec") if isinstance(checkpoint.get("policy"), dict) else None
    if not isinstance(spec, dict):
        raise CheckpointError(f"the checkpoint in {run_dir} holds no policy spec to check its config against")
    core = dict(config["core"])
    expected = {"core": core.pop("name"), "core_kwargs": core, "head_hidden_size": config["policy"]["head_hidden_size"]}
    for key, value in expected.items():
        saved = spec.get(key)
        if key == "core_kwargs" and isinstance(saved, dict):
            # Arguments a newer core version added take their defaults in the resolved config.
            saved = {**{k: v for k, v in value.items() if k not in saved}, **saved}
        if saved != value:
            raise CheckpointError(f"the checkpoint in {run_dir} is inconsistent: its config gives policy "
                                  f"{key}={value!r} but its saved policy has {key}={saved!r}; "
                                  "refusing to resume a mixed-up run")
    from policies.cores import CORES
    from policies.policy import check_core_revision

    check_core_revision(spec, CORES[expected["core"]].revision, f"the checkpoint in {run_dir}")
    rollout = checkpoint.get("rollout")
    n_envs = config["env"]["n_envs"]
    if isinstance(rollout, dict) and hasattr(rollout.get("state"), "shape") and rollout["state"].shape[0] != n_envs:
        raise CheckpointError(f"the checkpoint in {run_dir} is inconsistent: its config has env.n_envs={n_envs} "
                              f"but its rollout state holds {rollout['state'].shape[0]} envs")


def _short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a list of 10,000 level seeds in a one-line message)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


@contextlib.contextmanager
def _sizes_that_fit(config: dict[str, Any]) -> Iterator[None]:
    """Turn a failed allocation while building the policy or the rollout buffers (sizes this machine cannot
    hold: a core of a million units, a rollout of 10^8 steps) into one ConfigError naming the sizes."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, MemoryError) and "allocate" not in text:
            raise
        asked = re.search(r"allocate (\d+) bytes", text)
        amount = f" ({int(asked.group(1)) / 2**30:,.1f} GiB at once)" if asked else ""
        if "CUDA" in text or "GPU" in text:  # torch's first line says which GPU and what else holds its memory
            amount = f" on {config['device']} ({text.splitlines()[0][:300]})"
        sizes = {key: value for key, value in config["core"].items()
                 if key != "name" and isinstance(value, int) and not isinstance(value, bool)}
        raise ConfigError(
            f"not enough memory to build the run{amount}: core {config['core']['name']} {sizes}, "
            f"policy.head_hidden_size={config['policy']['head_hidden_size']}, algo.n_steps={config['algo']['n_steps']} "
            f"x env.n_envs={config['env']['n_envs']} steps per rollout; make them smaller"
        ) from None


@contextlib.contextmanager
def _refused_env_options(env_id: str, options: dict[str, Any]) -> Iterator[None]:
    """Turn an env's refusal of the run's env options, as it builds, into one ConfigError line."""
    try:
        yield
    except (ValueError, TypeError) as exc:  # TypeError: env.env_kwargs the env does not take
        raise ConfigError(f"env: {exc}") from None
    except AssertionError as exc:  # e.g. MiniGrid asserts on a grid size it cannot build
        check = refusal_reason(exc)
        # The assertion may come from a wrapper (SB3's image checks on a frame stack), not the env: name every
        # env setting the config changed from its default, not only env_kwargs.
        changed = [f"env.{key}={_short_repr(value)}" for key, value in options.items()
                   if key in ENV_FIELDS and value != ENV_FIELDS[key].default]
        raise ConfigError(f"{', '.join(changed) or 'the default env settings'} rejected by {env_id}: {check}") from None


def _lookup(nested: dict[str, Any], dotted: str) -> Any:
    """The value at ``a.b.c`` in a nested dict (None where a part is missing)."""
    value: Any = nested
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _refuse_edited_config(run_dir: Path, saved: dict[str, Any], own: dict[str, Any]) -> None:
    """Refuse to resume a run whose ``config.yaml`` says another run than its checkpoint does.

    A resumed run trains with the checkpoint's config and writes it to ``config.yaml`` again, so a user who
    edited that file (to change the core or the learning rate, as one edits an rl-zoo3 hyperparameter file)
    would see the edit ignored and the file replaced. ``RESUME_MAY_CHANGE`` keys are not compared: a resume
    that extended ``total_frames`` writes the file before its first checkpoint. A value is edited only if it
    is neither the checkpoint's (``saved``, as an older version of this code wrote it) nor that config
    resolved by this version (``own``: defaults added since filled in, which a resume that stopped before
    its first checkpoint has written).

    :raises ConfigError: naming the keys that differ (the file is left as it is).
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        return  # lost or never written: the resume writes it from the checkpoint
    try:
        written = load_written_yaml(path.read_text())
        problem = None if isinstance(written, dict) else "it holds no config mapping"
    except yaml.YAMLError as exc:
        problem = yaml_problem(exc)
    except (OSError, UnicodeDecodeError) as exc:
        problem = " ".join(str(exc).split())[:120]
    if problem is not None:
        raise ConfigError(f"cannot resume {run_dir}: its config.yaml is not the config this run wrote ({problem}); "
                          f"the run's config is kept in its checkpoint: move the file aside and resume, which "
                          f"writes it again")
    differ = [key for key in dict.fromkeys([*dotted_items(saved), *dotted_items(own), *dotted_items(written)])
              if key not in RESUME_MAY_CHANGE and _lookup(written, key) != _lookup(saved, key)
              and _lookup(written, key) != _lookup(own, key)]
    if not differ:
        return
    shown = ", ".join(f"{key} {_short_repr(_lookup(written, key), 40)} (the checkpoint's: "
                      f"{_short_repr(_lookup(own, key), 40)})" for key in differ[:3])
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    raise ConfigError(f"cannot resume {run_dir}: its config.yaml was edited: {shown}{more}; a run's config cannot "
                      f"change on --resume (only {_RESUME_MAY_CHANGE_WORDS} can, as overrides). Put the file "
                      f"back, or train the edited config as a new run: `python {train_py()} --config {path} "
                      f"--run-dir <new folder>`")


def _older_checkpoints_hint(run_dir: Path) -> str:
    """For a damaged ``checkpoint.pt``: the numbered checkpoints kept beside it.

    The newest ``checkpoints/checkpoint_<frames>.pt`` is a copy of ``checkpoint.pt`` (a file of its own), so the
    numbered ones are whole when it is damaged. (Runs saved before 2026-12-06 made it a hard link to the
    newest one, which damage to either then shares: that one is left out.)
    """
    latest = _file_identity(run_dir / "checkpoint.pt")
    numbered = list(reversed(numbered_checkpoints(run_dir / "checkpoints").values()))
    twin = [path for path in numbered if latest is not None and (_file_identity(path) or (None,))[0] == latest[0]]
    kept = [path for path in numbered if path not in twin]
    if not kept:
        return ""
    # A hard-linked twin is moved away too: copying over checkpoint.pt would write through the link into it.
    damaged = " and ".join(str(path) for path in [run_dir / "checkpoint.pt", *twin])
    return (f"; numbered checkpoints are kept in {run_dir / 'checkpoints'} (newest {kept[0].name}): to resume "
            f"from one, move {damaged} out of the run directory, then copy it to {run_dir / 'checkpoint.pt'}")


def _space_text(data: Any) -> str:
    """A stored space as gymnasium writes it (``Box(0, 255, (7, 7, 3), uint8)``), not its per-element bounds."""
    try:
        return repr(space_from_dict(data))
    except Exception:  # a malformed entry: show its start
        text = repr(data)
        return text if len(text) <= 200 else f"{text[:200]}..."


def _write_advice(exc: BaseException) -> str:
    """What to do about a failed write: free space for a full disk or quota, else fix the path itself."""
    os_error = underlying_os_error(exc)
    if os_error is not None and os_error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free some space, then resume"
    return "make that path writable (or move what is in its way), then resume"


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime, size) of a file, or None if it does not exist: a checkpoint replaced by a rename changes it."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _base_venv(venv: VecEnv) -> VecEnv:
    while isinstance(venv, VecEnvWrapper):
        venv = venv.venv
    return venv


def _task_key(task: tuple[str, dict[str, Any]]) -> str:
    """A task's (env id, options) as a dict key (the options are plain YAML values)."""
    return json.dumps(task, sort_keys=True, default=str)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])


class Trainer:
    """Trains one agent as its config says, writing everything into ``run_dir``.

    :param config: a resolved config (``agents.config.load_config``).
    :param run_dir: where ``config.yaml``, TensorBoard events, ``metrics.jsonl`` and checkpoints go.
    :param checkpoint: a loaded checkpoint to resume from (``Trainer.resume`` builds it), or None.
    :raises RunDirError: before any env or policy is built, if ``run_dir`` cannot be a run directory
        (a file, under a file, not writable, a name too long), is in use by another process, or, for
        a new run, already holds a run (``agents.run_dir``: a new run never writes into one).
    """

    def __init__(self, config: dict[str, Any], run_dir: str | Path, checkpoint: dict[str, Any] | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        # The run directory first, before envs and policy are built: a path that cannot be written,
        # a directory holding another run (for a new run) or one another process is using.
        prepare_run_dir(self.run_dir)
        self._lock = RunLock(self.run_dir)
        self._lock.probe()
        self._new_run = checkpoint is None
        if self._new_run:
            refuse_existing_run(self.run_dir)
        self._started = False  # run() has taken over the directory (stale temp files removed)
        # The checkpoint.pt this trainer continues from (Trainer.resume sets it): the lock is taken
        # when training starts, and by then another process may have trained the run further.
        self._loaded_from: tuple[int, int, int] | None = None
        seed = config["seed"]
        if config["torch_threads"]:  # None (or 0 in runs saved before 0 was refused): torch's default
            torch.set_num_threads(config["torch_threads"])
        # Under torchrun each rank samples actions and shuffles from its own streams; rank 0 (and a
        # one-process run) uses the config seed itself. Weights are broadcast from rank 0 below.
        self.generator = torch.Generator()
        self._seed_rngs(distributed.rank_rng_seed(seed))
        self.device = torch.device(config["device"])
        if self.device.type == "cuda" and not torch.cuda.is_available():
            how = (f"continue the run on the CPU with `python {train_py()} --resume {run_dir} device=cpu`"
                   if checkpoint is not None else "use device=cpu")
            raise ConfigError(f"device={config['device']!r} but no CUDA GPU is available; {how}")
        distributed.setup(config["device"])  # joins torchrun's process group; nothing in a world of 1
        self.world_size = distributed.world_size()
        try:  # the config only checks the spelling; whether this machine has the device is checked here
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError, ImportError, ValueError) as exc:  # torch raises all of these
            # torch's first sentence says why (not compiled with it, no such backend); the rest lists backends.
            reason = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0][:160]
            raise ConfigError(f"device={config['device']!r} is not available on this machine ({reason}); "
                              "use device=cpu") from None
        load_plugins(config["algo"]["name"])  # a config resolved in another process: register its updater
        # Checked once at the start: an unusable key skips only the env snapshot, never a checkpoint.
        # Under torchrun there is no env snapshot (a distributed resume starts fresh episodes on every rank).
        self._snapshot_key = usable_snapshot_key() \
            if config["env"]["vec_env"] == "dummy" and self.world_size == 1 else None

        env_config = config["env"]
        try:
            check_env_id(env_config["id"])
        except ValueError as exc:
            raise ConfigError(f"env.id: {exc}") from None
        # The (env id, make_vec_env options) being trained on; meta-learning changes it between updates.
        self.task: tuple[str, dict[str, Any]] = (env_config["id"], env_options(env_config))
        if checkpoint is not None:
            self.task = (checkpoint["env"]["id"], checkpoint["env"]["options"])
        self.venv, restored_parked = None, {}
        if checkpoint is not None and self.world_size == 1:
            self.venv, restored_parked = self._restore_envs(checkpoint)
        envs_restored = self.venv is not None
        if self.venv is None:
            # A distributed resume starts fresh episodes, from env streams past the checkpoint's frames
            # rather than replaying the run's first levels (a one-process run keeps its seeds as before).
            frames_done = checkpoint.get("frames") if checkpoint is not None else None
            fresh = [seed, frames_done] if self.world_size > 1 and isinstance(frames_done, int) else None
            self.venv = self.make_envs(*self.task, seed=fresh)
        with _sizes_that_fit(config):
            self.policy = build_policy(config, self.venv.observation_space, self.venv.action_space).to(self.device)
        self._check_eval_envs()
        algo = config["algo"]
        if algo["name"] not in UPDATERS and algo["name"] in PLUGIN_UPDATERS:
            importlib.import_module(PLUGIN_UPDATERS[algo["name"]])
        updater_cls = UPDATERS[algo["name"]]
        if hasattr(updater_cls, "from_config"):
            # An updater that needs more than the algo section (meta-PPO: the meta section) reads the config.
            self.updater = updater_cls.from_config(config, self.policy, self.generator)
        else:
            self.updater = updater_cls(self.policy, algo, generator=self.generator)
        with _sizes_that_fit(config):
            self.storage = RolloutStorage(algo["n_steps"], env_config["n_envs"], self.venv.observation_space,
                                          self.venv.action_space, self.policy.state_size, self.device)
        # Frames count every rank's envs: total_frames is the whole run's, however many processes train it.
        self.frames_per_rollout = algo["n_steps"] * env_config["n_envs"] * self.world_size
        self.frames = 0
        self.updates = 0
        self.rollout_state: RolloutState | None = None
        # Envs of the tasks not being trained on right now, with where their rollouts stopped (meta-learning's
        # task switches park them here, so that an episode cut by a switch continues when its task returns).
        self.parked_tasks: dict[str, tuple[VecEnv, RolloutState]] = {
            key: (venv, dataclasses.replace(state, state=state.state.to(self.device)))
            for key, (venv, state) in restored_parked.items()}
        self.recent_episodes: deque[dict[str, float]] = deque(maxlen=config["log"]["return_window"])
        self._stop_signal: str | None = None
        if checkpoint is not None:
            try:
                self._load_training_state(checkpoint, envs_restored)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                if isinstance(exc, CheckpointError):
                    raise
                details = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
                raise CheckpointError(f"cannot resume from the checkpoint in {self.run_dir}: "
                                      f"{type(exc).__name__}: {details}") from None
            if distributed.rank() > 0:  # the checkpoint holds rank 0's RNG states: give this rank its own
                self._seed_rngs(distributed.rank_rng_seed([seed, self.frames]))
        elif config.get("init_from"):
            self._init_weights(config["init_from"])
        # Every rank starts from rank 0's weights; the barrier also keeps rank 0 from writing into the
        # run directory (run()) before every rank has checked it in this constructor.
        distributed.broadcast_module(self.policy)
        distributed.barrier()
        # An updater with a task schedule (meta-PPO) may start on another task than env.id.
        self._maybe_switch_task(None)

    # -- evaluation during training (log.eval_envs) ----------------------------------------------
    def _as_policy(self) -> Any:
        """The model being trained as a :class:`policies.Policy` (what evaluate.py evaluates), still in training
        mode (``Policy`` puts its model in eval mode: no layer of ours acts differently, but the mode stays)."""
        from policies.policy import Policy

        policy = Policy(self.policy, self.config["env"]["id"], env_options(self.config["env"]), self.config,
                        device=self.device)
        self.policy.train()
        return policy

    def _check_eval_envs(self) -> None:
        """Refuse, before training, ``log.eval_envs`` the run cannot evaluate on: an env of other spaces than the
        policy's, or two ids with one short name (their scalars would share a key). Every rank checks (the same
        files and ids everywhere), so all of them stop, as for any other bad input."""
        from agents.evaluation import EvalTarget, evaluation_options
        from envs import env_spaces
        from envs.names import short_env_name, short_name_clash

        ids = self.config["log"]["eval_envs"]
        clash = short_name_clash(ids)
        if clash is not None:
            raise ConfigError(f"log.eval_envs: {clash[0]!r} and {clash[1]!r} share the short name "
                              f"{short_env_name(clash[1])!r} their scores are logged under; evaluate on one of them")
        policy = self._as_policy() if ids else None
        own = (self.venv.observation_space, self.venv.action_space)
        for env_id in ids:
            try:
                spaces = env_spaces(env_id, evaluation_options(policy, EvalTarget(env_id)))
            except Exception as exc:  # noqa: BLE001 - whatever the env raises, said as the config's problem
                raise ConfigError(f"log.eval_envs: cannot build {env_id!r}: {exc}") from None
            if spaces != own:
                raise ConfigError(f"log.eval_envs: {env_id!r} does not fit the policy: observation space "
                                  f"{spaces[0]} and action space {spaces[1]}, where the training env has "
                                  f"{own[0]} and {own[1]}")

    def _evaluate_if_due(self) -> dict[str, float]:
        """After the update that crosses a multiple of ``log.eval_interval_frames``, play ``log.eval_episodes``
        episodes on each of ``log.eval_envs`` and return their scalars (``eval/<env>/mean_return``,
        ``eval/<env>/success_rate``); otherwise, or once a signal asked training to stop, nothing.

        The episodes are evaluate.py's (its options, and its default seed: every evaluation of a run plays the
        same levels), sampled from their own random streams, so the training's result is the same with
        evaluation on or off. An env that fails is said in one warning line and skipped: the update just made
        is still logged and checkpointed.
        """
        log = self.config["log"]
        interval = log["eval_interval_frames"]
        if not log["eval_envs"] or self.frames // interval == (self.frames - self.frames_per_rollout) // interval:
            return {}
        from agents.evaluation import evaluate_policy
        from envs.names import short_env_name

        policy = self._as_policy()
        scalars, said = {}, []
        for env_id in log["eval_envs"]:
            if self._stop_signal is not None:  # a scheduler's grace period is not spent on episodes
                break
            name = short_env_name(env_id)
            try:
                result = evaluate_policy(policy, env_id, episodes=log["eval_episodes"])
            except Exception as exc:  # noqa: BLE001 - an evaluation never costs the training its update
                tqdm.write(f"warning: evaluation on {env_id} at {self.frames} frames failed ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:300]}); training goes on")
                continue
            scalars[f"eval/{name}/mean_return"] = result["mean_return"]
            if result["success_rate"] is not None:
                scalars[f"eval/{name}/success_rate"] = result["success_rate"]
            said.append(f"{name} {result['mean_return']:.2f}")
        if said:
            tqdm.write(f"eval at {self.frames} frames ({log['eval_episodes']} episodes each): mean return "
                       + ", ".join(said))
        return scalars

    def _seed_rngs(self, seed: int) -> None:
        """Seed Python's, numpy's and torch's global RNGs and the minibatch generator with ``seed``."""
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.generator.manual_seed(seed)

    # -- construction helpers -------------------------------------------------------------
    def make_envs(self, env_id: str, options: dict[str, Any], seed: int | list[int] | None = None) -> VecEnv:
        """Build the training vec env (reward clipping on; evaluation builds its own without).

        :param seed: the envs' seed (``envs.env_seeds``), the config's ``seed`` by default.
        """
        env_config = self.config["env"]
        # Under torchrun rank r >= 1 draws its env seeds from its own SeedSequence; rank 0's are unchanged.
        seed = distributed.rank_seed(self.config["seed"] if seed is None else seed)
        probe = None
        with _refused_env_options(env_id, options):
            if options.get("vec_env") == "subproc" or options.get("env_kwargs"):
                # Options the env refuses would fail in every subprocess worker, each printing its own
                # traceback, and reach this process as a broken pipe; and some env_kwargs (a MiniGrid
                # size too small for its objects) fail only at the first reset, once the run has written
                # its files. So one env is built and reset here first, to name the problem up front.
                single = {key: options[key] for key in SINGLE_ENV_OPTIONS if key in options}
                probe = make_env(env_id, None, clip_rewards=True, **single)
        if probe is not None:
            try:
                probe.reset(seed=0)
            except Exception as exc:
                if not options.get("env_kwargs"):
                    raise  # not the user's options: an env bug keeps its traceback
                raise ConfigError(f"env.env_kwargs={options['env_kwargs']!r} rejected by {env_id} at its first "
                                  f"reset: {type(exc).__name__}: {exc}") from None
            finally:
                probe.close()
        with _refused_env_options(env_id, options):
            return make_vec_env(env_id, env_config["n_envs"], seed, clip_rewards=True, **options)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict[str, Any] | None = None) -> Trainer:
        """Rebuild a trainer from ``run_dir/checkpoint.pt`` with the run's own config.

        :param run_dir: a run directory written by an earlier ``Trainer``.
        :param overrides: only ``RESUME_MAY_CHANGE`` may change on resume (``total_frames`` to extend a run;
            where and how fast it computes).
        :raises CheckpointError: if the checkpoint is unusable or disagrees with itself (config vs policy
            spec, rollout state vs env.n_envs); ConfigError for a bad override or ``total_frames`` below
            the frames done; RunDirError if another process is training in ``run_dir``.
        """
        if Path(run_dir).is_dir():  # a run another process is training: say so, whatever its files hold now
            RunLock(run_dir).probe()
        loaded_from = _file_identity(Path(run_dir) / "checkpoint.pt")
        try:
            checkpoint = load_checkpoint(Path(run_dir) / "checkpoint.pt")
        except DamagedCheckpointError as exc:  # the bytes, not another format or a refused object
            raise DamagedCheckpointError(f"{exc}{_older_checkpoints_hint(Path(run_dir))}") from None
        distributed.check_resume_world_size(checkpoint.get("world_size"), run_dir)
        if not isinstance(checkpoint.get("config"), dict):
            raise CheckpointError(f"the checkpoint in {run_dir} holds no training config to resume with")
        saved = checkpoint["config"]
        if isinstance(saved.get("algo"), dict) and saved["algo"].get("name") == "a2c":
            # Runs saved before A2C refused the PPO-only keys carry them (ignored then): drop them.
            saved = {**saved, "algo": {k: v for k, v in saved["algo"].items() if k not in PPO_ONLY_KEYS}}
        threads, cpus = saved.get("torch_threads"), os.cpu_count() or 1
        if threads == 0:  # saved before 0 was refused, when it meant torch's default (now null)
            saved = {**saved, "torch_threads": None}
        elif isinstance(threads, int) and not isinstance(threads, bool) and threads > cpus:
            # A run moved to a smaller machine: fewer threads change speed, not what is computed.
            print(f"warning: the run used torch_threads={threads}; this machine has {cpus} CPUs, so it "
                  f"continues with {cpus}", file=sys.stderr)
            saved = {**saved, "torch_threads": cpus}
        # Another core or algorithm would be refused below too, but by a key of the old one that the new
        # one lacks ("unknown config key core.num_modules"): name the key the user typed instead.
        for key in ("core.name", "algo.name"):
            wanted = _lookup(overrides or {}, key)
            if wanted is not None and wanted != _lookup(saved, key):
                raise ConfigError(f"{key} cannot change on --resume (the run is {key}={_lookup(saved, key)}; only "
                                  f"{_RESUME_MAY_CHANGE_WORDS} can change); start a new run")
        try:
            config = resolve_config(merge(saved, overrides or {}))  # an unknown key is named here
            own = resolve_config(saved)
        except ConfigError as exc:
            raise ConfigError(f"cannot resume {run_dir}: {exc}") from None
        # Whole resolved configs are compared, not only the keys typed: an override of a mapping
        # (env.env_kwargs={size: 8}) replaces it, and must not drop the run's other entries unnoticed.
        # Keys given with the run's own values (a scheduler's fixed command line) change nothing.
        changed = [key for key in dict.fromkeys([*dotted_items(own), *dotted_items(config)])
                   if key not in RESUME_MAY_CHANGE and _lookup(config, key) != _lookup(own, key)]
        if "env.n_envs" in changed:
            raise ConfigError("env.n_envs cannot change on --resume: the checkpoint's rollout state, env "
                              "snapshot and optimiser were made with its own count; start a new run")
        if changed:
            raise ConfigError(f"{', '.join(changed)} cannot change on --resume (only {_RESUME_MAY_CHANGE_WORDS} "
                              "can); start a new run")
        done = checkpoint.get("frames")
        if isinstance(done, int) and config["total_frames"] < done:
            raise ConfigError(f"cannot resume {run_dir} with total_frames={config['total_frames']}: the run has "
                              f"already done {done} frames; give total_frames={done} or more")
        check_run_consistency(checkpoint, config, run_dir)
        _refuse_edited_config(Path(run_dir), checkpoint["config"], own)
        moved = [f"{key}={_lookup(config, key)} (was {_lookup(own, key)})" for key in ("device", "torch_threads")
                 if _lookup(config, key) != _lookup(own, key)]
        if moved:
            print(f"note: the run continues with {', '.join(moved)}: the same training, but not to the bit what "
                  "an uninterrupted run would compute", file=sys.stderr)
        trainer = cls(config, run_dir, checkpoint=checkpoint)
        trainer._loaded_from = loaded_from
        return trainer

    def _restore_envs(self, checkpoint: dict[str, Any]) -> tuple[VecEnv | None, dict[str, tuple[VecEnv, RolloutState]]]:
        """Unpickle the envs saved with the checkpoint, if this user wrote them and they match it.

        The snapshot is a pickle (the envs' RNGs and unfinished episodes), so it is only read when
        its HMAC under this user's local key (``snapshot_key``) checks out: a run directory copied
        from someone else resumes with fresh episodes instead of running their pickle.

        :return: the current task's envs (None: start fresh episodes) and the parked tasks' envs with
            their rollout states (a meta-learning run's; empty when there are none or the envs are not used).
        """
        path = self.run_dir / ENVS_STATE_FILE
        if not path.is_file():
            return None, {}
        if self._snapshot_key is None:
            tqdm.write(f"warning: without a usable snapshot key {path} cannot be checked; resuming with fresh episodes",
                       file=sys.stderr)
            return None, {}
        blob = path.read_bytes()
        tag, body = blob[:32], blob[32:]
        if len(tag) != 32 or not hmac.compare_digest(tag, hmac.new(self._snapshot_key, body, hashlib.sha256).digest()):
            tqdm.write(f"warning: {path} is damaged or was not written by this user (its signature does not match); "
                       "resuming with fresh episodes", file=sys.stderr)
            return None, {}
        try:
            saved = pickle.loads(body)  # authenticated above: this user wrote it
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError):
            return None, {}
        if not isinstance(saved, dict) or saved.get("frames") != checkpoint["frames"]:
            return None, {}  # a kill between the snapshot and the checkpoint: the envs moved on since
        parked = saved.get("parked") or {}
        venv = saved.get("venv")
        env_id, n_envs = checkpoint["env"]["id"], self.config["env"]["n_envs"]
        refused = None
        if saved.get("env_id") != env_id:
            refused = f"it holds envs of {saved.get('env_id')!r}, the checkpoint was trained on {env_id!r}"
        elif getattr(venv, "num_envs", None) != n_envs:
            refused = f"it holds {getattr(venv, 'num_envs', None)} envs, the run has env.n_envs={n_envs}"
        if refused is not None:
            tqdm.write(f"warning: {path} does not belong to this checkpoint ({refused}); not used, resuming with "
                       "fresh episodes", file=sys.stderr)
            for unused in [venv, *(parked_venv for parked_venv, _ in parked.values())]:
                with contextlib.suppress(Exception):
                    unused.close()
            return None, {}
        return venv, parked

    def _init_weights(self, source: str) -> None:
        """Load the policy weights of another run's checkpoint (``init_from``) into this new run.

        Only the weights: the optimiser, frame count, RNG states and task schedule stay those of a
        fresh run. The checkpoint's policy (core, its arguments and revision, head size) and its
        observation and action spaces must be this run's.

        :raises CheckpointError: naming the file and what differs.
        """
        path = Path(source).expanduser()
        path = path / "checkpoint.pt" if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"init_from: checkpoint file not found: {path}")
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as exc:  # damaged, foreign, unsafe: said as the other init_from errors are
            raise type(exc)(f"init_from: {exc}") from None
        policy = loaded.get("policy")
        spec = policy.get("spec") if isinstance(policy, dict) else None
        if not isinstance(spec, dict) or "state_dict" not in policy:
            raise CheckpointError(f"init_from: {path} holds no policy weights and spec")
        from policies.policy import check_core_revision

        for key in ("core", "core_kwargs", "head_hidden_size"):
            if key == "core_kwargs":  # a revision is a core's: compared once the cores are known to be the same
                check_core_revision(spec, self.policy.spec.get("core_revision", 1), f"init_from: {path}")
            saved, mine = spec.get(key), self.policy.spec[key]
            if key == "core_kwargs" and isinstance(saved, dict):  # arguments a newer core added: their defaults
                saved = {**{k: v for k, v in mine.items() if k not in saved}, **saved}
            if saved != mine:
                if isinstance(saved, dict) and isinstance(mine, dict):  # name only the arguments that differ
                    unset = "<not set>"
                    differ = [k for k in sorted(set(saved) | set(mine), key=str)
                              if saved.get(k, unset) != mine.get(k, unset)]
                    saved, mine = ({k: side.get(k, unset) for k in differ} for side in (saved, mine))
                raise CheckpointError(f"init_from: {path} holds a policy with {key}={saved!r}, this run builds "
                                      f"{key}={mine!r}; the core and head settings must match the checkpoint's")
        for key in ("observation_space", "action_space"):
            mine = space_to_dict(getattr(self.venv, key))
            if loaded.get(key) != mine:
                raise CheckpointError(f"init_from: {path} was trained with {key.replace('_', ' ')} "
                                      f"{_space_text(loaded.get(key))}, this run's env has {_space_text(mine)}")
        problem = non_finite_weights_problem(policy["state_dict"])
        if problem is not None:  # said as such, not later as a loss that "exploded" at this run's learning rate
            raise CheckpointError(f"init_from: {path} {problem}; use another checkpoint of that run")
        try:
            self.policy.load_state_dict(policy["state_dict"])
        except RuntimeError as exc:
            details = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise CheckpointError(f"init_from: the weights of {path} do not fit this run's policy: {details}") from None

    def _load_training_state(self, checkpoint: dict[str, Any], envs_restored: bool) -> None:
        problem = non_finite_weights_problem(checkpoint["policy"]["state_dict"])
        if problem is not None:
            raise CheckpointError(f"cannot resume from the checkpoint in {self.run_dir}: it {problem}"
                                  f"{_older_checkpoints_hint(self.run_dir)}")
        try:
            self.policy.load_state_dict(checkpoint["policy"]["state_dict"])
        except RuntimeError as exc:  # torch lists every missing/unexpected/mis-shaped tensor: keep them all
            details = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise CheckpointError(f"cannot resume from the checkpoint in {self.run_dir}: its weights do not fit the "
                                  f"{self.config['core']['name']!r} policy its config describes: {details}") from None
        self.updater.load_state_dict(checkpoint["updater"])
        self.frames, self.updates = checkpoint["frames"], checkpoint["updates"]
        _set_rng_state(checkpoint["rng"], self.generator)
        rollout = checkpoint.get("rollout")
        if rollout is not None and envs_restored:  # fresh envs start fresh episodes instead
            obs = rollout["obs"]
            obs = {k: v.numpy() for k, v in obs.items()} if isinstance(obs, dict) else obs.numpy()
            self.rollout_state = RolloutState(obs=obs, state=rollout["state"].to(self.device),
                                              episode_starts=rollout["episode_starts"].numpy())
        self.recent_episodes.extend(checkpoint.get("recent_episodes", []))

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint_payload(self) -> dict[str, Any]:
        """Everything needed to rebuild the policy, and to resume training exactly."""
        payload: dict[str, Any] = {
            "package_version": PACKAGE_VERSION,
            "numerics": numerics_build(self.policy),
            "config": self.config,
            "policy": {"spec": self.policy.spec, "state_dict": self.policy.state_dict()},
            "observation_space": space_to_dict(self.venv.observation_space),
            "action_space": space_to_dict(self.venv.action_space),
            "env": {"id": self.task[0], "options": self.task[1]},
            "updater": self.updater.state_dict(),
            "frames": self.frames,
            "updates": self.updates,
            "rng": _rng_state(self.generator),
            "recent_episodes": list(self.recent_episodes),
            "world_size": self.world_size,  # a resume must use as many processes (torchrun)
        }
        if self.rollout_state is not None:
            obs = obs_to_tensor(self.rollout_state.obs, "cpu")
            payload["rollout"] = {"obs": obs, "state": self.rollout_state.state.cpu(),
                                  "episode_starts": torch.as_tensor(self.rollout_state.episode_starts)}
        return payload

    def save(self, snapshot_envs: bool = True) -> Path:
        """Write a checkpoint atomically, keeping the last ``log.keep_checkpoints`` of them.

        ``checkpoints/checkpoint_<frames>.pt`` holds each one and ``checkpoint.pt`` the latest;
        ``envs_state.pkl`` (the envs, for an exact resume) is written first, so a kill between
        the two leaves a snapshot the previous checkpoint does not match (and resume resets envs).
        Before anything is written the policy must give finite outputs on the last rollout's
        observations: an exploded model never replaces a good checkpoint.

        :param snapshot_envs: also pickle the envs (in-process envs only) for an exact resume.
        :raises TrainingError: if the policy's outputs are not finite, or a write fails (a full disk:
            the message names the path and the free space; the previous checkpoint is intact).
        """
        if not distributed.is_main():  # rank 0 writes the checkpoint; the weights are the same on every rank
            return self.run_dir / "checkpoint.pt"
        with self._lock:
            problem = self._non_finite_policy()
            if problem is not None:
                raise TrainingError(self._stopped(problem))
            if snapshot_envs and self._snapshot_key is not None and isinstance(_base_venv(self.venv), DummyVecEnv):
                # The parked tasks' envs too (meta-learning), each with where its rollouts stopped, so that
                # a resumed run continues their episodes when their task comes back, as it would have.
                parked = {key: (venv, dataclasses.replace(state, state=state.state.cpu()))
                          for key, (venv, state) in self.parked_tasks.items()}
                try:
                    blob = pickle.dumps({"frames": self.frames, "env_id": self.task[0], "venv": self.venv,
                                         "parked": parked})
                except (pickle.PicklingError, TypeError, AttributeError):
                    blob = None  # an env that cannot be pickled: resume will start fresh episodes
                if blob is not None:
                    tag = hmac.new(self._snapshot_key, blob, hashlib.sha256).digest()
                    path = self.run_dir / ENVS_STATE_FILE
                    with self._write_errors(path):
                        atomic_write(path, tag + blob)
            latest = self.run_dir / "checkpoint.pt"
            # checkpoint.pt first: a failure (full disk) or a kill between the two writes then leaves the newest
            # state where --resume reads it, and no numbered checkpoint ahead of it (a study counts training
            # done from the numbered ones, then fine-tunes from checkpoint.pt). Resume writes the numbered one.
            with self._write_errors(latest):
                save_checkpoint(latest, self.checkpoint_payload())
            self._write_numbered()
            kept = list(numbered_checkpoints(self.run_dir / "checkpoints").values())  # a user's own copies are not
            for old in kept[: -self.config["log"]["keep_checkpoints"]]:
                old.unlink()
            if self._loaded_from is not None:
                self._loaded_from = _file_identity(latest)  # this trainer's own checkpoint is the one to continue
            return latest

    def _numbered_checkpoint(self) -> Path:
        """``checkpoints/checkpoint_<frames>.pt`` for the frames trained so far."""
        return self.run_dir / "checkpoints" / f"checkpoint_{self.frames:012d}.pt"

    def _write_numbered(self) -> None:
        """Copy ``checkpoint.pt`` to :meth:`_numbered_checkpoint`: a file of its own, not a hard link (a user
        rolling back with ``cp checkpoints/checkpoint_<older>.pt checkpoint.pt`` wrote through a shared file into
        the newest numbered checkpoint, whose name then held the older weights)."""
        numbered = self._numbered_checkpoint()
        with self._write_errors(numbered):
            numbered.parent.mkdir(exist_ok=True)
            atomic_write(numbered, (self.run_dir / "checkpoint.pt").read_bytes())

    @contextlib.contextmanager
    def _write_errors(self, path: Path) -> Iterator[None]:
        """Turn a failed write of ``path`` (full disk, no permission) into one TrainingError line."""
        try:
            yield
        except CheckpointWriteError as exc:
            raise TrainingError(self._stopped(str(exc), advice=_write_advice(exc))) from None
        except OSError as exc:
            # The path the system names (e.g. a file where the tb/ folder goes) rather than the one meant.
            where = Path(exc.filename) if exc.filename else path
            raise TrainingError(self._stopped(write_failure(where, exc), advice=_write_advice(exc))) from None

    def _stopped(self, problem: str, advice: str | None = None) -> str:
        """The message of a run that stops on a problem: what happened, what was kept and what to do.

        :param advice: what to do before resuming (free space, fix a path); None for a numerical problem
            (non-finite losses, weights or outputs), which resuming would repeat update for update.
        """
        latest = self.run_dir / "checkpoint.pt"
        if advice is None:
            # A learning rate cannot change on --resume (RESUME_MAY_CHANGE), and an exact resume replays
            # the same updates: the way on is a new run with other settings.
            rates = "meta.fast_lr or meta.slow_lr" if "lr" not in self.config["algo"] else "algo.lr"
            fix = f"a lower {rates} or algo.max_grad_norm"
            kept = (f"The last good checkpoint is kept at {latest} (not overwritten). Resuming would repeat the same "
                    f"updates: start a new run with {fix}, from these weights with `init_from={latest}` (a fresh "
                    "optimiser) or from scratch." if latest.exists()
                    else f"No checkpoint had been written yet; start a new run with {fix}.")
        else:
            kept = (f"The last good checkpoint is kept at {latest} (not overwritten); {advice} with "
                    f"`python {train_py()} --resume {self.run_dir}`." if latest.exists()
                    else "No checkpoint had been written yet.")
        return f"training stopped at {self.frames} frames: {problem}. {kept}"

    @torch.no_grad()
    def _non_finite_policy(self) -> str | None:
        """Why the policy may not be saved (non-finite weights or outputs on the last rollout), or None.

        Huge but finite weights pass a parameter check and still give inf/NaN logits: running the
        last rollout's observations through the policy catches both.
        """
        bad = [name for name, param in self.policy.named_parameters() if not torch.isfinite(param).all()]
        if bad:
            return f"the policy's weights are non-finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
        storage = self.storage
        # Draws no random numbers (training refuses core.dropout > 0), so the saved RNG state is untouched.
        try:
            dist, values, _ = self.policy(storage.obs, storage.states[0], storage.episode_starts)
        except ValueError:  # torch.distributions refuses NaN parameters
            return "the policy's outputs are non-finite on the last rollout's observations"
        logits = dist.logits if hasattr(dist, "logits") else dist.mean
        if not (torch.isfinite(logits).all() and torch.isfinite(values).all()):
            return "the policy's outputs are non-finite on the last rollout's observations"
        return None

    def _non_finite_rollout(self) -> str | None:
        """Which part of the last rollout is non-finite (NaN or inf), or None."""
        storage = self.storage
        parts = {"rewards": storage.rewards, "values": storage.values, "log-probabilities": storage.log_probs,
                 "advantages": storage.advantages, "returns": storage.returns, "recurrent states": storage.states}
        obs = storage.obs if isinstance(storage.obs, dict) else {"": storage.obs}
        parts.update({f"observations{' ' + key if key else ''}": value for key, value in obs.items()
                      if value.is_floating_point()})
        for name, tensor in parts.items():
            if not torch.isfinite(tensor).all():
                return f"the rollout's {name} are non-finite"
        return None

    # -- interruption --------------------------------------------------------------------
    @property
    def stop_signal(self) -> str | None:
        """Name of the signal (``"SIGINT"``, ``"SIGTERM"``) that stopped training early, else None."""
        return self._stop_signal

    @property
    def stopped_early(self) -> bool:
        """Whether a signal stopped training before ``total_frames`` (a signal during the last update does not)."""
        return self._stop_signal is not None and self.frames < self.config["total_frames"]

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to finish the current update and checkpoint; a second SIGINT aborts."""
        def handler(signum: int, _frame: Any) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        else:
            previous = {}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # -- the loop --------------------------------------------------------------------------
    def run(self, stop_at_frames: int | None = None) -> Path:
        """Train until ``total_frames`` (or a signal, or ``stop_at_frames``) and return the checkpoint path.

        The run directory is locked for the whole call (``agents.run_dir.RunLock``): a second process
        on it is refused. A run stops after the update that reaches ``total_frames``, so it may do up
        to one rollout (``n_steps * n_envs`` frames) more; the progress bar counts to that end.

        A resumed run that has already reached ``total_frames`` trains nothing and rewrites none of its
        files (only a missing numbered checkpoint or ``config.yaml`` is written); ``nothing_to_train``, read
        before, says so.

        :param stop_at_frames: stop after the first update that reaches this many frames, as if
            interrupted (checkpoint written, run resumable).
        :raises TrainingError: on non-finite values in a rollout or an update (the last good checkpoint
            is kept), a failed write (full disk), or a crashed env (a checkpoint is written first).
        :raises RunDirError: if another process holds the run directory, or (for a new run) another
            run has been written there since this trainer was built.
        """
        config, algo = self.config, self.config["algo"]
        total = config["total_frames"]
        # The run's files (checkpoint, config.yaml, TensorBoard events) stay as they are.
        nothing_to_train = self.nothing_to_train
        if not distributed.is_main():  # under torchrun only rank 0 checks and writes the run directory
            return self.run_dir / "checkpoint.pt" if nothing_to_train else \
                self._train(None, total, algo, stop_at_frames)
        with self._lock:
            if not self._started:
                if self._new_run:  # under the lock: nobody wrote a run here since the check in __init__
                    refuse_existing_run(self.run_dir)
                elif self._loaded_from is not None and \
                        _file_identity(self.run_dir / "checkpoint.pt") != self._loaded_from:
                    raise RunDirError(f"the run in {self.run_dir} was trained further by another process after "
                                      f"this one loaded its checkpoint; resume it again with "
                                      f"`python {train_py()} --resume {self.run_dir}`")
                remove_stale_temp_files(self.run_dir)  # left by a killed write; no live writer under the lock
                if self._loaded_from is not None:
                    # A run stopped between checkpoint.pt and its numbered copy (see save): write the copy, so
                    # that an evaluation point at these frames has its checkpoint and the count of frames
                    # trained read from the numbered checkpoints is this run's.
                    if not self._numbered_checkpoint().is_file():
                        self._write_numbered()
                self._started = True
            if nothing_to_train:
                if not (self.run_dir / "config.yaml").is_file():  # lost, or moved aside (_refuse_edited_config)
                    self._write_config()
                return self.run_dir / "checkpoint.pt"
            self._write_config()
            resumed = self.frames > 0
            with self._write_errors(self.run_dir / "metrics.jsonl"):
                logger = RunLogger(self.run_dir, purge_step=self.frames if resumed else None)
            try:
                return self._train(logger, total, algo, stop_at_frames)
            finally:
                logger.close()

    @property
    def nothing_to_train(self) -> bool:
        """A resumed run at or past its ``total_frames`` that ``run`` has not started: it will train nothing
        (under torchrun every rank loaded the same checkpoint, so all agree)."""
        return self._loaded_from is not None and not self._started and self.frames >= self.config["total_frames"]

    def _write_config(self) -> None:
        """Write the run's resolved config to ``config.yaml``, with a header naming what its rounding depends on."""
        config_path = self.run_dir / "config.yaml"
        with self._write_errors(config_path):
            numerics = ", ".join(f"{key} {value}" for key, value in numerics_build(self.policy).items())
            header = (f"# The resolved config of this run (every default filled in).\n"
                      f"# Written by a process with: {numerics}\n")
            atomic_write(config_path, (header + yaml.safe_dump(self.config, sort_keys=False)).encode())

    def _train(self, logger: RunLogger | None, total: int, algo: dict[str, Any], stop_at_frames: int | None) -> Path:
        """The loop of ``run``; ``logger`` is None on ranks other than 0 (they write nothing)."""
        config = self.config
        if self.rollout_state is None:
            self.rollout_state = start_rollouts(self.policy, self.venv)
        next_checkpoint = (self.frames // config["log"]["checkpoint_interval_frames"] + 1) * \
            config["log"]["checkpoint_interval_frames"]
        # The loop stops after the update that reaches total_frames: whole rollouts, so the bar's
        # end is the frame count the run will really reach, not total_frames.
        remaining = max(0, total - self.frames)
        end = self.frames + math.ceil(remaining / self.frames_per_rollout) * self.frames_per_rollout
        # "-" until the first finished episode (mean return), not nan.
        # tqdm's own rate is the frames/s (one speed on the bar: the last update's alone is in metrics.jsonl).
        bar = tqdm(total=end, initial=self.frames, unit="frames", dynamic_ncols=True, postfix="ret=-",
                   disable=not config["log"]["progress_bar"] or logger is None, mininterval=1.0,
                   desc=config["name"])
        checkpoint_path = self.run_dir / "checkpoint.pt"
        try:
            with self._stop_on_signals():
                while self.frames < total:
                    if algo["anneal_lr"]:
                        self.updater.set_lr_scale(1.0 - self.frames / total)
                    started = time.perf_counter()
                    try:
                        self.rollout_state, rollout_stats = collect_rollout(
                            self.policy, self.venv, self.storage, self.rollout_state, algo["gamma"], algo["gae_lambda"]
                        )
                    except (EOFError, BrokenPipeError, ConnectionError) as exc:
                        raise TrainingError(self._env_crash_message(exc)) from None
                    except ValueError as exc:  # torch.distributions refusing NaN logits
                        if "invalid values" not in str(exc) and self._non_finite_policy() is None:
                            raise
                        raise TrainingError(self._stopped(
                            f"the policy gave non-finite action probabilities during the rollout of update "
                            f"{self.updates + 1}")) from None
                    problem = self._non_finite_rollout()
                    if problem is not None:
                        from_env = "rewards" in problem or "observations" in problem
                        raise TrainingError(self._stopped(
                            f"{problem} (update {self.updates + 1})",
                            advice="check the env's rewards and observations, then resume" if from_env else None))
                    collected = time.perf_counter()
                    try:
                        update_stats = self.updater.update(self.storage)
                    except NonFiniteError as exc:
                        raise TrainingError(self._stopped(f"{exc} during update {self.updates + 1}")) from None
                    except ValueError as exc:  # NaN logits while replaying the rollout
                        if "invalid values" not in str(exc) and self._non_finite_policy() is None:
                            raise
                        raise TrainingError(self._stopped(
                            f"the policy's outputs became non-finite during update {self.updates + 1}")) from None
                    bad = [name for name, param in self.policy.named_parameters() if not torch.isfinite(param).all()]
                    if bad:
                        raise TrainingError(self._stopped(
                            f"update {self.updates + 1} made the policy's weights non-finite ({', '.join(bad[:3])})"))
                    ended = time.perf_counter()
                    self.frames += self.frames_per_rollout
                    self.updates += 1
                    self._gather_rollout_stats(rollout_stats)  # every rank's episodes (one process: as is)
                    self.recent_episodes.extend(rollout_stats.episodes)
                    if logger is not None:  # rank 0 alone evaluates (log.eval_envs) and logs
                        evaluation = self._evaluate_if_due()
                        with self._write_errors(self.run_dir / "metrics.jsonl"):
                            self._log(logger, rollout_stats, update_stats, started, collected, ended, evaluation)
                    mean_return = self._mean("r")
                    # The postfix first, then the count: one refresh shows both (no line with stale numbers).
                    bar.set_postfix_str("ret=" + ("-" if math.isnan(mean_return) else f"{mean_return:.2f}"),
                                        refresh=False)
                    bar.update(self.frames - bar.n)
                    self._maybe_switch_task(rollout_stats)
                    if self.frames >= next_checkpoint:
                        self.save()
                        next_checkpoint += config["log"]["checkpoint_interval_frames"]
                    # A signal on any rank stops every rank after this same update (one process: its own).
                    stop_signal = distributed.agree_stop(self._stop_signal)
                    if stop_signal is not None and self._stop_signal is None:
                        self._stop_signal = stop_signal
                    if stop_signal is not None or (stop_at_frames is not None and self.frames >= stop_at_frames):
                        break
                checkpoint_path = self.save()
                distributed.barrier()  # no rank exits (and lets torchrun stop the others) before the checkpoint
        finally:
            bar.close()
        if self.stopped_early and logger is not None:
            launcher = "python" if self.world_size == 1 else f"torchrun --nproc_per_node={self.world_size}"
            tqdm.write(f"{self._stop_signal}: stopped after {self.frames} frames; checkpoint saved to "
                       f"{checkpoint_path}. Resume with: {launcher} {train_py()} --resume {self.run_dir}")
        return checkpoint_path

    def _maybe_switch_task(self, rollout_stats: Any) -> None:
        """Let an updater that trains on a task distribution (meta-PPO) change the envs' task.

        An updater may define ``next_task(frames, rollout_stats) -> (env_id, options) | None``
        (``rollout_stats`` is None when the trainer only asks, at construction). A returned task
        different from the current one becomes the envs' task: the current task's envs are parked
        with their rollout state (observations, core states, episode starts), and the new task's
        parked envs continue where they stopped, or, on its first visit, new envs are built (same
        count; seeds from ``[seed, frames]``, so that no two tasks share level streams) and start
        fresh episodes from a zero core state. Episodes thus run to their end across switches: a
        switch every few rollouts of 32 steps would otherwise cut every episode longer than that
        (DoorKey's run to 250-640 steps), and only the short ones could ever be learned from.
        A resumed run restores the current task's envs and the parked ones (from the env snapshot, with
        their rollout states); a task closed because more than ``MAX_PARKED_TASKS`` were parked starts
        fresh episodes when it comes back.
        """
        next_task = getattr(self.updater, "next_task", None)
        if next_task is None:
            return
        task = next_task(self.frames, rollout_stats)
        if task is None or task == self.task:
            return
        parked = self.parked_tasks.pop(_task_key(task), None)
        if parked is None:
            env_id, options = task
            venv = self.make_envs(env_id, options, seed=[self.config["seed"], self.frames])
            if (venv.observation_space, venv.action_space) != (self.venv.observation_space, self.venv.action_space):
                venv.close()
                raise ConfigError(f"task {env_id!r} has other observation/action spaces than the current task; "
                                  "all tasks of a run must share them")
            parked = (venv, start_rollouts(self.policy, venv))
        if self.rollout_state is not None:
            self.parked_tasks[_task_key(self.task)] = (self.venv, self.rollout_state)
            if len(self.parked_tasks) > MAX_PARKED_TASKS:  # a long task list: the least recently run restarts
                oldest = next(iter(self.parked_tasks))
                self.parked_tasks.pop(oldest)[0].close()
        else:
            self.venv.close()
        (self.venv, self.rollout_state), self.task = parked, task

    def _env_crash_message(self, exc: BaseException) -> str:
        base = _base_venv(self.venv)
        crashed = ""
        if isinstance(base, SubprocVecEnv):
            dead = [(i, p.exitcode) for i, p in enumerate(base.processes) if not p.is_alive()]
            crashed = ", ".join(f"env {i} (exit code {code})" for i, code in dead)
        # The weights are those of the last finished update; a resume starts fresh episodes.
        self.rollout_state = None
        (self.run_dir / ENVS_STATE_FILE).unlink(missing_ok=True)
        saved = self.save(snapshot_envs=False)
        return (f"a subprocess env of {self.config['env']['id']!r} crashed: {crashed or type(exc).__name__}. "
                f"Checkpoint saved to {saved}; resume with: python {train_py()} --resume {self.run_dir}")

    def _gather_rollout_stats(self, rollout_stats: Any) -> None:
        """Under torchrun, replace a rollout's episodes by every rank's (rank order) and average module activity.

        Every rank then logs, checkpoints and feeds the task schedule (meta-PPO's curriculum) the
        same episodes, so the ranks stay in step; in one process nothing changes.
        """
        if not distributed.active():
            return
        active = {key: value.cpu() for key, value in rollout_stats.active_fraction.items()}
        gathered = distributed.gather_objects((rollout_stats.episodes, active))
        rollout_stats.episodes = [episode for episodes, _ in gathered for episode in episodes]
        rollout_stats.active_fraction = {key: torch.stack([fractions[key] for _, fractions in gathered]).mean(0)
                                         for key in active}

    def _mean(self, key: str) -> float:
        values = [episode[key] for episode in self.recent_episodes if key in episode]
        return float(np.mean(values)) if values else float("nan")

    def _log(self, logger: RunLogger, rollout_stats: Any, update_stats: dict[str, float],
             started: float, collected: float, ended: float, evaluation: dict[str, float] | None = None) -> None:
        # Plain keys go under train/; keys that already name a section ("meta/task_index") stay as they are.
        scalars: dict[str, float] = {key if "/" in key else f"train/{key}": value
                                     for key, value in update_stats.items() if isinstance(value, (int, float))}
        if rollout_stats.episodes:
            scalars["rollout/ep_return_mean"] = self._mean("r")
            # This rollout's episodes alone (the window above mixes in older ones): the per-rollout
            # learning curve that agents/adaptation.py measures adaptation on.
            scalars["rollout/ep_return_rollout"] = float(np.mean([e["r"] for e in rollout_stats.episodes]))
            scalars["rollout/ep_length_mean"] = self._mean("l")
            if any("is_success" in e for e in self.recent_episodes):
                scalars["rollout/success_rate"] = self._mean("is_success")
            scalars["rollout/episodes"] = float(len(rollout_stats.episodes))
        for key, fraction in rollout_stats.active_fraction.items():
            for module, value in enumerate(fraction.tolist()):
                scalars[f"modules/{key}_fraction/{module}"] = value
        scalars["time/fps"] = self.frames_per_rollout / (ended - started)
        scalars["time/rollout_seconds"] = collected - started
        scalars["time/update_seconds"] = ended - collected
        scalars["time/updates"] = float(self.updates)
        scalars.update(evaluation or {})
        logger.log(self.frames, scalars)


def train(config: dict[str, Any], run_dir: str | Path | None = None) -> Path:
    """Train a new agent; return the path of its final checkpoint.

    :param config: a resolved config (``agents.config.load_config``).
    :param run_dir: output directory; by default ``runs/<config name>``, or ``runs/<config name>_2``,
        ``_3``, ... when that holds a run already.
    :raises RunDirError: if ``run_dir`` holds a run or is in use (a new run never writes into one).
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config["name"])
    return Trainer(config, run_dir).run()
