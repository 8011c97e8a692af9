"""ThalNet: recurrent modules that communicate through a shared routing center.

After Hafner, Irpan, Davidson and Heess, "Learning Hierarchical Information Flow
with Recurrent Neural Modules" (NeurIPS 2017), behind the recurrent-core protocol
of ``policies/cores/base.py``.

Step t, for M modules of size H, C center features per module and read size R:

1. Center ``c_t`` (size ``S = M*C``): the first C features of every module's
   hidden state from step t-1, concatenated in module order.
2. Read: each module m reads a context ``r_m`` (size R) from ``c_t`` with the
   chosen reading mechanism (below).
3. Feed-forward: ``z_m = ELU(W_m r_m + b_m)``, plus ``U x_t`` for the input
   module (module 0) only.
4. GRU: ``h_m = GRU_m(z_m, h_m)``. Its first C features are module m's
   contribution to the next center; module M-1 (the output module) is the
   core's output, size H.

Reading mechanisms (``reading=``), each giving R read values per module:

* ``"linear"``: ``r_m = c_t @ W_m`` with a learned ``W_m`` (S, R).
* ``"weight_norm"`` (default): the same with ``W_m = g_m * V_m / ||V_m||``, the
  norm taken over center positions for each read value (one gain per value).
* ``"fast_softmax"``: R read heads; head j of module m reads
  ``sum_s w[m,j,s] c_t[s]`` with ``w[m,j,:] = softmax_s(A_m h_m(t-1) + a_m)``:
  weights computed at every step from the module's own previous features.
* ``"fast_gaussian"``: R read heads, each a Gaussian window over the center
  positions whose mean (in ``[0, S-1]``) and width (``>= 0.5`` positions) are
  computed from the module's own previous features, normalised to sum to 1.

State layout (flat, batch first): ``(B, M*H)``, module m's GRU hidden state in
columns ``[m*H, (m+1)*H)``; its first C columns are module m's center features.

``info["read_weights"]`` is ``(T, B, M, S)``: how much module m reads from each
center position, each row summing to 1.  For the fast readings it is the read
weights of that step averaged over the R heads.  For the linear readings the
read does not depend on the step, so it is the share of the absolute read
weights ``|W_m[s, :]|`` (summed over the R read values, normalised over s),
repeated over T and B.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from policies.cores.base import RecurrentCore, check_choice, check_positive_int

READINGS: tuple[str, ...] = ("weight_norm", "linear", "fast_softmax", "fast_gaussian")

# Smallest Gaussian read width, in center positions: keeps the window from
# collapsing between two positions (where it would read nothing and pass no gradient).
MIN_GAUSSIAN_WIDTH = 0.5


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """A parameter drawn like PyTorch's Linear/GRU defaults: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class ThalNet(RecurrentCore):
    """ThalNet core: M recurrent modules reading from and writing to a shared center.

    :param input_size: width of the features fed to the input module at each step.
    :param num_modules: number of modules M (>= 2): module 0 receives the input,
        module M-1 is the output module.
    :param module_size: width H of each module's GRU state and feed-forward layer;
        also the core's output width.
    :param center_size_per_module: number C of each module's features placed in
        the center (the first C of its H state features; ``1 <= C <= H``).
    :param read_size: number R of context values each module reads from the
        center (for the fast readings: the number of read heads). Defaults to C.
    :param reading: reading mechanism, one of ``"weight_norm"`` (default),
        ``"linear"``, ``"fast_softmax"``, ``"fast_gaussian"`` (see the module docstring).
    :param fused_backward: for the linear readings, train through the hand-written
        backward through time (fast, default); ``False`` uses plain autograd over
        the same forward code. The fast readings always use autograd.
    :raises ValueError: for a size < 1, ``num_modules < 2``, ``C > H`` or an unknown reading.
    """

    def __init__(
        self,
        input_size: int,
        num_modules: int = 4,
        module_size: int = 128,
        center_size_per_module: int = 32,
        read_size: int | None = None,
        reading: str = "weight_norm",
        fused_backward: bool = True,
    ) -> None:
        super().__init__()
        self.fused_backward = bool(fused_backward)
        self.input_size = check_positive_int("input_size", input_size)
        self.num_modules = check_positive_int("num_modules", num_modules)
        if num_modules < 2:
            raise ValueError(
                f"num_modules must be an integer >= 2 (an input module and an output module), got {num_modules!r}"
            )
        self.module_size = check_positive_int("module_size", module_size)
        self.center_size_per_module = check_positive_int("center_size_per_module", center_size_per_module)
        if center_size_per_module > module_size:
            raise ValueError(
                f"center_size_per_module must be <= module_size={module_size} (the center features are "
                f"part of each module's state), got {center_size_per_module!r}"
            )
        self.read_size = check_positive_int("read_size", center_size_per_module if read_size is None else read_size)
        self.reading = check_choice("reading", reading, READINGS)

        M, H, R = num_modules, module_size, self.read_size
        S = self.center_size = M * center_size_per_module
        self.output_size = H
        self.state_size = M * H

        # --- module parameters: feed-forward layer and GRU cell, stacked over modules.
        self.ff_input_weight = _uniform((input_size, H), input_size)  # x_t -> input module only
        self.ff_read_weight = _uniform((M, R, H), R)
        self.ff_bias = _uniform((M, H), R)
        # GRU gates in PyTorch's order (reset, update, new), each H wide.
        self.gru_input_weight = _uniform((M, H, 3 * H), H)
        self.gru_hidden_weight = _uniform((M, H, 3 * H), H)
        self.gru_input_bias = _uniform((M, 1, 3 * H), H)
        self.gru_hidden_bias = _uniform((M, 1, 3 * H), H)

        # --- reading parameters (the "attention" group).
        if self.reading == "linear":
            self.read_weight = _uniform((M, S, R), S)
        elif self.reading == "weight_norm":
            self.read_direction = _uniform((M, S, R), S)
            # Gain 1: each read value starts as a unit-norm projection of the center.
            self.read_gain = nn.Parameter(torch.ones(M, 1, R))
        else:
            # Per-step read parameters computed from the module's own state:
            # R*S softmax logits, or R means and R widths of a Gaussian.
            num_read_params = R * S if self.reading == "fast_softmax" else 2 * R
            self.read_query_weight = _uniform((M, H, num_read_params), H)
            self.read_query_bias = nn.Parameter(torch.zeros(M, 1, num_read_params))
            self.register_buffer("center_positions", torch.arange(S, dtype=torch.float32), persistent=False)

    # ------------------------------------------------------------------ groups
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"modules": feed-forward and GRU parameters, "attention": reading parameters}``.

        Every parameter is in exactly one group.
        """
        modules = [
            self.ff_input_weight,
            self.ff_read_weight,
            self.ff_bias,
            self.gru_input_weight,
            self.gru_hidden_weight,
            self.gru_input_bias,
            self.gru_hidden_bias,
        ]
        module_ids = {id(p) for p in modules}
        attention = [p for p in self.parameters() if id(p) not in module_ids]
        return {"modules": modules, "attention": attention}

    # ------------------------------------------------------------------ reading
    def linear_read_weight(self) -> Tensor:
        """The read matrices ``W_m`` (M, S, R) of the linear readings (weight-normalised if chosen)."""
        if self.reading == "linear":
            return self.read_weight
        if self.reading == "weight_norm":
            norm = self.read_direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return self.read_gain * self.read_direction / norm
        raise ValueError(f"linear_read_weight needs reading 'linear' or 'weight_norm', got {self.reading!r}")

    def _fast_read(self, query: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        """Read the center with weights computed from the modules' states.

        :param query: ``(M, B, P)`` read parameters from each module's previous state.
        :param center: ``(B, S)`` center.
        :return: context ``(M, B, R)`` and read weights ``(M, B, R, S)`` (each row sums to 1).
        """
        M, B, _ = query.shape
        R, S = self.read_size, self.center_size
        if self.reading == "fast_softmax":
            weights = torch.softmax(query.view(M, B, R, S), dim=-1)
        else:
            mean_query, width_query = query.split([R, R], dim=-1)
            mean = torch.sigmoid(mean_query) * (S - 1)
            width = F.softplus(width_query) + MIN_GAUSSIAN_WIDTH
            # Log of a Gaussian kernel, -(s - mean)^2 / (2 width^2), normalised over positions
            # by the softmax. Written as (s*k - mean*k) with k = 1/(sqrt(2) width) so that the
            # (M, B, R, S)-sized work is one addcmul, a square and the softmax: these steps
            # are bound by elementwise passes over that tensor, not by arithmetic.
            scale = (math.sqrt(0.5) / width).unsqueeze(-1)
            scaled_distance = torch.addcmul(-mean.unsqueeze(-1) * scale, self.center_positions, scale)
            weights = torch.softmax(scaled_distance.square().neg_(), dim=-1)
        # Elementwise product and sum rather than a batch of (R, S) @ (S, 1) matmuls:
        # measured several times faster on CPU, backward included.
        context = (weights * center.view(1, B, 1, S)).sum(dim=-1)
        return context, weights

    # ------------------------------------------------------------------ time loop
    def _precompute(self, x: Tensor) -> tuple[Tensor, ...]:
        """Feed-forward pre-activations that do not depend on the state, for all T at once.

        :return: one tensor ``(T, M, B, H)``: ``U x_t + b_0`` for the input module,
            ``b_m`` for the others.
        """
        T, B, _ = x.shape
        M, H = self.num_modules, self.module_size
        input_part = torch.addmm(self.ff_bias[0], x.reshape(T * B, -1), self.ff_input_weight).view(T, 1, B, H)
        other_part = self.ff_bias[1:].view(1, M - 1, 1, H).expand(T, M - 1, B, H)
        return (torch.cat([input_part, other_part], dim=1),)

    def forward(
        self,
        x: Tensor,
        state: Tensor,
        episode_starts: Tensor,
        return_info: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Run the core over a sequence (same contract as ``RecurrentCore.forward``).

        Overridden (rather than ``_step``) so that what depends only on the
        parameters (normalised and composed read weights) is computed once per
        call, the state stays module-first ``(M, B, H)`` between steps, and the
        linear readings can train through a hand-written backward.

        :param x: inputs, shape ``(T, B, input_size)``.
        :param state: state entering step 0, shape ``(B, M*H)``.
        :param episode_starts: ``(T, B)`` bool; true resets that env's state before step t.
        :param return_info: also return ``{"read_weights": (T, B, M, S)}``.
        :return: ``(out, state)`` with out ``(T, B, H)``, or ``(out, state, info)``.
        """
        self.check_inputs(x, state, episode_starts)
        starts = episode_starts.to(device=x.device, dtype=torch.bool)
        # One host read of the (T,) reset pattern instead of a reset op at every step.
        any_start = starts.any(dim=1).tolist()
        (ff_preact,) = self._precompute(x)
        if self.reading in ("fast_softmax", "fast_gaussian"):
            out, new_state, read_weights = self._forward_fast(ff_preact, state, starts, any_start, return_info)
            return (out, new_state, {"read_weights": read_weights}) if return_info else (out, new_state)

        T, B = x.shape[:2]
        M, H, S = self.num_modules, self.module_size, self.center_size
        read_weight = self.linear_read_weight()
        # Reading and the feed-forward layer are both linear in the center, so
        # they compose into one (S, M*H) matrix: one matmul per step for all modules.
        read_ff_weight = torch.bmm(read_weight, self.ff_read_weight).transpose(0, 1).reshape(S, M * H)
        # Module-last layout (T, B, M*H) so that addmm adds it in the same op.
        ff_preact = ff_preact.permute(0, 2, 1, 3).reshape(T, B, M * H)
        tensors = (
            state,
            ff_preact,
            read_ff_weight,
            self.gru_input_weight,
            self.gru_input_bias,
            self.gru_hidden_weight,
            self.gru_hidden_bias,
        )
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if needs_grad and self.fused_backward:
            out, new_state = _LinearThalNetBPTT.apply(self.center_size_per_module, starts, any_start, *tensors)
        else:
            out, new_state, _ = _linear_steps(self.center_size_per_module, starts, any_start, *tensors, record=False)
        if not return_info:
            return out, new_state
        share = read_weight.abs().sum(dim=2)  # (M, S)
        share = share / share.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return out, new_state, {"read_weights": share.expand(T, B, M, S)}

    def _forward_fast(
        self, ff_preact: Tensor, state: Tensor, starts: Tensor, any_start: list[bool], return_info: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The time loop of the fast readings, under ordinary autograd.

        :param ff_preact: ``(T, M, B, H)`` from :meth:`_precompute`.
        :param state: ``(B, M*H)`` entering step 0.
        :param starts: ``(T, B)`` bool resets; ``any_start`` its per-step ``any``.
        :param return_info: also collect the read weights.
        :return: out ``(T, B, H)``, final state ``(B, M*H)``, read weights ``(T, B, M, S)`` or None.
        """
        T, _, B, _ = ff_preact.shape
        M, H, C, S = self.num_modules, self.module_size, self.center_size_per_module, self.center_size
        # The GRU's hidden-side gates and the read parameters both come from
        # h(t-1): one batched matmul per step for both.
        hidden_weight = torch.cat([self.gru_hidden_weight, self.read_query_weight], dim=2)
        hidden_bias = torch.cat([self.gru_hidden_bias, self.read_query_bias], dim=2)
        # unbind, not ff_preact[t]: the backward of T separate selects would build
        # T full-size zero tensors (quadratic in T); unbind's backward is one stack.
        ff_preact_steps = ff_preact.unbind(0)
        h = state.view(B, M, H).transpose(0, 1)  # (M, B, H)
        outs: list[Tensor] = []
        step_read_weights: list[Tensor] = []
        for t in range(T):
            if any_start[t]:
                h = _reset(h, starts[t])
            center = h[:, :, :C].transpose(0, 1).reshape(B, S)
            hidden_proj = torch.baddbmm(hidden_bias, h, hidden_weight)
            # split, not two slices: one backward node instead of two zero-filled copies.
            hidden_gates, query = hidden_proj.split([3 * H, hidden_proj.shape[-1] - 3 * H], dim=-1)
            context, weights = self._fast_read(query, center)
            ff = F.elu(torch.baddbmm(ff_preact_steps[t], context, self.ff_read_weight))
            if return_info:
                step_read_weights.append(weights.mean(dim=2).transpose(0, 1))
            input_gates = torch.baddbmm(self.gru_input_bias, ff, self.gru_input_weight)
            h, _ = _gru_update(input_gates, hidden_gates, h)
            outs.append(h[-1])
        read_weights = torch.stack(step_read_weights) if return_info else None
        return torch.stack(outs), h.transpose(0, 1).reshape(B, M * H), read_weights


def _reset(h: Tensor, starts_t: Tensor) -> Tensor:
    """Zero the envs of ``h`` (M, B, H) that start an episode (``starts_t`` (B,) bool).

    ``torch.where``, not a multiply, so a NaN/inf never leaks across episodes.
    """
    return torch.where(starts_t.view(1, -1, 1), torch.zeros((), dtype=h.dtype, device=h.device), h)


def _gru_update(input_gates: Tensor, hidden_gates: Tensor, h: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """PyTorch's GRU equations for all modules at once, gates in the order (reset, update, new).

    :param input_gates: ``(M, B, 3H)`` input-side pre-activations (bias included).
    :param hidden_gates: ``(M, B, 3H)`` hidden-side pre-activations (bias included).
    :param h: ``(M, B, H)`` previous state.
    :return: the new state and, for the hand-written backward, the reset/update gates
        ``(M, B, 2H)``, the candidate ``(M, B, H)`` and the hidden-side new-gate pre-activation.
    """
    H = h.shape[-1]
    input_reset_update, input_new = input_gates.split([2 * H, H], dim=-1)
    hidden_reset_update, hidden_new = hidden_gates.split([2 * H, H], dim=-1)
    reset_update = torch.sigmoid(input_reset_update + hidden_reset_update)
    reset_gate, update_gate = reset_update.chunk(2, dim=-1)
    new = torch.tanh(input_new + reset_gate * hidden_new)
    return torch.lerp(new, h, update_gate), (reset_update, new, hidden_new)  # (1 - u) * new + u * h


class _Saved(NamedTuple):
    """Per-step intermediates of the linear-reading loop, stacked over time, for the hand-written backward."""

    h_in: Tensor  # (T, M, B, H) state entering each step, after resets
    ff_preact: Tensor  # (T, B, M*H) feed-forward pre-activation
    reset_update: Tensor  # (T, M, B, 2H) reset and update gates
    new: Tensor  # (T, M, B, H) GRU candidate
    hidden_new: Tensor  # (T, M, B, H) hidden-side pre-activation of the candidate


def _linear_steps(
    center_size_per_module: int,
    starts: Tensor,
    any_start: list[bool],
    state: Tensor,
    ff_preact: Tensor,
    read_ff_weight: Tensor,
    input_weight: Tensor,
    input_bias: Tensor,
    hidden_weight: Tensor,
    hidden_bias: Tensor,
    record: bool,
) -> tuple[Tensor, Tensor, _Saved | None]:
    """The time loop of the linear readings (differentiable by autograd when ``record`` is false).

    :param center_size_per_module: C, the center features per module (the first C of each state).
    :param starts: ``(T, B)`` bool resets; ``any_start`` its per-step ``any``.
    :param state: ``(B, M*H)`` entering step 0.
    :param ff_preact: ``(T, B, M*H)`` state-independent part of the feed-forward pre-activation.
    :param read_ff_weight: ``(S, M*H)`` read matrices composed with the feed-forward read weights.
    :param input_weight: ``(M, H, 3H)`` GRU input weights; ``input_bias`` ``(M, 1, 3H)``.
    :param hidden_weight: ``(M, H, 3H)`` GRU hidden weights; ``hidden_bias`` ``(M, 1, 3H)``.
    :param record: keep the intermediates the hand-written backward needs.
    :return: out ``(T, B, H)``, final state ``(B, M*H)``, and the intermediates if recorded.
    """
    T, B, _ = ff_preact.shape
    M, H = input_weight.shape[0], input_weight.shape[1]
    C = center_size_per_module
    ff_preact_steps = ff_preact.unbind(0)  # see _forward_fast for why not ff_preact[t]
    h = state.view(B, M, H).transpose(0, 1)  # (M, B, H)
    outs: list[Tensor] = []
    saved: list[tuple[Tensor, ...]] = []
    for t in range(T):
        if any_start[t]:
            h = _reset(h, starts[t])
        center = h[:, :, :C].transpose(0, 1).reshape(B, M * C)
        hidden_gates = torch.baddbmm(hidden_bias, h, hidden_weight)
        preact = torch.addmm(ff_preact_steps[t], center, read_ff_weight)
        ff = F.elu(preact).view(B, M, H).transpose(0, 1)
        input_gates = torch.baddbmm(input_bias, ff, input_weight)
        h_new, (reset_update, new, hidden_new) = _gru_update(input_gates, hidden_gates, h)
        if record:
            saved.append((h, preact, reset_update, new, hidden_new))
        h = h_new
        outs.append(h[-1])
    out = torch.stack(outs)
    final = h.transpose(0, 1).reshape(B, M * H)
    if not record:
        return out, final, None
    return out, final, _Saved(*(torch.stack(parts) for parts in zip(*saved, strict=True)))


class _LinearThalNetBPTT(torch.autograd.Function):
    """:func:`_linear_steps` with a hand-written backward through time.

    Autograd would record ~20 nodes per step and compute every weight gradient
    step by step. Here the backward loop only carries the state gradient; the
    weight gradients are summed over all T steps afterwards in one batched
    matmul each. ``ThalNet(fused_backward=False)`` trains through autograd
    instead (the tests compare the two).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        center_size_per_module: int,
        starts: Tensor,
        any_start: list[bool],
        state: Tensor,
        ff_preact: Tensor,
        read_ff_weight: Tensor,
        input_weight: Tensor,
        input_bias: Tensor,
        hidden_weight: Tensor,
        hidden_bias: Tensor,
    ) -> tuple[Tensor, Tensor]:
        out, final, saved = _linear_steps(
            center_size_per_module,
            starts,
            any_start,
            state,
            ff_preact,
            read_ff_weight,
            input_weight,
            input_bias,
            hidden_weight,
            hidden_bias,
            record=True,
        )
        assert saved is not None
        ctx.center_size_per_module, ctx.any_start = center_size_per_module, any_start
        ctx.save_for_backward(starts, read_ff_weight, input_weight, hidden_weight, *saved)
        return out, final

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out: Tensor, d_final: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        starts, read_ff_weight, input_weight, hidden_weight, *saved_tensors = ctx.saved_tensors
        saved = _Saved(*saved_tensors)
        C, any_start = ctx.center_size_per_module, ctx.any_start
        T, M, B, H = saved.h_in.shape
        S = M * C
        # ELU'(a) = 1 for a > 0, exp(a) = ELU(a) + 1 otherwise: once for all steps.
        ff = F.elu(saved.ff_preact)
        elu_grad = torch.where(saved.ff_preact > 0, torch.ones_like(ff), ff + 1)
        input_weight_t = input_weight.transpose(1, 2)
        hidden_weight_t = hidden_weight.transpose(1, 2)
        read_ff_weight_t = read_ff_weight.t()
        d_input_gates = ff.new_empty(T, M, B, 3 * H)
        d_hidden_gates = ff.new_empty(T, M, B, 3 * H)
        d_preact = ff.new_empty(T, B, M * H)
        dh = d_final.view(B, M, H).transpose(0, 1).contiguous()  # gradient w.r.t. the state after step t
        for t in reversed(range(T)):
            dh[-1] += d_out[t]
            reset_update, new = saved.reset_update[t], saved.new[t]
            reset_gate, update_gate = reset_update.chunk(2, dim=-1)
            # h = new + u * (h_in - new)
            dh_through_update = dh * update_gate
            d_new_preact = (dh - dh_through_update) * (1 - new * new)
            d_update = dh * (saved.h_in[t] - new)
            d_reset = d_new_preact * saved.hidden_new[t]
            d_reset_update = torch.cat([d_reset, d_update], dim=-1).mul_(reset_update * (1 - reset_update))
            d_in = torch.cat([d_reset_update, d_new_preact], dim=-1, out=d_input_gates[t])
            d_hid = torch.cat([d_reset_update, d_new_preact * reset_gate], dim=-1, out=d_hidden_gates[t])
            dh_in = torch.baddbmm(dh_through_update, d_hid, hidden_weight_t)
            d_ff = torch.bmm(d_in, input_weight_t)  # (M, B, H)
            d_pre = d_preact[t]
            torch.mul(d_ff.transpose(0, 1).reshape(B, M * H), elu_grad[t], out=d_pre)
            d_center = d_pre @ read_ff_weight_t  # (B, S)
            dh_in[:, :, :C] += d_center.view(B, M, C).transpose(0, 1)
            if any_start[t]:  # the state entering step t was reset: no gradient to before it
                dh_in.masked_fill_(starts[t].view(1, B, 1), 0.0)
            dh = dh_in
        needs = ctx.needs_input_grad
        d_state = dh.transpose(0, 1).reshape(B, M * H) if needs[3] else None
        # Weight gradients: sums over all T*B rows at once, module-first for bmm.
        d_in_rows = d_input_gates.transpose(0, 1).reshape(M, T * B, 3 * H)
        d_hid_rows = d_hidden_gates.transpose(0, 1).reshape(M, T * B, 3 * H)
        d_read_ff = d_input_w = d_input_b = d_hidden_w = d_hidden_b = None
        if needs[5]:
            centers = saved.h_in[..., :C].permute(0, 2, 1, 3).reshape(T * B, S)
            d_read_ff = centers.t() @ d_preact.view(T * B, M * H)
        if needs[6]:
            ff_rows = ff.view(T, B, M, H).permute(2, 0, 1, 3).reshape(M, T * B, H)
            d_input_w = torch.bmm(ff_rows.transpose(1, 2), d_in_rows)
        if needs[7]:
            d_input_b = d_in_rows.sum(dim=1, keepdim=True)
        if needs[8]:
            h_rows = saved.h_in.transpose(0, 1).reshape(M, T * B, H)
            d_hidden_w = torch.bmm(h_rows.transpose(1, 2), d_hid_rows)
        if needs[9]:
            d_hidden_b = d_hid_rows.sum(dim=1, keepdim=True)
        d_ff_preact = d_preact if needs[4] else None
        return (None, None, None, d_state, d_ff_preact, d_read_ff, d_input_w, d_input_b, d_hidden_w, d_hidden_b)
