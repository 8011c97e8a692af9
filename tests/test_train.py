"""Tiny real training runs from the command-line entry point, for every core and algorithm."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import train
from agents.config import load_config
from agents.trainer import Trainer
from policies.checkpoint import load_checkpoint
from tests.test_agents import SMALL_CORES

TINY_MINIGRID = ["env.n_envs=4", "algo.n_steps=16", "log.progress_bar=false"]
TINY_ATARI = ["env.id=ALE/Pong-v5", "env.n_envs=2", "algo.n_steps=16", "log.progress_bar=false", "total_frames=32"]
# Only PPO has minibatches (A2C refuses the key).
MINIBATCHES = {"ppo": ["algo.num_minibatches=2"], "a2c": []}


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
@pytest.mark.parametrize("core", list(SMALL_CORES))
def test_tiny_minigrid_run_writes_a_loadable_checkpoint(tmp_path: Path, core: str, algo: str) -> None:
    run_dir = tmp_path / "run"
    code = train.main([f"core.name={core}", *SMALL_CORES[core], f"algo.name={algo}", *TINY_MINIGRID,
                       *MINIBATCHES[algo], "total_frames=192", "--run-dir", str(run_dir)])
    assert code == 0
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["frames"] == 192 and checkpoint["config"]["core"]["name"] == core
    assert checkpoint["config"]["algo"]["name"] == algo
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config == checkpoint["config"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["frames"] for row in rows] == [64, 128, 192]
    for key in ("train/policy_loss", "train/value_loss", "train/entropy", "time/fps"):
        assert all(row[key] is not None and torch.isfinite(torch.tensor(row[key])) for row in rows), key
    # The replay reproduces the rollout before the first gradient step of every update.
    assert all(row["train/first_logprob_error"] < 1e-5 for row in rows)
    if algo == "ppo":
        assert all("train/approx_kl" in row and "train/clip_fraction" in row for row in rows)
    if core in ("rims", "brims"):
        assert any(key.startswith("modules/active") for key in rows[0])
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    # The run records what its rounding depends on, in the checkpoint and in config.yaml's header.
    numerics = checkpoint["numerics"]
    assert numerics["torch"] == str(torch.__version__)
    from policies.native import kernel_build

    if core in ("rims", "brims"):
        assert {k: numerics[k] for k in kernel_build()} == kernel_build()
    # Every core reads the grid through the encoder's C kernel here, and the run says so.
    assert numerics["encoder"] == "c-kernel" and numerics["cpu"] == kernel_build()["cpu"]
    header = (run_dir / "config.yaml").read_text().splitlines()[1]
    assert header.startswith("# Written by a process with: ")
    assert all(f"{key} {value}" in header for key, value in numerics.items())


def test_numerics_name_the_engine_that_runs() -> None:
    # The engine is asked as the core's forward asks: a RIMs core with native=False runs Python.
    from agents.trainer import build_policy, numerics_build
    from envs import make_vec_env

    venv = make_vec_env("MiniGrid-DoorKey-5x5-v0", 1, 0)
    for native in (True, False):
        config = load_config(None, [f"core.native={str(native).lower()}"])
        numerics = numerics_build(build_policy(config, venv.observation_space, venv.action_space))
        if native:
            from policies.native import kernel_build

            assert numerics == {"torch": str(torch.__version__), **kernel_build(), "encoder": "c-kernel"}
        else:
            assert numerics["engine"] == "python" and "does not apply" in numerics["reason"]
    lstm = build_policy(load_config(None, ["core.name=lstm"]), venv.observation_space, venv.action_space)
    assert numerics_build(lstm)["encoder"] == "c-kernel" and "engine" not in numerics_build(lstm)
    lstm.encoder.native = False
    assert numerics_build(lstm) == {"torch": str(torch.__version__),
                                    "encoder": "torch (the kernel does not apply to this encoder or device)"}


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
@pytest.mark.parametrize("core", list(SMALL_CORES))
def test_tiny_atari_run(tmp_path: Path, core: str, algo: str) -> None:
    run_dir = tmp_path / "run"
    code = train.main([f"core.name={core}", *SMALL_CORES[core], f"algo.name={algo}", *TINY_ATARI,
                       *MINIBATCHES[algo], "--run-dir", str(run_dir)])
    assert code == 0
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["observation_space"]["shape"] == [4, 84, 84]
    assert checkpoint["frames"] == 32


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_a_continuous_action_run_trains_saves_and_resumes(tmp_path: Path, algo: str) -> None:
    # Box actions (a diagonal Gaussian policy): saving checked the policy's outputs through dist.mean, which
    # the Gaussian lacked, so every such run crashed at its first checkpoint.
    run_dir = tmp_path / "run"
    common = ["env.id=Pendulum-v1", "core.name=lstm", "core.hidden_size=16", f"algo.name={algo}", *TINY_MINIGRID[:2],
              *MINIBATCHES[algo], "log.progress_bar=false"]
    assert train.main([*common, "total_frames=64", "--run-dir", str(run_dir)]) == 0
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["action_space"]["type"] == "Box" and checkpoint["frames"] == 64
    assert train.main(["--resume", str(run_dir), "total_frames=128"]) == 0
    assert load_checkpoint(run_dir / "checkpoint.pt")["frames"] == 128


def test_box_actions_reach_the_env_clipped_and_are_stored_as_sampled(tmp_path: Path) -> None:
    # As SB3: the env gets the Gaussian sample clipped to its bounds; the update needs the sample itself.
    config = load_config(None, ["env.id=Pendulum-v1", "core.name=lstm", "core.hidden_size=16", *TINY_MINIGRID[:2],
                                "algo.num_minibatches=1", "total_frames=64", "policy.head_hidden_size=8"])
    trainer = Trainer(config, tmp_path / "run")
    with torch.no_grad():
        trainer.policy.log_std.fill_(2.0)  # a spread of e^2 ~ 7.4: most samples fall outside [-2, 2]
    sent: list[np.ndarray] = []
    step = trainer.venv.step
    trainer.venv.step = lambda actions: (sent.append(np.array(actions)), step(actions))[1]
    trainer.run(stop_at_frames=trainer.frames_per_rollout)
    stored = trainer.storage.actions.numpy()
    assert np.abs(stored).max() > 2.0 and np.abs(np.concatenate(sent)).max() <= 2.0
    np.testing.assert_array_equal(np.concatenate(sent), np.clip(stored.reshape(-1, 1), -2.0, 2.0))


def test_same_seed_gives_same_first_updates(tmp_path: Path) -> None:
    overrides = [*TINY_MINIGRID, *MINIBATCHES["ppo"], "total_frames=640", "log.progress_bar=false"]
    weights = []
    for name in ("a", "b"):
        Trainer(load_config(None, overrides), tmp_path / name).run()
        weights.append(load_checkpoint(tmp_path / name / "checkpoint.pt")["policy"]["state_dict"])
    rows = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("a", "b")]
    assert len(rows[0]) == 10
    for row_a, row_b in zip(*rows, strict=True):
        assert row_a["train/policy_loss"] == row_b["train/policy_loss"]
        assert row_a["train/value_loss"] == row_b["train/value_loss"]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_default_run_name_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert train.main([*TINY_MINIGRID, *MINIBATCHES["ppo"], "total_frames=64", "core.num_modules=2",
                       "core.module_size=8", "core.k_active=1"]) == 0
    assert (tmp_path / "runs" / "doorkey-5x5-rims-ppo" / "checkpoint.pt").is_file()
    # A second run of the same config never replaces the first: it takes the next free suffix.
    first = (tmp_path / "runs" / "doorkey-5x5-rims-ppo" / "checkpoint.pt").read_bytes()
    assert train.main([*TINY_MINIGRID, *MINIBATCHES["ppo"], "total_frames=64", "core.num_modules=2",
                       "core.module_size=8", "core.k_active=1"]) == 0
    assert (tmp_path / "runs" / "doorkey-5x5-rims-ppo_2" / "checkpoint.pt").is_file()
    assert (tmp_path / "runs" / "doorkey-5x5-rims-ppo" / "checkpoint.pt").read_bytes() == first


def test_overrides_are_accepted_anywhere_on_the_command_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = ["core.name=lstm", "env.id=MiniGrid-Empty-5x5-v0", "--run-dir", str(run_dir), "total_frames=64",
            "core.hidden_size=16", "--debug", *TINY_MINIGRID, *MINIBATCHES["ppo"]]
    args = train.parse_args(argv)
    assert args.run_dir == run_dir and args.debug
    assert args.overrides[:2] == ["core.name=lstm", "env.id=MiniGrid-Empty-5x5-v0"]
    assert "total_frames=64" in args.overrides and "core.hidden_size=16" in args.overrides
    assert train.main(argv) == 0
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["frames"] == 64 and checkpoint["config"]["env"]["id"] == "MiniGrid-Empty-5x5-v0"
    assert checkpoint["config"]["core"] == {"name": "lstm", "hidden_size": 16}


def test_progress_bar_shows_no_nan_and_ends_at_the_frames_done(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # 40 frames in updates of 32: the run does 64, and the bar counts to 64, not to 40.
    config = load_config(None, [*TINY_MINIGRID, *MINIBATCHES["ppo"], "core.name=lstm", "core.hidden_size=16",
                                "env.n_envs=2", "log.progress_bar=true", "total_frames=40"])
    trainer = Trainer(config, tmp_path / "run")
    trainer.run()
    assert trainer.frames == 64
    err = capsys.readouterr().err
    displays = [part for part in err.replace("\r", "\n").split("\n") if part.strip()]
    assert displays and "64/64" in displays[-1] and "ret=-" in displays[-1]
    assert not any("nan" in part or "/40 " in part for part in displays)
    # Every display of the final count shows the same numbers (no last line with other figures).
    assert len({part.split("<")[0] + part.split(",", 1)[-1] for part in displays if "64/64" in part}) == 1


@pytest.mark.parametrize("env", [{"RANK": "3"}, {"RANK": "1", "WORLD_SIZE": "two"}])
def test_a_stray_rank_outside_torchrun_still_says_what_is_wrong(env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A ``RANK`` a scheduler left (no ``WORLD_SIZE`` above 1, or one that is not a number) is not a torchrun
    rank: bad input gets its message at once, not the silence (and the wait) of a torchrun rank > 0."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    assert train.main(["core.nmae=lstm"]) == 2
    assert capsys.readouterr().err.startswith("error: ") and time.monotonic() - started < 5
