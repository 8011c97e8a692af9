"""Rollout storage for recurrent agents and GAE(lambda).

The storage keeps, for each step t and env b, the observation, the action, its
log-probability and value at collection time, the reward, whether observation t
starts a new episode, and the core state entering step t. Minibatches are whole
env sequences (or fixed-length chunks) together with the state they start from,
so the update replays exactly what the rollout computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from policies.actor_critic import Observation


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    episode_starts: Tensor,
    last_values: Tensor,
    last_episode_starts: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over a (T, B) rollout.

    An episode that ended after step t (``episode_starts[t + 1]`` true) does not
    bootstrap from step t + 1. Time-limit truncations also end the episode here;
    the caller bootstraps them by adding ``gamma * V(final observation)`` to the
    reward of the truncated step, so a truncated episode is not treated as a
    terminal one.

    :param rewards: ``(T, B)`` rewards (truncation bootstrap already added).
    :param values: ``(T, B)`` value estimates at collection time.
    :param episode_starts: ``(T, B)`` bool; true where observation t begins an episode.
    :param last_values: ``(B,)`` values of the observation after the last step.
    :param last_episode_starts: ``(B,)`` bool; true where that observation begins an episode.
    :param gamma: discount factor.
    :param gae_lambda: GAE's lambda (1 gives Monte-Carlo returns, 0 one-step TD).
    :return: ``(advantages, returns)``, each ``(T, B)``; returns = advantages + values.
    """
    n_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    next_non_terminal = 1.0 - last_episode_starts.float()
    next_values = last_values
    running = torch.zeros_like(last_values)
    for t in reversed(range(n_steps)):
        delta = rewards[t] + gamma * next_values * next_non_terminal - values[t]
        running = delta + gamma * gae_lambda * next_non_terminal * running
        advantages[t] = running
        next_non_terminal = 1.0 - episode_starts[t].float()
        next_values = values[t]
    return advantages, advantages + values


@dataclass
class Minibatch:
    """Sequences for one gradient step; every tensor is time first, ``(L, N, ...)``."""

    obs: Observation
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    episode_starts: Tensor
    initial_state: Tensor  # (N, state_size): the core state entering the first step


def _torch_dtype(space: spaces.Box) -> torch.dtype:
    return torch.from_numpy(np.zeros((), dtype=space.dtype)).dtype


class RolloutStorage:
    """Fixed-size buffer of ``n_steps`` steps of ``n_envs`` envs.

    :param n_steps: steps per env per rollout (T).
    :param n_envs: number of envs (B).
    :param observation_space: single-env observation space (Box or Dict of Boxes).
    :param action_space: single-env action space (Discrete or Box).
    :param state_size: width of the core's flat state.
    :param device: where the tensors live.
    """

    def __init__(
        self,
        n_steps: int,
        n_envs: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        state_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_steps, self.n_envs = n_steps, n_envs

        def alloc(space: spaces.Box) -> Tensor:
            # Observations keep their dtype: uint8 frames stay 4x smaller than float.
            return torch.zeros(n_steps, n_envs, *space.shape, dtype=_torch_dtype(space), device=device)

        if isinstance(observation_space, spaces.Dict):
            self.obs: Observation = {key: alloc(sub) for key, sub in observation_space.spaces.items()}
        else:
            self.obs = alloc(observation_space)
        if isinstance(action_space, spaces.Discrete):
            self.actions = torch.zeros(n_steps, n_envs, dtype=torch.long, device=device)
        else:
            self.actions = torch.zeros(n_steps, n_envs, *action_space.shape, device=device)
        shape = (n_steps, n_envs)
        self.log_probs = torch.zeros(shape, device=device)
        self.values = torch.zeros(shape, device=device)
        self.rewards = torch.zeros(shape, device=device)
        self.episode_starts = torch.zeros(shape, dtype=torch.bool, device=device)
        self.states = torch.zeros(n_steps, n_envs, state_size, device=device)
        self.advantages = torch.zeros(shape, device=device)
        self.returns = torch.zeros(shape, device=device)

    def add(
        self,
        t: int,
        obs: Observation,
        action: Tensor,
        log_prob: Tensor,
        value: Tensor,
        reward: Tensor,
        episode_start: Tensor,
        state: Tensor,
    ) -> None:
        """Store step ``t`` for all envs; ``state`` is the core state entering step t."""
        if isinstance(obs, dict):
            for key, value_t in obs.items():
                self.obs[key][t] = value_t
        else:
            self.obs[t] = obs
        self.actions[t] = action
        self.log_probs[t] = log_prob
        self.values[t] = value
        self.rewards[t] = reward
        self.episode_starts[t] = episode_start
        self.states[t] = state

    def compute_returns_and_advantages(
        self, last_values: Tensor, last_episode_starts: Tensor, gamma: float, gae_lambda: float
    ) -> None:
        """Fill ``advantages`` and ``returns`` with GAE(lambda) (see ``compute_gae``)."""
        self.advantages, self.returns = compute_gae(
            self.rewards, self.values, self.episode_starts, last_values, last_episode_starts, gamma, gae_lambda
        )

    def minibatches(
        self, num_minibatches: int, seq_len: int | None = None, generator: torch.Generator | None = None
    ) -> Iterator[Minibatch]:
        """Yield shuffled minibatches of sequences with their start states.

        :param num_minibatches: how many minibatches one pass over the rollout makes.
        :param seq_len: None for whole env sequences (each minibatch holds n_envs / num_minibatches
            of them), or a chunk length dividing n_steps (each chunk starts from the stored state
            at its first step).
        :param generator: random generator for the shuffle (seeded by the trainer for reproducibility).
        """
        length = self.n_steps if seq_len is None else seq_len
        if self.n_steps % length != 0:
            raise ValueError(f"algo.seq_len={length} must divide algo.n_steps={self.n_steps}")
        n_chunks = self.n_steps // length

        def chunked(x: Tensor) -> Tensor:
            # (T, B, ...) -> (L, n_chunks * B, ...): chunk c of env b is column c * B + b.
            return x.reshape(n_chunks, length, self.n_envs, *x.shape[2:]).transpose(0, 1).flatten(1, 2)

        n_sequences = n_chunks * self.n_envs
        if n_sequences % num_minibatches != 0:
            raise ValueError(
                f"algo.num_minibatches={num_minibatches} must divide the {n_sequences} sequences of a rollout"
            )
        obs = {k: chunked(v) for k, v in self.obs.items()} if isinstance(self.obs, dict) else chunked(self.obs)
        actions, log_probs, values = chunked(self.actions), chunked(self.log_probs), chunked(self.values)
        advantages, returns = chunked(self.advantages), chunked(self.returns)
        episode_starts = chunked(self.episode_starts)
        start_states = self.states[::length].flatten(0, 1)  # (n_chunks * B, state_size)

        order = torch.randperm(n_sequences, generator=generator)
        for idx in order.view(num_minibatches, -1):
            idx = idx.to(actions.device)
            yield Minibatch(
                obs={k: v[:, idx] for k, v in obs.items()} if isinstance(obs, dict) else obs[:, idx],
                actions=actions[:, idx],
                log_probs=log_probs[:, idx],
                values=values[:, idx],
                advantages=advantages[:, idx],
                returns=returns[:, idx],
                episode_starts=episode_starts[:, idx],
                initial_state=start_states[idx],
            )
