"""Frames per second of recurrent PPO, whole process, against sb3-contrib's RecurrentPPO (benchmarks/peer.py).

    python benchmarks/throughput.py                          # DoorKey-5x5, 102,400 frames, 3 rounds, start-up
    python benchmarks/throughput.py --frames 4096 --rounds 1 # a quick check of every path
    python benchmarks/throughput.py --pong                   # also Pong frames/s, gymnasium vs envpool backend
    python benchmarks/throughput.py --per-update             # the older in-process table, per core and update

**Whole process** (the default): each program is run as a user runs it, a fresh ``python`` process
timed wall-clock from launch to exit, so start-up (imports, env construction, the RIMs kernel
load) counts:

* ours: ``python train.py --config configs/minigrid/doorkey-<core>-ppo.yaml --run-dir <tmp>
  total_frames=<frames> env.n_envs=16 algo.n_steps=128 algo.n_epochs=4 algo.num_minibatches=8
  torch_threads=1 log.progress_bar=false env.backend=<backend>`` for the LSTM of 128 and the shipped
  RIMs config (6 modules of 32, 4 active), with ``env.backend=gymnasium`` and, when envpool is
  importable, ``env.backend=envpool``. The shipped DoorKey configs already have the peer's rollout
  shape (16 envs x 128 steps, 4 epochs, 8 minibatches of 256 frames, lr 1e-3); the overrides only pin
  it. The shipped ``algo.seq_len: 16`` is kept: ours trains on 16-step chunks (each from its stored
  start state), the peer on whole 128-step sequences cut at episode starts. The shipped lr anneal
  is kept too (it costs nothing per update).
* the peer: ``python benchmarks/peer.py --frames <frames>`` (sb3-contrib ``RecurrentPPO("CnnLstmPolicy")``,
  MiniGrid CNN, one shared LSTM of 128, same rollout shape, one torch thread; see that file).

The programs run in alternating rounds (``--rounds``, default 3; each round in the opposite order to
the one before, so that a program does not always follow the same one), and the table gives the
median wall time over the rounds and frames / median wall time. The machine's drift in speed then
falls on all programs alike. Also given: the time from launch to the first ``VecEnv.step`` (see
below) and the frames/s inside the process (ours: the median of the trainer's per-update
``time/fps`` after the first update; the peer: frames over the time of ``learn()``).

**Start-up**: each round also runs ``python train.py --run-dir <tmp> total_frames=2048`` (the
embedded default config, one rollout) and times launch to its first env step. The first step is
seen by a ``sitecustomize`` module that this script writes into a temporary folder put on the child's
``PYTHONPATH``: when SB3's ``base_vec_env`` module is imported it wraps ``VecEnv.step`` so that the
first call writes ``time.time()`` to the file named by ``$MMRL_FIRST_STEP_FILE`` and puts the
original method back (no cost on later steps). Neither train.py nor the package changes; the peer
runs with the same hook.

**Pong** (``--pong``): the shipped ``configs/atari/pong-lstm-ppo.yaml`` (8 envs, frame stack 4,
LSTM of 510) for ``--pong-frames`` frames with ``env.backend=gymnasium`` and ``env.backend=envpool``,
whole process and in-process frames/s, in the same alternating rounds.

**Per update** (``--per-update``): the older in-process measurement, kept for comparing all cores:
frames/s of each core's shipped DoorKey config (and Breakout for lstm and rims) over ``--updates``
updates after a warm-up one, the cores taking turns one update each, once with minibatches of 2
whole 128-step sequences (``algo.seq_len=null``) and once with the shipped 16-step chunks.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python benchmarks/throughput.py` from a source checkout
FIRST_STEP_ENV = "MMRL_FIRST_STEP_FILE"
STARTUP_GOAL_S = 4.0

# Written as sitecustomize.py into a temporary folder on the child's PYTHONPATH (see the docstring).
FIRST_STEP_HOOK = textwrap.dedent('''\
    """benchmarks/throughput.py's probe: write time.time() at the first VecEnv.step to $MMRL_FIRST_STEP_FILE."""
    import os
    import sys

    _PATH = os.environ.get("MMRL_FIRST_STEP_FILE")
    _MODULE = "stable_baselines3.common.vec_env.base_vec_env"


    def _wrap(vec_env_class):
        original = vec_env_class.step

        def step(self, actions):
            import time

            stamp = time.time()
            vec_env_class.step = original  # once only
            with open(_PATH, "w") as f:
                f.write(repr(stamp))
            return original(self, actions)

        vec_env_class.step = step


    class _Finder:
        def find_spec(self, name, path, target=None):
            if name != _MODULE:
                return None
            sys.meta_path.remove(self)
            from importlib.machinery import PathFinder

            spec = PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_wrap(module):
                exec_module(module)
                _wrap(module.VecEnv)

            spec.loader.exec_module = exec_and_wrap
            return spec


    if _PATH:
        sys.meta_path.insert(0, _Finder())
''')

DOORKEY_CONFIGS = {"lstm": "configs/minigrid/doorkey-lstm-ppo.yaml", "rims": "configs/minigrid/doorkey-rims-ppo.yaml"}
DOORKEY_NAMES = {"lstm": "LSTM 128", "rims": "RIMs 6x32, 4 active"}
# The peer's rollout shape (benchmarks/peer.py), pinned on the command line; seq_len stays as shipped (16).
DOORKEY_OVERRIDES = ["env.n_envs=16", "algo.n_steps=128", "algo.n_epochs=4", "algo.num_minibatches=8",
                     "torch_threads=1", "log.progress_bar=false"]
PONG_CONFIG = "configs/atari/pong-lstm-ppo.yaml"


@dataclass
class Program:
    """One program of the comparison and what its runs measured."""

    label: str
    description: str
    kind: str  # "ours" (train.py, metrics.jsonl in its run dir), "peer" (JSON line on stdout), "startup"
    argv: list[str]  # "{run_dir}" is replaced by a fresh directory per run
    frames: int
    walls: list[float] = field(default_factory=list)
    first_steps: list[float] = field(default_factory=list)
    inner_fps: list[float] = field(default_factory=list)
    frames_done: list[int] = field(default_factory=list)

    def fps(self) -> float:
        """Frames over the median whole-process wall time."""
        return statistics.median(self.frames_done) / statistics.median(self.walls)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_once(program: Program, work: Path, hook_dir: Path, index: int, timeout: float | None) -> None:
    """Run ``program`` once as a fresh process, timed from launch to exit; append what it measured."""
    run_dir = work / f"{program.label}_{index}"
    marker = work / f"{program.label}_{index}.first_step"
    argv = [str(run_dir) if a == "{run_dir}" else a for a in program.argv]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), *filter(None, [env.get("PYTHONPATH")])])
    env[FIRST_STEP_ENV] = str(marker)
    launched = time.time()
    started = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{program.label}: no exit within {timeout} s: {' '.join(argv)}") from None
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"{program.label} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")
    program.walls.append(wall)
    if marker.is_file():
        program.first_steps.append(float(marker.read_text()) - launched)
    if program.kind == "peer":
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        program.frames_done.append(int(result["frames"]))
        program.inner_fps.append(float(result["learn_fps"]))
    else:
        rows = _read_metrics(run_dir)
        program.frames_done.append(int(rows[-1]["frames"]) if rows else program.frames)
        timed = rows[1:] or rows  # after the first update (one-off costs), unless there is only one
        if timed:
            program.inner_fps.append(statistics.median(r["time/fps"] for r in timed))
    first = f"{program.first_steps[-1]:.2f}" if len(program.first_steps) == len(program.walls) else "-"
    print(f"  {program.label:<18} {wall:8.1f} s wall, first env step at {first} s", flush=True)


def run_rounds(programs: list[Program], rounds: int, timeout: float | None) -> None:
    """Run every program once per round, each round in the opposite order to the one before."""
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        work = Path(tmp)
        hook_dir = work / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(FIRST_STEP_HOOK)
        for r in range(rounds):
            print(f"round {r + 1} of {rounds}", flush=True)
            for program in programs if r % 2 == 0 else programs[::-1]:
                run_once(program, work, hook_dir, r, timeout)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(programs: list[Program], baseline: Program | None) -> None:
    print(f"{'program':<52}{'runs':>5}{'wall s':>9}{'frames/s':>10}{'first step s':>14}{'in-process fps':>16}"
          f"{'vs peer' if baseline else '':>9}")
    for p in programs:
        ratio = f"{p.fps() / baseline.fps():.2f}x" if baseline and p.kind != "startup" else ""
        fps = "" if p.kind == "startup" else f"{p.fps():.0f}"
        print(f"{p.description:<52}{len(p.walls):>5}{statistics.median(p.walls):>9.1f}{fps:>10}"
              f"{_fmt(_median(p.first_steps), '.2f'):>14}{_fmt(_median(p.inner_fps), '.0f'):>16}{ratio:>9}")


def _goal(name: str, value: float, goal: float, at_most: bool = False) -> str:
    met = value <= goal if at_most else value >= goal
    sign = "<" if at_most else ">="
    return f"  {name}: {value:.2f} (goal {sign} {goal:g}): {'met' if met else 'NOT met'}"


def _ours(label: str, config: str, backend: str, frames: int, overrides: list[str], description: str) -> Program:
    argv = [sys.executable, "train.py", "--config", config, "--run-dir", "{run_dir}", f"total_frames={frames}",
            *overrides, f"env.backend={backend}"]
    return Program(label, description, "ours", argv, frames)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def whole_process(args: argparse.Namespace) -> dict[str, Any]:
    """The default mode: DoorKey ours vs peer, start-up, and (with --pong) Pong per backend."""
    envpool = importlib.util.find_spec("envpool") is not None and not args.no_envpool
    backends = ["gymnasium", "envpool"] if envpool else ["gymnasium"]
    from agents.study import machine_description

    machine = machine_description()
    print(f"python {platform.python_version()}, torch {_version('torch')}, sb3-contrib {_version('sb3-contrib')}, "
          f"envpool {_version('envpool')}, {machine['cpu']} ({machine['vector']}), {machine['cpus']} CPUs, load "
          f"average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not envpool:
        print("envpool backend: " + ("skipped (--no-envpool)" if args.no_envpool else
                                     'not measured: envpool is not importable (pip install -e ".[envpool]")'))
    results: dict[str, Any] = {"frames": args.frames, "rounds": args.rounds, "machine": machine, "programs": {}}
    if not args.no_doorkey:
        if importlib.util.find_spec("sb3_contrib") is None:
            raise SystemExit('the peer needs sb3-contrib: pip install -e ".[sb3]" (also in the [test] extra)')
        programs = [_ours(f"{core}-{backend}", DOORKEY_CONFIGS[core], backend, args.frames, DOORKEY_OVERRIDES,
                          f"ours {DOORKEY_NAMES[core]}, {backend}")
                    for backend in backends for core in ("lstm", "rims")]
        peer = Program("peer", "peer: sb3-contrib RecurrentPPO, LSTM 128", "peer",
                       [sys.executable, "benchmarks/peer.py", "--frames", str(args.frames)], args.frames)
        programs.append(peer)
        if not args.no_startup:
            programs.append(Program("startup", "start-up: python train.py (embedded default)", "startup",
                                    [sys.executable, "train.py", "--run-dir", "{run_dir}", "total_frames=2048"],
                                    2048))
        print(f"MiniGrid-DoorKey-5x5-v0, {args.frames} frames per run, {args.rounds} round(s); ours: "
              f"{' '.join(DOORKEY_OVERRIDES)} (seq_len 16 as shipped)", flush=True)
        run_rounds(programs, args.rounds, args.timeout)
        print_table(programs, peer)
        by_label = {p.label: p for p in programs}
        print("goals (whole-process frames/s at the peer's rollout shape):")
        for core in ("lstm", "rims"):
            print(_goal(f"ours {core} (gymnasium) / peer", by_label[f"{core}-gymnasium"].fps() / peer.fps(), 3.0))
        print(_goal("rims / lstm (gymnasium)", by_label["rims-gymnasium"].fps() / by_label["lstm-gymnasium"].fps(),
                    0.8))
        if envpool:
            for core in ("lstm", "rims"):
                print(_goal(f"ours {core} (envpool) / peer", by_label[f"{core}-envpool"].fps() / peer.fps(), 5.0))
            print(f"  rims / lstm (envpool): {by_label['rims-envpool'].fps() / by_label['lstm-envpool'].fps():.2f}")
        else:
            why = "--no-envpool" if args.no_envpool else "envpool not importable"
            print(f"  ours (envpool) / peer >= 5: not measured ({why})")
        if "startup" in by_label and by_label["startup"].first_steps:
            print(_goal("python train.py: seconds to its first env step (median)",
                        statistics.median(by_label["startup"].first_steps), STARTUP_GOAL_S, at_most=True))
        results["programs"].update({p.label: _summary(p) for p in programs})
    if args.pong:
        if not envpool:
            print("Pong: the gymnasium backend only (" + ("--no-envpool)" if args.no_envpool else
                                                          "envpool not importable)"))
        programs = [_ours(f"pong-{backend}", PONG_CONFIG, backend, args.pong_frames,
                          ["torch_threads=1", "log.progress_bar=false"], f"ours Pong LSTM 510, {backend}")
                    for backend in backends]
        print(f"ALE/Pong-v5 ({PONG_CONFIG} as shipped, one torch thread), {args.pong_frames} frames per run, "
              f"{args.rounds} round(s)", flush=True)
        run_rounds(programs, args.rounds, args.timeout)
        print_table(programs, None)
        if envpool:
            whole = programs[1].fps() / programs[0].fps()
            inner = [_median(p.inner_fps) for p in programs]
            inner_ratio = f"{inner[1] / inner[0]:.2f}x" if all(inner) else "-"
            print(f"  Pong envpool / gymnasium: {whole:.2f}x whole process, {inner_ratio} in process")
        results["programs"].update({p.label: _summary(p) for p in programs})
    return results


def _summary(p: Program) -> dict[str, Any]:
    return {"description": p.description, "argv": p.argv, "walls": p.walls, "first_steps": p.first_steps,
            "inner_fps": p.inner_fps, "frames": p.frames_done,
            "fps": None if p.kind == "startup" else p.fps()}


def per_update(args: argparse.Namespace) -> None:
    """The older in-process table: median frames/s per core over updates, cores taking turns."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from _common import config_for, read_metrics

    from agents.trainer import Trainer

    def measure(cores: list[str], env: str, overrides: list[str]) -> dict[str, tuple[float, float, float]]:
        configs = {core: config_for(core, env, overrides) for core in cores}
        with tempfile.TemporaryDirectory() as tmp:
            trainers = [Trainer(config, Path(tmp) / core) for core, config in configs.items()]
            for update in range(1, args.updates + 2):
                # Rounds alternate direction, so that a core does not always follow the same one.
                for trainer in trainers if update % 2 else trainers[::-1]:
                    trainer.run(stop_at_frames=update * trainer.frames_per_rollout)
                    if trainer.stop_signal is not None:
                        raise SystemExit(f"stopped by {trainer.stop_signal}")
            rows = {core: read_metrics(Path(tmp) / core)[1:] for core in cores}
        return {core: (statistics.median(r["time/fps"] for r in core_rows),
                       statistics.median(r["time/rollout_seconds"] for r in core_rows),
                       statistics.median(r["time/update_seconds"] for r in core_rows))
                for core, core_rows in rows.items()}

    print(f"torch {torch.__version__}, torch_threads={args.threads}")
    print(f"{'env':<26}{'minibatch':<17}{'core':<10}{'frames/s':>10}{'rollout s':>11}{'update s':>10}{'vs lstm':>9}")
    threads = [f"torch_threads={args.threads}"]
    runs = [("doorkey", "2 whole seqs", args.cores, [*threads, "algo.seq_len=null"]),
            ("doorkey", "16 chunks of 16", args.cores, threads)]
    if not args.no_atari:
        runs.append(("breakout", "2 whole seqs", args.atari_cores, [*threads, "algo.anneal_lr=false"]))
    for env, minibatch, cores, overrides in runs:
        results = measure(cores, env, overrides)
        baseline = results["lstm"][0] if "lstm" in results else None
        env_id = "MiniGrid-DoorKey-5x5-v0" if env == "doorkey" else "ALE/Breakout-v5"
        for core, (fps, rollout, update) in results.items():
            ratio = f"{fps / baseline:.2f}x" if baseline else "-"
            print(f"{env_id:<26}{minibatch:<17}{core:<10}{fps:>10.0f}{rollout:>11.2f}{update:>10.2f}{ratio:>9}",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=102_400, help="DoorKey frames per run (whole rollouts: 2048)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the table gives medians")
    parser.add_argument("--no-envpool", action="store_true", help="skip the envpool backend even if importable")
    parser.add_argument("--no-startup", action="store_true", help="skip the python train.py start-up runs")
    parser.add_argument("--no-doorkey", action="store_true", help="skip DoorKey (e.g. with --pong alone)")
    parser.add_argument("--pong", action="store_true", help="also Pong frames/s with each backend")
    parser.add_argument("--pong-frames", type=int, default=8192, help="Pong frames per run (whole rollouts: 1024)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    parser.add_argument("--json", type=Path, help="also write the raw results here (a new file)")
    parser.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    per = parser.add_argument_group("per-update mode (--per-update)")
    per.add_argument("--per-update", action="store_true", help="the older in-process per-core table instead")
    per.add_argument("--updates", type=int, default=8, help="timed updates per core (after one warm-up)")
    per.add_argument("--cores", nargs="+", default=["lstm", "gru", "rims", "brims", "thalnet"])
    per.add_argument("--atari-cores", nargs="+", default=["lstm", "rims"])
    per.add_argument("--no-atari", action="store_true", help="skip the Breakout measurement")
    per.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    args = parser.parse_args()
    for option in ("frames", "rounds", "pong_frames", "timeout", "updates"):
        if getattr(args, option) <= 0:
            parser.error(f"--{option.replace('_', '-')} must be positive")
    if args.threads < 0:
        parser.error("--threads must be 0 (torch's default) or more")
    from _common import check_json_option, shipped_cores, write_json_output  # benchmarks/ is on sys.path

    if args.per_update:  # each core needs its shipped config (gru: the lstm one), named before any run starts
        for option, cores, env in (("--cores", args.cores, "doorkey"),
                                   ("--atari-cores", [] if args.no_atari else args.atari_cores, "breakout")):
            shipped = shipped_cores(env)
            if any(core not in shipped for core in cores) or len(set(cores)) < len(cores):
                parser.error(f"{option}: each of {', '.join(shipped)} at most once, got {' '.join(cores)}")

    check_json_option(parser, args.json, args.overwrite)
    if args.per_update:
        per_update(args)
        return
    results = whole_process(args)
    if args.json is not None:
        sys.exit(write_json_output(args.json, results, args.overwrite, "throughput"))


if __name__ == "__main__":
    main()
