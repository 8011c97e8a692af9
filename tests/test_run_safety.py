"""Runs never lose or silently replace work (issue 12): real files, real processes, real signals.

Each case asserts the message, the exit status and that every file that existed before is intact.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from agents import run_dir as run_dir_module
from agents.config import load_config
from agents.run_dir import RunDirError, SnapshotKeyError, load_snapshot_key
from agents.trainer import Trainer, TrainingError
from policies.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
# 32 frames per update, a 16-unit LSTM: each update takes milliseconds.
TINY = ["core.name=lstm", "core.hidden_size=16", "env.n_envs=2", "algo.n_steps=16", "algo.seq_len=null",
        "algo.num_minibatches=1", "log.progress_bar=false"]


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (but the lock file, whose content is the last holder's pid) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def tiny_run(run_dir: Path, frames: int = 32, *extra: str) -> Trainer:
    trainer = Trainer(load_config(None, [*TINY, "total_frames=100000", *extra]), run_dir)
    trainer.run(stop_at_frames=frames)
    return trainer


def main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = train.main(argv)
    return code, capsys.readouterr().err


def one_line_error(err: str) -> bool:
    return "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: ")


@pytest.fixture(autouse=True)
def own_key(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A snapshot key of the test's own, so no test depends on (or changes) the user's."""
    path = tmp_path_factory.mktemp("key") / "snapshot.key"
    monkeypatch.setenv("MODULAR_RL_KEY_FILE", str(path))
    return path


# -- run directories -----------------------------------------------------------------------------
def test_a_new_run_never_writes_into_a_directory_holding_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    tiny_run(run)
    before = files_of(run)
    code, err = main(capsys, [*TINY, "total_frames=64", "--run-dir", str(run)])
    assert code == 2 and one_line_error(err)
    assert "already holds a run" in err and f"--resume {run}" in err
    with pytest.raises(RunDirError, match="already holds a run"):
        Trainer(load_config(None, TINY), run)
    assert files_of(run) == before
    # The default name takes the next free suffix instead, as rl-zoo3 does.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (run).rename(tmp_path / "runs" / "doorkey-5x5-lstm-ppo")
    assert main(capsys, [*TINY, "total_frames=32"])[0] == 0
    assert main(capsys, [*TINY, "total_frames=32"])[0] == 0
    assert files_of(tmp_path / "runs" / "doorkey-5x5-lstm-ppo") == before
    for suffix in ("_2", "_3"):
        assert load_checkpoint(tmp_path / "runs" / f"doorkey-5x5-lstm-ppo{suffix}")["frames"] == 32


def test_a_run_without_checkpoint_is_kept_and_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"frames": 32}\n')  # killed before its first checkpoint
    code, err = main(capsys, [*TINY, "--run-dir", str(run)])
    assert code == 2 and one_line_error(err) and "wrote no checkpoint" in err and "delete that directory" in err
    assert files_of(run) == {"metrics.jsonl": b'{"frames": 32}\n'}
    code, err = main(capsys, ["--resume", str(run)])  # it said only "checkpoint file not found"
    assert code == 2 and one_line_error(err) and "holds a run stopped before its first checkpoint" in err


def test_a_run_whose_checkpoint_pt_is_gone_names_its_numbered_checkpoints(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # It was called a run that "wrote no checkpoint" with the advice to delete it, and --resume said only
    # "checkpoint file not found"; a kill between the numbered save and checkpoint.pt leaves this state too.
    run = tmp_path / "run"
    tiny_run(run, 64, "log.checkpoint_interval_frames=32")
    (run / "checkpoint.pt").unlink()
    newest = run / "checkpoints" / "checkpoint_000000000064.pt"
    before = files_of(run)
    code, err = main(capsys, [*TINY, "--run-dir", str(run)])
    assert code == 2 and one_line_error(err) and "delete" not in err
    assert f"numbered checkpoints but no checkpoint.pt (newest {newest}); to continue it, copy that file to" in err
    code, err = main(capsys, ["--resume", str(run)])
    assert code == 2 and one_line_error(err) and f"the newest {newest}: give that file to load it, or copy it" in err
    assert files_of(run) == before


def test_a_users_own_lock_file_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "project"
    run.mkdir()
    (run / ".lock").write_text("my own notes\n")  # a file of the user's that happens to have the lock's name
    code, err = main(capsys, [*TINY, "--run-dir", str(run), "total_frames=32"])
    assert code == 2 and one_line_error(err) and "is not a run lock" in err, err
    assert (run / ".lock").read_text() == "my own notes\n"
    (run / ".lock").write_bytes(b"\x89PNG\r\n\x1a\n")  # not UTF-8: the same refusal, not a traceback
    code, err = main(capsys, [*TINY, "--run-dir", str(run), "total_frames=32"])
    assert code == 2 and one_line_error(err) and "is not a run lock" in err, err
    assert (run / ".lock").read_bytes() == b"\x89PNG\r\n\x1a\n"
    # A stale lock of an earlier process (a pid) is this package's own: the run takes it.
    (run / ".lock").write_text("123456\n")
    assert main(capsys, [*TINY, "--run-dir", str(run), "total_frames=32"])[0] == 0
    assert (run / ".lock").read_text().strip().isdigit()


@pytest.mark.parametrize("case", ["file", "under_file", "uncreatable", "too_long", "too_long_dir", "control",
                                  "line_separator", "dotdot", "absolute", "empty"])
def test_unusable_run_directory_is_one_line_before_envs_are_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    import agents.trainer

    def no_envs(*args: object, **kwargs: object) -> None:
        raise AssertionError("envs were built before the run directory was checked")

    monkeypatch.setattr(agents.trainer, "make_vec_env", no_envs)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("precious")
    argv, expected = {
        "file": (["--run-dir", "a_file"], "a_file is a file"),
        "under_file": (["--run-dir", "a_file/run"], "a_file is a file"),
        "uncreatable": (["--run-dir", "/proc/modular-memory-rl/run"], "cannot create run directory"),
        "too_long": ([f"name={'x' * 300}"], "longer than the"),
        "too_long_dir": (["--run-dir", "x" * 300], "longer than the"),
        "control": (['name="a\\nb"'], "no slashes or control characters"),  # YAML's escape: a newline
        "line_separator": (['name="a\\u2028b"'], "no slashes or control characters"),  # splits log lines too
        "dotdot": (["name=../escaped"], "name must be a plain name, not a path"),
        "absolute": ([f"name={tmp_path / 'abs'}"], "name must be a plain name, not a path"),
        "empty": (["name="], "name must be a plain name"),
    }[case]
    code, err = main(capsys, [*TINY, *argv])
    assert code == 2 and one_line_error(err) and expected in err, err
    assert (tmp_path / "a_file").read_text() == "precious"
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "abs").exists()


def wait_for_rows(path: Path, process: subprocess.Popen, rows: int) -> None:
    deadline = time.time() + 120
    while not path.exists() or path.read_text().count("\n") < rows:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "training never logged"
        time.sleep(0.1)


def test_sigterm_to_the_process_group_stops_a_subprocess_env_run_as_a_stop(tmp_path: Path) -> None:
    # A scheduler (SLURM, a container stop) signals the whole group: the env workers died of it mid-rollout and
    # the run reported an env crash with exit 2 instead of stopping at its next checkpoint with 143.
    run = tmp_path / "run"
    # Started from another folder: the resume command it prints names train.py as it was started (it said
    # `python train.py`, which does not run from there).
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, "env.vec_env=subproc", "algo.n_steps=256", "algo.n_epochs=1",
           "total_frames=100000000", "--run-dir", str(run)]
    process = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        wait_for_rows(run / "metrics.jsonl", process, 1)  # from here on the run is mostly stepping its envs
        time.sleep(0.3)
        os.killpg(process.pid, signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: stopped after" in out + err and "crashed" not in err, err
    assert f"Resume with: python {REPO / 'train.py'} --resume {run}" in out + err
    assert load_checkpoint(run / "checkpoint.pt")["frames"] > 0


@pytest.mark.parametrize("glance", ["LOCK_SH", "LOCK_EX"])
def test_a_glance_at_the_lock_does_not_refuse_a_run_nor_name_a_holder(tmp_path: Path, glance: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``lock_holder`` (``refuse_existing_run``, ``study.py run``) and ``RunLock.probe`` (``train.py --resume``)
    hold the lock for an instant: a run starting in that instant waits it out instead of calling the
    directory in use, and a glance meeting another glance finds no holder. A holder that stays is still
    refused, after the wait."""
    import fcntl
    import threading

    from agents.run_dir import LOCK_FILE, RunLock, lock_holder

    # A loaded machine may run the glance's release late: wait for it far longer than the code does.
    monkeypatch.setattr(run_dir_module, "LOCK_RETRY_SECONDS", 10.0)
    (tmp_path / LOCK_FILE).write_text("")
    glancer = (tmp_path / LOCK_FILE).open("r")  # another open file: flock sees it as another holder
    fcntl.flock(glancer.fileno(), getattr(fcntl, glance) | fcntl.LOCK_NB)
    release = threading.Timer(0.1, fcntl.flock, (glancer.fileno(), fcntl.LOCK_UN))
    release.start()
    try:
        if glance == "LOCK_EX":
            assert lock_holder(tmp_path) is None
        with RunLock(tmp_path, rank=0) as lock:
            assert lock.held
            # The glance is over: a real holder is waited for (this long) and then named or refused.
            monkeypatch.setattr(run_dir_module, "LOCK_RETRY_SECONDS", 0.3)
            assert lock_holder(tmp_path) == str(os.getpid())
            started = time.monotonic()
            with pytest.raises(RunDirError, match=f"in use by another training process \\(pid {os.getpid()}\\)"):
                RunLock(tmp_path, rank=0).acquire()
            assert time.monotonic() - started >= 0.3
    finally:
        release.join()
        glancer.close()


def test_a_file_system_without_locks_is_said_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a lock held by another process is waited for: any other flock error (ENOLCK on a file system
    without locks) stops the run at once, with its reason."""
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(run_dir_module, "LOCK_RETRY_SECONDS", 10.0)
    started = time.monotonic()
    with pytest.raises(RunDirError, match=f"cannot lock run directory {tmp_path}: {os.strerror(errno.ENOLCK)}"):
        run_dir_module.RunLock(tmp_path, rank=0).acquire()
    assert time.monotonic() - started < 5.0


def test_one_process_per_run_directory_sigint_exit_130_and_no_stale_lock_after_kill_9(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "train.py"]
    # Its snapshot key cannot be created (as under a read-only $HOME/.cache): the stop still saves.
    unusable_key = {**os.environ, "MODULAR_RL_KEY_FILE": "/proc/modular-memory-rl-test/snapshot.key"}
    first = subprocess.Popen([*cmd, *TINY, "total_frames=100000000", "--run-dir", str(run)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=unusable_key)
    try:
        wait_for_rows(run / "metrics.jsonl", first, 1)
        # A second process on the same directory is refused, whatever it asks for.
        second = subprocess.run([*cmd, "--resume", str(run)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and one_line_error(second.stderr), second.stderr
        assert "in use by another training process" in second.stderr and f"pid {first.pid}" in second.stderr
        third = subprocess.run([*cmd, *TINY, "--run-dir", str(run)], cwd=REPO, capture_output=True, text=True,
                               timeout=120)
        # A new run there is told that the run is being trained now (not to delete it or to resume it).
        assert third.returncode == 2 and one_line_error(third.stderr), third.stderr
        assert f"another training process (pid {first.pid}) is training now" in third.stderr
        # Ctrl-C: the update finishes, a checkpoint is written, exit 130 with the resume command.
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err
    assert f"python train.py --resume {run}" in out + err and "done:" not in out
    assert err.count("cannot use the snapshot key") == 1 and not (run / "envs_state.pkl").exists()
    frames = load_checkpoint(run / "checkpoint.pt")["frames"]
    assert frames >= 32

    # kill -9 in the middle of a resumed run: the kernel drops the lock, and the next resume works.
    rows = (run / "metrics.jsonl").read_text().count("\n")
    resumed = subprocess.Popen([*cmd, "--resume", str(run), "total_frames=100000000"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rows(run / "metrics.jsonl", resumed, rows + 2)
    finally:
        resumed.send_signal(signal.SIGKILL)
        resumed.communicate(timeout=60)
    # Temp files a killed write left behind are removed when the run starts again.
    stale = [run / f".checkpoint.pt.{resumed.pid}.abcd1234.tmp", run / "checkpoints" / ".checkpoint_1.pt.999.0badf00d.tmp",
             run / ".metrics.jsonl.tmp"]  # the last: an earlier version's fixed name, beside metrics.jsonl
    # A user's own dot files are not temp files of ours, whatever they end with.
    kept = [run / ".notes.tmp", run / ".config.yaml.backup.tmp", run / "checkpoints" / ".mine.1.tmp",
            run / ".notes.txt.tmp"]  # beside the user's notes.txt (written below): was removed as our temp file
    (run / "notes.txt").write_text("notes")
    for path in stale + kept:
        path.write_bytes(b"half a write")
    trainer = Trainer.resume(run, {"total_frames": 100000000})
    trainer.run(stop_at_frames=trainer.frames + 32)
    assert not any(path.exists() for path in stale)
    assert all(path.read_bytes() == b"half a write" for path in kept)
    assert load_checkpoint(run / "checkpoint.pt")["frames"] == trainer.frames


def test_a_resume_that_another_trainer_overtook_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tiny_run(run)
    late = Trainer.resume(run, {"total_frames": 128})  # loaded at 32 frames, not started yet
    Trainer.resume(run, {"total_frames": 128}).run(stop_at_frames=64)
    before = files_of(run)
    with pytest.raises(RunDirError, match="trained further by another process"):
        late.run()
    assert files_of(run) == before and load_checkpoint(run / "checkpoint.pt")["frames"] == 64


def test_temp_names_are_unique_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from policies import checkpoint as checkpoint_module

    trainer = tiny_run(tmp_path / "run")
    seen: list[str] = []
    monkeypatch.setattr(checkpoint_module, "_before_rename_hook",
                        lambda: seen.extend(p.name for p in (tmp_path / "run").rglob("*.tmp")))
    trainer.save()
    assert seen and all(f".{os.getpid()}." in name for name in seen)


# -- the snapshot key ----------------------------------------------------------------------------
def test_unusable_key_location_skips_only_the_env_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # A path no process can create (as a read-only or missing $HOME/.cache would be).
    monkeypatch.setenv("MODULAR_RL_KEY_FILE", "/proc/modular-memory-rl-test/snapshot.key")
    code, err = main(capsys, [*TINY, "total_frames=64", "log.checkpoint_interval_frames=32",
                              "--run-dir", str(tmp_path / "run")])
    assert code == 0, err
    assert err.count("snapshot key") == 1 and "env snapshot (envs_state.pkl) is skipped" in err
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["frames"] == 64
    assert not (tmp_path / "run" / "envs_state.pkl").exists()


def test_snapshot_key_is_created_atomically_by_concurrent_processes(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "snapshot.key"
    script = ("import sys; from agents.run_dir import load_snapshot_key; sys.stdout.write(load_snapshot_key().hex())")
    env = {**os.environ, "MODULAR_RL_KEY_FILE": str(key)}
    processes = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [process.communicate(timeout=60) for process in processes]
    assert all(process.returncode == 0 for process in processes), results
    keys = {out for out, _ in results}
    assert len(keys) == 1 and len(bytes.fromhex(keys.pop())) == 32
    assert [p.name for p in key.parent.iterdir()] == ["snapshot.key"]  # no temp file left


def test_a_forged_snapshot_is_never_unpickled(tmp_path: Path, own_key: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_robustness import _RunsCode

    run = tmp_path / "run"
    tiny_run(run)
    marker = tmp_path / "pwned"
    body = pickle.dumps(_RunsCode(marker))
    # An empty key file: a signature with HMAC(b"", body) must not be trusted.
    own_key.write_bytes(b"")
    with pytest.raises(SnapshotKeyError, match="holds 0 bytes"):
        load_snapshot_key()
    (run / "envs_state.pkl").write_bytes(hmac.new(b"", body, hashlib.sha256).digest() + body)
    resumed = Trainer.resume(run, {"total_frames": 64})
    assert resumed.rollout_state is None and not marker.exists()
    assert "holds 0 bytes" in capsys.readouterr().err


def test_resume_refuses_an_edited_config_yaml_and_leaves_it_as_it_is(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Resume trained the checkpoint's config and wrote it over the user's edit, without a word.
    run = tmp_path / "run"
    tiny_run(run)
    path = run / "config.yaml"
    written = path.read_text()
    assert "  hidden_size: 16\n" in written and "total_frames: 100000\n" in written
    path.write_text(written.replace("  hidden_size: 16\n", "  hidden_size: 32\n"))
    before = files_of(run)
    code, err = main(capsys, ["--resume", str(run), "total_frames=64"])
    assert code == 2 and one_line_error(err), err
    assert "config.yaml was edited: core.hidden_size 32 (the checkpoint's: 16)" in err
    assert f"--config {path} --run-dir" in err
    assert files_of(run) == before
    path.write_text("core: [\n")  # not YAML any more
    code, err = main(capsys, ["--resume", str(run), "total_frames=64"])
    assert code == 2 and one_line_error(err) and "move the file aside" in err, err
    assert path.read_text() == "core: [\n"
    # Keys that may change on resume are not compared: a resume that extended total_frames writes the file
    # before its first checkpoint, and a kill then leaves it ahead of the checkpoint.
    path.write_text(written.replace("total_frames: 100000\n", "total_frames: 200000\n"))
    code, err = main(capsys, ["--resume", str(run), "total_frames=64"])
    assert code == 0, err
    assert load_checkpoint(run / "checkpoint.pt")["frames"] == 64
    # A checkpoint written by an older version lacks a key added since, which a resume that stopped before its
    # first checkpoint wrote into config.yaml with its default: not an edit (it was called one).
    _edit_checkpoint(run / "checkpoint.pt", lambda payload: payload["config"]["log"].pop("keep_checkpoints"))
    assert "  keep_checkpoints: " in path.read_text()
    code, err = main(capsys, ["--resume", str(run), "total_frames=96"])
    assert code == 0, err


def test_resuming_a_finished_run_trains_nothing_and_rewrites_nothing(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # It printed "training ... done", wrote checkpoint.pt and the numbered copy again (new bytes) and added a
    # TensorBoard event file, without saying the run was finished.
    run = tmp_path / "run"
    Trainer(load_config(None, [*TINY, "total_frames=64"]), run).run()
    before = files_of(run)
    assert train.main(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "nothing to train: the run has already done 64 frames of its total_frames=64" in out
    assert files_of(run) == before
    # Stopped between checkpoint.pt and its numbered copy: the copy is still written (a study counts the frames
    # trained from the numbered checkpoints).
    numbered = sorted((run / "checkpoints").glob("checkpoint_*.pt"))[-1]
    numbered.unlink()
    assert train.main(["--resume", str(run)]) == 0
    assert numbered.read_bytes() == (run / "checkpoint.pt").read_bytes()
    assert files_of(run) == before
    # A config.yaml moved aside (as the refusal of a damaged one advises) is written again.
    (run / "config.yaml").rename(tmp_path / "config.yaml.damaged")
    assert train.main(["--resume", str(run)]) == 0
    assert files_of(run) == before
    assert "training " not in capsys.readouterr().out  # no "training ... -> run" line for a run that trains nothing


# -- non-finite values ---------------------------------------------------------------------------
def test_nan_weights_stop_the_rollout_with_one_message(tmp_path: Path) -> None:
    trainer = tiny_run(tmp_path / "run")
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        trainer.policy.actor[-1].weight.fill_(float("nan"))  # NaN logits: Categorical would raise ValueError
    with pytest.raises(TrainingError, match="non-finite") as info:
        trainer.run()
    assert "not overwritten" in str(info.value) and "Categorical" not in str(info.value)
    # No rate may change on --resume, which would replay the same updates: the way on is a new run.
    assert ("start a new run with a lower algo.lr or algo.max_grad_norm, from these weights with "
            f"`init_from={tmp_path / 'run' / 'checkpoint.pt'}`") in str(info.value)
    assert "--resume" not in str(info.value)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good


def test_nan_rewards_from_the_env_stop_with_one_message(tmp_path: Path) -> None:
    import numpy as np
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class NanRewards(VecEnvWrapper):
        def reset(self):
            return self.venv.reset()

        def step_wait(self):
            obs, rewards, dones, infos = self.venv.step_wait()
            return obs, np.full_like(rewards, np.nan), dones, infos

    trainer = tiny_run(tmp_path / "run")
    before = files_of(tmp_path / "run")
    trainer.venv = NanRewards(trainer.venv)
    with pytest.raises(TrainingError, match="the rollout's rewards are non-finite") as info:
        trainer.run()
    assert "check the env's rewards" in str(info.value) and "not overwritten" in str(info.value)
    assert files_of(tmp_path / "run")["checkpoint.pt"] == before["checkpoint.pt"]


def test_an_exploded_model_never_replaces_a_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = tiny_run(tmp_path / "run", 32, "log.checkpoint_interval_frames=32")
    before = files_of(tmp_path / "run")
    original = type(trainer.updater).update

    def exploding(self, storage):  # a finite loss, then weights that overflow float32 in the forward pass
        stats = original(self, storage)
        with torch.no_grad():
            for param in trainer.policy.parameters():
                param.mul_(1e30)
        return stats

    monkeypatch.setattr(type(trainer.updater), "update", exploding)
    with pytest.raises(TrainingError, match="outputs are non-finite on the last rollout") as info:
        trainer.run()
    assert "not overwritten" in str(info.value)
    assert files_of(tmp_path / "run")["checkpoint.pt"] == before["checkpoint.pt"]
    assert sorted((tmp_path / "run" / "checkpoints").iterdir()) == [tmp_path / "run" / "checkpoints" /
                                                                    "checkpoint_000000000032.pt"]


def test_the_latest_checkpoint_name_is_synced_after_it_is_swapped_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """checkpoint.pt is a copy of the newest numbered checkpoint, renamed over the old one; after a power loss
    it must name the new bytes, so the run folder is synced after the rename."""
    import agents.trainer as trainer_module

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    run = tmp_path / "run"

    def recording_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(run):
            events.append("fsync run folder")
        real_fsync(fd)

    def recording_replace(source: str | Path, destination: str | Path) -> None:
        events.append(f"rename to {Path(destination).name}")  # every rename: another write's sync must not count
        real_replace(source, destination)

    monkeypatch.setattr(trainer_module.os, "fsync", recording_fsync)
    monkeypatch.setattr(trainer_module.os, "replace", recording_replace)
    tiny_run(run, 64, "log.checkpoint_interval_frames=32")
    swaps = [i for i, event in enumerate(events) if event == "rename to checkpoint.pt"]
    assert len(swaps) >= 2, events  # at 32 and 64 frames at least (a final save may add one)
    assert all(events[i + 1:i + 2] == ["fsync run folder"] for i in swaps), events


# -- metrics.jsonl -------------------------------------------------------------------------------
def test_resume_drops_a_partial_metrics_line_and_rewrites_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    tiny_run(run, 64)
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"frames": 96, "train/po')  # what a kill or a full disk leaves
    partial = metrics.read_bytes()

    # A kill during the rewrite (before its rename) leaves the file as it was.
    from agents import logger as logger_module

    def killed(*args: object) -> None:
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(run_dir_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        logger_module.RunLogger(run, purge_step=64)
    monkeypatch.undo()
    assert metrics.read_bytes() == partial and not list(run.glob(".metrics.jsonl.*"))

    resumed = Trainer.resume(run, {"total_frames": 96})
    resumed.run()
    assert "dropped a partial last line" in capsys.readouterr().err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["frames"] for row in rows] == [32, 64, 96]


def test_resume_keeps_the_checkpoints_row_in_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    tiny_run(run, 64)
    resumed = Trainer.resume(run, {"total_frames": 128})
    resumed.run()
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    # The purge took steps >= the checkpoint's frames: its row (64) was lost on every resume.
    steps = [event.step for event in events.Scalars("train/policy_loss")]
    assert steps == [32, 64, 96, 128]
    assert [json.loads(line)["frames"] for line in (run / "metrics.jsonl").read_text().splitlines()] == steps


def test_pruning_keeps_a_users_files_and_the_newest_numbered_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tiny_run(run, 32, "log.checkpoint_interval_frames=32", "log.keep_checkpoints=3")
    folder = run / "checkpoints"
    mine = [folder / "checkpoint_000000000032_before-lr-change.pt", folder / "checkpoint_best.pt"]
    for path in mine:
        shutil.copy(folder / "checkpoint_000000000032.pt", path)
    resumed = Trainer.resume(run, {"total_frames": 160})
    resumed.run()
    assert all(path.is_file() for path in mine)  # were deleted as old checkpoints
    numbered = sorted(p.name for p in folder.iterdir() if p not in mine)
    assert numbered == [f"checkpoint_{frames:012d}.pt" for frames in (96, 128, 160)]
    # Readable as any file the run writes (mkstemp made them 0600).
    mode = (run / "config.yaml").stat().st_mode & 0o777
    assert all(p.stat().st_mode & 0o777 == mode for p in folder.iterdir() if p not in mine)


def test_a_checkpoint_pt_that_is_a_folder_is_named_as_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    (run / "checkpoint.pt").mkdir(parents=True)
    code, err = main(capsys, ["--resume", str(run), "total_frames=64"])
    assert code == 2 and one_line_error(err) and f"{run / 'checkpoint.pt'} is a folder, not a checkpoint file" in err, err


# -- a full disk ---------------------------------------------------------------------------------
def test_full_disk_in_a_real_process_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tiny_run(run)
    before = files_of(run)
    limit = len(before["checkpoint.pt"]) // 2  # every file this process writes stops there: a small disk

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "train.py", "--resume", str(run), "total_frames=64"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, preexec_fn=small_disk)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training stopped at 64 frames: cannot write checkpoint ")
    assert f"cannot write checkpoint {run / 'checkpoint.pt'}: " in error and " free on its file system" in error
    assert f"The last good checkpoint is kept at {run / 'checkpoint.pt'}" in error
    assert "Traceback" not in result.stderr
    after = files_of(run)
    for name in ("checkpoint.pt", "checkpoints/checkpoint_000000000032.pt"):
        assert after[name] == before[name], name
    assert not [name for name in after if name.endswith(".tmp")]


def test_no_space_left_names_the_path_and_the_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = tiny_run(tmp_path / "run")
    before = files_of(tmp_path / "run")

    def full_disk_writer(payload: object, handle) -> None:  # the write call a full disk fails
        handle.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk_writer)
    trainer.frames += 32
    with pytest.raises(TrainingError) as info:
        trainer.save()
    message = str(info.value)
    assert "cannot write checkpoint" in message and "no space left on device" in message
    assert "free on its file system" in message and f"checkpoint {tmp_path / 'run' / 'checkpoint.pt'}: " in message
    assert "free some space, then resume" in message
    assert files_of(tmp_path / "run")["checkpoint.pt"] == before["checkpoint.pt"]
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_a_write_blocked_by_a_file_in_the_way_names_it_and_is_not_called_a_full_disk(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tiny_run(run)
    shutil.rmtree(run / "tb")
    (run / "tb").write_text("a file where the TensorBoard folder goes\n")
    with pytest.raises(TrainingError) as info:
        Trainer.resume(run, {"total_frames": 128}).run()
    message = str(info.value)
    assert f"cannot write {run / 'tb'}" in message and "free some space" not in message, message
    assert "make that path writable (or move what is in its way)" in message


# -- resume consistency --------------------------------------------------------------------------
def _edit_checkpoint(path: Path, edit) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload)
    path.unlink()  # a new file, as train.py writes one (runs saved before 2026-12-06 hard-linked it)
    torch.save(payload, path)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("config_vs_spec", "inconsistent: its config gives policy core_kwargs"),
        ("frames_below", "already done 32 frames; give total_frames=32 or more"),
        ("n_envs", "env.n_envs cannot change on --resume"),
        ("weights", "actor.2.weight"),
        # Hand-edited training state: a KeyError or TypeError traceback, or (frames < 0) accepted.
        ("no_env", "damaged or not a training checkpoint: its 'env' should be the env id and options and has none"),
        ("frames_text", "its 'frames' should be a frame count >= 0 and has str '32'"),
        ("frames_negative", "its 'frames' should be a frame count >= 0 and has int -5"),
        ("updates_none", "its 'updates' should be an update count >= 0 and has NoneType None"),
    ],
)
def test_resume_consistency(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, expected: str) -> None:
    run = tmp_path / "run"
    tiny_run(run)
    argv = ["--resume", str(run)]
    if case == "config_vs_spec":
        _edit_checkpoint(run / "checkpoint.pt", lambda p: p["config"]["core"].update(hidden_size=32))
    elif case == "frames_below":
        argv.append("total_frames=16")
    elif case == "n_envs":
        argv.append("env.n_envs=4")
    elif case == "no_env":
        _edit_checkpoint(run / "checkpoint.pt", lambda p: p.pop("env"))
    elif case.startswith(("frames_", "updates_")):
        value = {"frames_text": "32", "frames_negative": -5, "updates_none": None}[case]
        _edit_checkpoint(run / "checkpoint.pt", lambda p: p.update({case.split("_")[0]: value}))
    else:  # weights that do not fit: every mismatch is named, not only the first line
        def drop(payload: dict) -> None:
            del payload["policy"]["state_dict"]["actor.2.weight"], payload["policy"]["state_dict"]["critic.2.bias"]
        _edit_checkpoint(run / "checkpoint.pt", drop)
    before = files_of(run)
    code, err = main(capsys, argv)
    assert code == 2 and one_line_error(err) and expected in err, err
    if case == "weights":
        assert "critic.2.bias" in err
    assert files_of(run) == before


def test_env_snapshot_of_another_env_is_refused(tmp_path: Path, own_key: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    tiny_run(run)
    key = load_snapshot_key()
    body = pickle.dumps({"frames": 32, "env_id": "MiniGrid-Empty-5x5-v0", "venv": None})
    (run / "envs_state.pkl").write_bytes(hmac.new(key, body, hashlib.sha256).digest() + body)
    resumed = Trainer.resume(run)
    assert resumed.rollout_state is None
    err = capsys.readouterr().err
    assert "does not belong to this checkpoint" in err and "MiniGrid-Empty-5x5-v0" in err


def test_output_paths_are_checked_in_one_place(tmp_path: Path) -> None:
    from agents.run_dir import output_file_problem, output_folder_problem

    existing = tmp_path / "earlier.json"
    existing.write_text("{}")
    assert output_file_problem(tmp_path / "new" / "deeper" / "out.json") is None, "missing folders are made later"
    assert output_file_problem(existing) == f"{existing} exists; pass --overwrite to replace it, or choose another name"
    assert output_file_problem(existing, overwrite=True) is None
    assert output_file_problem(existing, overwrite_option=None) == f"{existing} exists; give a new file name"
    assert output_file_problem(tmp_path) == f"{tmp_path} is a folder; give a file name"
    assert output_file_problem(existing / "out.json") == f"{existing / 'out.json'}: is under {existing}, which is a " \
                                                        "file, not a folder"
    os.mkfifo(tmp_path / "pipe")
    assert "is a link, pipe or device" in output_file_problem(tmp_path / "pipe", overwrite=True)
    assert output_folder_problem(tmp_path / "pipe") == f"{tmp_path / 'pipe'}: is a pipe or device, not a folder"
    # A link to nothing is not a missing folder: creating the folder there would fail after the work.
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    assert output_file_problem(tmp_path / "gone" / "out.json") == \
        f"{tmp_path / 'gone' / 'out.json'}: is under {tmp_path / 'gone'}, which is a link to nothing, not a folder"
    too_long = output_file_problem(tmp_path / ("x" * 300))  # a message, not an exception
    assert too_long is not None and str(tmp_path) in too_long
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.json", "gone", "pipe"], "nothing created"



def test_a_new_output_file_never_replaces_one_that_appeared(tmp_path: Path) -> None:
    from agents.run_dir import write_new_file

    target = tmp_path / "new" / "folder" / "out.json"
    write_new_file(target, b"{}")
    assert target.read_bytes() == b"{}", "missing folders are made"
    with pytest.raises(FileExistsError):
        write_new_file(target, b"[1]")
    assert target.read_bytes() == b"{}"


def test_an_output_written_by_name_replaces_the_old_file_only_when_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """atomic_output: what evaluate.py's videos and plots are written through (their libraries want a
    file name, whose suffix picks the format)."""
    from agents import run_dir
    from agents.run_dir import atomic_output

    synced: list[str] = []  # which file each fsync reached, seen through the descriptor's /proc link
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(run_dir.os, "fsync", recording_fsync)
    target = tmp_path / "videos" / "episode.gif"
    with atomic_output(target) as temp:
        assert temp.parent == target.parent and temp.suffix == ".gif" and temp != target
        temp.write_bytes(b"first")
    assert target.read_bytes() == b"first", "missing folders are made, the file renamed into place"
    assert synced == [str(temp), str(target.parent)], (
        "the new file reached the disk before it was renamed over the old one, and the rename after it")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_output(target) as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"first", "a failed write leaves the old file as it was"
    assert sorted(p.name for p in target.parent.iterdir()) == ["episode.gif"], "and no temporary behind"


def test_an_atomic_write_syncs_the_file_then_the_folder_that_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """atomic_write (a run's config.yaml and envs_state.pkl, metrics.jsonl's rewrite, a study's reports):
    after a power loss the path must name the new bytes, which needs the file synced before the rename and
    the folder's entry synced after it."""
    from agents import run_dir
    from agents.run_dir import atomic_write

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append("fsync folder" if Path(target).is_dir() else "fsync file")
        real_fsync(fd)

    def recording_replace(source: str | Path, destination: str | Path) -> None:
        events.append("rename")
        real_replace(source, destination)

    monkeypatch.setattr(run_dir.os, "fsync", recording_fsync)
    monkeypatch.setattr(run_dir.os, "replace", recording_replace)
    target = tmp_path / "config.yaml"
    target.write_text("old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert events == ["fsync file", "rename", "fsync folder"]
