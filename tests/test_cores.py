"""The recurrent-core protocol (shared/DESIGN.md), checked for every core built through make_core."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from policies.cores import CORES, GRUCore, LSTMCore, RecurrentCore, make_core

INPUT_SIZE = 10
T, B = 9, 4

# Small versions of every core, built by name as the configs do.
CORE_KWARGS: dict[str, dict[str, Any]] = {
    "lstm": {"hidden_size": 12},
    "gru": {"hidden_size": 12},
    "rims": {"num_modules": 4, "module_size": 16, "k_active": 2},
    "brims": {
        "layers": [
            {"num_modules": 4, "module_size": 16, "k_active": 2},
            {"num_modules": 3, "module_size": 12, "k_active": 2},
        ]
    },
    "thalnet": {"num_modules": 3, "module_size": 12, "center_size_per_module": 4},
}
ALL_CORES = list(CORE_KWARGS)
MODULAR_CORES = ["rims", "brims", "thalnet"]
MONOLITHIC_CORES = ["lstm", "gru"]


def build(name: str, seed: int = 0) -> RecurrentCore:
    """The small core ``name``, seeded, in eval mode (no dropout: runs must be comparable)."""
    torch.manual_seed(seed)
    return make_core(name, INPUT_SIZE, **CORE_KWARGS[name]).eval()


def inputs(core: RecurrentCore, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Random inputs, a random non-zero entering state, and resets at t=0, mid-sequence and at T-1.

    The reset pattern has some envs resetting alone and steps where several reset together.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, INPUT_SIZE, generator=generator)
    state = 0.5 * torch.randn(B, core.state_size, generator=generator)
    starts = torch.zeros(T, B, dtype=torch.bool)
    starts[0, 2] = True
    starts[3, 1] = True
    starts[5, 0] = True
    starts[5, 3] = True
    starts[T - 1, 1] = True
    return x, state, starts


def time_first_tensors(value: Any) -> list[Tensor]:
    """Every tensor inside an info value (tensors, or dicts/lists/tuples of them, e.g. per BRIMs layer)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in time_first_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in time_first_tensors(v)]
    raise AssertionError(f"info holds a {type(value).__name__}, expected tensors")


@pytest.mark.parametrize("name", ALL_CORES)
def test_shapes_and_initial_state(name: str) -> None:
    core = build(name)
    assert isinstance(core.output_size, int) and core.output_size > 0
    initial = core.initial_state(B)
    assert initial.shape == (B, core.state_size)
    assert torch.count_nonzero(initial) == 0, "states start at zeros"
    x, state, starts = inputs(core)
    out, new_state = core(x, state, starts)
    assert out.shape == (T, B, core.output_size)
    assert new_state.shape == (B, core.state_size)
    out_info, state_info, info = core(x, state, starts, return_info=True)
    torch.testing.assert_close(out_info, out)
    torch.testing.assert_close(state_info, new_state)
    assert isinstance(info, dict)
    for key, value in info.items():
        for tensor in time_first_tensors(value):
            assert tensor.shape[:2] == (T, B), f"info[{key!r}] must be time first, got {tuple(tensor.shape)}"


@pytest.mark.parametrize("name", ALL_CORES)
def test_sequence_equals_single_steps(name: str) -> None:
    core = build(name)
    x, state, starts = inputs(core)
    with torch.no_grad():
        out, final = core(x, state, starts)
        step_state = state
        step_outs = []
        for t in range(T):
            out_t, step_state = core(x[t : t + 1], step_state, starts[t : t + 1])
            step_outs.append(out_t)
    assert (torch.cat(step_outs) - out).abs().max().item() < 1e-5
    assert (step_state - final).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ALL_CORES)
def test_start_gives_exactly_the_initial_state_result(name: str) -> None:
    core = build(name)
    x, state, _ = inputs(core)
    no_starts = torch.zeros(T, B, dtype=torch.bool)
    all_start = no_starts.clone()
    all_start[0] = True
    with torch.no_grad():
        fresh_out, fresh_state = core(x, core.initial_state(B), no_starts)
        reset_out, reset_state = core(x, state, all_start)
        carried_out, _ = core(x, state, no_starts)
    assert torch.equal(reset_out, fresh_out)
    assert torch.equal(reset_state, fresh_state)
    # The entering state does matter when there is no reset (else the check above proves nothing).
    assert not torch.allclose(carried_out[0], fresh_out[0])


@pytest.mark.parametrize("name", ALL_CORES)
def test_mid_sequence_reset_restarts_that_env_only(name: str) -> None:
    core = build(name)
    x, state, _ = inputs(core)
    starts = torch.zeros(T, B, dtype=torch.bool)
    reset_env, reset_t = 1, 4
    starts[reset_t, reset_env] = True
    with torch.no_grad():
        out, _ = core(x, state, starts)
        unreset_out, _ = core(x, state, torch.zeros(T, B, dtype=torch.bool))
        restarted_out, _ = core(
            x[reset_t:, reset_env : reset_env + 1],
            core.initial_state(1),
            torch.zeros(T - reset_t, 1, dtype=torch.bool),
        )
    # From the reset on, that env runs as a fresh episode ...
    torch.testing.assert_close(out[reset_t:, reset_env : reset_env + 1], restarted_out, atol=1e-5, rtol=1e-5)
    # ... before it, and for every other env, nothing changes.
    torch.testing.assert_close(out[:reset_t], unreset_out[:reset_t], atol=1e-6, rtol=1e-6)
    others = [b for b in range(B) if b != reset_env]
    torch.testing.assert_close(out[:, others], unreset_out[:, others], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ALL_CORES)
def test_every_parameter_receives_a_gradient(name: str) -> None:
    core = build(name).train()
    x, _, starts = inputs(core)
    out, _ = core(x, core.initial_state(B), starts)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    missing = [n for n, p in core.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", ALL_CORES)
def test_wrong_input_width_raises(name: str) -> None:
    core = build(name)
    wrong_width = INPUT_SIZE + 3
    x = torch.randn(T, B, wrong_width)
    with pytest.raises(ValueError, match=str(wrong_width)):
        core(x, core.initial_state(B), torch.zeros(T, B, dtype=torch.bool))


def test_make_core_unknown_name_lists_names() -> None:
    with pytest.raises(ValueError) as excinfo:
        make_core("transformer", INPUT_SIZE)
    message = str(excinfo.value)
    assert "transformer" in message
    for name in CORES:
        assert name in message


def test_make_core_unknown_argument_raises_value_error() -> None:
    with pytest.raises(ValueError, match="lstm"):
        make_core("lstm", INPUT_SIZE, num_heads=3)


def test_make_core_a_size_torch_cannot_take_is_one_line() -> None:
    # torch's TypeError went on with dozens of lines of C++ frames.
    with pytest.raises(ValueError, match="bad argument for core 'lstm': ") as raised:
        make_core("lstm", 4, hidden_size=2**70)
    assert "\n" not in str(raised.value)
    # The features width sets input_size: a TypeError ("got multiple values for argument") before.
    with pytest.raises(ValueError, match="bad argument for core 'lstm'.*input_size"):
        make_core("lstm", 4, input_size=5)


@pytest.mark.parametrize("name", MODULAR_CORES)
def test_parameter_groups_cover_every_parameter_once(name: str) -> None:
    core = build(name)
    groups = core.parameter_groups()
    assert set(groups) == {"modules", "attention"}
    assert groups["modules"] and groups["attention"], "both groups must be non-empty"
    grouped = [id(p) for group in groups.values() for p in group]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups (or twice in one)"
    assert set(grouped) == {id(p) for p in core.parameters()}


@pytest.mark.parametrize("name", MONOLITHIC_CORES)
def test_parameter_groups_raise_for_monolithic_cores(name: str) -> None:
    with pytest.raises(ValueError, match="modular"):
        build(name).parameter_groups()


# ---------------------------------------------------------------- LSTM / GRU baselines


def lstm_reference(core: LSTMCore, x: Tensor, state: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
    """Step-by-step LSTM cell with resets, from the core's weights (PyTorch's gate order i, f, g, o)."""
    rnn, H = core.rnn, core.hidden_size
    h, c = state[:, :H], state[:, H:]
    outs = []
    for t in range(x.shape[0]):
        keep = (~starts[t]).to(x.dtype).unsqueeze(1)
        h, c = h * keep, c * keep
        gates = x[t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h @ rnn.weight_hh_l0.T + rnn.bias_hh_l0
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), torch.cat([h, c], dim=1)


def gru_reference(core: GRUCore, x: Tensor, state: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
    """Step-by-step GRU cell with resets, from the core's weights (PyTorch's gate order r, z, n)."""
    rnn = core.rnn
    h = state
    outs = []
    for t in range(x.shape[0]):
        h = h * (~starts[t]).to(x.dtype).unsqueeze(1)
        gi = x[t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0
        gh = h @ rnn.weight_hh_l0.T + rnn.bias_hh_l0
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs), h


@pytest.mark.parametrize(("name", "reference"), [("lstm", lstm_reference), ("gru", gru_reference)])
def test_fused_rnn_matches_step_by_step_cell_with_resets(name: str, reference: Any) -> None:
    core = build(name).double()
    x, state, starts = inputs(core)
    x, state = x.double(), state.double()
    with torch.no_grad():
        out, final = core(x, state, starts)
        ref_out, ref_final = reference(core, x, state, starts)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(final, ref_final, atol=1e-10, rtol=1e-10)
    # Documented layout: LSTM state [h | c], GRU state h; the output is h.
    torch.testing.assert_close(final[:, : core.hidden_size], out[-1])


@pytest.mark.parametrize("name", CORES)
def test_a_forward_hook_on_the_core_fires_when_an_update_replays_outputs(name: str) -> None:
    # The README's way to look inside a step: the fused LSTM's packed replay skipped forward, and its hooks.
    core = build(name)
    x, state, starts = inputs(core)
    starts[1:, 0] = True  # many resets: the case the LSTM packs
    packed = core.outputs(x, state, starts)
    seen: list[Tensor] = []
    handle = core.register_forward_hook(lambda module, args, output: seen.append(output[0]))
    try:
        hooked = core.outputs(x, state, starts)
    finally:
        handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], hooked)
    torch.testing.assert_close(hooked, packed, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", MONOLITHIC_CORES)
def test_fused_rnn_calls_the_kernel_once_per_reset_time(name: str) -> None:
    core = build(name)
    calls: list[int] = []
    run_rnn = core._run_rnn
    core._run_rnn = lambda x, rnn_state: (calls.append(x.shape[0]), run_rnn(x, rnn_state))[1]
    x, state, starts = inputs(core)  # resets at t = 0, 3, 5 (two envs), T-1
    core(x, state, starts)
    assert calls == [3, 2, T - 1 - 5, 1]  # segments [0,3), [3,5), [5,T-1), [T-1,T)
    calls.clear()
    core(x, state, torch.zeros(T, B, dtype=torch.bool))
    assert calls == [T]


@pytest.mark.parametrize("name", MONOLITHIC_CORES)
def test_fused_rnn_calls_torchs_kernel_with_nn_rnns_numbers(name: str) -> None:
    """The core calls torch.lstm / torch.gru directly (nn.LSTM's forward costs ~45 us of Python a call):
    outputs, states and every gradient must be those of calling the nn.LSTM / nn.GRU module, to the bit."""
    core = build(name)
    x, state, starts = inputs(core)
    results = []
    for direct in (True, False):
        core.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        if not direct:  # the module's own forward, per segment
            core._run_rnn = lambda seg, rnn_state: core.rnn(seg, rnn_state)
        out, final = core(leaf, state, starts)
        (out.square().sum() + final.sin().sum()).backward()
        results.append([out.detach(), final.detach(), leaf.grad, *(p.grad for p in core.parameters())])
    assert len(results[0]) == 7 and all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("name", ALL_CORES)
def test_outputs_are_forwards_outputs_with_the_same_gradients(name: str) -> None:
    """``core.outputs`` (what an update's replay calls) gives forward's outputs, and the same gradients for
    the inputs, the entering state and every parameter (the LSTM's packed call sums the weight gradients
    in another order, hence a tolerance; everything else is the same arithmetic)."""
    core = build(name).double()
    x, state, starts = inputs(core)
    x, state = x.double(), state.double()
    weights = torch.linspace(-1, 1, core.output_size, dtype=torch.float64)
    results = []
    for method in (lambda *a: core(*a)[0], core.outputs):
        core.zero_grad(set_to_none=True)
        leaves = [x.clone().requires_grad_(True), state.clone().requires_grad_(True)]
        out = method(*leaves, starts)
        (out * weights).sin().sum().backward()
        results.append([out.detach(), *(leaf.grad for leaf in leaves), *(p.grad for p in core.parameters())])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_lstm_outputs_packs_every_episode_piece_into_one_kernel_call() -> None:
    """One kernel call however many reset times: pieces [0,3), [3,T-1) and [T-1,T) of env 1, [0,5) and [5,T)
    of envs 0 and 3, [0,T) of env 2 (its reset at step 0 makes it enter with zeros): 8 columns of T steps.
    The float32 outputs equal forward's to the bit; a sequence without later resets is forward's one call."""
    core = build("lstm")
    calls: list[tuple[int, ...]] = []
    run_rnn = core._run_rnn
    core._run_rnn = lambda x, rnn_state: (calls.append(tuple(x.shape[:2])), run_rnn(x, rnn_state))[1]
    x, state, starts = inputs(core)  # resets at t = 0 (env 2), 3 (env 1), 5 (envs 0, 3), T-1 (env 1)
    with torch.no_grad():
        packed = core.outputs(x, state, starts)
        assert calls == [(T, 8)]
        calls.clear()
        assert torch.equal(packed, core(x, state, starts)[0])
        first_step_only = torch.zeros(T, B, dtype=torch.bool)
        first_step_only[0] = True
        packed_calls: list[int] = []
        packed_outputs = core._packed_outputs
        core._packed_outputs = lambda *args: (packed_calls.append(1), packed_outputs(*args))[1]
        core.outputs(x, state, first_step_only)
        assert calls[-1] == (T, B) and not packed_calls
        core.outputs(x, state, starts)
        assert packed_calls == [1]
    # Where padding would cost more than the calls it saves (every env resetting at one step, an LSTM of
    # 512: Atari's size) the outputs come from forward's calls.
    torch.manual_seed(0)
    wide = LSTMCore(INPUT_SIZE, 512)
    wide._run_rnn = lambda x, rnn_state: (calls.append(tuple(x.shape[:2])), LSTMCore._run_rnn(wide, x, rnn_state))[1]
    together = torch.zeros(T, B, dtype=torch.bool)
    together[4] = True
    calls.clear()
    with torch.no_grad():
        wide.outputs(x, 0.5 * torch.randn(B, wide.state_size), together)
    assert calls == [(4, B), (T - 4, B)]


def test_gru_outputs_keeps_forwards_calls() -> None:
    core = build("gru")
    calls: list[int] = []
    run_rnn = core._run_rnn
    core._run_rnn = lambda x, rnn_state: (calls.append(x.shape[0]), run_rnn(x, rnn_state))[1]
    x, state, starts = inputs(core)
    assert torch.equal(core.outputs(x, state, starts), core(x, state, starts)[0])
    assert calls == [3, 2, T - 1 - 5, 1] * 2


@pytest.mark.parametrize("name", MONOLITHIC_CORES)
def test_fused_rnn_uses_default_init_and_empty_info(name: str) -> None:
    core = build(name)
    for param_name, param in core.named_parameters():
        assert param.std() > 0, f"{param_name} is constant (e.g. all ones)"
        assert param.abs().max() <= 1 / core.hidden_size**0.5 + 1e-6, f"{param_name} is not PyTorch's default init"
    x, state, starts = inputs(core)
    assert core(x, state, starts, return_info=True)[2] == {}


# ---------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL_CORES)
@pytest.mark.usefixtures("fp32_on_cuda")
def test_core_runs_on_cuda_like_on_cpu(name: str) -> None:
    core = build(name)
    x, state, starts = inputs(core)
    with torch.no_grad():
        cpu_out, cpu_state = core(x, state, starts)
        core = core.cuda()
        assert core.initial_state(B).device.type == "cuda"
        cuda_out, cuda_state = core(x.cuda(), state.cuda(), starts.cuda())
        cuda_outputs = core.outputs(x.cuda(), state.cuda(), starts.cuda())
    assert cuda_out.device.type == "cuda" and cuda_state.device.type == "cuda"
    torch.testing.assert_close(cuda_outputs.cpu(), cpu_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cuda_state.cpu(), cpu_state, atol=1e-4, rtol=1e-4)
