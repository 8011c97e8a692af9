"""Fixtures shared by several test files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def fresh_native_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The C kernels enabled and not yet loaded, and nothing left cached for the next test (seed 0)."""
    import torch

    from policies import native  # here, not at the top: only the kernels' tests need it

    torch.manual_seed(0)
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    native.native_library.cache_clear()
    yield
    native.native_library.cache_clear()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a test module, restored afterwards (use with ``pytest.mark.usefixtures``).

    Tests act on a few envs and train on tiny batches: a second thread only contends with other work for
    the machine's cores, which makes such steps several times slower.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fp32_on_cuda() -> Iterator[None]:
    """CUDA arithmetic in full float32 for the test's duration.

    On Ampere and newer GPUs PyTorch lets cuDNN's convolutions and RNNs use TF32 (10-bit mantissa) by
    default, which moves a CUDA result ~1e-3 from the CPU's (seen on an H200: the GRU core 3.5e-4, the grid
    encoder 8e-4). The CUDA-vs-CPU tests compare the float32 computations, so they turn TF32 off.
    """
    import torch

    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
