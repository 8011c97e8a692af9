"""Optimisers, learning-rate scaling and the one guarded gradient step all algorithms use."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from agents import distributed


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite; the parameters were not updated."""


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, eps: float) -> torch.optim.Optimizer:
    """Adam or RMSprop over ``params``.

    :param params: the parameters this optimiser may change (and no others).
    :param name: ``"adam"`` or ``"rmsprop"``.
    :param lr: learning rate.
    :param eps: the optimiser's epsilon.
    """
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=eps)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=eps)
    raise ValueError(f"optimizer must be 'adam' or 'rmsprop', got {name!r}")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group of ``optimizer`` to ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def gradient_step(optimizer: torch.optim.Optimizer, loss: Tensor, max_grad_norm: float) -> float:
    """Backpropagate ``loss`` and step ``optimizer`` on its own parameters, clipping their norm.

    Only the optimiser's parameters are clipped and changed, so a second optimiser's
    parameters (meta-learning's other group) stay exactly as they are.

    Under torchrun (``agents.distributed``) the gradients are averaged over all ranks after the
    backward, so the clip and the step see the same gradient on every rank; in a one-process run
    nothing else happens.

    :return: the gradient norm before clipping.
    :raises NonFiniteError: if the loss or the gradient norm is not finite; nothing is changed then.
        Under torchrun a non-finite loss on any rank raises on every rank.
    """
    spread = distributed.active()
    loss_finite = bool(torch.isfinite(loss))
    if not loss_finite and not spread:
        raise NonFiniteError(f"the loss is {loss.item()}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    if loss_finite:
        loss.backward()
    # Every rank must join the all-reduce, also one whose loss is not finite (else the others wait forever).
    if spread and not distributed.average_gradients(params, loss_finite):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"the loss is {loss.item()}" if not loss_finite
                             else "the loss is non-finite on another rank")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"the gradient norm is {grad_norm.item()}")
    optimizer.step()
    return float(grad_norm)


class PolicyUpdater:
    """What every update rule shares: an optimiser over a parameter set, its learning-rate scale and state.

    :param policy: the actor-critic to train.
    :param algo: the resolved ``algo`` config section.
    :param parameters: the parameters this update may change (all of the policy's by default;
        meta-learning passes one group).
    :param lr: learning rate, ``algo["lr"]`` by default.
    :param generator: random generator for minibatch shuffles (seeded by the trainer).
    """

    def __init__(
        self,
        policy: nn.Module,
        algo: dict,
        parameters: list[nn.Parameter] | None = None,
        lr: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.policy = policy
        self.algo = algo
        self.base_lr = algo["lr"] if lr is None else lr
        params = list(policy.parameters()) if parameters is None else parameters
        self.optimizer = make_optimizer(params, algo["optimizer"], self.base_lr, algo["optimizer_eps"])
        self.generator = generator

    def set_lr_scale(self, scale: float) -> None:
        """Scale the learning rate to ``scale * base_lr`` (linear annealing)."""
        set_learning_rate(self.optimizer, self.base_lr * scale)

    def state_dict(self) -> dict:
        """Optimiser state, for checkpoints."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
