"""Tests of the BRIMs core (policies/cores/brims.py) against shared/DESIGN.md and the issue's spec."""

from __future__ import annotations

import pytest
import torch

from policies.cores import make_core
from policies.cores.brims import BRIMs
from policies.cores.rims import RIMs

IN = 10
ATTN = dict(input_key_size=6, num_comm_heads=2, comm_key_size=4, comm_value_size=5)
# Layers of different widths (K*H = 24, 15, 20) to show no equal widths are needed.
MIXED = [
    {"num_modules": 4, "module_size": 6, "k_active": 2},
    {"num_modules": 3, "module_size": 5, "k_active": 2},
    {"num_modules": 5, "module_size": 4, "k_active": 3},
]
TWO = [{"num_modules": 4, "module_size": 6, "k_active": 2}, {"num_modules": 5, "module_size": 4, "k_active": 3}]


def make(layers: list[dict] = TWO, **kwargs) -> BRIMs:
    return BRIMs(IN, layers=layers, **{**ATTN, **kwargs})


def seq(T: int = 8, B: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, IN, generator=g), torch.zeros(T, B, dtype=torch.bool)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("cell,factor", [("lstm", 2), ("gru", 1)])
def test_shapes_and_info(cell: str, factor: int) -> None:
    core = make(MIXED, cell=cell)
    assert core.output_size == 20  # top layer: 5 x 4
    assert core.state_size == factor * (24 + 15 + 20)
    x, starts = seq(T=6, B=2)
    out, state, info = core(x, core.initial_state(2), starts, return_info=True)
    assert out.shape == (6, 2, 20) and state.shape == (2, core.state_size)
    for li, (K, slots) in enumerate([(4, 3), (3, 3), (5, 2)]):  # top layer: no top-down slot
        assert info[f"active_{li}"].shape == (6, 2, K)
        assert info[f"input_attention_{li}"].shape == (6, 2, K, slots)
        assert (info[f"active_{li}"].sum(-1) == MIXED[li]["k_active"]).all()
        assert torch.allclose(info[f"input_attention_{li}"].sum(-1), torch.ones(6, 2, K), atol=1e-6)
    # "top" output is the top layer's h, the last part of the state (layout h then c).
    top = state[:, factor * (24 + 15) :][:, :20]
    assert torch.equal(out[-1], top)


def test_output_all_width() -> None:
    core = make(MIXED, output="all")
    assert core.output_size == 24 + 15 + 20
    x, starts = seq(T=3, B=2)
    out, state = core(x, core.initial_state(2), starts)
    assert out.shape == (3, 2, 59)
    h_parts = [state[:, 0:24], state[:, 48:63], state[:, 78:98]]  # lstm: each layer [h | c]
    assert torch.equal(out[-1], torch.cat(h_parts, dim=-1))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_sequence_equals_single_steps(cell: str) -> None:
    core = make(MIXED, cell=cell, output="all")
    x, starts = seq(T=7)
    starts[3, 2] = True
    state0 = torch.randn(3, core.state_size) * 0.5
    out, state = core(x, state0, starts)
    s, outs = state0, []
    for t in range(7):
        o, s = core(x[t : t + 1], s, starts[t : t + 1])
        outs.append(o[0])
    assert (torch.stack(outs) - out).abs().max() < 1e-5
    assert (s - state).abs().max() < 1e-5


def test_resets() -> None:
    core = make()
    x, starts = seq(T=6)
    fresh_out, fresh_state = core(x, core.initial_state(3), starts)
    starts_reset = starts.clone()
    starts_reset[0] = True
    out, state = core(x, torch.randn(3, core.state_size) * 3, starts_reset)
    assert torch.equal(out, fresh_out) and torch.equal(state, fresh_state)
    # A mid-sequence reset restarts only that env, every layer included.
    starts_mid = starts.clone()
    starts_mid[4, 0] = True
    out_mid, _ = core(x, torch.randn(3, core.state_size), starts_mid)
    fresh_tail, _ = core(x[4:, :1], core.initial_state(1), starts[4:, :1])
    assert (out_mid[4:, 0] - fresh_tail[:, 0]).abs().max() < 1e-6


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_every_parameter_gets_a_gradient(cell: str) -> None:
    core = make(MIXED, cell=cell)
    x, starts = seq(T=12, B=4)
    out, state, info = core(x, core.initial_state(4), starts, return_info=True)
    for li in range(3):  # precondition: each module of each layer was active at some step
        assert info[f"active_{li}"].any(dim=(0, 1)).all(), li
    (out.pow(2).sum() + state.sum()).backward()
    for name, p in core.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cell,heads", [("lstm", 1), ("gru", 2)])
def test_fused_backward_matches_autograd(cell: str, heads: int) -> None:
    core = make(MIXED, cell=cell, num_input_heads=heads, output="all", dropout=0.2)
    core.train()
    x, starts = seq(T=7)
    starts[2, 1] = True
    x.requires_grad_(True)
    state0 = (torch.randn(3, core.state_size) * 0.5).requires_grad_(True)
    w_out = torch.randn(7, 3, core.output_size)
    w_state = torch.randn(3, core.state_size)
    results = []
    for fused in (True, False):
        core.fused_backward = fused
        torch.manual_seed(11)
        out, state = core(x, state0, starts)
        loss = (out * w_out).sum() + (state * w_state).sum()
        results.append((out.detach(), torch.autograd.grad(loss, [x, state0, *core.parameters()])))
    (out_f, grads_f), (out_r, grads_r) = results
    assert torch.equal(out_f, out_r)
    names = ["x", "state"] + [n for n, _ in core.named_parameters()]
    for name, gf, gr in zip(names, grads_f, grads_r, strict=True):
        assert (gf - gr).abs().max() <= 1e-5 * (1 + gr.abs().max()), name


def test_gradcheck_double() -> None:
    core = BRIMs(
        IN,
        layers=[
            {"num_modules": 3, "module_size": 2, "k_active": 2},
            {"num_modules": 2, "module_size": 3, "k_active": 1},
        ],
        input_key_size=2,
        num_comm_heads=1,
        comm_key_size=2,
        comm_value_size=2,
        output="all",
    ).double()
    x = torch.randn(3, 2, IN, dtype=torch.float64, requires_grad=True)
    starts = torch.zeros(3, 2, dtype=torch.bool)
    state0 = (torch.randn(2, core.state_size, dtype=torch.float64) * 0.5).requires_grad_(True)
    names = ["layers.0.slot_key_value.1", "layers.1.slot_key_value.0", "layers.0.weight_ih", "layers.1.weight_ih"]
    params = dict(core.named_parameters())
    weights = tuple(params[n].detach().clone().requires_grad_(True) for n in names)

    def run(x_: torch.Tensor, s_: torch.Tensor, *ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.functional_call(core, dict(zip(names, ws, strict=True)), (x_, s_, starts))

    assert torch.autograd.gradcheck(run, (x, state0, *weights), eps=1e-6, atol=1e-6, fast_mode=True)


def test_top_down_path_is_live() -> None:
    """Changing the top layer's state at t-1 changes the lower layer's attention and output at t."""
    core = make(TWO, output="all")
    x, starts = seq(T=1, B=2)
    state = torch.randn(2, core.state_size)
    _, _, info = core(x, state, starts, return_info=True)
    out, _ = core(x, state, starts)
    lower = 2 * 24  # layer 0's part of the state: h (24) and c (24)
    changed = state.clone()
    changed[:, lower : lower + 20] += torch.randn(2, 20)  # the top layer's h only
    out2, _, info2 = core(x, changed, starts, return_info=True)
    assert not torch.allclose(info2["input_attention_0"][..., 2], info["input_attention_0"][..., 2])
    assert not torch.allclose(out2[:, :, :24], out[:, :, :24])
    # ... while the bottom-up slot of layer 0 (x) and layer 0's state are untouched by construction.
    assert torch.equal(changed[:, :lower], state[:, :lower])


def test_bottom_up_path_is_live() -> None:
    core = make(TWO)
    x, starts = seq(T=1, B=2)
    state = torch.randn(2, core.state_size)
    out, _ = core(x, state, starts)
    out2, _ = core(x * 3 + 1, state, starts)
    assert not torch.allclose(out, out2)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_one_layer_brims_equals_rims(cell: str, native: bool) -> None:
    spec = {"num_modules": 5, "module_size": 6, "k_active": 3}
    # Bit-for-bit within one engine (the C kernel's rounding differs from the Python engine's).
    rims = RIMs(IN, cell=cell, **spec, **ATTN, native=native)
    brims = BRIMs(IN, layers=[spec], cell=cell, **ATTN, native=native)
    assert brims.state_size == rims.state_size and brims.output_size == rims.output_size
    assert sum(p.numel() for p in brims.parameters()) == sum(p.numel() for p in rims.parameters())
    x, starts = seq(T=6)
    starts[3, 1] = True
    state = torch.randn(3, rims.state_size)
    out_r, state_r, info_r = rims(x, state, starts, return_info=True)
    out_b, _ = brims(x, state, starts)
    assert not torch.allclose(out_r, out_b)  # different random weights: the comparison can fail
    brims.load_state_dict(rims.state_dict())
    out_b, state_b, info_b = brims(x, state, starts, return_info=True)
    assert torch.equal(out_b, out_r) and torch.equal(state_b, state_r)
    assert torch.equal(info_b["active_0"], info_r["active"])
    assert torch.equal(info_b["input_attention_0"], info_r["input_attention"])
    (out_r.sum()).backward()
    (out_b.sum()).backward()
    for (n, pr), pb in zip(rims.named_parameters(), brims.parameters(), strict=True):
        assert torch.allclose(pr.grad, pb.grad, atol=1e-6), n


def test_parameter_groups_cover_every_parameter_once() -> None:
    core = make(MIXED, cell="gru")
    groups = core.parameter_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in core.parameters()}
    modules = {id(p) for p in groups["modules"]}
    for layer in core.layers:
        assert id(layer.weight_hh) in modules and id(layer.bias_ih) in modules
        assert all(id(p) not in modules for p in layer.slot_key_value)


def test_slot_projections_follow_layer_widths() -> None:
    core = make(MIXED)
    widths = [[IN, 15], [24, 20], [15]]
    for layer, w in zip(core.layers, widths, strict=True):
        assert [p.shape[0] for p in layer.slot_key_value] == w


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(layers=[]), "layers"),
        (dict(layers=[{"num_modules": 4, "module_size": 6}]), r"layers\[0\]"),
        (dict(layers=[TWO[0], {"num_modules": 4, "module_size": 6, "k_active": 5}]), r"layers\[1\].k_active"),
        (dict(layers=[{"num_modules": 0, "module_size": 6, "k_active": 1}]), r"layers\[0\].num_modules"),
        (dict(layers=[{"num_modules": 3, "module_size": 0, "k_active": 1}]), r"layers\[0\].module_size"),
        (dict(output="middle"), "output"),
        (dict(cell="rnn"), "cell"),
        (dict(comm_key_size=0), "comm_key_size"),
        (dict(dropout=2), "dropout"),
    ],
)
def test_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        BRIMs(IN, **{"layers": TWO, **kwargs})


def test_make_core_builds_brims() -> None:
    core = make_core("brims", 16, layers=TWO, output="all")
    assert isinstance(core, BRIMs) and core.output_size == 24 + 20
    default = make_core("brims", 16)
    assert len(default.layers) == 2 and default.output_size == 6 * 64


@pytest.mark.parametrize("cell,heads", [("lstm", 1), ("gru", 2)])
def test_precomputed_drives_and_per_step_values_compute_the_same(cell: str, heads: int) -> None:
    """BRIMs layers apply W_ih to the attended value at each step; RIMs precomputes the drives.

    Both are the same function: flipping the switch on one core changes nothing but rounding. (The
    Python engine's choice: the C kernel always applies W_ih itself.)
    """
    core = RIMs(IN, num_modules=5, module_size=6, k_active=3, cell=cell, num_input_heads=heads, native=False, **ATTN)
    x, starts = seq(T=6)
    state = torch.randn(3, core.state_size)
    results = []
    for precomputed in (True, False):
        core.layers[0].precomputed_drives = precomputed
        core.zero_grad()
        out, new_state, info = core(x, state, starts, return_info=True)
        (out.sum() + new_state.pow(2).sum()).backward()
        results.append((out.detach(), info["active"], [p.grad.clone() for p in core.parameters()]))
    (out_a, act_a, g_a), (out_b, act_b, g_b) = results
    assert torch.equal(act_a, act_b)
    assert (out_a - out_b).abs().max() < 1e-5
    for ga, gb in zip(g_a, g_b, strict=True):
        assert (ga - gb).abs().max() <= 1e-4 * (1 + gb.abs().max())
