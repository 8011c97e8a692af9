"""Evaluation during training (``log.eval_envs``): when it runs, what it logs, that it leaves the training's
result as it is, and the refusals of envs it cannot evaluate on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train
from agents.config import load_config
from agents.trainer import Trainer
from policies.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 64 frames per update; evaluation every 128 frames, after updates 2 and 4 of 4.
TINY = ["env.n_envs=2", "algo.n_steps=32", "algo.num_minibatches=1", "core.name=lstm", "core.hidden_size=16",
        "total_frames=256", "log.progress_bar=false"]
EVAL = ["log.eval_envs=[MiniGrid-DoorKey-5x5-v0, MiniGrid-DoorKey-6x6-v0]", "log.eval_interval_frames=128",
        "log.eval_episodes=2", "env.max_episode_steps=20"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_evaluation_is_logged_at_its_interval_and_leaves_training_unchanged(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    Trainer(load_config(None, [*TINY, *EVAL]), tmp_path / "with").run()
    Trainer(load_config(None, [*TINY, "env.max_episode_steps=20"]), tmp_path / "without").run()
    logged = rows(tmp_path / "with")
    assert [r["frames"] for r in logged] == [64, 128, 192, 256]
    evaluated = [r["frames"] for r in logged if "eval/DoorKey-6x6/mean_return" in r]
    assert evaluated == [128, 256]
    for row in logged:
        if row["frames"] in evaluated:
            assert {"eval/DoorKey-5x5/mean_return", "eval/DoorKey-5x5/success_rate",
                    "eval/DoorKey-6x6/success_rate"} <= set(row)
    assert "eval at 128 frames (2 episodes each): mean return DoorKey-5x5 " in capsys.readouterr().out
    # The episodes have their own random streams: the training is the same, bit for bit, without them.
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt")["policy"]["state_dict"] for name in ("with", "without"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not any(key.startswith("eval/") for r in rows(tmp_path / "without") for key in r)


@pytest.mark.parametrize(("override", "message"), [
    ("log.eval_envs=[MiniGrid-DorKey-6x6-v0]", "log.eval_envs: Unknown environment id 'MiniGrid-DorKey-6x6-v0'"),
    ("log.eval_envs=[CartPole-v0, CartPole-v1]", "log.eval_envs: 'CartPole-v0' and 'CartPole-v1' share the short name"),
    ("log.eval_envs=[CartPole-v1]", "log.eval_envs: 'CartPole-v1' does not fit the policy: observation space"),
    ("log.eval_envs=[MiniGrid-DoorKey-6x6-v0, MiniGrid-DoorKey-6x6-v0]",
     "log.eval_envs must be a list of distinct env ids"),
    ("log.eval_envs=MiniGrid-DoorKey-6x6-v0", "log.eval_envs must be"),
    ("log.eval_episodes=0", "log.eval_episodes must be > 0"),
], ids=["unknown-id", "one-short-name", "other-spaces", "twice", "not-a-list", "no-episodes"])
def test_an_env_it_cannot_evaluate_on_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                override: str, message: str) -> None:
    code = train.main([*TINY, override, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_evaluates_at_the_same_frames_and_may_start_or_change_its_evaluation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Trainer(load_config(None, [*TINY, *EVAL]), tmp_path / "run").run(stop_at_frames=192)
    Trainer.resume(tmp_path / "run").run()
    assert [r["frames"] for r in rows(tmp_path / "run") if "eval/DoorKey-5x5/mean_return" in r] == [128, 256]
    # Evaluation changes nothing the run computes, so a resume may add it (as an SB3 EvalCallback is added).
    Trainer(load_config(None, [*TINY, "env.max_episode_steps=20"]), tmp_path / "plain").run(stop_at_frames=128)
    assert train.main(["--resume", str(tmp_path / "plain"), "log.eval_envs=[MiniGrid-DoorKey-6x6-v0]",
                       "log.eval_interval_frames=64", "log.eval_episodes=1"]) == 0, capsys.readouterr().err
    logged = rows(tmp_path / "plain")
    assert [r["frames"] for r in logged if "eval/DoorKey-6x6/mean_return" in r] == [192, 256]
    assert "eval_episodes: 1" in (tmp_path / "plain" / "config.yaml").read_text()


def test_an_evaluation_that_fails_is_a_warning_and_the_update_is_kept(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An eval env that raises mid-episode must not cost the run its update or end train.py in a traceback."""
    import gymnasium as gym

    from tests.test_learning import ENV_ID, CueRecall

    class Breaks(CueRecall):
        def step(self, action: int):
            raise RuntimeError("the simulator lost its licence server")

    if "TestBrokenCueRecall-v0" not in gym.registry:
        gym.register("TestBrokenCueRecall-v0", entry_point=Breaks)
    code = train.main(["env.n_envs=2", "algo.n_steps=32", "algo.num_minibatches=1", "core.name=lstm",
                       "core.hidden_size=8", f"env.id={ENV_ID}", "total_frames=128", "log.progress_bar=false",
                       f"log.eval_envs=[{ENV_ID}, TestBrokenCueRecall-v0]", "log.eval_interval_frames=64",
                       "log.eval_episodes=2", "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0 and "done: 128 frames" in out, out
    assert ("warning: evaluation on TestBrokenCueRecall-v0 at 64 frames failed (RuntimeError: the simulator lost "
            "its licence server); training goes on") in out
    logged = rows(tmp_path / "run")
    assert [r["frames"] for r in logged] == [64, 128]
    assert all("eval/TestCueRecall/mean_return" in r and not any("Broken" in key for key in r) for r in logged)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["frames"] == 128


def test_no_evaluation_starts_once_a_signal_asked_training_to_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM during the update that crosses the interval: the run checkpoints and exits without first
    playing the evaluation's episodes (a scheduler's grace period is short)."""
    import os
    import signal

    from agents import ppo

    original = ppo.RecurrentPPO.update

    def update_then_signal(self, storage):
        stats = original(self, storage)
        os.kill(os.getpid(), signal.SIGTERM)  # during update 1, which ends at the first interval (64 frames)
        return stats

    monkeypatch.setattr(ppo.RecurrentPPO, "update", update_then_signal)
    code = train.main([*TINY, *EVAL, "log.eval_interval_frames=64", "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 143 and "eval at" not in out, out
    (row,) = rows(tmp_path / "run")
    assert row["frames"] == 64 and not any(key.startswith("eval/") for key in row)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["frames"] == 64
