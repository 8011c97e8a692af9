"""Multi-process training under ``torchrun``: one agent trained by N processes (ranks).

``torchrun --nproc_per_node=N train.py ...`` starts N copies of ``train.py``; torchrun tells each its
place through environment variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). This module is everything the trainer and the updaters need to know about it:

* :func:`setup` joins the process group (``gloo`` on CPU, ``nccl`` on CUDA; automatic, or
  ``MODULAR_RL_DIST_BACKEND=gloo|nccl``). A CUDA rank uses GPU ``LOCAL_RANK`` (with gloo, ranks
  may share GPUs: ``LOCAL_RANK`` modulo the node's GPU count).
* :func:`rank_seed` / :func:`rank_rng_seed`: each rank runs its own ``env.n_envs`` envs with env
  seeds no other rank uses, and samples actions from its own random streams. Rank 0 keeps exactly
  the seeds of a one-process run.
* :func:`broadcast_module`: every rank starts from rank 0's weights.
* :func:`average_gradients`: after each backward, one flat all-reduce averages the gradients, so the
  clip and the optimiser step see the same gradient on every rank and the weights stay identical.
  ``agents.optim.gradient_step`` calls it, so PPO, A2C and meta-PPO's inner and outer steps all go
  through it.
* :func:`gather_objects`, :func:`mean_over_ranks`, :func:`agree_stop`: episode statistics, PPO's
  early-stop decision and a stop signal that one rank received are shared, so every rank takes the
  same branch (a rank that leaves a collective early would leave the others waiting).
* :func:`is_main`: only rank 0 writes (config, TensorBoard, metrics, checkpoints).

With a world size of 1 (plain ``python train.py``, or torchrun with one process) :func:`setup` does
nothing and every function here returns its input or does nothing: a plain run computes exactly
what it computed before this module existed.

Only ``os`` and the light ``policies.checkpoint`` are imported at module level: ``train.py`` may
import this before torch. torch is imported inside the functions that use it.

The CUDA/NCCL paths (``setup`` with a CUDA device, CUDA tensors in the collectives) are written and
guarded but have not been run yet: no GPU was available where this was written.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agents.config import ConfigError
from agents.run_dir import train_py
from policies.checkpoint import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

T = TypeVar("T")

BACKEND_ENV = "MODULAR_RL_DIST_BACKEND"  # gloo or nccl; unset: nccl for a CUDA device, gloo otherwise
BACKENDS = ("gloo", "nccl")
# Appended (with the rank) to a seed's entropy on ranks >= 1. SeedSequence pads short entropy with
# zeros, so [seed, frames] and [seed, frames, 0] give the same streams: the rank (>= 1) comes last,
# never 0, and this tag keeps [seed, TAG, r] apart from the [seed, frames] of a task switch on rank 0.
RANK_TAG = 0x52414E4B  # "RANK"
# Stop signals by precedence when ranks disagree: SIGTERM (a scheduler preempting) wins over SIGINT.
_SIGNALS = {1: "SIGINT", 2: "SIGTERM"}
_SIGNAL_CODES = {name: code for code, name in _SIGNALS.items()}


class DistributedError(ConfigError):
    """torchrun's environment or the backend cannot be used (e.g. nccl without CUDA); one line says why.

    :param rank_specific: the problem is this rank's own (its GPU), not the same on every rank, so
        ``train.py`` prints it on every rank rather than on rank 0 alone.
    """

    def __init__(self, message: str, rank_specific: bool = False) -> None:
        super().__init__(message)
        self.rank_specific = rank_specific


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer "
                               "(torchrun sets it; launch with torchrun or unset it)") from None
    if number < 0:
        raise DistributedError(f"environment variable {name}={value!r} must be >= 0")
    return number


def _group() -> bool:
    """Whether this process has joined a process group (``setup`` ran with a world size above 1)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def env_world_size() -> int:
    """The world size torchrun announced (``WORLD_SIZE``), 1 outside torchrun."""
    return max(1, _env_int("WORLD_SIZE", 1))


def env_rank() -> int:
    """This process's rank as torchrun announced it (``RANK``), 0 outside a world of several processes.

    A ``RANK`` some scheduler left without a ``WORLD_SIZE`` above 1 is ignored: a plain run that believed
    it was not rank 0 would train without its lock and write nothing.
    """
    return _env_int("RANK", 0) if env_world_size() > 1 else 0


def world_size() -> int:
    """How many processes train this agent: the process group's size once joined, else ``WORLD_SIZE``."""
    if "torch" in sys.modules and _group():
        import torch.distributed as dist

        return dist.get_world_size()
    return env_world_size()


def rank() -> int:
    """This process's rank (0 .. world_size-1): the process group's once joined, else ``RANK`` (0 outside torchrun)."""
    if "torch" in sys.modules and _group():
        import torch.distributed as dist

        return dist.get_rank()
    return env_rank()


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``): the GPU index a CUDA rank uses."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0; always true in a one-process run)."""
    return rank() == 0


def active() -> bool:
    """Whether collectives are needed: this process is in a process group of more than one process."""
    if not _group():
        return False
    import torch.distributed as dist

    return dist.get_world_size() > 1


def choose_backend(device: str) -> str:
    """The process-group backend for ``device``: ``MODULAR_RL_DIST_BACKEND`` if set, else nccl on CUDA, gloo otherwise.

    :raises DistributedError: for an unknown backend, or nccl without a CUDA device (NCCL only
        moves CUDA tensors).
    """
    requested = os.environ.get(BACKEND_ENV, "").strip().lower()
    on_cuda = device.startswith("cuda")
    if requested and requested not in BACKENDS:
        raise DistributedError(f"{BACKEND_ENV}={requested!r}: the backend must be one of {', '.join(BACKENDS)}")
    backend = requested or ("nccl" if on_cuda else "gloo")
    if backend == "nccl" and not on_cuda:
        raise DistributedError(f"{BACKEND_ENV}=nccl needs device=cuda (NCCL only moves CUDA tensors); use "
                               f"{BACKEND_ENV}=gloo or unset it for device={device}")
    return backend


def setup(device: str) -> None:
    """Join torchrun's process group, once; with a world size of 1 do nothing.

    A CUDA rank is pinned to GPU ``LOCAL_RANK`` first (modulo the GPU count with gloo), so
    ``device=cuda`` means that rank's own GPU (an explicit ``cuda:<i>`` is left as given). Calling it
    again is a no-op.

    :param device: the config's ``device``.
    :raises DistributedError: one line, for a backend that cannot run here (nccl without CUDA, fewer
        GPUs than ranks on this node) or a torchrun environment that cannot be joined.
    """
    if env_world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; multi-process training needs it")
    if dist.is_initialized():
        return
    backend = choose_backend(device)
    if device.startswith("cuda"):  # unmeasured: no GPU was available where this was written
        if not torch.cuda.is_available():
            raise DistributedError(f"device={device!r} but no CUDA GPU is available; use device=cpu (backend gloo)")
        count = torch.cuda.device_count()
        if device == "cuda":
            if local_rank() >= count and backend == "nccl":  # NCCL refuses two ranks on one GPU
                raise DistributedError(f"rank {rank()} has LOCAL_RANK={local_rank()} but this node has {count} "
                                       f"GPU(s); start at most {count} processes per node (--nproc_per_node), or "
                                       f"set {BACKEND_ENV}=gloo to share GPUs between processes",
                                       rank_specific=True)
            # gloo: ranks share the node's GPUs round-robin (its collectives go through CPU memory).
            torch.cuda.set_device(local_rank() % count)
        else:
            torch.cuda.set_device(torch.device(device))
    if backend == "nccl" and not torch.distributed.is_nccl_available():
        raise DistributedError(f"this torch build has no NCCL; set {BACKEND_ENV}=gloo")
    try:
        # torchrun sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE; env:// reads them.
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(minutes=30))
    except (ValueError, RuntimeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        # Without MASTER_ADDR or MASTER_PORT this process was not started by torchrun (a scheduler left RANK and
        # WORLD_SIZE set): there may be no rank 0 to report, so every rank says it itself.
        raise DistributedError(f"cannot join the process group of WORLD_SIZE={env_world_size()} (backend "
                               f"{backend}): {reason}; launch with torchrun --nproc_per_node=N train.py",
                               rank_specific=not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys()) from None


def shutdown() -> None:
    """Leave the process group if this process joined one (at the end of ``train.py``)."""
    if "torch" in sys.modules and _group():
        import torch.distributed as dist

        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where small collective tensors live: NCCL moves only CUDA tensors, gloo CPU ones."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- seeds -----------------------------------------------------------------------------------------
def rank_seed(entropy: int | Sequence[int], rank_: int | None = None) -> int | list[int]:
    """The env seed entropy (``envs.env_seeds``) of ``rank_`` for a run seed (or ``[seed, frames]``).

    Rank 0 gets ``entropy`` unchanged, so a one-process run keeps its seeds exactly; rank r >= 1 gets
    ``[*entropy, RANK_TAG, r]``, a SeedSequence no other rank (and no task switch) uses.

    :param rank_: the rank; this process's by default.
    """
    r = rank() if rank_ is None else rank_
    if r == 0:
        return entropy if isinstance(entropy, int) else list(entropy)
    base = [entropy] if isinstance(entropy, int) else list(entropy)
    return [*base, RANK_TAG, r]


def rank_rng_seed(entropy: int | Sequence[int], rank_: int | None = None) -> int:
    """A seed (< 2**32, for random, numpy and torch) for this rank's own action sampling and shuffles.

    Rank 0 with an int ``entropy`` gets it unchanged (a one-process run is untouched); otherwise a
    32-bit word drawn from ``SeedSequence(rank_seed(entropy))``.
    """
    import numpy as np

    mixed = rank_seed(entropy, rank_)
    if isinstance(mixed, int):
        return mixed
    return int(np.random.SeedSequence(mixed).generate_state(1, dtype=np.uint32)[0])


# -- collectives (each a no-op in a world of 1) ----------------------------------------------------
def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every rank (identical initial weights)."""
    if not active():
        return
    import torch
    import torch.distributed as dist

    device = _collective_device()
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            buffer = tensor.detach().to(device)  # the tensor itself when it already lives there
            dist.broadcast(buffer, src=0)
            if buffer.data_ptr() != tensor.data_ptr():
                tensor.copy_(buffer)


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects, e.g. the run directory rank 0 chose)."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (e.g. rank 0 has written the checkpoint before anyone exits)."""
    if not active():
        return
    import torch
    import torch.distributed as dist

    # An all-reduce rather than dist.barrier(): with NCCL, barrier() guesses a device to use.
    flag = torch.zeros(1, device=_collective_device())
    dist.all_reduce(flag)


def average_gradients(params: Sequence[nn.Parameter], loss_finite: bool = True) -> bool:
    """Average the gradients of ``params`` over all ranks in place, with one flat all-reduce.

    A parameter whose gradient is None on some ranks (it did not reach their loss) gets the average
    with zeros there, and keeps None only if it is None on every rank: the optimisers then change
    the same parameters on every rank. ``loss_finite=False`` (this rank's loss was NaN/inf and was
    not backpropagated) is shared too, so every rank refuses the step together.

    :return: whether every rank's loss was finite (nothing should be stepped otherwise). In a world of
        1 the gradients are untouched and ``loss_finite`` is returned.
    """
    if not active():
        return loss_finite
    import torch
    import torch.distributed as dist

    params = list(params)
    device = _collective_device()  # gloo: CPU memory (its CUDA support is partial); nccl: this rank's GPU
    chunks = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, torch.float32)
              for p in params]
    present = torch.tensor([p.grad is not None for p in params] + [not loss_finite], dtype=torch.float32,
                           device=device)
    flat = torch.cat([*chunks, present])
    dist.all_reduce(flat)  # sum over ranks; every rank receives the same bytes
    n = dist.get_world_size()
    counts = flat[-len(present):].tolist()
    offset = 0
    for p, chunk, count in zip(params, chunks, counts[:-1], strict=True):
        size = chunk.numel()
        if count > 0:
            p.grad = (flat[offset:offset + size] / n).view_as(p).to(p.device, p.dtype)
        offset += size
    return counts[-1] == 0


def mean_over_ranks(value: float) -> float:
    """The mean of ``value`` over all ranks (``value`` itself in a world of 1)."""
    if not active():
        return value
    import torch
    import torch.distributed as dist

    total = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return float(total.item() / dist.get_world_size())


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a world of 1)."""
    if not active():
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def agree_stop(signal_name: str | None) -> str | None:
    """The stop signal every rank acts on: any rank's (SIGTERM before SIGINT), or None if no rank got one.

    Called once per update by every rank, so a SIGTERM to one rank stops all of them after the
    same update.
    """
    if not active():
        return signal_name
    import torch
    import torch.distributed as dist

    code = torch.tensor([_SIGNAL_CODES.get(signal_name or "", 0)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return _SIGNALS.get(int(code.item()))


# -- resume ------------------------------------------------------------------------------------------
def check_resume_world_size(saved: Any, run_dir: str | Path) -> None:
    """Refuse to resume a run with another number of processes than it was trained with.

    The world size fixes the frames per update (``n_steps * n_envs * world size``) and which env
    streams exist, so a resume with another count would not continue the same run.

    :param saved: the checkpoint's ``world_size`` (absent in runs saved before it existed: 1).
    :raises CheckpointError: naming both counts and the command that resumes the run.
    """
    saved = 1 if saved is None else saved
    now = env_world_size()
    if saved == now:
        return
    if saved == 1:
        how = f"resume it with one process: `python {train_py()} --resume {run_dir}`"
    else:
        how = (f"resume it with {saved} processes: `torchrun --nproc_per_node={saved} train.py --resume {run_dir}` "
               f"(on several nodes, {saved} in all)")
    raise CheckpointError(f"cannot resume {run_dir} with {now} process{'es' if now > 1 else ''}: it was trained "
                          f"with world size {saved}; {how}, or start a new run to change the process count")
