"""BRIMs: bidirectional, layered RIMs with top-down attention (Mittal et al., 2020).

Layer ``l`` at step t is a RIMs layer (:class:`policies.cores.rims.RIMsLayer`) whose input
attention reads the slots ``[null, bottom-up, top-down]``: bottom-up is layer ``l-1``'s
output at step t (``x_t`` for the bottom layer), top-down is layer ``l+1``'s output at step
t-1 (the top layer has no top-down slot). Selection, dynamics and communication are those
of RIMs within each layer. Every slot has its own bias-free key/value projection into the
layer's common key/value space, so layers may have different widths.

All the computation lives in :class:`policies.cores.rims.RIMsStackCore`, shared with RIMs;
this file only validates the layer list and builds the layers. With one layer BRIMs is RIMs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.cores.base import check_choice, check_positive_int
from policies.cores.rims import RIMsLayer, RIMsStackCore

OUTPUTS: tuple[str, ...] = ("top", "all")
LAYER_KEYS: tuple[str, ...] = ("num_modules", "module_size", "k_active")


def _default_layers() -> list[dict[str, int]]:
    return [{"num_modules": 6, "module_size": 64, "k_active": 4} for _ in range(2)]


def _check_layers(layers: Any) -> list[dict[str, int]]:
    """Validate the ``layers`` argument; raise ValueError naming the bad entry."""
    if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"layers must be a non-empty list of dicts with keys {', '.join(LAYER_KEYS)}, got {layers!r}")
    checked = []
    for i, spec in enumerate(layers):
        if not isinstance(spec, Mapping) or set(spec) != set(LAYER_KEYS):
            raise ValueError(f"layers[{i}] must be a dict with exactly the keys {', '.join(LAYER_KEYS)}, got {spec!r}")
        checked.append({key: check_positive_int(f"layers[{i}].{key}", spec[key]) for key in LAYER_KEYS})
        if checked[-1]["k_active"] > checked[-1]["num_modules"]:
            raise ValueError(
                f"layers[{i}].k_active must be between 1 and num_modules={checked[-1]['num_modules']}, "
                f"got {checked[-1]['k_active']}"
            )
    return checked


class BRIMs(RIMsStackCore):
    """Bidirectional RIMs: a stack of RIMs layers with bottom-up and top-down input attention.

    :param input_size: width of ``x_t``.
    :param layers: bottom first, one dict per layer with ``num_modules`` (K), ``module_size`` (H)
        and ``k_active``; default two layers of 6 modules of 64 with 4 active.
    :param cell: ``"lstm"`` or ``"gru"``, for every layer.
    :param num_input_heads: input-attention heads, per layer.
    :param input_key_size: key/query width per input head.
    :param input_value_size: value width per input head; ``None`` means each layer's ``module_size``.
    :param num_comm_heads: communication heads, per layer.
    :param comm_key_size: key/query width per communication head.
    :param comm_value_size: value width per communication head.
    :param dropout: dropout on the input- and communication-attention probabilities (training only).
    :param output: ``"top"`` (the top layer's ``K*H`` module states) or ``"all"`` (every layer's,
        concatenated bottom first).
    :param fused_backward: train through the hand-written backward (default) or, with ``False``,
        plain autograd through the same forward.
    :param native: run the time loop in the C kernel where it applies (LSTM or GRU cells, one input head,
        float32 on the CPU; see :meth:`RIMsStackCore.kernel_for`); ``False``: the Python engine.

    The state concatenates the layers' states (bottom first), each laid out as in RIMs.
    ``info`` holds ``active_{l}`` ``(T, B, K_l)`` and ``input_attention_{l}``
    ``(T, B, K_l, slots)`` per layer, ``l = 0`` the bottom; slots are
    ``[null, bottom-up, top-down]`` (no top-down for the top layer).
    :raises ValueError: naming the argument, for a malformed ``layers``, a size < 1, an unknown
        cell or output, or a dropout outside ``[0, 1)``.
    """

    def __init__(
        self,
        input_size: int,
        layers: Sequence[Mapping[str, int]] | None = None,
        cell: str = "lstm",
        num_input_heads: int = 1,
        input_key_size: int = 64,
        input_value_size: int | None = None,
        num_comm_heads: int = 4,
        comm_key_size: int = 32,
        comm_value_size: int = 32,
        dropout: float = 0.0,
        output: str = "top",
        fused_backward: bool = True,
        native: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("input_size", input_size)
        specs = _check_layers(_default_layers() if layers is None else layers)
        self.output = check_choice("output", output, OUTPUTS)
        widths = [spec["num_modules"] * spec["module_size"] for spec in specs]
        built = []
        for li, spec in enumerate(specs):
            slots = [input_size if li == 0 else widths[li - 1]]
            if li < len(specs) - 1:
                slots.append(widths[li + 1])
            built.append(
                RIMsLayer(
                    slot_sizes=slots,
                    num_modules=spec["num_modules"],
                    module_size=spec["module_size"],
                    k_active=spec["k_active"],
                    cell=cell,
                    num_input_heads=num_input_heads,
                    input_key_size=input_key_size,
                    input_value_size=spec["module_size"] if input_value_size is None else input_value_size,
                    num_comm_heads=num_comm_heads,
                    comm_key_size=comm_key_size,
                    comm_value_size=comm_value_size,
                    dropout=dropout,
                    # Slots fed by other layers are known only step by step; one layer is RIMs.
                    precomputed_drives=len(specs) == 1,
                )
            )
        output_layers = tuple(range(len(specs))) if self.output == "all" else (len(specs) - 1,)
        self._build(input_size, built, output_layers, bool(fused_backward), bool(native))
        self.layer_specs = specs
        self.cell = cell
