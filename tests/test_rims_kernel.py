"""Tests of the RIMs/BRIMs C kernel (policies/cores/rims_kernel.c, built and loaded by policies/native.py).

The Python engine of RIMs (``native=False``) is the reference: where the kernel applies it must give the
same outputs, states, diagnostics and gradients, and where it does not (or cannot be built) RIMs must
quietly fall back to the Python engine.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from policies import native
from policies.cpu import cpu_model_and_flags
from policies.native import native_library
from policies.cores import rims as rims_module
from policies.cores.brims import BRIMs
from policies.cores.rims import RIMs
from tests.test_rims import IN
from tests.test_rims import small as rims_small


# Each test starts with the kernels enabled and not yet loaded (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_native_kernels")


def small(**kwargs: Any) -> RIMs:
    """test_rims.py's small RIMs (LSTM cells, one input head: the kernel applies), in training mode."""
    return rims_small(**kwargs).train()


def python_engine(core: RIMs) -> RIMs:
    """An identical copy of ``core`` that runs the Python engine (the reference)."""
    ref = copy.deepcopy(core)
    ref.native = False
    return ref


def episode(T: int, B: int, seed: int = 0) -> tuple[Tensor, Tensor, torch.Generator]:
    """Inputs, episode starts and a generator for more: starts for env 0 at t=0 (if B > 1), the last env
    halfway through (if T > 1), and a few more at random after t=0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, IN, generator=g)
    starts = torch.zeros(T, B, dtype=torch.bool)
    starts[1:] = torch.rand(T - 1, B, generator=g) < 0.05
    if B > 1:
        starts[0, 0] = True
    if T > 1:
        starts[T // 2, B - 1] = True
    return x, starts, g


def grad_fn_name(t: Tensor) -> str:
    """Name of the autograd node that made ``t`` (the kernel's is ``_KernelStackBackward``)."""
    return type(t.grad_fn).__name__


def run_with_grads(
    core: RIMs, x: Tensor, state0: Tensor, starts: Tensor, w_out: Tensor, w_state: Tensor
) -> tuple[Tensor, Tensor, dict[str, Tensor], list[Tensor], str]:
    """Output, final state, info, the gradients w.r.t. [x, state0, *parameters] of a loss weighting
    every output and the final state, and the name of the output's grad_fn."""
    x = x.clone().requires_grad_(True)
    state0 = state0.clone().requires_grad_(True)
    out, state, info = core(x, state0, starts, return_info=True)
    loss = (out * w_out).sum() + (state * w_state).sum()
    grads = torch.autograd.grad(loss, [x, state0, *core.parameters()])
    return out.detach(), state.detach(), info, list(grads), grad_fn_name(out)


@pytest.mark.parametrize(
    "T,B,kwargs",
    [
        (12, 4, dict(num_modules=6, module_size=32, k_active=4, input_key_size=64, num_comm_heads=4)),
        (
            10,
            3,
            dict(num_modules=5, module_size=7, k_active=5, input_key_size=4, input_value_size=9, comm_value_size=3),
        ),
        (8, 3, dict(num_modules=3, module_size=85, k_active=1, input_key_size=5, num_comm_heads=1, comm_key_size=16)),
        (1, 16, dict(num_modules=4, module_size=16, k_active=2, num_comm_heads=3, comm_key_size=5, comm_value_size=7)),
        (40, 2, dict(num_modules=4, module_size=8, k_active=2, input_key_size=3, comm_key_size=2, comm_value_size=2)),
        (15, 1, dict(num_modules=6, module_size=10, k_active=3, num_comm_heads=1, comm_key_size=9, comm_value_size=1)),
        # On AVX-512 hosts the products take rows in fours, 32 and 16 columns at a time: 9 envs leave rows
        # over, and widths of 48, 20 and 12 columns leave every kind of block and tail.
        (6, 9, dict(num_modules=5, module_size=12, k_active=3, input_key_size=20, num_comm_heads=2, comm_key_size=8,
                    comm_value_size=8)),
    ],
    ids=["K6-H32-k4", "K5-H7-all-active", "K3-H85-k1", "T1-B16", "T40-B2", "B1", "B9-row-groups"],
)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_kernel_matches_python_engine(T: int, B: int, kwargs: dict[str, Any], cell: str) -> None:
    """Training with the kernel is training the same model: outputs, final state, active sets, attention
    and every gradient (inputs, initial state, parameters) equal the Python engine's, resets included."""
    core = small(**kwargs, cell=cell)
    ref = python_engine(core)
    x, starts, g = episode(T, B)
    state0 = torch.randn(B, core.state_size, generator=g) * 0.5
    w_out = torch.randn(T, B, core.output_size, generator=g)
    w_state = torch.randn(B, core.state_size, generator=g)

    assert core.kernel_for(x) is not None and ref.kernel_for(x) is None
    out_k, state_k, info_k, grads_k, name_k = run_with_grads(core, x, state0, starts, w_out, w_state)
    out_r, state_r, info_r, grads_r, name_r = run_with_grads(ref, x, state0, starts, w_out, w_state)
    assert "Kernel" in name_k and "Kernel" not in name_r  # the kernel really ran, the reference did not

    assert (out_k - out_r).abs().max() <= 1e-5
    assert (state_k - state_r).abs().max() <= 1e-5
    assert torch.equal(info_k["active"], info_r["active"])
    assert info_k["input_attention"].shape == info_r["input_attention"].shape == (T, B, core.num_modules, 2)
    assert (info_k["input_attention"] - info_r["input_attention"]).abs().max() <= 1e-5
    if core.k_active < core.num_modules:  # the inactive-module paths were exercised
        assert not info_k["active"].all()

    names = ["x", "state0"] + [n for n, _ in core.named_parameters()]
    for name, gk, gr in zip(names, grads_k, grads_r, strict=True):
        scale = float(gr.abs().max())
        assert scale > 0, name  # every path carries a gradient in this setting
        assert (gk - gr).abs().max() <= 1e-5 * max(1.0, scale), name
    # An env reset at t=0 gets no gradient into its initial state.
    assert torch.equal(grads_k[1][starts[0]], torch.zeros_like(grads_k[1][starts[0]]))


@pytest.mark.parametrize(
    "T,B,layers,output",
    [
        (9, 3, [(5, 8, 3), (4, 6, 2)], "top"),  # layers of different widths
        (20, 2, [(6, 32, 4), (6, 32, 4)], "all"),  # the agents' BRIMs shape, every layer in the output
        (1, 16, [(4, 8, 2), (3, 5, 1), (5, 7, 5)], "top"),  # a middle layer with both slots; one all active
        (12, 1, [(6, 16, 3)], "top"),  # one layer: BRIMs is RIMs
    ],
    ids=["2-layers", "2-layers-all", "3-layers-T1", "1-layer-B1"],
)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_brims_kernel_matches_python_engine(
    T: int, B: int, layers: list[tuple[int, int, int]], output: str, cell: str
) -> None:
    """BRIMs trains through the same kernel: outputs, state, every layer's active sets and attention,
    and every gradient equal its Python engine's, resets included (bottom-up and top-down slots)."""
    specs = [{"num_modules": k, "module_size": h, "k_active": a} for k, h, a in layers]
    core = BRIMs(IN, layers=specs, output=output, cell=cell, input_key_size=12, num_comm_heads=2, comm_key_size=8,
                 comm_value_size=6).train()  # fmt: skip
    ref = copy.deepcopy(core)
    ref.native = False
    x, starts, g = episode(T, B)
    state0 = torch.randn(B, core.state_size, generator=g) * 0.5
    w_out = torch.randn(T, B, core.output_size, generator=g)
    w_state = torch.randn(B, core.state_size, generator=g)
    assert core.kernel_for(x) is not None and ref.kernel_for(x) is None
    out_k, state_k, info_k, grads_k, name_k = run_with_grads(core, x, state0, starts, w_out, w_state)  # type: ignore[arg-type]
    out_r, state_r, info_r, grads_r, name_r = run_with_grads(ref, x, state0, starts, w_out, w_state)  # type: ignore[arg-type]
    assert "Kernel" in name_k and "Kernel" not in name_r
    assert (out_k - out_r).abs().max() <= 1e-5 and (state_k - state_r).abs().max() <= 1e-5
    assert (
        info_k.keys()
        == info_r.keys()
        == {f"{key}_{li}" for key in ("active", "input_attention") for li in range(len(layers))}
    )
    for li, (k, _, _) in enumerate(layers):
        slots = 1 + (1 if len(layers) == 1 or li == len(layers) - 1 else 2)
        assert torch.equal(info_k[f"active_{li}"], info_r[f"active_{li}"])
        assert info_k[f"input_attention_{li}"].shape == (T, B, k, slots)
        assert (info_k[f"input_attention_{li}"] - info_r[f"input_attention_{li}"]).abs().max() <= 1e-5
    names = ["x", "state0"] + [n for n, _ in core.named_parameters()]
    for name, gk, gr in zip(names, grads_k, grads_r, strict=True):
        assert (gk - gr).abs().max() <= 1e-5 * max(1.0, float(gr.abs().max())), name


def _double(core: RIMs, x: Tensor) -> tuple[RIMs, Tensor]:
    return core.double(), x.double()


def _eval(core: RIMs, x: Tensor) -> tuple[RIMs, Tensor]:
    return core.eval(), x


@pytest.mark.parametrize(
    "kwargs,prepare,uses_kernel",
    [
        (dict(), None, True),
        (dict(cell="gru"), None, True),
        (dict(num_input_heads=2), None, False),
        (dict(), _double, False),
        (dict(dropout=0.3), None, False),
        (dict(dropout=0.3), _eval, True),
        (dict(fused_backward=False), None, False),
        (dict(native=False), None, False),
    ],
    ids=["lstm", "gru", "two-input-heads", "float64", "dropout-train", "dropout-eval", "autograd", "native-off"],
)
def test_kernel_used_exactly_where_it_applies(
    kwargs: dict[str, Any], prepare: Callable[[RIMs, Tensor], tuple[RIMs, Tensor]] | None, uses_kernel: bool
) -> None:
    """The kernel runs for LSTM or GRU cells, one input head, float32 on the CPU, the fused backward and no
    dropout while training; everywhere else RIMs still runs (forward and backward) through the Python engine."""
    core = small(**kwargs)
    x, starts, g = episode(T=6, B=3)
    if prepare is not None:
        core, x = prepare(core, x)
    assert (core.kernel_for(x) is not None) == uses_kernel
    x.requires_grad_(True)
    state0 = torch.randn(3, core.state_size, generator=g).to(x.dtype)
    out, state, info = core(x, state0, starts, return_info=True)
    assert ("Kernel" in grad_fn_name(out)) == uses_kernel
    assert out.shape == (6, 3, core.output_size) and out.dtype == x.dtype
    assert state.shape == (3, core.state_size) and torch.isfinite(out).all() and torch.isfinite(state).all()
    assert (info["active"].sum(-1) == core.k_active).all()
    (out.pow(2).sum() + state.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if not core.training:  # dropout is off in eval mode: the kernel computes the Python engine's function
        out_r, state_r = python_engine(core)(x.detach(), state0, starts)
        assert (out.detach() - out_r).abs().max() <= 1e-5 and (state.detach() - state_r).abs().max() <= 1e-5


def test_env_var_turns_the_kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """MODULAR_MEMORY_NATIVE=0 turns the kernel off, and RIMs still trains through the Python engine."""
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native_library.cache_clear()
    try:
        assert native_library() is None
        core = small()
        x, starts, g = episode(T=6, B=3)
        assert core.kernel_for(x) is None
        out, state = core(x, torch.randn(3, core.state_size, generator=g), starts)
        assert "Kernel" not in grad_fn_name(out)
        (out.pow(2).sum() + state.sum()).backward()
        for name, p in core.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    finally:
        native_library.cache_clear()


def test_failing_compiler_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A compiler that fails warns once (a RuntimeWarning naming the kernel, with the compiler's message),
    leaves no half-written library behind, and RIMs runs its Python engine."""
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'fake compiler: out of order' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no cached build to fall back on
    native_library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build the C kernels") as record:
            assert native_library() is None
        assert "out of order" in str(record[0].message)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: the result is remembered
            assert native_library() is None
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
        core = small()
        x, starts, _ = episode(T=4, B=2)
        assert core.kernel_for(x) is None
        out, state = core(x.requires_grad_(True), core.initial_state(2), starts)
        (out.sum() + state.sum()).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    finally:
        native_library.cache_clear()


def test_no_compiler_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without any C compiler the kernel is None (with a RuntimeWarning) and RIMs still runs."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # neither cc nor gcc to be found
    native_library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="C compiler"):
            assert native_library() is None
        core = small()
        x, starts, _ = episode(T=3, B=2)
        out, _ = core(x, core.initial_state(2), starts)
        assert torch.isfinite(out).all()
    finally:
        native_library.cache_clear()


def test_kernel_build_names_the_flags_actually_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A compiler that refuses -march=native gets the portable build, and kernel_build says so (runs record it)."""
    picky = tmp_path / "picky-cc"
    picky.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-march=native" ] && exit 1; done\nexec cc "$@"\n')
    picky.chmod(0o755)
    monkeypatch.setenv("CC", str(picky))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native_library.cache_clear()
    try:
        build = native.kernel_build()
        assert build["engine"] == "c-kernel"
        assert build["flags"] == " ".join(native.FLAGS) and native.NATIVE_FLAG not in build["flags"]
        assert build["compiler"]
        # The CPU's model, as a study's machine description names it (runs record it beside the flags).
        assert build["cpu"] == (cpu_model_and_flags()[0] or platform.processor() or platform.machine())
        monkeypatch.delenv("CC")  # the usual compiler builds the tuned kernel, under another name
        native_library.cache_clear()
        assert native.kernel_build()["flags"].endswith(native.NATIVE_FLAG)
        assert len(list((tmp_path / "cache" / "modular-memory-rl").glob("*.so"))) == 2
        monkeypatch.setenv(native.DISABLE_ENV, "0")
        native_library.cache_clear()
        assert native.kernel_build() == {"engine": "python", "reason": f"{native.DISABLE_ENV}=0"}
    finally:
        native_library.cache_clear()


def test_ties_after_reset_go_to_the_lowest_modules() -> None:
    """Right after a reset every module scores exactly 0: both engines activate modules 0..k_active-1."""
    core = small(num_modules=4, k_active=2)
    ref = python_engine(core)
    x, _, g = episode(T=6, B=5)
    x = x * 3.0
    state0 = torch.randn(5, core.state_size, generator=g)  # would decide the choice if it were not reset
    starts = torch.zeros(6, 5, dtype=torch.bool)
    starts[0] = True
    starts[3, 1] = True
    starts[4, ::2] = True
    assert core.kernel_for(x) is not None
    expected = torch.tensor([True, True, False, False]).expand(int(starts.sum()), 4)
    for c in (core, ref):
        _, _, info = c(x, state0.clone(), starts, return_info=True)
        assert torch.equal(info["active"][starts], expected)
        assert torch.equal(info["input_attention"][starts], torch.full((int(starts.sum()), 4, 2), 0.5))
        assert not torch.equal(info["active"][~starts], expected[:1].expand(int((~starts).sum()), 4))


def test_second_load_reuses_the_cached_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The kernel is built once into $XDG_CACHE_HOME/modular-memory-rl/ and later loads reuse that file."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native_library.cache_clear()
    try:
        assert native_library() is not None
        folder = tmp_path / "modular-memory-rl"
        built = sorted(folder.glob("*.so"))
        assert len(built) == 1 and sorted(folder.iterdir()) == built  # and no leftover temporary file
        mtime = built[0].stat().st_mtime_ns

        def no_build(*args: Any) -> None:
            raise AssertionError("the kernel was rebuilt although a cached build exists")

        monkeypatch.setattr(native, "_build", no_build)
        native_library.cache_clear()
        lib = native_library()
        assert lib is not None and Path(lib._name) == built[0]
        assert built[0].stat().st_mtime_ns == mtime and sorted(folder.glob("*.so")) == built
        core = small()
        x, starts, _ = episode(T=3, B=2)
        out, _ = core(x, core.initial_state(2), starts)  # the reloaded library runs
        assert "Kernel" in grad_fn_name(out)
    finally:
        native_library.cache_clear()


def test_builds_unused_for_a_month_are_deleted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each edit or upgrade leaves a build behind in the cache: loading the kernel deletes the ones no
    process has loaded for 30 days, keeps recent ones, and marks an old build it loads as used."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native_library.cache_clear()
    try:
        assert native_library() is not None
        folder = tmp_path / "modular-memory-rl"
        (current,) = folder.glob("*.so")
        stale, recent = folder / f"{native.BUILD_PREFIX}x-stale.so", folder / f"{native.BUILD_PREFIX}x-recent.so"
        old_name, other = folder / "rims_kernel-x-stale.so", folder / "a.so"  # a build from before the rename
        month_ago = time.time() - native.STALE_SECONDS - 3600
        for path, when in ((stale, month_ago), (recent, time.time() - 3600), (other, month_ago), (current, month_ago),
                           (old_name, month_ago)):
            path.touch(exist_ok=True)
            os.utime(path, (when, when))
        native_library.cache_clear()
        assert native_library() is not None
        assert sorted(folder.iterdir()) == sorted([current, recent, other])  # only the stale builds went
        assert time.time() - current.stat().st_mtime < 60  # the loaded build counts as used again
    finally:
        native_library.cache_clear()


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_forward_matches_training_forward(mode: Callable[[], Any]) -> None:
    """Rollouts (no autograd) and training replays see the same outputs, states and active sets."""
    core = small()
    x, starts, g = episode(T=9, B=3)
    state0 = torch.randn(3, core.state_size, generator=g)
    out, state, info = core(x, state0.clone(), starts, return_info=True)
    assert "Kernel" in grad_fn_name(out)
    with mode():
        out_ng, state_ng, info_ng = core(x, state0.clone(), starts, return_info=True)
    assert torch.equal(out.detach(), out_ng) and torch.equal(state.detach(), state_ng)
    assert torch.equal(info["active"], info_ng["active"])
    assert torch.equal(info["input_attention"], info_ng["input_attention"])


def test_single_steps_equal_the_sequence() -> None:
    """Stepping one step at a time (rollouts) gives the sequence's outputs and final state (replays)."""
    core = small()
    x, starts, g = episode(T=8, B=3)
    state0 = torch.randn(3, core.state_size, generator=g)
    out, state = core(x, state0.clone(), starts)
    s, outs = state0.clone(), []
    with torch.no_grad():
        for t in range(8):
            o, s = core(x[t : t + 1], s, starts[t : t + 1])
            outs.append(o[0])
    assert (torch.stack(outs) - out).abs().max() <= 1e-5 and (s - state).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_modules=5, module_size=12, k_active=3, input_key_size=20, num_comm_heads=2, comm_key_size=8,
             comm_value_size=8),
        # Widths that are not multiples of 8 (the products' scalar tail columns) over reductions of 7 and 21.
        dict(num_modules=6, module_size=7, k_active=4, input_key_size=5, num_comm_heads=3, comm_key_size=3,
             comm_value_size=7),
    ],
    ids=["vector-blocks", "scalar-tails"],
)
def test_an_envs_results_do_not_depend_on_the_envs_beside_it(kwargs: dict[str, Any]) -> None:
    """Each env's outputs, final state and initial-state gradient are the same to the bit whether it runs
    alone or in a batch, where its rows go through the products in pairs or (on AVX-512 hosts) fours:
    every output is the same chain of multiply-adds in any of them. A rollout (16 envs, one step)
    and the update's replay of the same steps (other envs beside it) rely on it: the first update's
    log-probability error stays 0.

    The x slot's keys and values are one torch product over all (T, B) rows before the kernel, and
    torch's BLAS need not round a row alike in products of other row counts (MKL on an AMD Zen 3 host
    does not), so the inputs and that product's weights are small dyadic numbers whose products and sums
    are exact: the test is of the kernel. On that host GCC's Zen tuning had split some of the kernel's
    contracted multiply-adds in two (a lone row's, an 8-column block's) and not others; they are written as
    explicit FMAs now."""
    core = small(**kwargs)
    x, starts, g = episode(T=6, B=9)
    x = torch.randint(-8, 9, x.shape, generator=g) / 4
    with torch.no_grad():
        for weight in core.layers[0].slot_key_value:
            weight.copy_(torch.randint(-32, 33, weight.shape, generator=g) / 64)
    assert core.kernel_for(x) is not None
    state0 = torch.randn(9, core.state_size, generator=g) * 0.5
    w_out = torch.randn(6, 9, core.output_size, generator=g)

    def run(b: slice) -> tuple[Tensor, Tensor, Tensor]:
        s0 = state0[b].clone().requires_grad_(True)
        out, state = core(x[:, b], s0, starts[:, b])
        (d_state0,) = torch.autograd.grad((out * w_out[:, b]).sum(), [s0])
        return out.detach(), state.detach(), d_state0

    out, state, d_state0 = run(slice(None))
    for b in range(9):
        out_b, state_b, d_state0_b = run(slice(b, b + 1))
        assert torch.equal(out_b[:, 0], out[:, b]) and torch.equal(state_b[0], state[b]), b
        assert torch.equal(d_state0_b[0], d_state0[b]), b


def test_avx512_products_give_the_bits_of_the_portable_ones(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """On an AVX-512 host the kernel's products take rows in fours, 16 columns to a register; a build
    without AVX-512 (``-mno-avx512f``, its AVX2 pairs path) must give the same bits, outputs, final
    state and every gradient, for RIMs and BRIMs: results made on either kind of host do not depend on
    which path ran (checked on widths with every kind of block and tail, and with 9 envs, rows over)."""
    # The compiler native.py would use, so that the two builds differ in -mno-avx512f only.
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    from agents.study import machine_description  # the vector instructions a study's provenance records

    if machine_description()["vector"] != "AVX-512":
        pytest.skip("this CPU has no AVX-512: both builds would take the same path")
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    cores = [small(num_modules=5, module_size=12, k_active=3, input_key_size=20, num_comm_heads=2, comm_key_size=8,
                   comm_value_size=8),
             small(num_modules=6, module_size=32, k_active=4, input_key_size=64, num_comm_heads=4, cell="gru"),
             small(num_modules=6, module_size=7, k_active=4, input_key_size=5, num_comm_heads=3, comm_key_size=3,
                   comm_value_size=7),
             BRIMs(IN, layers=[{"num_modules": 6, "module_size": 32, "k_active": 4},
                          {"num_modules": 6, "module_size": 16, "k_active": 3}]).train()]
    # T x B = 54 < 64: the kernel keeps all 9 envs on one thread (rims._kernel_threads), so the rows go in
    # fours and one is left over.
    x, starts, g = episode(T=6, B=9)
    inputs = [(torch.randn(9, core.state_size, generator=g) * 0.5, torch.randn(6, 9, core.output_size, generator=g),
               torch.randn(9, core.state_size, generator=g)) for core in cores]

    def results() -> list[tuple[Tensor, Tensor, dict[str, Tensor], list[Tensor], str]]:
        return [run_with_grads(core, x, state0, starts, w_out, w_state)
                for core, (state0, w_out, w_state) in zip(cores, inputs, strict=True)]

    wide = results()
    wide_build = native.kernel_build()
    if "-march=native" not in wide_build.get("flags", ""):
        pytest.skip("the compiler refused -march=native: the kernel was built without AVX-512 already")
    monkeypatch.setenv("CC", f"{compiler} -mno-avx512f")  # explicit -mno-* options outrank -march=native's
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native_library.cache_clear()
    narrow = results()
    assert native.kernel_build()["engine"] == "c-kernel" and wide_build["engine"] == "c-kernel"
    assert list(tmp_path.glob("modular-memory-rl/kernels-*.so")), "the second build was not made"
    for (out_w, state_w, _, grads_w, name_w), (out_n, state_n, _, grads_n, name_n) in zip(wide, narrow, strict=True):
        assert "Kernel" in name_w and "Kernel" in name_n
        assert torch.equal(out_w, out_n) and torch.equal(state_w, state_n)
        for grad_w, grad_n in zip(grads_w, grads_n, strict=True):
            assert torch.equal(grad_w, grad_n)


@pytest.mark.parametrize("B", [1, 3])
def test_kernel_leaves_its_inputs_untouched(B: int) -> None:
    """A rollout stores the state entering a step after calling the core: the call must not change it
    (nor x, nor a gradient passed in)."""
    core = small()
    x, starts, g = episode(T=4, B=B)
    state0 = torch.randn(B, core.state_size, generator=g).requires_grad_(True)
    x_before, state_before = x.clone(), state0.detach().clone()
    out, state = core(x, state0, starts)
    assert "Kernel" in grad_fn_name(out)
    assert torch.equal(state0.detach(), state_before) and torch.equal(x, x_before)
    grad_state = torch.randn(B, core.state_size, generator=g)
    grad_before = grad_state.clone()
    torch.autograd.grad([out, state], [state0], [torch.ones_like(out), grad_state])
    assert torch.equal(grad_state, grad_before)
    with torch.no_grad():
        state_ng = state0.detach().clone()
        core(x, state_ng, starts)
    assert torch.equal(state_ng, state_before)


def test_saturated_attention_selects_the_same_modules() -> None:
    """With large inputs the null attention saturates; both engines must still pick the same modules: the two
    best scores (modules 0 and 3), though modules 1-3 all round to a null attention of exactly 1."""
    core = RIMs(1, num_modules=4, module_size=2, k_active=2, input_key_size=1, num_comm_heads=1, comm_key_size=1)
    with torch.no_grad():
        # h = 1 everywhere and key = x = 1: module k's score is 2 * query[k] = [5, -40, -30, -20].
        core.layers[0].query.copy_(torch.tensor([5.0, -40.0, -30.0, -20.0]).view(4, 1, 1).expand(4, 2, 1) / 2)
        core.layers[0].slot_key_value[0].copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    state = torch.zeros(1, core.state_size)
    state[0, :8] = 1.0
    x, starts = torch.ones(1, 1, 1), torch.zeros(1, 1, dtype=torch.bool)
    assert core.kernel_for(x) is not None
    with torch.no_grad():
        _, _, info_k = core(x, state.clone(), starts, return_info=True)
        _, _, info_r = python_engine(core)(x, state.clone(), starts, return_info=True)
    assert torch.equal(info_k["input_attention"][0, 0, 1:, 0], torch.ones(3))  # saturated: a tie by the null
    assert torch.equal(info_k["active"], info_r["active"])
    assert torch.equal(info_k["active"][0, 0], torch.tensor([True, False, False, True]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_a_state_of_another_dtype_runs_the_python_engine(dtype: torch.dtype) -> None:
    """The kernel reads float32 only: a state of another dtype must not reach it (it would read past the
    buffer). It goes to the Python engine, which refuses the mix as torch does; a float32 state with the
    same values runs the kernel and equals the Python engine."""
    core = small().eval()
    x, starts, g = episode(T=5, B=3)
    state = (torch.randn(3, core.state_size, generator=g) * 0.5).to(dtype)
    assert core.kernel_for(x) is not None and core.kernel_for(x, state) is None
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="dtype"):
            python_engine(core)(x, state, starts)
        with pytest.raises(RuntimeError, match="dtype"):
            core(x, state, starts)
        same = state.float()
        assert core.kernel_for(x, same) is not None
        out, new_state = core(x, same, starts)
        expected = python_engine(core)(x, same, starts)
    torch.testing.assert_close((out, new_state), expected[:2], rtol=1e-5, atol=1e-6)


def test_cpu_autocast_runs_the_python_engine() -> None:
    """Under CPU autocast the keys and drives arrive in bfloat16, which the kernel cannot read."""
    core = small().eval()
    x, starts, _ = episode(T=5, B=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert core.kernel_for(x) is None
        out, _ = core(x, core.initial_state(3), starts)
    assert torch.isfinite(out).all()


def test_gradients_do_not_depend_on_the_default_dtype() -> None:
    """The backward allocates float32 explicitly: a float64 default dtype must not change the gradients."""
    core = small()
    x, starts, _ = episode(T=6, B=2)

    def grad_x() -> Tensor:
        xx = x.clone().requires_grad_(True)
        out, state = core(xx, torch.zeros(2, core.state_size, dtype=torch.float32), starts)
        assert "Kernel" in grad_fn_name(out)
        (out.square().sum() + state.sum()).backward()
        assert xx.grad is not None
        return xx.grad

    expected = grad_x()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert torch.equal(grad_x(), expected)
    finally:
        torch.set_default_dtype(previous)


def test_pointer_refuses_what_the_kernel_cannot_read() -> None:
    """Every address handed to C is checked (not an assert, which ``python -O`` would strip)."""
    with pytest.raises(ValueError, match="float32"):
        native.pointer(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        native.pointer(torch.zeros(3, 4).t())
    assert native.pointer(torch.zeros(3, dtype=torch.uint8), torch.uint8) > 0


def test_buffer_pool_keeps_only_recent_sizes() -> None:
    """Training with ever-changing sequence lengths must not pile up pooled memory."""
    from policies.cores.rims import _POOL

    _POOL.clear()
    core = small()
    for T in range(2, 14):
        x, starts, _ = episode(T=T, B=2)
        out, _ = core(x.requires_grad_(True), core.initial_state(2), starts)
        out.sum().backward()
    assert len(_POOL.free) <= _POOL.keep_sizes
    assert all(len(buffers) <= _POOL.keep_per_size for buffers in _POOL.free.values())


def test_compiler_command_with_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``CC`` may be a command with arguments (``ccache gcc``, ``gcc -m64``), as build systems set it."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("CC", f"env {compiler}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native_library.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native_library() is not None


@pytest.mark.parametrize("stack", ["rims", "brims"])
def test_saved_buffers_return_to_the_pool_without_the_garbage_collector(stack: str) -> None:
    """Once a training step's graph is gone its pooled buffers are reused at once: nothing may tie them
    into a reference cycle (which would hold tens of MB per step until a garbage collection)."""
    from policies.cores.rims import _POOL

    core = small() if stack == "rims" else BRIMs(IN, layers=[{"num_modules": 4, "module_size": 6, "k_active": 2}] * 2)
    x, starts, _ = episode(T=6, B=2)
    gc.disable()
    try:
        _POOL.clear()
        for _ in range(3):
            out, state = core(x.clone().requires_grad_(True), core.initial_state(2), starts)
            (out.sum() + state.sum()).backward()
            del out, state
        assert len(_POOL.free) == 2 and all(len(buffers) == 1 for buffers in _POOL.free.values())
    finally:
        gc.enable()


def test_splitting_the_envs_among_threads_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel gives each of its threads a share of the envs: results must be those of one thread (an
    odd batch, so the shares differ in size), the same active sets, and values equal (checked up to the
    last bit of rounding here; test_an_envs_results_do_not_depend_on_the_envs_beside_it checks the
    outputs to the bit). Only the kernel's thread count varies here."""
    from policies.cores import rims

    core = BRIMs(IN, layers=[{"num_modules": 4, "module_size": 6, "k_active": 2}] * 2).train()
    x, starts, g = episode(T=20, B=5)
    state0 = torch.randn(5, core.state_size, generator=g) * 0.5
    w_out = torch.randn(20, 5, core.output_size, generator=g)
    w_state = torch.randn(5, core.state_size, generator=g)
    assert rims._kernel_threads(20, 5) >= 1
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(rims, "_kernel_threads", lambda T, B, n=threads: n)
        results.append(run_with_grads(core, x, state0, starts, w_out, w_state))  # type: ignore[arg-type]
    (out1, state1, info1, grads1, _), (out3, state3, info3, grads3, _) = results
    assert (out1 - out3).abs().max() <= 1e-6 and (state1 - state3).abs().max() <= 1e-6
    assert all(torch.equal(info1[key], info3[key]) for key in info1 if key.startswith("active"))
    for a, b in zip(grads1, grads3, strict=True):
        assert (a - b).abs().max() <= 1e-6 * max(1.0, float(b.abs().max()))


def test_precomputed_drives_are_the_python_engines_choice() -> None:
    """The kernel applies W_ih to the attended value itself (active modules only), so a layer that
    precomputes its drives for the Python engine (RIMs' layer, or here an upper BRIMs layer, which the
    Python engine can only run forward) still runs in the kernel, with the Python engine's result."""
    core = BRIMs(IN, layers=[{"num_modules": 4, "module_size": 6, "k_active": 2}] * 2).eval()
    core.layers[1].precomputed_drives = True  # type: ignore[union-attr]
    x, starts, g = episode(T=5, B=3)
    assert core.kernel_for(x) is not None
    state0 = torch.randn(3, core.state_size, generator=g) * 0.5
    with torch.no_grad():
        out_k, state_k = core(x, state0, starts)
        out_r, state_r = python_engine(core)(x, state0, starts)
    assert (out_k - out_r).abs().max() <= 1e-5 and (state_k - state_r).abs().max() <= 1e-5


def test_wiring_the_kernel_does_not_know_is_refused() -> None:
    """A layer whose slots are not the RIMs/BRIMs wiring (here the top layer reading a second slot) is
    not handed to the kernel."""
    core = BRIMs(IN, layers=[{"num_modules": 4, "module_size": 6, "k_active": 2}] * 2)
    x, _, _ = episode(T=5, B=3)
    assert core.kernel_for(x) is not None
    core.layers[1].slot_sizes = (*core.layers[1].slot_sizes, 24)  # type: ignore[union-attr]
    assert core.kernel_for(x) is None


def test_the_kernel_itself_refuses_a_wiring_it_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should Python's check ever let an unknown wiring through, the kernel refuses it (a clear error)
    instead of reading buffers that are not there."""
    core = BRIMs(IN, layers=[{"num_modules": 4, "module_size": 6, "k_active": 2}] * 2).eval()
    core.layers[1].slot_sizes = (*core.layers[1].slot_sizes, 24)  # type: ignore[union-attr]
    monkeypatch.setattr(rims_module, "_stack_wiring", lambda layers: True)
    x, starts, _ = episode(T=5, B=3)
    with torch.no_grad(), pytest.raises(ValueError, match="wiring"):
        core(x, core.initial_state(3), starts)


@pytest.mark.parametrize("native_engine", [True, False], ids=["kernel", "python-engine"])
def test_backward_after_an_in_place_weight_change_is_refused(native_engine: bool) -> None:
    """Like autograd's own ops: a weight changed in place between forward and backward (an optimizer
    step too early) raises instead of mixing old activations with new weights."""
    core = small()
    core.native = native_engine
    x, starts, _ = episode(T=4, B=2)
    out, _ = core(x, core.initial_state(2), starts)
    assert ("Kernel" in grad_fn_name(out)) == native_engine
    with torch.no_grad():
        core.layers[0].comm_qkv.add_(0.1)  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()


def test_communication_dropout_alone_keeps_training_on_the_python_engine() -> None:
    """The kernel has no attention dropout: a layer with only communication dropout must not lose it."""
    core = small()
    for layer in core.layers:
        layer.comm_attention_dropout = 0.5  # type: ignore[union-attr]
    x, _, _ = episode(T=4, B=2)
    assert core.kernel_for(x) is None
    assert core.eval().kernel_for(x) is not None


def test_editing_the_returned_attention_does_not_change_gradients() -> None:
    """info is the caller's: writing into it must not reach the backward, which reads the same probabilities."""
    core = BRIMs(IN, layers=[{"num_modules": 4, "module_size": 6, "k_active": 2}] * 2).train()
    x, starts, _ = episode(T=6, B=2)

    def grad_x(edit: bool) -> Tensor:
        xx = x.clone().requires_grad_(True)
        out, _, info = core(xx, core.initial_state(2), starts, return_info=True)
        if edit:
            info["input_attention_0"].zero_()
        out.square().sum().backward()
        assert xx.grad is not None
        return xx.grad

    assert torch.equal(grad_x(False), grad_x(True))


def test_saturated_null_attention_still_ranks_modules_by_their_scores() -> None:
    """BRIMs' bottom layer with slot scores of -20, -30, -18, -25, -40 for modules 0-4 (both slots): the
    null attention rounds to exactly 1 for every module, yet modules 2 and 0 score best and must be the
    active ones, in both engines (ranking by the null probability would tie and pick modules 0 and 1)."""
    K, H = 5, 4
    core = BRIMs(IN, layers=[{"num_modules": K, "module_size": H, "k_active": 2}] * 2, input_key_size=1).eval()
    scores = torch.tensor([-20.0, -30.0, -18.0, -25.0, -40.0])
    bottom = core.layers[0]
    with torch.no_grad():
        bottom.query.copy_((scores / H).view(K, 1, 1).expand(K, H, 1))  # q_k = score_k when h = 1
        for s, width in enumerate(bottom.slot_sizes):  # every slot's key is 1 when its input is all ones
            bottom.slot_key_value[s].zero_()
            bottom.slot_key_value[s][:, 0] = 1.0 / width
    state = torch.zeros(1, core.state_size)
    state[0, : K * H] = 1.0  # bottom layer's h
    state[0, 2 * K * H : 3 * K * H] = 1.0  # top layer's h (the top-down slot's input)
    x, starts = torch.ones(1, 1, IN), torch.zeros(1, 1, dtype=torch.bool)
    reference = copy.deepcopy(core)
    reference.native = False
    expected = torch.tensor([True, False, True, False, False])
    with torch.no_grad():
        for engine in (core, reference):
            _, _, info = engine(x, state, starts, return_info=True)
            assert torch.equal(info["input_attention_0"][0, 0, :, 0], torch.ones(K))  # saturated
            assert torch.equal(info["active_0"][0, 0], expected)


# -- set-up kept between rollout steps (frozen_parameters) -----------------------------------------------


def _brims_small() -> BRIMs:
    return BRIMs(IN, layers=[{"num_modules": 5, "module_size": 8, "k_active": 3},
                             {"num_modules": 4, "module_size": 6, "k_active": 2}], output="all",
                 input_key_size=12, num_comm_heads=2, comm_key_size=8, comm_value_size=6)  # fmt: skip


def _inference_call(core: RIMs, x: Tensor, state: Tensor, starts: Tensor, frozen: bool) -> tuple[Tensor, ...]:
    """``core``'s no-autograd call as a rollout step makes it, inside ``frozen_parameters`` or not."""
    from policies.cores import frozen_parameters

    with torch.inference_mode(), frozen_parameters() if frozen else contextlib.nullcontext():
        out, new_state, info = core(x, state, starts, return_info=True)
    return (out, new_state, *(info[key] for key in sorted(info)))


@pytest.mark.parametrize("make", [small, _brims_small], ids=["rims", "brims"])
def test_frozen_parameter_calls_equal_fresh_ones_and_notice_a_weight_change(make: Callable[[], RIMs]) -> None:
    """Inside frozen_parameters a no-autograd call reuses the weights prepared and the kernel set up by the
    calls before it: results are bit for bit a fresh call's, for every shape in turn (a rollout step, a
    time-limit bootstrap's few envs, a longer sequence, then the rollout step again), caller-owned (the
    next call does not overwrite them), and an optimizer step or load_state_dict between calls is seen."""
    core = make().eval()
    g = torch.Generator().manual_seed(3)
    kept: list[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = []
    for T, B in [(1, 16), (1, 16), (1, 2), (5, 16), (1, 3), (1, 16)]:
        x = torch.randn(T, B, IN, generator=g)
        state = 0.5 * torch.randn(B, core.state_size, generator=g)
        starts = torch.rand(T, B, generator=g) < 0.3
        fresh = _inference_call(core, x, state, starts, frozen=False)
        reused = _inference_call(core, x, state, starts, frozen=True)
        assert len(fresh) == len(reused) and all(torch.equal(a, b) for a, b in zip(fresh, reused))
        kept.append((fresh, reused))
    for fresh, reused in kept:  # later calls did not write into earlier results
        assert all(torch.equal(a, b) for a, b in zip(fresh, reused))
    # One plan served all those calls, and it keeps the three most recent shapes.
    plan = rims_module._PLANS[core].plan
    assert list(plan.calls) == [(5, 16), (1, 3), (1, 16)]
    x, starts = torch.randn(1, 16, IN, generator=g), torch.zeros(1, 16, dtype=torch.bool)
    state = 0.5 * torch.randn(16, core.state_size, generator=g)
    before = _inference_call(core, x, state, starts, frozen=True)
    optimizer = torch.optim.SGD(core.parameters(), lr=0.5)
    core(x, state, starts)[0].square().sum().backward()
    optimizer.step()  # in place: the parameters' version counters move
    after = _inference_call(core, x, state, starts, frozen=True)
    assert not torch.equal(before[0], after[0]) and rims_module._PLANS[core].plan is not plan
    assert all(torch.equal(a, b) for a, b in zip(after, _inference_call(core, x, state, starts, frozen=False)))
    core.load_state_dict(make().state_dict())  # another core's weights, copied in place
    loaded = _inference_call(core, x, state, starts, frozen=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded, _inference_call(core, x, state, starts, frozen=False)))


def test_frozen_parameters_leave_training_and_inference_made_weights_alone() -> None:
    """With autograd on, frozen_parameters changes nothing (the kernel's training path runs); a core whose
    parameters were made under inference_mode (no version counter) is never planned; each thread gets its
    own plan (the kernel releases the GIL: two threads must not share buffers)."""
    import threading

    from policies.cores import frozen_parameters

    core = small()
    x, starts, g = episode(T=4, B=3)
    state = torch.randn(3, core.state_size, generator=g)
    with frozen_parameters():
        out, _ = core(x, state, starts)
    assert "Kernel" in grad_fn_name(out) and core not in rims_module._PLANS
    with torch.inference_mode():
        made_in_inference = small()
        assert made_in_inference.kernel_for(x) is not None
        fresh = made_in_inference(x, state, starts)
        with frozen_parameters():
            reused = made_in_inference(x, state, starts)
    assert torch.equal(fresh[0], reused[0]) and made_in_inference not in rims_module._PLANS
    results: dict[str, tuple[Tensor, object]] = {}

    def step(name: str) -> None:
        out = _inference_call(core, x, state, starts, frozen=True)[0]
        results[name] = (out, rims_module._PLANS[core].plan)  # held here: no two can share an id

    threads = [threading.Thread(target=step, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    step("main")
    assert len({id(plan) for _, plan in results.values()}) == 3
    assert all(torch.equal(out, results["main"][0]) for out, _ in results.values())


def test_a_plan_made_in_inference_mode_serves_a_no_grad_call() -> None:
    """A rollout's plan is made under inference_mode; a later call of the same shape under plain no_grad
    (a notebook's, a test's) reuses it: its buffers must be ordinary tensors it may write."""
    from policies.cores import frozen_parameters

    core = small().eval()
    x, starts, g = episode(T=1, B=4)
    state = torch.randn(4, core.state_size, generator=g)
    in_inference = _inference_call(core, x, state, starts, frozen=True)
    plan = rims_module._PLANS[core].plan
    with torch.no_grad(), frozen_parameters():
        out, new_state = core(x, state, starts)
    assert rims_module._PLANS[core].plan is plan
    assert torch.equal(out, in_inference[0]) and torch.equal(new_state, in_inference[1])
