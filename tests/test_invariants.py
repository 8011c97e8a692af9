"""What every core must do inside an agent: see its input now and in the past, and learn through the policy.

Guards against two bugs public implementations shipped (shared/DESIGN.md, "Known pitfalls"):
a released RIMs Atari policy fed the CNN features to the heads instead of the core's output,
and a core can be blind (this package's ThalNet fast-Gaussian reading once was: its windows
never reached the input module's features, so its output did not depend on the input).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from gymnasium import spaces

from policies.actor_critic import RecurrentActorCritic
from policies.cores import make_core
from policies.cores.thalnet import READINGS

INPUT_SIZE = 10
T, B = 8, 6
LAG = 3  # the input k > 1 steps back that the output must still depend on

# Small versions of every core and every ThalNet reading, as a config builds them.
CORE_KWARGS: dict[str, dict[str, Any]] = {
    "lstm": {"hidden_size": 12},
    "gru": {"hidden_size": 12},
    "rims": {"num_modules": 4, "module_size": 16, "k_active": 2},
    "brims": {"layers": [{"num_modules": 4, "module_size": 16, "k_active": 2},
                         {"num_modules": 3, "module_size": 12, "k_active": 2}]},
    **{f"thalnet-{reading}": {"num_modules": 3, "module_size": 12, "center_size_per_module": 4, "reading": reading}
       for reading in READINGS},
    # The shipped ThalNet shape (4 modules), with the default and the Gaussian reading: at this
    # size the Gaussian windows once all sat in the middle of the center, far from the input module.
    "thalnet-shipped": {"num_modules": 4, "module_size": 64, "center_size_per_module": 16},
    "thalnet-shipped_gaussian": {"num_modules": 4, "module_size": 64, "center_size_per_module": 16,
                                 "reading": "fast_gaussian"},
}
CASES = list(CORE_KWARGS)


def core_name(case: str) -> str:
    return case.split("-")[0]


def _changed_output(core: torch.nn.Module, x: torch.Tensor, step: int) -> float:
    """How much the output at the last step moves when the input at ``step`` is replaced by another."""
    starts = torch.zeros(T, B, dtype=torch.bool)
    x_other = x.clone()
    x_other[step] = torch.randn(B, INPUT_SIZE, generator=torch.Generator().manual_seed(step))
    with torch.no_grad():
        out, _ = core(x, core.initial_state(B), starts)
        out_other, _ = core(x_other, core.initial_state(B), starts)
    return float((out_other[T - 1] - out[T - 1]).abs().max())


@pytest.mark.parametrize("case", CASES)
def test_output_depends_on_the_input_now_and_steps_back(case: str) -> None:
    torch.manual_seed(0)
    core = make_core(core_name(case), INPUT_SIZE, **CORE_KWARGS[case]).eval()
    x = torch.randn(T, B, INPUT_SIZE)
    # A clear change, not a rounding one: the blind Gaussian reading moved the output by ~1e-30.
    assert _changed_output(core, x, T - 1) > 1e-3, "the output at step t does not depend on the input at step t"
    assert _changed_output(core, x, T - 1 - LAG) > 1e-3, f"the output at step t ignores the input {LAG} steps back"
    # and gradients reach both inputs
    x = x.clone().requires_grad_(True)
    out, _ = core(x, core.initial_state(B), torch.zeros(T, B, dtype=torch.bool))
    out[T - 1].square().sum().backward()
    grad_by_step = x.grad.abs().sum(dim=(1, 2))
    assert grad_by_step[T - 1] > 1e-4 and grad_by_step[T - 1 - LAG] > 1e-4


def _policy(case: str) -> tuple[RecurrentActorCritic, torch.Tensor]:
    """An actor-critic with the core ``case`` on MiniGrid-shaped observations, and a random batch of them."""
    torch.manual_seed(0)
    observation_space = spaces.Box(0, 10, shape=(7, 7, 3), dtype=np.uint8)
    policy = RecurrentActorCritic(observation_space, spaces.Discrete(7), core=core_name(case),
                                  core_kwargs=CORE_KWARGS[case])
    generator = torch.Generator().manual_seed(1)
    obs = torch.randint(0, 11, (T, B, 7, 7, 3), generator=generator, dtype=torch.uint8)
    return policy, obs


@pytest.mark.parametrize("case", CASES)
def test_every_parameter_gets_a_gradient_through_the_actor_critic_loss(case: str) -> None:
    policy, obs = _policy(case)
    starts = torch.zeros(T, B, dtype=torch.bool)
    starts[0] = True
    actions = torch.randint(0, 7, (T, B), generator=torch.Generator().manual_seed(2))
    log_probs, entropy, values = policy.evaluate_actions(obs, actions, policy.initial_state(B), starts)
    advantages, returns = torch.randn(T, B), torch.randn(T, B)
    # A PPO-shaped loss: policy gradient, value regression and entropy bonus.
    loss = -(log_probs * advantages).mean() + 0.5 * (values - returns).square().mean() - 0.01 * entropy.mean()
    loss.backward()
    no_gradient = [name for name, p in policy.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_gradient == []


@pytest.mark.parametrize("case", CASES)
def test_action_distribution_depends_on_the_core_state(case: str) -> None:
    # The released RIMs Atari policy computed the core and fed the encoder's features to the heads:
    # its actions were the same whatever the memory held.
    policy, obs = _policy(case)
    policy.eval()
    starts = torch.zeros(1, B, dtype=torch.bool)
    with torch.no_grad():
        # A state the core itself reached after a history of observations, and the zero state.
        _, _, remembered = policy(obs, policy.initial_state(B), torch.zeros(T, B, dtype=torch.bool))
        dist_zero, value_zero, _ = policy(obs[:1], policy.initial_state(B), starts)
        dist_memory, value_memory, _ = policy(obs[:1], remembered, starts)
    assert not torch.allclose(dist_zero.logits, dist_memory.logits)
    assert not torch.allclose(value_zero, value_memory)
