"""ThalNet: recurrent modules that communicate through a shared routing center.

After Hafner, Irpan, Davidson and Heess, "Learning Hierarchical Information Flow
with Recurrent Neural Modules" (NeurIPS 2017), behind the recurrent-core protocol
of ``policies/cores/base.py``.

Step t, for M modules of size H, C center features per module and read size R:

1. Center ``c_t`` (size ``S = M*C``): the first C features of every module's
   hidden state from step t-1, concatenated in module order.
2. Read: each module m reads a context ``r_m`` (size R) from the center with
   the chosen reading mechanism (below).
3. Feed-forward: ``z_m = ELU(W_m r_m + b_m)``, plus ``U x_t`` for the input
   module (module 0) only.
4. GRU: ``h_m = GRU_m(z_m, h_m)``. Its first C features are module m's
   contribution to the center; module M-1 (the output module) is the core's
   output, size H.

The input module runs first: it reads ``c_t`` and updates, and its new center
features replace its slot of ``c_t`` before the other modules read. So the
output at step t can depend on ``x_t``. With every module reading ``c_t`` as
it stands (the paper's synchronous step), ``x_t`` reaches the output module
one step later at the earliest: an agent would act on the previous
observation, a handicap that has nothing to do with modularity.

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
  The heads start spread evenly over the center, each as wide as the spacing
  between them, so every module's features are read from the first step. (All
  heads starting at the middle of the center, a window of about one position
  there, read no input-module feature, and the Gaussian's tails were exactly 0
  in float32: the output did not depend on the input and no gradient could
  move the windows.)

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    :raises ValueError: for a size < 1, ``num_modules < 2``, ``C > H`` or an unknown reading.
    """

    # 2: the input module runs first each step (2026-12-02); revision 1 read the center synchronously.
    revision = 2

    def __init__(
        self,
        input_size: int,
        num_modules: int = 4,
        module_size: int = 128,
        center_size_per_module: int = 32,
        read_size: int | None = None,
        reading: str = "weight_norm",
    ) -> None:
        super().__init__()
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
            if self.reading == "fast_gaussian":
                with torch.no_grad():
                    self.read_query_bias.copy_(self._spread_gaussian_heads())
            self.register_buffer("center_positions", torch.arange(S, dtype=torch.float32), persistent=False)

    def _spread_gaussian_heads(self) -> Tensor:
        """Read biases ``(1, 1, 2R)`` that place head j's window at ``(j + 1/2) S / R``, as wide as the spacing."""
        R, S = self.read_size, self.center_size
        fraction = (torch.arange(R, dtype=torch.float32) + 0.5) / R
        mean_bias = torch.logit(fraction)  # sigmoid(bias) * (S - 1) is the window's mean
        width = max((S - 1) / R, 1.0)
        width_bias = torch.full((R,), math.log(math.expm1(width - MIN_GAUSSIAN_WIDTH)))  # softplus^-1
        return torch.cat([mean_bias, width_bias]).view(1, 1, 2 * R)

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
        call, and the state stays module-first ``(M, B, H)`` between steps.
        Autograd differentiates the loop: a hand-written backward through time
        was tried and measured no faster (the per-step batched matmuls dominate).

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
        out, new_state = self._forward_linear(ff_preact, read_ff_weight, state, starts, any_start)
        if not return_info:
            return out, new_state
        share = read_weight.abs().sum(dim=2)  # (M, S)
        share = share / share.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return out, new_state, {"read_weights": share.expand(T, B, M, S)}

    def _forward_linear(
        self, ff_preact: Tensor, read_ff_weight: Tensor, state: Tensor, starts: Tensor, any_start: list[bool]
    ) -> tuple[Tensor, Tensor]:
        """The time loop of the linear readings, under ordinary autograd.

        :param ff_preact: ``(T, B, M*H)`` state-independent part of the feed-forward pre-activation.
        :param read_ff_weight: ``(S, M*H)`` read matrices composed with the feed-forward read weights.
        :param state: ``(B, M*H)`` entering step 0.
        :param starts: ``(T, B)`` bool resets; ``any_start`` its per-step ``any``.
        :return: out ``(T, B, H)`` and final state ``(B, M*H)``.
        """
        T, B, _ = ff_preact.shape
        M, H, C, S = self.num_modules, self.module_size, self.center_size_per_module, self.center_size
        # The input module (columns :H) runs first; the others read the center it updated.
        read_ff_input, read_ff_others = read_ff_weight.split([H, (M - 1) * H], dim=1)
        # The others' read of the center, split at the input module's slot: the rows of the
        # slot multiply its new features, the rest the old center.
        read_ff_slot, read_ff_rest = read_ff_others.split([C, S - C], dim=0)
        ff_input_steps, ff_others_steps = (p.unbind(0) for p in ff_preact.split([H, (M - 1) * H], dim=2))
        input_weight, others_weight = self.gru_input_weight.split([1, M - 1])
        input_bias, others_bias = self.gru_input_bias.split([1, M - 1])
        h = state.view(B, M, H).transpose(0, 1)  # (M, B, H)
        outs: list[Tensor] = []
        for t in range(T):
            if any_start[t]:
                h = _reset(h, starts[t])
            center = h[:, :, :C].transpose(0, 1).reshape(B, S)
            hidden_gates = torch.baddbmm(self.gru_hidden_bias, h, self.gru_hidden_weight)
            # split, not slices: one backward node instead of a zero-filled copy per slice.
            h_input, h_others = h.split([1, M - 1])
            gates_input, gates_others = hidden_gates.split([1, M - 1])
            _, center_rest = center.split([C, S - C], dim=1)
            ff_input = F.elu(torch.addmm(ff_input_steps[t], center, read_ff_input)).unsqueeze(0)
            h_input = _gru_update(torch.baddbmm(input_bias, ff_input, input_weight), gates_input, h_input)
            others_preact = torch.addmm(ff_others_steps[t], center_rest, read_ff_rest)
            ff_others = F.elu(torch.addmm(others_preact, h_input[0, :, :C], read_ff_slot))
            ff_others = ff_others.view(B, M - 1, H).transpose(0, 1)
            h_others = _gru_update(torch.baddbmm(others_bias, ff_others, others_weight), gates_others, h_others)
            h = torch.cat([h_input, h_others])
            outs.append(h[-1])
        return torch.stack(outs), h.transpose(0, 1).reshape(B, M * H)

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
        input_weight, others_weight = self.gru_input_weight.split([1, M - 1])
        input_bias, others_bias = self.gru_input_bias.split([1, M - 1])
        read_input, read_others = self.ff_read_weight.split([1, M - 1])
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
            # The input module first (module docstring), then the others read its new features.
            ff_input_preact, ff_others_preact = ff_preact_steps[t].split([1, M - 1])
            query_input, query_others = query.split([1, M - 1])
            gates_input, gates_others = hidden_gates.split([1, M - 1])
            h_input, h_others = h.split([1, M - 1])
            context, weights_input = self._fast_read(query_input, center)
            ff_input = F.elu(torch.baddbmm(ff_input_preact, context, read_input))
            h_input = _gru_update(torch.baddbmm(input_bias, ff_input, input_weight), gates_input, h_input)
            center = torch.cat([h_input[0, :, :C], center.split([C, S - C], dim=1)[1]], dim=1)
            context, weights_others = self._fast_read(query_others, center)
            ff_others = F.elu(torch.baddbmm(ff_others_preact, context, read_others))
            h_others = _gru_update(torch.baddbmm(others_bias, ff_others, others_weight), gates_others, h_others)
            h = torch.cat([h_input, h_others])
            if return_info:
                weights = torch.cat([weights_input, weights_others])
                step_read_weights.append(weights.mean(dim=2).transpose(0, 1))
            outs.append(h[-1])
        read_weights = torch.stack(step_read_weights) if return_info else None
        return torch.stack(outs), h.transpose(0, 1).reshape(B, M * H), read_weights


def _reset(h: Tensor, starts_t: Tensor) -> Tensor:
    """Zero the envs of ``h`` (M, B, H) that start an episode (``starts_t`` (B,) bool).

    ``torch.where``, not a multiply, so a NaN/inf never leaks across episodes.
    """
    return torch.where(starts_t.view(1, -1, 1), torch.zeros((), dtype=h.dtype, device=h.device), h)


def _gru_update(input_gates: Tensor, hidden_gates: Tensor, h: Tensor) -> Tensor:
    """PyTorch's GRU equations for all modules at once, gates in the order (reset, update, new).

    :param input_gates: ``(M, B, 3H)`` input-side pre-activations (bias included).
    :param hidden_gates: ``(M, B, 3H)`` hidden-side pre-activations (bias included).
    :param h: ``(M, B, H)`` previous state.
    :return: the new state ``(M, B, H)``.
    """
    H = h.shape[-1]
    input_reset_update, input_new = input_gates.split([2 * H, H], dim=-1)
    hidden_reset_update, hidden_new = hidden_gates.split([2 * H, H], dim=-1)
    reset_gate, update_gate = torch.sigmoid(input_reset_update + hidden_reset_update).chunk(2, dim=-1)
    new = torch.tanh(input_new + reset_gate * hidden_new)
    return torch.lerp(new, h, update_gate)  # (1 - u) * new + u * h
