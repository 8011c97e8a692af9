"""Time forward + backward of every recurrent core on one training-sized sequence.

Usage::

    python benchmarks/cores.py [--repeats N] [--threads N] [--device cpu|cuda] [--thalnet-reading NAME]

Each core runs a ``(T=128, B=16, input 512)`` sequence forward, then backward
from the sum of its outputs. The table gives the parameter count, the median
milliseconds per sequence over ``--repeats`` runs after warm-up (the cores timed
round-robin, so load drift on a shared machine hits all alike), and the ratio to
LSTMCore, with whether the ratio meets its target (set for a 2-core CPU). On a
shared machine absolute times are noisy; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Run from anywhere: the package lives one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policies.cores import BRIMs, GRUCore, LSTMCore, RecurrentCore, RIMs, ThalNet
from policies.cores.thalnet import READINGS

SEQ_LEN, BATCH, INPUT_SIZE = 128, 16, 512

# (name, constructor, target ratio to LSTMCore or None for the baselines)
CORE_SPECS: list[tuple[str, Callable[[], RecurrentCore], float | None]] = [
    ("LSTMCore(510)", lambda: LSTMCore(INPUT_SIZE, hidden_size=510), None),
    ("GRUCore(510)", lambda: GRUCore(INPUT_SIZE, hidden_size=510), None),
    (
        "RIMs(6x85, k=4, lstm)",
        lambda: RIMs(INPUT_SIZE, num_modules=6, module_size=85, k_active=4, cell="lstm"),
        1.5,
    ),
    (
        "RIMs, Python engine",  # native=False: the reference the C kernel is tested against
        lambda: RIMs(INPUT_SIZE, num_modules=6, module_size=85, k_active=4, cell="lstm", native=False),
        None,
    ),
    (
        "BRIMs(2 x 6x85, k=4)",
        lambda: BRIMs(
            INPUT_SIZE,
            layers=[{"num_modules": 6, "module_size": 85, "k_active": 4} for _ in range(2)],
        ),
        3.0,
    ),
]


def thalnet_spec(reading: str) -> tuple[str, Callable[[], RecurrentCore], float | None]:
    """The ThalNet entry of the table: 4 modules of 128 (512 state features, the LSTM's 510).

    :param reading: ThalNet's reading mechanism (``"weight_norm"`` is the default).
    """
    return (
        f"ThalNet(4x128, {reading})",
        lambda: ThalNet(INPUT_SIZE, num_modules=4, module_size=128, reading=reading),
        2.0,
    )


def make_runner(core: RecurrentCore, device: torch.device) -> Callable[[], None]:
    """A function that runs one forward + backward of ``core`` over a (T, B, 512) sequence.

    :param core: the core to time (already on ``device``).
    :param device: where the inputs go.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, generator=generator).to(device)
    episode_starts = torch.zeros(SEQ_LEN, BATCH, dtype=torch.bool, device=device)
    state = core.initial_state(BATCH, device=device)

    def run_once() -> None:
        core.zero_grad(set_to_none=True)
        out, _ = core(x, state, episode_starts)
        out.sum().backward()

    return run_once


def time_once(run_once: Callable[[], None], device: torch.device) -> float:
    """Milliseconds of one call of ``run_once``, waiting for the GPU when there is one.

    :param run_once: what to time.
    :param device: the device the work runs on.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run_once()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000.0


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, time every core and print the table.

    :param argv: command-line arguments (defaults to ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per core (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per core before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    parser.add_argument(
        "--thalnet-reading",
        choices=READINGS,
        default="weight_norm",
        help="ThalNet's reading mechanism (the target is set for the default, weight_norm)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is false")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    print(
        f"T={SEQ_LEN} B={BATCH} input={INPUT_SIZE} device={device} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} (forward + backward, median)"
    )
    header = f"{'core':<30}{'parameters':>12}{'ms/seq':>10}{'x LSTM':>9}  target"
    print(header)
    print("-" * len(header))
    # Build and warm up every core, then time them round-robin: on a shared machine the
    # load drifts, and interleaving makes the drift hit every core alike (fairer ratios).
    built: list[tuple[str, float | None, int, Callable[[], None]]] = []
    failures: list[str] = []
    for name, build, target in [*CORE_SPECS, thalnet_spec(args.thalnet_reading)]:
        try:
            core = build().to(device)
            run_once = make_runner(core, device)
            for _ in range(args.warmup):
                run_once()
        except Exception as exc:  # noqa: BLE001 -- one broken core should not hide the others' timings
            failures.append(f"{name:<30}failed: {exc!r}")
            continue
        built.append((name, target, sum(p.numel() for p in core.parameters()), run_once))
    times: dict[str, list[float]] = {name: [] for name, *_ in built}
    for _ in range(args.repeats):
        for name, _, _, run_once in built:
            times[name].append(time_once(run_once, device))

    lstm_ms = statistics.median(times[built[0][0]])  # LSTMCore comes first and always builds
    for name, target, num_params, _ in built:
        ms = statistics.median(times[name])
        ratio = ms / lstm_ms
        verdict = "-" if target is None else f"<= {target:.1f}x: {'met' if ratio <= target else 'NOT met'}"
        print(f"{name:<30}{num_params:>12,}{ms:>10.1f}{ratio:>8.2f}x  {verdict}")
    for failure in failures:
        print(failure)


if __name__ == "__main__":
    main()
