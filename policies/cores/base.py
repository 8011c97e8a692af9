"""The recurrent-core protocol shared by every core (see shared/DESIGN.md).

A core is an ``nn.Module`` used like ``nn.LSTM`` with sequence-first inputs::

    state = core.initial_state(batch_size)              # (B, state_size) zeros
    out, state = core(x, state, episode_starts)         # x: (T, B, input_size)
    out, state, info = core(x, state, episode_starts, return_info=True)

``episode_starts[t, b]`` true resets env ``b``'s state to the initial state
*before* step ``t`` is computed; this is the only place resets happen.

The state is always one flat tensor of shape ``(B, state_size)`` so that rollout
storage, checkpoints and the agent never need to know which core they hold.
Cores view it in whatever structured shape they need internally.

Step-wise cores implement two hooks and inherit ``forward``:

* ``_precompute(x)``: work that depends only on the inputs, done for all T steps
  in one batched call (e.g. input keys/values); returns a tuple of tensors with
  time first, or ``()``.
* ``_step(inputs_t, state)``: one step, returns ``(out_t, new_state, info_t)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

_PARAMETERS_FROZEN: ContextVar[bool] = ContextVar("parameters_frozen", default=False)


@contextmanager
def frozen_parameters() -> Iterator[None]:
    """A scope whose code changes no core's parameters (nor its sizes): rollouts and evaluation enter it.

    Inside it a core may keep, from one call to the next, work that depends only on its parameters
    (RIMs and BRIMs keep their prepared weights and the C kernel's set-up, which cost a rollout step
    about as much as the kernel's arithmetic). What is kept is checked against each parameter's
    storage and version counter on every call, so an optimizer step or ``load_state_dict`` between
    calls is noticed; a change through ``.data`` is not, which is why only such scopes use it.
    Scopes nest; the flag is per thread (and per asyncio task).
    """
    token = _PARAMETERS_FROZEN.set(True)
    try:
        yield
    finally:
        _PARAMETERS_FROZEN.reset(token)


def parameters_frozen() -> bool:
    """Whether the caller is inside :func:`frozen_parameters`."""
    return _PARAMETERS_FROZEN.get()


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1, else raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError listing them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def reset_state(state: Tensor, starts: Tensor, batch_dim: int = 0) -> Tensor:
    """Zero the rows of ``state`` (B, ...) where ``starts`` (B,) is true; ``batch_dim`` says which
    dimension of ``state`` is B (1 for the ``(layers, B, H)`` state of torch's RNN kernels).

    ``torch.where`` rather than a multiply so a NaN or inf in a finished episode's
    state can never leak into the next one.
    """
    shape = [1] * state.dim()
    shape[batch_dim] = -1
    return torch.where(starts.view(shape), torch.zeros((), dtype=state.dtype, device=state.device), state)


class RecurrentCore(nn.Module):
    """Base class of every core: shape checks, resets, and the time loop.

    Subclasses set ``input_size``, ``output_size`` and ``state_size`` in their
    ``__init__`` and implement ``_step`` (and optionally ``_precompute``), or
    override ``forward`` entirely (the fused LSTM/GRU baselines do).
    """

    input_size: int
    output_size: int
    state_size: int
    # Raised when what a core computes changes while its parameters keep their names and shapes:
    # checkpoints record it, and one of another revision is refused instead of silently running
    # its weights through the new computation.
    revision: int = 1

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """Zero state for ``batch_size`` envs, shape ``(batch_size, state_size)``.

        :param batch_size: number of parallel sequences (envs).
        :param device: where to put it; defaults to the device of the core's parameters.
        """
        if device is None:
            device = next(self.parameters()).device
        return torch.zeros(batch_size, self.state_size, device=device)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Split the parameters into ``{"modules": [...], "attention": [...]}`` for meta-learning.

        Modular cores override this; monolithic cores (LSTM, GRU) have no such split.
        """
        raise ValueError(
            f"{type(self).__name__} has no module/attention parameter split; "
            "meta-learning needs a modular core (rims, brims or thalnet)"
        )

    def check_inputs(self, x: Tensor, state: Tensor, episode_starts: Tensor) -> None:
        """Raise ValueError with a clear message when shapes do not follow the protocol."""
        if x.dim() != 3:
            raise ValueError(f"x must have shape (T, B, input_size={self.input_size}), got {tuple(x.shape)}")
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"x has input width {x.shape[-1]} but the core was built with input_size={self.input_size}"
            )
        T, B = x.shape[:2]
        if tuple(state.shape) != (B, self.state_size):
            raise ValueError(f"state must have shape (B={B}, state_size={self.state_size}), got {tuple(state.shape)}")
        if tuple(episode_starts.shape) != (T, B):
            raise ValueError(f"episode_starts must have shape (T={T}, B={B}), got {tuple(episode_starts.shape)}")

    def outputs(self, x: Tensor, state: Tensor, episode_starts: Tensor) -> Tensor:
        """The outputs ``(T, B, output_size)`` of ``forward``, for callers that do not need the final state
        (an update replaying stored sequences). A core that can compute them faster without that state
        overrides this (the fused LSTM does); the default runs ``forward``.
        """
        return self(x, state, episode_starts)[0]

    def _precompute(self, x: Tensor) -> tuple[Tensor, ...]:
        return (x,)

    def _step(self, inputs_t: tuple[Tensor, ...], state: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def forward(
        self,
        x: Tensor,
        state: Tensor,
        episode_starts: Tensor,
        return_info: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Run the core over a sequence.

        :param x: inputs, shape ``(T, B, input_size)``.
        :param state: state entering step 0, shape ``(B, state_size)``.
        :param episode_starts: ``(T, B)`` bool; true resets that env's state before step t.
        :param return_info: also return a dict of diagnostics, each tensor time first.
        :return: ``(out, state)`` with out ``(T, B, output_size)``, or ``(out, state, info)``.
        """
        self.check_inputs(x, state, episode_starts)
        episode_starts = episode_starts.to(torch.bool)
        # unbind rather than index p[t]: indexing makes autograd build a full-size zero tensor
        # per step in backward, a cost that grows with T squared.
        precomputed = [p.unbind(0) for p in self._precompute(x)]
        # One host-side read instead of a reset op per step: most steps have no start.
        any_start = episode_starts.any(dim=1).tolist()
        outs: list[Tensor] = []
        infos: list[dict[str, Tensor]] = []
        for t in range(x.shape[0]):
            if any_start[t]:
                state = reset_state(state, episode_starts[t])
            out_t, state, info_t = self._step(tuple(p[t] for p in precomputed), state)
            outs.append(out_t)
            if return_info:
                infos.append(info_t)
        out = torch.stack(outs)
        if not return_info:
            return out, state
        info = {key: torch.stack([i[key] for i in infos]) for key in infos[0]} if infos else {}
        return out, state, info
