"""What CPU this is, read without importing torch (a study's coordinator and the benchmarks' parent
process describe the machine they run on; the kernel cache keys its builds by it)."""

from __future__ import annotations

from pathlib import Path


def cpu_model_and_flags() -> tuple[str | None, frozenset[str]]:
    """This CPU's model name and feature flags as ``/proc/cpuinfo`` gives them (the first core's: every core
    repeats them); ``(None, frozenset())`` where there is no such file (macOS, Windows)."""
    model: str | None = None
    flags: frozenset[str] = frozenset()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return model, flags
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:  # "Features" on ARM
            flags = frozenset(value.split())
    return model, flags
