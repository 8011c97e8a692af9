"""The benchmarks' command lines refuse bad input before any run starts: one message, exit 2, no file replaced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmark(script: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "-5"], "--frames must be positive"),
        (["--rounds", "0"], "--rounds must be positive"),
        (["--json", "{existing}"], "exists; pass --overwrite"),
        (["--json", "{existing}", "--overwrite", "--frames", "0"], "--frames must be positive"),
        (["--json", "{tmp}"], "is a folder; give a file name"),
        (["--json", "{existing}/out.json"], "which is a file, not a folder"),
        (["--per-update", "--cores", "foo"], "--cores: each of brims, lstm, rims, thalnet, gru at most once, got foo"),
        (["--per-update", "--atari-cores", "gru", "gru"], "--atari-cores: each of"),
    ],
    ids=["negative-frames", "zero-rounds", "existing-json", "overwrite-still-checks", "json-folder",
         "json-parent-is-a-file", "unknown-core", "core-twice"],
)
def test_throughput_refuses_bad_input_before_running(tmp_path: Path, args: list[str], message: str) -> None:
    existing = tmp_path / "earlier.json"
    existing.write_text('{"earlier": 1}')
    done = _benchmark("throughput.py", *(a.format(existing=existing, tmp=tmp_path) for a in args))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert existing.read_text() == '{"earlier": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.json"]


def test_peer_refuses_a_negative_seed() -> None:
    done = _benchmark("peer.py", "--frames", "2048", "--seed", "-1")  # gymnasium refused it with a traceback
    assert done.returncode == 2 and "--seed must be between 0 and 2**32 - 1, got -1" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("scaling.py", ["--no-cpu", "--json", "{existing}"], "exists; pass --overwrite"),
        ("scaling.py", ["--json", "{existing}/x.json"], "which is a file, not a folder"),
        ("scaling.py", ["algo.lr=abc"], "algo.lr must be a number"),
        ("scaling.py", ["env.id=Nope-v0"], "env.id: Unknown environment id 'Nope-v0'"),
        ("atari.py", ["--frames", "10", "--cores", "nope"], "--cores: each of brims, lstm, rims, thalnet, gru"),
        ("atari.py", ["--frames", "10", "--cores", "lstm", "--device", "foo"], "device must be a torch device"),
        ("atari.py", ["--frames", "10", "--cores", "lstm", "--out", "{existing}"], "is a file, not a folder"),
        ("atari.py", ["--frames", "10", "--cores", "lstm", "--out", "{tmp}"], "pong-lstm-ppo already holds a run"),
        ("atari.py", ["--frames", "10", "--cores", "gru", "gru"], "at most once, got gru gru"),
        ("sb3_interop.py", ["--only", "learning", "--seeds", "abc"], "--seeds: 'abc' is not a seed"),
        ("sb3_interop.py", ["--only", "fps", "--fps-chunk", "0"], "--fps-chunk must be positive"),
        ("learning.py", ["--configs", "default", "--out", "{existing}/out"], "which is a file, not a folder"),
        ("cores.py", ["--threads", "-3"], "--threads must be >= 1, got -3"),
    ],
    ids=["scaling-existing-json", "scaling-json-under-a-file", "scaling-bad-override", "scaling-unknown-env",
         "atari-unknown-core", "atari-bad-device", "atari-out-is-a-file", "atari-out-holds-a-run", "atari-core-twice",
         "sb3-bad-seeds", "sb3-zero-chunk", "learning-out-under-a-file", "cores-negative-threads"],
)
def test_benchmarks_refuse_bad_input_before_measuring(tmp_path: Path, script: str, args: list[str],
                                                      message: str) -> None:
    """One line and exit 2 before any run (scaling.py overwrote --json and ended in tracebacks after its
    runs; atari.py, sb3_interop.py, learning.py and cores.py ended in tracebacks)."""
    existing = tmp_path / "earlier.json"
    existing.write_text('{"earlier": 1}')
    run = tmp_path / "pong-lstm-ppo"  # a run atari.py would write over with --out tmp_path
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"weights")
    done = _benchmark(script, *(a.format(existing=existing, tmp=tmp_path) for a in args))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{script}: error: ")
    assert existing.read_text() == '{"earlier": 1}' and (run / "checkpoint.pt").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.json", "pong-lstm-ppo"]
