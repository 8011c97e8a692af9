"""Load a trained policy from its checkpoint file and run it on numpy observations.

    from policies import load_policy
    from agents.evaluation import make_policy_env
    policy = load_policy("runs/doorkey-5x5-rims-ppo/checkpoint.pt")  # or the run directory
    venv = make_policy_env(policy, n_envs=1)                     # the training wrappers, raw rewards
    obs, state, start = venv.reset(), policy.initial_state(1), np.ones(1, bool)
    action, state = policy.act(obs, state, start)

The file alone is enough: the checkpoint stores the actor-critic's constructor
arguments (``spec``), its weights, the observation and action spaces as plain
dicts and the env id and options it was trained with. Nothing in the file is
executed (``load_checkpoint`` reads it with ``torch.load(weights_only=True)``).

This module does not build envs: ``policies`` imports neither ``envs`` nor ``agents``
(DESIGN.md), so the env a policy runs in comes from ``agents.evaluation.make_policy_env``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor
from torch.distributions import Categorical

from policies.actor_critic import RecurrentActorCritic, obs_to_tensor
from policies.checkpoint import CheckpointError, load_checkpoint, non_finite_weights_problem, space_from_dict

__all__ = ["Policy", "check_device", "load_policy"]


class Policy:
    """A trained actor-critic plus what is needed to run it: its env id, env options and spaces.

    ``act`` takes and returns numpy arrays, as a Gymnasium / Stable-Baselines3 vec env gives
    and takes them; the recurrent state is an opaque tensor the caller carries between steps.

    :param model: the actor-critic (put in eval mode: no dropout while acting).
    :param env_id: the gymnasium id the policy was trained on.
    :param env_options: the ``envs.make_vec_env`` keyword options it was trained with.
    :param config: the training config (a plain dict), or ``{}`` when unknown.
    :param device: where the model runs and the state lives.
    :param path: the checkpoint file it was loaded from, if any (for messages).
    """

    def __init__(
        self,
        model: RecurrentActorCritic,
        env_id: str,
        env_options: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        path: Path | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        like = self.initial_state(0)  # what act's state must be, found once: not a new tensor every step
        self._state_kind = (like.dtype, like.device)
        self.env_id = env_id
        self.env_options: dict[str, Any] = dict(env_options or {})
        self.config: dict[str, Any] = dict(config or {})
        self.path = path

    @property
    def observation_space(self) -> spaces.Space:
        """The single-env observation space the policy was trained on."""
        return self.model.observation_space

    @property
    def action_space(self) -> spaces.Space:
        """The single-env action space the policy was trained on."""
        return self.model.action_space

    @property
    def core_name(self) -> str:
        """The recurrent core's config name (``"rims"``, ``"lstm"``, ...)."""
        return str(self.model.spec["core"])

    def initial_state(self, n_envs: int) -> Tensor:
        """Zero recurrent state for ``n_envs`` envs, ``(n_envs, state_size)`` on the policy's device."""
        return self.model.initial_state(n_envs).to(self.device)

    @torch.no_grad()
    def act(
        self,
        obs: np.ndarray | dict[str, np.ndarray],
        state: Tensor,
        episode_start: np.ndarray,
        deterministic: bool = False,
        return_info: bool = False,
        uniforms: np.ndarray | None = None,
    ) -> tuple[np.ndarray, Tensor] | tuple[np.ndarray, Tensor, dict[str, np.ndarray]]:
        """Pick actions for one step of a batch of envs.

        :param obs: observation batch as a vec env returns it, ``(n_envs, *obs_shape)`` (or a dict of such).
        :param state: the state returned by the previous call (``initial_state`` for the first one).
        :param episode_start: ``(n_envs,)`` bool; true where ``obs`` begins a new episode: that
            env's state is reset to zeros before the step (pass the vec env's ``dones`` of the
            previous step, and all true after ``reset()``).
        :param deterministic: take the most likely action instead of sampling one.
        :param return_info: also return the core's diagnostics for this step, numpy arrays with
            the env dimension first (e.g. RIMs ``active`` ``(n_envs, K)``); empty for LSTM/GRU.
        :param uniforms: numbers in (0, 1) to sample with instead of torch's global RNG, one
            per env (``(n_envs,)``) for discrete actions, ``(n_envs, action_dim)`` for Box
            actions; each is turned into an action by the inverse CDF of that env's action
            distribution. Each env's actions can then follow its own random stream, whatever
            other envs share the batch (evaluation seeds every episode this way). Ignored
            when ``deterministic``.
        :return: ``(actions, new_state)``: actions as a numpy array the vec env's ``step``
            accepts (Box actions clipped to the action space's bounds, as SB3 does); plus ``info`` when asked.
        """
        self._check_step(obs, state, episode_start)
        if uniforms is not None and not deterministic:
            u = np.asarray(uniforms, dtype=np.float64)
            if not bool(np.all((u > 0) & (u < 1))):  # 0 and 1 are the distribution's ends: +-inf, or NaN beyond
                raise ValueError(f"uniforms must lie strictly between 0 and 1, got values from {u.min()} to {u.max()}")
        obs_t = obs_to_tensor(obs, self.device)
        starts = torch.as_tensor(np.asarray(episode_start, dtype=bool), device=self.device)
        if uniforms is None or deterministic:
            actions, _, _, state, *info = self.model.act(
                obs_t, state, starts, deterministic=deterministic, return_info=return_info
            )
        else:
            with_time = {k: v.unsqueeze(0) for k, v in obs_t.items()} if isinstance(obs_t, dict) else obs_t.unsqueeze(0)
            dist, _, state, *info = self.model(with_time, state, starts.unsqueeze(0), return_info=return_info)
            actions = _inverse_cdf_sample(dist, torch.as_tensor(np.asarray(uniforms), device=self.device))[0]
        actions_np = actions.cpu().numpy()
        if isinstance(self.action_space, spaces.Box):  # as SB3's predict: within the env's bounds
            actions_np = np.clip(actions_np, self.action_space.low, self.action_space.high)
        if not return_info:
            return actions_np, state
        # Core diagnostics are time first with one step: drop the time dimension.
        step_info = {key: value[0].detach().cpu().numpy() for key, value in info[0].items()}
        return actions_np, state, step_info

    def _check_step(self, obs: Any, state: Any, episode_start: Any) -> None:
        """ValueError naming what ``act``'s arguments should be: a wrong shape used to surface deep in the
        model as another mismatch ("the core was built with input_size=64"), a raw env's dict as a dtype error.

        The observations set the number of envs ``n``; ``state`` must be ``(n, state_size)`` and
        ``episode_start`` ``(n,)``."""
        space = self.observation_space
        if isinstance(space, spaces.Dict) != isinstance(obs, dict):
            if isinstance(obs, dict):
                raise ValueError(f"obs is a dict (keys {', '.join(map(str, obs))}), but this policy takes arrays of "
                                 f"shape (n_envs, {', '.join(map(str, space.shape))}): a raw env's observation? Build "
                                 "the envs with agents.evaluation.make_policy_env(policy), which applies the policy's "
                                 "wrappers")
            raise ValueError(f"obs must be a dict with keys {', '.join(space.spaces)} (a vec env's observation), "
                             f"got {type(obs).__name__}")
        if isinstance(obs, dict) and set(obs) != set(space.spaces):
            raise ValueError(f"obs must have the keys {', '.join(space.spaces)}, got {', '.join(map(str, obs))}")
        parts = obs.items() if isinstance(obs, dict) else [("", obs)]
        sizes = set()
        for key, value in parts:
            shape = tuple(value.shape) if hasattr(value, "shape") else np.shape(value)  # arrays and tensors alike
            want = (space[key] if key else space).shape
            name = f"obs[{key!r}]" if key else "obs"
            if tuple(shape[1:]) != tuple(want):
                raise ValueError(f"{name} must have shape (n_envs, {', '.join(map(str, want))}), got {tuple(shape)}")
            sizes.add(shape[0])
        if len(sizes) > 1:
            raise ValueError(f"obs parts hold different numbers of envs: {sorted(sizes)}")
        n_envs = sizes.pop()
        if n_envs == 0:
            raise ValueError("obs holds no envs: act takes a batch of at least one")
        if not isinstance(state, Tensor):
            raise ValueError(f"state must be a tensor: policy.initial_state({n_envs}) for the first step, then the "
                             f"state act returned; got {type(state).__name__}")
        if tuple(state.shape) != (n_envs, self.model.state_size):
            raise ValueError(f"state must have shape (n_envs, state_size) = ({n_envs}, {self.model.state_size}) for "
                             f"{n_envs} envs' obs, got {tuple(state.shape)}")
        dtype, device = self._state_kind
        if state.dtype != dtype or state.device != device:
            raise ValueError(f"state must be a {dtype} tensor on {device} (as initial_state gives it), got "
                             f"{state.dtype} on {state.device}")
        if np.shape(episode_start) != (n_envs,):
            raise ValueError(f"episode_start must have shape (n_envs,) = ({n_envs},) for {n_envs} envs' obs, got "
                             f"{np.shape(episode_start)}")

    def __repr__(self) -> str:
        source = f", path={str(self.path)!r}" if self.path is not None else ""
        return f"Policy(core={self.core_name!r}, env_id={self.env_id!r}{source})"


def _inverse_cdf_sample(dist: torch.distributions.Distribution, uniforms: Tensor) -> Tensor:
    """Actions ``(1, B, ...)`` from ``dist`` (batch shape ``(1, B)``) by the inverse CDF of ``uniforms``.

    Categorical: the first action whose cumulative probability exceeds u (summed in float64,
    so the last boundary is 1 up to rounding, and clamped to the last action for the rest).
    Diagonal Gaussian: mean + std * sqrt(2) * erfinv(2u - 1) per dimension.
    """
    if isinstance(dist, Categorical):
        cumulative = dist.probs[0].double().cumsum(-1)  # (B, n)
        u = uniforms.double().reshape(-1, 1)
        if u.shape[0] != cumulative.shape[0]:
            raise ValueError(f"uniforms must have one number per env ({cumulative.shape[0]}), got shape "
                             f"{tuple(uniforms.shape)}")
        index = (cumulative <= u).sum(-1).clamp_(max=cumulative.shape[-1] - 1)
        return index.unsqueeze(0)
    normal = dist.normal  # DiagGaussian
    if tuple(uniforms.shape) != tuple(normal.mean.shape[1:]):
        raise ValueError(f"uniforms must have shape (n_envs, action_dim) = {tuple(normal.mean.shape[1:])}, got "
                         f"{tuple(uniforms.shape)}")
    # In float64: a float32 u within ~1.5e-8 of 0 or 1 rounds to it, and erfinv(+-1) made the action +-inf.
    u = uniforms.double()
    z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
    return (normal.mean.double() + normal.stddev.double() * z).to(normal.mean.dtype)


def check_core_revision(spec: dict[str, Any], revision: int, where: object) -> None:
    """Refuse weights trained with another revision of their core's computation (``RecurrentCore.revision``).

    :param spec: the checkpoint's policy spec (no ``core_revision``: revision 1, before it was recorded).
    :param revision: the revision this version of the core computes.
    :raises CheckpointError: naming both revisions.
    """
    saved = spec.get("core_revision", 1)
    if saved != revision:
        raise CheckpointError(
            f"{where} holds a {spec.get('core')} core of revision {saved}, and this version of the package "
            f"computes revision {revision} (see the core's docstring): its weights would run through another "
            f"computation than the one they were trained for; retrain it, or use the package version that wrote it"
        )


def policy_from_checkpoint(
    data: dict[str, Any], device: str | torch.device = "cpu", path: Path | None = None
) -> Policy:
    """Rebuild a :class:`Policy` from a loaded checkpoint dict (``policies.checkpoint.load_checkpoint``).

    :param data: the checkpoint dict.
    :param device: where to put the model.
    :param path: the file it came from, for messages.
    :raises CheckpointError: when a field is missing or the weights do not fit the stored spec.
    """
    where = path if path is not None else "checkpoint"
    try:
        spec = data["policy"]["spec"]
        state_dict = data["policy"]["state_dict"]
        env_id = data["env"]["id"]
        env_options = data["env"].get("options", {})
        stored_spaces = [data["observation_space"], data["action_space"]]
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where} is missing a field needed to rebuild the policy: {exc}") from None
    try:
        observation_space, action_space = (space_from_dict(stored) for stored in stored_spaces)
    except (KeyError, TypeError, ValueError, AttributeError, AssertionError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{where} stores an observation or action space gymnasium cannot build ({detail}): "
                              "not as training writes it") from None
    problem = non_finite_weights_problem(state_dict)
    if problem is not None:
        raise CheckpointError(f"{where} {problem}: the file was changed after it was written; use another "
                              "checkpoint of the run")
    # Training writes these as a str and dicts; anything else is a file edited or damaged by hand.
    malformed = [f"{name} is a {type(value).__name__}" for name, value, kind in (
        ("env.id", env_id, str), ("env.options", env_options, dict), ("config", data.get("config", {}), dict))
        if not isinstance(value, kind)]
    if malformed:
        raise CheckpointError(f"{where} has malformed fields ({', '.join(malformed)}): not as training writes them")
    try:
        model = RecurrentActorCritic(
            observation_space,
            action_space,
            core=spec["core"],
            core_kwargs=spec.get("core_kwargs", {}),
            head_hidden_size=spec.get("head_hidden_size", 64),
        )
        model.load_state_dict(state_dict)
    except (KeyError, TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        # RuntimeError: load_state_dict's missing/unexpected keys or shape mismatches, e.g. a
        # checkpoint written by a version whose core had other parameters.
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()) or type(exc).__name__
        if len(detail) > 400:
            detail = detail[:400] + " ..."
        raise CheckpointError(
            f"cannot rebuild the policy stored in {where} (written by package version "
            f"{data.get('package_version')}): {detail}"
        ) from None
    check_core_revision(spec, model.core.revision, where)
    return Policy(model, env_id, env_options, data.get("config", {}), device=device, path=path)


# A URL scheme ("https://", "s3://"); also the form Path() leaves of one ("https:/host/...").
# Two letters at least, so a Windows drive ("C:/") is not taken for one.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, refusing one this machine does not have (one clear message).

    :raises ValueError: not a torch device, or CUDA/MPS asked for where there is none.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device {device!r} is not a torch device ({exc}); use 'cpu' or 'cuda'") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch finds no CUDA GPU here "
                         "(torch.cuda.is_available() is False); use device='cpu'")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but this machine has no MPS device; use device='cpu'")
    return parsed


def load_policy(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Policy:
    """Load a trained policy from a checkpoint file or a run directory, without running code from it.

    :param path: a ``checkpoint.pt`` written by training, or the run directory holding one
        (a local path: ``str`` or ``os.PathLike``).
    :param device: where the model runs (``"cpu"`` by default, ``"cuda"`` for a GPU).
    :raises TypeError: if ``path`` is not a path (e.g. an already loaded checkpoint dict:
        use ``policy_from_checkpoint`` for that).
    :raises ValueError: if ``device`` is not one this machine has (e.g. ``"cuda"`` without a GPU).
    :raises CheckpointError: if ``path`` is a URL, or the file is missing, empty, a YAML/text
        file, truncated, unsafe, not a checkpoint of this package, of an incompatible format
        version, or does not hold a usable policy.
    """
    if not isinstance(path, (str, os.PathLike)):
        hint = " (an already loaded checkpoint dict goes to policies.policy.policy_from_checkpoint)" \
            if isinstance(path, dict) else ""
        raise TypeError(f"load_policy takes the path of a checkpoint file or run directory (str or "
                        f"pathlib.Path), got {type(path).__name__}{hint}")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"load_policy takes a str path, got {type(text).__name__}")
    if _URL.match(text):
        raise CheckpointError(f"URLs are not supported ({text}): download the checkpoint and give its local path")
    parsed_device = check_device(device)
    checkpoint = Path(text).expanduser()  # a notebook's "~/runs/x": no shell expanded it
    if checkpoint.is_dir():
        checkpoint = checkpoint / "checkpoint.pt"
    data = load_checkpoint(checkpoint, map_location=parsed_device)
    return policy_from_checkpoint(data, device=parsed_device, path=checkpoint)
