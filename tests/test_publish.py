"""Publishing studies to the results page: a tiny finished study (runs written by hand, so no training),
refusals (unfinished runs, mixed code versions, a hand-edited page), the conclusion rule on fixed
arrays, and the benchmarks/generalization.py wrapper's command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import study as study_cli
from agents import report
from agents.study import (
    config_hash,
    eval_path,
    load_study,
    plan,
    record_session,
    resolved_config,
    save_study_copy,
)
from tests.test_study import VERSION, tiny_study, write_study

REPO = Path(__file__).resolve().parent.parent
SEEDS = (1, 2, 3, 4, 5)
# End-of-budget held-out returns per seed: rims clearly above both LSTMs, the two LSTMs alike.
SCORES = {"lstm": [0.20, 0.35, 0.10, 0.30, 0.25], "lstm-24": [0.30, 0.15, 0.25, 0.20, 0.35],
          "rims": [0.80, 0.90, 0.85, 0.70, 0.95]}


def fake_study(tmp_path: Path, name: str = "tiny-pub", seeds: tuple[int, ...] = SEEDS) -> tuple[Path, Path]:
    """A finished tiny study (3 models x 5 seeds, listed as ``seeds``: SEEDS in any order) whose runs are
    written by hand: checkpoints at the budget, evaluate.py-shaped JSONs at each point, provenance of one code
    version. Returns (root, study dir)."""
    raw = tiny_study(name=name, seeds=list(seeds))
    raw["models"].insert(1, {"label": "lstm-24", "config": "configs/minigrid/doorkey-lstm-ppo.yaml",
                             "overrides": {"core.hidden_size": 24}})
    study = load_study(write_study(tmp_path, raw))
    root = tmp_path / "studies"
    directory = root / name
    directory.mkdir(parents=True)
    save_study_copy(study, directory)
    for job in plan(study, directory):
        run = Path(job.run_dir)
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(resolved_config(study, study.model(job.model), job.seed)))
        for point in study.points:
            (run / "checkpoints" / f"checkpoint_{point:012d}.pt").write_bytes(b"weights")
            value = SCORES[job.model][SEEDS.index(job.seed)] * (point / study.total_frames)
            data = {"seed": 10000, "episodes": 3, "study_eval": job.eval_settings(point), "checkpoints": [{
                "checkpoint": str(run / "checkpoints" / f"checkpoint_{point:012d}.pt"),
                "results": [{"name": "DoorKey-6x6", "mean_return": value, "success_rate": value}]}]}
            eval_path(run, point).parent.mkdir(exist_ok=True)
            eval_path(run, point).write_text(json.dumps(data))
        record_session(run, "train", job.config_sha256, {"commit": VERSION, "dirty": False, "diff_sha256": None})
        assert config_hash(yaml.safe_load((run / "config.yaml").read_text())) == job.config_sha256
    (directory / "sessions.jsonl").write_text(json.dumps({
        "command": f"python study.py run {study.source}", "started": "2026-12-01T10:00:00Z",
        "ended": "2026-12-01T11:55:00Z", "seconds": 6900.0, "executor": "local", "workers": 2,
        "machine": {"system": "Linux x86_64", "cpu": "Test CPU", "vector": "AVX2", "cpus": 2, "python": "3.12.0",
                    "torch": "2.13.0"}}) + "\n")
    return root, directory


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


# -- the conclusion rule on fixed arrays -------------------------------------------------------------


def test_conclusion_follows_the_intervals() -> None:
    rng = np.random.default_rng(0)
    high = 0.8 + 0.05 * rng.standard_normal((10, 3))
    low = 0.2 + 0.05 * rng.standard_normal((10, 3))
    assert report.conclude("rims", "lstm", high, low, reps=200).startswith(
        "rims improves on lstm on the held-out envs: its IQM interval lies above lstm's")
    assert report.conclude("rims", "lstm", low, high, reps=200).startswith("rims does worse than lstm")
    same = rng.uniform(size=(10, 3))
    text = report.conclude("rims", "lstm", same, same[::-1].copy(), reps=200)
    assert text.startswith("no difference between rims and lstm the measures can resolve")
    # The numbers given: the per-run means' difference with its Welch interval, and their smallest
    # detectable difference; nothing that reads as if differences beyond the latter were excluded.
    means, other = same.mean(axis=1), same[::-1].mean(axis=1)
    sdd = report.smallest_detectable_difference(report.sample_sd(means), 10, report.sample_sd(other), 10)
    point, low, high = report.mean_difference_interval(means, other)
    assert text.endswith(f"the difference in mean held-out return is {point:+.2f} [{low:+.2f}, {high:+.2f}] (95% "
                         "Welch t interval; it holds 0, and these runs are compatible with any difference in it), and "
                         f"a t-test on these runs detects a difference in mean held-out return of ~{sdd:.2f} with 80% "
                         "power")
    assert "ruled out" not in text
    # An interval of the difference that excludes 0 where the rule claims nothing: the sentence says both.
    excluding = report.conclusion("x", "y", (0.6, 0.4, 0.8), (0.5, 0.3, 0.7), (0.75, 0.52, 0.93), 0.12, p_value=0.063,
                             difference=(0.11, 0.01, 0.21))
    assert excluding.startswith("no difference between x and y the measures can resolve")
    assert ("is +0.11 [+0.01, +0.21] (95% Welch t interval; it excludes 0, as a t-test alone would call a difference, "
            "but the rule above needs the IQM intervals and P(improvement) as well)") in excluding
    assert "contains 0.5 (permutation test p 1.000)" in text  # its own runs reordered: P is exactly 0.5

    # Hand-made intervals: one measure alone claims nothing more than itself.
    apart, overlap = ((0.8, 0.7, 0.9), (0.3, 0.2, 0.4)), ((0.6, 0.4, 0.8), (0.5, 0.3, 0.7))
    assert report.conclusion("x", "y", *apart, (0.9, 0.7, 1.0), 0.2).startswith("x improves on y")
    text = report.conclusion("x", "y", *apart, (0.7, 0.45, 0.9), 0.2)
    assert text.startswith("only one measure separates x from y: x's IQM interval lies above y's")
    assert "; the other does not: P(x > y) 0.70 [0.45, 0.90] contains 0.5;" in text
    text = report.conclusion("x", "y", *overlap, (0.7, 0.55, 0.9), 0.2)
    assert "P(x > y) 0.70 [0.55, 0.90] lies above 0.5; the other does not: the IQM intervals overlap" in text
    assert report.conclusion("x", "y", *overlap, (0.5, 0.3, 0.7), 0.25).startswith("no difference")
    # One run on a side (no detectable difference known): intervals of no width support no claim.
    assert report.conclusion("x", "y", *apart, (1.0, 1.0, 1.0), math.nan).startswith("too few runs to compare x with y")
    assert "improves" not in report.conclusion("x", "y", *overlap, (0.5, 0.3, 0.7), 0.25)


def test_a_probability_of_improvement_needs_its_permutation_test_too() -> None:
    """Five runs against five: a P(improvement) interval off 0.5 with a permutation p of 0.095 (21 of 25
    pairs won) is not a side, so IQM intervals apart give one measure, not a claim."""
    apart = ((0.8, 0.7, 0.9), (0.3, 0.2, 0.4))
    text = report.conclusion("x", "y", *apart, (0.84, 0.52, 1.0), 0.2, p_value=0.095)
    assert text.startswith("only one measure separates x from y: x's IQM interval lies above y's")
    assert ("the other does not: P(x > y) 0.84 [0.52, 1.00] lies above 0.5, but its permutation test does not "
            "reject 0.5 (p 0.095 >= 0.05)") in text
    assert report.conclusion("x", "y", *apart, (0.96, 0.76, 1.0), 0.2, p_value=0.016).startswith("x improves on y")
    assert "does not separate" in report.verdict("x", "y", (0.84, 0.52, 1.0), 0.095)
    assert "improves on" in report.verdict("x", "y", (0.84, 0.52, 1.0), 0.03)


def test_a_p_value_prints_on_the_side_of_alpha_it_was_judged_on() -> None:
    """An exact p of 46/924 = 0.0498 (six runs against six) rejects at 5%: printed "0.050" it would read as
    not rejecting, next to the claim it supports."""
    assert report.p_text(46 / 924) == "0.0498" and report.p_text(0.05) == "0.050"
    assert report.p_text(0.0504) == "0.050" and report.p_text(0.123456) == "0.123"
    assert report.p_text(0.0499999) == "0.0499999"
    assert report.p_text(2 / 184_756) == "< 0.001" and report.p_text(0.0) == "0.000"
    text = report.conclusion("x", "y", (0.8, 0.7, 0.9), (0.3, 0.2, 0.4), (0.9, 0.7, 1.0), 0.2, p_value=46 / 924)
    assert text.startswith("x improves on y") and "(permutation test p 0.0498)" in text
    assert "p 0.050 >= 0.05" in report.verdict("x", "y", (0.8, 0.6, 0.95), 0.0504)
    # The same numbers in the report's table: one column, one rule.
    assert report.per_env_poi(np.ones((6, 1)), np.zeros((6, 1)), reps=50)[0].endswith("p 0.002")


def test_a_difference_end_just_below_zero_does_not_print_as_zero() -> None:
    """The gloss "it holds 0" for an interval [-0.004, +0.197] printed "[-0.00, +0.20]" reads as touching 0;
    an end just above 0 would print "+0.00" beside "it excludes 0"; a detectable difference of 0.004 "~0.00"."""
    base = ("x", "y", (0.5, 0.3, 0.7), (0.45, 0.3, 0.6), (0.55, 0.4, 0.7))
    holds = report.conclusion(*base, 0.004, p_value=0.3, difference=(0.1, -0.004, 0.197))
    assert "+0.100 [-0.004, +0.197] (95% Welch t interval; it holds 0" in holds and "~0.004 with 80%" in holds
    excludes = report.conclusion(*base, 0.2, p_value=0.3, difference=(0.1, 0.003, 0.197))
    assert "+0.100 [+0.003, +0.197] (95% Welch t interval; it excludes 0" in excludes and "~0.20 with 80%" in excludes
    assert "[-0.10, +0.20]" in report.conclusion(*base, 0.2, p_value=0.3, difference=(0.05, -0.1, 0.2))
    # Interval ends a verdict compares that differ past four decimals are still printed apart.
    assert report._digits_to_tell((0.612345, 0.612341)) == 5  # 0.61235 and 0.61234


def test_interval_ends_a_verdict_compares_are_printed_apart() -> None:
    """IQM intervals 0.620 above 0.615 are apart, and a P(improvement) interval ending at 0.4990 is below
    0.5: printed with two decimals each pair would read as equal."""
    text = report.conclusion("x", "y", (0.67, 0.6204, 0.72), (0.54, 0.43, 0.6152), (0.96, 0.76, 1.0), 0.1,
                             p_value=0.016)
    assert text.startswith("x improves on y") and "[0.620, 0.720] vs 0.540 [0.430, 0.615]" in text
    assert "P(improvement) 0.350 [0.210, 0.499] lies below 0.5" in report.verdict("x", "y", (0.35, 0.21, 0.499), 0.01)
    assert "[0.21, 0.49]" in report.verdict("x", "y", (0.35, 0.21, 0.49), 0.01)  # two decimals when they suffice


def test_poi_statistics_match_rliable_and_an_exact_rank_test() -> None:
    """The vectorised P(X > Y) bootstrap resamples as rliable's StratifiedIndependentBootstrap does (its
    interval lands within Monte Carlo error of rliable's own), and the permutation test of one env equals
    scipy's exact Mann-Whitney test."""
    from rliable import library, metrics
    from scipy import stats

    rng = np.random.default_rng(7)
    x, y = rng.random((6, 2)), rng.random((7, 2)) + 0.15
    point, low, high = report.poi_interval(x, y, reps=20_000)
    assert point == metrics.probability_of_improvement(x, y)
    _, theirs = report._bootstrap(library, {"pair": (x, y)}, lambda a, b: np.array(
        [metrics.probability_of_improvement(a, b)]), reps=1000, confidence_interval_size=0.95)
    assert abs(low - theirs["pair"][0, 0]) < 0.04 and abs(high - theirs["pair"][1, 0]) < 0.04
    assert report.poi_interval(x, y, reps=500, seed=3) == report.poi_interval(x, y, reps=500, seed=3)
    a, b = rng.random((5, 1)), rng.random((6, 1)) + 0.3
    assert report.poi_permutation_p(a, b) == pytest.approx(stats.mannwhitneyu(a[:, 0], b[:, 0], method="exact").pvalue)
    top = np.arange(5.0)[:, None] + 10
    assert report.poi_permutation_p(top, top - 10) == pytest.approx(2 / 252)  # the least 5 against 5 can give
    # Too many relabellings for exactness: random ones, counted with the observed one, never 0.
    many = report.poi_permutation_p(rng.random((30, 1)) + 1, rng.random((30, 1)), max_relabellings=2000)
    assert many == pytest.approx(1 / 2001)


def test_per_env_poi_tells_an_env_that_separates_from_one_every_model_fails() -> None:
    better = np.column_stack([np.linspace(0.6, 0.7, 5), np.zeros(5)])  # env 1: every run at 0
    worse = np.column_stack([np.linspace(0.1, 0.2, 5), np.zeros(5)])
    assert report.poi_interval(better, worse, reps=500)[0] == 0.75  # pooled: env 1's ties pull it to the middle
    first, second = report.per_env_poi(better, worse, reps=500)
    assert first == "1.00 [1.00, 1.00], p 0.008" and second == "0.50 [0.50, 0.50], p 1.000"


def test_a_models_interval_does_not_depend_on_the_other_models() -> None:
    rng = np.random.default_rng(1)
    scores = {"a": rng.random((5, 2)), "b": rng.random((5, 2))}
    alone = report.interval_estimates({"b": scores["b"]}, reps=500)
    assert report.interval_estimates(scores, reps=500)["b"] == alone["b"]


def test_a_finished_run_left_out_of_the_statistics_is_named(tmp_path: Path) -> None:
    """A run counts only with a final score on every env; the report says which finished runs it left out
    and why, instead of resting a model's statistics on fewer runs than its table row says finished."""
    root, directory = fake_study(tmp_path)
    final = eval_path(directory / "runs" / "rims" / "seed_3", 1024)
    data = json.loads(final.read_text())
    data["checkpoints"][0]["results"][0]["name"] = "DoorKey-8x8"  # evaluated on another env than the study's
    final.write_text(json.dumps(data))
    assert study_cli.main(["report", "tiny-pub", "--root", str(root), "--reps", "200"]) == 0
    text = (directory / "report.md").read_text()
    assert ("**Left out of every statistic below** (a run counts only with a final score on every env): rims seed 3 "
            "(no final score on DoorKey-6x6).") in text
    assert "`core.k_active=1` | 5 | config" in text  # the model table: 5 finished, but 4 in the statistics
    assert "| rims | 4 |" in text
    # Every run of both LSTM baselines without a score (NaN): no comparison, and the report says why.
    for model in ("lstm", "lstm-24"):
        for seed in SEEDS:
            path = eval_path(directory / "runs" / model / f"seed_{seed}", 1024)
            data = json.loads(path.read_text())
            data["checkpoints"][0]["results"][0]["mean_return"] = float("nan")
            path.write_text(json.dumps(data))
    assert study_cli.main(["report", "tiny-pub", "--root", str(root), "--reps", "200"]) == 0
    text = (directory / "report.md").read_text()
    assert "- No run of the LSTM baseline lstm or lstm-24 has a final score on every env: no comparison made." in text
    assert "No LSTM baseline in this study" not in text


def test_a_finished_study_runs_again_without_its_ray_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The Ray address is probed only when runs are left to do: a finished study rerun (to rebuild its report)
    with an address that nothing answers at any more finishes as before."""
    import socket

    pytest.importorskip("ray")
    monkeypatch.setenv("MODULAR_RL_CODE_VERSION", "test-version")
    root, directory = fake_study(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert study_cli.main(["run", str(directory / "study.yaml"), "--root", str(root), "--executor", "ray",
                           "--address", f"127.0.0.1:{port}", "--no-report"]) == 0, capsys.readouterr().err
    assert "15 finished, 0 to continue, 0 to start" in capsys.readouterr().out


def test_status_of_an_edited_study_file_says_it_differs_and_counts_it(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    root, directory = fake_study(tmp_path)
    edited = tmp_path / "edited.yaml"
    raw = yaml.safe_load((directory / "study.yaml").read_text())
    edited.write_text(yaml.safe_dump({**raw, "seeds": [1, 2, 3, 4, 5, 6]}))
    assert study_cli.main(["status", str(edited), "--root", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"note: {edited} differs from {directory / 'study.yaml'}") and out[-1] == "15/18 runs done"
    assert study_cli.main(["status", str(directory / "study.yaml"), "--root", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert not out[0].startswith("note:") and out[-1] == "15/15 runs done"
    # A model's config changed: `run` refuses its runs, so status does not count them done.
    models = [dict(m) for m in raw["models"]]
    models[1]["overrides"] = {**models[1]["overrides"], "core.hidden_size": 32}
    edited.write_text(yaml.safe_dump({**raw, "models": models}))
    assert study_cli.main(["status", str(edited), "--root", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "10/15 runs done" and sum("trained with another config" in line for line in out) == 5


def test_running_a_copied_study_folders_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Its runs would have gone to --root/<name>, the original folder, while status read the copy.
    import shutil

    root, directory = fake_study(tmp_path)
    copy = root / "tiny-pub-copy"
    shutil.copytree(directory, copy)
    assert study_cli.main(["run", str(copy / "study.yaml"), "--root", str(root)]) == 2
    err = one_line_error(capsys)
    assert f"is the file of study 'tiny-pub' in {copy}" in err and f"rename or move that folder to {directory}" in err
    # A folder of the study's own name elsewhere (a backup): the way to run it is --root.
    backup = tmp_path / "backup" / "tiny-pub"
    shutil.copytree(directory, backup)
    assert study_cli.main(["run", str(backup / "study.yaml"), "--root", str(root)]) == 2
    assert f"run with --root {backup.parent} to continue its runs" in one_line_error(capsys)


# -- publishing --------------------------------------------------------------------------------------


def test_publish_a_finished_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, directory = fake_study(tmp_path)
    out = tmp_path / "docs" / "results.md"
    assert study_cli.main(["publish", "tiny-pub", "--out", str(out), "--root", str(root), "--reps", "200"]) == 0
    assert "1 study published" in capsys.readouterr().out
    text = out.read_text()
    first, *_ = text.splitlines()
    assert first.startswith("<!-- generated by study.py publish") and '"studies": ["tiny-pub"]' in first
    assert "do not edit by hand" in text
    version = report.STATISTICS_VERSION
    assert f"> Published: `tiny-pub` (code version `test-version`; 15 runs; statistics v{version})" in text
    # The study's report, one heading level down, with its conclusions also in the summary.
    assert "## Study: tiny-pub" in text and "### What the intervals support" in text
    for baseline in ("lstm", "lstm-24"):  # against both LSTM baselines
        sentence = f"rims improves on {baseline} on the held-out envs: its IQM interval lies above {baseline}'s"
        assert f"- **tiny-pub**: {sentence}" in text and f"- {sentence}" in text
        assert f"| rims | {baseline} |" in text
    assert "### Smallest detectable difference" in text
    # Provenance: command, dates, machine, wall time, code version.
    assert "- Command: `python study.py run " in text
    assert "2026-12-01T10:00:00Z to 2026-12-01T11:55:00Z" in text
    assert "- Wall time: 1 h 55 min" in text and "Test CPU (AVX2), 2 CPUs" in text
    assert "`test-version` (15 runs)." in text  # $MODULAR_RL_CODE_VERSION is used whole
    # Plots and the per-run scores copied next to the page and linked relative to it.
    published = tmp_path / "docs" / "results" / "tiny-pub"
    pngs = sorted(p.name for p in published.glob("*.png"))
    assert pngs == sorted(p.name for p in (directory / "plots").glob("*.png")) and len(pngs) == 5
    assert sorted(p.name for p in published.iterdir()) == sorted([*pngs, "scores.csv"])
    assert (published / "scores.csv").read_bytes() == (directory / "scores.csv").read_bytes()
    assert "[scores.csv](results/tiny-pub/scores.csv)" in text and "](scores.csv)" not in text
    assert {Path(name).stem for name in pngs} <= report.PLOT_NAMES  # the plots publish may replace as its own
    for name in pngs:
        assert f"(results/tiny-pub/{name})" in text
    assert "](plots/" not in text

    # A hand-edited page is refused (one line, untouched) unless --force.
    out.write_text(out.read_text().replace("Results", "My results"))
    edited = out.read_text()
    assert study_cli.main(["publish", "--out", str(out), "--root", str(root)]) == 2
    assert "edited by hand" in one_line_error(capsys) and out.read_text() == edited
    # No study named: a study on the page would come off it, with its plots, only with --drop (a forgotten
    # name must not delete what only another machine's runs can make again).
    page = out.read_text()
    assert study_cli.main(["publish", "--out", str(out), "--root", str(root), "--force"]) == 2
    assert one_line_error(capsys) == (
        f"error: {out} publishes tiny-pub, not named here; name it to publish it again from the runs, add --keep "
        f"to keep it as published, or --drop to take it off the page (deleting {published}/)\n")
    assert out.read_text() == page and sorted(p.name for p in published.iterdir()) == sorted([*pngs, "scores.csv"])
    with pytest.raises(SystemExit) as usage:
        study_cli.main(["publish", "--out", str(out), "--root", str(root), "--keep", "--drop"])
    assert usage.value.code == 2 and "--drop: not allowed with argument --keep" in capsys.readouterr().err
    assert out.read_text() == page
    # With --drop: the "nothing published yet" page, and the old study's plots are gone.
    assert study_cli.main(["publish", "--out", str(out), "--root", str(root), "--force", "--drop"]) == 0
    assert "0 studies published, 1 taken off (tiny-pub)" in capsys.readouterr().out
    text = out.read_text()
    assert "No study is published yet" in text and "tiny-pub" not in text
    assert not (tmp_path / "docs" / "results" / "tiny-pub").exists()
    # A generated page is replaced without --force.
    assert study_cli.main(["publish", "--out", str(out), "--root", str(root)]) == 0


def test_publish_replaces_only_the_plots_it_copied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A folder where the study's plots go that holds someone's file is refused before anything is written
    # (the report, a PNG, the page): publish used to delete the whole folder.
    root, directory = fake_study(tmp_path)
    out = tmp_path / "docs" / "results.md"
    plots = tmp_path / "docs" / "results" / "tiny-pub"
    plots.mkdir(parents=True)
    (plots / "data.csv").write_text("precious\n")
    args = ["publish", "tiny-pub", "--out", str(out), "--root", str(root), "--reps", "200"]
    assert study_cli.main(args) == 2
    assert one_line_error(capsys) == (f"error: {plots} holds data.csv, which study.py publish did not write (it "
                                      "replaces only the report's plot PNGs and scores CSVs there); move it away or "
                                      "give another --out\n")
    assert [p.name for p in plots.iterdir()] == ["data.csv"] and (plots / "data.csv").read_text() == "precious\n"
    assert not out.exists() and not (directory / "report.md").exists()

    (plots / "data.csv").unlink()
    (plots / "finetune_curves.png").write_bytes(b"a plot an earlier publish copied")  # the report's own name
    (plots / "scores.csv").write_text("an earlier publish's scores\n")  # replaced, as publish's own
    # A PNG someone saved among the study's plots is not the report's: not copied (and so never refused later).
    (directory / "plots").mkdir(exist_ok=True)
    (directory / "plots" / "probe.png").write_bytes(b"someone's plot")
    # A report plot's name that this report does not link (left by an older report): not published either.
    (directory / "plots" / "finetune_curves.png").write_bytes(b"an adaptation report's plot")
    assert study_cli.main(args) == 0
    capsys.readouterr()
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert pngs == sorted(p.name for p in (directory / "plots").glob("*.png")
                          if p.stem in report.PLOT_NAMES and p.name != "finetune_curves.png") and len(pngs) == 5
    assert (plots / "scores.csv").read_bytes() == (directory / "scores.csv").read_bytes()
    assert "probe.png" not in pngs and "finetune_curves.png" not in pngs  # the stale copy went with the rest
    assert (directory / "plots" / "probe.png").read_bytes() == b"someone's plot"
    # Published again, or dropped from the page (--force: a hand-edited page): a file put beside the plots
    # since refuses both, and nothing changes.
    (plots / "notes.md").write_text("mine\n")
    page, before = out.read_text(), {p.name: p.read_bytes() for p in plots.iterdir()}
    for extra in ([], ["--force"]):
        assert study_cli.main([*args, *extra]) == 2
        assert f"error: {plots} holds notes.md, which study.py publish did not write" in one_line_error(capsys)
    assert study_cli.main(["publish", "--out", str(out), "--root", str(root), "--drop"]) == 2
    assert f"{plots} holds notes.md" in one_line_error(capsys)
    assert out.read_text() == page and {p.name: p.read_bytes() for p in plots.iterdir()} == before
    # Dropped once the user's file is gone: the folder goes with the PNGs publish put there.
    (plots / "notes.md").unlink()
    assert study_cli.main(["publish", "--out", str(out), "--root", str(root), "--drop"]) == 0
    assert not plots.exists() and "No study is published yet" in out.read_text()


@pytest.mark.parametrize("seeds", [SEEDS, (3, 1, 5, 2, 4)])
def test_the_scores_file_gives_back_the_reports_arrays(tmp_path: Path, seeds: tuple[int, ...]) -> None:
    # scores.csv, written beside report.md (and published beside the plots), holds what the statistics are
    # computed from: read back, it gives the same arrays to the bit and so the same intervals, without the runs;
    # with the seeds listed out of order too (the report's rows follow the study file, and a bootstrap's
    # resamples depend on the rows' order).
    root, directory = fake_study(tmp_path, seeds=seeds)
    results = report.load_results(directory, root)
    assert results.seeds("rims") == list(seeds)
    # One run without an end-of-budget evaluation: in the file at the points it has, out of the final arrays.
    missing = next(r for r in results.runs["lstm"] if r.seed == 3)
    for table in (missing.returns, missing.successes):
        table[results.study.total_frames] = np.full(len(results.envs), np.nan)
    path = tmp_path / "scores.csv"
    path.write_text(report.scores_csv(results))
    for point in results.study.points:
        for held_out_only in (False, True):
            expected = results.scores(point, held_out_only)
            got = report.read_scores_csv(path, point, held_out_only)
            assert list(got) == list(expected) and all(np.array_equal(got[m], expected[m]) for m in expected)
    final = report.read_scores_csv(path, held_out_only=True)  # the last point by default
    assert [len(final[m]) for m in final] == [4, 5, 5]
    assert report.interval_estimates(final, reps=200) == report.interval_estimates(
        results.scores(held_out_only=True), reps=200)
    header, first, *_ = path.read_text().splitlines()
    assert header == "model,seed,env,held_out,point,checkpoint_frames,mean_return,success_rate"
    assert first.startswith(f"lstm,{seeds[0]},DoorKey-6x6,1,")

    # write_report writes it; the report links it.
    report.write_report(directory, root, reps=200)
    assert "[scores.csv](scores.csv)" in (directory / "report.md").read_text()
    assert report.read_scores_csv(directory / "scores.csv").keys() == {"lstm", "lstm-24", "rims"}

    # A file that is not a scores CSV, or a point it has no scores at: one line naming it.
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"other.csv: not a study's scores.csv \(no column model, seed"):
        report.read_scores_csv(tmp_path / "other.csv")
    with pytest.raises(ValueError, match="not at 123"):
        report.read_scores_csv(path, point=123)
    (tmp_path / "bad.csv").write_text(path.read_text().replace(",1,DoorKey", ",x,DoorKey", 1))
    with pytest.raises(ValueError, match="bad.csv: not a study's scores.csv"):
        report.read_scores_csv(tmp_path / "bad.csv")

def test_publish_refuses_an_out_that_is_no_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = fake_study(tmp_path)
    checkpoint = tmp_path / "checkpoint.pt"
    weights = bytes(range(256)) * 4  # not UTF-8
    checkpoint.write_bytes(weights)
    for extra in ([], ["--force"]):  # not text: no page, so not one to replace, even with --force
        assert study_cli.main(["publish", "tiny-pub", "--out", str(checkpoint), "--root", str(root), "--reps", "200",
                               *extra]) == 2
        assert f"error: --out {checkpoint} is not a results page (not UTF-8 text)" in one_line_error(capsys)
    assert checkpoint.read_bytes() == weights and not (tmp_path / "checkpoint").exists()
    folder = tmp_path / "docs"
    folder.mkdir()
    assert study_cli.main(["publish", "--out", str(folder), "--root", str(root)]) == 2
    assert one_line_error(capsys) == (f"error: --out {folder} is a folder; give the page's file name "
                                      f"(e.g. {folder / 'results.md'})\n")
    assert study_cli.main(["publish", "--out", str(checkpoint / "results.md"), "--root", str(root)]) == 2
    assert one_line_error(capsys) == f"error: --out {checkpoint / 'results.md'}: {checkpoint} is a file, not a folder\n"
    assert study_cli.main(["publish", "tiny-pub", "--out", str(folder / "results"), "--root", str(root)]) == 2
    assert f"--out {folder / 'results'} has no extension" in one_line_error(capsys)
    assert list(folder.iterdir()) == [] and checkpoint.read_bytes() == weights


def test_a_damaged_run_config_is_read_as_absent(tmp_path: Path) -> None:
    # A run's config.yaml edited into invalid YAML must not stop the report with a traceback: the hash the
    # run recorded when it started stands, as when the file is missing.
    root, directory = fake_study(tmp_path)
    run = next(path for path in (directory / "runs").rglob("config.yaml"))
    run.write_text("core: {name: [rims\n")
    out = tmp_path / "docs" / "results.md"
    assert study_cli.main(["publish", "tiny-pub", "--out", str(out), "--root", str(root), "--reps", "200"]) == 0
    assert "rims improves on lstm" in out.read_text()


def test_publish_keep_adds_a_study_beside_those_already_published(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root, first = fake_study(tmp_path / "a", name="tiny-pub")
    out = tmp_path / "docs" / "results.md"
    assert study_cli.main(["publish", "tiny-pub", "--out", str(out), "--root", str(root), "--reps", "200"]) == 0
    published = out.read_text()
    section = published[published.index("## Study: tiny-pub"):].rstrip("\n")
    # The first study's runs are gone (another machine, another day); a second study is published with --keep.
    import shutil

    shutil.rmtree(first)
    other_root, _ = fake_study(tmp_path / "b", name="tiny-two")
    args = ["publish", "tiny-two", "--out", str(out), "--root", str(other_root), "--reps", "200"]
    assert study_cli.main([*args, "--keep"]) == 0
    assert "1 study published, 1 kept" in capsys.readouterr().out
    text = out.read_text()
    assert '"studies": ["tiny-pub", "tiny-two"]' in text.splitlines()[0]
    assert (f"> Published: `tiny-pub` (code version `test-version`; 15 runs; statistics v{report.STATISTICS_VERSION}); "
            "`tiny-two` (code version" in text)
    assert section in text  # the kept study's text, word for word
    assert "Published by earlier report code" not in text
    assert "## Study: tiny-two" in text and text.index("## Study: tiny-pub") < text.index("## Study: tiny-two")
    for name in ("tiny-pub", "tiny-two"):
        assert f"- **{name}**: rims improves on lstm" in text
        assert len(list((tmp_path / "docs" / "results" / name).glob("*.png"))) == 5
    assert "--keep" in text.splitlines()[3]  # the command that made the page, as run
    # Report code with other statistics: the kept study is named as published by the earlier code.
    monkeypatch.setattr(report, "STATISTICS_VERSION", report.STATISTICS_VERSION + 1)
    assert study_cli.main([*args, "--keep"]) == 0
    assert ("Published by earlier report code (other statistics, see the statistics version): `tiny-pub`; publish "
            "again from the runs to update.") in out.read_text()
    newer = f"`tiny-two` (code version `test-version`; 15 runs; statistics v{report.STATISTICS_VERSION})"
    assert newer in out.read_text()
    monkeypatch.undo()
    # Without --keep, a study not named comes off the page, its plots with it, only with --drop.
    assert study_cli.main(args) == 2
    assert "publishes tiny-pub, not named here" in one_line_error(capsys) and "tiny-pub" in out.read_text()
    assert study_cli.main([*args, "--drop"]) == 0
    text = out.read_text()
    assert "tiny-pub" not in text and not (tmp_path / "docs" / "results" / "tiny-pub").exists()
    # --keep needs a page written by publish: a hand-edited one is refused, untouched.
    out.write_text(text.replace("Results", "My results"))
    edited = out.read_text()
    assert study_cli.main([*args, "--keep", "--force"]) == 2
    assert "--keep keeps the studies of a page written by study.py publish" in one_line_error(capsys)
    assert out.read_text() == edited


def test_a_kept_banner_entry_with_an_uncommitted_commit_is_kept_whole() -> None:
    """A session run from an uncommitted tree names its commit "abc (with uncommitted changes)": the entry's
    parenthesis holds another, and --keep must keep the entry to its end (its statistics version included),
    not cut it at the inner ")" and call the study published by earlier report code."""
    tag = f"statistics v{report.STATISTICS_VERSION}"
    dirty = f"`s-one` (code version `code.c0dec0dec0`, git commit aaaaaaaaaa (with uncommitted changes); 15 runs; {tag})"
    clean = f"`s-two` (code version `code.c0dec0dec1`; 12 runs; {tag})"
    page = "\n".join(["# Results", "", f"> Published: {dirty}; {clean}. Every run ...", "", "## Summary", "",
                      "- **s-one**: x", "- **s-two**: y", "", "## Study: s-one", "", "text one", "",
                      "## Study: s-two", "", "text two", ""])
    assert report._published_parts(page, "s-one") == (dirty, ["- **s-one**: x"], ["## Study: s-one", "", "text one"])
    assert report._published_parts(page, "s-two")[0] == clean


def test_publish_keep_leaves_a_republished_study_in_its_place(tmp_path: Path) -> None:
    root_one, _ = fake_study(tmp_path / "a", name="tiny-pub")
    root_two, _ = fake_study(tmp_path / "b", name="tiny-two")
    out = tmp_path / "docs" / "results.md"

    def publish(name: str, root: Path, *extra: str) -> str:
        assert study_cli.main(["publish", name, "--out", str(out), "--root", str(root), "--reps", "200", *extra]) == 0
        return out.read_text()

    publish("tiny-two", root_two)
    publish("tiny-pub", root_one, "--keep")  # a new study follows the ones on the page
    text = publish("tiny-two", root_two, "--keep")  # published again (rerun runs): it stays first
    assert '"studies": ["tiny-two", "tiny-pub"]' in text.splitlines()[0]
    assert text.index("## Study: tiny-two") < text.index("## Study: tiny-pub")
    assert text.index("- **tiny-two**:") < text.index("- **tiny-pub**:")
    assert text.index("`tiny-two` (code version") < text.index("`tiny-pub` (code version")


def test_publish_refuses_unfinished_and_mixed_studies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, directory = fake_study(tmp_path)
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    out.write_text("# Results\n\nhand-written\n")
    args = ["publish", "tiny-pub", "--out", str(out), "--root", str(root), "--reps", "200", "--force"]

    missing = eval_path(directory / "runs" / "rims" / "seed_3", 1024)
    saved = missing.read_text()
    missing.unlink()
    assert study_cli.main(args) == 2
    err = one_line_error(capsys)
    assert "study tiny-pub is not finished (1 of 15 runs: rims/seed_3)" in err and "python study.py run" in err
    # The command named continues this study where it is: under this root, not a new one under studies/.
    assert f"--root {root}" in err
    missing.write_text(saved)

    provenance = directory / "runs" / "lstm" / "seed_2" / "provenance.json"
    data = json.loads(provenance.read_text())
    data["sessions"].append({**data["sessions"][0], "step": "eval", "commit": "another-version"})
    provenance.write_text(json.dumps(data))
    assert study_cli.main(args) == 2
    err = one_line_error(capsys)
    assert "study tiny-pub mixes code versions (test-version: 15 runs; another-version: 1 runs)" in err
    assert study_cli.main(["publish", "nope", "--out", str(out), "--root", str(root)]) == 2
    assert "holds no study" in one_line_error(capsys)
    assert out.read_text() == "# Results\n\nhand-written\n" and not (out.parent / "results").exists()


# -- the benchmark wrapper ---------------------------------------------------------------------------


def test_generalization_wrapper_help_and_bad_input(tmp_path: Path) -> None:
    script = str(REPO / "benchmarks" / "generalization.py")
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "doorkey-generalization.yaml" in done.stdout and "--report-only" in done.stdout
    for extra in ([], ["--report-only"]):
        done = subprocess.run([sys.executable, script, "--study", str(tmp_path / "nope.yaml"), "--root",
                               str(tmp_path / "out"), *extra], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [
            f"error: study file not found: {tmp_path / 'nope.yaml'}"], done.stderr
    done = subprocess.run([sys.executable, script, "--workers", "many"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "--workers" in done.stderr
    assert not (tmp_path / "out").exists()
