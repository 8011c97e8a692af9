"""Tests of the RIMs core (policies/cores/rims.py) against shared/DESIGN.md and the issue's spec."""

from __future__ import annotations

import math

import pytest
import torch

from policies.cores import make_core
from policies.cores.rims import RIMs

IN = 12


def small(**kwargs) -> RIMs:
    """A small RIMs whose modules all get used over a short random sequence."""
    args = dict(
        num_modules=5,
        module_size=8,
        k_active=3,
        input_key_size=6,
        num_comm_heads=2,
        comm_key_size=4,
        comm_value_size=5,
    )
    args.update(kwargs)
    return RIMs(IN, **args)


def seq(T: int = 10, B: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, IN, generator=g), torch.zeros(T, B, dtype=torch.bool)


def split_hc(core: RIMs, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, K, H) views of h and c of a flat state (layout: all h, then all c)."""
    K, H = core.num_modules, core.module_size
    if core.cell == "lstm":
        hc = state.view(state.shape[0], 2, K, H)
        return hc[:, 0], hc[:, 1]
    return state.view(state.shape[0], K, H), None


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("cell,state_factor", [("lstm", 2), ("gru", 1)])
def test_shapes(cell: str, state_factor: int) -> None:
    core = small(cell=cell)
    x, starts = seq(T=7, B=4)
    state = core.initial_state(4)
    assert core.output_size == 5 * 8
    assert core.state_size == state_factor * 5 * 8
    assert state.shape == (4, core.state_size) and not state.any()
    out, new_state, info = core(x, state, starts, return_info=True)
    assert out.shape == (7, 4, 40)
    assert new_state.shape == (4, core.state_size)
    assert info["active"].shape == (7, 4, 5) and info["active"].dtype == torch.bool
    assert info["input_attention"].shape == (7, 4, 5, 2)
    # The output is the concatenation of the modules' h: the h part of the state.
    h, _ = split_hc(core, new_state)
    assert torch.equal(out[-1], h.reshape(4, -1))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("num_input_heads", [1, 3])
def test_sequence_equals_single_steps(cell: str, num_input_heads: int) -> None:
    core = small(cell=cell, num_input_heads=num_input_heads)
    x, starts = seq(T=9)
    starts[4, 1] = True
    state0 = torch.randn(3, core.state_size) * 0.5
    out, state = core(x, state0, starts)
    s = state0
    outs = []
    for t in range(9):
        o, s = core(x[t : t + 1], s, starts[t : t + 1])
        outs.append(o[0])
    assert (torch.stack(outs) - out).abs().max() < 1e-5
    assert (s - state).abs().max() < 1e-5


def test_episode_start_gives_initial_state_result() -> None:
    core = small()
    x, starts = seq(T=6)
    fresh_out, fresh_state = core(x, core.initial_state(3), starts)
    dirty = torch.randn(3, core.state_size) * 3.0
    dirty[0, 0] = float("nan")  # a reset must not let even a NaN through
    starts_reset = starts.clone()
    starts_reset[0] = True
    out, state = core(x, dirty, starts_reset)
    assert torch.equal(out, fresh_out) and torch.equal(state, fresh_state)
    # Without the reset the dirty state matters.
    out_no_reset, _ = core(x, dirty.nan_to_num(), starts)
    assert not torch.allclose(out_no_reset, fresh_out)


def test_reset_mid_sequence_restarts_that_env_only() -> None:
    core = small()
    x, starts = seq(T=8, B=2)
    starts[5, 1] = True
    out, _ = core(x, torch.randn(2, core.state_size), starts)
    fresh, _ = core(x[5:, 1:2], core.initial_state(1), starts[5:, 1:2])
    assert (out[5:, 1] - fresh[:, 0]).abs().max() < 1e-6


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_every_parameter_gets_a_gradient(cell: str) -> None:
    core = small(cell=cell)
    x, starts = seq(T=12, B=4)
    out, state, info = core(x, core.initial_state(4), starts, return_info=True)
    # Precondition for a non-zero gradient to every module's cell: each module was active somewhere.
    assert info["active"].any(dim=(0, 1)).all()
    (out.pow(2).sum() + state.sum()).backward()
    for name, p in core.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("num_input_heads", [1, 2])
def test_fused_backward_matches_autograd(cell: str, num_input_heads: int) -> None:
    """The hand-written backward through time equals autograd through the same forward."""
    core = small(cell=cell, num_input_heads=num_input_heads, dropout=0.2)
    core.train()
    x, starts = seq(T=9)
    starts[3, 0] = True
    x.requires_grad_(True)
    state0 = (torch.randn(3, core.state_size) * 0.5).requires_grad_(True)
    w_out = torch.randn(9, 3, core.output_size)
    w_state = torch.randn(3, core.state_size)
    results = []
    for fused in (True, False):
        core.fused_backward = fused
        torch.manual_seed(7)  # same dropout masks in both runs
        out, state = core(x, state0, starts)
        loss = (out * w_out).sum() + (state * w_state).sum()
        results.append((out.detach(), torch.autograd.grad(loss, [x, state0, *core.parameters()])))
    (out_f, grads_f), (out_r, grads_r) = results
    assert torch.equal(out_f, out_r)
    names = ["x", "state"] + [n for n, _ in core.named_parameters()]
    for name, gf, gr in zip(names, grads_f, grads_r, strict=True):
        assert (gf - gr).abs().max() <= 1e-5 * (1 + gr.abs().max()), name


def test_gradcheck_double() -> None:
    """Finite differences agree with the hand-written backward (float64; inputs and state)."""
    core = small(num_modules=4, module_size=3, k_active=2, input_key_size=2, comm_key_size=2, comm_value_size=2)
    core = core.double()
    x = torch.randn(4, 2, IN, dtype=torch.float64, requires_grad=True)
    starts = torch.zeros(4, 2, dtype=torch.bool)
    starts[2, 1] = True
    state0 = (torch.randn(2, core.state_size, dtype=torch.float64) * 0.5).requires_grad_(True)
    names = ["layers.0.query", "layers.0.weight_ih", "layers.0.comm_qkv", "layers.0.comm_out", "layers.0.bias"]
    params = dict(core.named_parameters())
    weights = tuple(params[n].detach().clone().requires_grad_(True) for n in names)

    def run(x_: torch.Tensor, s_: torch.Tensor, *ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.functional_call(core, dict(zip(names, ws, strict=True)), (x_, s_, starts))

    assert core.fused_backward
    assert torch.autograd.gradcheck(run, (x, state0, *weights), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("k_active", [1, 3, 5])
def test_exactly_k_active(k_active: int) -> None:
    core = small(k_active=k_active)
    x, starts = seq(T=8, B=4)
    _, _, info = core(x, torch.randn(4, core.state_size), starts, return_info=True)
    assert (info["active"].sum(-1) == k_active).all()


def test_active_are_least_null_attention() -> None:
    """Top-k is taken on the (head-averaged) softmax attention to the null slot."""
    core = small(num_input_heads=3)
    x, starts = seq(T=8, B=4)
    _, _, info = core(x, torch.randn(4, core.state_size), starts, return_info=True)
    null = info["input_attention"][..., 0]
    att = info["input_attention"]
    assert torch.allclose(att.sum(-1), torch.ones_like(null), atol=1e-6)
    worst_active = null.masked_fill(~info["active"], -math.inf).amax(-1)
    best_inactive = null.masked_fill(info["active"], math.inf).amin(-1)
    assert (worst_active <= best_inactive).all()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inactive_modules_keep_state_bit_for_bit(cell: str) -> None:
    core = small(cell=cell)
    x, starts = seq(T=6, B=4)
    s = torch.randn(4, core.state_size)
    n_inactive = 0
    for t in range(6):
        _, s_new, info = core(x[t : t + 1], s, starts[t : t + 1], return_info=True)
        inactive = ~info["active"][0]  # (B, K)
        h0, c0 = split_hc(core, s)
        h1, c1 = split_hc(core, s_new)
        assert torch.equal(h1[inactive], h0[inactive])
        if c0 is not None:
            assert torch.equal(c1[inactive], c0[inactive])
        # ... and the active ones do change.
        assert not torch.equal(h1[~inactive], h0[~inactive])
        n_inactive += int(inactive.sum())
        s = s_new
    assert n_inactive == 6 * 4 * 2


def test_state_stays_bounded_over_long_episodes() -> None:
    """The bounded communication residual keeps h inside (-2, 2) with LSTM cells, even with
    large weights over a long episode (a plain linear residual grows geometrically there)."""
    core = small()
    with torch.no_grad():
        for w in (core.layers[0].comm_qkv, core.layers[0].comm_out):
            w.mul_(30.0)
    x, starts = seq(T=400)
    out, _ = core(x * 5.0, core.initial_state(3), starts)
    assert torch.isfinite(out).all()
    assert out.abs().max() < 2.0


def test_null_slot_key_and_value_are_exactly_zero() -> None:
    core = small(num_input_heads=2)
    layer = core.layers[0]
    w = layer.prepare()
    keys, drives = layer.slot_forward(w, 0, torch.zeros(3, IN))
    assert torch.equal(keys, torch.zeros_like(keys))
    assert torch.equal(drives, torch.zeros_like(drives))
    # The projections have no bias anywhere: every input-attention key/value parameter is a weight matrix.
    assert [p.shape for p in layer.slot_key_value] == [torch.Size([IN, 2 * (6 + 8)])]


def test_null_score_is_zero_in_reported_attention() -> None:
    """input_attention equals an explicit softmax over [q.0, q.k] computed from the parameters."""
    core = small()
    layer = core.layers[0]
    x, starts = seq(T=1, B=3)
    state = torch.randn(3, core.state_size)
    _, _, info = core(x, state, starts, return_info=True)
    h, _ = split_hc(core, state)  # (B, K, H)
    q = torch.einsum("bkh,khd->bkd", h, layer.query)
    key = (x[0] @ layer.slot_key_value[0])[:, :6]
    scores = torch.stack([torch.zeros(3, 5), torch.einsum("bkd,bd->bk", q, key) / math.sqrt(6)], dim=-1)
    assert torch.allclose(info["input_attention"][0], scores.softmax(-1), atol=1e-6)


def test_active_set_changes_with_input() -> None:
    core = small()
    state = torch.randn(6, core.state_size)
    starts = torch.zeros(3, 6, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, IN, generator=g).expand(3, 6, IN).clone()
    x[:, 3:] = torch.randn(3, 3, IN, generator=g) * 5  # same state, different inputs
    state[3:] = state[:3]
    _, _, info = core(x, state, starts, return_info=True)
    assert not torch.equal(info["active"][:, :3], info["active"][:, 3:])


def rims_param_count(D: int, K: int, H: int, nh: int, dk: int, dv: int, nc: int, ck: int, cv: int, cell: str) -> int:
    """K separate cells plus attention:

    cells:      K * (nh*dv*G + H*G + biases), G = 4H with one bias (lstm) or 3H with b_ih and b_hh (gru)
    input attn: D * nh*(dk + dv)        (shared bias-free key/value projection)
              + K * H * nh*dk           (per-module queries)
    comm attn:  K * H * nc*(2*ck + cv)  (per-module Q/K/V)
              + K * nc*cv * H           (per-module output projection)
    """
    G = (4 if cell == "lstm" else 3) * H
    biases = G if cell == "lstm" else 2 * G
    cells = K * (nh * dv * G + H * G + biases)
    attention = D * nh * (dk + dv) + K * H * nh * dk + K * H * nc * (2 * ck + cv) + K * nc * cv * H
    return cells + attention


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("nh,dv", [(1, None), (2, 7)])
def test_parameter_count(cell: str, nh: int, dv: int | None) -> None:
    core = small(cell=cell, num_input_heads=nh, input_value_size=dv)
    expected = rims_param_count(IN, 5, 8, nh, 6, 8 if dv is None else dv, 2, 4, 5, cell)
    assert sum(p.numel() for p in core.parameters()) == expected
    # No off-diagonal blocks: per-module weights are stacked (K, in, out).
    layer = core.layers[0]
    assert layer.weight_hh.shape == (5, 8, layer.gate_size)
    assert layer.weight_ih.shape == (5, nh * (8 if dv is None else dv), layer.gate_size)


def test_parameter_groups_cover_every_parameter_once() -> None:
    for cell in ("lstm", "gru"):
        core = small(cell=cell)
        groups = core.parameter_groups()
        assert set(groups) == {"modules", "attention"}
        ids = [id(p) for g in groups.values() for p in g]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in core.parameters()}
        layer = core.layers[0]
        assert {id(p) for p in groups["modules"]} == {id(p) for p in layer.module_parameters()}
        assert id(layer.weight_hh) in {id(p) for p in groups["modules"]}
        assert id(layer.query) in {id(p) for p in groups["attention"]}
        assert id(layer.comm_out) in {id(p) for p in groups["attention"]}


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(k_active=6), "k_active"),
        (dict(k_active=0), "k_active"),
        (dict(num_modules=0), "num_modules"),
        (dict(module_size=0), "module_size"),
        (dict(input_key_size=0), "input_key_size"),
        (dict(input_value_size=0), "input_value_size"),
        (dict(num_input_heads=0), "num_input_heads"),
        (dict(num_comm_heads=0), "num_comm_heads"),
        (dict(comm_key_size=0), "comm_key_size"),
        (dict(comm_value_size=0), "comm_value_size"),
        (dict(cell="rnn"), "cell"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        small(**kwargs)


def test_bad_argument_messages_list_allowed_values() -> None:
    with pytest.raises(ValueError, match="'lstm', 'gru'"):
        small(cell="rnn")
    with pytest.raises(ValueError, match="num_modules=5"):
        small(k_active=6)
    with pytest.raises(ValueError, match="input_size"):
        RIMs(0)
    core = small()
    with pytest.raises(ValueError, match="input_size"):
        core(torch.zeros(2, 3, IN + 1), core.initial_state(3), torch.zeros(2, 3, dtype=torch.bool))


def test_dropout_is_deterministic_in_eval_and_random_in_train() -> None:
    core = small(dropout=0.5)
    x, starts = seq(T=6)
    state = torch.randn(3, core.state_size)
    core.eval()
    a, _ = core(x, state, starts)
    b, _ = core(x, state, starts)
    assert torch.equal(a, b)
    core.train()
    c, _ = core(x, state, starts)
    d, _ = core(x, state, starts)
    assert not torch.equal(c, d)
    assert core.layers[0].input_attention_dropout == 0.5 and core.layers[0].comm_attention_dropout == 0.5


def test_gru_weights_are_not_constant_and_state_starts_at_zero() -> None:
    core = small(cell="gru")
    for p in core.parameters():
        assert p.std() > 0
    assert not core.initial_state(2).any()


def test_no_grad_forward_matches_training_forward() -> None:
    core = small()
    x, starts = seq(T=5)
    state = torch.randn(3, core.state_size)
    out, new_state = core(x, state, starts)
    with torch.no_grad():
        out_ng, state_ng = core(x, state, starts)
    assert torch.equal(out.detach(), out_ng) and torch.equal(new_state.detach(), state_ng)


def test_make_core_builds_rims() -> None:
    core = make_core("rims", 16, num_modules=4, module_size=10, k_active=2, cell="gru")
    assert isinstance(core, RIMs) and core.output_size == 40 and core.state_size == 40
    default = make_core("rims", 16)
    assert default.output_size == 6 * 64 and default.k_active == 4
