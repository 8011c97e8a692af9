"""ThalNet: the four reading mechanisms, against a plain per-module reference, training, and argument checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from policies.cores import ThalNet, make_core
from policies.cores.thalnet import MIN_GAUSSIAN_WIDTH, READINGS

INPUT_SIZE, M, H, C, R = 6, 3, 10, 4, 5
S = M * C
T, B = 7, 3


def build(reading: str, seed: int = 0, **kwargs: Any) -> ThalNet:
    """A small ThalNet with ``reading``; three modules, so one module is neither input nor output."""
    torch.manual_seed(seed)
    return ThalNet(
        INPUT_SIZE, num_modules=M, module_size=H, center_size_per_module=C, read_size=R, reading=reading, **kwargs
    )


def sample(core: ThalNet, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Random inputs, a random entering state, and resets at t=2 (env 0) and t=4 (envs 1, 2)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, INPUT_SIZE, generator=generator)
    state = 0.5 * torch.randn(B, core.state_size, generator=generator)
    starts = torch.zeros(T, B, dtype=torch.bool)
    starts[2, 0] = True
    starts[4, 1:] = True
    return x, state, starts


def reference(core: ThalNet, x: Tensor, state: Tensor, starts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ThalNet written out module by module, step by step, from the documented equations.

    :return: outputs (T, B, H), final state (B, M*H), read weights (T, B, M, S) for the fast readings.
    """
    h = [state[:, m * H : (m + 1) * H] for m in range(M)]
    positions = torch.arange(S, dtype=x.dtype)
    outs, read_weights = [], []
    for t in range(x.shape[0]):
        h = [torch.where(starts[t].unsqueeze(1), torch.zeros_like(hm), hm) for hm in h]
        center = torch.cat([hm[:, :C] for hm in h], dim=1)  # first C features of every module, in order
        new_h, step_weights = [], []
        for m in range(M):
            if core.reading == "linear":
                context = center @ core.read_weight[m]
            elif core.reading == "weight_norm":
                direction = core.read_direction[m]
                context = center @ (core.read_gain[m] * direction / direction.norm(dim=0, keepdim=True))
            else:
                query = h[m] @ core.read_query_weight[m] + core.read_query_bias[m]
                if core.reading == "fast_softmax":
                    weights = torch.softmax(query.view(B, R, S), dim=-1)
                else:
                    mean = torch.sigmoid(query[:, :R]) * (S - 1)
                    width = F.softplus(query[:, R:]) + MIN_GAUSSIAN_WIDTH
                    weights = torch.exp(-0.5 * ((positions - mean.unsqueeze(-1)) / width.unsqueeze(-1)) ** 2)
                    weights = weights / weights.sum(dim=-1, keepdim=True)
                context = (weights * center.unsqueeze(1)).sum(dim=-1)
                step_weights.append(weights.mean(dim=1))
            preact = context @ core.ff_read_weight[m] + core.ff_bias[m]
            if m == 0:
                preact = preact + x[t] @ core.ff_input_weight
            ff = F.elu(preact)
            gi = ff @ core.gru_input_weight[m] + core.gru_input_bias[m]
            gh = h[m] @ core.gru_hidden_weight[m] + core.gru_hidden_bias[m]
            i_r, i_z, i_n = gi.chunk(3, dim=-1)
            h_r, h_z, h_n = gh.chunk(3, dim=-1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            new_h.append((1 - z) * n + z * h[m])
            if m == 0:  # the input module runs first: the others read its new center features
                center = torch.cat([new_h[0][:, :C], center[:, C:]], dim=1)
        h = new_h
        outs.append(h[-1])
        if step_weights:
            read_weights.append(torch.stack(step_weights, dim=1))
    weights_out = torch.stack(read_weights) if read_weights else torch.empty(0)
    return torch.stack(outs), torch.cat(h, dim=1), weights_out


@pytest.mark.parametrize("reading", READINGS)
def test_matches_per_module_reference(reading: str) -> None:
    core = build(reading).double()
    x, state, starts = sample(core)
    x, state = x.double(), state.double()
    with torch.no_grad():
        out, final, info = core(x, state, starts, return_info=True)
        ref_out, ref_final, ref_weights = reference(core, x, state, starts)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(final, ref_final, atol=1e-10, rtol=1e-10)
    # Documented state layout: module m's hidden state in columns [m*H, (m+1)*H); the output module is last.
    torch.testing.assert_close(final[:, (M - 1) * H :], out[-1])
    if reading.startswith("fast"):
        torch.testing.assert_close(info["read_weights"], ref_weights, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("reading", READINGS)
def test_read_weights_shape_and_meaning(reading: str) -> None:
    core = build(reading)
    x, state, starts = sample(core)
    with torch.no_grad():
        _, _, info = core(x, state, starts, return_info=True)
    weights = info["read_weights"]
    assert weights.shape == (T, B, M, S)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(T, B, M))
    if reading.startswith("fast"):
        # Computed from each module's own state: they change over time and across modules.
        assert not torch.allclose(weights[1], weights[2])
        assert not torch.allclose(weights[:, :, 0], weights[:, :, 1])
    else:
        # A fixed read matrix: the share of |W_m[s, :]| of each center position.
        share = core.linear_read_weight().detach().abs().sum(dim=2)
        expected = share / share.sum(dim=1, keepdim=True)
        torch.testing.assert_close(weights, expected.expand(T, B, M, S))


def test_weight_norm_reading_has_norm_equal_to_gain() -> None:
    core = build("weight_norm")
    with torch.no_grad():
        core.read_gain.uniform_(0.5, 2.0)
        core.read_direction.mul_(7.0)  # rescaling the direction must not change the read
    weight = core.linear_read_weight()
    torch.testing.assert_close(weight.norm(dim=1, keepdim=True), core.read_gain)


@pytest.mark.parametrize("reading", READINGS)
def test_sequence_equals_single_steps(reading: str) -> None:
    core = build(reading)
    x, state, starts = sample(core)
    with torch.no_grad():
        out, final = core(x, state, starts)
        step_state, step_outs = state, []
        for t in range(T):
            out_t, step_state = core(x[t : t + 1], step_state, starts[t : t + 1])
            step_outs.append(out_t)
    assert (torch.cat(step_outs) - out).abs().max().item() < 1e-5
    assert (step_state - final).abs().max().item() < 1e-5


@pytest.mark.parametrize("reading", READINGS)
def test_reading_parameters_get_gradients_and_adam_reduces_a_loss(reading: str) -> None:
    core = build(reading)
    x, _, starts = sample(core)
    target = torch.linspace(-0.5, 0.5, H)

    def loss_fn() -> Tensor:
        out, _ = core(x, core.initial_state(B), starts)
        return (out - target).pow(2).mean()

    loss = loss_fn()
    loss.backward()
    groups = core.parameter_groups()
    for param in groups["attention"]:
        assert param.grad is not None and torch.count_nonzero(param.grad) > 0
    if reading.startswith("fast"):
        # Every read parameter a module computes (each softmax logit; each Gaussian mean and width) is trained.
        per_output = core.read_query_weight.grad.abs().sum(dim=1)  # (M, parameters per module)
        assert (per_output > 0).all()
    first_loss = loss.item()
    optimizer = torch.optim.Adam(core.parameters(), lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    assert loss_fn().item() < 0.5 * first_loss


@pytest.mark.parametrize(
    ("reading", "attention_names"),
    [
        ("linear", {"read_weight"}),
        ("weight_norm", {"read_direction", "read_gain"}),
        ("fast_softmax", {"read_query_weight", "read_query_bias"}),
        ("fast_gaussian", {"read_query_weight", "read_query_bias"}),
    ],
)
def test_parameter_groups_split_reading_from_modules(reading: str, attention_names: set[str]) -> None:
    core = build(reading)
    groups = core.parameter_groups()
    names = {id(p): n for n, p in core.named_parameters()}
    assert {names[id(p)] for p in groups["attention"]} == attention_names
    grouped = [id(p) for group in groups.values() for p in group]
    assert sorted(grouped) == sorted(names)


def test_default_reading_and_sizes_through_make_core() -> None:
    core = make_core("thalnet", INPUT_SIZE)
    assert core.reading == "weight_norm"
    assert core.output_size == core.module_size
    assert core.state_size == core.num_modules * core.module_size


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_modules": 1}, "num_modules"),
        ({"num_modules": 0}, "num_modules"),
        ({"module_size": 0}, "module_size"),
        ({"center_size_per_module": 0}, "center_size_per_module"),
        ({"center_size_per_module": 20, "module_size": 10}, "center_size_per_module"),
        ({"read_size": 0}, "read_size"),
        ({"reading": "cosine"}, "reading"),
        ({"module_size": 2.5}, "module_size"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ThalNet(INPUT_SIZE, **kwargs)


def test_unknown_reading_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError) as excinfo:
        ThalNet(INPUT_SIZE, reading="cosine")
    for reading in READINGS:
        assert reading in str(excinfo.value)


def test_zero_input_size_raises() -> None:
    with pytest.raises(ValueError, match="input_size"):
        ThalNet(0)


@pytest.mark.parametrize("core", ["thalnet", "lstm"])
def test_checkpoints_of_another_core_revision_are_refused(tmp_path: Any, core: str) -> None:
    # ThalNet's step changed (revision 2: the input module first) with the same parameters: weights
    # trained by revision 1 must not load silently into the new computation. LSTM is still revision 1,
    # so its checkpoints written before revisions were recorded load as before.
    import train
    from agents.trainer import Trainer
    from policies import load_policy
    from policies.checkpoint import CheckpointError

    sizes = (["core.num_modules=2", "core.module_size=8", "core.center_size_per_module=4"] if core == "thalnet"
             else ["core.hidden_size=8"])
    run = tmp_path / "run"
    assert train.main([f"core.name={core}", *sizes, "total_frames=128", "env.n_envs=2", "algo.n_steps=64",
                       "algo.num_minibatches=1", "log.progress_bar=false", "--run-dir", str(run)]) == 0
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["policy"]["spec"]["core_revision"] == (2 if core == "thalnet" else 1)
    del checkpoint["policy"]["spec"]["core_revision"]  # as written before revisions were recorded
    torch.save(checkpoint, run / "checkpoint.pt")
    if core == "lstm":
        assert load_policy(run / "checkpoint.pt").model.spec["core"] == "lstm"
        return
    with pytest.raises(CheckpointError, match="thalnet core of revision 1"):
        load_policy(run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="revision 1"):
        Trainer.resume(run, {"total_frames": 256})
