"""Observation encoders: their initialisation keeps the observation visible to the core."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch import nn

from policies.encoders import GridEncoder, MLPEncoder, NatureCNN, make_encoder

GRID = spaces.Box(0, 10, (7, 7, 3), np.uint8)
PIXELS = spaces.Box(0, 255, (4, 84, 84), np.uint8)
VECTOR = spaces.Box(-1.0, 1.0, (12,), np.float32)


@pytest.mark.parametrize("space", [GRID, PIXELS, VECTOR], ids=["grid", "pixels", "vector"])
def test_conv_and_linear_layers_are_orthogonal_with_gain_sqrt2_and_zero_bias(space: spaces.Box) -> None:
    torch.manual_seed(0)
    encoder = make_encoder(space)
    layers = [m for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers, "the encoder has no conv or linear layer to check"
    for layer in layers:
        w = layer.weight.detach().flatten(1)
        rows, cols = w.shape
        gram = w @ w.T if rows <= cols else w.T @ w  # the smaller side is orthonormal (times gain^2)
        assert torch.allclose(gram, 2.0 * torch.eye(min(rows, cols)), atol=1e-4), layer
        assert layer.bias is not None and torch.count_nonzero(layer.bias) == 0


def test_grid_features_vary_with_the_observation_at_initialisation() -> None:
    # With PyTorch's default conv init the features came out ~0.05 with a spread of ~0.01 over
    # observations: the core and heads started nearly blind. Orthogonal sqrt(2) keeps them O(0.1-1).
    rng = np.random.default_rng(0)
    obs = torch.as_tensor(np.stack([rng.integers(0, 11, (7, 7, 3)) for _ in range(64)]).astype(np.uint8))
    torch.manual_seed(0)
    features = GridEncoder(GRID)(obs)
    assert features.abs().mean() > 0.2
    assert features.std(0).mean() > 0.1


def test_grid_encoder_is_the_embedding_then_the_cnn_and_takes_an_empty_batch() -> None:
    """The torch path (the C kernel's reference, tests/test_grid_kernel.py) looks its embeddings up with
    index_select (a faster backward than nn.Embedding's): the same features and gradients as the
    module call, and an empty batch still has its shape."""
    torch.manual_seed(0)
    encoder = GridEncoder(GRID, native=False)
    obs = torch.randint(0, 11, (32, 7, 7, 3), dtype=torch.uint8)
    idx = obs.long() + encoder.channel_offsets
    reference = encoder.cnn(encoder.embedding(idx).flatten(3).permute(0, 3, 1, 2))
    (reference ** 2).sum().backward()
    expected = encoder.embedding.weight.grad.clone()
    encoder.zero_grad()
    features = encoder(obs)
    (features ** 2).sum().backward()
    assert torch.equal(features, reference) and torch.allclose(encoder.embedding.weight.grad, expected, atol=1e-6)
    assert encoder(obs[:0]).shape == (0, encoder.output_size)


def test_encoders_are_the_ones_the_spaces_choose() -> None:
    assert isinstance(make_encoder(GRID), GridEncoder)
    assert isinstance(make_encoder(PIXELS), NatureCNN)
    assert isinstance(make_encoder(VECTOR), MLPEncoder)
    with torch.no_grad():
        assert math.isclose(float(make_encoder(VECTOR)(torch.zeros(3, 12)).abs().sum()), 0.0)  # zero biases
