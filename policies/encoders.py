"""Observation encoders, chosen from the observation space.

* MiniGrid's symbolic grid (H, W, 3) uint8 of (object, colour, state) indices: the
  indices are embedded (never divided by 255, they are categories, not intensities)
  and read by a small CNN.
* Atari frames (k, 84, 84) uint8, channel first: the Nature CNN on pixels / 255.
* Flat vectors (n,) float: a two-layer MLP.
* A Dict with "image" (a MiniGrid grid) and "mission" (token ids): the grid CNN plus
  a mean of word embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

# MiniGrid's index tables are small (11 objects, 6 colours, 3 states); 16 rows per
# channel leaves room for BabyAI/custom objects while keeping the table tiny.
GRID_VOCAB_PER_CHANNEL = 16
MISSION_VOCAB = 256


def orthogonal_init(module: nn.Module, gain: float = float(np.sqrt(2))) -> nn.Module:
    """Orthogonal weights with ``gain`` and zero biases for every conv and linear layer of ``module``.

    What SB3 (``ortho_init``) and CleanRL do for the layers in front of ReLU/tanh. PyTorch's default
    (uniform, variance ``1/(3 fan_in)``) shrinks the signal about 2.5x per ReLU layer: the MiniGrid
    grid CNN's features came out at ~0.05 with a spread over observations of ~0.01, so the core and
    heads started out nearly blind to the observation and PPO's take-off on DoorKey hung on seed luck.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(layer.weight, gain)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def _is_grid(space: spaces.Space) -> bool:
    return (
        isinstance(space, spaces.Box)
        and space.dtype == np.uint8
        and len(space.shape) == 3
        and space.shape[-1] == 3
        and space.shape[0] <= 32
        and space.shape[1] <= 32
    )


def _is_pixels(space: spaces.Space) -> bool:
    return (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3
            and space.shape[1:] == (84, 84))


class GridEncoder(nn.Module):
    """Embeds MiniGrid's (H, W, 3) index grid and reads it with a 3-layer CNN.

    :param observation_space: a uint8 Box of shape (H, W, 3).
    :param embedding_dim: width of each channel's index embedding.
    """

    def __init__(self, observation_space: spaces.Box, embedding_dim: int = 8) -> None:
        super().__init__()
        height, width, _ = observation_space.shape
        if min(height, width) < 4:
            raise ValueError(f"the grid encoder needs a view of at least 4x4 cells, got {height}x{width} "
                             "(MiniGrid's agent_view_size)")
        self.embedding = nn.Embedding(3 * GRID_VOCAB_PER_CHANNEL, embedding_dim)
        # Each channel gets its own rows of the table: object 3 and colour 3 differ.
        self.register_buffer("channel_offsets", torch.arange(3) * GRID_VOCAB_PER_CHANNEL, persistent=False)
        self.cnn = nn.Sequential(
            nn.Conv2d(3 * embedding_dim, 16, kernel_size=2),
            nn.ReLU(),
            # Pool only views of 7+ cells: three 2x2 convolutions alone would shrink a smaller one to nothing.
            nn.MaxPool2d(2) if min(height, width) >= 7 else nn.Identity(),
            nn.Conv2d(16, 32, kernel_size=2),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=2),
            nn.ReLU(),
            nn.Flatten(),
        )
        orthogonal_init(self.cnn)
        with torch.no_grad():
            self.output_size = int(self.cnn(torch.zeros(1, 3 * embedding_dim, height, width)).shape[1])

    def forward(self, obs: Tensor) -> Tensor:
        """:param obs: (N, H, W, 3) integer indices. :return: (N, output_size) features."""
        idx = obs.long().clamp_(0, GRID_VOCAB_PER_CHANNEL - 1) + self.channel_offsets
        # The same lookup as self.embedding(idx), whose CPU backward (embedding_dense_backward) took
        # ~30% of this encoder's forward + backward on a 256-observation minibatch; index_select's
        # backward (index_add) gives the same gradient in a fraction of the time.
        emb = self.embedding.weight.index_select(0, idx.flatten())
        emb = emb.view(*idx.shape, self.embedding.embedding_dim)  # (N, H, W, 3, E)
        emb = emb.flatten(3).permute(0, 3, 1, 2)  # (N, 3E, H, W)
        return self.cnn(emb)


class NatureCNN(nn.Module):
    """The DQN Nature CNN for stacked (k, 84, 84) uint8 frames.

    :param observation_space: a uint8 Box of shape (k, 84, 84).
    :param features_dim: width of the final linear layer.
    """

    def __init__(self, observation_space: spaces.Box, features_dim: int = 512) -> None:
        super().__init__()
        n_stack = observation_space.shape[0]
        self.net = nn.Sequential(
            nn.Conv2d(n_stack, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, features_dim),
            nn.ReLU(),
        )
        orthogonal_init(self.net)
        self.output_size = features_dim

    def forward(self, obs: Tensor) -> Tensor:
        """:param obs: (N, k, 84, 84) pixels in [0, 255]. :return: (N, features_dim)."""
        return self.net(obs.float() / 255.0)


class MLPEncoder(nn.Module):
    """Two tanh layers for flat vector observations.

    :param observation_space: a Box of shape (n,).
    :param hidden_size: width of both layers.
    """

    def __init__(self, observation_space: spaces.Box, hidden_size: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(int(np.prod(observation_space.shape)), hidden_size),
            nn.Tanh(),
            nn.Linear(hidden_size, hidden_size),
            nn.Tanh(),
        )
        orthogonal_init(self.net)
        self.output_size = hidden_size

    def forward(self, obs: Tensor) -> Tensor:
        """:param obs: (N, n). :return: (N, hidden_size)."""
        return self.net(obs.float().flatten(1))


class GridMissionEncoder(nn.Module):
    """MiniGrid grid plus mission tokens: grid CNN features concatenated with a mean word embedding.

    :param observation_space: a Dict with "image" (grid Box) and "mission" (int Box of token ids, 0 = padding).
    :param word_dim: width of the word embedding.
    """

    def __init__(self, observation_space: spaces.Dict, word_dim: int = 32) -> None:
        super().__init__()
        self.grid = GridEncoder(observation_space["image"])
        self.words = nn.Embedding(MISSION_VOCAB, word_dim, padding_idx=0)
        self.output_size = self.grid.output_size + word_dim

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        """:param obs: {"image": (N, H, W, 3), "mission": (N, L)}. :return: (N, output_size)."""
        tokens = obs["mission"].long().clamp(0, MISSION_VOCAB - 1)
        count = (tokens > 0).sum(dim=1, keepdim=True).clamp(min=1)
        mission = self.words(tokens).sum(dim=1) / count
        return torch.cat([self.grid(obs["image"]), mission], dim=1)


def make_encoder(observation_space: spaces.Space) -> nn.Module:
    """Pick the encoder for an observation space.

    :param observation_space: the env's (single, not batched) observation space.
    :return: a module with an ``output_size`` attribute mapping (N, *obs_shape) to (N, output_size).
    :raises ValueError: if no encoder can take this space; the message names the space.
    """
    if isinstance(observation_space, spaces.Dict):
        keys = set(observation_space.spaces)
        if keys == {"image", "mission"} and _is_grid(observation_space["image"]):
            return GridMissionEncoder(observation_space)
    elif _is_grid(observation_space):
        return GridEncoder(observation_space)
    elif _is_pixels(observation_space):
        return NatureCNN(observation_space)
    elif isinstance(observation_space, spaces.Box) and len(observation_space.shape) == 1:
        return MLPEncoder(observation_space)
    raise ValueError(
        f"no encoder takes observation space {observation_space}: supported are a MiniGrid symbolic grid "
        "(uint8 Box (H, W, 3)), stacked Atari frames (uint8 Box (k, 84, 84)), a flat Box (n,), "
        "or a Dict with 'image' (grid) and 'mission' (token ids)"
    )
