"""Tests of the grid encoder's C kernel (policies/grid_kernel.c, built and loaded by policies/native.py).

GridEncoder's torch layers (``native=False``) are the reference: the kernel must compute the same
features and the same gradients for every parameter, up to float32 rounding, for every view size the
encoder takes (pooled or not, odd sizes, several spatial outputs), and the encoder must fall back to
the torch layers where the kernel does not apply.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gymnasium import spaces

from policies import native
from policies.encoders import GRID_VOCAB_PER_CHANNEL, GridEncoder, GridMissionEncoder
from policies.native import native_library


# Each test starts with the kernels enabled and not yet loaded (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_native_kernels")


def encoder_pair(view: int, embedding_dim: int = 8) -> tuple[GridEncoder, GridEncoder]:
    """A kernel encoder and an identical torch-layers copy; biases made non-zero so they are tested too."""
    encoder = GridEncoder(spaces.Box(0, 255, (view, view, 3), np.uint8), embedding_dim=embedding_dim)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference = copy.deepcopy(encoder)
    reference.native = False
    assert encoder.uses_kernel() and not reference.uses_kernel()
    return encoder, reference


def features_and_gradients(encoder: GridEncoder, obs: torch.Tensor, d_out: torch.Tensor) -> list[torch.Tensor]:
    encoder.zero_grad()
    out = encoder(obs)
    (out * d_out).sum().backward()
    return [out.detach()] + [p.grad.clone() for p in encoder.parameters()]


@pytest.mark.parametrize("view,embedding_dim", [(4, 8), (5, 8), (7, 8), (7, 3), (8, 8), (9, 8)])
def test_kernel_matches_the_torch_layers(view: int, embedding_dim: int) -> None:
    """Features and every parameter's gradient agree with the torch layers within float32 rounding:
    views without pooling (4, 5), MiniGrid's default 7 (pooled), an odd pooled grid (8: the first
    convolution's 7x7 pools to 3x3, dropping a row and a column) and a view with 2x2 outputs (9),
    whose flattening order (channel first) must match torch's Flatten."""
    encoder, reference = encoder_pair(view, embedding_dim)
    # Indices past the table's 16 rows per channel are clamped to the last row, as the torch path does.
    obs = torch.randint(0, 20, (37, view, view, 3), dtype=torch.uint8)
    d_out = torch.randn(37, encoder.output_size)
    got = features_and_gradients(encoder, obs, d_out)
    want = features_and_gradients(reference, obs, d_out)
    assert got[0].shape == (37, encoder.output_size)
    for name, g, w in zip(["features", *(n for n, _ in encoder.named_parameters())], got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max())), name
    assert "GridKernel" in type(encoder(obs).grad_fn).__name__


def test_a_strided_gradient_is_read_as_the_values_it_holds() -> None:
    """BabyAI's encoder concatenates the grid features with the mission's, so the grid encoder's
    backward gets a strided slice of the gradient (and ``out.sum()`` an expanded one): the kernel must
    read its values, not the memory of a copy freed before the C call (which once gave gradients off
    by 6-11%, or garbage)."""
    obs = {"image": torch.randint(0, 11, (24, 7, 7, 3), dtype=torch.uint8),
           "mission": torch.randint(0, 50, (24, 9))}
    space = spaces.Dict({"image": spaces.Box(0, 255, (7, 7, 3), np.uint8),
                         "mission": spaces.Box(0, 255, (9,), np.int64)})
    babyai = GridMissionEncoder(space)
    reference = copy.deepcopy(babyai)
    reference.grid.native = False
    assert babyai.grid.uses_kernel()
    grads = []
    for model in (babyai, reference):
        out = model(obs)
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        grads.append([p.grad.clone() for p in model.grid.parameters()])
    for g, w in zip(*grads):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))
    encoder, plain = encoder_pair(7)
    for model in (encoder, plain):
        model(obs["image"]).sum().backward()  # an expanded (stride 0) gradient of ones
    for g, w in zip(encoder.parameters(), plain.parameters()):
        assert torch.allclose(g.grad, w.grad, rtol=1e-4, atol=1e-5 * float(w.grad.abs().max()))


def test_observations_of_another_shape_are_refused() -> None:
    """A view the encoder was not built for is one clear error on both paths (the kernel would read past
    the buffer or return features of another size)."""
    encoder, reference = encoder_pair(7)
    for model in (encoder, reference):
        for shape in ((2, 7, 7, 1), (2, 7, 7, 4), (2, 5, 5, 3), (7, 7, 3)):
            with pytest.raises(ValueError, match=r"built for \(N, 7, 7, 3\) observations, got shape"):
                model(torch.zeros(shape, dtype=torch.uint8))


def test_double_backward_is_refused_not_wrong() -> None:
    """The kernel's gradients have no graph behind them: a second-order use (a gradient penalty) must
    raise, not quietly give zeros."""
    encoder, _ = encoder_pair(7)
    out = encoder(torch.randint(0, 11, (4, 7, 7, 3), dtype=torch.uint8))
    (grad,) = torch.autograd.grad(out.square().sum(), encoder.embedding.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.square().sum().backward()


def test_pool_ties_send_the_gradient_where_torch_does() -> None:
    """Identical neighbouring cells (walls, empty floor: most of a MiniGrid view) give exactly equal
    first-layer values under a pooling window; the gradient must go to the first of them, as torch's
    max_pool2d sends it, not be split or sent elsewhere."""
    encoder, reference = encoder_pair(7)
    obs = torch.full((4, 7, 7, 3), 2, dtype=torch.uint8)  # every cell a wall: every window ties
    obs[1:, 3, 3] = torch.tensor([5, 1, 0], dtype=torch.uint8)  # a key here and there breaks some ties
    obs[2, 0, :2] = 1
    d_out = torch.randn(4, encoder.output_size)
    for g, w in zip(features_and_gradients(encoder, obs, d_out), features_and_gradients(reference, obs, d_out)):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


def test_other_index_dtypes_are_read_like_the_torch_path() -> None:
    """int64 and float observations (a user's wrapper) and negative or huge indices are clamped to the
    table as the torch path clamps them, and neither path changes the caller's tensor."""
    encoder, reference = encoder_pair(7)
    obs = torch.randint(-3, 300, (5, 7, 7, 3))
    kept = obs.clone()
    for batch in (obs, obs.float()):
        with torch.no_grad():
            assert torch.allclose(encoder(batch), reference(batch), rtol=1e-4, atol=1e-5)
    assert torch.equal(obs, kept) and obs.max() > GRID_VOCAB_PER_CHANNEL and obs.min() < 0


def test_features_do_not_depend_on_the_batch() -> None:
    """Each observation is computed on its own: a rollout step (16 envs) and the update's replay of the
    same observations in a minibatch give the same bits, so the first update's log-probabilities
    replay exactly."""
    encoder, _ = encoder_pair(7)
    obs = torch.randint(0, 11, (256, 7, 7, 3), dtype=torch.uint8)
    with torch.no_grad():
        whole = encoder(obs)
        parts = torch.cat([encoder(obs[i:i + 16]) for i in range(0, 256, 16)])
        single = encoder(obs[100:101])
    assert torch.equal(whole, parts) and torch.equal(whole[100:101], single)
    assert encoder(obs[:0]).shape == (0, encoder.output_size)


def test_torch_layers_run_where_the_kernel_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """float64, ``native=False`` and ``MODULAR_MEMORY_NATIVE=0`` run the torch layers (their autograd
    graph, not the kernel's)."""
    obs = torch.randint(0, 11, (3, 7, 7, 3), dtype=torch.uint8)
    encoder, _ = encoder_pair(7)
    assert "GridKernel" in type(encoder(obs).grad_fn).__name__
    double = copy.deepcopy(encoder).double()
    assert not double.uses_kernel() and "GridKernel" not in type(double(obs).grad_fn).__name__
    assert double(obs).dtype == torch.float64
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native_library.cache_clear()
    assert not encoder.uses_kernel() and "GridKernel" not in type(encoder(obs).grad_fn).__name__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("fp32_on_cuda")
def test_cuda_encoder_runs_the_torch_layers() -> None:
    encoder, reference = encoder_pair(7)
    encoder = encoder.cuda()
    obs = torch.randint(0, 11, (3, 7, 7, 3), dtype=torch.uint8)
    assert not encoder.uses_kernel()
    with torch.no_grad():
        assert torch.allclose(encoder(obs.cuda()).cpu(), reference(obs), rtol=1e-4, atol=1e-5)
