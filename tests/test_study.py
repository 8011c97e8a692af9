"""Studies: statistics against hand-computed values, study-file refusals, and tiny real studies run
end to end (local pool with a Ctrl-C and a resume, a local Ray instance), reports rebuilt without training."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

import study as study_cli
from agents import report
from agents.study import (
    StudyError,
    check_eval_spaces,
    checkpoint_for_point,
    checkpoint_interval,
    eval_path,
    job_state,
    load_study,
    load_study_dir,
    parse_seeds,
    plan,
    resolved_config,
    run_study,
    save_study_copy,
    summarize_states,
)

REPO = Path(__file__).resolve().parent.parent
# Every run records this code version, so other edits to the working tree during the test do not
# make the runs of one model look like different code.
VERSION = "test-version"
TINY_RUN = {"env.n_envs": 2, "algo.n_steps": 32, "algo.num_minibatches": 1, "algo.n_epochs": 1, "algo.seq_len": 16}


def tiny_study(name: str = "tiny", model_names: tuple[str, ...] = ("lstm", "rims"), seeds: tuple[int, ...] = (1, 2),
               **extra: object) -> dict:
    """2 models x 2 seeds x 1024 frames (rollouts of 64), evaluated at 512 and 1024 frames on one held-out env."""
    model_defs = {
        "lstm": {"label": "lstm", "config": "configs/minigrid/doorkey-lstm-ppo.yaml",
                 "overrides": {"core.hidden_size": 16}},
        "rims": {"label": "rims", "config": "configs/minigrid/doorkey-rims-ppo.yaml",
                 "overrides": {"core.num_modules": 2, "core.module_size": 8, "core.k_active": 1}},
    }
    raw = {"name": name, "models": [model_defs[m] for m in model_names], "overrides": dict(TINY_RUN),
           "seeds": list(seeds), "total_frames": 1024,
           "eval": {"points": [512], "envs": [{"id": "MiniGrid-DoorKey-6x6-v0", "held_out": True}],
                    "episodes": 3, "final_episodes": 3}}
    raw.update(extra)
    return raw


def write_study(folder: Path, raw: dict, filename: str = "study.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics_frames(run_dir: Path) -> list[int]:
    return [json.loads(line)["frames"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def fixed_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODULAR_RL_CODE_VERSION", VERSION)


# -- statistics on fixed arrays ------------------------------------------------------------------


def test_iqm_and_mean_of_known_scores() -> None:
    # 12 scores 1..12: the IQM drops the lowest and highest 3 and averages 4..9.
    scores = np.arange(1, 13, dtype=float).reshape(4, 3)
    assert report.iqm(scores) == pytest.approx(6.5)
    assert report.mean(scores) == pytest.approx(6.5)
    outlier = np.array([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0], [100.0]])
    assert report.iqm(outlier) == pytest.approx((3 + 4 + 5 + 6) / 4)  # the two lowest and highest are trimmed
    assert report.mean(outlier) == pytest.approx(128 / 8)
    # The bootstrap's fast IQM is rliable's (scipy's trim_mean) number.
    rng = np.random.default_rng(1)
    for shape in [(10, 3), (7, 1), (5, 4), (1, 1)]:
        values = rng.normal(size=shape)
        assert report.fast_iqm(values) == pytest.approx(report.iqm(values), abs=1e-12)
    # A missing score is refused, not trimmed away (sorting puts NaN last, inside the trimmed tail).
    with pytest.raises(ValueError, match="finite"):
        report.fast_iqm(np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]))


def test_interval_estimates_contain_the_point_and_are_reproducible() -> None:
    rng = np.random.default_rng(0)
    scores = {"a": rng.uniform(size=(10, 3)), "b": rng.uniform(0.5, 1.0, size=(10, 3))}
    first = report.interval_estimates(scores, reps=500, seed=3)
    assert first == report.interval_estimates(scores, reps=500, seed=3)
    for model, values in scores.items():
        for stat, expected in (("iqm", report.iqm(values)), ("mean", values.mean())):
            point, low, high = first[model][stat]
            assert point == pytest.approx(expected)
            assert low <= point <= high
            assert high - low > 0


def test_probability_of_improvement_hand_computed() -> None:
    dominating, dominated = np.full((5, 2), 0.9), np.full((4, 2), 0.1)
    assert report.probability_of_improvement(dominating, dominated) == 1.0
    assert report.probability_of_improvement(dominated, dominating) == 0.0
    assert report.poi_interval(dominating + np.arange(5)[:, None] * 0.01, dominated, reps=300) == (1.0, 1.0, 1.0)
    # x = (1, 3), y = (2, 0): 3 of the 4 pairs have x > y.
    assert report.probability_of_improvement(np.array([[1.0], [3.0]]), np.array([[2.0], [0.0]])) == 0.75
    # A tie counts half: x = (1, 2) against y = (1, 1): 0.5 + 0.5 + 1 + 1 over 4 pairs.
    assert report.probability_of_improvement(np.array([[1.0], [2.0]]), np.array([[1.0], [1.0]])) == 0.75
    point, low, high = report.poi_interval(np.array([[0.2], [0.6], [0.9]]), np.array([[0.1], [0.5], [0.7]]), reps=500)
    assert low <= point <= high


def test_sample_sd_and_smallest_detectable_difference() -> None:
    from scipy import stats

    assert report.sample_sd([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 3))  # ddof=1, not sqrt(5/4)
    assert math.isnan(report.sample_sd([1.0]))
    # The case: seed SD 0.33, 10 seeds each.
    expected = (stats.t.ppf(0.975, 18) + stats.t.ppf(0.8, 18)) * math.sqrt(2 * 0.33**2 / 10)
    assert report.smallest_detectable_difference(0.33, 10, 0.33, 10) == pytest.approx(expected)
    assert report.smallest_detectable_difference(0.33, 10, 0.33, 10) == pytest.approx(0.437, abs=1e-3)
    assert report.smallest_detectable_difference(0.33, 3, 0.33, 3) > 0.75  # 3 seeds detect only large gaps
    assert math.isnan(report.smallest_detectable_difference(0.3, 1, 0.3, 10))
    assert report.smallest_detectable_difference(0.0, 5, 0.0, 5) == 0.0  # no spread: any difference shows


def test_the_detectable_difference_holds_its_power_when_spreads_differ() -> None:
    """Welch's df, not n_x + n_y - 2: with 3 spread runs against 12 tight ones the pooled df (13) made the
    number a Welch test finds only ~40% of the time; with Welch's df (~2) it is found ~80% of the time."""
    from scipy import stats

    rng = np.random.default_rng(0)
    for n_x, sd_x, n_y, sd_y in ((10, 1.0, 10, 1.0), (3, 1.0, 12, 0.1), (5, 1.0, 5, 0.25)):
        gap = report.smallest_detectable_difference(sd_x, n_x, sd_y, n_y)
        x, y = rng.normal(gap, sd_x, (20_000, n_x)), rng.normal(0.0, sd_y, (20_000, n_y))
        power = float(np.mean(stats.ttest_ind(x, y, axis=1, equal_var=False).pvalue < 0.05))
        assert 0.74 < power < 0.84, (n_x, n_y, power)


def test_mean_difference_interval_is_welchs() -> None:
    from scipy import stats

    rng = np.random.default_rng(1)
    x, y = rng.normal(0.3, 1.0, 4), rng.normal(0.0, 0.1, 11)
    point, low, high = report.mean_difference_interval(x, y)
    expected = stats.ttest_ind(x, y, equal_var=False).confidence_interval(0.95)
    assert point == pytest.approx(x.mean() - y.mean())
    assert (low, high) == (pytest.approx(expected.low), pytest.approx(expected.high))
    assert report.mean_difference_interval([1.0, 1.0], [0.0, 0.0]) == (1.0, 1.0, 1.0)  # no spread: exact
    one = report.mean_difference_interval([1.0], [0.0, 0.5])
    assert one[0] == 0.75 and math.isnan(one[1]) and math.isnan(one[2])


def test_performance_profile_and_verdicts() -> None:
    scores = np.array([[0.0, 0.5], [1.0, 0.25]])
    assert report.score_distribution(scores, np.array([-1.0, 0.2, 0.5, 1.0])).tolist() == [1.0, 0.75, 0.25, 0.0]
    profile, low, high = report.performance_profile({"a": scores}, np.array([0.2, 0.5]), reps=200)["a"]
    assert profile.tolist() == [0.75, 0.25]
    assert np.all(low <= profile) and np.all(profile <= high)
    assert "improves on" in report.verdict("rims", "lstm", (0.8, 0.6, 0.95))
    assert "does not separate" in report.verdict("rims", "lstm", (0.6, 0.4, 0.8))
    assert "worse" in report.verdict("rims", "lstm", (0.2, 0.1, 0.4))


# -- study files -----------------------------------------------------------------------------------


def test_holm_adjustment_hand_computed_and_claims_say_whether_they_hold_family_wise() -> None:
    from agents.report import conclusion, holm_adjusted, holm_family, verdict

    # Sorted 0.013, 0.019, 0.247, 0.261, 0.646, 0.765, times 6, 5, ..., 1; a running maximum; capped at 1.
    assert holm_adjusted([0.013, 0.646, 0.247, 0.765, 0.019, 0.261]) == pytest.approx([0.078, 1, 0.988, 1, 0.095, 0.988])
    assert holm_adjusted([0.04]) == pytest.approx([0.04])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        holm_adjusted([0.5, 1.5])
    family = holm_family({("a", "lstm"): 0.012, ("b", "lstm"): 0.003, ("c", "lstm"): 0.025})
    assert {key: (round(p, 6), n) for key, (p, n) in family.items()} == {
        ("a", "lstm"): (0.024, 3), ("b", "lstm"): (0.009, 3), ("c", "lstm"): (0.025, 3)}

    worse = conclusion("brims", "lstm", (0.06, 0.03, 0.11), (0.21, 0.14, 0.28), (0.21, 0.10, 0.35), 0.12,
                       p_value=0.013, family=(0.078, 6))
    assert worse.startswith("brims does worse than lstm on the held-out envs: its IQM interval lies below")
    assert worse.endswith("(permutation test p 0.013); after Holm's correction for the 6 comparisons of this report "
                          "p is 0.078, so the claim does not hold at a family-wise 0.05 level"), worse
    one_measure = conclusion("x", "y", (0.5, 0.4, 0.6), (0.45, 0.35, 0.55), (0.8, 0.6, 0.95), 0.1, p_value=0.004,
                             family=(0.012, 3))
    assert one_measure.startswith("only one measure separates x from y: P(x > y) 0.80 [0.60, 0.95] lies above 0.5 "
                                  "(permutation test p 0.004); after Holm's correction for the 3 comparisons of this "
                                  "report p is 0.012, so that separation holds at a family-wise 0.05 level; the other"), \
        one_measure
    assert "so the claim holds at a family-wise 0.05 level" in verdict("x", "y", (0.9, 0.7, 1.0), 0.002, family=(0.009, 3))
    # No claim, or a family of one: nothing to correct, and no words about it.
    assert "Holm" not in verdict("x", "y", (0.5, 0.3, 0.7), 0.9, family=(1.0, 3))
    assert "Holm" not in verdict("x", "y", (0.9, 0.7, 1.0), 0.002, family=(0.002, 1))
    assert "Holm" not in conclusion("x", "y", (0.5, 0.4, 0.6), (0.5, 0.4, 0.6), (0.5, 0.3, 0.7), 0.1, p_value=0.9,
                                    family=(1.0, 3))


def test_the_study_copy_names_configs_relative_to_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """study.yaml in a study directory means the same from any directory and in another checkout;
    an older copy with absolute paths to the same configs is the same study, a changed one is kept aside."""
    study = load_study(write_study(tmp_path, tiny_study()))
    directory = tmp_path / "out"
    directory.mkdir()
    save_study_copy(study, directory)
    copy = yaml.safe_load((directory / "study.yaml").read_text())
    assert [m["config"] for m in copy["models"]] == ["configs/minigrid/doorkey-lstm-ppo.yaml",
                                                      "configs/minigrid/doorkey-rims-ppo.yaml"]
    # From another directory, even one holding a same-named (edited) config, the copy means the package's files.
    decoy = tmp_path / "configs" / "minigrid" / "doorkey-lstm-ppo.yaml"
    decoy.parent.mkdir(parents=True)
    decoy.write_text((REPO / "configs/minigrid/doorkey-lstm-ppo.yaml").read_text().replace("seed: 1", "seed: 7"))
    monkeypatch.chdir(tmp_path)
    assert [m.config for m in load_study_dir(directory).models] == [m.config for m in study.models]
    assert study.models[0].config == REPO / "configs/minigrid/doorkey-lstm-ppo.yaml"

    for model in copy["models"]:  # the form older copies had
        model["config"] = str(REPO / model["config"])
    (directory / "study.yaml").write_text(yaml.safe_dump(copy, sort_keys=False))
    save_study_copy(study, directory)
    assert sorted(p.name for p in directory.iterdir()) == ["study.yaml"]
    assert yaml.safe_load((directory / "study.yaml").read_text())["models"][0]["config"].startswith("configs/")

    changed = tiny_study()
    changed["models"][0]["config"] = "configs/minigrid/multiroom-lstm-ppo.yaml"
    save_study_copy(load_study(write_study(tmp_path, changed, "changed.yaml")), directory)
    assert sorted(p.name for p in directory.iterdir()) == ["study.yaml", "study.yaml.1"]
    # A copy damaged or edited into invalid YAML (it ended `study.py run` in a traceback) is kept aside too.
    (directory / "study.yaml").write_text("garbage: [\n")
    save_study_copy(study, directory)
    assert sorted(p.name for p in directory.iterdir()) == ["study.yaml", "study.yaml.1", "study.yaml.2"]
    assert (directory / "study.yaml.2").read_text() == "garbage: [\n"
    assert load_study_dir(directory).models == study.models  # the new copy is this study's
    assert "could not be read (" in capsys.readouterr().out


def test_study_file_plan(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, tiny_study(seeds=(3, 1))))
    assert [m.label for m in study.models] == ["lstm", "rims"]
    assert study.points == (512, 1024) and checkpoint_interval(study) == 512
    jobs = plan(study, tmp_path / "out")
    assert [job.key for job in jobs] == ["lstm/seed_3", "rims/seed_3", "lstm/seed_1", "rims/seed_1"]
    assert "seed=3" in jobs[0].overrides and "log.checkpoint_interval_frames=512" in jobs[0].overrides
    # Paired evaluation: every job uses the same evaluate.py seed.
    assert {job.eval_args for job in jobs} == {jobs[0].eval_args} and "10000" in jobs[0].eval_args
    assert len({job.config_sha256 for job in jobs if job.model == "lstm"}) == 1  # the seed is not hashed
    assert parse_seeds("1-10") == tuple(range(1, 11)) and parse_seeds([1, "4-5"]) == (1, 4, 5)
    assert checkpoint_for_point({448: Path("a"), 576: Path("b")}, 512) == (576, Path("b"))


BAD_STUDIES = {
    "unknown key": ({"episodes_per_env": 5}, "unknown key 'episodes_per_env'"),
    "missing config file": ({"models": [{"label": "x", "config": "configs/nope.yaml"}]}, "config file not found"),
    "empty seeds": ({"seeds": []}, "seeds is empty"),
    "huge seed range": ({"seeds": ["1-100000000"]}, "is longer than 10,000 seeds"),
    "unknown executor": ({"executor": {"name": "slurm"}}, "unknown executor 'slurm'"),
    "label used twice": ({"models": [{"label": "a", "config": "configs/minigrid/doorkey-lstm-ppo.yaml"},
                                     {"label": "a", "config": "configs/minigrid/doorkey-rims-ppo.yaml"}]},
                         "label 'a' is used twice"),
    "bad override": ({"overrides": {"algo.nsteps": 3}}, "algo.nsteps"),
    "study key overridden": ({"overrides": {"total_frames": 5}}, "set by the study"),
    "unknown env": ({"eval": {"envs": ["MiniGrid-Nope-v0"], "points": []}}, "MiniGrid-Nope-v0"),
    "negative eval point": ({"eval": {"envs": ["MiniGrid-DoorKey-6x6-v0"], "points": [512, -5]}},
                            "eval.points[1] must be an integer >= 1, got -5"),
    "unknown training env": ({"overrides": {"env.id": "MiniGrid-DoorKey-5x5-v9"}},
                             "Unknown environment id 'MiniGrid-DoorKey-5x5-v9'"),
    "eval seed is a training seed": ({"eval": {"points": [512], "seed": 2, "episodes": 3, "final_episodes": 3,
                                               "envs": [{"id": "MiniGrid-DoorKey-6x6-v0", "held_out": True}]}},
                                     "eval.seed 2 is also a training seed"),
}


@pytest.fixture
def trained_dir(tmp_path: Path) -> Path:
    """A study directory holding a (fake) trained run, to check that refusals touch nothing."""
    run = tmp_path / "out" / "tiny" / "runs" / "lstm" / "seed_1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint_000000000512.pt").write_bytes(b"weights")
    (run / "metrics.jsonl").write_text('{"frames": 512}\n')
    return tmp_path / "out"


@pytest.mark.parametrize("case", list(BAD_STUDIES))
def test_bad_study_files_give_one_line_and_exit_2(tmp_path: Path, trained_dir: Path, case: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    change, message = BAD_STUDIES[case]
    path = write_study(tmp_path, tiny_study(**change))
    before = snapshot(trained_dir)
    assert study_cli.main(["run", str(path), "--root", str(trained_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert snapshot(trained_dir) == before


def test_ray_missing_and_bad_options_refused_before_any_work(tmp_path: Path, trained_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = write_study(tmp_path, tiny_study())
    before = snapshot(trained_dir)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert study_cli.main(["run", str(path), "--root", str(trained_dir), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[cluster]"' in err
    assert study_cli.main(["run", str(path), "--root", str(trained_dir), "--executor", "pbs"]) == 2
    assert "unknown executor 'pbs'" in capsys.readouterr().err
    assert study_cli.main(["run", str(tmp_path / "missing.yaml"), "--root", str(trained_dir)]) == 2
    assert "study file not found" in capsys.readouterr().err
    assert study_cli.main(["run", str(tmp_path), "--root", str(trained_dir)]) == 2
    assert f"study file {tmp_path} is a folder; give a YAML file" in capsys.readouterr().err
    assert snapshot(trained_dir) == before


def test_a_ray_address_nothing_answers_at_is_refused_in_seconds(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """ray.init retries an unreachable address for many minutes with warnings only (a review left one
    running 10 minutes); the study refuses it at once, before any folder is made."""
    import socket

    pytest.importorskip("ray")
    path = write_study(tmp_path, tiny_study())
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.time()
    root = tmp_path / "out"
    assert study_cli.main(["run", str(path), "--root", str(root), "--executor", "ray", "--address",
                           f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot reach Ray at 127.0.0.1:{port}: " in err, err
    assert time.time() - started < 30 and not root.exists()


def test_status_of_a_study_file_not_run_yet_and_debug_after_the_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_study(tmp_path, tiny_study())
    assert study_cli.main(["status", str(path), "--root", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "0/4 runs done" and sum("not started" in line for line in out) == 4
    assert not (tmp_path / "out").exists()  # status writes nothing
    with pytest.raises(StudyError, match="holds no study"):  # --debug after the command shows the error itself
        study_cli.main(["status", "nosuch", "--root", str(tmp_path / "out"), "--debug"])
    assert study_cli.main(["status", "nosuch", "--root", str(tmp_path / "out")]) == 2


def test_an_eval_env_that_does_not_fit_a_model_is_refused_before_training(tmp_path: Path) -> None:
    raw = tiny_study(model_names=("lstm",), seeds=(1,))
    raw["eval"]["envs"] = [{"id": "MiniGrid-DoorKey-6x6-v0", "held_out": True}, {"id": "CartPole-v1", "held_out": True}]
    path = write_study(tmp_path, raw)
    done = subprocess.run([sys.executable, str(REPO / "study.py"), "run", str(path), "--root", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "eval env 'CartPole-v1' does not fit model lstm (trained on MiniGrid-DoorKey-5x5-v0)" in done.stderr
    assert not (tmp_path / "o" / "tiny" / "runs").exists()  # nothing trained


def test_the_training_env_marked_held_out_is_refused_before_training(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A plain id in eval.envs is held out; the models' own training env written so was reported as held out."""
    raw = tiny_study(model_names=("lstm",), seeds=(1,))
    raw["eval"]["envs"] = ["MiniGrid-DoorKey-5x5-v0", "MiniGrid-DoorKey-6x6-v0"]
    assert study_cli.main(["run", str(write_study(tmp_path, raw)), "--root", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.endswith(
        "eval env 'MiniGrid-DoorKey-5x5-v0' is marked held out (a plain id in eval.envs is), but model lstm trains "
        "on it, and a held-out env must be one no model trains on; write it as {id: MiniGrid-DoorKey-5x5-v0, "
        "held_out: false}\n")
    assert not (tmp_path / "o" / "tiny" / "runs").exists()
    raw["eval"]["envs"][0] = {"id": "MiniGrid-DoorKey-5x5-v0", "held_out": False}  # as the message says: accepted
    fixed = load_study(write_study(tmp_path, raw, "fixed.yaml"))
    assert check_eval_spaces(fixed, plan(fixed, tmp_path / "p")) is None
    # A multi-task model's training tasks count too: DoorKey-6x6 is one of this one's.
    raw["models"].append({"label": "multitask", "config": "configs/meta/doorkey-sizes-multitask.yaml"})
    multi = load_study(write_study(tmp_path, raw, "multi.yaml"))
    with pytest.raises(StudyError, match="eval env 'MiniGrid-DoorKey-6x6-v0' is marked held out .* but model "
                                         "multitask trains on it"):
        check_eval_spaces(multi, plan(multi, tmp_path / "p"))


def test_a_frame_stack_on_minigrid_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_study(model_names=("lstm",), seeds=(1,))
    raw["models"][0]["overrides"]["env.frame_stack"] = 2
    path = write_study(tmp_path, raw)
    assert study_cli.main(["run", str(path), "--root", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model lstm: env.frame_stack=2 applies to Atari ids only" in err, err
    assert not (tmp_path / "o" / "tiny" / "runs").exists()  # nothing trained


def test_bad_study_file_from_the_command_line(tmp_path: Path) -> None:
    path = write_study(tmp_path, tiny_study(seeds=[]))
    done = subprocess.run([sys.executable, str(REPO / "study.py"), "run", str(path), "--root", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2
    expected = f"error: {path}: seeds is empty: list at least one seed (e.g. seeds: 1-10)"
    assert done.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "o").exists()


def test_a_folder_that_holds_no_study_or_a_root_that_is_a_file_is_refused_untouched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `run` writes report.md, plots/, runs/ into the study folder: one made for something else (no study.yaml)
    # would have its files replaced.
    path = write_study(tmp_path, tiny_study(model_names=("lstm",), seeds=(1,)))
    other = tmp_path / "other" / "tiny"
    (other / "plots").mkdir(parents=True)
    (other / "report.md").write_text("precious\n")
    (other / "plots" / "interval_estimates.png").write_bytes(b"p")
    before = snapshot(other)
    assert study_cli.main(["run", str(path), "--root", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {other} is not empty (plots and 1 more) and holds no study" in err, err
    assert snapshot(other) == before and sorted(p.name for p in other.iterdir()) == ["plots", "report.md"]
    # A --root that is a file, or lies under one: the option is named, nothing is created.
    afile = tmp_path / "afile"
    afile.write_text("f\n")
    assert study_cli.main(["run", str(path), "--root", str(afile)]) == 2
    assert capsys.readouterr().err == f"error: --root {afile} is a file, not a folder\n"
    assert study_cli.main(["run", str(path), "--root", str(afile / "sub")]) == 2
    assert capsys.readouterr().err == f"error: --root {afile / 'sub'}: {afile} is a file, not a folder\n"
    assert afile.read_text() == "f\n"
    # A study killed between moving its old copy aside (study.yaml.1) and writing the new one is still a study;
    # a folder holding only the Finder's .DS_Store is still empty.
    from agents.study import check_study_folder

    moved = tmp_path / "moved"
    (moved / "runs").mkdir(parents=True)
    (moved / "study.yaml.1").write_text("name: tiny\n")
    check_study_folder(moved)
    assert study_cli.main(["status", "moved", "--root", str(tmp_path)]) == 2  # says what is there, not "not run yet"
    assert "holds only an older copy of its study file (study.yaml.1)" in capsys.readouterr().err
    finder = tmp_path / "finder"
    finder.mkdir()
    (finder / ".DS_Store").write_bytes(b"\0")
    check_study_folder(finder)


def test_a_first_session_stopped_before_its_study_copy_continues_and_changed_eval_settings_are_announced(
        tmp_path: Path, fixed_version: None, capsys: pytest.CaptureFixture[str]) -> None:
    # study_lock makes the folder and .lock before save_study_copy writes study.yaml: a first session stopped
    # between the two leaves a folder holding .lock alone, which is this study's, not someone else's.
    raw = tiny_study(model_names=("lstm",), seeds=(1,))
    path = write_study(tmp_path, raw)
    root = tmp_path / "out" / "tiny"
    root.mkdir(parents=True)
    (root / ".lock").write_text("my notes\n")  # but a .lock that is no lock is someone's file: refused, kept
    assert study_cli.main(["run", str(path), "--root", str(root.parent)]) == 2
    assert capsys.readouterr().err == (f"error: {root / '.lock'} exists and is not a study lock (study.py run locks "
                                       "a study with a file of that name and would overwrite it); move it away, "
                                       "then run again\n")
    assert (root / ".lock").read_text() == "my notes\n" and sorted(p.name for p in root.iterdir()) == [".lock"]
    (root / ".lock").write_bytes(b"\xff\xfe binary")  # not UTF-8: the same refusal, not a traceback
    assert study_cli.main(["run", str(path), "--root", str(root.parent)]) == 2
    assert "is not a study lock" in capsys.readouterr().err and (root / ".lock").read_bytes() == b"\xff\xfe binary"
    (root / ".lock").write_text("12345\n")
    (root / ".study.yaml.12345.0badcafe.tmp").write_text("name: ti")  # killed while writing the copy
    assert run_study(load_study(path), root, workers=1, report=False) == 0
    run = root / "runs" / "lstm" / "seed_1"
    assert (root / "study.yaml").is_file() and json.loads(eval_path(run, 1024).read_text())["seed"] == 10000
    assert "evaluation result" not in capsys.readouterr().out
    # Only the evaluation seed changed: every point is evaluated again (never mixed), and the user is told.
    raw["eval"]["seed"] = 777
    assert run_study(load_study(write_study(tmp_path, raw)), root, workers=1, report=False) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "evaluation result" in line]
    assert notes == ["note: 2 evaluation result(s) (eval/point_*.json) were made with other evaluation settings "
                     "(the study file's eval section changed) or cannot be read (damaged); those points are "
                     "evaluated again, and each file replaced is kept in its run's eval/replaced/"]
    assert {json.loads(eval_path(run, p).read_text())["seed"] for p in (512, 1024)} == {777}
    # The results they replace are kept, numbered, never overwritten by a later replacement.
    kept = sorted(path.name for path in (run / "eval" / "replaced").iterdir())
    assert kept == ["point_000000000512.1.json", "point_000000001024.1.json"]
    assert json.loads((run / "eval" / "replaced" / kept[1]).read_text())["seed"] == 10000
    raw["eval"]["seed"] = 778
    assert run_study(load_study(write_study(tmp_path, raw)), root, workers=1, report=False) == 0
    assert json.loads((run / "eval" / "replaced" / "point_000000001024.2.json").read_text())["seed"] == 777
    assert json.loads((run / "eval" / "replaced" / kept[1]).read_text())["seed"] == 10000


# -- tiny real studies -------------------------------------------------------------------------------


def _start_study(path: Path, root: Path) -> subprocess.Popen:
    """``study.py run`` of ``path`` with one worker, as a real process whose output can be read."""
    env = {**os.environ, "MODULAR_RL_CODE_VERSION": VERSION}
    return subprocess.Popen([sys.executable, str(REPO / "study.py"), "run", str(path), "--root", str(root),
                             "--workers", "1", "--no-report"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@contextlib.contextmanager
def _one_long_run_study(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen, Path]]:
    """``study.py run`` of one 10M-frame run, once that run trains (its first metrics line written):
    ``(study file, output root, the driver process, the run's directory)``. On leaving, neither the
    driver nor a run it left behind is still running (a 10M-frame run would train for hours)."""
    from agents.run_dir import lock_holder

    path = write_study(tmp_path, tiny_study(model_names=("lstm",), seeds=(1,), total_frames=10_000_000))
    root = tmp_path / "out"
    process = _start_study(path, root)
    run = root / "tiny" / "runs" / "lstm" / "seed_1"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").is_file():
            time.sleep(0.1)
        yield path, root, process, run
    finally:
        if process.poll() is None:
            process.kill()
        holder = lock_holder(run)
        if holder is not None and holder.isdigit():
            os.kill(int(holder), signal.SIGKILL)


def test_a_stopped_study_waits_for_its_runs_to_checkpoint(tmp_path: Path, fixed_version: None) -> None:
    """SIGTERM while a run trains: the run is asked to stop, checkpoints, and has exited before the
    driver does (a driver that left first, as on Python 3.11 when the signal landed in Thread.join,
    left its run training unsupervised and holding the run's lock)."""
    from agents.run_dir import RunLock

    with _one_long_run_study(tmp_path) as (_, root, process, run):
        deadline = time.time() + 120
        while time.time() < deadline and (run / "metrics.jsonl").read_text().count("\n") < 2:
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 143, output
        RunLock(run).probe()  # nobody trains there any more
        assert (run / "checkpoint.pt").is_file() and 0 < metrics_frames(run)[-1] < 10_000_000
        assert "SIGINT: stopped after" in (root / "tiny" / "logs" / "lstm-seed_1.log").read_text()


def test_a_run_stopped_from_outside_the_study_is_named(tmp_path: Path, fixed_version: None) -> None:
    """SIGTERM to a run's train.py (a user's kill), not to the study: the study ends with that run named."""
    from agents.run_dir import lock_holder

    with _one_long_run_study(tmp_path) as (_, _, process, run):
        holder = lock_holder(run)
        assert holder is not None and holder.isdigit(), holder
        os.kill(int(holder), signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output
    assert "0/1 runs done, 1 partly done, 0 not started, 1 stopped from outside the study" in output, output
    assert ("  stopped: lstm/seed_1: train.py stopped by a signal (exit 143), not by this study (it continues from "
            "its last checkpoint next time)") in output, output
    assert (run / "checkpoint.pt").is_file()


def test_a_study_session_killed_outright_still_counts_in_the_provenance(tmp_path: Path, fixed_version: None) -> None:
    """SIGKILL gives study.py no chance to write anything: its session was recorded when it started, so
    the report still says it ran (before, only sessions that ended were recorded, and a study killed with
    its machine lost that session's dates and wall time from its provenance)."""
    from agents.report import provenance_lines

    with _one_long_run_study(tmp_path) as (path, root, process, _):
        process.kill()
        process.communicate(timeout=60)
    sessions = [json.loads(line) for line in (root / "tiny" / "sessions.jsonl").read_text().splitlines()]
    assert len(sessions) == 1 and sessions[0]["ended"] is None and sessions[0]["started"]
    assert sessions[0]["command"] == f"python study.py run {path} --root {root} --workers 1"
    lines = "\n".join(provenance_lines(load_study(path), root / "tiny"))
    assert f"Run from {sessions[0]['started']} to {sessions[0]['last_seen']} (UTC) in 1 session(s)" in lines
    assert "1 of them did not record an end" in lines, lines


def test_a_study_session_renews_its_record_and_closes_it(tmp_path: Path) -> None:
    from agents.study import read_study_sessions, study_session

    with study_session(tmp_path, {"command": "c"}, heartbeat_seconds=0.05) as closing:
        deadline = time.time() + 30
        while (running := read_study_sessions(tmp_path)[0])["seconds"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert running["ended"] is None and running["seconds"] > 0  # renewed while the body runs
        closing["done"] = 3
    with study_session(tmp_path, {"command": "d"}):  # a second session in the same second is its own record
        pass
    ended, second = read_study_sessions(tmp_path)
    assert ended["ended"] == ended["last_seen"] and ended["seconds"] >= running["seconds"] and ended["done"] == 3
    assert ended["session"] == running["session"] and ended["command"] == "c"
    assert second["command"] == "d" and "done" not in second and second["ended"] is not None


def test_a_study_session_whose_end_cannot_be_written_keeps_the_bodys_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agents.study import SESSIONS_FILE, study_session

    with pytest.raises(RuntimeError, match="the body's own"):
        with study_session(tmp_path, {"command": "c"}):
            (tmp_path / SESSIONS_FILE).unlink()  # the closing write fails: FileNotFoundError
            raise RuntimeError("the body's own error")
    assert "could not record the end of this session" in capsys.readouterr().err


def test_local_study_stopped_resumed_and_reported(tmp_path: Path, fixed_version: None,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C mid-study, run again (nothing trained twice), run a third time (nothing at all), report."""
    path = write_study(tmp_path, tiny_study())
    root = tmp_path / "out"
    process = _start_study(path, root)
    first = root / "tiny" / "runs" / "lstm" / "seed_1"
    deadline = time.time() + 120
    while not list((first / "checkpoints").glob("checkpoint_*.pt")) and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    # The command to continue names --root: without it, it would start the study afresh under studies/; and
    # study.py as it was started (from elsewhere, `python study.py` would not run).
    assert f"Continue with: python {REPO / 'study.py'} run {path} --root {root} --workers 1" in output

    study = load_study(path)
    jobs = plan(study, root / "tiny")
    counts = summarize_states(jobs)
    assert counts["done"] <= 1 and counts["new"] >= 3  # one worker: the other runs never started
    stopped = snapshot(root / "tiny" / "runs")
    checkpoints_then = {k: v for k, v in stopped.items() if "/checkpoints/" in k}
    assert checkpoints_then  # the interrupted run kept what it had saved

    assert run_study(study, root / "tiny", workers=2, report=False) == 0
    assert summarize_states(jobs) == {"done": 4, "partial": 0, "new": 0}
    after = snapshot(root / "tiny" / "runs")
    # Nothing trained twice: every checkpoint the stopped study wrote is untouched, and each run's
    # frame counter went up one rollout at a time to the budget.
    assert {k: after[k] for k in checkpoints_then} == checkpoints_then
    for job in jobs:
        run = Path(job.run_dir)
        frames = metrics_frames(run)
        assert frames == list(range(64, 1025, 64)), job.key
        assert sorted(p.name for p in (run / "eval").iterdir()) == ["point_000000000512.json",
                                                                    "point_000000001024.json"]
        provenance = json.loads((run / "provenance.json").read_text())
        assert provenance["config_sha256"] == job.config_sha256
        assert {s["commit"] for s in provenance["sessions"]} == {VERSION}
    log = Path(jobs[0].log).read_text()
    assert log.count("--run-dir") == 1  # lstm/seed_1 started once as a new run, never from scratch again

    # Each `run` that ran something logged itself (what the report's provenance says); a third run
    # trains and evaluates nothing and logs nothing.
    sessions = [json.loads(line) for line in (root / "tiny" / "sessions.jsonl").read_text().splitlines()]
    assert [s["stopped"] for s in sessions] == ["SIGINT", None] and sessions[1]["done"] == 4
    assert sessions[1]["command"] == f"python study.py run {path} --root {root} --workers 2" and sessions[1]["seconds"] > 0
    assert sessions[1]["machine"]["cpus"] == os.cpu_count() and "hostname" not in json.dumps(sessions)
    assert run_study(study, root / "tiny", report=False) == 0
    assert snapshot(root / "tiny" / "runs") == after
    assert len((root / "tiny" / "sessions.jsonl").read_text().splitlines()) == 2
    # Nor after the code changed: a finished study runs nothing, so there is nothing to mix and nothing to refuse.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODULAR_RL_CODE_VERSION", "edited-since")
        assert run_study(study, root / "tiny", report=False) == 0
    assert snapshot(root / "tiny" / "runs") == after
    # A session record cut short (a kill or a full disk mid-append) does not swallow the next one.
    from agents.study import read_study_sessions, record_study_session

    with (root / "tiny" / "sessions.jsonl").open("a") as handle:
        handle.write('{"session": "cut short", "start')
    record_study_session(root / "tiny", {"session": "next"})
    assert [s["session"] for s in read_study_sessions(root / "tiny")][-1] == "next"
    assert len(read_study_sessions(root / "tiny")) == 3

    # A changed model config is refused, not continued or mixed with the runs made before.
    changed = tiny_study()
    changed["models"][0]["overrides"] = {"core.hidden_size": 24}
    with pytest.raises(StudyError, match="was trained with another config than the study now asks"):
        run_study(load_study(write_study(tmp_path, changed, "changed.yaml")), root / "tiny", report=False)
    assert snapshot(root / "tiny" / "runs") == after
    # ... also when a run lost its config.yaml: the hash its provenance recorded stands for it.
    config_file = root / "tiny" / "runs" / "lstm" / "seed_1" / "config.yaml"
    config_file.rename(tmp_path / "config-aside.yaml")
    with pytest.raises(StudyError, match="lacks its config.yaml, and its provenance records another config"):
        run_study(load_study(write_study(tmp_path, changed, "changed.yaml")), root / "tiny", report=False)
    (tmp_path / "config-aside.yaml").rename(config_file)

    # The report is rebuilt from the finished runs without training.
    assert study_cli.main(["report", "tiny", "--root", str(root), "--reps", "200"]) == 0
    assert snapshot(root / "tiny" / "runs") == after
    text = (root / "tiny" / "report.md").read_text()
    for section in ("## Held-out envs, aggregated", "## Probability of improvement over the LSTM baselines",
                    "## Smallest detectable difference", "## Per seed", "## What the intervals support",
                    "## Provenance"):
        assert section in text
    assert "| Holm-adjusted p (1 comparison) |" in text
    assert {p.name for p in (root / "tiny" / "plots").iterdir()} == {
        "interval_estimates.png", "probability_of_improvement.png", "performance_profile.png",
        "heldout_vs_frames.png", "return_vs_frames_per_env.png"}
    # The tiny untrained runs score alike (both seeds of a model the same), which any row order would match:
    # each run's final evaluation gets a score of its own (in the file evaluate.py wrote), which must come
    # back in that run's row.
    for i, job in enumerate(jobs):
        path = Path(job.run_dir) / "eval" / "point_000000001024.json"
        data = json.loads(path.read_text())
        data["checkpoints"][0]["results"][0]["mean_return"] = 0.1 * (i + 1)
        path.write_text(json.dumps(data))
    scores = report.load_scores("tiny", root=root)
    assert set(scores) == {"lstm", "rims"} and all(s.shape == (2, 1) for s in scores.values())
    assert report.load_scores("tiny", point=512, root=root)["lstm"].shape == (2, 1)
    with pytest.raises(ValueError, match=r"evaluated at \[512, 1024\] frames, not at 12345"):
        report.load_scores("tiny", point=12345, root=root)  # a typo is an error, not empty scores
    for job in jobs:
        data = json.loads((Path(job.run_dir) / "eval" / "point_000000001024.json").read_text())
        row = report.load_results("tiny", root).seeds(job.model).index(job.seed)
        assert scores[job.model][row, 0] == pytest.approx(data["checkpoints"][0]["results"][0]["mean_return"])
        assert data["seed"] == 10000 and data["episodes"] == 3

    # Runs of one model from two code versions are refused, or listed apart when asked.
    provenance_path = Path(jobs[0].run_dir) / "provenance.json"
    provenance = json.loads(provenance_path.read_text())
    provenance["sessions"][0]["commit"] = "another-version"
    provenance_path.write_text(json.dumps(provenance))
    with pytest.raises(StudyError, match="model lstm mixes runs of different code or configs"):
        report.load_results("tiny", root)
    assert set(report.load_results("tiny", root, split_versions=True).models) == {"lstm@1", "lstm@2", "rims"}
    capsys.readouterr()
    assert study_cli.main(["report", "tiny", "--root", str(root), "--reps", "200"]) == 2  # the command line too
    assert "model lstm mixes runs of different code or configs" in capsys.readouterr().err
    assert study_cli.main(["report", "tiny", "--root", str(root), "--reps", "200", "--split-versions"]) == 0
    assert "| lstm@1 |" in (root / "tiny" / "report.md").read_text()

    # What a report leaves out is named: a partly done run by itself, runs not started as one entry per model.
    provenance["sessions"][0]["commit"] = VERSION
    provenance_path.write_text(json.dumps(provenance))
    (Path(jobs[0].run_dir) / "eval" / "point_000000001024.json").unlink()
    for job in jobs[2:]:
        shutil.rmtree(job.run_dir)
    assert [job.key for job in jobs] == ["lstm/seed_1", "rims/seed_1", "lstm/seed_2", "rims/seed_2"]
    assert report.load_results("tiny", root).missing == [
        "lstm/seed_1 (trained to 1,024 frames, evaluations missing at 1,024)",
        "lstm seed 2 (not started)", "rims seed 2 (not started)"]

    # A run whose training files are gone but whose evaluations stayed is trained again from nothing: the old
    # evaluations describe other weights, so they go aside and the new run is evaluated (they were taken as its own).
    run = Path(jobs[1].run_dir)
    old_eval = (run / "eval" / "point_000000000512.json").read_bytes()
    for path in run.iterdir():
        if path.name not in ("eval", "provenance.json"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert run_study(load_study(write_study(tmp_path, tiny_study(seeds=(1,)), "seed1.yaml")), root / "tiny",
                     report=False) == 0
    assert (run / "eval.earlier-1" / "point_000000000512.json").read_bytes() == old_eval
    assert json.loads((run / "eval" / "point_000000000512.json").read_text())["episodes"] == 3
    assert (run / "checkpoint.pt").is_file()


def test_runs_the_study_file_no_longer_plans_are_named_in_the_provenance(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from agents.report import provenance_lines
    from agents.study import unplanned_runs

    study = load_study(write_study(tmp_path, tiny_study(seeds=(1,))))
    root = tmp_path / "out" / "tiny"
    for name in ("runs/lstm/seed_1", "runs/rims/seed_1", "runs/lstm/seed_2", "runs/gru/seed_1",
                 "runs/lstm/seed_3.unfinished-1", "finetune/lstm.ppo/KeyCorridorS3R1/seed_1"):
        (root / name).mkdir(parents=True)
        (root / name / "config.yaml").write_text("name: a run\n")
    (root / "runs" / "rims" / "seed_4").mkdir()  # an empty folder holds no run
    assert [path.relative_to(root).as_posix() for path in unplanned_runs(study, root)] == [
        "finetune/lstm.ppo/KeyCorridorS3R1/seed_1", "runs/gru/seed_1", "runs/lstm/seed_2"]
    text = "\n".join(provenance_lines(study, root))
    assert "- Left out: 3 run folder(s) that the study file no longer plans" in text
    assert "`runs/gru/seed_1`, `runs/lstm/seed_2`. No number here uses them." in text
    assert study_cli.main(["status", str(study.source), "--root", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "note: 3 run folder(s) the study file does not plan (left out of its report): "
        "finetune/lstm.ppo/KeyCorridorS3R1/seed_1, runs/gru/seed_1, runs/lstm/seed_2")


def test_other_code_is_refused_before_and_during_a_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs of one model from two code versions can never be reported together: a study continued with
    # other code is refused before anything runs, and a job whose code changed after the study planned
    # it (an edit or checkout mid-session) fails instead of recording one version and running another.
    from agents.study import check_code_version, execute_job, record_session

    study = load_study(write_study(tmp_path, tiny_study()))
    root = tmp_path / "out"
    monkeypatch.setenv("MODULAR_RL_CODE_VERSION", "first")
    first = {"commit": "first", "dirty": False, "diff_sha256": None}
    jobs = plan(study, root, first)
    record_session(Path(jobs[0].run_dir), "train", jobs[0].config_sha256, first)
    check_code_version(jobs, first)  # the same version: goes on
    monkeypatch.setenv("MODULAR_RL_CODE_VERSION", "second")
    second = {"commit": "second", "dirty": False, "diff_sha256": None}
    with pytest.raises(StudyError, match="made with code version first, and the code is now second"):
        run_study(study, root, report=False)
    result = execute_job(jobs[1])  # planned with "first", runs under "second"
    assert result.status == "failed" and "the code changed while the study ran (first" in result.message
    assert not Path(jobs[1].run_dir).exists()  # nothing trained or recorded
    check_code_version(plan(study, tmp_path / "other", second), second)  # a new study directory is fine


def test_eval_points_a_started_run_cannot_reach_are_refused_before_it_trains(tmp_path: Path) -> None:
    """--resume keeps a run's checkpoint interval: a point added on another grid after the run started failed
    only once the run had trained to its budget (and its other points went unevaluated)."""
    from agents.study import check_points_reachable

    def started_run(points: list[int]) -> Job:
        study = load_study(write_study(tmp_path, tiny_study(eval={**tiny_study()["eval"], "points": points}),
                                       f"points-{len(points)}.yaml"))
        job = plan(study, tmp_path / f"out-{len(points)}")[0]
        run = Path(job.run_dir)
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text("log: {checkpoint_interval_frames: 512}\nenv: {n_envs: 2}\n"
                                         "algo: {n_steps: 32}\n")  # as started with points [512]
        (run / "checkpoints" / "checkpoint_000000000512.pt").write_bytes(b"")
        return job

    check_points_reachable(started_run([512]))  # its own grid, and the end of the budget: fine
    with pytest.raises(StudyError, match=r"cannot be evaluated at 768 frames: the run saves a checkpoint every 512 "
                                         r"frames .* and would pass it"):
        check_points_reachable(started_run([512, 768]))
    with pytest.raises(StudyError, match="cannot be evaluated at 256 frames: .* has none within a rollout after"):
        check_points_reachable(started_run([256, 512, 768]))


def test_a_config_file_edited_while_the_study_runs_fails_its_job(tmp_path: Path, fixed_version: None) -> None:
    from agents.study import execute_job

    config = tmp_path / "lstm.yaml"
    config.write_text((REPO / "configs/minigrid/doorkey-lstm-ppo.yaml").read_text())
    raw = tiny_study(model_names=("lstm",), seeds=(1,))
    raw["models"][0]["config"] = str(config)
    study = load_study(write_study(tmp_path, raw))
    job = plan(study, tmp_path / "out", {"commit": VERSION, "dirty": False, "diff_sha256": None})[0]
    config.write_text(config.read_text().replace("ent_coef: 0.01", "ent_coef: 0.05"))
    result = execute_job(job)
    assert result.status == "failed" and "changed while the study ran" in result.message
    assert not (Path(job.run_dir) / "config.yaml").exists()


def test_a_stop_that_reaches_train_py_while_it_starts_is_a_stop(tmp_path: Path, fixed_version: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from agents import study as study_module
    from agents.study import execute_job

    study = load_study(write_study(tmp_path, tiny_study(model_names=("lstm",), seeds=(1,))))
    job = plan(study, tmp_path / "out", {"commit": VERSION, "dirty": False, "diff_sha256": None})[0]
    # train.py signalled while it is still importing (before main() handles SIGINT), or after it has finished,
    # dies of the SIGINT, as a Python process that has not installed its handler does: this one never does.
    monkeypatch.setattr(study_module, "train_command", lambda job: [sys.executable, "-c", "import time; time.sleep(60)"])
    calls = []

    def stop_after_the_start() -> int:  # go on at the job's first check, then stop: SIGINT at the first poll
        calls.append(1)
        return 0 if len(calls) == 1 else 1

    result = execute_job(job, stop_after_the_start)
    assert "KeyboardInterrupt" in Path(job.log).read_text()  # exit -2, which was reported as a failure
    assert result.status == "stopped", result


def test_evaluations_made_with_other_settings_or_points_are_not_taken(tmp_path: Path) -> None:
    # A study file whose eval section changed after some runs were evaluated: a point evaluated with
    # other episodes or levels is evaluated again (never mixed), and a new point with no checkpoint
    # within a rollout after it is refused rather than served another point's model.
    from agents.study import eval_commands, has_eval

    study = load_study(write_study(tmp_path, tiny_study(model_names=("lstm",), seeds=(1,))))
    job = plan(study, tmp_path / "out")[0]
    run = Path(job.run_dir)
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(resolved_config(study, study.model("lstm"), 1)))
    for frames in (512, 1024):  # rollouts of 64 frames: the checkpoints of points 512 and 1024
        (run / "checkpoints" / f"checkpoint_{frames:012d}.pt").write_bytes(b"weights")
    assert [points for points, _, _ in eval_commands(job)] == [[512, 1024]]  # 3 episodes at both: one call
    eval_path(run, 512).parent.mkdir()
    eval_path(run, 512).write_text(json.dumps({"study_eval": job.eval_settings(512), "checkpoints": []}))
    assert has_eval(run, 512, job.eval_settings(512)) and job.evals_missing() == [1024]

    more_episodes = tiny_study(model_names=("lstm",), seeds=(1,))
    more_episodes["eval"]["episodes"] = 5
    changed = plan(load_study(write_study(tmp_path, more_episodes, "more.yaml")), tmp_path / "out")[0]
    assert changed.run_dir == job.run_dir and changed.evals_missing() == [512, 1024]

    new_point = tiny_study(model_names=("lstm",), seeds=(1,))
    new_point["eval"]["points"] = [256]
    moved = plan(load_study(write_study(tmp_path, new_point, "moved.yaml")), tmp_path / "out")[0]
    refused = r"no checkpoint within a rollout after 256 frames to evaluate \(the nearest is at 512"
    with pytest.raises(StudyError, match=refused):
        eval_commands(moved)


def test_ray_study_end_to_end(tmp_path: Path, fixed_version: None) -> None:
    ray = pytest.importorskip("ray")
    # One model x 2 seeds: the two runs go to the two Ray CPUs side by side.
    path = write_study(tmp_path, tiny_study(name="tiny-ray", model_names=("rims",), executor={"name": "ray"}))
    root = tmp_path / "out" / "tiny-ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert run_study(load_study(path), root, report=False) == 0
    finally:
        ray.shutdown()
    jobs = plan(load_study(path), root)
    assert all(job_state(job).done for job in jobs)
    for job in jobs:
        assert metrics_frames(Path(job.run_dir))[-1] == 1024
    assert report.load_scores(root, root=tmp_path / "out")["rims"].shape == (2, 1)


def test_report_of_a_study_with_nothing_evaluated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_study(tmp_path, tiny_study())
    folder = tmp_path / "out" / "tiny"
    folder.mkdir(parents=True)
    shutil.copy(path, folder / "study.yaml")
    assert study_cli.main(["report", "tiny", "--root", str(tmp_path / "out")]) == 2
    assert "nothing to report" in capsys.readouterr().err
    assert study_cli.main(["report", "nope", "--root", str(tmp_path / "out")]) == 2
    assert "holds no study" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["doorkey-generalization", "multiroom-generalization"])
def test_shipped_study_files_are_valid_and_no_level_stream_is_shared(name: str, tmp_path: Path) -> None:
    from agents.evaluation import episode_seeds
    from agents.study import resolved_config
    from envs import env_seeds

    study = load_study(REPO / "configs" / "studies" / f"{name}.yaml")
    assert study.seeds == tuple(range(1, 11)) and len(study.points) >= 4
    streams = []
    for job in plan(study, tmp_path):
        config = resolved_config(study, study.model(job.model), job.seed)
        streams += env_seeds(config["seed"], config["env"]["n_envs"])
    # Seed s gives every model the same level streams (paired), and no two seeds share one ...
    assert len(set(streams)) == len(study.seeds) * config["env"]["n_envs"]
    # ... and no evaluation episode starts from a training stream's seed.
    final_episodes = study.eval.final_episodes
    assert not set(streams) & set(episode_seeds(study.eval.seed, final_episodes)[0].tolist())


def test_a_run_killed_before_its_first_checkpoint_is_set_aside_not_lost(tmp_path: Path) -> None:
    from agents.study import set_aside_unresumable

    run = tmp_path / "seed_1"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\n")
    (run / "metrics.jsonl").write_text("")
    assert set_aside_unresumable(run) == tmp_path / "seed_1.unfinished-1"
    assert not run.exists() and (tmp_path / "seed_1.unfinished-1" / "config.yaml").read_text() == "seed: 1\n"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\n")
    (run / "checkpoint.pt").write_bytes(b"x")
    assert set_aside_unresumable(run) is None and (run / "checkpoint.pt").is_file()  # resumable: left alone
    assert set_aside_unresumable(tmp_path / "empty") is None
    # A run that lost checkpoint.pt but kept numbered ones was trained: it is not set aside to start over (it was,
    # with a note that called it killed before its first checkpoint); the study says how to continue it.
    (run / "checkpoint.pt").unlink()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "checkpoint_000000002048.pt").write_bytes(b"x")
    with pytest.raises(StudyError, match=r"no checkpoint.pt but numbered checkpoints up to 2,048 frames: copy .*"
                                         r"checkpoint_000000002048.pt to .*checkpoint.pt to continue"):
        set_aside_unresumable(run)
    assert (run / "config.yaml").is_file()
    # A run with no checkpoint that a live process still trains (left by a killed study) is not moved
    # from under it: the study says who holds it.
    held = tmp_path / "seed_2"
    held.mkdir()
    (held / "config.yaml").write_text("seed: 2\n")
    hold = ("import sys, time; from agents.run_dir import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(held)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StudyError, match=rf"being trained by another process \(pid {holder.pid}\)"):
            set_aside_unresumable(held)
        assert (held / "config.yaml").is_file()
    finally:
        holder.kill()
        holder.wait()
    assert set_aside_unresumable(held) == tmp_path / "seed_2.unfinished-1"  # its holder is gone


def test_code_version_ignores_commits_outside_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A study stopped, a README commit, the study continued: still one version of the code.
    import subprocess

    from agents.study import code_version, version_tag

    monkeypatch.delenv("MODULAR_RL_CODE_VERSION", raising=False)

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "loop.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("docs\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    first = version_tag(code_version(tmp_path))
    (tmp_path / "README.md").write_text("more docs\n")
    git("commit", "-q", "-am", "docs")
    assert version_tag(code_version(tmp_path)) == first
    (tmp_path / "agents" / "loop.py").write_text("x = 2\n")
    uncommitted = version_tag(code_version(tmp_path))
    assert uncommitted != first
    git("commit", "-q", "-am", "code")
    assert version_tag(code_version(tmp_path)) == uncommitted  # the same code, committed or not
    # A fix to the report between two sessions of a study leaves its runs one version.
    (tmp_path / "agents" / "report.py").write_text("fixed = True\n")
    assert version_tag(code_version(tmp_path)) == uncommitted


def test_train_and_evaluate_never_import_the_report_only_modules() -> None:
    # The code version leaves REPORT_ONLY_PATHS out because no run executes them; an import of one of
    # them from the training or evaluation path would make that untrue.
    import subprocess
    import sys

    from agents.study import REPORT_ONLY_PATHS

    script = ("import sys, train, evaluate\n"
              "from agents import trainer, evaluation, meta, distributed, rollout, ppo, a2c\n"
              "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('agents', 'policies', 'envs'))))")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120, check=True)
    imported = set(done.stdout.split())
    assert "agents.trainer" in imported and "agents.evaluation" in imported
    report_only = {path.removesuffix(".py").replace("/", ".") for path in REPORT_ONLY_PATHS}
    assert not imported & report_only


def test_version_tag_keeps_a_configured_version_whole_and_shortens_git_commits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agents.study import code_version, version_tag

    # Two release tags that share their first 10 characters stay two versions.
    tags = []
    for value in ("release-2026-01", "release-2026-02"):
        monkeypatch.setenv("MODULAR_RL_CODE_VERSION", value)
        tags.append(version_tag(code_version()))
    assert tags == ["release-2026-01", "release-2026-02"]
    # Provenance from before the code hash: a git commit is cut to 10 hex digits, plus its diff hash when dirty.
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert version_tag({"commit": commit, "dirty": False}) == "0123456789"
    assert version_tag({"commit": commit, "dirty": True, "diff_sha256": "feedbeef" * 8}) == "0123456789+dirty.feedbeef"
    assert version_tag({"commit": None}) == "unknown"
    assert version_tag({"commit": commit, "code_sha256": "ab" * 32}) == "code.ababababab"


def test_config_hash_tells_pretrained_from_random_weights_but_not_the_weights_path() -> None:
    from agents.config import load_config
    from agents.study import config_hash

    plain = load_config(None, [])
    assert plain["init_from"] is None
    before_the_key = {k: v for k, v in plain.items() if k != "init_from"}
    assert config_hash(plain) == config_hash(before_the_key)  # runs recorded before init_from existed still match
    a = load_config(None, ["init_from=/studies/x/runs/rims/seed_1/checkpoint.pt"])
    b = load_config(None, ["init_from=/elsewhere/x/runs/rims/seed_2/checkpoint.pt"])
    # The path moves with the study directory and the seed; a row switched to (or from) scratch does not match.
    assert config_hash(a) == config_hash(b) != config_hash(plain)
    # A run resumed on a CPU after a GPU (train.py allows device to change on resume) is still the study's run.
    from agents.study import config_differences

    moved = load_config(None, ["device=cuda"])
    assert config_hash(moved) == config_hash(plain) and config_differences(moved, plain) == []


def test_a_closed_terminal_stops_a_study_cleanly() -> None:
    # SIGHUP (an ssh session that drops) must stop the pool like Ctrl-C, not kill study.py and leave
    # its runs training on unsupervised; the previous handlers come back afterwards.
    from agents.executors import stop_signals_as_interrupt

    outer_hangup = signal.getsignal(signal.SIGHUP)  # SIG_IGN when pytest itself runs under nohup
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a terminal's session
        before = signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGTERM)
        for number in (signal.SIGHUP, signal.SIGTERM):
            with pytest.raises(KeyboardInterrupt), stop_signals_as_interrupt() as received:
                os.kill(os.getpid(), number)
                time.sleep(5)  # the handler interrupts this
            assert received == [signal.Signals(number).name]
        assert (signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGTERM)) == before
        # Under nohup (SIGHUP ignored) a hangup is still ignored: the study goes on.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with stop_signals_as_interrupt() as received:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
        assert received == []
    finally:
        signal.signal(signal.SIGHUP, outer_hangup)


def test_recorded_stop_signals_never_cut_a_step_short() -> None:
    # benchmarks/learning.py starts runs in its main thread: an interrupt between a run's fork and Popen's
    # return would lose the child. Under stop_signals_recorded a stop signal (Ctrl-C too) only appends its
    # name; the step it arrived in runs to its end, and the previous handlers come back.
    from agents.executors import stop_signals_recorded

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_signals_recorded() as received:
        for number in (signal.SIGINT, signal.SIGTERM):
            started = time.monotonic()
            os.kill(os.getpid(), number)
            time.sleep(0.3)  # not interrupted
            assert time.monotonic() - started >= 0.3
        assert received == ["SIGINT", "SIGTERM"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_the_status_line_estimates_the_time_left_from_this_sessions_rate(tmp_path: Path) -> None:
    import io

    from agents.executors import Display
    from agents.study import Job

    jobs = []
    for seed in (1, 2):
        (tmp_path / f"seed_{seed}").mkdir()
        jobs.append(Job(study="tiny", model="lstm", seed=seed, run_dir=str(tmp_path / f"seed_{seed}"), config="c.yaml",
                        overrides=(), total_frames=1000, points=(1000,), episodes=1, final_episodes=1, eval_args=(),
                        config_sha256="", log=str(tmp_path / f"seed_{seed}.log")))
    # Seed 1 had trained 200 frames before this session: 1,800 frames to go when it starts.
    (tmp_path / "seed_1" / "metrics.jsonl").write_text(json.dumps({"frames": 200, "time/fps": 100}) + "\n")
    display = Display("tiny", 2, 0, stream=io.StringIO(), todo=jobs)
    display.started -= 30
    assert "left" not in display.line(0, jobs, 0, 0), "no estimate before a minute's progress"
    display.started -= 90  # two minutes in, 600 frames trained: 1,200 to go at 300 a minute
    (tmp_path / "seed_1" / "metrics.jsonl").write_text(json.dumps({"frames": 600, "time/fps": 100}) + "\n")
    (tmp_path / "seed_2" / "metrics.jsonl").write_text("not json\n" + json.dumps({"frames": 200}) + "\n")
    assert display.line(0, jobs, 0, 0).endswith("| 2m00s, ~4m left")
    (tmp_path / "seed_2" / "metrics.jsonl").write_text(json.dumps({"frames": 1000}) + "\n")
    assert display.line(0, jobs, 0, 0).endswith("~4m left"), "the files are read again only after 15 s"
    display._left_read_at -= 15
    assert display.line(0, jobs, 0, 0).endswith("| 2m00s, ~34s left")  # 1,400 trained in 2 min, 400 to go


def test_the_display_survives_a_terminal_that_is_gone() -> None:
    # After a hangup every write to the terminal fails (EIO); the pool loop must still reach the code
    # that stops its runs, so the display goes quiet instead of raising.
    from agents.executors import Display

    class GoneTerminal:
        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> int:
            raise OSError(5, "Input/output error")

        def flush(self) -> None:
            raise OSError(5, "Input/output error")

    display = Display("tiny", 4, 0, stream=GoneTerminal())
    display.update(1, [], 2, 0, force=True)
    display.message("stopping")
    display.close()
    assert not display.tty


def test_a_failed_jobs_summary_line_is_cut_at_a_word(tmp_path: Path) -> None:
    """The study's console names a failed job by its log's last ``error:`` line, at most ~300 characters:
    cut at a space (not mid-word) and marked, or hard-cut when the line has no space to cut at (a long path)."""
    from agents.study import _last_error

    log = tmp_path / "job.log"
    words = " ".join(f"word{i:03d}" for i in range(60))  # 479 characters
    log.write_text(f"training...\nerror: {words}\nTraceback-free tail\n")
    summary = _last_error(str(log))
    message, _, where = summary.partition(" (log: ")
    assert where == f"{log})"
    assert message.endswith(" ...") and len(message) <= 301
    assert message[:-4].split(" ")[-1] in words.split(" ")  # the last word kept is whole
    log.write_text("error: " + "x" * 400 + "\n")
    assert _last_error(str(log)).startswith("error: " + "x" * 290) and " ... (log: " in _last_error(str(log))


def test_a_failed_rename_names_the_file_meant_not_the_temporary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import agents.report

    report = tmp_path / "report.md"

    def rename_onto_a_folder(*args: object, **kwargs: object) -> Path:  # os.replace(tmp, report.md), report.md a folder
        raise IsADirectoryError(21, "Is a directory", str(tmp_path / ".report.md.1.abcd.tmp"), None, str(report))

    monkeypatch.setattr(agents.report, "write_report", rename_onto_a_folder)
    assert study_cli.main(["report", "some-study", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: Is a directory: {report}\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device every write to fails as a full disk)")
def test_a_full_disk_under_a_study_names_the_file_or_folder(tmp_path: Path, fixed_version: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from agents.study import execute_job

    # A write to an open file on a full disk raises an OSError that names no file: the message must.
    path = write_study(tmp_path, tiny_study(model_names=("lstm",), seeds=(1,)))
    study_folder = tmp_path / "out" / "tiny"
    study_folder.mkdir(parents=True)
    (study_folder / ".lock").symlink_to("/dev/full")
    assert study_cli.main(["run", str(path), "--root", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {study_folder / '.lock'}: ") and err.count("\n") == 1, err
    (study_folder / ".lock").unlink()

    job = plan(load_study(path), study_folder, {"commit": VERSION, "dirty": False, "diff_sha256": None})[0]
    Path(job.log).parent.mkdir(parents=True)
    Path(job.log).symlink_to("/dev/full")
    result = execute_job(job)
    assert result.status == "failed", result
    # The job's own message (the study folder, where its files go), not the one a close of the log raises after it.
    assert result.message.startswith(f"no space left on device (under {study_folder}) (") and \
        "free on its file system" in result.message, result.message
    assert "None" not in result.message


def test_the_command_to_continue_names_the_root_only_where_study_py_can_take_it(tmp_path: Path) -> None:
    from agents.study import DEFAULT_ROOT, continue_command

    study = load_study(write_study(tmp_path / "my studies", tiny_study()))
    quoted = f"'{tmp_path / 'my studies' / 'study.yaml'}'"
    assert continue_command(study, "local", 2, None, DEFAULT_ROOT / "tiny") == f"python study.py run {quoted} --workers 2"
    assert continue_command(study, "local", None, None, tmp_path / "out dir" / "tiny") == \
        f"python study.py run {quoted} --root '{tmp_path / 'out dir'}'"
    # A directory not named after the study (run_study from Python) cannot be passed as --root/<name>.
    assert continue_command(study, "local", None, None, tmp_path / "elsewhere") == f"python study.py run {quoted}"


def test_a_study_directorys_own_study_file_names_that_directory_under_any_root(tmp_path: Path) -> None:
    """`study.py status/run <elsewhere>/<name>/study.yaml` means that study, not a study of the same name
    under studies/ (which a stale hint once sent a user to)."""
    from agents.study import study_dir

    study = load_study(write_study(tmp_path, tiny_study(name="elsewhere")))
    directory = tmp_path / "other-root" / "elsewhere"
    directory.mkdir(parents=True)
    save_study_copy(study, directory)
    copy = directory / "study.yaml"
    # Before any run has started it is read as any study file: by name, under the root given.
    assert study_dir(copy, root=tmp_path / "studies") == tmp_path / "studies" / "elsewhere"
    (directory / "runs").mkdir()  # a study that has started
    assert study_dir(copy) == directory and study_dir(copy, root=tmp_path / "studies") == directory
    assert study_dir(tmp_path / "study.yaml", root=tmp_path / "studies") == tmp_path / "studies" / "elsewhere"


@pytest.mark.parametrize(
    "flags,vector",
    [("fpu sse2 avx avx2 avx512f avx512bw", "AVX-512"), ("fpu sse2 avx avx2 fma", "AVX2"), ("fp asimd", "NEON"),
     ("fpu", "unknown")],
)
def test_machine_description_names_the_widest_vector_instructions(
    monkeypatch: pytest.MonkeyPatch, flags: str, vector: str
) -> None:
    """Study sessions and the throughput benchmark record the CPU's widest vector instructions (the C kernels'
    speed depends on them), read from the first core's flags (test_publish checks the provenance line)."""
    from agents.study import machine_description

    key = "Features" if vector == "NEON" else "flags"
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    cpuinfo = (f"processor\t: 0\nmodel name\t: Test CPU\n{key}\t\t: {flags}\n\n"
               f"processor\t: 1\nmodel name\t: Other\n{key}\t: fpu\n")
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text",
                        lambda self, *a, **k: cpuinfo if str(self) == "/proc/cpuinfo" else read_text(self, *a, **k))
    machine = machine_description()
    assert machine["cpu"] == "Test CPU" and machine["vector"] == vector


def test_a_training_config_a_broken_or_missing_study_file_get_one_line_each(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A train.py config gave "unknown key 'algo'", broken YAML no line or column, and a missing study file "neither a
    # study name, a study directory nor a study file".
    config = "configs/minigrid/doorkey-lstm-ppo.yaml"
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nmodels: [\n")
    cases = [(["run", config], f"{config}: this is a training config, not a study file (it has no models): train it "
                               f"with `python train.py --config {config}`"),
             (["run", str(broken)], f"{broken}: not valid YAML (expected the node content, but found '<stream end>' "
                                    "at line 3, column 1"),
             (["status", "configs/studies/nope.yaml"], "study file not found: configs/studies/nope.yaml (looked in "),
             (["status", str(tmp_path / "nope.yaml")], f"study file not found: {tmp_path / 'nope.yaml'}\n")]
    for argv, message in cases:
        assert study_cli.main([*argv, "--root", str(tmp_path / "studies")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "studies").exists()


def test_a_shipped_study_is_found_from_any_folder_and_not_yet_run_says_how_to_start_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # As train.py's --config finds shipped configs from anywhere, study.py finds configs/studies/<file>.
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    assert study_cli.main(["status", "configs/studies/doorkey-generalization.yaml", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "lstm-128/seed_1" in out and "not started" in out and out.rstrip().endswith("0/50 runs done")
    # By name, before its first run: the message names the shipped file that starts it, with the --root given (it
    # was left out, so the command started the study under studies/); nothing is created.
    assert study_cli.main(["status", "doorkey-generalization", "--root", str(root)]) == 2
    assert capsys.readouterr().err == (f"error: {root / 'doorkey-generalization'} holds no study (no study.yaml): it "
                                       "has not been run yet; `python study.py run "
                                       f"configs/studies/doorkey-generalization.yaml --root {root}` starts it\n")
    for default in ([], ["--root", str(tmp_path / "studies")]):  # the default root (as a path too) needs no --root
        assert study_cli.main(["status", "doorkey-generalization", *default]) == 2
        assert capsys.readouterr().err.endswith("`python study.py run configs/studies/doorkey-generalization.yaml` "
                                                "starts it\n")
    assert not root.exists() and not (tmp_path / "studies").exists()
