"""Rollout storage, GAE, the ratio-equals-one property and resets during rollouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.config import load_config
from agents.ppo import normalize_advantages
from agents.rollout import collect_rollout, start_rollouts
from agents.storage import RolloutStorage, compute_gae
from agents.trainer import build_policy
from envs import make_vec_env

# Small cores so the whole file runs in seconds on two CPU cores.
SMALL_CORES = {
    "lstm": ["core.hidden_size=32"],
    "gru": ["core.hidden_size=32"],
    "rims": ["core.num_modules=4", "core.module_size=8", "core.k_active=2"],
    "brims": ["core.layers=[{num_modules: 3, module_size: 8, k_active: 2},"
              " {num_modules: 3, module_size: 8, k_active: 1}]"],
    "thalnet": ["core.num_modules=3", "core.module_size=16", "core.center_size_per_module=8"],
}


def small_setup(core: str, n_envs: int = 4, n_steps: int = 24, env_id: str = "MiniGrid-DoorKey-5x5-v0",
                extra: tuple[str, ...] = ()):
    config = load_config(None, [f"core.name={core}", *SMALL_CORES[core], f"env.id={env_id}",
                                f"env.n_envs={n_envs}", f"algo.n_steps={n_steps}", "algo.num_minibatches=2",
                                "algo.seq_len=null", *extra])
    torch.manual_seed(0)
    venv = make_vec_env(env_id, n_envs, seed=3, **{k: v for k, v in config["env"].items() if k not in ("id", "n_envs")})
    policy = build_policy(config, venv.observation_space, venv.action_space)
    storage = RolloutStorage(n_steps, n_envs, venv.observation_space, venv.action_space, policy.state_size)
    return config, venv, policy, storage


def test_gae_matches_hand_computed_example_with_termination_and_truncation() -> None:
    gamma, lam = 0.9, 0.8
    # One env, 4 steps. The episode terminates after step 1 (observation 2 starts a new one).
    # Step 3 is a time-limit truncation: the rollout already added gamma * V(final obs) = 0.9 * 2.0
    # to its reward, and observation 4 (after the rollout) starts a new episode.
    rewards = torch.tensor([[1.0], [0.0], [0.5], [0.0 + 0.9 * 2.0]])
    values = torch.tensor([[0.5], [0.4], [0.3], [0.2]])
    episode_starts = torch.tensor([[True], [False], [True], [False]])
    last_values = torch.tensor([7.0])  # must be ignored: the last step ended an episode
    last_starts = torch.tensor([True])
    adv, ret = compute_gae(rewards, values, episode_starts, last_values, last_starts, gamma, lam)

    d3 = 1.8 - 0.2                    # truncated: bootstrap is inside the reward, no next value
    d2 = 0.5 + 0.9 * 0.2 - 0.3
    d1 = 0.0 - 0.4                    # terminal: no bootstrap from step 2's value
    d0 = 1.0 + 0.9 * 0.4 - 0.5
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1
    a0 = d0 + gamma * lam * a1
    expected = torch.tensor([[a0], [a1], [a2], [a3]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + values)


def test_gae_bootstraps_from_last_value_when_episode_continues() -> None:
    rewards = torch.zeros(2, 1)
    values = torch.zeros(2, 1)
    adv, _ = compute_gae(rewards, values, torch.zeros(2, 1, dtype=torch.bool), torch.tensor([1.0]),
                         torch.tensor([False]), gamma=0.5, gae_lambda=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.25], [0.5]]))


def test_advantage_normalization_per_minibatch_and_per_rollout() -> None:
    # A rollout with one rewarded stretch (env 0) and noise elsewhere, split in two minibatches.
    generator = torch.Generator().manual_seed(0)
    rollout = 0.01 * torch.randn(8, 4, generator=generator)
    rollout[4:, 0] += torch.tensor([0.4, 0.6, 0.8, 1.0])
    without_reward = rollout[:, 1:]
    per_minibatch = normalize_advantages(without_reward, True, rollout)
    per_rollout = normalize_advantages(without_reward, "batch", rollout)
    # Per minibatch, pure noise is blown up to unit scale; over the rollout it stays small beside the reward.
    torch.testing.assert_close(per_minibatch.std(), torch.tensor(1.0))
    assert per_rollout.abs().max() < 0.5 * normalize_advantages(rollout, "batch", rollout).max()
    whole = normalize_advantages(rollout, "batch", rollout)
    torch.testing.assert_close((whole.mean(), whole.std()), (torch.tensor(0.0), torch.tensor(1.0)))
    assert torch.equal(normalize_advantages(rollout, False, rollout), rollout)


def test_advantage_std_floor_limits_how_far_a_rewardless_minibatch_is_scaled_up() -> None:
    generator = torch.Generator().manual_seed(0)
    noise = 0.01 * torch.randn(16, 4, generator=generator)  # value errors only: std ~0.01
    rewarded = noise.clone()
    rewarded[12:, 0] += torch.tensor([0.4, 0.6, 0.8, 1.0])  # std ~0.17
    centred = noise - noise.mean()
    # A floor of 0 is the plain normalisation, bit for bit (the shipped configs' results do not move).
    assert torch.equal(normalize_advantages(noise, True, noise, 0.0), centred / (noise.std() + 1e-8))
    assert torch.equal(normalize_advantages(noise, True, noise), normalize_advantages(noise, True, noise, 0.0))
    # Below the floor the spread is divided by the floor: the noise keeps its small size.
    torch.testing.assert_close(normalize_advantages(noise, True, noise, 0.1), centred / (0.1 + 1e-8))
    assert normalize_advantages(noise, True, noise, 0.1).std() < 0.15
    # Above it nothing changes: a minibatch with a reward is normalised as before.
    assert torch.equal(normalize_advantages(rewarded, True, rewarded, 0.1),
                       normalize_advantages(rewarded, True, rewarded))
    assert torch.equal(normalize_advantages(noise, "batch", rewarded, 0.1),
                       normalize_advantages(noise, "batch", rewarded))


@pytest.mark.parametrize("core", list(SMALL_CORES))
def test_recomputed_log_probs_equal_stored_before_first_update(core: str) -> None:
    _, venv, policy, storage = small_setup(core, extra=("env.max_episode_steps=10",))
    last = start_rollouts(policy, venv)
    for _ in range(2):  # the second rollout starts from a carried, non-zero state
        last, _ = collect_rollout(policy, venv, storage, last, 0.99, 0.95)
    assert storage.episode_starts[1:].any(), "the test needs an episode boundary inside the rollout"
    with torch.no_grad():
        for seq_len in (None, 8):
            replayed = 0
            for batch in storage.minibatches(2, seq_len):
                log_probs, _, values = policy.evaluate_actions(
                    batch.obs, batch.actions, batch.initial_state, batch.episode_starts)
                assert (log_probs - batch.log_probs).abs().max() < 1e-5
                assert (values - batch.values).abs().max() < 1e-5
                replayed += batch.actions.numel()
            assert replayed == storage.n_steps * storage.n_envs, "the minibatches must cover the whole rollout"


@pytest.mark.parametrize("seq_len, num_minibatches", [(None, 2), (None, 4), (8, 2), (8, 6)])
def test_minibatches_are_a_shuffled_partition_of_the_rollout_with_aligned_fields(
        seq_len: int | None, num_minibatches: int) -> None:
    """Every step lands in exactly one minibatch of a pass, each field of it from the same step, and each
    sequence starts from the state stored at its first step."""
    _, _, _, storage = small_setup("lstm", n_envs=4, n_steps=24)
    ids = torch.arange(storage.n_steps * storage.n_envs).reshape(storage.n_steps, storage.n_envs)  # t * B + b
    storage.actions = ids.clone()
    storage.advantages, storage.returns, storage.log_probs = ids.float(), -ids.float(), 0.5 * ids.float()
    storage.states = ids.float()[:, :, None].expand_as(storage.states).clone()
    seen = []
    for batch in storage.minibatches(num_minibatches, seq_len, torch.Generator().manual_seed(1)):
        assert torch.equal(batch.advantages, batch.actions.float()) and torch.equal(batch.returns, -batch.advantages)
        assert torch.equal(batch.log_probs, 0.5 * batch.advantages)
        assert torch.equal(batch.initial_state[:, 0], batch.actions[0].float())  # the state entering step 0
        assert torch.equal(batch.actions[1:] - batch.actions[:-1],
                           torch.full_like(batch.actions[1:], storage.n_envs))  # consecutive steps of one env
        seen.append(batch.actions.flatten())
    assert len(seen) == num_minibatches
    assert torch.equal(torch.cat(seen).sort().values, ids.flatten())


def test_replay_runs_the_lstm_in_one_kernel_call_per_minibatch() -> None:
    """evaluate_actions (every update's replay) asks the core for its outputs only (RecurrentCore.outputs):
    the LSTM then runs a minibatch with resets inside in one kernel call instead of one per stretch."""
    _, venv, policy, storage = small_setup("lstm", extra=("env.max_episode_steps=10",))
    collect_rollout(policy, venv, storage, start_rollouts(policy, venv), 0.99, 0.95)
    batch = next(iter(storage.minibatches(1, None)))
    assert batch.episode_starts[1:].any(), "the test needs an episode boundary inside the rollout"
    calls: list[int] = []
    run_rnn = policy.core._run_rnn
    policy.core._run_rnn = lambda x, rnn_state: (calls.append(x.shape[0]), run_rnn(x, rnn_state))[1]
    policy.evaluate_actions(batch.obs, batch.actions, batch.initial_state, batch.episode_starts)
    assert calls == [storage.n_steps]
    policy(batch.obs, batch.initial_state, batch.episode_starts)  # forward: one call per stretch, exact state
    assert len(calls) > 2


def test_core_state_resets_exactly_at_episode_starts_during_rollout() -> None:
    _, venv, policy, storage = small_setup("rims", extra=("env.max_episode_steps=5",))
    last = start_rollouts(policy, venv)
    collect_rollout(policy, venv, storage, last, 0.99, 0.95)
    starts = storage.episode_starts
    # max_episode_steps=5: every env starts an episode at steps 0, 5, 10, ... (unless it ended earlier).
    assert starts[5].all() and starts[10].all()
    with torch.no_grad():
        for t in range(storage.n_steps):
            for b in range(storage.n_envs):
                if not starts[t, b]:
                    continue
                # At an episode start the action distribution must be that of a fresh state...
                fresh, _, _ = policy.evaluate_actions(
                    storage.obs[t : t + 1, b : b + 1], storage.actions[t : t + 1, b : b + 1],
                    policy.initial_state(1), torch.zeros(1, 1, dtype=torch.bool))
                torch.testing.assert_close(fresh[0, 0], storage.log_probs[t, b], atol=1e-5, rtol=0)
    # ...and the stored state entering a start step is the previous episode's (non-zero) state.
    assert storage.states[5].abs().sum() > 0


def test_truncated_step_is_bootstrapped_with_value_of_final_observation() -> None:
    _, venv, policy, storage = small_setup("gru", n_envs=2, n_steps=4, extra=("env.max_episode_steps=3",))
    gamma = 0.9
    raw_rewards: list[np.ndarray] = []
    final_obs: list[np.ndarray] = []
    original_step = venv.step

    def recording_step(actions):
        obs, rewards, dones, infos = original_step(actions)
        raw_rewards.append(rewards.copy())
        final_obs.append(np.stack([info.get("terminal_observation", np.zeros_like(obs[0])) for info in infos]))
        return obs, rewards, dones, infos

    venv.step = recording_step
    collect_rollout(policy, venv, storage, start_rollouts(policy, venv), gamma, 0.95)
    # The third step (t=2) hits the time limit in both envs (DoorKey cannot be solved in 3 steps).
    assert storage.episode_starts[3].all()
    with torch.no_grad():
        # storage.states[3] is the state the final observation was reached with (before the reset).
        expected_bootstrap = gamma * policy.predict_values(
            torch.as_tensor(final_obs[2]), storage.states[3], torch.zeros(2, dtype=torch.bool))
    raw = torch.as_tensor(np.stack(raw_rewards), dtype=torch.float32)
    torch.testing.assert_close(storage.rewards[2], raw[2] + expected_bootstrap)
    torch.testing.assert_close(storage.rewards[[0, 1, 3]], raw[[0, 1, 3]])


def test_act_samples_and_scores_actions_as_the_categorical_distribution_does() -> None:
    """policy.act skips building torch's Categorical; its actions and log-probabilities must be the
    distribution's to the bit, from the same random numbers (the update replays them with Categorical)."""
    from torch.distributions import Categorical

    from policies.actor_critic import _categorical_act

    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        logits = torch.randn(16, 7, generator=generator) * (0.1 + trial % 7)
        torch.manual_seed(trial)
        dist = Categorical(logits=logits)
        actions = dist.sample()
        torch.manual_seed(trial)
        ours, log_probs = _categorical_act(logits, deterministic=False)
        assert torch.equal(ours, actions) and torch.equal(log_probs, dist.log_prob(actions))
        greedy, greedy_log_probs = _categorical_act(logits, deterministic=True)
        assert torch.equal(greedy, dist.probs.argmax(-1)) and torch.equal(greedy_log_probs, dist.log_prob(greedy))
    with pytest.raises(ValueError, match="invalid values"):
        _categorical_act(torch.full((2, 3), float("nan")), deterministic=False)
