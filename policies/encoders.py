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

import ctypes

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from policies.native import native_library, pointer

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

    On CPU in float32 the whole encoder, forward and backward, runs in one call of a C kernel
    (``grid_kernel.c``, built by :mod:`policies.native`): the same function as the torch layers in
    ``self.cnn``, rounded differently (the embedding is folded into the first convolution). The
    kernel was ~4x faster on a 256-observation minibatch and in a 16-env rollout step, where the
    torch layers spent their time on per-op overhead (about half of a DoorKey PPO run). Elsewhere
    (CUDA, float64, ``native=False``, ``MODULAR_MEMORY_NATIVE=0``, no C compiler) the torch layers
    run. The kernel path does not call ``self.cnn``'s or ``self.embedding``'s modules, so hooks
    registered on them do not fire; hooks on the encoder itself do.

    :param observation_space: a uint8 Box of shape (H, W, 3).
    :param embedding_dim: width of each channel's index embedding.
    :param native: run the C kernel where it applies (:meth:`uses_kernel`).
    """

    def __init__(self, observation_space: spaces.Box, embedding_dim: int = 8, native: bool = True) -> None:
        super().__init__()
        height, width, _ = observation_space.shape
        if min(height, width) < 4:
            raise ValueError(f"the grid encoder needs a view of at least 4x4 cells, got {height}x{width} "
                             "(MiniGrid's agent_view_size)")
        self.native = native
        self.view_shape = (height, width, 3)
        self.embedding = nn.Embedding(3 * GRID_VOCAB_PER_CHANNEL, embedding_dim)
        # Each channel gets its own rows of the table: object 3 and colour 3 differ.
        self.register_buffer("channel_offsets", torch.arange(3) * GRID_VOCAB_PER_CHANNEL, persistent=False)
        # Pool only views of 7+ cells: three 2x2 convolutions alone would shrink a smaller one to nothing.
        self.pooled = min(height, width) >= 7
        self.cnn = nn.Sequential(
            nn.Conv2d(3 * embedding_dim, 16, kernel_size=2),
            nn.ReLU(),
            nn.MaxPool2d(2) if self.pooled else nn.Identity(),
            nn.Conv2d(16, 32, kernel_size=2),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=2),
            nn.ReLU(),
            nn.Flatten(),
        )
        orthogonal_init(self.cnn)
        with torch.no_grad():
            self.output_size = int(self.cnn(torch.zeros(1, 3 * embedding_dim, height, width)).shape[1])

    def uses_kernel(self) -> bool:
        """Whether :meth:`forward` runs the C kernel: ``native`` on, float32 CPU parameters, and the
        kernel library built (see :mod:`policies.native`)."""
        weight = self.embedding.weight
        return (self.native and weight.device.type == "cpu" and weight.dtype == torch.float32
                and native_library() is not None)

    def forward(self, obs: Tensor) -> Tensor:
        """:param obs: (N, H, W, 3) integer indices. :return: (N, output_size) features.

        :raises ValueError: for observations of another shape than the view the encoder was built for.
        """
        if obs.dim() != 4 or tuple(obs.shape[1:]) != self.view_shape:
            raise ValueError(f"the grid encoder was built for (N, {', '.join(map(str, self.view_shape))}) "
                             f"observations, got shape {tuple(obs.shape)}")
        if obs.device.type == "cpu" and self.uses_kernel():
            if obs.dtype != torch.uint8:  # the kernel clamps uint8 indices to the table itself
                obs = obs.clamp(0, GRID_VOCAB_PER_CHANNEL - 1).to(torch.uint8)
            return _GridKernel.apply(obs.contiguous(), self.pooled, *_grid_parameters(self))
        # Not clamp_: for int64 observations .long() is the caller's own tensor.
        idx = obs.long().clamp(0, GRID_VOCAB_PER_CHANNEL - 1) + self.channel_offsets
        # The same lookup as self.embedding(idx), whose CPU backward (embedding_dense_backward) took
        # ~30% of this encoder's forward + backward on a 256-observation minibatch; index_select's
        # backward (index_add) gives the same gradient in a fraction of the time.
        emb = self.embedding.weight.index_select(0, idx.flatten())
        emb = emb.view(*idx.shape, self.embedding.embedding_dim)  # (N, H, W, 3, E)
        emb = emb.flatten(3).permute(0, 3, 1, 2)  # (N, 3E, H, W)
        return self.cnn(emb)


def _grid_parameters(encoder: GridEncoder) -> list[Tensor]:
    """The encoder's parameters in the kernel's order: embedding, then each convolution's weight and bias."""
    conv1, conv2, conv3 = (layer for layer in encoder.cnn if isinstance(layer, nn.Conv2d))
    return [encoder.embedding.weight, conv1.weight, conv1.bias, conv2.weight, conv2.bias, conv3.weight, conv3.bias]


class _GridShape(ctypes.Structure):
    """``GridShape`` in ``grid_kernel.c``, field for field."""

    _fields_ = [(name, ctypes.c_int) for name in ("N", "H", "W", "E", "V", "O1", "O2", "O3", "pooled")]


class _GridKernel(torch.autograd.Function):
    """GridEncoder's forward and backward as two calls of the C kernel (layouts in ``grid_kernel.c``)."""

    @staticmethod
    def forward(ctx, obs: Tensor, pooled: bool, *params: Tensor) -> Tensor:  # type: ignore[override]
        emb, w1, b1, w2, b2, w3, b3 = (p.detach().contiguous() for p in params)
        n, height, width, _ = obs.shape
        o1, o2, o3 = w1.shape[0], w2.shape[0], w3.shape[0]
        shape = _GridShape(n, height, width, emb.shape[1], GRID_VOCAB_PER_CHANNEL, o1, o2, o3, int(pooled))
        h1, w1_ = height - 1, width - 1
        hp, wp = (h1 // 2, w1_ // 2) if pooled else (h1, w1_)
        h3, w3_ = hp - 2, wp - 2
        r1 = obs.new_empty((n, h1, w1_, o1), dtype=torch.float32)
        p = obs.new_empty((n, hp, wp, o1), dtype=torch.float32) if pooled else r1
        arg = obs.new_empty((n, hp, wp, o1) if pooled else (0,))
        r2 = obs.new_empty((n, hp - 1, wp - 1, o2), dtype=torch.float32)
        r3 = obs.new_empty((n, h3, w3_, o3), dtype=torch.float32)
        out = obs.new_empty((n, o3 * h3 * w3_), dtype=torch.float32)
        lib = native_library()
        status = lib.grid_forward(ctypes.byref(shape), pointer(obs, torch.uint8),
                                  *map(pointer, (emb, w1, b1, w2, b2, w3, b3)), pointer(out), pointer(r1), pointer(p),
                                  pointer(arg, torch.uint8), pointer(r2), pointer(r3))
        if status != 0:
            raise MemoryError("the grid encoder's C kernel could not allocate its scratch memory")
        ctx.shape = shape
        # A copy of obs: the caller may reuse its buffer (a numpy array's, unseen by autograd) before backward.
        ctx.save_for_backward(obs.clone(), emb, w1, w2, w3, r1, p, arg, r2, r3)
        return out

    @staticmethod
    @once_differentiable  # the gradients come out of C with no graph behind them
    def backward(ctx, d_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        obs, emb, w1, w2, w3, r1, p, arg, r2, r3 = ctx.saved_tensors
        # Kept in a name of its own: a temporary .contiguous() copy would be freed before the C call reads it
        # (BabyAI's torch.cat hands the grid encoder a strided slice of the gradient).
        d_out = d_out.contiguous()
        grads = [torch.zeros_like(t) for t in (emb, w1)] + [w1.new_zeros(w1.shape[0])]
        grads += [torch.zeros_like(w2), w2.new_zeros(w2.shape[0]), torch.zeros_like(w3), w3.new_zeros(w3.shape[0])]
        lib = native_library()
        status = lib.grid_backward(ctypes.byref(ctx.shape), pointer(obs, torch.uint8),
                                   *map(pointer, (emb, w1, w2, w3, r1, p)), pointer(arg, torch.uint8),
                                   pointer(r2), pointer(r3), pointer(d_out), *map(pointer, grads))
        if status != 0:
            raise MemoryError("the grid encoder's C kernel could not allocate its scratch memory")
        return (None, None, *grads)


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
