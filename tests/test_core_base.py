"""The base class's time loop: the simple way to add a core (implement ``_step``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policies.cores.base import RecurrentCore


class ElmanCore(RecurrentCore):
    """h_t = tanh(W x_t + U h_{t-1}): a user-written core that only implements ``_step``."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.output_size, self.state_size = input_size, hidden_size, hidden_size
        self.w = nn.Linear(input_size, hidden_size)
        self.u = nn.Linear(hidden_size, hidden_size, bias=False)

    def _precompute(self, x: Tensor) -> tuple[Tensor, ...]:
        return (self.w(x),)  # the input projection for all T steps in one matmul

    def _step(self, inputs_t: tuple[Tensor, ...], state: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        h = torch.tanh(inputs_t[0] + self.u(state))
        return h, h, {"norm": h.norm(dim=1)}


def test_base_loop_resets_steps_and_stacks_info() -> None:
    torch.manual_seed(0)
    core = ElmanCore(3, 5)
    x = torch.randn(6, 2, 3)
    starts = torch.zeros(6, 2, dtype=torch.bool)
    starts[3, 1] = True
    state0 = torch.randn(2, 5)
    out, state, info = core(x, state0, starts, return_info=True)

    h = state0.clone()
    for t in range(6):
        h = torch.where(starts[t].unsqueeze(1), torch.zeros_like(h), h)
        h = torch.tanh(core.w(x[t]) + core.u(h))
        torch.testing.assert_close(out[t], h)
    torch.testing.assert_close(state, h)
    assert info["norm"].shape == (6, 2)
    torch.testing.assert_close(info["norm"], out.norm(dim=2))
    assert torch.equal(core.initial_state(4), torch.zeros(4, 5))


def test_base_loop_backpropagates_to_every_parameter() -> None:
    core = ElmanCore(3, 4)
    out, _ = core(torch.randn(5, 2, 3), core.initial_state(2), torch.zeros(5, 2, dtype=torch.bool))
    out.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in core.parameters())
