"""Bad input gets one clear error; interruption, crashes and NaNs never lose saved work."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from agents.config import ConfigError, load_config
from agents.run_dir import holds_run
from agents.trainer import Trainer, TrainingError
from policies import checkpoint as checkpoint_module
from policies.checkpoint import CheckpointError, DamagedCheckpointError, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = ["env.n_envs=2", "algo.n_steps=16", "algo.num_minibatches=1", "log.progress_bar=false",
        "core.num_modules=3", "core.module_size=8", "core.k_active=2"]


def run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = train.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["algo.lrr=1e-3"], "unknown config key 'algo.lrr'"),
        (["algo.lr=abc"], "algo.lr must be a number"),
        (["algo.lr=-0.1"], "algo.lr must be > 0"),
        (["core.k_active=9", "core.num_modules=4"], "k_active"),
        (["env.n_envs=0"], "env.n_envs must be between 1 and 65,536"),
        (["env.n_envs=100000000"], "env.n_envs must be between 1 and 65,536"),
        (["total_frames=0"], "total_frames must be > 0"),
        (["--config", "no/such/file.yaml"], "config file not found"),
        (["env.id=MiniGrid-DoorKey-5x5-v1"], "MiniGrid-DoorKey-5x5-v0"),
        (["env.id=CartPole-v1"], None),  # a valid non-MiniGrid id trains (MLP encoder)
        (["env.env_kwargs={bogus: 1}"], "env:"),
        (["--resume", "no/such/run"], "checkpoint file not found"),
        (["--resume", "a" * 300], "cannot use --resume"),  # a name too long: one line, not an OSError
        (["core=lstm"], "core must be a mapping"),
        (["device=gpu"], "device must be a torch device"),
        (["device=xpu"], "device='xpu' is not available on this machine"),
        *([(["device=cuda:9"], "device='cuda:9' but no CUDA GPU is available")] if not torch.cuda.is_available() else []),
        (["device=meta"], "device must be a torch device"),
        (["seed=8589934592"], "seed must be in [0, 2**32)"),
        (["core.dropout=0.2"], "core.dropout > 0 is not supported"),
        (["algo.seq_len=5"], "algo.seq_len=5 must divide algo.n_steps=16"),
        (["env.env_kwargs={agent_view_size: 3}"], "at least 4x4"),
        (["env.env_kwargs={size: 2}"], "env.env_kwargs={'size': 2} rejected by MiniGrid-DoorKey-5x5-v0"),
        (["env.vec_env=subproc", "env.env_kwargs={size: 2}"], "env.env_kwargs={'size': 2} rejected by"),
        # Built, but fails at the first reset (no room for the door and key): refused before the run writes.
        (["env.env_kwargs={size: 3}"], "env.env_kwargs={'size': 3} rejected by MiniGrid-DoorKey-5x5-v0 at its first"),
        (["env.vec_env=subproc", "env.env_kwargs={size: 3}"], "rejected by MiniGrid-DoorKey-5x5-v0 at its first"),
        (["torch_threads=0"], "torch_threads must be between 1 and"),
        # ~10^18 bytes of head weights, more than a 64-bit CPU can address (2^57), so the allocation fails at once
        # whatever the machine's memory or overcommit policy: one line naming the sizes, not torch's error.
        (["policy.head_hidden_size=10000000000000000"], "not enough memory to build the run"),
        # SB3's image check refuses a stack deeper than the frame is wide: the setting that did it is named.
        (["env.id=ALE/Pong-v5", "env.frame_stack=1000"], "env.frame_stack=1000 rejected by ALE/Pong-v5"),
        (["algo.lr=1e-60"], "representable in float32"),
        # 0 in float32: the first update's outputs were non-finite, a message that did not name eps.
        (["algo.optimizer_eps=1e-50"], "algo.optimizer_eps must be > 0 and representable in float32"),
        # Only Atari frames are stacked: on MiniGrid it was recorded in config.yaml and did nothing.
        (["env.frame_stack=7"], "env.frame_stack=7 applies to Atari ids only; MiniGrid-DoorKey-5x5-v0"),
        # A core's range error named no section ("k_active must be between ...").
        (["core.k_active=9"], "core 'rims' setting: k_active must be between 1 and num_modules=3, got 9"),
        # torch's allocator failed with its C++ backtrace.
        (["core.module_size=100000000000000000000"], "core.module_size must be below 2**31 in size"),
    ],
)
def test_bad_training_input_exits_2_with_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str | None
) -> None:
    extra = ["--run-dir", str(tmp_path / "run")] if "--resume" not in argv else []
    code, err = run_main(capsys, [*TINY, "total_frames=32", *argv, *extra] if "--resume" not in argv else argv)
    if message is None:
        assert code == 0, err
        return
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not holds_run(tmp_path / "run")  # nothing written: the same --run-dir can take the corrected run


def test_a_path_in_the_wrong_place_names_the_option_it_was_meant_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `python train.py x.yaml` (no --config), a checkpoint given as the config, a relative folder given as the
    # config (it was "not found", its folder named twice) and a repeated --config (the last one won, silently).
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    torch.save({"weights": torch.zeros(2)}, checkpoint)
    (tmp_path / "configs").mkdir()
    monkeypatch.chdir(tmp_path)
    cases = [
        (["configs/minigrid/doorkey-lstm-ppo.yaml"],
         "must look like key=value, e.g. core.k_active=3; to train a config file give `--config "
         "configs/minigrid/doorkey-lstm-ppo.yaml`"),
        ([str(checkpoint.parent)], f"to continue that run give `--resume {checkpoint.parent}`"),
        (["--config", str(checkpoint)],
         f"config file {checkpoint} is a checkpoint, not a YAML config: continue its run with `--resume "
         f"{checkpoint.parent}`, start a new run from its weights with `init_from={checkpoint}`"),
        (["--config", "configs"], "config file configs is a folder; give a YAML file"),
    ]
    for argv, message in cases:
        code, err = run_main(capsys, argv)
        assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exited:
        train.main(["--config", "a.yaml", "--config", "b.yaml"])
    assert exited.value.code == 2
    assert "--config given twice (a.yaml and b.yaml): give it once" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "run"]  # no run started


def test_resume_of_a_folder_without_a_run_leaves_it_as_it_was(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("x")
    code, err = run_main(capsys, ["--resume", str(folder)])
    assert code == 2 and "checkpoint file not found" in err and err.count("\n") == 1
    assert sorted(p.name for p in folder.iterdir()) == ["todo.txt"]  # no .lock left behind


def test_resume_of_a_checkpoint_file_names_its_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    code, err = run_main(capsys, ["--resume", str(checkpoint)])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "takes a run directory, not a file" in err and f"give the run's folder, {checkpoint.parent}" in err, err
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["checkpoint.pt"]
    numbered = checkpoint.parent / "checkpoints" / "checkpoint_000000000064.pt"  # the folder named is the run's
    numbered.parent.mkdir()
    numbered.write_bytes(b"weights")
    code, err = run_main(capsys, ["--resume", str(numbered)])
    assert code == 2 and f"give the run's folder, {checkpoint.parent};" in err, err


@pytest.mark.parametrize("option", ["--run-dir", "--resume", "--config"])
def test_an_empty_path_is_refused_not_read_as_the_current_directory(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        train.main([option, ""])
    assert stop.value.code == 2 and f"argument {option}: an empty path" in capsys.readouterr().err


def test_invalid_yaml_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("core: {name: rims\n")
    code, err = run_main(capsys, ["--config", str(bad)])
    assert code == 2 and "not valid YAML" in err and str(bad) in err


@pytest.mark.parametrize("text", ["", "# settings to come\n", "{}\n"])
def test_a_config_file_without_settings_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    text: str) -> None:
    """It trained the fields' own defaults (100k frames of a RIMs config that is not the embedded default)."""
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    code, err = run_main(capsys, ["--config", str(empty), "--run-dir", str(tmp_path / "run")])
    assert code == 2 and err == (f"error: config file {empty} holds no settings (empty, or only comments); give a "
                                 "config, or leave out --config to train the embedded default\n"), err
    assert not (tmp_path / "run").exists()


def test_a_sigterm_while_starting_up_stops_the_run_as_a_ctrl_c_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # A real SIGTERM to this process while the trainer is being built (its envs, seconds in a real start):
    # it killed train.py silently (status -15) and left the new run's folder empty, to look like a run.
    built = Trainer.__init__

    def terminated_while_building(self: Trainer, *args: object, **kwargs: object) -> None:
        built(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises within this

    def caller_handler(signum: int, _frame: object) -> None:  # would the signal reach it, pytest lives on
        received.append(signum)

    received: list[int] = []
    monkeypatch.setattr(Trainer, "__init__", terminated_while_building)
    signal.signal(signal.SIGTERM, caller_handler)
    try:
        started = time.monotonic()
        code, err = run_main(capsys, [*TINY, "--run-dir", str(tmp_path / "run")])
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert code == 128 + signal.SIGTERM and err == "stopped by SIGTERM; no checkpoint had been written yet\n", err
    assert time.monotonic() - started < 5 and not received, "train.py's start must take the signal and stop"
    assert not (tmp_path / "run").exists()
    assert after is caller_handler, "main() leaves the caller's SIGTERM handler as it found it"


def test_unreadable_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    code, err = run_main(capsys, ["--config", str(binary)])
    assert code == 2 and f"config file {binary} is not a text file (not UTF-8); give a YAML config" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_second_ctrl_c_before_the_first_checkpoint_says_none_was_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def second_ctrl_c(self: Trainer, **kwargs: object) -> Path:  # the trainer's handler re-raises a second SIGINT as this
        raise KeyboardInterrupt

    tiny_trainer(tmp_path / "done").run(stop_at_frames=32)
    monkeypatch.setattr(Trainer, "run", second_ctrl_c)
    code, err = run_main(capsys, [*TINY, "--run-dir", str(tmp_path / "run")])
    # Said "the last checkpoint written is intact" when there was none.
    assert code == 130 and err == "interrupted; no checkpoint had been written yet\n", err
    assert not (tmp_path / "run").exists()  # interrupted while starting: no empty folder left to look like a run
    code, err = run_main(capsys, ["--resume", str(tmp_path / "done")])
    assert code == 130 and err.endswith("interrupted; the last checkpoint written is intact\n"), err


def test_non_finite_weights_in_a_checkpoint_are_named_on_resume_and_init_from(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Training never saves nan weights; a checkpoint changed afterwards to hold them was called "the last good
    checkpoint" on --resume and, as init_from, made the new run's first loss non-finite ("lower algo.lr")."""
    run = tmp_path / "run"
    tiny_trainer(run).run(stop_at_frames=32)
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    name, weight = next(iter(checkpoint["policy"]["state_dict"].items()))
    weight.view(-1)[0] = float("inf")
    save_checkpoint(run / "checkpoint.pt", checkpoint)
    code, err = run_main(capsys, ["--resume", str(run)])
    assert code == 2 and f"holds non-finite weights (nan or inf in {name})" in err and "Traceback" not in err, err
    assert f"numbered checkpoints are kept in {run / 'checkpoints'} (newest checkpoint_000000000032.pt)" in err
    code, err = run_main(capsys, [*TINY, "total_frames=64", f"init_from={run / 'checkpoint.pt'}",
                                  "--run-dir", str(tmp_path / "new")])
    assert code == 2 and "init_from:" in err and "holds non-finite weights" in err and "algo.lr" not in err, err
    assert not (tmp_path / "new" / "checkpoint.pt").exists()


def test_resume_override_is_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_trainer(tmp_path).run(stop_at_frames=32)
    code, err = run_main(capsys, ["--resume", str(tmp_path), "total_frames=lots"])
    assert code == 2 and "total_frames must be an integer" in err
    code, err = run_main(capsys, ["--resume", str(tmp_path), "algo.lr=1"])
    assert code == 2 and ("only total_frames, device, torch_threads, log.eval_envs, log.eval_interval_frames, log.eval_episodes and "
                          "log.progress_bar can") in err
    code, err = run_main(capsys, ["--resume", str(tmp_path), "env.env_kwargs={size: 5}"])
    assert code == 2 and "env.env_kwargs.size cannot change" in err  # a mapping's new entry counts too
    for key, value in (("core.name", "lstm"), ("algo.name", "a2c")):  # named as typed, not by a key it drops
        code, err = run_main(capsys, ["--resume", str(tmp_path), f"{key}={value}"])
        assert code == 2 and f"{key} cannot change on --resume" in err and "unknown config key" not in err, err
    code, err = run_main(capsys, ["--resume", str(tmp_path), "total_frame=64"])
    assert code == 2 and "unknown config key 'total_frame'" in err  # a typo is named, not "cannot change"
    # The run's own values may be repeated (a scheduler's command line that always passes them).
    code, err = run_main(capsys, ["--resume", str(tmp_path), "log.progress_bar=false", "env.n_envs=2",
                                  "total_frames=64"])
    assert code == 0, err


def test_a_gpu_run_continues_on_a_cpu_machine(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Said "use device=cpu", then refused device=cpu as a change on --resume.
    tiny_trainer(tmp_path).run(stop_at_frames=32)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    checkpoint["config"]["device"] = "cuda"  # as a run trained on a GPU machine saved it
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_main(capsys, ["--resume", str(tmp_path), "total_frames=64"])
    assert code == 2 and f"continue the run on the CPU with `python train.py --resume {tmp_path} device=cpu`" in err
    code, err = run_main(capsys, ["--resume", str(tmp_path), "total_frames=64", "device=cpu", "torch_threads=1"])
    assert code == 0, err
    assert "note: the run continues with device=cpu (was cuda)" in err
    resumed = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert resumed["frames"] == 64 and resumed["config"]["device"] == "cpu"


def test_missing_atari_roms_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    from ale_py import roms

    monkeypatch.setattr(roms, "get_rom_path", lambda game: None)
    code, err = run_main(capsys, ["env.id=ALE/Pong-v5", *TINY, "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "ROM" in err and "pong" in err.lower()


def test_debug_flag_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    # The error itself, raised where it arose (not wrapped, and not printed as the one-line message).
    with pytest.raises(ConfigError, match="algo.lrr"):
        train.main(["algo.lrr=1", "--debug"])
    assert capsys.readouterr().err == ""


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "train.py", "core.k_active=0"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "k_active" in result.stderr and "Traceback" not in result.stderr


def tiny_trainer(run_dir: Path, *extra: str) -> Trainer:
    return Trainer(load_config(None, [*TINY, "total_frames=128", *extra]), run_dir)


def test_kill_between_write_and_rename_keeps_previous_checkpoint(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = tiny_trainer(tmp_path)
    trainer.run(stop_at_frames=32)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def killed() -> None:
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(checkpoint_module, "_before_rename_hook", killed)
    trainer.frames += 1000  # a later checkpoint that never lands
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "checkpoint.pt")["frames"] == 32
    leftovers = [p.name for p in tmp_path.rglob("*.tmp")]
    assert leftovers == []


def test_failed_numbered_copy_leaves_checkpoint_pt_newest_and_resume_writes_it(tmp_path: Path) -> None:
    # The final save fails after checkpoint.pt (here: a folder where the numbered copy goes; in life a full disk).
    # checkpoint.pt must hold the newest weights and no numbered checkpoint may be ahead of it: a study counts
    # training done from the numbered checkpoints and fine-tunes from checkpoint.pt.
    tiny_trainer(tmp_path, "log.checkpoint_interval_frames=64").run(stop_at_frames=64)
    blocker = tmp_path / "checkpoints" / "checkpoint_000000000128.pt"
    blocker.mkdir()
    with pytest.raises(TrainingError, match="checkpoint_000000000128.pt"):
        Trainer.resume(tmp_path).run()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["frames"] == 128
    assert max(checkpoint_module.numbered_checkpoints(tmp_path / "checkpoints")) == 64
    blocker.rmdir()
    resumed = Trainer.resume(tmp_path)
    resumed.run()  # at its budget already: trains nothing, writes the missing copy
    assert resumed.frames == 128
    assert blocker.read_bytes() == (tmp_path / "checkpoint.pt").read_bytes()


def test_keeps_only_the_last_n_checkpoints(tmp_path: Path) -> None:
    tiny_trainer(tmp_path, "log.checkpoint_interval_frames=32", "log.keep_checkpoints=2").run()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["checkpoint_000000000096.pt", "checkpoint_000000000128.pt"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["frames"] == 128


# What a resume must restore beyond the weights, case by case: the minibatch shuffle's generator, RMSprop's
# state (A2C), the fused LSTM/GRU state, chunked sequences, continuous actions and their sampling.
RESUME_CASES = {
    "rims-ppo": (),
    "rims-ppo-2-minibatches": ("algo.num_minibatches=2",),
    "lstm-a2c": ("core.name=lstm", "core.hidden_size=16", "algo.name=a2c"),
    "gru-ppo-chunked": ("core.name=gru", "core.hidden_size=16", "algo.seq_len=8", "algo.num_minibatches=2"),
    "lstm-ppo-pendulum": ("core.name=lstm", "core.hidden_size=16", "env.id=Pendulum-v1"),
}


def resume_case_config(case: str, run_dir: Path, *extra: str) -> Trainer:
    rims = not any(o.startswith("core.name=") for o in RESUME_CASES[case])
    base = [o for o in TINY if rims or not o.startswith("core.")]
    if "algo.name=a2c" in RESUME_CASES[case]:
        base = [o for o in base if not o.startswith("algo.num_minibatches")]
    return Trainer(load_config(None, [*base, "total_frames=128", *RESUME_CASES[case], *extra]), run_dir)


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_equals_uninterrupted_training(tmp_path: Path, case: str) -> None:
    extra = ("algo.anneal_lr=true", "total_frames=160")
    whole = resume_case_config(case, tmp_path / "whole", *extra)
    first_weights = {key: value.clone() for key, value in whole.policy.state_dict().items()}
    whole.run()
    interrupted = resume_case_config(case, tmp_path / "split", *extra)
    interrupted.run(stop_at_frames=64)
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["frames"] == 64
    resumed = Trainer.resume(tmp_path / "split")
    assert resumed.frames == 64
    resumed.run()
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["frames"] == b["frames"] == 160
    for key, value in a["policy"]["state_dict"].items():
        assert torch.equal(value, b["policy"]["state_dict"][key]), key
    assert any(not torch.equal(value, whole_start) for value, whole_start in  # training did change something
               zip(a["policy"]["state_dict"].values(), first_weights.values()))
    # TensorBoard/JSONL steps continue where they stopped: one row per update, no duplicates.
    rows = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 5


def test_resume_with_a_stale_or_foreign_env_snapshot_starts_fresh_episodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_trainer(tmp_path).run(stop_at_frames=64)
    snapshot = tmp_path / "envs_state.pkl"
    # A kill between the env snapshot and the checkpoint: the snapshot belongs to a later point.
    trainer = Trainer.resume(tmp_path)
    trainer.frames += 32
    trainer.save()
    (tmp_path / "checkpoint.pt").unlink()
    os.link(tmp_path / "checkpoints" / "checkpoint_000000000064.pt", tmp_path / "checkpoint.pt")
    stale = Trainer.resume(tmp_path)
    assert stale.rollout_state is None and stale.frames == 64
    stale.run()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["frames"] == 128
    # A snapshot written under another user's key is never unpickled.
    monkeypatch.setenv("MODULAR_RL_KEY_FILE", str(tmp_path / "other-user.key"))
    marker = tmp_path / "pwned"
    snapshot.write_bytes(bytes(32) + pickle.dumps(_RunsCode(marker)))
    capsys.readouterr()
    foreign = Trainer.resume(tmp_path, {"total_frames": 160})
    assert foreign.rollout_state is None
    # The warning cannot tell a damaged file from another user's: it names both.
    assert "is damaged or was not written by this user" in capsys.readouterr().err
    assert not marker.exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, "log.checkpoint_interval_frames=32")
    trainer.run(stop_at_frames=32)
    good = load_checkpoint(tmp_path / "checkpoint.pt")
    with torch.no_grad():  # poison the critic: the next value loss is NaN
        trainer.policy.critic[-1].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="not overwritten"):
        trainer.run()
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["frames"] == 32
    for key, value in after["policy"]["state_dict"].items():
        assert torch.equal(value, good["policy"]["state_dict"][key])
        assert torch.isfinite(value).all()


def test_nan_action_logits_in_the_rollout_stop_with_a_clear_error(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, "log.checkpoint_interval_frames=32")
    trainer.run(stop_at_frames=32)
    with torch.no_grad():  # poison the actor: the next rollout's logits are NaN
        trainer.policy.actor[-1].bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match="non-finite action probabilities during the rollout"):
        trainer.run()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["frames"] == 32


def test_nan_through_the_cli_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from agents import ppo

    original = ppo.RecurrentPPO.update

    def poisoned(self, storage):
        storage.returns.fill_(float("inf"))
        return original(self, storage)

    monkeypatch.setattr(ppo.RecurrentPPO, "update", poisoned)
    code, err = run_main(capsys, [*TINY, "total_frames=64", "--run-dir", str(tmp_path)])
    assert code == 2 and "the loss is inf" in err and "No checkpoint had been written yet" in err
    assert "Traceback" not in err


def test_a_signal_during_the_last_update_is_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM that arrives while the update reaching total_frames runs: the run is complete, so train.py
    says done and exits 0 (a scheduler must not requeue a finished job), with the final checkpoint written."""
    from agents import ppo

    original, calls = ppo.RecurrentPPO.update, []

    def update_then_signal(self, storage):
        stats = original(self, storage)
        calls.append(1)
        if len(calls) == 2:  # the second of the two 32-frame updates: the last one
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler runs now, in the update's wake
        return stats

    monkeypatch.setattr(ppo.RecurrentPPO, "update", update_then_signal)
    code = train.main([*TINY, "total_frames=64", "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0 and "done: 64 frames" in out and "--resume" not in out, out
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["frames"] == 64 and len(calls) == 2


def test_sigterm_checkpoints_and_the_run_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "train.py", *TINY, "total_frames=100000000", "log.progress_bar=false",
         "--run-dir", str(run_dir)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "training never logged an update"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err  # 128 + SIGTERM: a scheduler sees the job did not finish
    assert "--resume" in out + err and "done:" not in out
    frames = load_checkpoint(run_dir / "checkpoint.pt")["frames"]
    assert frames >= 32
    resumed = Trainer.resume(run_dir, {"total_frames": frames + 32})
    resumed.run()
    assert load_checkpoint(run_dir / "checkpoint.pt")["frames"] == frames + 32


def test_a_second_ctrl_c_aborts_train_py_and_leaves_an_intact_checkpoint(tmp_path: Path) -> None:
    """A real train.py, checkpointing every update, gets two SIGINTs 50 ms apart: the first asks it to stop
    after the update, the second (inside that update's rollout, its backward or its checkpoint write) aborts.
    The run ends with one line and the interrupt's exit code, and no half-written file is left."""
    run_dir = tmp_path / "run"
    # Updates of 2 x 2048 steps (about a second on an idle CPU, more under load); the first signal is sent 0.3 s
    # after the first checkpoint appears, inside the next update (sent at once, it could land in the first
    # update's last steps, whose stop check then ended the run within 50 ms: the second signal met an exiting
    # process), and the second 50 ms later, while the first is being honoured.
    frames_per_update = 2 * 2048
    process = subprocess.Popen(
        [sys.executable, "train.py", *TINY, "algo.n_steps=2048", "log.checkpoint_interval_frames=32",
         "total_frames=100000000", "--run-dir", str(run_dir)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "training never wrote a checkpoint"
        time.sleep(0.02)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err == "interrupted; the last checkpoint written is intact\n", err
    assert "stopped after" not in out  # the first signal's orderly stop did not finish
    assert not [p.name for p in run_dir.rglob("*") if ".tmp" in p.name]
    frames = load_checkpoint(run_dir / "checkpoint.pt")["frames"]
    assert frames >= frames_per_update
    resumed = Trainer.resume(run_dir, {"total_frames": frames + frames_per_update})
    resumed.run()
    assert load_checkpoint(run_dir / "checkpoint.pt")["frames"] == frames + frames_per_update


def test_crashed_subprocess_env_saves_and_names_the_env(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, "env.vec_env=subproc")
    trainer.run(stop_at_frames=32)
    base = trainer.venv
    while hasattr(base, "venv"):
        base = base.venv
    checkpoint = tmp_path / "checkpoint.pt"
    before = checkpoint.stat()
    os.kill(base.processes[1].pid, signal.SIGKILL)
    base.processes[1].join(timeout=30)
    with pytest.raises(TrainingError, match="env 1") as crash:
        trainer.run()
    # The crash path wrote a checkpoint of its own (atomically: a new file), of the last finished update,
    # and says so; the run then resumes from it.
    assert f"Checkpoint saved to {checkpoint}" in str(crash.value) and "--resume" in str(crash.value)
    after = checkpoint.stat()
    assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)
    assert load_checkpoint(checkpoint)["frames"] == 32
    for process in base.processes:  # the surviving env, which train.py's exit would end
        process.kill()
        process.join(timeout=30)
    resumed = Trainer.resume(tmp_path, {"total_frames": 64})
    resumed.run()
    resumed.venv.close()
    assert load_checkpoint(checkpoint)["frames"] == 64


class _RunsCode:
    """Pickles to a call that creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with (run_dir / "checkpoint.pt").open("wb") as handle:
        torch.save({"format": checkpoint_module.FORMAT, "payload": _RunsCode(marker)}, handle)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(run_dir / "checkpoint.pt")
    code, err = run_main(capsys, ["--resume", str(run_dir)])
    assert code == 2 and "refusing to load" in err
    assert not marker.exists()
    # The same object really does run code under a plain pickle load: the test would catch a regression.
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()


def test_a_damaged_checkpoint_points_to_the_numbered_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_trainer(tmp_path, "log.checkpoint_interval_frames=32").run(stop_at_frames=96)
    kept = sorted((tmp_path / "checkpoints").glob("checkpoint_*.pt"))
    assert len(kept) >= 2
    newest = kept[-1].read_bytes()
    with (tmp_path / "checkpoint.pt").open("r+b") as handle:  # damaged in place: a file of its own
        handle.truncate(100)
    assert kept[-1].read_bytes() == newest  # the numbered copy is whole
    code, err = run_main(capsys, ["--resume", str(tmp_path)])
    assert code == 2 and "truncated or corrupt" in err and err.count("\n") == 1
    assert f"numbered checkpoints are kept in {tmp_path / 'checkpoints'} (newest {kept[-1].name})" in err
    assert f"move {tmp_path / 'checkpoint.pt'} out of the run directory" in err
    # Doing what it says: the damaged file goes, the newest numbered one is copied in.
    aside = tmp_path.parent / f"{tmp_path.name}-damaged"
    aside.mkdir()
    (tmp_path / "checkpoint.pt").rename(aside / "checkpoint.pt")
    shutil.copy(kept[-1], tmp_path / "checkpoint.pt")
    code, err = run_main(capsys, ["--resume", str(tmp_path)])
    assert code == 0, err
    assert kept[-1].read_bytes() == newest  # trained on from it, the numbered file untouched


def test_rolling_back_checkpoint_pt_leaves_the_numbered_checkpoints_alone(tmp_path: Path) -> None:
    # checkpoint.pt was a hard link to the newest numbered checkpoint: `cp <older> checkpoint.pt` wrote the older
    # weights into the newest numbered file too, which then held other frames than its name said.
    tiny_trainer(tmp_path, "log.checkpoint_interval_frames=32").run(stop_at_frames=96)
    kept = sorted((tmp_path / "checkpoints").glob("checkpoint_*.pt"))
    newest = kept[-1].read_bytes()
    assert (tmp_path / "checkpoint.pt").read_bytes() == newest
    assert (tmp_path / "checkpoint.pt").stat().st_ino != kept[-1].stat().st_ino
    with (tmp_path / "checkpoint.pt").open("wb") as handle:  # what cp does: write into the existing file
        handle.write(kept[-2].read_bytes())
    assert kept[-1].read_bytes() == newest


def test_train_and_evaluate_name_a_non_checkpoint_alike(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import evaluate

    config = tmp_path / "doorkey.yaml"
    config.write_text("core: {name: lstm}\nenv: {id: MiniGrid-DoorKey-5x5-v0}\n")
    expected = f"{config} is a YAML/text file (a config? train with it: python train.py --config FILE)"
    code, err = run_main(capsys, [*TINY, f"init_from={config}", "--run-dir", str(tmp_path / "run")])
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert evaluate.main([str(config), "--no-progress"]) == 2
    assert expected in capsys.readouterr().err


def test_a_study_file_as_config_and_a_damaged_init_from_say_what_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A study file gave "unknown config key 'description'"; a truncated init_from file lacked the "init_from:" of
    # the other init_from errors.
    study_file = "configs/studies/doorkey-generalization.yaml"
    code, err = run_main(capsys, ["--config", study_file])
    assert code == 2 and err == (f"error: config file {study_file} is a study file, not a training config: run it "
                                 f"with `python study.py run {study_file}`\n")
    tiny_trainer(tmp_path / "done").run(stop_at_frames=32)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "done" / "checkpoint.pt").read_bytes()[:3000])
    code, err = run_main(capsys, [*TINY, f"init_from={truncated}", "--run-dir", str(tmp_path / "run")])
    assert code == 2 and err.startswith(f"error: init_from: cannot read checkpoint {truncated}") and \
        err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_whose_weights_changed_on_disk_is_refused_not_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch.load checks no checksum: a flipped byte inside a stored tensor loaded silently and evaluated to
    other numbers. The zip records' CRCs catch it, and an SB3 save (a zip too) is named as what it is."""
    import zipfile

    import evaluate

    tiny_trainer(tmp_path / "run").run(stop_at_frames=32)
    data = bytearray((tmp_path / "run" / "checkpoint.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "run" / "checkpoint.pt") as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)  # the largest tensor's bytes
        start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra)
    data[start + record.file_size // 2] ^= 0x80  # one flipped sign bit in the middle of the weights
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpointError, match=f"its record {record.filename} fails its checksum"):
        load_checkpoint(damaged)
    assert evaluate.main([str(damaged), "--episodes", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "fails its checksum" in err and "Traceback" not in err and err.count("\n") == 1
    sb3_save = tmp_path / "model.zip"  # the layout of Stable-Baselines3's model.save
    with zipfile.ZipFile(sb3_save, "w") as archive:
        archive.writestr("data", "{}")
        archive.writestr("policy.pth", b"")
    with pytest.raises(CheckpointError, match="is a zip archive but not a torch checkpoint .a Stable-Baselines3 save"):
        load_checkpoint(sb3_save)
    # Written with torch's checksums turned off (every CRC 0): nothing to check, and it loads.
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(payload, tmp_path / "no-crc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert load_checkpoint(tmp_path / "no-crc.pt")["frames"] == payload["frames"]


@pytest.mark.parametrize("kind", ["truncated", "foreign", "version"])
def test_unusable_checkpoints_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    source = tmp_path / "src"
    tiny_trainer(source).run(stop_at_frames=32)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = run_dir / "checkpoint.pt"
    if kind == "truncated":
        data = (source / "checkpoint.pt").read_bytes()
        target.write_bytes(data[: len(data) // 2])
        expected = "truncated or corrupt"
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, target)
        expected = "not a checkpoint of this package"
    else:
        payload = torch.load(source / "checkpoint.pt", weights_only=True)
        payload["format_version"] = 999
        torch.save(payload, target)
        expected = "format version 999"
    code, err = run_main(capsys, ["--resume", str(run_dir)])
    assert code == 2 and expected in err and "Traceback" not in err
