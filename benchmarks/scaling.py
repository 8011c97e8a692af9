"""Frames/s of one training run with 1 and N processes (torchrun), on CPU and, when present, on CUDA.

Usage::

    python benchmarks/scaling.py                     # CPU: 1 vs 2 processes, gloo, one torch thread each
    python benchmarks/scaling.py --updates 8 --rounds 2 --config configs/minigrid/doorkey-lstm-ppo.yaml
    python benchmarks/scaling.py --gpu               # + the CUDA part (skipped with a note without a GPU)

CPU part: the same config (by default the embedded one: RIMs PPO on DoorKey-5x5, 16 envs x 128
steps per process) trained by ``python train.py`` (1 process) and by
``torchrun --standalone --nproc_per_node=N train.py`` (N processes, each with its own 16 envs, so
an update holds N times the frames), ``torch_threads=1`` and ``OMP_NUM_THREADS=1`` in every
process. Each run does ``--updates`` updates; its frames/s is the median of ``time/fps`` (the frames
of all ranks over rank 0's wall time per update, rollout and update included) over the updates after
the first, which pays one-off costs. ``--rounds`` alternates the process counts, so the drift of a
shared machine hits both alike. The speed-up is N-process frames/s over 1-process frames/s.

GPU part (``--gpu``, needs CUDA; first run on one H200, 2026-12-04, figures in the README):

* each core's forward + backward on CUDA over one (T=128, B=16, input 512) sequence, against
  LSTMCore (``nn.LSTM``) on CUDA, with the engine that ran (RIMs/BRIMs: the C kernel is CPU-only,
  so CUDA runs the Python engine; this is printed, never silent), via ``benchmarks/cores.py``;
* PPO frames/s with ``device=cuda`` on DoorKey-5x5 and on Pong (shipped configs, lstm and rims) with
  1 and N processes: N = the GPU count with NCCL, or ``--gpu-procs N`` processes sharing the GPUs
  with gloo when there are fewer GPUs than processes.

Each row is printed as it is measured; ``--json PATH`` also writes them all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python benchmarks/scaling.py` from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/cores.py for the GPU part


def _launch(nproc: int) -> list[str]:
    """The command that starts train.py with ``nproc`` processes (plain python for one)."""
    if nproc == 1:
        return [sys.executable, str(REPO / "train.py")]
    # --standalone: torchrun picks a free rendezvous port, so runs never clash with another job's.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "train.py")]


def frames_per_update(config_args: list[str]) -> int:
    """``algo.n_steps * env.n_envs`` of one process for the config these arguments give."""
    from agents.config import load_config

    path = None
    overrides = list(config_args)
    if "--config" in overrides:
        index = overrides.index("--config")
        path = Path(overrides[index + 1])
        del overrides[index:index + 2]
    config = load_config(path, overrides)
    return config["algo"]["n_steps"] * config["env"]["n_envs"]


def run_fps(nproc: int, config_args: list[str], updates: int, workdir: Path, env: dict[str, str] | None = None,
            timeout: float = 1800) -> dict[str, Any]:
    """Train ``updates`` updates with ``nproc`` processes; return the median frames/s after the first update.

    :param config_args: ``--config`` and ``key=value`` arguments of train.py.
    :param workdir: a scratch directory for the run.
    :param env: extra environment variables (e.g. ``MODULAR_RL_DIST_BACKEND``).
    :raises RuntimeError: if the run fails (its output's tail is in the message).
    """
    frames = frames_per_update(config_args) * nproc * updates
    run_dir = workdir / f"run_{nproc}_{time.monotonic_ns()}"
    command = [*_launch(nproc), *config_args, f"total_frames={frames}", "log.progress_bar=false",
               f"log.checkpoint_interval_frames={frames}", "--run-dir", str(run_dir)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(key, None)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-2000:]
        raise RuntimeError(f"{nproc} process(es) failed ({result.returncode}): {tail}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fps = [row["time/fps"] for row in rows[1:]] or [rows[0]["time/fps"]]
    return {"processes": nproc, "frames": rows[-1]["frames"], "updates": len(rows), "fps": statistics.median(fps),
            "wall_seconds": wall}


def cpu_scaling(config_args: list[str], nprocs: list[int], updates: int, rounds: int) -> list[dict[str, Any]]:
    """Median frames/s per process count, the counts alternating over ``rounds`` rounds."""
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in nprocs}
    with tempfile.TemporaryDirectory(prefix="scaling-") as scratch:
        for round_ in range(rounds):
            for n in nprocs:
                row = run_fps(n, [*config_args, "torch_threads=1", "device=cpu"], updates, Path(scratch))
                results[n].append(row)
                print(f"  round {round_ + 1}: {n} process(es): {row['fps']:.0f} frames/s "
                      f"({row['updates']} updates, {row['wall_seconds']:.0f} s with start-up)", flush=True)
    rows = []
    base = statistics.median(r["fps"] for r in results[nprocs[0]])
    for n in nprocs:
        fps = statistics.median(r["fps"] for r in results[n])
        rows.append({"part": "cpu", "processes": n, "fps": fps, "speedup": fps / base})
    return rows


def gpu_cores(repeats: int) -> list[dict[str, Any]]:
    """Each core's forward + backward milliseconds on CUDA and its ratio to LSTMCore, with its engine."""
    import torch
    from cores import CORE_SPECS, make_runner, thalnet_spec, time_once

    device = torch.device("cuda")
    built = []
    for name, build, _target in [*CORE_SPECS, thalnet_spec("weight_norm")]:
        core = build().to(device)
        run_once = make_runner(core, device)
        engine = "-"
        kernel_for = getattr(core, "kernel_for", None)
        if callable(kernel_for):  # RIMs/BRIMs: say which engine runs (the C kernel is CPU-only)
            probe = torch.zeros(1, 1, 512, device=device)
            engine = "C kernel" if kernel_for(probe) is not None else "python"
        for _ in range(3):
            run_once()
        built.append((name, engine, run_once))
    times: dict[str, list[float]] = {name: [] for name, _, _ in built}
    for _ in range(repeats):  # round-robin, as benchmarks/cores.py does
        for name, _, run_once in built:
            times[name].append(time_once(run_once, device))
    lstm = statistics.median(times[built[0][0]])
    rows = []
    for name, engine, _ in built:
        ms = statistics.median(times[name])
        rows.append({"part": "gpu-core", "core": name, "engine": engine, "ms": ms, "x_lstm": ms / lstm})
    return rows


def gpu_ppo(updates: int, procs: int) -> list[dict[str, Any]]:
    """PPO frames/s with device=cuda on DoorKey and Pong (lstm, rims) with 1 and ``procs`` processes."""
    import torch

    gpus = torch.cuda.device_count()
    # NCCL needs a GPU per process; with fewer GPUs the processes share them through gloo.
    env = {} if procs <= gpus else {"MODULAR_RL_DIST_BACKEND": "gloo"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="scaling-gpu-") as scratch:
        for env_name, family in (("doorkey", "minigrid"), ("pong", "atari")):
            for core in ("lstm", "rims"):
                config = ["--config", str(REPO / "configs" / family / f"{env_name}-{core}-ppo.yaml"), "device=cuda"]
                base = None
                for n in sorted({1, procs}):
                    row = run_fps(n, config, updates, Path(scratch), env=env if n > 1 else None)
                    base = row["fps"] if base is None else base
                    rows.append({"part": "gpu-ppo", "env": env_name, "core": core, "processes": n, "fps": row["fps"],
                                 "speedup": row["fps"] / base, "backend": env.get("MODULAR_RL_DIST_BACKEND", "nccl")
                                 if n > 1 else "-"})
                    print(f"  {env_name} {core} {n} process(es): {row['fps']:.0f} frames/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, measure, print the table; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="train.py config (default: the embedded DoorKey RIMs PPO)")
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts on CPU (first: base)")
    parser.add_argument("--updates", type=int, default=6, help="updates per run (the first is not counted)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per process count (median)")
    parser.add_argument("--gpu", action="store_true", help="also the CUDA part (cores, PPO on DoorKey and Pong)")
    parser.add_argument("--gpu-procs", type=int, default=None, help="processes for the GPU PPO rows (default: GPUs)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU part")
    parser.add_argument("--json", type=Path, help="also write the rows to this file (a new file)")
    parser.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the CPU part")
    args = parser.parse_args(argv)
    if args.updates < 2 or args.rounds < 1 or min(args.nprocs) < 1:
        parser.error("--updates must be >= 2, --rounds and --nprocs >= 1")
    if args.gpu_procs is not None and args.gpu_procs < 1:
        parser.error("--gpu-procs must be >= 1")
    from _common import check_json_option, checked_config, write_json_output  # benchmarks/ is on sys.path

    # Before any run: a bad config, override or output path is named now, not after the measurements.
    if not args.no_cpu:
        checked_config(parser, args.config, args.overrides)
    check_json_option(parser, args.json, args.overwrite)
    rows: list[dict[str, Any]] = []
    if not args.no_cpu:
        config_args = [*(["--config", str(args.config.resolve())] if args.config else []), *args.overrides]
        print(f"CPU: {os.cpu_count()} cores, processes {args.nprocs}, {args.updates} updates per run, "
              f"gloo, torch_threads=1", flush=True)
        rows += cpu_scaling(config_args, args.nprocs, args.updates, args.rounds)
        for row in rows:
            print(f"cpu  {row['processes']} process(es): {row['fps']:8.0f} frames/s  x{row['speedup']:.2f}")
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("GPU part skipped: no CUDA GPU here (torch.cuda.is_available() is false)")
        else:
            procs = args.gpu_procs or max(2, torch.cuda.device_count())
            print(f"GPU: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}", flush=True)
            core_rows = gpu_cores(repeats=10)
            for row in core_rows:
                print(f"cuda {row['core']:<30} engine {row['engine']:<8} {row['ms']:8.1f} ms/seq  "
                      f"x{row['x_lstm']:.2f} LSTM")
            rows += core_rows
            rows += gpu_ppo(args.updates, procs)
    if args.json:
        return write_json_output(args.json, rows, args.overwrite, "scaling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
