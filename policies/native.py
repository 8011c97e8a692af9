"""The package's C kernels, built once per machine into one library and loaded with ctypes.

Two sources: the RIMs/BRIMs time loop (``cores/rims_kernel.c``) and the MiniGrid grid encoder
(``grid_kernel.c``). They are compiled together on first use with the system C compiler (``$CC``,
else ``cc`` or ``gcc``) into ``$XDG_CACHE_HOME/modular-memory-rl/`` (default ``~/.cache/...``),
under a name that hashes the sources, the flags and the CPU, so an edit or another machine gets its
own build (builds no process has loaded for 30 days are deleted). No torch headers are involved: a
build takes about two seconds. Where no compiler is found or the build fails, :func:`native_library`
warns once and returns None: RIMs/BRIMs run their Python engine and the grid encoder its torch
layers (same results up to rounding, slower on small batches). Set ``MODULAR_MEMORY_NATIVE=0`` (or
false/no/off) to turn the kernels off.

The build is tuned for the CPU it runs on (``-march=native``, FMA contraction): the fastest code
here, and rounding that differs from the torch/Python paths' and from other CPUs'. The shipped configs
are meant to learn whichever rounding runs (benchmarks/learning.py checks the default with both
engines); :func:`kernel_build` says which build a process uses, and every run records it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from policies.cpu import cpu_model_and_flags

DISABLE_ENV = "MODULAR_MEMORY_NATIVE"
SOURCES = (Path(__file__).parent / "cores" / "rims_kernel.c", Path(__file__).with_name("grid_kernel.c"))
BUILD_PREFIX = "kernels-"
FALLBACK = "RIMs and BRIMs run their slower Python engine, the grid encoder its torch layers"
# -ffp-contract=fast: ISO C mode would otherwise forbid fusing a*b+c into one FMA instruction.
FLAGS = ("-O3", "-ffp-contract=fast", "-pthread", "-fPIC", "-shared", "-std=c11")
# Tuned for the CPU it runs on (AVX2/AVX-512 on x86); a compiler that refuses it builds without.
NATIVE_FLAG = "-march=native"
# Builds unused this long are deleted (each edit, upgrade or compiler change leaves one behind).
STALE_SECONDS = 30 * 24 * 3600


def cache_dir() -> Path:
    """Where built kernels are kept: ``$XDG_CACHE_HOME`` or ``~/.cache``, else the temp folder."""
    root = os.environ.get("XDG_CACHE_HOME")
    if not root:
        try:
            root = str(Path.home() / ".cache")
        except (RuntimeError, KeyError):  # no HOME and no passwd entry (some containers)
            return Path(tempfile.gettempdir()) / f"modular-memory-rl-{os.getuid() if hasattr(os, 'getuid') else 0}"
    return Path(root) / "modular-memory-rl"


def _cpu_signature() -> str:
    """Model and feature flags of this CPU: ``-march=native`` builds are only valid on a CPU like it."""
    model, flags = cpu_model_and_flags()
    if model is None and not flags:
        return platform.processor() or platform.machine()
    return f"{model}\n{' '.join(sorted(flags))}"


def _build(compiler: list[str], flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes starting together never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        command = [*compiler, *flags, "-o", tmp, *map(str, SOURCES), "-lm"]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        os.chmod(tmp, 0o755)  # mkstemp made it private; others sharing the cache may load it
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compiler_version(compiler: list[str]) -> str:
    """The first line of ``compiler --version`` (the build's rounding depends on it too)."""
    try:
        result = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return " ".join(compiler)
    return (result.stdout.splitlines() or [" ".join(compiler)])[0].strip()


def _forget_stale_builds(used: Path) -> None:
    """Mark ``used`` as used (its mtime, refreshed at most daily) and delete the other builds in its
    folder that no process has loaded for :data:`STALE_SECONDS`. Best effort: a shared or read-only
    cache folder is left as it is."""
    now = time.time()
    # rims_kernel-*: the name of builds before the grid encoder joined (kept for the 30 days too).
    for build in [*used.parent.glob(f"{BUILD_PREFIX}*.so"), *used.parent.glob("rims_kernel-*.so")]:
        try:
            age = now - build.stat().st_mtime
            if build == used and age > 24 * 3600:
                os.utime(build)
            elif build != used and age > STALE_SECONDS:
                build.unlink()
        except OSError:
            pass


def kernel_build() -> dict[str, str]:
    """Whether this process has the C kernels, and how they were built: what a result's rounding depends on.

    :return: ``{"engine": "c-kernel", "flags", "compiler", "cpu"}``, or ``{"engine": "python", "reason"}``.
    """
    lib = native_library()
    if lib is None:
        disabled = os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off")
        return {"engine": "python", "reason": f"{DISABLE_ENV}=0" if disabled else "the kernel could not be built"}
    return dict(_LOADED_BUILD)


_LOADED_BUILD: dict[str, str] = {}


@cache
def native_library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (turned off, or it could not be built; warned once)."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    # $CC may carry arguments ("ccache gcc", "gcc -m64").
    try:
        compiler = shlex.split(os.environ.get("CC", ""))
    except ValueError:  # unbalanced quotes: take it as one path
        compiler = [os.environ["CC"]]
    compiler = compiler or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not compiler:
        message = f"no C compiler found for the C kernels: {FALLBACK}"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return None
    try:
        source, cpu = b"\0".join(path.read_bytes() for path in SOURCES), _cpu_signature()
        # The tuned build first; a compiler that refuses -march=native gets the portable one.
        for flags in ((*FLAGS, NATIVE_FLAG), FLAGS):
            parts = [source, " ".join(flags).encode(), cpu.encode(), " ".join(compiler).encode()]
            key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
            target = cache_dir() / f"{BUILD_PREFIX}{platform.machine()}-{key}.so"
            try:
                if not target.exists():
                    _build(compiler, flags, target)
                break
            except subprocess.CalledProcessError:
                if NATIVE_FLAG not in flags:
                    raise
        lib = ctypes.CDLL(str(target))
        _forget_stale_builds(target)
        model = cpu_model_and_flags()[0] or platform.processor() or platform.machine()
        _LOADED_BUILD.update(engine="c-kernel", flags=" ".join(flags), compiler=_compiler_version(compiler), cpu=model)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        warnings.warn(
            f"could not build the C kernels ({detail.strip()[:300]}): {FALLBACK}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    # (T, B, L, save, starts, x_keys, x_values, layers, threads) and (T, B, L, starts, layers, threads):
    # the layer array goes as a pointer to KernelLayer structures (policies/cores/rims.py).
    c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
    lib.rims_stack_forward.argtypes = [c_int, c_int, c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_int]
    lib.rims_stack_backward.argtypes = [c_int, c_int, c_int, c_void_p, c_void_p, c_int]
    lib.rims_stack_forward.restype = lib.rims_stack_backward.restype = c_int
    # (shape, obs, 7 parameters, out + 5 saved) and (shape, obs, emb, w1..w3, 5 saved, d_out, 7 gradients).
    lib.grid_forward.argtypes = [c_void_p] * 15
    lib.grid_backward.argtypes = [c_void_p] * 19
    lib.grid_forward.restype = lib.grid_backward.restype = c_int
    return lib


def pointer(t: Tensor, dtype: torch.dtype = torch.float32) -> int:
    """Address of a tensor's data, for the kernel (which reads it as contiguous ``dtype`` rows).

    :raises ValueError: for a tensor the kernel cannot read that way (a check, never skipped:
        the kernel would read or write past the buffer).
    """
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(
            f"the C kernels take contiguous CPU {dtype} tensors, got {t.dtype} on {t.device}"
            f"{'' if t.is_contiguous() else ', not contiguous'}"
        )
    return t.data_ptr()
