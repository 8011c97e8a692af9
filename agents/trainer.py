"""The training loop: rollouts, updates, logging, checkpoints, interruption and resume.

Read ``Trainer.run`` top to bottom for the whole algorithm around the update rule:
collect a rollout with the current policy, compute GAE, let the updater (PPO, A2C,
meta-PPO) change the parameters, log, and checkpoint at intervals.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import pickle
import random
import signal
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

from agents.a2c import RecurrentA2C
from agents.config import PPO_ONLY_KEYS, ConfigError, merge, resolve_config
from agents.logger import RunLogger
from agents.optim import NonFiniteError, PolicyUpdater
from agents.ppo import RecurrentPPO
from agents.rollout import RolloutState, collect_rollout, start_rollouts
from agents.storage import RolloutStorage
from envs import check_env_id, make_vec_env
from policies.actor_critic import RecurrentActorCritic, obs_to_tensor
from policies.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, space_to_dict

try:
    PACKAGE_VERSION = metadata.version("modular-memory-rl")
except metadata.PackageNotFoundError:  # running from a source checkout that was not installed
    PACKAGE_VERSION = "0.1.0"

# Update rules by ``algo.name``; agents.meta adds "meta_ppo" and "multitask_ppo". A rule with a
# ``from_config(config, policy, generator)`` classmethod is built by it, others as (policy, algo, generator=...).
UPDATERS: dict[str, type[PolicyUpdater]] = {"ppo": RecurrentPPO, "a2c": RecurrentA2C}

ENVS_STATE_FILE = "envs_state.pkl"


def snapshot_key() -> bytes:
    """This user's secret key for authenticating env snapshots, created on first use (mode 600)."""
    path = Path(os.environ.get("MODULAR_RL_KEY_FILE", Path.home() / ".cache" / "modular-memory-rl" / "snapshot.key"))
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(32))
    return path.read_bytes()


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must see (non-finite loss, crashed env); work is saved."""


def env_options(env_config: dict[str, Any]) -> dict[str, Any]:
    """The ``make_vec_env`` keyword options of an ``env`` config section (all but id and n_envs)."""
    return {key: value for key, value in env_config.items() if key not in ("id", "n_envs")}


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


def _base_venv(venv: VecEnv) -> VecEnv:
    while isinstance(venv, VecEnvWrapper):
        venv = venv.venv
    return venv


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
    """

    def __init__(self, config: dict[str, Any], run_dir: str | Path, checkpoint: dict[str, Any] | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        seed = config["seed"]
        if config["torch_threads"]:
            torch.set_num_threads(config["torch_threads"])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.device = torch.device(config["device"])
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA GPU is available; use device=cpu")

        env_config = config["env"]
        try:
            check_env_id(env_config["id"])
        except ValueError as exc:
            raise ConfigError(f"env.id: {exc}") from None
        # The (env id, make_vec_env options) being trained on; meta-learning changes it between updates.
        self.task: tuple[str, dict[str, Any]] = (env_config["id"], env_options(env_config))
        if checkpoint is not None:
            self.task = (checkpoint["env"]["id"], checkpoint["env"]["options"])
        self.venv = self._restore_envs(checkpoint) if checkpoint is not None else None
        envs_restored = self.venv is not None
        if self.venv is None:
            self.venv = self.make_envs(*self.task)
        self.policy = build_policy(config, self.venv.observation_space, self.venv.action_space).to(self.device)
        algo = config["algo"]
        updater_cls = UPDATERS[algo["name"]]
        if hasattr(updater_cls, "from_config"):
            # An updater that needs more than the algo section (meta-PPO: the meta section) reads the config.
            self.updater = updater_cls.from_config(config, self.policy, self.generator)
        else:
            self.updater = updater_cls(self.policy, algo, generator=self.generator)
        self.storage = RolloutStorage(algo["n_steps"], env_config["n_envs"], self.venv.observation_space,
                                      self.venv.action_space, self.policy.state_size, self.device)
        self.frames_per_rollout = algo["n_steps"] * env_config["n_envs"]
        self.frames = 0
        self.updates = 0
        self.rollout_state: RolloutState | None = None
        self.recent_episodes: deque[dict[str, float]] = deque(maxlen=config["log"]["return_window"])
        self._stop_signal: str | None = None
        if checkpoint is not None:
            try:
                self._load_training_state(checkpoint, envs_restored)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"cannot resume from the checkpoint in {self.run_dir}: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
        # An updater with a task schedule (meta-PPO) may start on another task than env.id.
        self._maybe_switch_task(None)

    # -- construction helpers -------------------------------------------------------------
    def make_envs(self, env_id: str, options: dict[str, Any], seed: int | None = None) -> VecEnv:
        """Build the training vec env (reward clipping on; evaluation builds its own without).

        :param seed: base env seed, the config's ``seed`` by default.
        """
        env_config = self.config["env"]
        seed = self.config["seed"] if seed is None else seed
        try:
            return make_vec_env(env_id, env_config["n_envs"], seed, clip_rewards=True, **options)
        except (ValueError, TypeError) as exc:  # TypeError: env.env_kwargs the env does not take
            raise ConfigError(f"env: {exc}") from None

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict[str, Any] | None = None) -> Trainer:
        """Rebuild a trainer from ``run_dir/checkpoint.pt`` with the run's own config.

        :param run_dir: a run directory written by an earlier ``Trainer``.
        :param overrides: only ``total_frames`` may change on resume (to extend a run).
        :raises CheckpointError: if the checkpoint is unusable; ConfigError for a bad override.
        """
        checkpoint = load_checkpoint(Path(run_dir) / "checkpoint.pt")
        for key in overrides or {}:
            if key != "total_frames":
                raise ConfigError(f"{key} cannot change on --resume (only total_frames can); start a new run")
        if not isinstance(checkpoint.get("config"), dict):
            raise CheckpointError(f"the checkpoint in {run_dir} holds no training config to resume with")
        saved = checkpoint["config"]
        if isinstance(saved.get("algo"), dict) and saved["algo"].get("name") == "a2c":
            # Runs saved before A2C refused the PPO-only keys carry them (ignored then): drop them.
            saved = {**saved, "algo": {k: v for k, v in saved["algo"].items() if k not in PPO_ONLY_KEYS}}
        try:
            config = resolve_config(merge(saved, overrides or {}))
        except ConfigError as exc:
            raise ConfigError(f"cannot resume {run_dir}: {exc}") from None
        return cls(config, run_dir, checkpoint=checkpoint)

    def _restore_envs(self, checkpoint: dict[str, Any]) -> VecEnv | None:
        """Unpickle the envs saved with the checkpoint, if this user wrote them and they match it.

        The snapshot is a pickle (the envs' RNGs and unfinished episodes), so it is only read when
        its HMAC under this user's local key (``snapshot_key``) checks out: a run directory copied
        from someone else resumes with fresh episodes instead of running their pickle.
        """
        path = self.run_dir / ENVS_STATE_FILE
        if not path.is_file():
            return None
        blob = path.read_bytes()
        tag, body = blob[:32], blob[32:]
        if not hmac.compare_digest(tag, hmac.new(snapshot_key(), body, hashlib.sha256).digest()):
            tqdm.write(f"warning: {path} was not written by this user; resuming with fresh episodes")
            return None
        try:
            saved = pickle.loads(body)  # authenticated above: this user wrote it
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError):
            return None
        if saved.get("frames") != checkpoint["frames"]:
            return None  # a kill between the snapshot and the checkpoint: the envs moved on since
        return saved["venv"]

    def _load_training_state(self, checkpoint: dict[str, Any], envs_restored: bool) -> None:
        self.policy.load_state_dict(checkpoint["policy"]["state_dict"])
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

        :param snapshot_envs: also pickle the envs (in-process envs only) for an exact resume.
        """
        if snapshot_envs and isinstance(_base_venv(self.venv), DummyVecEnv):
            try:
                blob = pickle.dumps({"frames": self.frames, "venv": self.venv})
            except (pickle.PicklingError, TypeError, AttributeError):
                blob = None  # an env that cannot be pickled: resume will start fresh episodes
            if blob is not None:
                tag = hmac.new(snapshot_key(), blob, hashlib.sha256).digest()
                self._atomic_write(self.run_dir / ENVS_STATE_FILE, tag + blob)
        numbered = self.run_dir / "checkpoints" / f"checkpoint_{self.frames:012d}.pt"
        save_checkpoint(numbered, self.checkpoint_payload())
        latest = self.run_dir / "checkpoint.pt"
        tmp = self.run_dir / ".checkpoint.pt.link"
        tmp.unlink(missing_ok=True)
        try:
            os.link(numbered, tmp)  # a second name for the same bytes, swapped in atomically
            os.replace(tmp, latest)
        except OSError:
            save_checkpoint(latest, self.checkpoint_payload())
        kept = sorted((self.run_dir / "checkpoints").glob("checkpoint_*.pt"))
        for old in kept[: -self.config["log"]["keep_checkpoints"]]:
            old.unlink()
        return latest

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    # -- interruption --------------------------------------------------------------------
    @property
    def stop_signal(self) -> str | None:
        """Name of the signal (``"SIGINT"``, ``"SIGTERM"``) that stopped training early, else None."""
        return self._stop_signal

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

        :param stop_at_frames: stop after the first update that reaches this many frames, as if
            interrupted (checkpoint written, run resumable).
        :raises TrainingError: on a non-finite loss or gradient (the last good checkpoint is kept) or a
            crashed env (a checkpoint is written first).
        """
        config, algo = self.config, self.config["algo"]
        total = config["total_frames"]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        resumed = self.frames > 0
        logger = RunLogger(self.run_dir, purge_step=self.frames if resumed else None)
        if self.rollout_state is None:
            self.rollout_state = start_rollouts(self.policy, self.venv)
        next_checkpoint = (self.frames // config["log"]["checkpoint_interval_frames"] + 1) * \
            config["log"]["checkpoint_interval_frames"]
        bar = tqdm(total=total, initial=min(self.frames, total), unit="frames", dynamic_ncols=True,
                   disable=not config["log"]["progress_bar"], mininterval=1.0, desc=config["name"])
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
                    collected = time.perf_counter()
                    try:
                        update_stats = self.updater.update(self.storage)
                    except NonFiniteError as exc:
                        kept = (f"The last good checkpoint is kept at {checkpoint_path} (not overwritten); "
                                f"lower algo.lr or algo.max_grad_norm, then resume with --resume."
                                if checkpoint_path.exists() else "No checkpoint had been written yet.")
                        raise TrainingError(f"training stopped at {self.frames} frames: {exc} during update "
                                            f"{self.updates + 1}. {kept}") from None
                    ended = time.perf_counter()
                    self.frames += self.frames_per_rollout
                    self.updates += 1
                    self.recent_episodes.extend(rollout_stats.episodes)
                    self._log(logger, rollout_stats, update_stats, started, collected, ended)
                    bar.update(min(self.frames, total) - bar.n)
                    bar.set_postfix(fps=f"{self.frames_per_rollout / (ended - started):.0f}",
                                    ret=f"{self._mean('r'):.2f}", refresh=False)
                    self._maybe_switch_task(rollout_stats)
                    if self.frames >= next_checkpoint:
                        self.save()
                        next_checkpoint += config["log"]["checkpoint_interval_frames"]
                    if self._stop_signal is not None or (stop_at_frames is not None and self.frames >= stop_at_frames):
                        break
                checkpoint_path = self.save()
        finally:
            bar.close()
            logger.close()
        if self._stop_signal is not None:
            tqdm.write(f"{self._stop_signal}: stopped after {self.frames} frames; checkpoint saved to "
                       f"{checkpoint_path}. Resume with: python train.py --resume {self.run_dir}")
        return checkpoint_path

    def _maybe_switch_task(self, rollout_stats: Any) -> None:
        """Let an updater that trains on a task distribution (meta-PPO) change the envs' task.

        An updater may define ``next_task(frames, rollout_stats) -> (env_id, options) | None``
        (``rollout_stats`` is None when the trainer only asks, at construction); a returned task
        different from the current one replaces the envs (same count; base seed ``seed + frames``,
        so a task visited again gets new levels rather than replaying the same ones), and the next
        rollout starts fresh episodes from a zero core state.
        """
        next_task = getattr(self.updater, "next_task", None)
        if next_task is None:
            return
        task = next_task(self.frames, rollout_stats)
        if task is None or task == self.task:
            return
        env_id, options = task
        venv = self.make_envs(env_id, options, seed=self.config["seed"] + self.frames)
        if (venv.observation_space, venv.action_space) != (self.venv.observation_space, self.venv.action_space):
            venv.close()
            raise ConfigError(f"task {env_id!r} has other observation/action spaces than the current task; "
                              "all tasks of a run must share them")
        self.venv.close()
        self.venv, self.task = venv, task
        self.rollout_state = start_rollouts(self.policy, self.venv)

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
                f"Checkpoint saved to {saved}; resume with: python train.py --resume {self.run_dir}")

    def _mean(self, key: str) -> float:
        values = [episode[key] for episode in self.recent_episodes if key in episode]
        return float(np.mean(values)) if values else float("nan")

    def _log(self, logger: RunLogger, rollout_stats: Any, update_stats: dict[str, float],
             started: float, collected: float, ended: float) -> None:
        # Plain keys go under train/; keys that already name a section ("meta/task_index") stay as they are.
        scalars: dict[str, float] = {key if "/" in key else f"train/{key}": value
                                     for key, value in update_stats.items() if isinstance(value, (int, float))}
        if rollout_stats.episodes:
            scalars["rollout/ep_return_mean"] = self._mean("r")
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
        logger.log(self.frames, scalars)


def train(config: dict[str, Any], run_dir: str | Path | None = None) -> Path:
    """Train a new agent; return the path of its final checkpoint.

    :param config: a resolved config (``agents.config.load_config``).
    :param run_dir: output directory, ``runs/<config name>`` by default.
    """
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / config["name"]
    return Trainer(config, run_dir).run()
