"""benchmarks/learning.py: its measures on hand-written metric rows, and a real sweep stopped by a real SIGTERM."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("learning_benchmark", REPO / "benchmarks" / "learning.py")
learning = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = learning  # dataclasses look their module up there
_spec.loader.exec_module(learning)


def task_row(frames: int, **tasks: tuple[float, int]) -> dict:
    """A multi-task run's metrics row: per task its mean return and how many episodes that is over."""
    row: dict = {"frames": frames}
    for name, (mean, episodes) in tasks.items():
        row[f"meta/return/{name}"], row[f"meta/return_episodes/{name}"] = mean, episodes
    return row


def test_a_task_counts_toward_the_threshold_only_once_its_window_is_full() -> None:
    # The curriculum has just reached task b: its first two episodes were short successes (0.8),
    # then the policy fails there. A mean over those two would call the run learned at frame 200.
    rows = [
        task_row(100, a=(0.7, 50)),
        task_row(200, a=(0.7, 50), b=(0.8, 2)),
        task_row(300, a=(0.7, 50), b=(0.3, 50)),
        task_row(400, a=(0.7, 50), b=(0.6, 50)),
    ]
    assert learning.frames_to_threshold(rows, 0.5, task_window=50) == 400
    assert learning.frames_to_threshold(rows, 0.5) == 200, "without a window the lucky start counts"
    assert learning.frames_to_threshold(rows, 0.65, task_window=50) is None
    assert learning.final_return(rows) == 0.6, "the lowest task's mean at the end"


def test_rows_logged_without_episode_counts_are_read_as_before() -> None:
    rows = [{"frames": 100, "meta/return/a": 0.2}, {"frames": 200, "meta/return/a": 0.9, "meta/return/b": 0.7}]
    assert learning.frames_to_threshold(rows, 0.5, task_window=50) == 200
    assert learning.task_returns(rows) == [{}, {"a": 0.9, "b": 0.7}]


def test_a_one_task_run_needs_100_finished_episodes() -> None:
    rows = [{"frames": 100, "rollout/episodes": 60, "rollout/ep_return_mean": 0.95},
            {"frames": 200, "rollout/episodes": 40, "rollout/ep_return_mean": 0.92},
            {"frames": 300, "rollout/episodes": 10, "rollout/ep_return_mean": 0.5}]
    assert learning.task_returns(rows) is None
    assert learning.frames_to_threshold(rows, 0.9) == 200
    assert learning.final_return(rows) == 0.5


def test_the_return_curve_starts_at_a_full_window_and_the_threshold_is_its_first_point_above() -> None:
    rows = [{"frames": 100, "rollout/episodes": 60, "rollout/ep_return_mean": 0.95},
            {"frames": 200, "rollout/episodes": 40, "rollout/ep_return_mean": 0.5},
            {"frames": 300, "rollout/episodes": 0, "rollout/ep_return_mean": None},
            {"frames": 400, "rollout/episodes": 30, "rollout/ep_return_mean": 0.85}]
    assert learning.return_curve(rows) == [(200, 0.5), (400, 0.85)]
    assert learning.frames_to_threshold(rows, 0.8) == 400
    tasks = [task_row(100, a=(0.9, 50)), task_row(200, a=(0.9, 50), b=(0.4, 50))]
    assert learning.return_curve(tasks, task_window=50) == [(200, 0.4)], "the lowest task, once every task has one"


def _fake_run(out: Path, label: str, seed: int, rows: list[dict], budget: int) -> learning.Job:
    run_dir = out / label / f"seed_{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "config.yaml").write_text(f"total_frames: {budget}\n")
    return learning.Job(label, None, (), seed, run_dir)


def test_curves_are_drawn_per_config_and_only_once_a_run_has_a_point(tmp_path: Path) -> None:
    learned = [{"frames": 1000 * i, "rollout/episodes": 50, "rollout/ep_return_mean": 0.1 * i} for i in range(1, 11)]
    early = [{"frames": 1000, "rollout/episodes": 10, "rollout/ep_return_mean": 0.2}]
    jobs = [_fake_run(tmp_path, "a", 1, learned, 10000), _fake_run(tmp_path, "b", 1, early, 10000)]
    path = learning.curves_path(tmp_path, ["a", "b"])
    assert path == tmp_path / "curves" / "a+b.png"
    assert learning.plot_curves(jobs[1:], 0.8, path) is None and not path.exists(), "no point yet: no figure"
    assert learning.plot_curves(jobs, 0.8, path) == path
    assert path.read_bytes().startswith(b"\x89PNG")
    long = learning.curves_path(tmp_path, [f"config-{i}-with-a-long-name" for i in range(8)])
    assert long.name.startswith("config-0-with-a-long-name+7-more-") and len(long.name) < 80


def test_a_panel_is_titled_by_what_its_runs_trained_on() -> None:
    # A multi-task run's env.id is its first task only; its curve is the lowest task's, so the title names them all.
    assert learning.panel_title("meta", {"MiniGrid-DoorKey-5x5-v0"}, {"DoorKey-6x6", "DoorKey-5x5"}) == \
        "meta on DoorKey-5x5 + DoorKey-6x6"
    assert learning.panel_title("doorkey-sizes-reversed-rerun", {""}, {"DoorKey-5x5", "DoorKey-6x6"}) == \
        "doorkey-sizes-reversed-rerun\non DoorKey-5x5 + DoorKey-6x6", "too long for a panel: two lines"
    assert learning.panel_title("lstm", {"MiniGrid-DoorKey-5x5-v0"}, set()) == "lstm on DoorKey-5x5"
    assert learning.panel_title("mixed", {"MiniGrid-DoorKey-5x5-v0", "MiniGrid-MemoryS7-v0"}, set()) == "mixed"
    assert learning.panel_title("unknown", {""}, set()) == "unknown"


def test_the_summary_counts_finished_runs_with_an_exact_interval(tmp_path: Path) -> None:
    """1 of 5 and 5 of 5 say less than they seem to (Clopper-Pearson: 0.01-0.72 and 0.48-1.00); a run
    still going is left out of the count, not counted as failed."""
    from scipy import stats

    for successes, trials in [(1, 5), (5, 5), (0, 5), (7, 10), (3, 4)]:
        expected = stats.binomtest(successes, trials).proportion_ci(method="exact")
        assert learning.binomial_interval(successes, trials) == pytest.approx((expected.low, expected.high), abs=1e-9)
    assert learning.binomial_interval(0, 0) == (0.0, 1.0)

    learned = [{"frames": 1000 * i, "rollout/episodes": 50, "rollout/ep_return_mean": 0.1 * i, "time/fps": 900}
               for i in range(1, 11)]
    flat = [{**row, "rollout/ep_return_mean": 0.2} for row in learned]
    jobs = [_fake_run(tmp_path, "a", 1, learned, 10000), _fake_run(tmp_path, "a", 2, flat, 10000),
            _fake_run(tmp_path, "a", 3, learned[:3], 10000)]
    summary = learning.report(jobs, 0.8, 0.75).splitlines()[-1]
    assert "reached 0.8 on 1/2, reached and still >= 0.75 at the end on 1/2 (95% CI of the rate 0.01-0.99) " \
           "(1 unfinished, not counted)" in summary, summary


def _start_sweep(out: Path, seed: int) -> subprocess.Popen:
    """A real learning.py sweep of one tiny run of the embedded default, far too long to finish on its own."""
    command = [sys.executable, str(REPO / "benchmarks" / "learning.py"), "--configs", "default", "--seeds", str(seed),
               "--jobs", "1", "--out", str(out), "--tag", "t", "--set", "total_frames=10000000",
               "env.n_envs=2", "algo.n_steps=16", "algo.num_minibatches=1"]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_stops_the_sweep_and_its_runs_checkpoint(tmp_path: Path) -> None:
    # A plain `kill` of a sweep in the background must not leave its train.py runs training on
    # unsupervised (holding their run locks): they checkpoint, and the same command resumes them.
    sweep = _start_sweep(tmp_path, seed=7)
    metrics = tmp_path / "default-t" / "seed_7" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        assert sweep.poll() is None, sweep.communicate()[0]
        time.sleep(0.2)
    assert metrics.is_file(), "the run never logged an update"
    os.kill(sweep.pid, signal.SIGTERM)
    output = sweep.communicate(timeout=120)[0]
    assert sweep.returncode == 128 + signal.SIGTERM, output
    assert "stopped; run the same command again to continue" in output
    run_log = (tmp_path / "default-t" / "seed_7.log").read_text()
    assert "SIGTERM: stopped after" in run_log, run_log
    run_dir = tmp_path / "default-t" / "seed_7"
    assert (run_dir / "checkpoint.pt").is_file()
    rerun = learning.Job("default-t", None, (), 7, run_dir, 1)
    assert learning.command(rerun)[-2:] == ["--resume", str(run_dir)], "the same command resumes the run"


def _train_children(pid: int) -> list[int]:
    """The train.py processes ``pid`` started: exec'd already, so past Popen's setsid."""
    children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    running = []
    for child in children:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if b"train.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                running.append(child)
    return running


def _process_state(pid: int) -> str:
    """Linux's one-letter state of ``pid`` (R, S, T stopped, Z exited but not reaped), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from Linux's /proc")
def test_runs_have_their_own_session_and_a_second_sigterm_aborts_them(tmp_path: Path) -> None:
    # A terminal's hangup or Ctrl-C goes to the driver only (which stops every run alike), and a second
    # SIGTERM while the driver waits for its runs to checkpoint kills them instead of waiting on.
    sweep = _start_sweep(tmp_path, seed=8)
    runs: list[int] = []
    try:
        deadline = time.time() + 60
        while not runs and time.time() < deadline:
            assert sweep.poll() is None, sweep.communicate()[0]
            time.sleep(0.1)
            runs = _train_children(sweep.pid)
        (run,) = runs
        assert os.getsid(run) == run != os.getsid(sweep.pid), "the run leads a session of its own"
        # A stopped run cannot act on the first SIGTERM, so the driver is surely still waiting at the second.
        os.kill(run, signal.SIGSTOP)
        run_log = tmp_path / "default-t" / "seed_8.log"
        deadline = time.time() + 30
        while _process_state(run) != "T" and time.time() < deadline:  # a run that had died is a zombie (Z)
            time.sleep(0.05)
        assert _process_state(run) == "T", f"the run is not stopped ({_process_state(run)}): {run_log.read_text()}"
        os.kill(sweep.pid, signal.SIGTERM)
        time.sleep(1.0)  # the handler interrupts the driver's poll at once; then it waits on the run
        assert sweep.poll() is None, f"the driver waits for the stopped run: {sweep.communicate()[0]}"
        os.kill(sweep.pid, signal.SIGTERM)
        output = sweep.communicate(timeout=60)[0]
        assert "aborted the running runs" in output, output
        assert sweep.returncode == 128 + signal.SIGTERM, output
        with pytest.raises(ProcessLookupError):
            os.kill(run, 0)
    finally:  # a failing assertion must not leave a 10M-frame run training in the background
        for pid in [*runs, sweep.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sweep.wait()


@pytest.mark.parametrize(("items", "message"), [(["abc"], "'abc' is not a seed"), (["-1"], "'-1' is not a seed"),
                                                (["5-1"], "'5-1' is empty"), (["1-99999999999"], "longer than"),
                                                (["1-10", "5"], "seed 5 is given twice")])
def test_bad_seeds_are_refused(items: list[str], message: str) -> None:
    assert learning.parse_seeds(["1-3", "7"]) == [1, 2, 3, 7]
    with pytest.raises(ValueError, match=message):
        learning.parse_seeds(items)


def test_a_sweep_whose_runs_fail_exits_1_and_names_their_logs(tmp_path: Path) -> None:
    # A checkpoint to start from that is not there passes the config's check and fails in train.py (exit 2);
    # the sweep reports it and must not exit 0.
    missing = f"init_from={tmp_path / 'none.pt'}"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "learning.py"), "--configs", "default",
                           "--seeds", "3", "--jobs", "1", "--out", str(tmp_path), "--no-plot", "--set", missing],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    log = tmp_path / f"default-{learning.hashlib.sha1(missing.encode()).hexdigest()[:6]}" / "seed_3.log"
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"error: 1 run(s) failed; see {log}" in done.stderr and "init_from" in log.read_text()
    assert "Traceback" not in done.stderr


def test_runs_of_a_config_file_changed_since_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # A run folder is named by the config file's name and --set alone: after an edit of the file its old runs
    # were resumed with the old config, or counted as finished, and reported as the new config's.
    config = tmp_path / "tiny.yaml"
    config.write_text("core: {name: lstm, hidden_size: 8}\nenv: {n_envs: 2}\nalgo: {n_steps: 16, num_minibatches: 1}\n")
    args = ["--configs", str(config), "--seeds", "5", "--jobs", "1", "--out", str(tmp_path / "out"), "--no-plot",
            "--set", "total_frames=32"]
    assert _main(monkeypatch, capsys, *args)[0] == 0
    assert _main(monkeypatch, capsys, *args)[0] == 0  # the same config again: its finished run is reported
    config.write_text(config.read_text().replace("hidden_size: 8", "hidden_size: 12"))
    for extra in ([], ["--report-only"]):
        status, out, err = _main(monkeypatch, capsys, *args, *extra)
        assert status == 2 and "already finished" not in out, out
        assert "was trained with another config than" in err and "(differs in core.hidden_size)" in err, err


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """learning.py's main() on ``args``: its exit status, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["learning.py", *args])
    try:
        learning.main()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


CONFIG_FILES = {"bad.yaml": "a: [1\n", "list.yaml": "- 1\n- 2\n", "notes.txt": "some notes, not a config\n"}


@pytest.mark.parametrize("report_only", [False, True], ids=["sweep", "report-only"])
@pytest.mark.parametrize(("config", "options", "message"), [
    ("bad.yaml", [], "is not valid YAML: expected ',' or ']'"),
    ("list.yaml", [], "must hold a mapping of keys to values, got list"),
    ("notes.txt", [], "must hold a mapping of keys to values, got str"),
    ("no-such.yaml", [], "config file not found: no-such.yaml"),
    ("default", ["--set", "core.bogus=1"], "unknown config key 'core.bogus'"),
    ("default", ["--set", "=1"], "override '=1' must look like key=value"),
    ("default", ["--set", "a.b"], "override 'a.b' must look like key=value"),
    ("default", ["--set", "total_frames=abc"], "total_frames must be an integer, got 'abc'"),
    ("default", ["--set", "seed=3"], "--set seed=... would train every run on that one seed"),
    ("default", ["--seeds", "1", "4294967296"], "seed must be in [0, 2**32), got 4294967296"),
    ("default", ["--set", "env.id=MiniGrid-NoSuchEnv-v0"], "env.id: Unknown environment id 'MiniGrid-NoSuchEnv-v0'"),
])
def test_a_bad_config_or_override_is_refused_before_any_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        config: str, options: list[str], message: str, report_only: bool) -> None:
    # Checked with the overrides the runs get (the seeds included), in the sweep itself: one line naming the
    # config and its problem, exit 2, no run started and nothing under --out. With --report-only a file that is
    # no config must not be read as one (its runs all "unfinished", exit 0).
    monkeypatch.chdir(tmp_path)
    for name, text in CONFIG_FILES.items():
        (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    status, stdout, err = _main(monkeypatch, capsys, "--configs", config, "--seeds", "1", "--out", str(out),
                                "--no-plot", *options, *(["--report-only"] if report_only else []))
    assert status == 2, stdout + err
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(f"error: {config}: ") and message in err, err
    assert "Traceback" not in err and stdout == ""
    assert not out.exists()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--threshold", "nan", "must be a finite number, got 'nan'"),
    ("--threshold", "-inf", "must be a finite number, got '-inf'"),
    ("--final", "inf", "must be a finite number, got 'inf'"),
    ("--final", "NaN", "must be a finite number, got 'NaN'"),
    ("--threshold", "high", "'high' is not a number"),
])
def test_a_threshold_that_is_not_a_finite_number_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        option: str, value: str, message: str) -> None:
    # NaN is never reached and an infinite --final is never kept: the table would call every run failed.
    status, stdout, err = _main(monkeypatch, capsys, "--seeds", "1", "--out", str(tmp_path / "out"), "--report-only",
                                "--no-plot", f"{option}={value}")
    assert status == 2 and f"argument {option}: {message}" in err, stdout + err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("tag", ["a/b", "/../../x", "..", ".hidden", "", "a b", "x" * 101])
def test_a_tag_must_be_a_plain_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], tag: str) -> None:
    # A tag names folders under --out: a slash would nest them, "/../../x" leave --out altogether.
    status, stdout, err = _main(monkeypatch, capsys, "--seeds", "1", "--out", str(tmp_path / "out"), "--no-plot",
                                "--report-only", "--tag", tag)
    assert status == 2 and f"argument --tag: {tag!r} is not a plain name" in err, stdout + err
    assert "Traceback" not in err and sorted(tmp_path.iterdir()) == []
    status, stdout, err = _main(monkeypatch, capsys, "--seeds", "1", "--out", str(tmp_path / "out"), "--no-plot",
                                "--report-only", "--tag", "v1.2_lr-3e-4")
    assert status == 0 and ["default-v1.2_lr-3e-4", "1", "not", "started"] in map(str.split, stdout.splitlines()), err


@pytest.mark.parametrize(("configs", "message"), [
    (["default", "default"], "--configs names default twice"),
    (["a/run.yaml", "a/../a/run.yaml"], "--configs names {tmp}/a/run.yaml twice"),
    (["a/run.yaml", "{tmp}/a/run.yaml"], "--configs names {tmp}/a/run.yaml twice"),
    (["a/run.yaml", "b/run.yaml"], "--configs a/run.yaml and b/run.yaml would share the runs in {tmp}/out/run-t"),
])
def test_a_config_named_twice_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], configs: list[str], message: str) -> None:
    # The same runs would be trained and counted twice ("reached 0.9 on 2/2" from one run); two files of one
    # name would train into, and be reported from, the same folders.
    monkeypatch.chdir(tmp_path)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "run.yaml").write_text("total_frames: 1000\n")
    configs = [config.format(tmp=tmp_path) for config in configs]
    status, stdout, err = _main(monkeypatch, capsys, "--configs", *configs, "--seeds", "1", "--tag", "t",
                                "--out", str(tmp_path / "out"), "--no-plot", "--report-only")
    assert status == 2 and message.format(tmp=tmp_path) in err, stdout + err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_metrics_file_with_a_damaged_byte_reads_up_to_it(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_bytes(b'{"frames": 1}\n\xff\xfe\n{"frames": 3}\n')
    assert learning.read_rows(tmp_path) == [{"frames": 1}]


STUDY_FILE = """name: {name}
models:
  - label: lstm
    config: configs/minigrid/memory-lstm-ppo.yaml
  - label: rims
    config: configs/minigrid/memory-rims-ppo.yaml
seeds: [1, 10]
total_frames: 10000
eval:
  envs: [MiniGrid-MemoryS7-v0]
"""


def test_a_studys_runs_are_reported_per_model_without_training(tmp_path: Path) -> None:
    """``--study`` reads the runs the study plans (``runs/<model>/seed_<s>`` for its models and seeds, as
    ``study.py run`` lays them out): the same table per model (seeds in number order, a planned run not started
    named so), and the curves, named after the study; a folder outside the plan is named and left out of the
    counts; nothing is trained or written in the study. Named by its folder or, under studies/, by its name."""
    study = tmp_path / "studies" / "memory-study"
    learned = [{"frames": 1000 * i, "rollout/episodes": 50, "rollout/ep_return_mean": 0.1 * i, "time/fps": 900}
               for i in range(1, 11)]
    flat = [{**row, "rollout/ep_return_mean": 0.4} for row in learned]
    _fake_run(study / "runs", "lstm", 10, learned, 10000)
    _fake_run(study / "runs", "lstm", 2, learned, 10000)
    (study / "runs" / "lstm" / "seed_2").rename(study / "runs" / "lstm" / "seed_002")  # not seed 2 of the plan
    _fake_run(study / "runs", "rims", 1, flat, 10000)
    _fake_run(study / "runs", "lstm_old", 1, learned, 10000)  # a model since removed from the study
    (study / "runs" / "rims" / "seed_1.log").write_text("not a run folder\n")
    (study / "study.yaml").write_text(STUDY_FILE.format(name="memory-study"))
    before = sorted(p.relative_to(study) for p in study.rglob("*"))
    script = [sys.executable, str(REPO / "benchmarks" / "learning.py")]
    for named in (str(study), "memory-study"):
        done = subprocess.run([*script, "--study", named, "--threshold", "0.8", "--out", str(tmp_path / "out")],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        per_seed = [parts[:3] for parts in map(str.split, done.stdout.splitlines()[1:])
                    if len(parts) > 1 and parts[1].isdigit()]
        assert per_seed == [["lstm", "1", "not"], ["lstm", "10", "10000"], ["rims", "1", "10000"],
                            ["rims", "10", "not"]]
        assert "lstm                          reached 0.8 on 1/1" in done.stdout
        assert "rims                          reached 0.8 on 0/1" in done.stdout and "lstm_old" not in done.stdout
        assert "(1 unfinished, not counted)" in done.stdout
        assert "2 folder(s) in" in done.stderr and "lstm/seed_002" in done.stderr and "lstm_old/seed_1" in done.stderr
        assert (tmp_path / "out" / "curves" / "study-memory-study.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.relative_to(study) for p in study.rglob("*")) == before

    # A finished run whose mean return was never over a full window is not judged; damaged files are named.
    short = [{"frames": 5000 * i, "rollout/episodes": 20, "rollout/ep_return_mean": 0.9, "time/fps": 900}
             for i in (1, 2)]
    _fake_run(study / "runs", "rims", 10, short, 10000)
    done = subprocess.run([*script, "--study", str(study), "--threshold", "0.8", "--no-plot"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert "too short (40 episodes, fewer than the 100 of its window; not counted)" in done.stdout
    assert "rims                          reached 0.8 on 0/1" in done.stdout
    (study / "runs" / "rims" / "seed_10" / "config.yaml").write_text("total_frames: [1\n")
    done = subprocess.run([*script, "--study", str(study), "--no-plot"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "seed_10/config.yaml is not valid YAML" in done.stderr
    assert "Traceback" not in done.stderr

    (tmp_path / "studies" / "not-started").mkdir()
    (tmp_path / "studies" / "not-started" / "study.yaml").write_text(STUDY_FILE.format(name="not-started"))
    for args, message in [(["--study", str(tmp_path / "out")], "is neither a study name, a study directory nor"),
                          (["--study", "never-run"], "no study folder studies/never-run"),
                          (["--study", "not-started"], "has no runs yet"),
                          (["--study", str(study), "--seeds", "1-3"], "--seeds do not apply")]:
        refused = subprocess.run([*script, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
