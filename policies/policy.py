"""Load a trained policy from its checkpoint file and run it on numpy observations.

    from policies import load_policy
    policy = load_policy("runs/doorkey-rims/checkpoint.pt")      # or the run directory
    venv = policy.make_env(n_envs=1)                             # the training wrappers, raw rewards
    obs, state, start = venv.reset(), policy.initial_state(1), np.ones(1, bool)
    action, state = policy.act(obs, state, start, deterministic=True)

The file alone is enough: the checkpoint stores the actor-critic's constructor
arguments (``spec``), its weights, the observation and action spaces as plain
dicts and the env id and options it was trained with. Nothing in the file is
executed (``load_checkpoint`` reads it with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from policies.actor_critic import RecurrentActorCritic, obs_to_tensor
from policies.checkpoint import CheckpointError, load_checkpoint, space_from_dict

__all__ = ["Policy", "load_policy"]


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
        :return: ``(actions, new_state)``: actions as a numpy array the vec env's ``step``
            accepts; plus ``info`` when asked.
        """
        obs_t = obs_to_tensor(obs, self.device)
        starts = torch.as_tensor(np.asarray(episode_start, dtype=bool), device=self.device)
        actions, _, _, state, *info = self.model.act(
            obs_t, state, starts, deterministic=deterministic, return_info=return_info
        )
        actions_np = actions.cpu().numpy()
        if not return_info:
            return actions_np, state
        # Core diagnostics are time first with one step: drop the time dimension.
        step_info = {key: value[0].detach().cpu().numpy() for key, value in info[0].items()}
        return actions_np, state, step_info

    def make_env(self, n_envs: int = 1, seed: int = 0, **overrides: Any) -> Any:
        """Build a vector env with the wrappers the policy was trained with.

        Rewards are not clipped (``clip_rewards=False``) unless an override says so, so
        episode returns are raw scores.

        :param n_envs: number of parallel envs.
        :param seed: env i is seeded with ``seed + i``.
        :param overrides: ``envs.make_vec_env`` options replacing the training ones
            (e.g. ``render_mode="rgb_array"``, ``max_episode_steps=100``, ``env_id`` to
            build another env with the same preprocessing).
        :return: a Stable-Baselines3 ``VecEnv``.
        """
        # policies does not import envs (DESIGN.md), but the notebook API asks the policy to build
        # its own env: the import happens here, only when called, so the package layers stay apart.
        from envs import make_vec_env

        env_id = overrides.pop("env_id", self.env_id)
        options = {**self.env_options, "clip_rewards": False, **overrides}
        return make_vec_env(env_id, n_envs, seed, **options)

    def __repr__(self) -> str:
        source = f", path={str(self.path)!r}" if self.path is not None else ""
        return f"Policy(core={self.core_name!r}, env_id={self.env_id!r}{source})"


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
        observation_space = space_from_dict(data["observation_space"])
        action_space = space_from_dict(data["action_space"])
        env_id = data["env"]["id"]
        env_options = data["env"].get("options", {})
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{where} is missing a field needed to rebuild the policy: {exc}") from None
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
    return Policy(model, env_id, env_options, data.get("config", {}), device=device, path=path)


def load_policy(path: str | Path, device: str | torch.device = "cpu") -> Policy:
    """Load a trained policy from a checkpoint file or a run directory, without running code from it.

    :param path: a ``checkpoint.pt`` written by training, or the run directory holding one.
    :param device: where the model runs (``"cpu"`` by default, ``"cuda"`` for a GPU).
    :raises CheckpointError: if the file is missing, truncated, unsafe, not a checkpoint of this
        package, of an incompatible format version, or does not hold a usable policy.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    data = load_checkpoint(path, map_location=device)
    return policy_from_checkpoint(data, device=device, path=path)
