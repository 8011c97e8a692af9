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
