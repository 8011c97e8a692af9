"""The PPO and A2C objectives, term by term, on a real rollout whose advantages, returns and stored
log-probabilities the tests set: which way one update moves the policy, where the clipped terms stop the
gradient, what the entropy bonus does, when ``target_kl`` ends the epochs, and ``explained_variance``.

Each check fails on the matching slip in ``agents/ppo.py`` or ``agents/a2c.py``: a flipped surrogate sign,
``min`` for ``max`` in either clipped term, a wrong entropy sign, a KL stop that never fires.
"""

from __future__ import annotations

import math

import pytest
import torch

from agents.a2c import RecurrentA2C
from agents.ppo import RecurrentPPO, explained_variance
from agents.config import load_config
from agents.rollout import collect_rollout, start_rollouts
from agents.storage import RolloutStorage
from agents.trainer import build_policy
from envs import make_vec_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Only the term under test moves the parameters: no normalisation, no entropy or value term, no clipping of
# the gradient norm; PPO makes one pass over one minibatch.
ISOLATED = ("algo.normalize_advantage=false", "algo.ent_coef=0.0", "algo.vf_coef=0.0", "algo.max_grad_norm=1e6",
            "algo.lr=1e-3")
PPO_ONE_STEP = ("algo.n_epochs=1", "algo.num_minibatches=1", "algo.seq_len=null")
N_ENVS, N_STEPS = 4, 24


def rollout(algo: str = "ppo", extra: tuple[str, ...] = ()):
    """A collected rollout of a small LSTM policy on DoorKey-5x5, and its config, policy and storage."""
    config = load_config(None, ["core.name=lstm", "core.hidden_size=32", f"algo.name={algo}",
                                f"env.n_envs={N_ENVS}", f"algo.n_steps={N_STEPS}", *ISOLATED,
                                *(PPO_ONE_STEP if algo == "ppo" else ()), *extra])
    torch.manual_seed(0)
    venv = make_vec_env("MiniGrid-DoorKey-5x5-v0", N_ENVS, seed=3)
    policy = build_policy(config, venv.observation_space, venv.action_space)
    storage = RolloutStorage(N_STEPS, N_ENVS, venv.observation_space, venv.action_space, policy.state_size)
    collect_rollout(policy, venv, storage, start_rollouts(policy, venv), 0.99, 0.95)
    venv.close()
    return config, policy, storage


def replayed(policy, storage) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the stored actions, entropies and values, the rollout replayed by ``policy``."""
    with torch.no_grad():
        return policy.evaluate_actions(storage.obs, storage.actions, storage.states[0], storage.episode_starts)


def parameters(policy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.parameters()]


def unchanged(policy, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(policy.parameters(), before))


@pytest.mark.parametrize("updater", [RecurrentPPO, RecurrentA2C])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_an_update_makes_actions_with_positive_advantage_likelier_and_negative_rarer(updater, sign: float) -> None:
    config, policy, storage = rollout("ppo" if updater is RecurrentPPO else "a2c")
    storage.advantages = torch.full_like(storage.advantages, sign)
    before, _, _ = replayed(policy, storage)
    stats = updater(policy, config["algo"]).update(storage)
    after, _, _ = replayed(policy, storage)
    assert stats["grad_norm"] > 0
    change = float((after - before).mean())
    assert change * sign > 0, f"advantage {sign:+}: the mean log-probability moved by {change:+.2e}"


@pytest.mark.parametrize("log_ratio, clipped", [(1.0, True), (-1.0, False)])
def test_ppo_policy_term_has_no_gradient_where_the_ratio_is_clipped(log_ratio: float, clipped: bool) -> None:
    """With a positive advantage the surrogate is flat above 1 + clip_range (ratio e = 2.7 > 1.2: the update
    would push further, PPO refuses) and not below 1 - clip_range (ratio 1/e = 0.37 < 0.8: it may recover)."""
    config, policy, storage = rollout("ppo", ("algo.clip_range=0.2",))
    current, _, _ = replayed(policy, storage)
    storage.log_probs = current - log_ratio  # the new policy's ratio to the stored one is exp(log_ratio)
    storage.advantages = torch.ones_like(storage.advantages)
    before = parameters(policy)
    stats = RecurrentPPO(policy, config["algo"]).update(storage)
    assert stats["clip_fraction"] == 1.0
    assert (stats["grad_norm"] == 0) == clipped
    assert unchanged(policy, before) == clipped


@pytest.mark.parametrize("return_offset, clipped", [(5.0, True), (-5.0, False)])
def test_ppo_value_term_has_no_gradient_where_the_clipped_error_is_larger(return_offset: float,
                                                                          clipped: bool) -> None:
    """The stored values sit 1 below the current ones, so with clip_range_vf 0.1 the clipped prediction is
    0.9 below. Returns 5 above: the clipped error (5.9) is the larger, taken by the max, and constant;
    returns 5 below: the unclipped error (5) is the larger and the value head learns."""
    config, policy, storage = rollout("ppo", ("algo.vf_coef=0.5", "algo.clip_range_vf=0.1"))
    _, _, values = replayed(policy, storage)
    storage.values = values - 1.0
    storage.returns = values + return_offset
    storage.advantages = torch.zeros_like(storage.advantages)  # no policy gradient
    before = parameters(policy)
    stats = RecurrentPPO(policy, config["algo"]).update(storage)
    assert (stats["grad_norm"] == 0) == clipped
    assert unchanged(policy, before) == clipped
    if not clipped:
        _, _, after = replayed(policy, storage)
        assert (storage.returns - after).abs().mean() < (storage.returns - values).abs().mean()


@pytest.mark.parametrize("updater", [RecurrentPPO, RecurrentA2C])
def test_the_entropy_bonus_raises_the_policy_entropy(updater) -> None:
    config, policy, storage = rollout("ppo" if updater is RecurrentPPO else "a2c", ("algo.ent_coef=1.0",))
    # A fresh policy is almost uniform (the action head starts small), where any step lowers the entropy:
    # start from a peaked one, as a policy is after some training.
    with torch.no_grad():
        policy.actor[-1].bias.copy_(torch.linspace(-2.0, 2.0, policy.actor[-1].bias.numel()))
    storage.advantages = torch.zeros_like(storage.advantages)
    _, before, _ = replayed(policy, storage)
    updater(policy, config["algo"]).update(storage)
    _, after, _ = replayed(policy, storage)
    assert after.mean() > before.mean()


@pytest.mark.parametrize("target_kl, steps", [(None, 4 * 2), (1e-12, 2)])
def test_target_kl_ends_the_update_after_the_first_epoch_that_exceeds_it(target_kl, steps: int) -> None:
    """4 epochs of 2 minibatches: 8 optimiser steps, or 2 when the first epoch's KL (positive once a step
    was taken) exceeds the target."""
    config, policy, storage = rollout("ppo", ("algo.n_epochs=4", "algo.num_minibatches=2",
                                              f"algo.target_kl={'null' if target_kl is None else target_kl}"))
    storage.advantages = torch.randn(storage.advantages.shape, generator=torch.Generator().manual_seed(0))
    updater = RecurrentPPO(policy, config["algo"], generator=torch.Generator().manual_seed(0))
    stats = updater.update(storage)
    first = next(iter(policy.parameters()))
    assert int(updater.optimizer.state[first]["step"]) == steps
    assert stats["approx_kl"] > 0


def test_explained_variance_on_known_arrays() -> None:
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(returns, returns) == 1.0
    assert explained_variance(torch.zeros(4), returns) == 0.0
    # Predicting the mean plus noise: 1 - Var[noise] / Var[returns].
    values = returns.mean() + torch.tensor([0.5, -0.5, 0.5, -0.5])
    expected = 1 - float((returns - values).var() / returns.var())
    assert explained_variance(values, returns) == pytest.approx(expected)
    assert expected < 0.5
    assert math.isnan(explained_variance(torch.zeros(4), torch.ones(4)))
