"""BRIMs core (skeleton; full implementation in progress)."""

from __future__ import annotations

from policies.cores.base import RecurrentCore


class BRIMs(RecurrentCore):
    """Bidirectional RIMs (placeholder while being implemented)."""

    def __init__(self, input_size: int, **kwargs: object) -> None:
        super().__init__()
        raise NotImplementedError("BRIMs is being implemented")
