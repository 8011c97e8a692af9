"""Recurrent actor-critic: encoder -> recurrent core -> actor head and critic head.

Both heads read the core's output, never the encoder's features directly, so the
action distribution and the value depend on the core's state (a released RIMs
Atari policy fed the CNN features to the heads and its RIMs never learned).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Normal

from policies.cores import make_core
from policies.encoders import make_encoder

Observation = Tensor | dict[str, Tensor]


def obs_to_tensor(obs: np.ndarray | dict[str, np.ndarray], device: torch.device | str) -> Observation:
    """Convert a numpy observation batch (array or dict of arrays) to tensors, keeping dtypes."""
    if isinstance(obs, dict):
        return {key: torch.as_tensor(value, device=device) for key, value in obs.items()}
    return torch.as_tensor(obs, device=device)


def _flatten_time(obs: Observation) -> Observation:
    """(T, B, *shape) -> (T*B, *shape), for arrays and dicts of arrays."""
    if isinstance(obs, dict):
        return {key: value.flatten(0, 1) for key, value in obs.items()}
    return obs.flatten(0, 1)


def _add_time(obs: Observation) -> Observation:
    """(B, *shape) -> (1, B, *shape), for arrays and dicts of arrays."""
    if isinstance(obs, dict):
        return {key: value.unsqueeze(0) for key, value in obs.items()}
    return obs.unsqueeze(0)


def _layer_init(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _categorical_act(logits: Tensor, deterministic: bool) -> tuple[Tensor, Tensor]:
    """Actions and their log-probabilities for logits ``(B, n)``: bit for bit what ``Categorical(logits)``'s
    ``sample()`` (or ``probs.argmax``) and ``log_prob`` give, from the same random numbers, without building
    the distribution and its argument checks: they took ~10% of a rollout step's policy time for 16 envs.
    NaN logits raise the ValueError ("invalid values") the distribution would."""
    if bool(logits.isnan().any()):
        raise ValueError("the action logits have invalid values (NaN)")
    log_pmf = logits - logits.logsumexp(dim=-1, keepdim=True)  # Categorical's normalised logits
    probs = log_pmf.softmax(dim=-1)  # Categorical.probs
    actions = probs.argmax(-1) if deterministic else torch.multinomial(probs, 1, True).T[0]
    return actions, log_pmf.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


class DiagGaussian(Distribution):
    """Independent Normal per action dimension whose log_prob and entropy sum over dimensions."""

    def __init__(self, mean: Tensor, log_std: Tensor) -> None:
        self.normal = Normal(mean, log_std.exp().expand_as(mean))
        super().__init__(batch_shape=mean.shape[:-1], validate_args=False)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        return self.normal.sample(torch.Size(sample_shape))

    def log_prob(self, value: Tensor) -> Tensor:
        return self.normal.log_prob(value).sum(-1)

    def entropy(self) -> Tensor:
        return self.normal.entropy().sum(-1)

    @property
    def mean(self) -> Tensor:
        return self.normal.mean

    @property
    def mode(self) -> Tensor:
        return self.normal.mean


class RecurrentActorCritic(nn.Module):
    """Encoder, recurrent core and two heads, run on sequences.

    :param observation_space: the env's single observation space (picks the encoder).
    :param action_space: ``Discrete`` (categorical policy) or a 1-D ``Box`` (diagonal Gaussian).
    :param core: core name, one of ``policies.CORES`` (``"lstm"``, ``"gru"``, ``"rims"``, ``"brims"``, ``"thalnet"``).
    :param core_kwargs: the core's constructor arguments (e.g. ``{"k_active": 4}``).
    :param head_hidden_size: width of the hidden layer of the actor and of the critic.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        core: str = "lstm",
        core_kwargs: dict[str, Any] | None = None,
        head_hidden_size: int = 64,
    ) -> None:
        super().__init__()
        core_kwargs = dict(core_kwargs or {})
        if isinstance(action_space, spaces.Discrete):
            n_outputs = int(action_space.n)
        elif isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
            n_outputs = int(action_space.shape[0])
            self.log_std = nn.Parameter(torch.zeros(n_outputs))
        else:
            raise ValueError(f"action space {action_space} is not supported: use Discrete or a 1-D Box")
        self.observation_space = observation_space
        self.action_space = action_space
        # Plain types only: a checkpoint stores this to rebuild the policy without pickled objects.
        self.spec: dict[str, Any] = {"core": core, "core_kwargs": core_kwargs, "head_hidden_size": head_hidden_size}

        self.encoder = make_encoder(observation_space)
        self.core = make_core(core, self.encoder.output_size, **core_kwargs)
        self.spec["core_revision"] = self.core.revision  # what the core computes (RecurrentCore.revision)
        width = self.core.output_size
        self.actor = nn.Sequential(
            _layer_init(nn.Linear(width, head_hidden_size), np.sqrt(2)),
            nn.Tanh(),
            _layer_init(nn.Linear(head_hidden_size, n_outputs), 0.01),
        )
        self.critic = nn.Sequential(
            _layer_init(nn.Linear(width, head_hidden_size), np.sqrt(2)),
            nn.Tanh(),
            _layer_init(nn.Linear(head_hidden_size, 1), 1.0),
        )

    @property
    def state_size(self) -> int:
        """Width of the flat recurrent state, ``(B, state_size)``."""
        return self.core.state_size

    def initial_state(self, batch_size: int) -> Tensor:
        """Zero recurrent state for ``batch_size`` envs on the policy's device."""
        return self.core.initial_state(batch_size)

    def _distribution(self, logits: Tensor) -> Distribution:
        if isinstance(self.action_space, spaces.Discrete):
            return Categorical(logits=logits)
        return DiagGaussian(logits, self.log_std)

    def _outputs(
        self, obs: Observation, state: Tensor, episode_starts: Tensor, return_info: bool, final_state: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
        """Encoder, core and heads over ``(T, B)``: ``(actor outputs, values, state, core info)``.

        With ``final_state=False`` the state is None and the core may compute its outputs faster
        (``RecurrentCore.outputs``): for replaying stored sequences, which never use that state.
        """
        T, B = episode_starts.shape
        features = self.encoder(_flatten_time(obs)).view(T, B, -1)
        if final_state:
            core_out = self.core(features, state, episode_starts, return_info=return_info)
            out, state, info = core_out[0], core_out[1], core_out[2] if return_info else {}
        else:
            out, state, info = self.core.outputs(features, state, episode_starts), None, {}
        return self.actor(out), self.critic(out).squeeze(-1), state, info

    def forward(
        self, obs: Observation, state: Tensor, episode_starts: Tensor, return_info: bool = False
    ) -> tuple[Distribution, Tensor, Tensor] | tuple[Distribution, Tensor, Tensor, dict[str, Tensor]]:
        """Run a sequence through encoder, core and heads.

        :param obs: observations ``(T, B, *obs_shape)`` (or a dict of such tensors).
        :param state: core state entering step 0, ``(B, state_size)``.
        :param episode_starts: ``(T, B)`` bool; true resets the state before step t.
        :param return_info: also return the core's diagnostics (time first).
        :return: ``(dist, values, state)``: the action distribution with batch shape ``(T, B)``,
            values ``(T, B)``, and the state after step T-1; plus ``info`` if asked.
        """
        actor_out, values, state, info = self._outputs(obs, state, episode_starts, return_info)
        dist = self._distribution(actor_out)
        if return_info:
            return dist, values, state, info
        return dist, values, state

    def act(
        self,
        obs: Observation,
        state: Tensor,
        episode_starts: Tensor,
        deterministic: bool = False,
        return_info: bool = False,
    ) -> tuple[Tensor, ...] | tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """One step for a batch of envs (no time dimension).

        :param obs: ``(B, *obs_shape)`` observations.
        :param state: ``(B, state_size)``.
        :param episode_starts: ``(B,)`` bool; true where this observation starts a new episode.
        :param deterministic: take the most likely action instead of sampling.
        :param return_info: also return the core's diagnostics (each with a time dimension of 1).
        :return: ``(actions, log_probs, values, new_state)``, each with batch dimension B, plus ``info``.
        """
        actor_out, values, state, info = self._outputs(_add_time(obs), state, episode_starts.unsqueeze(0),
                                                       return_info)
        if isinstance(self.action_space, spaces.Discrete):
            actions, log_probs = _categorical_act(actor_out[0], deterministic)
        else:
            dist = self._distribution(actor_out)
            actions = dist.mode if deterministic else dist.sample()
            log_probs = dist.log_prob(actions)[0]
            actions = actions[0]
        result = (actions, log_probs, values[0], state)
        return (*result, info) if return_info else result

    def predict_values(self, obs: Observation, state: Tensor, episode_starts: Tensor) -> Tensor:
        """Values ``(B,)`` of one step of observations ``(B, *obs_shape)`` (used for bootstrapping)."""
        _, values, _ = self(_add_time(obs), state, episode_starts.unsqueeze(0))
        return values[0]

    def evaluate_actions(
        self, obs: Observation, actions: Tensor, state: Tensor, episode_starts: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Log-probabilities, entropies and values of stored sequences.

        :param obs: ``(T, B, *obs_shape)``; :param actions: ``(T, B, *action_shape)``;
        :param state: the stored state entering step 0, ``(B, state_size)``;
        :param episode_starts: ``(T, B)`` bool.
        :return: ``(log_probs, entropy, values)``, each ``(T, B)``.
        """
        actor_out, values, _, _ = self._outputs(obs, state, episode_starts, return_info=False, final_state=False)
        dist = self._distribution(actor_out)
        return dist.log_prob(actions), dist.entropy(), values
