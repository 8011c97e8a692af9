"""Optimisers, learning-rate scaling and the one guarded gradient step all algorithms use.

``Adam`` and ``RMSprop`` here are small copies of torch 2.13's CPU single-tensor implementations
(``torch/optim/adam.py`` ``_single_tensor_adam``, ``torch/optim/rmsprop.py``
``_single_tensor_rmsprop``) for the settings this package uses. They do the same tensor ops in the
same order, so the parameters they produce are bit-for-bit those of ``torch.optim.Adam`` and
``torch.optim.RMSprop``, and their ``state_dict`` has torch's format (checkpoints load either way).
They exist because torch.optim's first ``add_param_group``/``step``/``zero_grad`` call imports
``torch._dynamo`` (and sympy), which took seconds of every run's start-up.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from agents import distributed


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite; the parameters were not updated."""


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps ``state["step"]`` in (``optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Optimizer:
    """What ``Adam`` and ``RMSprop`` share: one parameter group, lazily created per-parameter state,
    and ``zero_grad``/``state_dict``/``load_state_dict`` as ``torch.optim.Optimizer`` has them.

    A subclass sets ``off`` (the group entries torch.optim writes for features this class does not
    implement, all off: 0, False or None), ``state_keys`` (its per-parameter state) and ``step``, and
    passes its group's entries in torch.optim's order (so that ``state_dict()`` equals torch's).
    """

    off: tuple[str, ...] = ()
    state_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable[nn.Parameter], hyper: dict[str, Any]) -> None:
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        for p in params:
            if not isinstance(p, Tensor) or not (p.is_leaf or p.retains_grad) or p.is_complex():
                raise ValueError("the optimizer only takes real leaf tensors")
        if not hyper["lr"] >= 0.0 or not hyper["eps"] >= 0.0:
            raise ValueError(f"lr and eps must be >= 0, got {hyper['lr']} and {hyper['eps']}")
        self.param_groups: list[dict[str, Any]] = [{"params": params, **hyper}]
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    def _state_of(self, param: Tensor) -> dict[str, Tensor]:
        """``param``'s state, created on its first update as torch does: ``step`` a 0-d zero of the
        scalar dtype, every other ``state_keys`` entry zeros like the parameter."""
        state = self.state.get(param)
        if state is None:
            state = self.state[param] = {
                key: torch.zeros((), dtype=_scalar_dtype()) if key == "step"
                else torch.zeros_like(param, memory_format=torch.preserve_format)
                for key in self.state_keys
            }
        return state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the gradients of all parameters, like ``torch.optim.Optimizer.zero_grad``."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    def step(self, grad_scale: Tensor | None = None) -> None:
        """Update every parameter that has a gradient (parameters without one are left alone), their
        gradients multiplied by ``grad_scale`` (a 0-d tensor) when given."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {...}}, "param_groups": [{..., "params": [index, ...]}]}``, torch.optim's format.

        Like torch's, the state tensors are the optimiser's own (not copies).
        """
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index[id(p)] for p in group["params"]]
            groups.append(packed)
        return {"state": {index[id(p)]: s for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned, or what the torch.optim class of the same name saved.

        The saved hyperparameters (lr, eps, betas or alpha) replace the current ones, as in torch.
        The state tensors are copied and cast to their parameter's dtype and device (``step`` keeps its
        own, as in torch).

        :raises ValueError: if the groups do not match this optimiser's parameters, or the saved
            optimiser used a setting this class does not implement (amsgrad, weight decay, momentum, ...).
        """
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        groups, params_by_index = [], {}
        for saved, group in zip(saved_groups, self.param_groups):
            for key in self.off:
                loaded = saved.setdefault(key, group[key])  # older torch did not write them all
                if loaded:
                    raise ValueError(f"the saved optimizer has {key}={loaded!r}; {type(self).__name__} does not "
                                     f"implement {key}")
            params_by_index.update(zip(saved["params"], group["params"]))
            groups.append({**saved, "params": group["params"]})
        state: dict[Tensor, dict[str, Tensor]] = {}
        for index, saved_state in state_dict["state"].items():
            if index not in params_by_index or set(saved_state) != set(self.state_keys):
                raise ValueError(f"the saved optimizer state {index!r} holds {sorted(saved_state)!r}, not the "
                                 f"state of parameter {index!r} of {type(self).__name__}: {list(self.state_keys)}")
            p = params_by_index[index]
            state[p] = {}
            for key in self.state_keys:
                value = saved_state[key]
                if key == "step":  # torch keeps step where and as it was (a float from torch < 1.12)
                    value = value.clone() if torch.is_tensor(value) else torch.tensor(float(value),
                                                                                       dtype=_scalar_dtype())
                else:
                    value = value.to(dtype=p.dtype if p.is_floating_point() else value.dtype, device=p.device,
                                     copy=True)
                state[p][key] = value
        self.param_groups, self.state = groups, state


class Adam(Optimizer):
    """Adam (betas (0.9, 0.999) by default, no weight decay, no amsgrad), bit-for-bit torch 2.13's CPU
    ``torch.optim.Adam`` (``_single_tensor_adam``), whose op order and Python-float bias corrections it copies.
    """

    off = ("weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
           "decoupled_weight_decay")
    state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[nn.Parameter], lr: float, eps: float,
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": 0, "amsgrad": False,
                                  "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                                  "fused": None, "decoupled_weight_decay": False})
        self._packed: _PackedAdamState | None = None

    @torch.no_grad()
    def step(self, grad_scale: Tensor | None = None) -> None:
        """One Adam update of every parameter that has a gradient.

        torch's single-tensor CPU update, op for op. Each op runs once over all parameters: their
        ``exp_avg``, ``exp_avg_sq`` and ``step`` states are views into one flat tensor each (see
        ``_pack``), and the gradients are concatenated into one. On CPU these element-wise kernels give
        each element the same bits whichever tensor holds it, so the parameters are bit-for-bit torch's,
        without ~150 per-tensor kernel calls per step (~1 ms of a DoorKey minibatch's ~15). Parameters
        that cannot share one flat tensor (several dtypes or devices, a subset of the packed ones with
        gradients, unequal step counts) take the same ops per tensor with ``torch._foreach_*`` instead.
        On CUDA the foreach kernels are fused (torch's own CUDA default) and may round differently.

        :param grad_scale: multiply the gradients by this 0-d tensor first (``gradient_step``'s clip
            coefficient); ``param.grad`` itself is left as it is.
        """
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            beta1, beta2 = group["betas"]
            params = [param for param in group["params"] if param.grad is not None]
            if not params:
                continue
            grads = [param.grad for param in params]
            packed = self._pack(params)
            if packed is not None and packed.steps.min() == packed.steps.max():
                count = packed.steps.add_(1)[0].item()
                flat_grad = torch.cat([grad.reshape(-1) for grad in grads])
                if grad_scale is not None:
                    flat_grad.mul_(grad_scale)
                packed.exp_avg.lerp_(flat_grad, 1 - beta1)
                packed.exp_avg_sq.mul_(beta2).addcmul_(flat_grad, flat_grad, value=1 - beta2)
                torch.sqrt(packed.exp_avg_sq, out=packed.denom)
                packed.denom.div_((1 - beta2**count) ** 0.5).add_(eps)
                torch._foreach_addcdiv_(params, packed.exp_avg_views, packed.denom_views,
                                        -lr / (1 - beta1**count))
                continue
            if grad_scale is not None:
                grads = torch._foreach_mul(grads, grad_scale)
            states = [self._state_of(param) for param in params]
            steps = [state["step"] for state in states]
            exp_avgs = [state["exp_avg"] for state in states]
            exp_avg_sqs = [state["exp_avg_sq"] for state in states]
            torch._foreach_add_(steps, 1)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            # A parameter that had no gradient at some step has its own count (and bias corrections).
            counts = [step_t.item() for step_t in steps]
            step_sizes = [-lr / (1 - beta1**count) for count in counts]
            bias_correction2_sqrts = [(1 - beta2**count) ** 0.5 for count in counts]
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denoms, bias_correction2_sqrts)
            torch._foreach_add_(denoms, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)

    def _pack(self, params: list[Tensor]) -> _PackedAdamState | None:
        """The flat state of exactly ``params``, made on first use: their states (new zeros, or those
        they have, e.g. loaded from a checkpoint) are copied into flat tensors and replaced by views of
        them, so ``state_dict`` keeps torch's per-parameter format. None where they cannot share it."""
        key = tuple(id(param) for param in params)
        if self._packed is not None and self._packed.key == key:
            return self._packed
        first = params[0]
        if (self._packed is not None and not set(self._packed.key).isdisjoint(key)) or any(
                param.dtype != first.dtype or param.device != first.device or not param.is_contiguous()
                or not param.is_floating_point() for param in params):
            return None  # another subset was packed, or one flat tensor cannot hold them all
        states = [self._state_of(param) for param in params]
        flat = {name: torch.cat([state[name].reshape(-1) for state in states]) for name in ("exp_avg", "exp_avg_sq")}
        steps = torch.stack([state["step"] for state in states])
        offset = 0
        for i, (param, state) in enumerate(zip(params, states)):
            for name, values in flat.items():
                state[name] = values[offset:offset + param.numel()].view_as(param)
            state["step"] = steps[i]
            offset += param.numel()
        denom = torch.empty_like(flat["exp_avg_sq"])
        self._packed = _PackedAdamState(
            key=key, exp_avg=flat["exp_avg"], exp_avg_sq=flat["exp_avg_sq"],
            steps=steps, denom=denom, exp_avg_views=[state["exp_avg"] for state in states],
            denom_views=[view.view_as(param) for view, param in zip(denom.split([p.numel() for p in params]), params)],
        )
        return self._packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``; the loaded states are packed again on the next step."""
        super().load_state_dict(state_dict)
        self._packed = None


@dataclasses.dataclass
class _PackedAdamState:
    """Adam's state of one set of parameters as flat tensors; the per-parameter states are views of them."""

    key: tuple[int, ...]  # id() of each parameter, in order
    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor  # (n_params,): state["step"] of parameter i is steps[i]
    denom: Tensor  # scratch: sqrt(exp_avg_sq) / bias correction + eps
    exp_avg_views: list[Tensor]  # shaped like the parameters
    denom_views: list[Tensor]


class RMSprop(Optimizer):
    """RMSprop (alpha 0.99 by default, no momentum, not centered, no weight decay), bit-for-bit torch
    2.13's CPU ``torch.optim.RMSprop`` (``_single_tensor_rmsprop``), whose op order it copies.
    """

    off = ("momentum", "centered", "weight_decay", "capturable", "foreach", "maximize", "differentiable")
    state_keys = ("step", "square_avg")

    def __init__(self, params: Iterable[nn.Parameter], lr: float, eps: float, alpha: float = 0.99) -> None:
        if not alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        super().__init__(params, {"lr": lr, "momentum": 0, "alpha": alpha, "eps": eps, "centered": False,
                                  "weight_decay": 0, "capturable": False, "foreach": None, "maximize": False,
                                  "differentiable": False})

    @torch.no_grad()
    def step(self, grad_scale: Tensor | None = None) -> None:
        """One RMSprop update of every parameter that has a gradient.

        :param grad_scale: multiply the gradients by this 0-d tensor first (``gradient_step``'s clip
            coefficient); ``param.grad`` itself is left as it is.
        """
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad_scale is not None:
                    grad = grad * grad_scale
                state = self._state_of(param)
                square_avg = state["square_avg"]
                state["step"] += 1
                square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
                avg = square_avg.sqrt().add_(eps)
                param.addcdiv_(grad, avg, value=-lr)


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, eps: float) -> Optimizer:
    """Adam or RMSprop over ``params`` (this module's classes: torch.optim's updates and state format).

    :param params: the parameters this optimiser may change (and no others).
    :param name: ``"adam"`` or ``"rmsprop"``.
    :param lr: learning rate.
    :param eps: the optimiser's epsilon.
    """
    if name == "adam":
        return Adam(params, lr=lr, eps=eps)
    if name == "rmsprop":
        return RMSprop(params, lr=lr, alpha=0.99, eps=eps)
    raise ValueError(f"optimizer must be 'adam' or 'rmsprop', got {name!r}")


def set_learning_rate(optimizer: Optimizer, lr: float) -> None:
    """Set every parameter group of ``optimizer`` to ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def gradient_step(optimizer: Optimizer, loss: Tensor, max_grad_norm: float) -> float:
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
    # torch.nn.utils.clip_grad_norm_'s norm and coefficient; the optimiser applies the coefficient as
    # it reads the gradients (one multiply over all of them instead of one per tensor), same bits.
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"the gradient norm is {grad_norm.item()}")
    optimizer.step(grad_scale=torch.clamp(max_grad_norm / (grad_norm + 1e-6), max=1.0))
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
