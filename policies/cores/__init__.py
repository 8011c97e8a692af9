"""Recurrent cores behind one protocol (see ``policies/cores/base.py``)."""

from __future__ import annotations

from typing import Any

from policies.cores.base import RecurrentCore, frozen_parameters, parameters_frozen
from policies.cores.brims import BRIMs
from policies.cores.rims import RIMs
from policies.cores.rnn import GRUCore, LSTMCore
from policies.cores.thalnet import ThalNet

CORES: dict[str, type[RecurrentCore]] = {
    "lstm": LSTMCore,
    "gru": GRUCore,
    "rims": RIMs,
    "brims": BRIMs,
    "thalnet": ThalNet,
}


def make_core(name: str, input_size: int, /, **kwargs: Any) -> RecurrentCore:
    """Build a core from its config name.

    :param name: one of ``"lstm"``, ``"gru"``, ``"rims"``, ``"brims"``, ``"thalnet"``.
    :param input_size: width of the features fed to the core at each step.
    :param kwargs: the core's own constructor arguments (e.g. ``k_active=4``).
    :raises ValueError: for an unknown name, an argument the core does not take (``input_size`` among them:
        the caller's features width sets it) or a setting out of the core's range.
    """
    if name not in CORES:
        raise ValueError(f"core name must be one of {', '.join(map(repr, CORES))}, got {name!r}")
    cls = CORES[name]
    try:
        return cls(input_size, **kwargs)
    except ValueError as exc:  # a setting out of range: say whose ("k_active must be ..." alone named no section)
        raise ValueError(f"core {name!r} setting: {exc}") from None
    except TypeError as exc:  # an unexpected keyword, or a size torch cannot take: name it instead of a raw TypeError
        # torch's own text can go on with dozens of lines of C++ frames: its first line says what is wrong.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"bad argument for core {name!r}: {first_line}") from None


__all__ = ["CORES", "BRIMs", "GRUCore", "LSTMCore", "RIMs", "RecurrentCore", "ThalNet", "frozen_parameters", "make_core",
           "parameters_frozen"]
