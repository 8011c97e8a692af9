"""Adaptation: the measures on hand-computed curves, and a tiny adaptation study run end to end
(pre-train, fine-tune, report) with a rerun that trains nothing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from agents.adaptation import (
    area_under_curve,
    fill_curve,
    final_return,
    frames_to_threshold,
    mean_frames_text,
    read_curve,
    zero_shot_return,
)

NAN = math.nan


# -- the measures on known curves ---------------------------------------------------------------------


def test_rollouts_without_a_finished_episode_carry_the_last_value_and_count_0_before_the_first() -> None:
    assert fill_curve([NAN, 0.5, NAN, 1.0]).tolist() == [0.0, 0.5, 0.5, 1.0]
    assert fill_curve([NAN, NAN, 0.3], initial=-1.0).tolist() == [-1.0, -1.0, 0.3]
    assert fill_curve([0.2, 0.4]).tolist() == [0.2, 0.4]


def test_area_under_the_curve_is_the_frame_weighted_mean_return_over_the_budget() -> None:
    # Equal rollouts of 100 frames: filled values 0, 0.5, 0.5, 1.0 -> mean 0.5.
    assert area_under_curve([100, 200, 300, 400], [NAN, 0.5, NAN, 1.0]) == pytest.approx(0.5)
    # Unequal widths (100, 200, 100): (0.2*100 + 0.2*200 + 0.8*100) / 400 = 0.35.
    assert area_under_curve([100, 300, 400], [0.2, NAN, 0.8]) == pytest.approx(0.35)
    assert area_under_curve([50, 100], [1.0, 1.0]) == pytest.approx(1.0)
    assert area_under_curve([50, 100], [NAN, NAN]) == 0.0
    for frames, values in (([100, 100], [0.1, 0.2]), ([0, 100], [0.1, 0.2]), ([100], [0.1, 0.2]),
                           ([100, 200], [0.1, math.inf])):
        with pytest.raises(ValueError):
            area_under_curve(frames, values)


def test_window_curve_pools_the_episodes_of_each_window() -> None:
    from agents.adaptation import window_curve

    # Rollouts of 100 frames in windows of 200: each window is the mean over all its episodes; a window
    # without a finished episode is nan; a last window cut short joins the one before it.
    frames, values = window_curve([100, 200, 300, 400, 500, 600, 700], [1.0, 0.0, NAN, NAN, 0.5, 0.5, 1.0],
                                  [1, 3, 0, 0, 2, 1, 1], 200)
    assert frames.tolist() == [200, 400, 700]
    assert values[0] == pytest.approx(0.25) and math.isnan(values[1]) and values[2] == pytest.approx(0.625)
    # A short-rollout rule (four rollouts per window) and a long-rollout one with the same episodes get
    # the same window values: the noise of one rollout's few episodes no longer crosses a threshold alone.
    short = window_curve([25, 50, 75, 100], [1.0, 0.0, 0.0, 0.0], [1, 1, 1, 1], 100)
    assert short[1].tolist() == [0.25] and frames_to_threshold(*short, 0.8) is None
    assert frames_to_threshold([25, 50, 75, 100], [1.0, 0.0, 0.0, 0.0], 0.8) == 25  # per rollout it would
    with pytest.raises(ValueError, match="one finite, non-negative count per rollout"):
        window_curve([100, 200], [0.5, 0.5], [1], 100)


def test_frames_to_threshold_is_the_first_rollout_whose_own_episodes_reach_it() -> None:
    frames = [100, 200, 300, 400]
    assert frames_to_threshold(frames, [NAN, 0.5, NAN, 1.0], 0.5) == 200
    assert frames_to_threshold(frames, [NAN, 0.5, NAN, 1.0], 0.9) == 400
    assert frames_to_threshold(frames, [NAN, 0.5, NAN, 1.0], 1.1) is None
    # A rollout without a finished episode never reaches it by carrying an older value.
    assert frames_to_threshold([100, 200, 300], [0.4, NAN, 0.7], 0.5) == 300
    assert frames_to_threshold([100, 200, 300], [0.6, NAN, NAN], 0.6) == 100


def test_zero_shot_and_final_return() -> None:
    assert zero_shot_return([0.0, 1.0, 1.0, 0.5]) == pytest.approx(0.625)
    with pytest.raises(ValueError):
        zero_shot_return([])
    # The last half of the filled curve [0, 0.5, 0.5, 1.0].
    assert final_return([100, 200, 300, 400], [NAN, 0.5, NAN, 1.0], fraction=0.5) == pytest.approx(0.75)
    assert final_return([100, 200, 300, 400], [NAN, 0.5, NAN, 1.0], fraction=0.1) == pytest.approx(1.0)


def test_a_seed_that_missed_the_threshold_on_some_tasks_shows_a_lower_bound() -> None:
    assert mean_frames_text([None, None], 1000) == "> 1,000"
    assert mean_frames_text([200, None], 1000) == ">= 600"  # the budget stands in: at least this
    assert mean_frames_text([200, 400], 1000) == "300"


def test_read_curve_from_metrics_rows(tmp_path: Path) -> None:
    rows = [{"frames": 64, "time/fps": 1.0},
            {"frames": 128, "rollout/episodes": 2.0, "rollout/ep_return_mean": 0.1, "rollout/ep_return_rollout": 0.3},
            {"frames": 192, "time/fps": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"frames": 25')
    frames, values = read_curve(tmp_path)
    assert frames.tolist() == [64, 128, 192]
    assert np.isnan(values[0]) and values[1] == 0.3 and np.isnan(values[2])
    old = [{"frames": 64, "rollout/episodes": 2.0, "rollout/ep_return_mean": 0.1}]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(old[0]) + "\n")
    with pytest.raises(ValueError, match="written before the trainer logged"):
        read_curve(tmp_path)


# -- init_from: a new run that starts from another run's weights ---------------------------------------


def test_init_from_loads_the_weights_only_and_refuses_another_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    import train
    from agents.config import load_config
    from agents.trainer import Trainer
    from policies.checkpoint import load_checkpoint

    tiny = ["core.name=lstm", "core.hidden_size=16", "env.n_envs=2", "algo.n_steps=16", "algo.num_minibatches=1",
            "algo.n_epochs=1", "log.progress_bar=false", "total_frames=32"]
    threads = torch.get_num_threads()
    try:
        assert train.main([*tiny, "--run-dir", str(tmp_path / "a")]) == 0
        source = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
        tuned = Trainer(load_config(None, [*tiny, "seed=7", f"init_from={tmp_path / 'a'}"]), tmp_path / "b")
        for key, value in tuned.policy.state_dict().items():
            assert torch.equal(value, source["policy"]["state_dict"][key]), key
        assert tuned.frames == 0 and not tuned.updater.optimizer.state_dict()["state"]  # a fresh optimiser
        # Another core size, or a file that is not there: one line, exit 2, before any training.
        # Only the differing core argument is named, not both whole dicts.
        differ = "holds a policy with core_kwargs={'hidden_size': 16}, this run builds core_kwargs={'hidden_size': 24}"
        for extra, message in ((["core.hidden_size=24"], differ), ([], "checkpoint file not found")):
            target = tmp_path / "a" if extra else tmp_path / "missing"
            code = train.main([*tiny, *extra, f"init_from={target}", "--run-dir", str(tmp_path / f"c{len(extra)}")])
            err = capsys.readouterr().err
            assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, err
            assert not (tmp_path / f"c{len(extra)}").exists(), "a refused run leaves no empty run folder behind"
        # Another core (a ThalNet, whose revision is not the LSTM's): named as another core, not as a revision
        # of the package that "wrote" it.
        thalnet = [o for o in tiny if not o.startswith("core.")] + [
            "core.name=thalnet", "core.num_modules=2", "core.module_size=8", "core.center_size_per_module=4"]
        code = train.main([*thalnet, f"init_from={tmp_path / 'a'}", "--run-dir", str(tmp_path / "e")])
        err = capsys.readouterr().err
        assert code == 2 and "holds a policy with core='lstm', this run builds core='thalnet'" in err, err
        assert "revision" not in err
        # The folders above a refused run's, when this call made them too, go with it.
        assert train.main([*tiny, "core.hidden_size=24", f"init_from={tmp_path / 'a'}", "--run-dir",
                           str(tmp_path / "new" / "nested" / "run")]) == 2
        assert not (tmp_path / "new").exists()
        kept = tmp_path / "made-by-the-user"
        kept.mkdir()
        assert train.main([*tiny, "core.hidden_size=24", f"init_from={tmp_path / 'a'}", "--run-dir", str(kept)]) == 2
        assert kept.is_dir(), "a folder that was there before is never removed"
        capsys.readouterr()
        # Another view size: the spaces as gymnasium writes them, not every element's bounds (a 229 KB line
        # for an Atari frame stack).
        code = train.main([*tiny, "env.env_kwargs={agent_view_size: 5}", f"init_from={tmp_path / 'a'}",
                           "--run-dir", str(tmp_path / "d")])
        err = capsys.readouterr().err
        assert code == 2 and "was trained with observation space Box(0, 255, (7, 7, 3), uint8)" in err, err
        assert "this run's env has Box(0, 255, (5, 5, 3), uint8)" in err and len(err) < 400, err
    finally:
        torch.set_num_threads(threads)


# -- a tiny adaptation study, end to end ----------------------------------------------------------------

TINY_META = {"env.n_envs": 2, "algo.n_steps": 16, "algo.num_minibatches": 1, "algo.n_epochs": 1,
             "algo.seq_len": 16, "meta.inner_updates": 1}


def tiny_adaptation_study() -> dict:
    """Meta-RIMs (meta_ppo) and an LSTM (multitask_ppo) pre-trained on DoorKey 5x5 + 6x6 for 128 frames (episodes
    of 12 steps), then fine-tuned on LavaGapS5 for 64 (as its id makes it: a random policy soon walks into the
    lava, so some episodes finish); one seed."""
    return {
        "name": "tiny-adapt", "kind": "adaptation", "seeds": [1], "total_frames": 128,
        "overrides": {"env.max_episode_steps": 12},
        "models": [
            {"label": "meta-rims", "config": "configs/meta/doorkey-sizes.yaml",
             "overrides": {**TINY_META, "core.module_size": 8}},
            {"label": "lstm", "config": "configs/meta/doorkey-sizes-multitask.yaml",
             "overrides": {**{k: v for k, v in TINY_META.items() if not k.startswith("meta.")},
                           "meta.rollouts_per_task": 2, "core.name": "lstm", "core.hidden_size": 16}},
        ],
        "pretrain": {"criterion": 0.5, "episodes": 2},
        "finetune": {"tasks": ["MiniGrid-LavaGapS5-v0"], "total_frames": 64, "threshold": 0.1, "window_frames": 32,
                     "ppo": {"lr": 0.001, "n_steps": 16, "num_minibatches": 1, "n_epochs": 1, "seq_len": 16},
                     "overrides": {"env.n_envs": 2},
                     "runs": [{"label": "meta-rims.ppo", "from": "meta-rims", "rule": "ppo"},
                              {"label": "meta-rims.meta", "from": "meta-rims", "rule": "meta"},
                              {"label": "lstm.scratch", "from": "lstm", "rule": "ppo", "scratch": True}]},
        "questions": [{"text": "Does Meta-RIMs adapt faster than a fresh LSTM?", "x": ["meta-rims.ppo"],
                       "y": ["lstm.scratch"]},
                      # The same pair the other way round: one two-sided test, counted once in the Holm family.
                      {"text": "Does a fresh LSTM adapt faster than Meta-RIMs?", "x": ["lstm.scratch"],
                       "y": ["meta-rims.ppo"]}],
    }


def test_tiny_adaptation_study_pretrains_finetunes_reports_and_reruns_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    import study as study_cli
    from agents.study import all_jobs, finetune_plan, job_state, load_study, plan, run_study
    from policies.checkpoint import load_checkpoint

    monkeypatch.setenv("MODULAR_RL_CODE_VERSION", "test-version")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tiny_adaptation_study(), sort_keys=False))
    root = tmp_path / "out"
    study = load_study(path)
    assert study.eval.envs == ("MiniGrid-DoorKey-5x5-v0", "MiniGrid-DoorKey-6x6-v0", "MiniGrid-LavaGapS5-v0")
    assert run_study(study, root / "tiny-adapt", workers=2, report=False) == 0
    directory = root / "tiny-adapt"
    jobs = all_jobs(study, directory)
    assert len(jobs) == 2 + 3 and all(job_state(job).done for job in jobs)

    # Pre-training runs were evaluated on their tasks and the held-out one; fine-tuning runs are ordinary runs.
    for job in plan(study, directory):
        data = json.loads((Path(job.run_dir) / "eval" / "point_000000000128.json").read_text())
        assert [r["name"] for r in data["checkpoints"][0]["results"]] == ["DoorKey-5x5", "DoorKey-6x6", "LavaGapS5"]
    tuned = {job.model.split("/")[0] + f"/{job.seed}": job for job in finetune_plan(study, directory)}
    ppo = yaml.safe_load((Path(tuned["meta-rims.ppo/1"].run_dir) / "config.yaml").read_text())
    meta = yaml.safe_load((Path(tuned["meta-rims.meta/1"].run_dir) / "config.yaml").read_text())
    scratch = yaml.safe_load((Path(tuned["lstm.scratch/1"].run_dir) / "config.yaml").read_text())
    assert ppo["algo"]["name"] == "ppo" and "meta" not in ppo and ppo["env"]["id"] == "MiniGrid-LavaGapS5-v0"
    assert ppo["algo"] == {**scratch["algo"]} and ppo["env"] == scratch["env"]  # one rule for every model
    assert ppo["init_from"] == str((directory / "runs" / "meta-rims" / "seed_1" / "checkpoint.pt").resolve())
    assert meta["algo"]["name"] == "meta_ppo" and meta["meta"]["tasks"] == ["MiniGrid-LavaGapS5-v0"]
    assert scratch["init_from"] is None and scratch["core"]["name"] == "lstm"
    # The study's pre-training step limit (12) is not inherited: the held-out task runs as zero-shot measured it.
    assert ppo["env"]["max_episode_steps"] is None and meta["env"]["max_episode_steps"] is None
    # The fine-tuning runs start from what their written configs build: the pre-trained weights, bit for bit,
    # for a run from a pre-trained model; a scratch run's own initialisation, not the pre-trained LSTM's.
    import torch

    from agents.trainer import Trainer

    threads = torch.get_num_threads()
    try:
        for label, source, same in (("meta-rims.ppo", "meta-rims", True), ("meta-rims.meta", "meta-rims", True),
                                    ("lstm.scratch", "lstm", False)):
            config = yaml.safe_load((Path(tuned[f"{label}/1"].run_dir) / "config.yaml").read_text())
            start = Trainer(config, tmp_path / "rebuilt" / label).policy.state_dict()
            trained = load_checkpoint(directory / "runs" / source / "seed_1" / "checkpoint.pt")["policy"]["state_dict"]
            assert start.keys() == trained.keys(), label
            assert all(torch.equal(start[key], trained[key]) for key in start) == same, label
    finally:
        torch.set_num_threads(threads)
    assert load_checkpoint(Path(tuned["meta-rims.ppo/1"].run_dir) / "checkpoint.pt")["frames"] == 64

    # Rerunning trains and evaluates nothing.
    before = {str(p): p.stat().st_mtime_ns for p in (directory / "runs").rglob("*") if p.is_file()}
    before.update({str(p): p.stat().st_mtime_ns for p in (directory / "finetune").rglob("*") if p.is_file()})
    assert run_study(study, directory, report=False) == 0
    after = {str(p): p.stat().st_mtime_ns for p in (directory / "runs").rglob("*") if p.is_file()}
    after.update({str(p): p.stat().st_mtime_ns for p in (directory / "finetune").rglob("*") if p.is_file()})
    assert after == before

    # The report: pre-training returns with the criterion, the measures, the question, the plots.
    assert study_cli.main(["report", "tiny-adapt", "--root", str(root), "--reps", "200"]) == 0
    text = (directory / "report.md").read_text()
    for section in ("## Pre-training: return on the training tasks", "## Fine-tuning on the held-out tasks",
                    "### Does Meta-RIMs adapt faster than a fresh LSTM?", "## Per seed", "a window in which no "
                    "episode finished carries the last window's value"):
        assert section in text, section
    assert "**below the criterion**" in text  # 128 frames learn nothing: flagged, not hidden
    assert {p.name for p in (directory / "plots").iterdir()} == {
        "finetune_curves.png", "area_interval_estimates.png", "probability_of_improvement.png"}
    from agents.report import PLOT_NAMES, STATISTICS_VERSION  # PLOT_NAMES: the plots publish may replace

    assert {p.stem for p in (directory / "plots").iterdir()} <= PLOT_NAMES
    assert "| smallest detectable difference in mean area |" in text
    assert "smallest detectable difference unknown (fewer than two runs)" in text  # one seed: no spread
    # The report names its own command, dates and machine (not only once published).
    provenance = text[text.index("## Provenance"):]
    assert "- Command: `" in provenance and "- Machine" in provenance and "`test-version`" in provenance
    assert study_cli.main(["status", "tiny-adapt", "--root", str(root)]) == 0

    # A second seed (copies of seed 1's runs) and known fine-tuning curves (rollouts of 32 frames): the
    # question states the smallest difference in mean area its seeds could detect, computed by hand.
    copy = yaml.safe_load((directory / "study.yaml").read_text())
    copy["seeds"] = [1, 2]
    (directory / "study.yaml").write_text(yaml.safe_dump(copy, sort_keys=False))
    for parent in [*(directory / "runs").iterdir(), *(directory / "finetune").glob("*/*")]:
        shutil.copytree(parent / "seed_1", parent / "seed_2")
    curves = {("meta-rims.ppo", 1): [0.2, 0.4], ("meta-rims.ppo", 2): [0.4, 0.8],  # areas 0.3 and 0.6
              ("lstm.scratch", 1): [0.0, 0.2], ("lstm.scratch", 2): [0.0, 0.0]}  # areas 0.1 and 0.0
    for (label, seed), values in curves.items():
        rows = [{"frames": 32 * (i + 1), "rollout/episodes": 1, "rollout/ep_return_rollout": v}
                for i, v in enumerate(values)]
        (directory / "finetune" / label / "LavaGapS5" / f"seed_{seed}" / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    assert study_cli.main(["report", "tiny-adapt", "--root", str(root), "--reps", "200"]) == 0
    text = (directory / "report.md").read_text()
    # Welch: a = sd([0.3, 0.6])^2 / 2 = 0.0225, b = sd([0.1, 0.0])^2 / 2 = 0.0025,
    # df = (a + b)^2 / (a^2 + b^2) = 1.2195; (t(0.975, df) + t(0.8, df)) * sqrt(a + b) = 9.6432 * 0.15811 = 1.525;
    # the difference 0.4 +- t(0.975, df) * 0.15811.
    assert "| meta-rims.ppo | lstm.scratch |" in text and "| +0.400 [-0.927, +1.727] | 1.525 |" in text
    # The area answers by the generalisation report's rule: the IQM intervals ([0.3, 0.6] against [0.0, 0.1])
    # lie apart and every pair of runs favours meta-rims.ppo, but two runs against two cannot reject P = 0.5
    # (2 of the 6 relabellings are as extreme: p 0.333), so one measure separates them and nothing is claimed.
    assert ("area under the curve: only one measure separates meta-rims.ppo from lstm.scratch: meta-rims.ppo's "
            "IQM interval lies above") in text
    assert "lies above 0.5, but its permutation test does not reject 0.5 (p 0.333 >= 0.05)" in text
    # One pair asked both ways (2 rows x 2 measures): a family of one (0.333, not 2 x 0.333), and no family sentence.
    assert text.count(", p 0.333 (Holm 0.333) |") == 4 and "Holm-adjusted p: each measure's" not in text
    assert "frames to threshold (by P(improvement) and its permutation test): " in text
    # finetune_scores.csv, linked from the report, gives back the matrices the measures are computed from.
    from agents.adaptation import _matrix, load_finetunes, read_finetune_scores_csv
    from agents.report import load_results, read_scores_csv

    assert "[finetune_scores.csv](finetune_scores.csv)" in text and "[scores.csv](scores.csv)" in text
    from agents.study import load_study_dir

    two_seeds = load_study_dir(directory)
    finetunes = load_finetunes(two_seeds, directory)[0]
    for measure in ("auc", "frames_to_threshold", "final"):
        read = read_finetune_scores_csv(directory / "finetune_scores.csv", measure)
        assert list(read) == list(finetunes)
        for label, records in finetunes.items():
            expected = _matrix(records, two_seeds.adaptation.tasks, measure, two_seeds.adaptation.total_frames)[0]
            assert len(expected) == 2 and np.array_equal(read[label], expected), (label, measure)
    assert np.allclose(read_finetune_scores_csv(directory / "finetune_scores.csv")["meta-rims.ppo"], [[0.3], [0.6]])
    pretraining = load_results(directory, root).scores()  # the pre-training runs, over three envs
    read = read_scores_csv(directory / "scores.csv")
    assert list(read) == list(pretraining) and all(read[m].shape == (2, 3) for m in read)
    assert all(np.array_equal(read[m], pretraining[m]) for m in read)
    with pytest.raises(ValueError, match="measure 'area': one of auc"):
        read_finetune_scores_csv(directory / "finetune_scores.csv", "area")
    with pytest.raises(ValueError, match="not a study's finetune_scores.csv"):
        read_finetune_scores_csv(directory / "scores.csv")

    # Published, the banner counts every run (4 pre-training, 6 fine-tuning); kept by a later publish that
    # names no study (its runs need not be on the machine), its section stays as it was.
    page = tmp_path / "results.md"
    assert study_cli.main(["publish", "tiny-adapt", "--root", str(root), "--reps", "200", "--out", str(page)]) == 0
    published = page.read_text()
    banner = f"`tiny-adapt` (code version `test-version`; 10 runs; statistics v{STATISTICS_VERSION})"
    assert f"> Published: {banner}" in published
    for name in ("scores.csv", "finetune_scores.csv"):  # beside the plots, linked from the page
        assert (tmp_path / "results" / "tiny-adapt" / name).read_bytes() == (directory / name).read_bytes()
        assert f"[{name}](results/tiny-adapt/{name})" in published
    assert study_cli.main(["publish", "--root", str(tmp_path / "elsewhere"), "--out", str(page), "--keep"]) == 0
    republished = page.read_text()
    section = published[published.index("## Adaptation study: tiny-adapt"):]
    assert section.strip() and section in republished
    assert banner in republished

    # A finished run whose metrics.jsonl is gone: one line naming it, exit 2, no traceback.
    (directory / "finetune" / "lstm.scratch" / "LavaGapS5" / "seed_2" / "metrics.jsonl").unlink()
    capsys.readouterr()
    assert study_cli.main(["report", "tiny-adapt", "--root", str(root), "--reps", "200"]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl: cannot be read" in err and "lstm.scratch" in err and "Traceback" not in err, err
    assert err.count("\n") == 1, err


def test_shipped_adaptation_study_is_valid_and_refuses_a_meta_rule_on_a_baseline(tmp_path: Path) -> None:
    import yaml

    from agents.study import StudyError, all_jobs, load_study, parse_study

    path = Path(__file__).resolve().parent.parent / "configs" / "studies" / "adaptation-doorkey.yaml"
    study = load_study(path)
    # Report seeds 1-15 (none of them tuned on: tuning used seeds >= 100)
    assert study.adaptation is not None and list(study.seeds) == list(range(1, 16))
    # 4 pre-trained models and 7 fine-tuning runs on the one held-out task, each on every seed
    assert len(all_jobs(study, tmp_path)) == (4 + 7) * 15
    raw = yaml.safe_load(path.read_text())
    assert study.adaptation.window_frames == 10_240
    too_long = {**raw, "finetune": {**raw["finetune"], "window_frames": 400_000}}
    with pytest.raises(StudyError, match="window_frames .400,000. is longer than the fine-tuning budget"):
        parse_study(too_long, path, check_envs=False)
    # A Meta-RIMs pre-trained on a curriculum: its meta rule fine-tunes on the one held-out task, drawn each cycle,
    # so the curriculum's settings go (kept, they are refused with task_schedule 'sample').
    from agents.config import load_config
    from agents.study import finetune_overrides

    curriculum = {**raw, "models": [dict(m) for m in raw["models"]]}
    curriculum["models"][0]["overrides"] = {"meta.task_schedule": "curriculum", "meta.curriculum_frames": 200_000}
    study = parse_study(curriculum, path, check_envs=False)
    run = next(r for r in study.adaptation.runs if r.rule == "meta")
    overrides = finetune_overrides(study, run, study.adaptation.tasks[0], 1, tmp_path)
    meta = load_config(study.model(run.source).config, overrides)["meta"]
    assert meta["task_schedule"] == "sample" and meta["curriculum_frames"] is None
    raw["finetune"]["runs"].append({"label": "rims.meta", "from": "rims", "rule": "meta"})
    with pytest.raises(StudyError, match="rule meta needs a meta_ppo model"):
        parse_study(raw, path, check_envs=False)
    raw["finetune"]["runs"][-1] = dict(raw["finetune"]["runs"][0])  # a label used twice
    with pytest.raises(StudyError, match="fine-tuning run label 'meta-rims.ppo' is used twice"):
        parse_study(raw, path, check_envs=False)
    raw["finetune"]["runs"][-1]["label"] = "../escape"  # a label that is not a directory name
    with pytest.raises(StudyError, match=r"finetune.runs\[7\].label must be a plain name"):
        parse_study(raw, path, check_envs=False)
    raw["finetune"]["runs"].pop()


def test_adaptation_study_files_that_would_mix_up_tasks_are_refused(tmp_path: Path) -> None:
    import yaml

    from agents.study import StudyError, parse_study

    path = Path(__file__).resolve().parent.parent / "configs" / "studies" / "adaptation-doorkey.yaml"
    raw = yaml.safe_load(path.read_text())

    def refused(edit: dict, message: str) -> None:
        with pytest.raises(StudyError, match=message):
            parse_study({**raw, "finetune": {**raw["finetune"], **edit}}, path, check_envs=False)

    # One short name keys the run folders and report columns: the second task was never trained, yet "done".
    refused({"tasks": ["MiniGrid-KeyCorridorS3R1-v0", "BabyAI-KeyCorridorS3R1-v0"]},
            "MiniGrid-KeyCorridorS3R1-v0 and BabyAI-KeyCorridorS3R1-v0 have the same short name 'KeyCorridorS3R1'")
    # A fine-tuning run on another variant of the task than the zero-shot evaluation measured.
    refused({"overrides": {"env.n_envs": 16, "env.max_episode_steps": 40}},
            "env.max_episode_steps would change the held-out task itself")
    refused({"overrides": {"env.env_kwargs": {"agent_view_size": 5}}}, "env.env_kwargs would change the held-out")
    # A model's own variant overrides are not inherited by fine-tuning, in any of their spellings.
    from agents.study import finetune_overrides

    for override in ({"env.max_episode_steps": 100}, {"env.env_kwargs.max_steps": 100}):
        variant = {**raw, "models": [{**raw["models"][0], "overrides": override}, *raw["models"][1:]]}
        study = parse_study(variant, path, check_envs=False)
        run = study.adaptation.runs[0]
        assert not any(o.startswith(next(iter(override))) for o in
                       finetune_overrides(study, run, study.adaptation.tasks[0], 1, tmp_path))
    # A list where a label goes: TypeError (unhashable) traceback before.
    refused({"runs": [{"label": "x", "from": ["meta-rims"], "rule": "ppo"}]},
            r"finetune.runs\[0\].from must be a model label .* got \['meta-rims'\]")


def test_generalisation_eval_envs_with_one_short_name_are_refused(tmp_path: Path) -> None:
    from agents.study import StudyError, parse_study

    raw = {"name": "t", "models": [{"label": "lstm", "config": "configs/minigrid/doorkey-lstm-ppo.yaml"}],
           "seeds": [1], "total_frames": 1024,
           "eval": {"envs": ["MiniGrid-Unlock-v0", "BabyAI-Unlock-v0"]}}
    with pytest.raises(StudyError, match="eval.envs: MiniGrid-Unlock-v0 and BabyAI-Unlock-v0 have the same short name"):
        parse_study(raw, tmp_path / "t.yaml", check_envs=False)


def test_a_fine_tuning_task_that_does_not_fit_the_models_is_refused_before_pretraining(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    study = tiny_adaptation_study()
    study["finetune"]["tasks"] = ["CartPole-v1"]  # pre-trained for hours, then the zero-shot evaluation failed
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(repo / "study.py"), "run", str(path), "--root", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=repo, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "fine-tuning task 'CartPole-v1' does not fit model meta-rims (pre-trained on MiniGrid-DoorKey-5x5-v0)" in done.stderr
    assert not (tmp_path / "o" / "tiny-adapt" / "runs").exists()  # nothing trained
