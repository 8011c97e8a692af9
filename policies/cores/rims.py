"""Recurrent Independent Mechanisms (RIMs) and the layer block BRIMs reuses.

A RIMs core holds K modules of size H, each with its own LSTM or GRU cell. At
every step (see shared/DESIGN.md, "RIMs"):

1. every module attends over the input slots ``[null, x_t]`` (keys and values
   are bias-free projections shared by all modules, so the null key and value
   are exactly zero; queries are per-module projections of ``h_{t-1,k}``);
2. the ``k_active`` modules that put the least attention on the null slot are
   active (hard, detached top-k on the softmax probabilities);
3. every module's cell runs on its attended input, all K in one batched matmul;
4. modules communicate by multi-head attention over all modules (per-module
   Q/K/V), added as a residual to the new ``h``;
5. inactive modules keep ``h`` and ``c`` bit-for-bit (``torch.where``).

Layout notes (why the code looks the way it does):

* Per-module weights are stacked ``(K, in, out)`` and applied with ``bmm`` /
  ``baddbmm`` on ``(K, B, in)`` activations, so there is no Python loop over
  modules and no off-diagonal block exists as a parameter.
* Keys and values depend only on the input, so for a slot fed by ``x`` they are
  computed for all T steps in ``_precompute`` in one matmul. The value only
  enters the cell through ``W_ih``, and attention is linear in the value, so we
  also precompute the *drive* ``v_t @ W_ih[k]`` for every module (per head).
  The cell's input pre-activation is then ``sum_slots,heads a * drive``; with one
  slot plus the null slot (whose value is zero) it is a single ``addcmul``.
* With one non-null slot the softmax over ``[0, s]`` is ``sigmoid(s)`` exactly,
  which saves a concatenation and a softmax per step.
* The recurrent gate weights ``W_hh`` and the input-attention query weights are
  both applied to ``h_{t-1}``: they stay separate parameters (the meta-learning
  split needs them apart) but are concatenated once per forward so each step
  does one ``baddbmm`` for both.

The flat state of a layer is ``(B, 2, K, H)`` flattened for ``lstm`` (all ``h``
first, then all ``c``) and ``(B, K, H)`` flattened for ``gru``; the output is the
``h`` part, ``(B, K*H)``, module-major.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.cores.base import RecurrentCore, check_choice, check_positive_int

CELLS: tuple[str, ...] = ("lstm", "gru")


def check_dropout(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a probability in ``[0, 1)``, else raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


class LayerWeights(NamedTuple):
    """Weights of a :class:`RIMsLayer` rearranged once per forward for the per-step code.

    :param recurrent: ``(K, H, gates + heads*key)``: ``W_hh`` next to the (pre-scaled) query weights.
    :param recurrent_bias: ``(K, 1, gates + heads*key)``: the recurrent bias, zeros for the queries.
    :param drive: ``W_ih`` laid out for :meth:`RIMsLayer.keys_and_drives`.
    """

    recurrent: Tensor
    recurrent_bias: Tensor
    drive: Tensor


class StepResult(NamedTuple):
    """What one :meth:`RIMsLayer.step` returns.

    :param state: the layer's new flat state ``(B, layer_state_size)``; its first ``K*H`` columns are the output.
    :param active: ``(K, B)`` bool mask of the active modules.
    :param null_attention: ``(K, B, heads)`` attention on the null slot (detached), the selection criterion.
    :param slot_attention: ``(K, B, heads, slots)`` attention on the non-null slots (before dropout).
    """

    state: Tensor
    active: Tensor
    null_attention: Tensor
    slot_attention: Tensor


class RIMsLayer(nn.Module):
    """One RIMs layer: input attention over slots, top-k selection, K cells, communication.

    Used as-is by :class:`RIMs` (one slot, fed by ``x``) and once per layer by
    ``BRIMs`` (a bottom-up and a top-down slot). The layer does not know where a
    slot's input comes from: the caller computes each slot's keys and drives with
    :meth:`keys_and_drives` (for all T at once when the slot is fed by ``x``) and
    passes them to :meth:`step`.

    :param slot_sizes: width of each non-null input slot; each slot has its own
        bias-free key/value projection into the layer's common key/value space.
    :param num_modules: K, the number of modules.
    :param module_size: H, the hidden size of each module.
    :param k_active: how many modules are active at each step, ``1 <= k_active <= K``.
    :param cell: ``"lstm"`` or ``"gru"``.
    :param num_input_heads: input-attention heads; the attended values of the heads are
        concatenated into the cell input, the heads' probabilities averaged for selection.
    :param input_key_size: key/query width per input-attention head.
    :param input_value_size: value width per input-attention head (cell input is heads * this).
    :param num_comm_heads: communication-attention heads.
    :param comm_key_size: key/query width per communication head.
    :param comm_value_size: value width per communication head.
    :param dropout: probability used (in training mode only) both for the
        input-attention probabilities and for the communication-attention probabilities.
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
        # Two separately named rates so they can never be swapped (a known bug in a public port).
        self.input_attention_dropout = p
        self.comm_attention_dropout = p
        self.gate_size = (4 if self.cell == "lstm" else 3) * H
        self.output_size = K * H
        self.state_size = (2 if self.cell == "lstm" else 1) * K * H

        # --- attention parameters ---
        # Per slot, one bias-free projection to [keys of all heads | values of all heads]
        # (F.linear layout). No bias is what makes the null slot's key and value exactly zero.
        self.slot_key_value = nn.ParameterList(
            [nn.Parameter(torch.empty(nh * (dk + dv), size)) for size in self.slot_sizes]
        )
        self.query = nn.Parameter(torch.empty(K, H, nh * dk))
        self.comm_qkv = nn.Parameter(torch.empty(K, H, nc * (2 * ck + cv)))
        self.comm_out = nn.Parameter(torch.empty(K, nc * cv, H))
        # --- module (cell) parameters, stacked per module ---
        self.weight_ih = nn.Parameter(torch.empty(K, nh * dv, self.gate_size))
        self.weight_hh = nn.Parameter(torch.empty(K, H, self.gate_size))
        if self.cell == "lstm":
            # One bias: LSTM's b_ih and b_hh are redundant.
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
        for w in self.slot_key_value:
            b = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -b, b)
        for w in (self.query, self.comm_qkv, self.comm_out):
            b = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -b, b)

    def module_parameters(self) -> list[nn.Parameter]:
        """The per-module cell parameters (the "fast" group in meta-learning)."""
        if self.cell == "lstm":
            return [self.weight_ih, self.weight_hh, self.bias]
        return [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]

    def attention_parameters(self) -> list[nn.Parameter]:
        """Input-attention (slot keys/values, queries) and communication parameters."""
        return [*self.slot_key_value, self.query, self.comm_qkv, self.comm_out]

    def prepare(self) -> LayerWeights:
        """Rearrange the weights for the per-step code; call once per forward (it is differentiable)."""
        K, nh, dk, dv, G = self.num_modules, self.num_input_heads, self.input_key_size, self.input_value_size, self.gate_size
        # Fold the 1/sqrt(d) score scale into the query weights: one op per forward, not per step.
        query = self.query * (1.0 / math.sqrt(dk))
        recurrent = torch.cat([self.weight_hh, query], dim=-1)
        b_hh = self.bias if self.cell == "lstm" else self.bias_hh
        recurrent_bias = torch.cat([b_hh, b_hh.new_zeros(K, nh * dk)], dim=-1).unsqueeze(1)
        if nh == 1:
            # (dv, K*G): one plain matmul gives every module's drive.
            drive = self.weight_ih.permute(1, 0, 2).reshape(dv, K * G)
        else:
            # (heads, dv, K*G): a batched matmul over heads.
            drive = self.weight_ih.view(K, nh, dv, G).permute(1, 2, 0, 3).reshape(nh, dv, K * G)
        return LayerWeights(recurrent, recurrent_bias, drive)

    def keys_and_drives(self, weights: LayerWeights, slot: int, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and cell drives of one slot, for any leading shape ``(..., B)``.

        :param weights: from :meth:`prepare`.
        :param slot: index of the (non-null) slot.
        :param inputs: ``(..., B, slot_sizes[slot])``; e.g. ``(T, B, in)`` for all steps at once.
        :return: ``keys`` ``(..., B, heads, key)`` and ``drives`` ``(..., K, B, gates)`` for one
            head or ``(..., K, B, heads, gates)``: ``drives[k] = value @ W_ih[k]`` per head, which
            the step scales by attention (attention is linear in the value).
        """
        K, nh, dk, dv, G = self.num_modules, self.num_input_heads, self.input_key_size, self.input_value_size, self.gate_size
        lead = inputs.shape[:-1]
        kv = F.linear(inputs, self.slot_key_value[slot])
        keys, values = kv.split([nh * dk, nh * dv], dim=-1)
        keys = keys.unflatten(-1, (nh, dk))
        if nh == 1:
            drives = (values @ weights.drive).view(*lead, K, G).transpose(-2, -3)
        else:
            v = values.reshape(-1, nh, dv).transpose(0, 1)  # (heads, N, dv)
            d = torch.bmm(v, weights.drive)  # (heads, N, K*G)
            drives = d.view(nh, *lead, K, G).movedim(0, -2).transpose(-3, -4)  # (..., K, B, heads, G)
        return keys, drives

    def split_state(self, state: Tensor) -> tuple[Tensor, Tensor | None]:
        """Views ``(K, B, H)`` of ``h`` (and ``c`` for lstm, else None) into a flat ``(B, state_size)`` state."""
        B, K, H = state.shape[0], self.num_modules, self.module_size
        if self.cell == "lstm":
            # unbind, not indexing: its backward is one stack, not a zero-filled copy per part.
            h, c = state.view(B, 2, K, H).permute(1, 2, 0, 3).unbind(0)
            return h, c
        return state.view(B, K, H).transpose(0, 1), None

    def step(self, weights: LayerWeights, state: Tensor, keys: Sequence[Tensor], drives: Sequence[Tensor]) -> StepResult:
        """One step of the layer.

        :param weights: from :meth:`prepare` (once per forward).
        :param state: the layer's flat state ``(B, state_size)`` entering the step.
        :param keys: per non-null slot, ``(B, heads, key)`` (from :meth:`keys_and_drives`).
        :param drives: per non-null slot, ``(K, B, gates)`` or ``(K, B, heads, gates)``.
        :return: a :class:`StepResult`.
        """
        K, H, nh, dk = self.num_modules, self.module_size, self.num_input_heads, self.input_key_size
        B = state.shape[0]
        h_prev, c_prev = self.split_state(state)

        # Recurrent gate pre-activations and input-attention queries from h_{t-1}: one baddbmm.
        z = torch.baddbmm(weights.recurrent_bias, h_prev, weights.recurrent)
        rec, query = z.split([self.gate_size, nh * dk], dim=-1)
        query = query.view(K, B, nh, dk)

        # Input attention. The null slot's key is zero, so its score is exactly 0.
        if len(keys) == 1:
            score = (query * keys[0]).sum(-1)  # (K, B, heads)
            attn = torch.sigmoid(score).unsqueeze(-1)  # = softmax([0, s])[1], exactly
            with torch.no_grad():
                null = torch.sigmoid(-score)  # = softmax([0, s])[0], without 1 - p rounding
        else:
            stacked = torch.stack(list(keys), dim=-2)  # (B, heads, slots, key)
            score = (query.unsqueeze(-2) * stacked).sum(-1)  # (K, B, heads, slots)
            probs = torch.softmax(F.pad(score, (1, 0)), dim=-1)  # null score 0 prepended
            null = probs[..., 0].detach()
            attn = probs[..., 1:]

        # Selection: the k_active modules with the least (head-averaged) null attention.
        with torch.no_grad():
            if self.k_active == K:
                active = torch.ones(K, B, dtype=torch.bool, device=state.device)
            else:
                criterion = null[..., 0] if nh == 1 else null.mean(-1)
                chosen = torch.topk(criterion, self.k_active, dim=0, largest=False).indices
                active = torch.zeros(K, B, dtype=torch.bool, device=state.device).scatter_(0, chosen, True)

        weighted = attn
        if self.training and self.input_attention_dropout > 0.0:
            weighted = F.dropout(attn, self.input_attention_dropout, training=True)

        # Cell input pre-activation: sum over slots and heads of attention * drive (null adds 0).
        if self.cell == "lstm":
            gates = self._add_drives(rec, weighted, drives)
            # Gate order [i, f, o, g]: one split (backward: one cat) instead of slices.
            sig, g = gates.split([3 * H, H], dim=-1)
            i, f, o = torch.sigmoid(sig).chunk(3, dim=-1)
            g = torch.tanh(g)
            c_new = torch.addcmul(f * c_prev, i, g)
            h_new = o * torch.tanh(c_new)
        else:
            x_gates = self._add_drives(self.bias_ih.unsqueeze(1), weighted, drives)
            x_rz, x_n = x_gates.split([2 * H, H], dim=-1)
            h_rz, h_n = rec.split([2 * H, H], dim=-1)
            r, zg = torch.sigmoid(x_rz + h_rz).chunk(2, dim=-1)
            n = torch.tanh(torch.addcmul(x_n, r, h_n))
            h_new = torch.addcmul(n, zg, h_prev - n)  # (1 - z) * n + z * h
            c_new = None

        h_new = self._communicate(h_new)

        # Inactive modules keep h and c exactly: where, never a multiply-blend.
        if self.cell == "lstm":
            prev = state.view(B, 2, K, H).permute(2, 0, 1, 3)  # (K, B, 2, H) view, no copy
            new = torch.stack([h_new, c_new], dim=2)
            kept = torch.where(active.view(K, B, 1, 1), new, prev)
            flat = kept.permute(1, 2, 0, 3).reshape(B, self.state_size)
        else:
            kept = torch.where(active.unsqueeze(-1), h_new, h_prev)
            flat = kept.transpose(0, 1).reshape(B, self.state_size)
        return StepResult(flat, active, null, attn)

    def _add_drives(self, base: Tensor, attn: Tensor, drives: Sequence[Tensor]) -> Tensor:
        """``base + sum_slots sum_heads attn * drive``; attn ``(K, B, heads, slots)``."""
        out = base
        for s, drive in enumerate(drives):  # slots (1 to 2), never modules
            a = attn[..., s]  # (K, B, heads)
            if self.num_input_heads == 1:
                out = torch.addcmul(out, a, drive)  # (K,B,1) * (K,B,G)
            else:
                out = out + torch.matmul(a.unsqueeze(-2), drive).squeeze(-2)  # (K,B,1,h)@(K,B,h,G)
        return out

    def _communicate(self, h: Tensor) -> Tensor:
        """Multi-head attention of every module over all modules, added to ``h`` as a residual.

        Inactive modules' results are discarded by the caller's ``where``, so computing
        them costs nothing extra and keeps it one batched op.
        """
        K, B = h.shape[0], h.shape[1]
        nc, ck, cv = self.num_comm_heads, self.comm_key_size, self.comm_value_size
        qkv = torch.bmm(h, self.comm_qkv)  # (K, B, heads*(2ck+cv)), per-module projections
        q, k, v = qkv.split([nc * ck, nc * ck, nc * cv], dim=-1)
        # (K, B, heads, d) -> (B, heads, K, d): attention across modules.
        q = q.view(K, B, nc, ck).permute(1, 2, 0, 3)
        k = k.view(K, B, nc, ck).permute(1, 2, 0, 3)
        v = v.view(K, B, nc, cv).permute(1, 2, 0, 3)
        p = self.comm_attention_dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, heads, K, cv)
        ctx = ctx.permute(2, 0, 1, 3).reshape(K, B, nc * cv)
        return torch.baddbmm(h, ctx, self.comm_out)  # residual + per-module output projection


def layer_info(step_infos: dict[str, Tensor], suffix: str) -> dict[str, Tensor]:
    """Turn one layer's stacked raw per-step diagnostics into the protocol's info entries.

    :param step_infos: stacked over time: ``active{suffix}`` ``(T, K, B)``, ``null{suffix}``
        ``(T, K, B, heads)``, ``slots{suffix}`` ``(T, K, B, heads, slots)``.
    :param suffix: ``""`` for RIMs, ``"_{l}"`` for BRIMs layer l.
    :return: ``active{suffix}`` ``(T, B, K)`` bool and ``input_attention{suffix}``
        ``(T, B, K, 1 + slots)``, head-averaged, slot 0 the null slot.
    """
    active = step_infos[f"active{suffix}"].transpose(1, 2)
    null = step_infos[f"null{suffix}"].detach().unsqueeze(-1)
    slots = step_infos[f"slots{suffix}"].detach()
    attention = torch.cat([null, slots], dim=-1).mean(dim=-2).transpose(1, 2)
    return {f"active{suffix}": active, f"input_attention{suffix}": attention}


def raw_step_info(result: StepResult, suffix: str) -> dict[str, Tensor]:
    """Per-step raw diagnostics (no extra ops; converted once per forward by :func:`layer_info`)."""
    return {
        f"active{suffix}": result.active,
        f"null{suffix}": result.null_attention,
        f"slots{suffix}": result.slot_attention,
    }


class RIMs(RecurrentCore):
    """Recurrent Independent Mechanisms core (Goyal et al., 2019), following shared/DESIGN.md.

    :param input_size: width of ``x_t``.
    :param num_modules: K, number of modules.
    :param module_size: H, hidden size of each module; the output is ``K*H`` wide.
    :param k_active: number of modules active per step, ``1 <= k_active <= num_modules``.
    :param cell: ``"lstm"`` (state ``(B, 2*K*H)``: all h then all c) or ``"gru"`` (state ``(B, K*H)``).
    :param num_input_heads: input-attention heads (averaged for selection, concatenated as cell input).
    :param input_key_size: key/query width per input-attention head.
    :param input_value_size: value width per input-attention head; ``None`` means ``module_size``.
    :param num_comm_heads: communication-attention heads.
    :param comm_key_size: key/query width per communication head.
    :param comm_value_size: value width per communication head.
    :param dropout: dropout on the input-attention and the communication-attention
        probabilities, only in training mode (``0`` disables it).
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
    ) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.layer = RIMsLayer(
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
        )
        self.num_modules, self.module_size, self.k_active = num_modules, module_size, k_active
        self.cell = cell
        self.output_size = self.layer.output_size
        self.state_size = self.layer.state_size
        self._weights: LayerWeights | None = None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"modules": cell parameters, "attention": input and communication attention}``, each once."""
        return {"modules": self.layer.module_parameters(), "attention": self.layer.attention_parameters()}

    def _precompute(self, x: Tensor) -> tuple[Tensor, ...]:
        # Rearranged weights are shared by all steps of this forward (cleared in forward).
        self._weights = self.layer.prepare()
        keys, drives = self.layer.keys_and_drives(self._weights, 0, x)  # (T,B,h,dk), (T,K,B,[h,]G)
        # Handed over as per-step tuples (unbind): the base indexes p[t], and indexing a
        # tensor that needs grad costs a zero-filled full-size gradient per step in backward
        # (quadratic in T); unbind's backward is a single stack.
        return keys.unbind(0), drives.unbind(0)  # type: ignore[return-value]

    def _step(self, inputs_t: tuple[Tensor, ...], state: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        assert self._weights is not None
        keys, drives = inputs_t
        result = self.layer.step(self._weights, state, [keys], [drives])
        return result.state[:, : self.output_size], result.state, raw_step_info(result, "")

    def forward(
        self,
        x: Tensor,
        state: Tensor,
        episode_starts: Tensor,
        return_info: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Run over a sequence (see :class:`RecurrentCore`).

        With ``return_info``, info holds ``active`` ``(T, B, K)`` bool and
        ``input_attention`` ``(T, B, K, 2)`` (head-averaged probabilities, slot 0 = null).
        """
        try:
            result = super().forward(x, state, episode_starts, return_info)
        finally:
            self._weights = None  # do not keep this forward's graph alive
        if not return_info:
            return result
        out, new_state, raw = result  # type: ignore[misc]
        return out, new_state, layer_info(raw, "")
