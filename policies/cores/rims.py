"""Recurrent Independent Mechanisms (RIMs), and the layer block and engine BRIMs reuses.

A RIMs layer holds K modules of size H, each with its own LSTM or GRU cell. At
every step (shared/DESIGN.md, "RIMs"; Goyal et al. 2019):

1. every module attends over the input slots ``[null, slot_1, ...]``: keys and
   values are bias-free projections of each slot shared by all modules (so the
   null key and value are exactly zero), queries are per-module projections of
   ``h_{t-1,k}``; softmax over slots per module and head;
2. the ``k_active`` modules putting the least (head-averaged) attention on the
   null slot are active: a hard, detached top-k on the softmax probabilities (with
   one head ranked by the log-sum-exp of the slot scores: the same order, without
   the null probability rounding to exactly 1 for very negative scores); ties go to
   the lower module index;
3. each active module runs its own cell on its attended input (all K cells in
   one batched matmul); inactive modules keep their state: ``h~ = h_{t-1}``;
4. communication: multi-head attention of the modules over all modules' ``h~``
   (per-module Q/K/V), added to ``h~`` as a residual for the active modules only:
   ``h = h~ + tanh(ctx @ W_out[k])``. The update is bounded on purpose: with a
   plain linear residual an inactive module's kept ``h`` feeds the others'
   values, which feed back into it later, and ``h`` grows
   geometrically over a long episode (seen in PPO on DoorKey: ``|h|`` near 1e21,
   then NaN gradients). Bounded, ``h`` stays inside (-2, 2) with the LSTM cell
   (``o * tanh(c)`` plus at most 1) and grows at most linearly with GRU;
5. inactive modules keep ``h`` and ``c`` bit-for-bit (``torch.where``).

How it is made fast (an agent's bottleneck is many tiny ops per step):

* Per-module weights are stacked ``(K, in, out)`` and applied with
  ``bmm``/``baddbmm`` on ``(K, B, in)`` activations: no loop over modules, no
  off-diagonal block exists as a parameter.
* Keys and values of a slot fed by ``x`` depend only on ``x``: computed for all T
  steps in one matmul. In a layer whose slots are all fed by ``x`` (RIMs), the
  value only enters the cell through ``W_ih`` and attention is linear in the
  value, so the *drive* ``v_t @ W_ih[k]`` of every module (per head) is
  precomputed too and a step only adds ``attention * drive``. A layer that reads
  other layers' states (BRIMs) attends the values first and applies ``W_ih`` in
  one batched matmul per step.
* With one non-null slot, ``softmax([0, s]) = [sigmoid(-s), sigmoid(s)]``.
* ``W_hh`` and the query weights both multiply ``h_{t-1}``: separate parameters
  (the meta-learning split needs them apart), concatenated once per forward so a
  step does one ``baddbmm`` for both. Score scales ride on that concatenation
  (input attention) and on ``baddbmm``'s ``alpha`` (communication).
* Every tanh inside the cells is computed as ``2*sigmoid(2x) - 1`` (sigmoid is several times
  faster than tanh on CPU), so one sigmoid covers all four LSTM gates.
* Training uses a hand-written backward through time (:class:`_FusedRIMsStack`):
  the forward runs without autograd bookkeeping, and the weight gradients are
  one large batched matmul over all T steps at the end instead of T small ones.
  The same forward code run under ordinary autograd (``fused_backward=False``)
  is the reference the tests compare the fused gradients against.
* With one input head (LSTM or GRU cells) on the CPU in float32, the whole time loop,
  forward and backward, runs in a C kernel (``rims_kernel.c``, :class:`_KernelStack`):
  one call per sequence instead of ~40 tensor ops per step and layer, whose fixed
  cost dominates at agent batch sizes. It computes what the Python engine above
  computes (tested against it); the weight gradients stay batched matmuls in torch.

State layout of one layer, flat per env: ``lstm`` is ``(2, K, H)`` (all ``h``,
then all ``c``), ``gru`` is ``(K, H)``; a core's state concatenates its layers.
Gate order inside the stacked cell weights: LSTM ``[i, f, o, g]``, GRU ``[r, z, n]``.
"""

from __future__ import annotations

import ctypes
import math
import threading
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from policies.cores.base import RecurrentCore, check_choice, check_positive_int, parameters_frozen
from policies.native import native_library, pointer

CELLS: tuple[str, ...] = ("lstm", "gru")

_sigmoid_backward = torch.ops.aten.sigmoid_backward
_tanh_backward = torch.ops.aten.tanh_backward


def check_dropout(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a probability in ``[0, 1)``, else raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _dropout_mask(like: Tensor, p: float) -> Tensor:
    """Inverted-dropout mask (values 0 or 1/(1-p)), drawn once so forward and backward agree."""
    return torch.empty_like(like, memory_format=torch.contiguous_format).bernoulli_(1.0 - p).div_(1.0 - p)


class LayerWeights(NamedTuple):
    """A layer's weights rearranged once per forward for the per-step code (differentiable).

    :param recurrent: ``(K, H, gates + heads*key)``: ``W_hh`` next to the query weights (scaled by 1/sqrt(key)).
    :param recurrent_bias: ``(K, 1, gates + heads*key)``: the recurrent bias, zeros for the queries.
    :param input_weight: ``W_ih``: with precomputed drives ``(value, K*gates)`` for one head or
        ``(heads, value, K*gates)``; otherwise ``(K, heads*value, gates)``.
    :param input_bias: ``(K, 1, gates)``: GRU's ``b_ih``; None for LSTM.
    :param comm_qkv: ``(K, H, comm_heads*(2*key + value))``, per head ``[q|k|v]``.
    :param comm_out: ``(K, comm_heads*value, H)``.
    :param slot_kv: per slot, its key/value projection ``(slot width, heads*(key+value))``.
    """

    recurrent: Tensor
    recurrent_bias: Tensor
    input_weight: Tensor
    input_bias: Tensor | None
    comm_qkv: Tensor
    comm_out: Tensor
    slot_kv: tuple[Tensor, ...]


class StepSaved(NamedTuple):
    """Intermediates of one layer step kept for the hand-written backward (see :meth:`RIMsLayer.step`)."""

    h_prev: Tensor
    c_prev: Tensor | None
    query: Tensor
    keys: tuple[Tensor, ...]
    feeds: tuple[Tensor, ...]
    probs: Tensor
    input_mask: Tensor | None
    weighted: tuple[Tensor, ...]
    attended: Tensor | None
    gates: tuple[Tensor, ...]
    h_tilde: Tensor
    comm_qkv: Tensor
    comm_attn: Tensor
    comm_mask: Tensor | None
    comm_weighted: Tensor
    ctx: Tensor
    comm_update: Tensor
    active: Tensor


class StepOut(NamedTuple):
    """Result of one layer step.

    :param h: new ``h`` ``(K, B, H)``.
    :param c: new ``c`` ``(K, B, H)`` for LSTM, None for GRU.
    :param active: ``(K, B)`` bool mask of the active modules.
    :param null: ``(K, B, heads)`` detached attention on the null slot (the selection criterion).
    :param probs: input-attention probabilities before dropout: with one non-null slot its
        ``(K, B, heads)`` probability, else ``(K, B, heads, 1 + slots)`` including the null slot.
    :param saved: intermediates for :meth:`RIMsLayer.step_backward`, or None.
    """

    h: Tensor
    c: Tensor | None
    active: Tensor
    null: Tensor
    probs: Tensor
    saved: StepSaved | None


class RIMsLayer(nn.Module):
    """One RIMs layer: input attention over slots, top-k selection, K cells, communication.

    Used by :class:`RIMs` (one slot, fed by ``x``) and once per layer by ``BRIMs``
    (a bottom-up and a top-down slot). The layer does not know where a slot's input
    comes from; the engine (:class:`RIMsStackCore`) computes each slot's keys and
    *feeds* with :meth:`slot_forward` and passes them to :meth:`step`. A feed is what
    carries the slot's value to the cells: the drive ``value @ W_ih[k]`` of every module
    when ``precomputed_drives``, else the value itself.

    :param slot_sizes: width of each non-null input slot; each slot has its own
        bias-free key/value projection into the layer's common key/value space.
    :param num_modules: K, the number of modules.
    :param module_size: H, the hidden size of each module.
    :param k_active: modules active per step, ``1 <= k_active <= num_modules``.
    :param cell: ``"lstm"`` or ``"gru"``.
    :param num_input_heads: input-attention heads: their attended values are concatenated
        into the cell input, their null-slot probabilities averaged for selection.
    :param input_key_size: key/query width per input-attention head.
    :param input_value_size: value width per input-attention head (cell input: heads * this).
    :param num_comm_heads: communication-attention heads.
    :param comm_key_size: key/query width per communication head.
    :param comm_value_size: value width per communication head.
    :param dropout: probability, in training mode only, of dropping an input-attention
        probability and (separately drawn) a communication-attention probability.
    :param precomputed_drives: True when every slot is known for all steps before the time
        loop (fed by ``x``): the drives are then computed for all T in one matmul. False
        when a slot reads another layer's state: the attended value is multiplied by
        ``W_ih`` at each step. Same function either way; only the cost differs.
    """

    def __init__(
        self,
        slot_sizes: Sequence[int],
        num_modules: int,
        module_size: int,
        k_active: int,
        cell: str,
        num_input_heads: int,
        input_key_size: int,
        input_value_size: int,
        num_comm_heads: int,
        comm_key_size: int,
        comm_value_size: int,
        dropout: float,
        precomputed_drives: bool = True,
    ) -> None:
        super().__init__()
        if len(slot_sizes) == 0:
            raise ValueError("slot_sizes must name at least one input slot")
        for i, size in enumerate(slot_sizes):
            check_positive_int(f"slot_sizes[{i}]", size)
        K = check_positive_int("num_modules", num_modules)
        H = check_positive_int("module_size", module_size)
        check_positive_int("k_active", k_active)
        if k_active > K:
            raise ValueError(f"k_active must be between 1 and num_modules={K}, got {k_active}")
        self.cell = check_choice("cell", cell, CELLS)
        nh = check_positive_int("num_input_heads", num_input_heads)
        dk = check_positive_int("input_key_size", input_key_size)
        dv = check_positive_int("input_value_size", input_value_size)
        nc = check_positive_int("num_comm_heads", num_comm_heads)
        ck = check_positive_int("comm_key_size", comm_key_size)
        cv = check_positive_int("comm_value_size", comm_value_size)
        p = check_dropout("dropout", dropout)

        self.slot_sizes = tuple(slot_sizes)
        self.num_modules, self.module_size, self.k_active = K, H, k_active
        self.num_input_heads, self.input_key_size, self.input_value_size = nh, dk, dv
        self.num_comm_heads, self.comm_key_size, self.comm_value_size = nc, ck, cv
        self.precomputed_drives = bool(precomputed_drives)
        # Two separately named rates so they can never be swapped (a bug in a public port).
        self.input_attention_dropout = p
        self.comm_attention_dropout = p
        self.gate_size = (4 if self.cell == "lstm" else 3) * H
        self.output_size = K * H
        # tanh(x) = 2*sigmoid(2x) - 1, and sigmoid is several times faster than tanh on CPU:
        # LSTM's g pre-activation is doubled so one sigmoid covers all four gates.
        gate_scale = torch.ones(self.gate_size)
        gate_scale[3 * H :] = 2.0
        self.register_buffer("gate_scale", gate_scale, persistent=False)
        self.state_size = (2 if self.cell == "lstm" else 1) * K * H

        # --- attention parameters ---
        # Per slot one bias-free projection (in, out) to [keys of all heads | values of all heads].
        # No bias is what makes the null slot's key and value exactly zero.
        self.slot_key_value = nn.ParameterList(
            [nn.Parameter(torch.empty(size, nh * (dk + dv))) for size in self.slot_sizes]
        )
        self.query = nn.Parameter(torch.empty(K, H, nh * dk))
        self.comm_qkv = nn.Parameter(torch.empty(K, H, nc * (2 * ck + cv)))
        self.comm_out = nn.Parameter(torch.empty(K, nc * cv, H))
        # --- module (cell) parameters, stacked per module ---
        self.weight_ih = nn.Parameter(torch.empty(K, nh * dv, self.gate_size))
        self.weight_hh = nn.Parameter(torch.empty(K, H, self.gate_size))
        if self.cell == "lstm":
            # One bias: LSTM's b_ih and b_hh would be redundant.
            self.bias = nn.Parameter(torch.empty(K, self.gate_size))
        else:
            # GRU needs both: b_hn sits inside r * (W_hn h + b_hn).
            self.bias_ih = nn.Parameter(torch.empty(K, self.gate_size))
            self.bias_hh = nn.Parameter(torch.empty(K, self.gate_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``nn.LSTMCell``/``nn.GRUCell`` (cells) and ``nn.Linear`` (attention).

        Uniform in ``±1/sqrt(fan_in)``; never constants (a public port set GRU weights to ones).
        """
        bound = 1.0 / math.sqrt(self.module_size)
        for w in self.module_parameters():
            nn.init.uniform_(w, -bound, bound)
        for w in (*self.slot_key_value, self.query, self.comm_qkv, self.comm_out):
            b = 1.0 / math.sqrt(w.shape[-2])  # fan_in: weights are (..., in, out)
            nn.init.uniform_(w, -b, b)

    def module_parameters(self) -> list[nn.Parameter]:
        """The per-module cell parameters (the "fast" group in meta-learning)."""
        if self.cell == "lstm":
            return [self.weight_ih, self.weight_hh, self.bias]
        return [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]

    def attention_parameters(self) -> list[nn.Parameter]:
        """Input-attention (slot keys/values, queries) and communication-attention parameters."""
        return [*self.slot_key_value, self.query, self.comm_qkv, self.comm_out]

    # ------------------------------------------------------------------ forward pieces

    def _drives(self, precomputed_drives: bool | None) -> bool:
        """Whether drives are precomputed: as asked, or as this layer's ``precomputed_drives`` says (None)."""
        return self.precomputed_drives if precomputed_drives is None else precomputed_drives

    def prepare(self, precomputed_drives: bool | None = None) -> LayerWeights:
        """Rearrange the weights for the per-step code; once per forward (differentiable).

        :param precomputed_drives: lay ``W_ih`` out for precomputed drives or not (see
            :class:`LayerWeights`); None: as this layer's ``precomputed_drives`` says.
        """
        drives = self._drives(precomputed_drives)
        K, nh, dk, dv, G = (
            self.num_modules,
            self.num_input_heads,
            self.input_key_size,
            self.input_value_size,
            self.gate_size,
        )
        # Kept cheap: it runs on every call, and rollouts call with T=1.
        recurrent = torch.cat([self.weight_hh, self.query * (1.0 / math.sqrt(dk))], dim=-1)
        b_hh = self.bias if self.cell == "lstm" else self.bias_hh
        recurrent_bias = torch.cat([b_hh, b_hh.new_zeros(K, nh * dk)], dim=-1).unsqueeze(1)
        if not drives:
            input_weight = self.weight_ih
        elif nh == 1:
            input_weight = self.weight_ih.permute(1, 0, 2).reshape(dv, K * G)
        else:
            input_weight = self.weight_ih.view(K, nh, dv, G).permute(1, 2, 0, 3).reshape(nh, dv, K * G)
        input_bias = None if self.cell == "lstm" else self.bias_ih.unsqueeze(1)
        return LayerWeights(
            recurrent,
            recurrent_bias,
            input_weight,
            input_bias,
            self.comm_qkv,
            self.comm_out,
            tuple(self.slot_key_value),
        )

    def slot_forward(
        self, w: LayerWeights, slot: int, inputs: Tensor, precomputed_drives: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        """Keys and feeds of one slot, for inputs with any leading shape ``(..., B, width)``.

        :param w: from :meth:`prepare` (called with the same ``precomputed_drives``).
        :param slot: index of the (non-null) slot.
        :param inputs: ``(..., B, slot_sizes[slot])``, e.g. ``(T, B, in)`` for all steps at once.
        :param precomputed_drives: feed drives or values; None: as this layer's ``precomputed_drives`` says.
        :return: ``keys`` ``(..., B, heads, key)`` and ``feeds``: with precomputed drives the
            drives ``(..., K, B, gates)`` for one head, else ``(..., K, B, heads, gates)``
            (``drive[k] = value @ W_ih[k]`` per head); otherwise the values ``(..., B, value)``
            for one head, else ``(..., B, heads, value)``.
        """
        K, nh, dk, dv, G = (
            self.num_modules,
            self.num_input_heads,
            self.input_key_size,
            self.input_value_size,
            self.gate_size,
        )
        kv = inputs @ w.slot_kv[slot]
        keys, values = kv.split([nh * dk, nh * dv], dim=-1)
        keys = keys.unflatten(-1, (nh, dk))
        if not self._drives(precomputed_drives):
            return keys, (values if nh == 1 else values.unflatten(-1, (nh, dv)))
        if nh == 1:
            return keys, (values @ w.input_weight).unflatten(-1, (K, G)).transpose(-2, -3)
        lead = values.shape[:-1]
        d = torch.bmm(values.reshape(-1, nh, dv).transpose(0, 1), w.input_weight)  # (heads, N, K*G)
        return keys, d.view(nh, *lead, K, G).movedim(0, -2).transpose(-3, -4)

    def step(
        self,
        w: LayerWeights,
        h: Tensor,
        c: Tensor | None,
        keys: Sequence[Tensor],
        feeds: Sequence[Tensor],
        save: bool = False,
    ) -> StepOut:
        """One step of the layer (plain differentiable torch ops).

        :param w: from :meth:`prepare`.
        :param h: ``(K, B, H)`` entering the step (after any reset).
        :param c: ``(K, B, H)`` for LSTM, None for GRU.
        :param keys: per non-null slot ``(B, heads, key)``.
        :param feeds: per non-null slot, one step of :meth:`slot_forward`'s feeds.
        :param save: keep intermediates for :meth:`step_backward`.
        """
        K, B, H = h.shape
        nh, dk, G = self.num_input_heads, self.input_key_size, self.gate_size
        nc, ck, cv = self.num_comm_heads, self.comm_key_size, self.comm_value_size

        # Gate pre-activations and input-attention queries from h_{t-1}: one baddbmm.
        z = torch.baddbmm(w.recurrent_bias, h, w.recurrent)
        rec, query = z.split([G, nh * dk], dim=-1)
        query = query.view(K, B, nh, dk)

        # Input attention; the null slot's key is zero, so its score is exactly 0.
        if len(keys) == 1:
            score = (query * keys[0]).sum(-1)  # (K, B, heads)
            probs = torch.sigmoid(score)  # softmax([0, s])[1]
            with torch.no_grad():
                null = torch.sigmoid(-score)  # softmax([0, s])[0], without 1 - p rounding
            attention: tuple[Tensor, ...] = (probs,)
        else:
            stacked = torch.stack(list(keys), dim=-2)  # (B, heads, slots, key)
            score = (query.unsqueeze(-2) * stacked).sum(-1)  # (K, B, heads, slots)
            probs = torch.softmax(F.pad(score, (1, 0)), dim=-1)  # null score 0 prepended
            null, *rest = probs.unbind(-1)
            null = null.detach()
            attention = tuple(rest)  # per slot (K, B, heads)

        # Selection: the k_active modules with the least head-averaged null attention. Ties (every
        # score is exactly 0 right after a reset) go to the lower module index, as in the C kernel:
        # a stable sort, where topk's order among ties is unspecified.
        with torch.no_grad():
            if self.k_active == K:
                active = torch.ones(K, B, dtype=torch.bool, device=h.device)
            else:
                if nh == 1:
                    # One head: least null attention = largest log-sum-exp of the slot scores (the
                    # score itself for one slot), ranked so (as the kernel does) because the null
                    # probability rounds to exactly 1 once every score is below about -16.6 and ties.
                    criterion = -(score[..., 0] if len(keys) == 1 else torch.logsumexp(score[..., 0, :], dim=-1))
                else:
                    criterion = null.mean(-1)
                chosen = torch.sort(criterion, dim=0, stable=True).indices[: self.k_active]
                active = torch.zeros(K, B, dtype=torch.bool, device=h.device).scatter_(0, chosen, True)
        keep = active.unsqueeze(-1)

        input_mask = None
        weighted = attention
        if self.training and self.input_attention_dropout > 0.0:
            # One mask (K, B, heads, slots) over the non-null probabilities.
            input_mask = _dropout_mask(null.unsqueeze(-1).expand(*null.shape, len(keys)), self.input_attention_dropout)
            weighted = tuple(a * m for a, m in zip(attention, input_mask.unbind(-1), strict=True))

        # Cell input: attention-weighted values (the null slot's value is zero, it adds nothing).
        base = rec if self.cell == "lstm" else w.input_bias
        assert base is not None
        attended = None
        if self.precomputed_drives:
            pre = base
            for a, drive in zip(weighted, feeds, strict=True):  # slots, never modules
                if nh == 1:
                    pre = torch.addcmul(pre, a, drive)  # (K, B, 1) * (K, B, G)
                else:
                    pre = pre + torch.matmul(a.unsqueeze(-2), drive).squeeze(-2)  # (K,B,1,h) @ (K,B,h,G)
        else:
            for a, value in zip(weighted, feeds, strict=True):
                # nh == 1: (K, B, 1) * (B, value); else (K, B, heads, 1) * (B, heads, value)
                term = a * value if nh == 1 else a.unsqueeze(-1) * value
                attended = term if attended is None else attended + term
            assert attended is not None
            attended = attended.reshape(K, B, nh * self.input_value_size)
            pre = torch.baddbmm(base, attended, w.input_weight)

        # The cell; every tanh is computed as 2*sigmoid(2x) - 1.
        if self.cell == "lstm":
            sig = torch.sigmoid(pre * self.gate_scale)  # [i, f, o, (g+1)/2]
            i, f, o, sg = sig.chunk(4, dim=-1)
            g = sg.mul(2.0).sub_(1.0)
            c_new = torch.addcmul(f * c, i, g)
            tc = torch.sigmoid(c_new * 2.0).mul(2.0).sub_(1.0)  # tanh(c_new)
            h_cell = o * tc
            gates: tuple[Tensor, ...] = (sig, g, tc)
        else:
            x_rz, x_n = pre.split([2 * H, H], dim=-1)
            h_rz, h_n = rec.split([2 * H, H], dim=-1)
            rz = torch.sigmoid(x_rz + h_rz)
            r, zg = rz.chunk(2, dim=-1)
            sn = torch.sigmoid(torch.addcmul(x_n, r, h_n).mul_(2.0))
            n = sn.mul(2.0).sub_(1.0)  # tanh(x_n + r * h_n)
            h_cell = torch.addcmul(n, zg, h - n)  # (1 - z) * n + z * h
            c_new = None
            gates = (rz, sn, n, h_n)

        # Inactive modules do not run their cell: their state entering communication is h_{t-1}.
        h_tilde = torch.where(keep, h_cell, h)

        # Communication: attention across modules, per (env, head). Scores are kept transposed,
        # (key module, query module): a softmax over a middle dim of size K is several times
        # faster on CPU than over a tiny last dim. The 1/sqrt(key) scale rides on baddbmm's alpha.
        qkv = torch.bmm(h_tilde, w.comm_qkv).view(K, B * nc, 2 * ck + cv).transpose(0, 1)
        cq, ckey, cval = qkv.split([ck, ck, cv], dim=-1)  # (B*heads, K, .)
        scale = 1.0 / math.sqrt(ck)
        scores = torch.baddbmm(qkv.new_zeros(()), ckey, cq.transpose(1, 2), beta=0.0, alpha=scale)
        comm_attn = torch.softmax(scores, dim=1)  # [b, key j, query i]
        comm_mask = None
        comm_weighted = comm_attn
        if self.training and self.comm_attention_dropout > 0.0:
            comm_mask = _dropout_mask(comm_attn, self.comm_attention_dropout)
            comm_weighted = comm_attn * comm_mask
        ctx = torch.bmm(comm_weighted.transpose(1, 2), cval).transpose(0, 1).reshape(K, B, nc * cv)
        # Bounded residual h~ + tanh(ctx @ W_out[k]). A plain tanh here: three ops against the sigmoid
        # form's four, and it is only (K, B, H) wide.
        comm_update = torch.tanh(torch.bmm(ctx, w.comm_out))
        h_comm = h_tilde + comm_update

        # Inactive modules keep h and c bit-for-bit: where, never a blend.
        h_out = torch.where(keep, h_comm, h)
        c_out = torch.where(keep, c_new, c) if c_new is not None else None

        saved = None
        if save:
            saved = StepSaved(
                h, c, query, tuple(keys), tuple(feeds), probs, input_mask, weighted, attended, gates,
                h_tilde, qkv, comm_attn, comm_mask, comm_weighted, ctx, comm_update, active,
            )  # fmt: skip
        return StepOut(h_out, c_out, active, null, probs, saved)

    # ------------------------------------------------------------------ hand-written backward

    def transposed(self, w: LayerWeights) -> LayerWeights:
        """The weights as the backward multiplies by them, made contiguous once per backward
        (not per step): matmuls with transposed operands are markedly slower on CPU."""
        if not self.precomputed_drives:
            input_weight = w.input_weight.transpose(1, 2).contiguous()
        else:  # (B, K*G) @ (K*G, value) runs faster with the long reduction dim contiguous: a view
            input_weight = w.input_weight.t() if w.input_weight.dim() == 2 else w.input_weight.transpose(1, 2)
        return LayerWeights(
            w.recurrent.transpose(1, 2).contiguous(),
            w.recurrent_bias,
            input_weight,
            w.input_bias,
            w.comm_qkv.transpose(1, 2).contiguous(),
            w.comm_out.transpose(1, 2).contiguous(),
            tuple(s.t().contiguous() for s in w.slot_kv),
        )

    def step_backward(
        self, wt: LayerWeights, sv: StepSaved, dh: Tensor, dc: Tensor | None
    ) -> tuple[Tensor, Tensor | None, list[Tensor], list[Tensor], tuple[Tensor, ...]]:
        """Gradients of one :meth:`step` given the gradients of its outputs.

        :param wt: the step's weights, :meth:`transposed`.
        :param sv: the step's saved intermediates.
        :param dh: gradient w.r.t. the step's output ``h`` ``(K, B, H)``.
        :param dc: gradient w.r.t. the output ``c`` (LSTM) or None.
        :return: gradients w.r.t. ``h`` and ``c`` entering the step, w.r.t. each slot's keys and
            feeds, and the per-step pieces of the weight gradients, reduced over T by
            :meth:`weight_grads`: ``(dz, dqkv, d_comm, d_cell_input or None for LSTM)``.
        """
        K, B = dh.shape[:2]
        nh, dk, dv = self.num_input_heads, self.input_key_size, self.input_value_size
        nc, ck, cv = self.num_comm_heads, self.comm_key_size, self.comm_value_size
        keep = sv.active.unsqueeze(-1)
        # Masking gradients by multiplication is cheaper than where, and exact for finite values.
        keepf = keep.to(dh.dtype)

        # Communication (only active rows of h_comm are used): the bounded residual, then attention.
        d_comm = _tanh_backward(dh * keepf, sv.comm_update)  # w.r.t. ctx @ W_out
        d_ctx = torch.bmm(d_comm, wt.comm_out).view(K, B * nc, cv).transpose(0, 1)  # (B*heads, K, cv)
        cq, ckey, cval = sv.comm_qkv.split([ck, ck, cv], dim=-1)
        # Attention is stored transposed: [b, key j, query i].
        d_weighted = torch.bmm(cval, d_ctx.transpose(1, 2))
        d_val = torch.bmm(sv.comm_weighted, d_ctx)
        if sv.comm_mask is not None:
            d_weighted = d_weighted * sv.comm_mask
        d_score = torch._softmax_backward_data(d_weighted, sv.comm_attn, 1, sv.comm_attn.dtype)
        scale, zero = 1.0 / math.sqrt(ck), dh.new_zeros(())
        d_q = torch.baddbmm(zero, d_score.transpose(1, 2), ckey, beta=0.0, alpha=scale)
        d_k = torch.baddbmm(zero, d_score, cq, beta=0.0, alpha=scale)
        dqkv = torch.cat([d_q, d_k, d_val], dim=-1).transpose(0, 1).reshape(K, B, nc * (2 * ck + cv))
        # h_tilde feeds the residual and Q/K/V; h_tilde = h_cell (active) or h_prev (inactive),
        # and inactive rows of dh go straight to h_prev: both collapse into one tensor x.
        x = torch.baddbmm(dh, dqkv, wt.comm_qkv)
        dh_cell = x * keepf
        dh_prev = x - dh_cell  # exactly x where inactive, 0 where active

        # Cell.
        dc_prev = None
        if self.cell == "lstm":
            sig, g, tc = sv.gates
            i, f, o, _ = sig.chunk(4, dim=-1)
            assert dc is not None and sv.c_prev is not None
            dc_cell = torch.addcmul(_tanh_backward(dh_cell * o, tc), dc, keepf)
            dc_prev = torch.where(keep, dc_cell * f, dc)
            # Gradients w.r.t. [i, f, o, (g+1)/2]; g = 2 * sigmoid - 1 gives the factor 2.
            d_sig = torch.cat([dc_cell * g, dc_cell * sv.c_prev, dh_cell * tc, dc_cell * i * 2.0], dim=-1)
            d_inp = _sigmoid_backward(d_sig, sig) * self.gate_scale
            d_rec = d_inp
        else:
            rz, sn, n, h_n = sv.gates
            r, zg = rz.chunk(2, dim=-1)
            dh_prev = torch.addcmul(dh_prev, dh_cell, zg)
            # n = 2*sigmoid(2p) - 1: dn/dp = 4 * sn * (1 - sn)
            d_pre_n = _sigmoid_backward((dh_cell - dh_cell * zg) * 4.0, sn)
            d_rz = _sigmoid_backward(torch.cat([d_pre_n * h_n, dh_cell * (sv.h_prev - n)], dim=-1), rz)
            d_inp = torch.cat([d_rz, d_pre_n], dim=-1)
            d_rec = torch.cat([d_rz, d_pre_n * r], dim=-1)

        # Input attention: gradients w.r.t. each slot's (weighted) attention and its feed.
        d_feeds: list[Tensor] = []
        d_attn: list[Tensor] = []
        if self.precomputed_drives:
            for a, drive in zip(sv.weighted, sv.feeds, strict=True):  # a: (K, B, heads)
                if nh == 1:
                    d_attn.append((d_inp * drive).sum(-1, keepdim=True))
                    d_feeds.append(a * d_inp)
                else:
                    d_attn.append(torch.matmul(drive, d_inp.unsqueeze(-1)).squeeze(-1))
                    d_feeds.append(a.unsqueeze(-1) * d_inp.unsqueeze(-2))
        else:
            d_att = torch.bmm(d_inp, wt.input_weight)  # (K, B, heads*value)
            if nh > 1:
                d_att = d_att.view(K, B, nh, dv)
            for a, value in zip(sv.weighted, sv.feeds, strict=True):
                d_attn.append((d_att * value).sum(-1, keepdim=nh == 1))
                d_feeds.append((a * d_att if nh == 1 else a.unsqueeze(-1) * d_att).sum(0))
        if sv.input_mask is not None:
            d_attn = [d * m for d, m in zip(d_attn, sv.input_mask.unbind(-1), strict=True)]
        if len(sv.keys) == 1:
            d_s = _sigmoid_backward(d_attn[0], sv.probs).unsqueeze(-1)  # (K, B, heads, 1)
            d_query = d_s * sv.keys[0]
            d_keys = [(d_s * sv.query).sum(0)]
        else:
            d_probs = torch.stack([torch.zeros_like(d_attn[0]), *d_attn], dim=-1)  # the null slot feeds nothing
            d_full = torch._softmax_backward_data(d_probs, sv.probs, -1, sv.probs.dtype)
            d_s = d_full[..., 1:].unsqueeze(-1)  # (K, B, heads, slots, 1)
            stacked = torch.stack(list(sv.keys), dim=-2)
            d_query = (d_s * stacked).sum(-2)
            d_keys = list((d_s * sv.query.unsqueeze(-2)).sum(0).unbind(-2))
        dz = torch.cat([d_rec, d_query.reshape(K, B, nh * dk)], dim=-1)
        dh_prev = torch.baddbmm(dh_prev, dz, wt.recurrent)
        # LSTM's cell-input gradient is the first part of dz: not kept twice.
        return dh_prev, dc_prev, d_keys, d_feeds, (dz, dqkv, d_comm, d_inp if self.cell == "gru" else None)

    def slot_backward(self, wt: LayerWeights, slot: int, d_keys: Tensor, d_values: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient w.r.t. a per-step slot input ``(B, width)`` (layers without precomputed drives).

        :param wt: the weights, :meth:`transposed`.
        :param d_keys: ``(B, heads, key)``; ``d_values``: ``(B, [heads,] value)``.
        :return: the input's gradient and ``d_kv`` ``(B, heads*(key+value))`` for :meth:`weight_grads`.
        """
        B = d_keys.shape[0]
        d_kv = torch.cat([d_keys.reshape(B, -1), d_values.reshape(B, -1)], dim=-1)
        return d_kv @ wt.slot_kv[slot], d_kv

    def weight_grads(
        self,
        inputs: list[tuple[Tensor, ...]],
        pieces: list[tuple[Tensor, ...]],
        slot_pieces: dict[int, list[tuple[Tensor, Tensor]]],
    ) -> LayerWeights:
        """Weight gradients over the whole sequence, each one large batched matmul.

        :param inputs: per step ``(h_prev, h_tilde, ctx, attended)`` (the left-hand factors).
        :param pieces: per step the pieces of :meth:`step_backward`.
        :param slot_pieces: per per-step slot, per step ``(input, d_kv)``.
        :return: gradients laid out like :class:`LayerWeights` (None where none flows inside the engine).
        """

        def rows(seq: list[tuple[Tensor, ...]], i: int) -> Tensor:
            return torch.cat([p[i] for p in seq], dim=1)  # (K, T*B, .)

        dz = rows(pieces, 0)
        g_recurrent = torch.bmm(rows(inputs, 0).transpose(1, 2), dz)
        g_recurrent_bias = dz.sum(1, keepdim=True)
        g_comm_qkv = torch.bmm(rows(inputs, 1).transpose(1, 2), rows(pieces, 1))
        g_comm_out = torch.bmm(rows(inputs, 2).transpose(1, 2), rows(pieces, 2))
        d_inp = None
        if self.cell == "gru" or not self.precomputed_drives:
            d_inp = dz[..., : self.gate_size] if self.cell == "lstm" else rows(pieces, 3)
        g_input_bias = d_inp.sum(1, keepdim=True) if self.cell == "gru" and d_inp is not None else None
        g_input_weight = None
        if not self.precomputed_drives:
            g_input_weight = torch.bmm(rows(inputs, 3).transpose(1, 2), d_inp)
        g_slots: list[Tensor | None] = [None] * len(self.slot_sizes)
        for slot, seq in slot_pieces.items():
            u = torch.cat([r[0] for r in seq], dim=0)
            g_slots[slot] = u.t() @ torch.cat([r[1] for r in seq], dim=0)
        return LayerWeights(
            g_recurrent,
            g_recurrent_bias,
            g_input_weight,
            g_input_bias,
            g_comm_qkv,
            g_comm_out,
            tuple(g_slots),  # type: ignore[arg-type]
        )


def _flatten_weights(weights: Sequence[LayerWeights]) -> list[Tensor | None]:
    flat: list[Tensor | None] = []
    for w in weights:
        flat += [w.recurrent, w.recurrent_bias, w.input_weight, w.input_bias, w.comm_qkv, w.comm_out, *w.slot_kv]
    return flat


def _unflatten_weights(flat: Sequence[Any], layers: Sequence[RIMsLayer]) -> list[LayerWeights]:
    out, i = [], 0
    for layer in layers:
        n = len(layer.slot_sizes)
        out.append(LayerWeights(*flat[i : i + 6], tuple(flat[i + 6 : i + 6 + n])))
        i += 6 + n
    return out


class RIMsStackCore(RecurrentCore):
    """A stack of :class:`RIMsLayer` run step by step: the engine shared by RIMs and BRIMs.

    Layer ``l`` reads slots ``[bottom-up, top-down]``: bottom-up is ``x_t`` for layer 0 and
    layer ``l-1``'s new ``h`` at step t otherwise; top-down is layer ``l+1``'s ``h`` from
    step t-1 (none for the top layer). With one layer this is exactly RIMs.

    Subclasses call :meth:`_build` with the layers and which layers' ``h`` make the output
    (concatenated). ``fused_backward=True`` trains through the hand-written backward;
    ``False`` lets autograd differentiate the same forward ops (slower reference).
    ``native=True`` runs the whole time loop, forward and backward, in the C kernel
    (``rims_kernel.c``, see :mod:`policies.native`) where :meth:`kernel_for` says it
    applies; elsewhere the Python engine below runs (the same function; the kernel is tested
    against it). Double backward (gradients of gradients) is supported by neither.
    """

    layers: nn.ModuleList
    output_layers: tuple[int, ...]
    fused_backward: bool
    native: bool

    def _build(
        self, input_size: int, layers: list[RIMsLayer], output_layers: tuple[int, ...], fused: bool, native: bool
    ) -> None:
        self.input_size = input_size
        self.layers = nn.ModuleList(layers)
        self.output_layers = output_layers
        self.fused_backward = fused
        self.native = native
        self.output_size = sum(layers[li].output_size for li in output_layers)
        self.state_size = sum(layer.state_size for layer in layers)
        offsets, o = [], 0
        for layer in layers:
            offsets.append(o)
            o += layer.state_size
        self._state_offsets = offsets

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"modules": cell parameters, "attention": input and communication attention}``, each once."""
        modules: list[nn.Parameter] = []
        attention: list[nn.Parameter] = []
        for layer in self.layers:
            modules += layer.module_parameters()
            attention += layer.attention_parameters()
        return {"modules": modules, "attention": attention}

    def _info_suffix(self, li: int) -> str:
        return f"_{li}"

    # ------------------------------------------------------------------ state layout

    def _split_state(self, state: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
        """Per-layer ``(K, B, H)`` views of ``h`` and ``c`` (None for GRU) of a flat state."""
        B = state.shape[0]
        hs: list[Tensor] = []
        cs: list[Tensor | None] = []
        for layer, off in zip(self.layers, self._state_offsets, strict=True):
            K, H = layer.num_modules, layer.module_size
            part = state[:, off : off + layer.state_size]
            if layer.cell == "lstm":
                h, c = part.reshape(B, 2, K, H).permute(1, 2, 0, 3).unbind(0)
            else:
                h, c = part.reshape(B, K, H).transpose(0, 1), None
            hs.append(h)
            cs.append(c)
        return hs, cs

    def _join_state(self, hs: Sequence[Tensor], cs: Sequence[Tensor | None]) -> Tensor:
        parts = []
        for h, c in zip(hs, cs, strict=True):
            K, B, H = h.shape
            if c is not None:
                parts.append(torch.stack([h, c]).permute(2, 0, 1, 3).reshape(B, 2 * K * H))
            else:
                parts.append(h.transpose(0, 1).reshape(B, K * H))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ C kernel

    def kernel_for(self, x: Tensor, state: Tensor | None = None) -> ctypes.CDLL | None:
        """The C kernel if it applies to this core and input, else None (the Python engine runs).

        It applies with ``native`` and ``fused_backward`` on, one input head in every layer (LSTM
        or GRU cells), the slot wiring of RIMs/BRIMs (every layer reads ``x`` or the layer below,
        and all but the top one the layer above), a non-empty batch of float32 CPU input, state
        and parameters, no CPU autocast (which would hand it bfloat16), and no attention dropout
        while training. A layer's ``precomputed_drives`` does not matter: the kernel applies
        ``W_ih`` to the attended value itself, for the active modules only.

        :param x: the input sequence; :param state: the state entering it (checked too when given).
        """
        layers: list[RIMsLayer] = list(self.layers)  # type: ignore[arg-type]
        applies = (
            self.native
            and self.fused_backward
            and len(layers) <= KERNEL_MAX_LAYERS
            and all(layer.num_input_heads == 1 for layer in layers)
            and _stack_wiring(layers)
            and x.shape[1] > 0
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and (state is None or (state.device.type == "cpu" and state.dtype == torch.float32))
            and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in self.parameters())
            and not torch.is_autocast_enabled("cpu")
            and not (
                self.training
                and any(max(layer.input_attention_dropout, layer.comm_attention_dropout) > 0.0 for layer in layers)
            )
        )
        return native_library() if applies else None

    def _kernel_forward(
        self,
        lib: ctypes.CDLL,
        state: Tensor,
        starts: Tensor,
        weights: list[LayerWeights],
        keys0: Tensor,
        values0: Tensor,
        return_info: bool,
        plan: _InferencePlan | None = None,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]:
        """:meth:`forward` through the C kernel, from weights prepared and x-slot keys and values
        computed without precomputed drives (``starts`` bool ``(T, B)``); with ``plan`` (no autograd,
        ``weights`` are the plan's), through its kept set-up."""
        layers: list[RIMsLayer] = list(self.layers)  # type: ignore[arg-type]
        T, B = starts.shape
        first = layers[0]
        starts = starts.to(torch.uint8).contiguous()
        x_keys = keys0.reshape(T, B, first.input_key_size).contiguous()
        x_values = values0.reshape(T, B, first.input_value_size).contiguous()
        if plan is not None:  # no autograd, parameters frozen: the set-up of earlier calls serves again
            run = _kernel_launch(self, lib, plan.call(self, T, B), starts, state, x_keys, x_values, save=False,
                                 reused=True)
            out, new_state, diagnostics = run.out, run.state, [*run.active, *run.probs]
            return self._with_info(out, new_state, diagnostics, return_info)
        flat = [None if w is None else w.contiguous() for w in _flatten_weights(weights)]
        inputs = (state.contiguous(), x_keys, x_values, *flat)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
            out, new_state, *diagnostics = _KernelStack.apply(self, lib, starts, *inputs)
        else:
            with torch.no_grad():
                run = _kernel_run(self, lib, starts, *inputs, save=False)
            out, new_state, diagnostics = run.out, run.state, [*run.active, *run.probs]
        return self._with_info(out, new_state, diagnostics, return_info)

    def _with_info(
        self, out: Tensor, new_state: Tensor, diagnostics: Sequence[Tensor], return_info: bool
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The kernel's results as :meth:`forward` returns them; ``diagnostics``: per layer ``active``
        ``(T, K, B)``, then per layer ``probs`` ``(T, K, B, 1 + slots)``, copied into ``info``."""
        if not return_info:
            return out, new_state
        L = len(self.layers)
        info: dict[str, Tensor] = {}
        for li in range(L):
            suffix = self._info_suffix(li)
            info[f"active{suffix}"] = diagnostics[li].transpose(1, 2).bool()  # (T, B, K)
            # A copy: the backward reads these probabilities, and info is the caller's to modify.
            info[f"input_attention{suffix}"] = diagnostics[L + li].transpose(1, 2).clone()  # (T, B, K, 1 + slots)
        return out, new_state, info

    # ------------------------------------------------------------------ Python engine

    def _run(
        self,
        weights: Sequence[LayerWeights],
        state: Tensor,
        keys0: Tensor,
        feeds0: Tensor,
        starts: Tensor,
        any_start: list[bool],
        save: bool,
        info: dict[str, Tensor] | None,
    ) -> tuple[Tensor, Tensor, list[list[Any]] | None]:
        """The time loop (plain torch ops: differentiable when run under autograd).

        :param keys0: ``(T, ...)`` keys of the bottom layer's ``x`` slot, for all steps.
        :param feeds0: ``(T, ...)`` its feeds (see :meth:`RIMsLayer.slot_forward`).
        :param save: keep what :meth:`_backward` needs (fused training).
        :param info: filled with the protocol's diagnostics when not None.
        :return: output ``(T, B, output_size)``, final state, saved records or None.
        """
        layers: list[RIMsLayer] = list(self.layers)  # type: ignore[arg-type]
        L, T = len(layers), keys0.shape[0]
        B = state.shape[0]
        hs, cs = self._split_state(state)
        keep = (~starts).view(T, 1, B, 1)
        # unbind: indexing a tensor that needs grad would cost a full-size zero gradient per step.
        keys0_t, feeds0_t = keys0.unbind(0), feeds0.unbind(0)
        outs: dict[int, list[Tensor]] = {li: [] for li in self.output_layers}
        records: list[list[Any]] | None = [] if save else None
        raw: list[list[StepOut]] = []
        for t in range(T):
            if any_start[t]:
                hs = [torch.where(keep[t], h, 0.0) for h in hs]
                cs = [None if c is None else torch.where(keep[t], c, 0.0) for c in cs]
            step_records: list[Any] = []
            step_raw: list[StepOut] = []
            for li, layer in enumerate(layers):
                w = weights[li]
                slot_inputs: dict[int, Tensor] = {}
                if li > 0:  # bottom-up: the layer below, this step
                    slot_inputs[0] = _flat(hs[li - 1])
                if li < L - 1:  # top-down: the layer above, previous step
                    slot_inputs[1] = _flat(hs[li + 1])
                keys, feeds = [keys0_t[t]], [feeds0_t[t]]
                for s, u in slot_inputs.items():
                    k, f = layer.slot_forward(w, s, u)
                    if s == 0:
                        keys[0], feeds[0] = k, f
                    else:
                        keys.append(k)
                        feeds.append(f)
                res = layer.step(w, hs[li], cs[li], keys, feeds, save)
                hs[li], cs[li] = res.h, res.c
                if info is not None:
                    step_raw.append(res._replace(saved=None))
                if save:
                    step_records.append((res.saved, slot_inputs))
            for li in self.output_layers:
                outs[li].append(hs[li])
            if info is not None:
                raw.append(step_raw)
            if records is not None:
                records.append(step_records)
        out_parts = [torch.stack(outs[li]).permute(0, 2, 1, 3).flatten(2) for li in self.output_layers]
        out = out_parts[0] if len(out_parts) == 1 else torch.cat(out_parts, dim=-1)
        if info is not None:
            for li in range(L):
                info.update(_layer_info([r[li] for r in raw], self._info_suffix(li)))
        return out, self._join_state(hs, cs), records

    def _backward(
        self,
        weights: Sequence[LayerWeights],
        records: list[list[Any]],
        d_out: Tensor,
        d_state: Tensor,
        starts: Tensor,
        any_start: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor, list[LayerWeights]]:
        """Backward through time of :meth:`_run` (hand-written; see :class:`_FusedRIMsStack`)."""
        layers: list[RIMsLayer] = list(self.layers)  # type: ignore[arg-type]
        L, T = len(layers), len(records)
        B = d_state.shape[0]
        keep = (~starts).view(T, 1, B, 1)
        transposed = [layer.transposed(w) for layer, w in zip(layers, weights, strict=True)]
        gh, gc = self._split_state(d_state)
        d_out_layers: dict[int, Tensor] = {}
        col = 0
        for li in self.output_layers:
            K, H = layers[li].num_modules, layers[li].module_size
            d_out_layers[li] = d_out[..., col : col + K * H].unflatten(-1, (K, H)).permute(0, 2, 1, 3)
            col += K * H
        d_keys0: list[Tensor] = []
        d_feeds0: list[Tensor] = []
        inputs: list[list[tuple[Tensor, ...]]] = [[] for _ in layers]
        pieces: list[list[tuple[Tensor, ...]]] = [[] for _ in layers]
        slot_pieces: list[dict[int, list[tuple[Tensor, Tensor]]]] = [{} for _ in layers]
        for t in reversed(range(T)):
            for li, d in d_out_layers.items():
                gh[li] = gh[li] + d[t]
            new_gh: list[Tensor | None] = [None] * L
            new_gc: list[Tensor | None] = [None] * L
            for li in reversed(range(L)):  # the top layer used the lower ones' results of this step
                layer, wt = layers[li], transposed[li]
                sv, slot_inputs = records[t][li]
                dh_prev, dc_prev, d_keys, d_feeds, pc = layer.step_backward(wt, sv, gh[li], gc[li])
                inputs[li].append((sv.h_prev, sv.h_tilde, sv.ctx, sv.attended))
                pieces[li].append(pc)
                new_gh[li], new_gc[li] = dh_prev, dc_prev
                for s, u in slot_inputs.items():
                    d_u, d_kv = layer.slot_backward(wt, s, d_keys[s], d_feeds[s])
                    slot_pieces[li].setdefault(s, []).append((u, d_kv))
                    if s == 0:  # bottom-up read layer li-1's h at this step
                        gh[li - 1] = gh[li - 1] + _unflat(d_u, layers[li - 1])
                    else:  # top-down read layer li+1's h from step t-1
                        new_gh[li + 1] = new_gh[li + 1] + _unflat(d_u, layers[li + 1])  # type: ignore[operator]
                if li == 0:
                    d_keys0.append(d_keys[0])
                    d_feeds0.append(d_feeds[0])
            if any_start[t]:  # the state entering step t was reset: no gradient to before it
                new_gh = [torch.where(keep[t], g, 0.0) for g in new_gh]  # type: ignore[arg-type]
                new_gc = [None if g is None else torch.where(keep[t], g, 0.0) for g in new_gc]
            gh, gc = new_gh, new_gc  # type: ignore[assignment]
        d_state0 = self._join_state(gh, gc)
        d_weights = [layer.weight_grads(inputs[li], pieces[li], slot_pieces[li]) for li, layer in enumerate(layers)]
        return d_state0, torch.stack(d_keys0[::-1]), torch.stack(d_feeds0[::-1]), d_weights

    def forward(
        self,
        x: Tensor,
        state: Tensor,
        episode_starts: Tensor,
        return_info: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Run the core over a sequence (protocol of :class:`RecurrentCore`).

        :param x: ``(T, B, input_size)``.
        :param state: ``(B, state_size)`` entering step 0.
        :param episode_starts: ``(T, B)`` bool; true resets that env's state to zeros before step t.
        :param return_info: also return diagnostics, time first: ``active`` ``(T, B, K)`` bool and
            ``input_attention`` ``(T, B, K, slots)`` (head-averaged, slot 0 = null); BRIMs
            suffixes both with ``_{layer}``.
        """
        self.check_inputs(x, state, episode_starts)
        starts = episode_starts.to(device=x.device, dtype=torch.bool)
        layers: list[RIMsLayer] = list(self.layers)  # type: ignore[arg-type]
        lib = self.kernel_for(x, state)
        # The kernel applies W_ih to the attended value itself (for the active modules only), so it
        # takes the x slot's values, never precomputed drives.
        drives = False if lib is not None else None
        # A rollout's or evaluation's step (no autograd, parameters frozen) reuses the weights prepared
        # and the kernel set up by the calls before it, as long as no parameter changed.
        plan = _inference_plan(self) if lib is not None and not torch.is_grad_enabled() and parameters_frozen() else None
        weights = plan.weights if plan is not None else [layer.prepare(drives) for layer in layers]
        keys0, feeds0 = layers[0].slot_forward(weights[0], 0, x, drives)  # x's slot: all T steps at once
        if lib is not None:
            return self._kernel_forward(lib, state, starts, weights, keys0, feeds0, return_info, plan)
        any_start = starts.any(dim=1).tolist()
        info: dict[str, Tensor] | None = {} if return_info else None
        needs_grad = torch.is_grad_enabled() and (state.requires_grad or keys0.requires_grad or feeds0.requires_grad)
        if needs_grad and self.fused_backward:
            out, new_state = _FusedRIMsStack.apply(
                self, starts, any_start, info, state, keys0, feeds0, *_flatten_weights(weights)
            )
        else:
            out, new_state, _ = self._run(weights, state, keys0, feeds0, starts, any_start, False, info)
        if info is None:
            return out, new_state
        return out, new_state, info


def _stack_wiring(layers: Sequence[RIMsLayer]) -> bool:
    """Whether every layer reads the slots RIMs/BRIMs wire (the C kernel's): ``x`` (layer 0) or the
    layer below's ``h``, then the layer above's ``h`` for all but the top layer."""
    for li, layer in enumerate(layers):
        expected = [layer.slot_sizes[0] if li == 0 else layers[li - 1].output_size]
        if li < len(layers) - 1:
            expected.append(layers[li + 1].output_size)
        if list(layer.slot_sizes) != expected:
            return False
    return True


def _flat(h: Tensor) -> Tensor:
    """``(K, B, H)`` -> ``(B, K*H)``, the layer's output layout."""
    return h.transpose(0, 1).flatten(1)


def _unflat(d: Tensor, layer: RIMsLayer) -> Tensor:
    """``(B, K*H)`` -> ``(K, B, H)`` (inverse of :func:`_flat`, for gradients)."""
    return d.unflatten(1, (layer.num_modules, layer.module_size)).transpose(0, 1)


def _layer_info(steps: Sequence[StepOut], suffix: str) -> dict[str, Tensor]:
    """Stack one layer's per-step results into the protocol's info entries (time first)."""
    active = torch.stack([s.active for s in steps]).transpose(1, 2)  # (T, B, K)
    probs = torch.stack([s.probs for s in steps]).detach()
    if probs.dim() == 4:  # one non-null slot: (T, K, B, heads) -> [null, slot]
        probs = torch.stack([torch.stack([s.null for s in steps]), probs], dim=-1)
    attention = probs.mean(dim=-2).transpose(1, 2)  # head-averaged, (T, B, K, 1 + slots)
    return {f"active{suffix}": active, f"input_attention{suffix}": attention}


class _FusedRIMsStack(torch.autograd.Function):
    """Forward of :meth:`RIMsStackCore._run` without autograd bookkeeping, with a hand-written BPTT."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        core: RIMsStackCore,
        starts: Tensor,
        any_start: list[bool],
        info: dict[str, Tensor] | None,
        state: Tensor,
        keys0: Tensor,
        feeds0: Tensor,
        *flat_weights: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        weights = _unflatten_weights(flat_weights, list(core.layers))  # type: ignore[arg-type]
        out, new_state, records = core._run(weights, state, keys0, feeds0, starts, any_start, True, info)
        # Intermediates live on ctx (not save_for_backward): there are many, all created here. The
        # weights are saved, so that autograd refuses a backward after they were changed in place.
        ctx.save_for_backward(*flat_weights)
        ctx.core, ctx.records = core, records
        ctx.starts, ctx.any_start = starts, any_start
        ctx.n_weights = len(flat_weights)
        return out, new_state

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out: Tensor, d_state: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        core: RIMsStackCore = ctx.core
        weights = _unflatten_weights(ctx.saved_tensors, list(core.layers))  # type: ignore[arg-type]
        d_state0, d_keys0, d_feeds0, d_weights = core._backward(
            weights, ctx.records, d_out, d_state, ctx.starts, ctx.any_start
        )
        # ctx.records stays: backward may run again with retain_graph=True; autograd frees ctx with the graph.
        flat = _flatten_weights(d_weights)
        assert len(flat) == ctx.n_weights
        return (None, None, None, None, d_state0, d_keys0, d_feeds0, *flat)


class RIMs(RIMsStackCore):
    """Recurrent Independent Mechanisms core (Goyal et al., 2019), following shared/DESIGN.md.

    :param input_size: width of ``x_t``.
    :param num_modules: K, number of modules.
    :param module_size: H, hidden size of each module; the output is ``K*H`` wide.
    :param k_active: modules active per step, ``1 <= k_active <= num_modules``.
    :param cell: ``"lstm"`` (state ``(B, 2*K*H)``: all h then all c) or ``"gru"`` (state ``(B, K*H)``).
    :param num_input_heads: input-attention heads (averaged for selection, concatenated as cell input).
    :param input_key_size: key/query width per input-attention head.
    :param input_value_size: value width per input-attention head; ``None`` means ``module_size``.
    :param num_comm_heads: communication-attention heads.
    :param comm_key_size: key/query width per communication head.
    :param comm_value_size: value width per communication head.
    :param dropout: dropout on the input-attention and on the communication-attention
        probabilities, in training mode only (``0`` disables it).
    :param fused_backward: train through the hand-written backward (fast, default); ``False``
        lets autograd differentiate the same forward (reference, slower).
    :param native: run the time loop in the C kernel (``rims_kernel.c``, see
        :mod:`policies.native`) where it applies: one input head (LSTM or GRU cells), float32 on
        the CPU, ``fused_backward`` on, and no attention dropout while training. Elsewhere, or
        with ``False``, the Python engine runs (the same function; the kernel is tested against it).
    :raises ValueError: naming the argument, for a size < 1, ``k_active > num_modules``,
        an unknown cell, or a dropout outside ``[0, 1)``.
    """

    def __init__(
        self,
        input_size: int,
        num_modules: int = 6,
        module_size: int = 64,
        k_active: int = 4,
        cell: str = "lstm",
        num_input_heads: int = 1,
        input_key_size: int = 64,
        input_value_size: int | None = None,
        num_comm_heads: int = 4,
        comm_key_size: int = 32,
        comm_value_size: int = 32,
        dropout: float = 0.0,
        fused_backward: bool = True,
        native: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("input_size", input_size)
        check_positive_int("module_size", module_size)
        layer = RIMsLayer(
            slot_sizes=[input_size],
            num_modules=num_modules,
            module_size=module_size,
            k_active=k_active,
            cell=cell,
            num_input_heads=num_input_heads,
            input_key_size=input_key_size,
            input_value_size=module_size if input_value_size is None else input_value_size,
            num_comm_heads=num_comm_heads,
            comm_key_size=comm_key_size,
            comm_value_size=comm_value_size,
            dropout=dropout,
            precomputed_drives=True,
        )
        self._build(input_size, [layer], (0,), bool(fused_backward), bool(native))
        self.num_modules, self.module_size, self.k_active, self.cell = num_modules, module_size, k_active, cell

    def _info_suffix(self, li: int) -> str:
        return ""


# ---------------------------------------------------------------------- the C kernel's plumbing

KERNEL_MAX_LAYERS = 8  # the kernel's fixed per-layer scratch table
_MAX_SLOTS = 2
_INT_FIELDS = ("K", "H", "Q", "V", "k_active", "NC", "CK", "CV", "S", "gru")
_POINTER_FIELDS = (
    "Wr", "br", "Wih", "Wc", "Wo", "slot_kv", "WrT", "WihT", "WcT", "WoT", "slot_kvT", "h", "c", "out", "d_out",
    "active", "probs", "hprev", "htil", "ctx", "att", "cprev", "gates", "tc", "upd", "qkv", "query", "attn", "kv", "u",
    "dz", "dqkv", "dcomm", "d_kv", "gh", "gc", "bih", "dinp",
)  # fmt: skip
_PER_SLOT = ("slot_kv", "slot_kvT", "u")
_SLOT_INPUTS = tuple(f"u{s}" for s in range(_MAX_SLOTS))  # saved per-step slot inputs: the ``u`` array field


class KernelLayer(ctypes.Structure):
    """One layer as the kernel sees it: ``Layer`` in ``rims_kernel.c``, field for field (layouts there)."""

    _fields_ = [
        *[(name, ctypes.c_int) for name in _INT_FIELDS],
        ("width", ctypes.c_int * _MAX_SLOTS),
        *[(name, ctypes.c_void_p * _MAX_SLOTS if name in _PER_SLOT else ctypes.c_void_p) for name in _POINTER_FIELDS],
    ]


class _BufferPool:
    """Float32 buffers handed back for reuse, by size.

    The kernel's intermediates are megabytes per training minibatch. Freshly allocated each time,
    their pages are returned to the OS on free and faulted in again on first touch, which costs
    more than the kernel's arithmetic (measured: 2.6 ms of page faults against a 1.7 ms forward).
    """

    def __init__(self, keep_per_size: int = 2, keep_sizes: int = 4) -> None:
        self.keep_per_size, self.keep_sizes = keep_per_size, keep_sizes
        self.free: dict[int, list[Tensor]] = {}  # by size, least recently given first

    def take(self, numel: int) -> Tensor:
        """A flat CPU float32 buffer of ``numel`` floats with undefined contents."""
        try:
            return self.free[numel].pop()
        except (KeyError, IndexError):  # none kept (or another thread took the last one)
            return torch.empty(numel, dtype=torch.float32, device="cpu")

    def give(self, buffer: Tensor) -> None:
        """Return a buffer nobody uses any more. Only the most recently used sizes are kept (a few
        minibatch shapes in training), so a caller varying T or B does not pile up memory."""
        numel = buffer.numel()
        buffers = self.free.pop(numel, [])
        self.free[numel] = buffers  # now the most recent size
        if len(buffers) < self.keep_per_size:
            buffers.append(buffer)
        while len(self.free) > self.keep_sizes:
            self.free.pop(next(iter(self.free)), None)

    def clear(self) -> None:
        """Drop every kept buffer."""
        self.free.clear()

    def carve(self, *shapes: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
        """One pooled buffer cut into views of the given shapes: ``(buffer, views)``."""
        sizes = [math.prod(shape) for shape in shapes]
        buffer = self.take(sum(sizes))
        return buffer, [part.view(shape) for part, shape in zip(buffer.split(sizes), shapes, strict=True)]


_POOL = _BufferPool()


class _Lease:
    """Lives as long as the views of a pooled buffer are in use; its death gives the buffer back."""

    __slots__ = ("__weakref__",)


class KernelRun(NamedTuple):
    """What one kernel forward gives: outputs, per-layer diagnostics, and what its backward needs."""

    out: Tensor  # (T, B, output_size)
    state: Tensor  # (B, state_size), the final state
    active: list[Tensor]  # per layer (T, K, B) uint8
    probs: list[Tensor]  # per layer (T, K, B, 1 + slots): [null, slots]
    saved: list[dict[str, Tensor]]  # per layer, the kernel's saved intermediates (layouts in rims_kernel.c)
    lease: _Lease | None  # keeps the pooled buffer of ``saved`` from reuse while alive


def _state_parts(state: Tensor, layers: Sequence[RIMsLayer], into: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Per-layer copies ``(parts, K, B, H)`` of a flat ``(B, state_size)`` state (or its gradient):
    parts ``[h, c]`` for LSTM, ``[h]`` for GRU; copies, so the kernel never writes the caller's memory.
    ``into``: contiguous tensors of those shapes to copy into (returned), instead of new ones."""
    B, parts, offset = state.shape[0], [], 0
    for li, layer in enumerate(layers):
        K, H, n = layer.num_modules, layer.module_size, 2 if layer.cell == "lstm" else 1
        part = state[:, offset : offset + layer.state_size].reshape(B, n, K, H).permute(1, 2, 0, 3)
        parts.append(part.clone(memory_format=torch.contiguous_format) if into is None else into[li].copy_(part))
        offset += layer.state_size
    return parts


def _check_status(status: int) -> None:
    if status == 1:
        raise MemoryError("the RIMs kernel could not allocate its step buffers")
    if status != 0:
        raise ValueError("the RIMs kernel does not support this layer wiring (kernel_for should have said so)")


def _kernel_threads(T: int, B: int) -> int:
    """Threads the kernel splits the envs among: torch's CPU thread count, once a call has enough work
    (starting a thread costs about as much as a few env steps, so a rollout's one-step calls stay on one)."""
    return max(1, min(torch.get_num_threads(), B)) if T * B >= 64 else 1


def _empty(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A CPU tensor for the kernel: explicit dtype and device, whatever torch's defaults are."""
    return torch.empty(shape, dtype=dtype, device="cpu")


def _set(struct: KernelLayer, name: str, t: Tensor | None, dtype: torch.dtype = torch.float32) -> None:
    setattr(struct, name, None if t is None else pointer(t, dtype))


def _point_at_saved(struct: KernelLayer, saved: dict[str, Tensor]) -> None:
    """Point a layer's intermediate fields at a run's saved buffers (``u{s}``: the per-slot ``u`` array)."""
    for name, t in saved.items():
        if name in _SLOT_INPUTS:
            struct.u[_SLOT_INPUTS.index(name)] = pointer(t)
        else:
            _set(struct, name, t)


def _layer_struct(layer: RIMsLayer) -> KernelLayer:
    """A :class:`KernelLayer` with the layer's sizes filled in (pointers to be set)."""
    struct = KernelLayer()
    sizes = (
        layer.num_modules, layer.module_size, layer.input_key_size, layer.input_value_size, layer.k_active,
        layer.num_comm_heads, layer.comm_key_size, layer.comm_value_size, len(layer.slot_sizes),
        int(layer.cell == "gru"),
    )  # fmt: skip
    for name, value in zip(_INT_FIELDS, sizes, strict=True):
        setattr(struct, name, value)
    for s, width in enumerate(layer.slot_sizes):
        struct.width[s] = width
    return struct


class _KernelCall(NamedTuple):
    """One kernel forward set up: the layer structs, pointing at the weights and at these buffers."""

    structs: ctypes.Array  # KernelLayer per layer
    states: list[Tensor]  # per layer (parts, K, B, H): the state entering, the final state after the call
    outs: dict[int, Tensor]  # per output layer (T, B, output_size)
    active: list[Tensor]  # per layer (T, K, B) uint8
    probs: list[Tensor]  # per layer (T, K, B, 1 + slots)
    saved: list[dict[str, Tensor]]  # per layer, the intermediates (every step's with save, else one step's)
    lease: _Lease | None  # keeps the pooled buffer of ``saved`` from reuse while alive (save only)
    weights: tuple[Tensor | None, ...]  # the detached weights the structs point at, kept alive with them


def _kernel_setup(
    core: RIMsStackCore, T: int, B: int, flat_weights: Sequence[Tensor | None], save: bool
) -> _KernelCall:
    """Allocate a forward's buffers and fill in the layer structs (all but the entering state's values).

    :param flat_weights: :func:`_flatten_weights` of every layer's :meth:`RIMsLayer.prepare`, without
        precomputed drives (``input_weight`` is ``W_ih`` ``(K, value, gates)``), contiguous.
    :param save: keep every step's intermediates for the backward (in a pooled buffer), else one
        step's scratch.
    """
    layers: list[RIMsLayer] = list(core.layers)  # type: ignore[arg-type]
    detached = tuple(None if w is None else w.detach() for w in flat_weights)
    weights = _unflatten_weights(detached, layers)
    Ts = T if save else 1

    shapes: list[dict[str, tuple[int, ...]]] = []
    for li, layer in enumerate(layers):
        K, H, G, Q, V = (layer.num_modules, layer.module_size, layer.gate_size, layer.input_key_size,
                         layer.input_value_size)  # fmt: skip
        nc, S = layer.num_comm_heads, len(layer.slot_sizes)
        C3, CX = nc * (2 * layer.comm_key_size + layer.comm_value_size), nc * layer.comm_value_size
        shape = {
            "hprev": (K, Ts, B, H), "htil": (K, Ts, B, H), "ctx": (K, Ts, B, CX),
            "att": (K, Ts, B, V),
            "cprev": (Ts, K, B, H) if layer.cell == "lstm" else (0,), "gates": (Ts, K, B, G),
            "tc": (Ts, K, B, H), "upd": (Ts, K, B, H),
            "qkv": (Ts, K, B, C3), "query": (Ts, K, B, Q), "attn": (Ts, B, layer.num_comm_heads, K, K),
            "kv": (Ts, S, B, Q + V),
        }  # fmt: skip
        for s in range(S):
            if li > 0 or s > 0:  # per-step slots keep their inputs for the weight gradient
                shape[f"u{s}"] = (Ts, B, layer.slot_sizes[s])
        shapes.append(shape)
    lease = None
    if save:
        buffer, views = _POOL.carve(*[shape for per_layer in shapes for shape in per_layer.values()])
        lease = _Lease()
        weakref.finalize(lease, _POOL.give, buffer)
        it = iter(views)
        saved = [{name: next(it) for name in per_layer} for per_layer in shapes]
    else:
        saved = [{name: _empty(*shape) for name, shape in per_layer.items()} for per_layer in shapes]

    states = [_empty(2 if layer.cell == "lstm" else 1, layer.num_modules, B, layer.module_size) for layer in layers]
    outs = {li: _empty(T, B, layers[li].output_size) for li in core.output_layers}
    active = [_empty(T, layer.num_modules, B, dtype=torch.uint8) for layer in layers]
    probs = [_empty(T, layer.num_modules, B, 1 + len(layer.slot_sizes)) for layer in layers]
    structs = (KernelLayer * len(layers))()
    for li, (layer, w) in enumerate(zip(layers, weights, strict=True)):
        struct = _layer_struct(layer)
        _set(struct, "Wr", w.recurrent)
        _set(struct, "br", w.recurrent_bias)
        _set(struct, "Wih", w.input_weight)
        _set(struct, "Wc", w.comm_qkv)
        _set(struct, "Wo", w.comm_out)
        for s, kv in enumerate(w.slot_kv):
            struct.slot_kv[s] = None if (li == 0 and s == 0) else pointer(kv)
        _set(struct, "bih", w.input_bias)
        _set(struct, "h", states[li][0])
        _set(struct, "c", states[li][1] if layer.cell == "lstm" else None)
        _set(struct, "out", outs.get(li))
        _set(struct, "active", active[li], torch.uint8)
        _set(struct, "probs", probs[li])
        _point_at_saved(struct, saved[li])
        structs[li] = struct
    return _KernelCall(structs, states, outs, active, probs, saved, lease, detached)


def _kernel_launch(
    core: RIMsStackCore,
    lib: ctypes.CDLL,
    call: _KernelCall,
    starts: Tensor,
    state: Tensor,
    x_keys: Tensor,
    x_values: Tensor,
    save: bool,
    reused: bool = False,
) -> KernelRun:
    """Run the kernel's forward over the whole sequence with a set-up call (no autograd).

    :param starts: ``(T, B)`` uint8; ``state`` ``(B, state_size)``; ``x_keys`` ``(T, B, key)`` and
        ``x_values`` ``(T, B, value)``: the bottom layer's x slot, contiguous.
    :param reused: the call's buffers serve later calls too, so the output is copied out of them
        (``active`` and ``probs`` are always the call's own buffers).
    """
    layers: list[RIMsLayer] = list(core.layers)  # type: ignore[arg-type]
    T, B = x_keys.shape[:2]
    _state_parts(state.detach(), layers, into=call.states)
    status = lib.rims_stack_forward(
        T, B, len(layers), int(save), pointer(starts, torch.uint8), pointer(x_keys.detach()),
        pointer(x_values.detach()), ctypes.addressof(call.structs), _kernel_threads(T, B),
    )  # fmt: skip
    _check_status(status)
    outs = [call.outs[li] for li in core.output_layers]
    out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0].clone() if reused else outs[0]
    new_state = torch.cat([hc.permute(2, 0, 1, 3).reshape(B, -1) for hc in call.states], dim=1)
    return KernelRun(out, new_state, call.active, call.probs, call.saved, call.lease)


def _kernel_run(
    core: RIMsStackCore,
    lib: ctypes.CDLL,
    starts: Tensor,
    state: Tensor,
    x_keys: Tensor,
    x_values: Tensor,
    *flat_weights: Tensor | None,
    save: bool,
) -> KernelRun:
    """One call of the kernel's forward over the whole sequence (no autograd), set up afresh.

    Arguments as :func:`_kernel_setup` and :func:`_kernel_launch` take them.
    """
    call = _kernel_setup(core, x_keys.shape[0], x_keys.shape[1], flat_weights, save)
    return _kernel_launch(core, lib, call, starts, state, x_keys, x_values, save)


# ------------------------------------------------------------------ set-up kept between rollout steps


def _parameter_key(core: nn.Module) -> tuple[tuple[int, int], ...] | None:
    """Each parameter's storage address and version counter (an in-place change bumps it), or None if a
    parameter was made under ``torch.inference_mode`` and has no version counter to watch."""
    key = []
    for p in core.parameters():
        if p.is_inference():
            return None
        key.append((p.data_ptr(), p._version))
    return tuple(key)


class _InferencePlan:
    """What a core's no-grad kernel calls inside :func:`frozen_parameters` reuse while its parameters stay
    the same: the prepared weights and, for the most recent few (T, B) shapes, a set-up kernel call.

    Its tensors are ordinary ones even when made under ``torch.inference_mode`` (a rollout's), so a later
    call under plain ``no_grad`` can still write its buffers.
    """

    keep_shapes = 3  # a rollout's step, a time-limit bootstrap's few envs, evaluation's shrinking batch
    keep_max_rows = 4096  # a longer call (T * B rows) is set up afresh: its buffers are not worth holding

    def __init__(self, core: RIMsStackCore, key: tuple[tuple[int, int], ...]) -> None:
        self.key = key
        # The parameters' storages, held so that no other tensor can take their addresses while the key
        # names them (an address reused with an equal version counter would pass for the same parameter).
        self.pinned = tuple(p.detach() for p in core.parameters())
        with torch.inference_mode(False), torch.no_grad():
            self.weights = [layer.prepare(False) for layer in core.layers]  # type: ignore[union-attr]
            self.flat = [None if w is None else w.contiguous() for w in _flatten_weights(self.weights)]
        self.calls: dict[tuple[int, int], _KernelCall] = {}  # least recently used first

    def call(self, core: RIMsStackCore, T: int, B: int) -> _KernelCall:
        """The set-up kernel call for this shape, made on first use."""
        call = self.calls.pop((T, B), None)
        if call is None:
            with torch.inference_mode(False):
                call = _kernel_setup(core, T, B, self.flat, save=False)
        if T * B <= self.keep_max_rows:
            self.calls[(T, B)] = call
        while len(self.calls) > self.keep_shapes:
            self.calls.pop(next(iter(self.calls)))
        return call


# Per core and per thread (the kernel releases the GIL, so two threads must never share buffers; a
# thread's plans go with it). Weak keys: a core's plans go with the core, and none is pickled or copied with it.
_PLANS: weakref.WeakKeyDictionary[nn.Module, threading.local] = weakref.WeakKeyDictionary()


def _inference_plan(core: RIMsStackCore) -> _InferencePlan | None:
    """This thread's plan for ``core``, rebuilt if a parameter changed since; None if it cannot be kept."""
    key = _parameter_key(core)
    if key is None:
        return None
    per_thread = _PLANS.get(core)
    if per_thread is None:  # setdefault: one per core, even if two threads race here
        per_thread = _PLANS.setdefault(core, threading.local())
    plan: _InferencePlan | None = getattr(per_thread, "plan", None)
    if plan is None or plan.key != key:
        plan = per_thread.plan = _InferencePlan(core, key)
    return plan


class _KernelStack(torch.autograd.Function):
    """The C kernel's forward and hand-written backward through time, for RIMs and BRIMs."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        core: RIMsStackCore,
        lib: ctypes.CDLL,
        starts: Tensor,
        state: Tensor,
        x_keys: Tensor,
        x_values: Tensor,
        *flat_weights: Tensor | None,
    ) -> tuple[Tensor, ...]:
        run = _kernel_run(core, lib, starts, state, x_keys, x_values, *flat_weights, save=True)
        # Saved intermediates and their lease live on ctx, freed with the graph (a retained graph keeps them).
        # Never the outputs themselves: out -> grad_fn -> ctx -> out would be a cycle that only the garbage
        # collector breaks, holding the pooled buffer (tens of MB) until it runs.
        ctx.core, ctx.lib = core, lib
        ctx.run = run._replace(out=None, state=None)
        ctx.starts = starts
        ctx.save_for_backward(*flat_weights)  # autograd refuses a backward after they changed in place
        ctx.mark_non_differentiable(*run.active, *run.probs)
        return (run.out, run.state, *run.active, *run.probs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out: Tensor, d_state: Tensor, *_: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        core: RIMsStackCore = ctx.core
        run: KernelRun = ctx.run
        starts = ctx.starts
        layers: list[RIMsLayer] = list(core.layers)  # type: ignore[arg-type]
        weights = _unflatten_weights(ctx.saved_tensors, layers)
        T, B = starts.shape

        grads = _state_parts(d_state, layers)  # in: the final state's gradient; out: the initial state's
        d_outs, col = {}, 0
        for li in core.output_layers:
            d_outs[li] = d_out[..., col : col + layers[li].output_size].contiguous()
            col += layers[li].output_size
        shapes = []
        for layer in layers:
            K, H, R = layer.num_modules, layer.module_size, layer.gate_size + layer.input_key_size
            C3 = layer.num_comm_heads * (2 * layer.comm_key_size + layer.comm_value_size)
            d_inp = (K, T, B, layer.gate_size) if layer.cell == "gru" else (0,)  # GRU's cell-input gradient
            shapes += [(K, T, B, R), (K, T, B, C3), (K, T, B, H), d_inp]
        buffer, views = _POOL.carve(*shapes)  # given back below
        structs = (KernelLayer * len(layers))()
        keep: list[Tensor] = []  # every tensor whose address the kernel gets, alive until it returns
        d_kvs = []
        for li, (layer, w) in enumerate(zip(layers, weights, strict=True)):
            S, KV = len(layer.slot_sizes), layer.input_key_size + layer.input_value_size
            struct = _layer_struct(layer)
            # Contiguous transposes once per backward, so the kernel's products run along rows.
            transposed = {
                "WrT": w.recurrent.transpose(1, 2).contiguous(),
                "WihT": w.input_weight.transpose(1, 2).contiguous(),
                "WcT": w.comm_qkv.transpose(1, 2).contiguous(),
                "WoT": w.comm_out.transpose(1, 2).contiguous(),
            }
            for name, t in transposed.items():
                _set(struct, name, t)
                keep.append(t)
            for s, kv in enumerate(w.slot_kv):
                if li > 0 or s > 0:
                    kv_t = kv.t().contiguous()
                    keep.append(kv_t)
                    struct.slot_kvT[s] = pointer(kv_t)
            _point_at_saved(struct, run.saved[li])
            _set(struct, "active", run.active[li], torch.uint8)
            _set(struct, "probs", run.probs[li])
            _set(struct, "d_out", d_outs.get(li))
            dz, dqkv, dcomm, dinp = views[4 * li : 4 * li + 4]
            d_kv = torch.zeros(T, S, B, KV, dtype=torch.float32, device="cpu")
            d_kvs.append(d_kv)
            for name, t in (("dz", dz), ("dqkv", dqkv), ("dcomm", dcomm), ("d_kv", d_kv)):
                _set(struct, name, t)
            _set(struct, "dinp", dinp if layer.cell == "gru" else None)
            _set(struct, "gh", grads[li][0])
            _set(struct, "gc", grads[li][1] if layer.cell == "lstm" else None)
            structs[li] = struct
        status = ctx.lib.rims_stack_backward(
            T, B, len(layers), pointer(starts, torch.uint8), ctypes.addressof(structs), _kernel_threads(T, B)
        )
        del keep
        _check_status(status)
        # Weight gradients: one batched matmul each over all T*B rows (the kernel laid them out so).
        rows = T * B
        d_weights = []
        for li, layer in enumerate(layers):
            K, H, G = layer.num_modules, layer.module_size, layer.gate_size
            sv = run.saved[li]
            dz, dqkv, dcomm = (v.view(K, rows, -1) for v in views[4 * li : 4 * li + 3])
            # The cell input's gradient: LSTM's is dz's gate columns, GRU's its own (b_ih has a gradient).
            d_inp = views[4 * li + 3].view(K, rows, G) if layer.cell == "gru" else dz[..., :G]
            g_input = torch.bmm(sv["att"].view(K, rows, -1).transpose(1, 2), d_inp)
            g_slots = []
            for s in range(len(layer.slot_sizes)):
                if li == 0 and s == 0:
                    g_slots.append(None)  # x's slot: its projection is differentiated by autograd, outside
                else:
                    u = sv[f"u{s}"].reshape(rows, -1)
                    g_slots.append(u.t() @ d_kvs[li][:, s].reshape(rows, -1))
            d_weights.append(
                LayerWeights(
                    torch.bmm(sv["hprev"].view(K, rows, H).transpose(1, 2), dz),
                    dz.sum(1, keepdim=True),
                    g_input,
                    d_inp.sum(1, keepdim=True) if layer.cell == "gru" else None,
                    torch.bmm(sv["htil"].view(K, rows, H).transpose(1, 2), dqkv),
                    torch.bmm(sv["ctx"].view(K, rows, -1).transpose(1, 2), dcomm),
                    tuple(g_slots),  # type: ignore[arg-type]
                )
            )
        d_x_keys, d_x_values = d_kvs[0][:, 0].split([layers[0].input_key_size, layers[0].input_value_size], dim=-1)
        d_state0 = torch.cat([g.permute(2, 0, 1, 3).reshape(B, -1) for g in grads], dim=1)
        del dz, dqkv, dcomm, dinp, d_inp, views
        _POOL.give(buffer)
        return (None, None, None, d_state0, d_x_keys, d_x_values, *_flatten_weights(d_weights))
