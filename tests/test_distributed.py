"""Multi-process training under torchrun (agents/distributed.py), with real torchrun subprocesses.

Each torchrun test starts ``python -m torch.distributed.run --standalone --nproc_per_node=2`` on a
small wrapper around ``train.main`` that records, per rank and outside the run directory, its pid,
the env seeds it asked for and its final weights: the run directory itself is only ever written by
rank 0. ``--standalone`` lets torchrun pick a free rendezvous port, so parallel tests never clash.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agents import distributed
from envs import env_seeds
from policies.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]
# 2 envs x 16 steps per rank: 64 frames per update over 2 ranks; 20-step episodes so that every
# env finishes episodes within a few updates.
TINY = ["core.name=lstm", "core.hidden_size=16", "env.n_envs=2", "algo.n_steps=16", "algo.seq_len=8",
        "algo.num_minibatches=2", "algo.n_epochs=2", "env.max_episode_steps=20", "log.progress_bar=false",
        "torch_threads=1"]

# Runs train.main as torchrun's worker and keeps, per rank, what the test needs to compare.
WORKER = f"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
import torch
import agents.trainer as trainer_module
import train

out = Path(os.environ["DIST_TEST_OUT"])
rank = int(os.environ["RANK"])
(out / f"pid{{rank}}").write_text(str(os.getpid()))
seeds = []
real_make_vec_env = trainer_module.make_vec_env

def make_vec_env(env_id, n_envs, seed, **kwargs):
    seeds.append(seed)
    return real_make_vec_env(env_id, n_envs, seed, **kwargs)

trainer_module.make_vec_env = make_vec_env
real_run = trainer_module.Trainer.run

def run(self, *args, **kwargs):
    try:
        return real_run(self, *args, **kwargs)
    finally:
        torch.save({{"state_dict": self.policy.state_dict(), "frames": self.frames, "updates": self.updates,
                    "seeds": seeds, "world_size": self.world_size}}, out / f"rank{{rank}}.pt")

trainer_module.Trainer.run = run
if rank == 0:  # a rank 0 behind the others, as on a loaded machine
    time.sleep(float(os.environ.get("DIST_TEST_RANK0_DELAY_S", "0")))
sys.exit(train.main(sys.argv[1:]))
"""


def _torchrun(tmp_path: Path, nproc: int, args: list[str], out: Path) -> list[str]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(worker), *args]


def _env(out: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", distributed.BACKEND_ENV)}
    env.update(DIST_TEST_OUT=str(out), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(extra or {}))
    return env


def _run(tmp_path: Path, nproc: int, args: list[str], out: Path, timeout: float = 120,
         extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun(tmp_path, nproc, args, out), cwd=tmp_path, env=_env(out, extra_env),
                          capture_output=True, text=True, timeout=timeout)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_two_processes_train_one_agent(tmp_path: Path) -> None:
    out, run_dir = tmp_path / "out", tmp_path / "run"
    result = _run(tmp_path, 2, [*TINY, "total_frames=256", "--run-dir", str(run_dir)], out)
    assert result.returncode == 0, result.stdout + result.stderr
    # Rank 0 alone prints and writes the run: one directory, one config, one event file, one row per update.
    assert result.stdout.count("done: 256 frames") == 1 and "2 processes" in result.stdout
    assert sorted(path.name for path in run_dir.iterdir()) == [
        ".lock", "checkpoint.pt", "checkpoints", "config.yaml", "metrics.jsonl", "tb"]  # no env snapshot
    assert len(list((run_dir / "tb").iterdir())) == 1
    rows = _rows(run_dir)
    assert [row["frames"] for row in rows] == [64, 128, 192, 256]  # frames of both ranks: 2 x 2 envs x 16 steps
    assert all(row["train/grad_norm"] > 0 for row in rows)  # the weights did change

    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert (checkpoint["frames"], checkpoint["updates"], checkpoint["world_size"]) == (256, 4, 2)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["frames"] for r in ranks] == [256, 256] and [r["world_size"] for r in ranks] == [2, 2]
    # Different data on each rank, averaged gradients: the very same weights, which the checkpoint holds.
    assert _same_weights(ranks[0]["state_dict"], ranks[1]["state_dict"])
    assert _same_weights(ranks[0]["state_dict"], checkpoint["policy"]["state_dict"])

    # Rank 0 keeps a one-process run's env seeds; rank 1 has streams of its own.
    assert ranks[0]["seeds"] == [1] and ranks[1]["seeds"] == [[1, distributed.RANK_TAG, 1]]
    assert not set(env_seeds(1, 2)) & set(env_seeds(ranks[1]["seeds"][0], 2))
    # Episodes of both ranks are counted: every env ends >= 3 episodes of 20 steps in its 64 steps,
    # so the episode lengths sum to more than one rank's 128 steps.
    lengths = sum(episode["l"] for episode in checkpoint["recent_episodes"])
    assert 128 < lengths <= 256
    assert sum(row.get("rollout/episodes", 0) for row in rows) == len(checkpoint["recent_episodes"])


def test_sigterm_to_one_rank_stops_both_with_a_checkpoint_and_resume(tmp_path: Path) -> None:
    out, run_dir = tmp_path / "out", tmp_path / "run"
    proc = subprocess.Popen(_torchrun(tmp_path, 2, [*TINY, "total_frames=1000000", "--run-dir", str(run_dir)], out),
                            cwd=tmp_path, env=_env(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.kill(int((out / "pid1").read_text()), signal.SIGTERM)  # rank 1 only
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Both ranks exit with 143, which torchrun's failure summary lists (and torchrun exits with 1);
    # no worker printed a traceback (the one in the output is torchrun's own ChildFailedError).
    assert proc.returncode != 0
    assert output.count("SIGTERM: stopped after") == 1 and output.count("exitcode  : 143") == 2, output
    assert 'worker.py", line' not in output
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    done = checkpoint["frames"]
    assert 0 < done < 1000000 and [r["frames"] for r in ranks] == [done, done]
    assert _same_weights(ranks[1]["state_dict"], checkpoint["policy"]["state_dict"])

    # The same world size continues the run (fresh episodes, same weights, frames and rows).
    resumed = _run(tmp_path, 2, ["--resume", str(run_dir), f"total_frames={done + 128}"], out)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert checkpoint["frames"] == done + 128 and checkpoint["world_size"] == 2
    assert [row["frames"] for row in _rows(run_dir)] == list(range(64, done + 129, 64))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert _same_weights(ranks[0]["state_dict"], ranks[1]["state_dict"])
    # Fresh episodes on every rank, from env streams past the checkpoint's frames (not the run's first ones).
    assert ranks[0]["seeds"] == [[1, done]] and ranks[1]["seeds"] == [[1, done, distributed.RANK_TAG, 1]]

    # Another world size is refused with one line naming both counts and the command that resumes it.
    plain = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume", str(run_dir)], cwd=tmp_path,
                           env=_env(out), capture_output=True, text=True, timeout=60)
    assert plain.returncode == 2
    assert plain.stderr.startswith("error: cannot resume") and "world size 2" in plain.stderr
    assert "torchrun --nproc_per_node=2 train.py --resume" in plain.stderr and "Traceback" not in plain.stderr


def test_a_one_process_run_refuses_a_two_process_resume(tmp_path: Path) -> None:
    out, run_dir = tmp_path / "out", tmp_path / "run"
    plain = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "total_frames=32", "--run-dir",
                            str(run_dir)], cwd=tmp_path, env=_env(out), capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr
    before = (run_dir / "checkpoint.pt").read_bytes()
    # Rank 0 starts late: rank 1, silent about bad input, must not exit (and have torchrun stop rank 0) before
    # rank 0 has said what is wrong.
    result = _run(tmp_path, 2, ["--resume", str(run_dir), "total_frames=64"], out,
                  extra_env={"DIST_TEST_RANK0_DELAY_S": "0.7"})
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    # One line, from rank 0 only, naming both counts and the command that resumes the run; nothing written.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: cannot resume {run_dir} with 2 processes: it was trained with world size 1; resume it "
                      f"with one process: `python train.py --resume {run_dir}`, or start a new run to change the "
                      "process count"]
    assert (run_dir / "checkpoint.pt").read_bytes() == before and not list(out.glob("rank*.pt"))


# -- the helpers, in one process (world size 1: every collective is a no-op) ----------------------------
@pytest.mark.parametrize("address", [{}, {"MASTER_ADDR": "127.0.0.1"}], ids=["no-address", "no-port"])
def test_a_rank_not_started_by_torchrun_says_why_it_stops(tmp_path: Path, address: dict[str, str]) -> None:
    """A scheduler left RANK=1 and WORLD_SIZE=2 set without torchrun (no MASTER_ADDR, or no MASTER_PORT): there is
    no rank 0 to report for it, so this rank names the problem itself instead of waiting and exiting silently."""
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "total_frames=32", "--run-dir",
                             str(tmp_path / "run")], cwd=tmp_path,
                            env=_env(tmp_path, {"RANK": "1", "WORLD_SIZE": "2", **address}),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error (rank 1): cannot join the process group of WORLD_SIZE=2")
    assert ("MASTER_PORT" if address else "MASTER_ADDR") in errors[0] and "torchrun" in errors[0]  # not silent


def test_rank_seeds_are_unique_and_rank_0_keeps_the_plain_seeds() -> None:
    assert distributed.rank_seed(7, 0) == 7 and distributed.rank_seed([7, 640], 0) == [7, 640]
    assert distributed.rank_rng_seed(7, 0) == 7
    streams = [env_seeds(distributed.rank_seed(entropy, r), 4) for r in range(4) for entropy in (7, [7, 64], [7, 128])]
    flat = [seed for stream in streams for seed in stream]
    assert len(set(flat)) == len(flat)  # no env stream shared between ranks, or with a task switch
    rng_seeds = {distributed.rank_rng_seed(7, r) for r in range(8)}
    assert len(rng_seeds) == 8 and all(0 <= seed < 2**32 for seed in rng_seeds)


def test_one_process_is_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    distributed.setup("cpu")
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.tensor([1.0, 2.0, 3.0])
    grad = param.grad
    assert distributed.average_gradients([param]) is True and param.grad is grad
    assert distributed.mean_over_ranks(np.float64(0.25)) == 0.25 and distributed.agree_stop("SIGINT") == "SIGINT"
    assert distributed.gather_objects({"r": 1.0}) == [{"r": 1.0}]
    distributed.check_resume_world_size(None, "runs/x")  # a run saved before world_size was recorded


def test_bad_distributed_input_is_one_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(distributed.BACKEND_ENV, raising=False)
    assert distributed.choose_backend("cuda") == "nccl" and distributed.choose_backend("cpu") == "gloo"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(distributed.BACKEND_ENV, "nccl")
    with pytest.raises(distributed.DistributedError, match="nccl needs device=cuda"):
        distributed.setup("cpu")
    monkeypatch.setenv(distributed.BACKEND_ENV, "mpi")
    with pytest.raises(distributed.DistributedError, match="must be one of gloo, nccl"):
        distributed.setup("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(distributed.DistributedError, match="WORLD_SIZE='two' is not an integer"):
        distributed.env_world_size()
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(CheckpointError, match="with 4 processes: it was trained with world size 1; resume it with "
                                              "one process"):
        distributed.check_resume_world_size(1, "runs/x")
    with pytest.raises(CheckpointError, match="torchrun --nproc_per_node=2 train.py --resume runs/x"):
        distributed.check_resume_world_size(2, "runs/x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_processes_on_cuda(tmp_path: Path) -> None:
    # NCCL needs a GPU per process; on a one-GPU machine both ranks share it through gloo.
    extra = {} if torch.cuda.device_count() >= 2 else {distributed.BACKEND_ENV: "gloo"}
    out, run_dir = tmp_path / "out", tmp_path / "run"
    result = _run(tmp_path, 2, [*TINY, "device=cuda", "total_frames=128", "--run-dir", str(run_dir)], out,
                  extra_env=extra)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False, map_location="cpu") for r in (0, 1)]
    assert [r["frames"] for r in ranks] == [128, 128]
    assert _same_weights(ranks[0]["state_dict"], ranks[1]["state_dict"])


def test_a_stray_rank_without_a_world_is_rank_0(monkeypatch: pytest.MonkeyPatch) -> None:
    # Some schedulers export RANK for their own purposes: a plain run must still write its files.
    from agents.run_dir import RunLock

    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.rank() == 0 and distributed.is_main() and RunLock(".").rank == 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.rank() == 3 and not distributed.is_main() and RunLock(".").rank == 3
