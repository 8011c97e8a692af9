"""Evaluation: load_policy round trip, evaluate_policy, the evaluate.py CLI (tables, JSON, video, plots,
errors) and the generalisation benchmark's quick mode, all on real tiny checkpoints."""

from __future__ import annotations

import builtins
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from gymnasium import spaces
from PIL import Image

import evaluate
from agents.config import load_config
from agents.evaluation import EvalTarget, EvaluationError, evaluate_policy, evaluation_options, resolve_targets
from agents.trainer import Trainer
from policies import CheckpointError, Policy, RecurrentActorCritic, load_policy
from policies.checkpoint import FORMAT

ROOT = Path(__file__).resolve().parent.parent
TINY = ["env.n_envs=2", "algo.n_steps=16", "algo.num_minibatches=1", "total_frames=32", "log.progress_bar=false"]
TINY_CORES = {
    "rims": ["core.name=rims", "core.num_modules=2", "core.module_size=8", "core.k_active=1"],
    "lstm": ["core.name=lstm", "core.hidden_size=16"],
}
DOORKEY_5, DOORKEY_6 = "MiniGrid-DoorKey-5x5-v0", "MiniGrid-DoorKey-6x6-v0"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Acting on two envs is fastest single-threaded (and evaluate.main sets it); restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(run_dir: Path, core: str) -> Trainer:
    trainer = Trainer(load_config(None, [*TINY_CORES[core], *TINY]), run_dir)
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def rims_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer]:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-rims"
    return run_dir, _train(run_dir, "rims")


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-lstm"
    _train(run_dir, "lstm")
    return run_dir


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- load_policy ------------------------------------------------------------------------------


def test_load_policy_round_trip_gives_the_same_actions(rims_run: tuple[Path, Trainer]) -> None:
    run_dir, trainer = rims_run
    loaded = load_policy(run_dir / "checkpoint.pt")
    in_memory = Policy(trainer.policy, trainer.config["env"]["id"], trainer.task[1], trainer.config)
    assert isinstance(loaded.model, RecurrentActorCritic)
    assert loaded.env_id == DOORKEY_5 and loaded.config == trainer.config
    assert loaded.env_options == trainer.task[1]
    assert loaded.observation_space == trainer.venv.observation_space
    assert loaded.action_space == trainer.venv.action_space
    assert load_policy(run_dir).env_id == DOORKEY_5  # the run directory works too

    venv = loaded.make_env(n_envs=2, seed=3)
    obs = venv.reset()
    states = [loaded.initial_state(2), in_memory.initial_state(2)]
    starts = np.ones(2, dtype=bool)
    for step in range(12):
        if step == 6:
            starts = np.array([True, False])  # a reset in the middle, for env 0 only
        (a_loaded, s_loaded), (a_memory, s_memory) = (
            policy.act(obs, state, starts, deterministic=True)
            for policy, state in zip((loaded, in_memory), states, strict=True)
        )
        assert isinstance(a_loaded, np.ndarray) and a_loaded.shape == (2,)
        np.testing.assert_array_equal(a_loaded, a_memory)
        torch.testing.assert_close(s_loaded, s_memory)
        assert not s_loaded.requires_grad
        states = [s_loaded, s_memory]
        obs, _, dones, _ = venv.step(a_loaded)
        starts = dones
    venv.close()


def test_act_resets_the_state_where_an_episode_starts(rims_run: tuple[Path, Trainer]) -> None:
    policy = load_policy(rims_run[0])
    obs = np.zeros((2, *policy.observation_space.shape), dtype=np.uint8)
    _, state = policy.act(obs, policy.initial_state(2), np.ones(2, bool))
    _, state_a = policy.act(obs, state, np.array([True, False]))
    _, state_b = policy.act(obs, policy.initial_state(2), np.ones(2, bool))
    torch.testing.assert_close(state_a[0], state_b[0])  # env 0 started over
    assert not torch.equal(state_a[1], state_b[1])  # env 1 carried its state


# -- evaluate_policy --------------------------------------------------------------------------


def test_evaluate_policy_counts_exactly_the_asked_episodes(rims_run: tuple[Path, Trainer]) -> None:
    policy = load_policy(rims_run[0])
    options = evaluation_options(policy, EvalTarget(DOORKEY_6), {"max_episode_steps": 6})
    first = evaluate_policy(policy, DOORKEY_6, options, episodes=5, seed=1, n_envs=2, record_info=True)
    assert first["episodes"] == len(first["returns"]) == len(first["lengths"]) == 5
    assert all(math.isfinite(first[key]) for key in ("mean_return", "std_return", "mean_length"))
    assert first["successes"] is not None and 0.0 <= first["success_rate"] <= 1.0
    assert first["trace"]["active"].shape[1:] == (2,) and len(first["trace"]["state_norm"]) == first["lengths"][0]
    again = evaluate_policy(policy, DOORKEY_6, options, episodes=5, seed=1, n_envs=2)
    assert again["returns"] == first["returns"] and again["lengths"] == first["lengths"]


class _FixedLengthEnv(gym.Env):
    """Episodes of 1 step (even seeds) or 20 steps (odd seeds), reward 1 per step: return = length."""

    observation_space = spaces.Box(0, 255, (7, 7, 3), np.uint8)
    action_space = spaces.Discrete(7)

    def __init__(self) -> None:
        self.length, self.t = 1, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:  # the vec env seeds sub-env i with seed + i on its first reset only
            self.length = 1 if seed % 2 == 0 else 20
        self.t = 0
        return np.zeros((7, 7, 3), np.uint8), {}

    def step(self, action):
        self.t += 1
        return np.zeros((7, 7, 3), np.uint8), 1.0, self.t >= self.length, False, {}


gym.register("EvalTestFixedLength-v0", entry_point=_FixedLengthEnv)


def test_evaluate_policy_does_not_favour_short_episodes(rims_run: tuple[Path, Trainer]) -> None:
    # Sub-env 0 finishes an episode every step, sub-env 1 every 20 steps. Counting the first 4
    # episodes to finish would give 4 one-step episodes; a quota of 2 per sub-env gives 2 of each.
    result = evaluate_policy(load_policy(rims_run[0]), "EvalTestFixedLength-v0", {}, episodes=4, seed=0, n_envs=2)
    assert sorted(result["returns"]) == [1.0, 1.0, 20.0, 20.0]
    assert result["mean_length"] == 10.5 and result["success_rate"] is None


def test_evaluation_options_carry_preprocessing_but_not_the_training_level() -> None:
    model = RecurrentActorCritic(spaces.Box(0, 255, (7, 7, 3), np.uint8), spaces.Discrete(7),
                                 core="lstm", core_kwargs={"hidden_size": 8})
    policy = Policy(model, DOORKEY_5, {"frame_stack": 1, "env_kwargs": {"size": 5}, "max_episode_steps": 9})
    own = evaluation_options(policy, EvalTarget(DOORKEY_5))
    assert own == {"frame_stack": 1, "env_kwargs": {"size": 5}, "max_episode_steps": 9, "clip_rewards": False}
    other = evaluation_options(policy, EvalTarget(DOORKEY_6, {"level_seeds": [3]}), {"max_episode_steps": 4})
    assert other == {"frame_stack": 1, "level_seeds": [3], "clip_rewards": False, "max_episode_steps": 4}


def test_resolve_targets_marks_train_and_heldout() -> None:
    targets = resolve_targets("doorkey")
    assert targets is not None
    assert [(t.env_id, t.split) for t in targets] == [
        (DOORKEY_5, "train"), (DOORKEY_6, "held-out"), ("MiniGrid-DoorKey-8x8-v0", "held-out"),
        ("MiniGrid-DoorKey-16x16-v0", "held-out"),
    ]
    assert resolve_targets(None, None) is None
    with pytest.raises(EvaluationError, match="Did you mean"):
        resolve_targets(None, ["MiniGrid-DorKey-5x5-v0"])


# -- plots ------------------------------------------------------------------------------------


def test_plot_panels_per_core_kind(tmp_path: Path) -> None:
    from agents.plots import plot_episode_info, save_figure

    rng = np.random.default_rng(0)
    T = 7
    brims = {"state_norm": rng.random(T)}
    for layer, slots in ((0, 3), (1, 2)):  # BRIMs: the top layer has no top-down slot
        brims[f"active_{layer}"] = rng.random((T, 3)) > 0.5
        brims[f"input_attention_{layer}"] = rng.dirichlet(np.ones(slots), size=(T, 3))
    thalnet = {"read_weights": rng.dirichlet(np.ones(6), size=(T, 3)), "state_norm": rng.random(T)}
    lstm = {"state_norm": rng.random(T)}
    # BRIMs: per layer active + input slot (+ top-down for layer 0); ThalNet: one panel per module; all: norm.
    for trace, panels in ((brims, 3 + 2 + 1), (thalnet, 3 + 1), (lstm, 1)):
        fig = plot_episode_info(trace, "title")
        assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == panels
        path = save_figure(fig, tmp_path / f"{len(trace)}-{panels}.png")
        with Image.open(path) as image:
            assert image.format == "PNG"


# -- the CLI ----------------------------------------------------------------------------------


def test_cli_two_envs_writes_table_json_video_and_plot(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, _ = _run_cli(
        capsys, rims_run[0] / "checkpoint.pt", "--env", DOORKEY_5, "--env", DOORKEY_6, "--episodes", "3",
        "--n-envs", "2", "--max-episode-steps", "12", "--seed", "1", "--video", out / "video",
        "--plot", out / "plots", "--json", out / "results.json", "--no-progress",
    )
    assert code == 0
    assert DOORKEY_5 in stdout and DOORKEY_6 in stdout and "mean return" in stdout and "success" in stdout
    report = json.loads((out / "results.json").read_text())
    (run,) = report["checkpoints"]
    assert run["core"] == "rims" and [r["env_id"] for r in run["results"]] == [DOORKEY_5, DOORKEY_6]
    for result in run["results"]:
        assert result["episodes"] == 3 and len(result["returns"]) == 3
        assert all(math.isfinite(result[k]) for k in ("mean_return", "std_return", "mean_length"))
        assert result["success_rate"] is not None
        video, plot = Path(result["video"]), Path(result["plot"])
        assert video.suffix == ".gif" and video.stat().st_size > 0 and plot.stat().st_size > 0
        frames = iio.imread(video, index=None)
        assert frames.ndim == 4 and frames.shape[0] >= 1 and frames.shape[-1] == 3
        with Image.open(plot) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_cli_suite_evaluates_train_and_heldout_envs(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, _ = _run_cli(capsys, rims_run[0], "--suite", "doorkey", "--episodes", "1",
                               "--max-episode-steps", "3", "--json", tmp_path / "r.json", "--no-progress")
    assert code == 0 and "held-out" in stdout and "MiniGrid-DoorKey-16x16-v0" in stdout
    results = json.loads((tmp_path / "r.json").read_text())["checkpoints"][0]["results"]
    assert [r["split"] for r in results] == ["train", "held-out", "held-out", "held-out"]


def test_cli_without_env_uses_the_training_env(
    rims_run: tuple[Path, Trainer], capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, _ = _run_cli(capsys, rims_run[0], "--episodes", "1", "--max-episode-steps", "3", "--no-progress")
    assert code == 0 and DOORKEY_5 in stdout and DOORKEY_6 not in stdout


def test_cli_several_checkpoints_give_one_table(
    rims_run: tuple[Path, Trainer], lstm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, _ = _run_cli(capsys, rims_run[0] / "checkpoint.pt", lstm_run / "checkpoint.pt", "--env", DOORKEY_5,
                               "--env", DOORKEY_6, "--episodes", "2", "--max-episode-steps", "5",
                               "--plot", tmp_path / "plots", "--no-progress")
    assert code == 0
    header = [line for line in stdout.splitlines() if line.startswith("checkpoint")]
    assert len(header) == 1 and "DoorKey-5x5" in header[0] and "DoorKey-6x6" in header[0]
    rows = {line.split()[0]: line for line in stdout.splitlines() if line.startswith("tiny-")}
    assert set(rows) == {"tiny-rims", "tiny-lstm"} and " lstm " in rows["tiny-lstm"]
    # LSTM reports no module diagnostics: its plot shows the hidden-state norm, and says so.
    assert "no module diagnostics" in stdout
    assert (tmp_path / "plots" / "tiny-lstm-DoorKey-6x6.png").stat().st_size > 0


def test_cli_lists_suites(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = _run_cli(capsys, "--list-suites")
    assert code == 0
    assert "doorkey" in stdout and "held-out" in stdout and "MiniGrid-DoorKey-16x16-v0" in stdout
    assert "memory" in stdout and "MiniGrid-MemoryS13-v0" in stdout


# -- bad input: one message, exit status 2, no traceback ---------------------------------------


def _malicious_checkpoint(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):  # unpickling would call open(marker, "w"), creating the marker file
            return (builtins.open, (str(marker), "w"))

    torch.save({"format": FORMAT, "format_version": 1, "policy": Payload()}, path)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, rims_run: tuple[Path, Trainer]) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    data = (rims_run[0] / "checkpoint.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, folder / "foreign.pt")
    torch.save({"format": FORMAT, "format_version": 999}, folder / "future.pt")
    _malicious_checkpoint(folder / "malicious.pt", folder / "MARKER")
    return {"folder": folder, "run": rims_run[0]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{folder}/missing.pt"], "not found"),
        (["{folder}/truncated.pt"], "truncated"),
        (["{folder}/foreign.pt"], "not a checkpoint of this package"),
        (["{folder}/future.pt"], "format version 999"),
        (["{folder}/malicious.pt"], "would run code"),
        (["{run}", "--env", "ALE/Pong-v5"], "Discrete(6)"),
        (["{run}", "--env", "MiniGrid-DorKey-5x5-v0"], "Did you mean"),
        (["{run}", "--suite", "doorkeys"], "available suites"),
    ],
    ids=["missing", "truncated", "foreign", "future-version", "malicious", "space-mismatch", "unknown-env",
         "unknown-suite"],
)
def test_cli_bad_input_exits_2_with_one_message(
    bad_files: dict[str, Path], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, stderr = _run_cli(capsys, *(a.format(**bad_files) for a in args), "--no-progress")
    assert code == 2
    assert message in stderr and stderr.startswith("error: ") and "Traceback" not in stderr
    assert not (bad_files["folder"] / "MARKER").exists()


def test_space_mismatch_names_both_spaces(bad_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, _, stderr = _run_cli(capsys, bad_files["run"], "--env", "ALE/Pong-v5")
    assert "(4, 84, 84)" in stderr and "(7, 7, 3)" in stderr and "Discrete(7)" in stderr


def test_debug_shows_the_exception(bad_files: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError):
        evaluate.main([str(bad_files["folder"] / "foreign.pt"), "--debug"])


def test_malicious_checkpoint_in_a_subprocess_runs_no_code(bad_files: dict[str, Path]) -> None:
    marker = bad_files["folder"] / "MARKER"
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(bad_files["folder"] / "malicious.pt")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "would run code" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_policy(bad_files["folder"] / "malicious.pt")
    assert not marker.exists()


def test_missing_checkpoint_in_a_subprocess_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(tmp_path / "nope.pt")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: checkpoint file not found: {tmp_path / 'nope.pt'}"]


# -- the generalisation benchmark --------------------------------------------------------------


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("generalization", ROOT / "benchmarks" / "generalization.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generalization_quick_writes_only_its_section(tmp_path: Path) -> None:
    bench = _benchmark_module()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text(
        "# Results\n\n## Speed\n\nkeep me\n\n## Generalisation: DoorKey\n\nold numbers\n\n## Meta-RIMs\n\nkeep me too\n"
    )
    assert bench.main(["--quick", "--frames", "64", "--episodes", "2", "--max-episode-steps", "4",
                       "--out", str(tmp_path / "runs"), "--docs", str(docs)]) == 0
    text = (docs / "results.md").read_text()
    assert "keep me\n" in text and "keep me too" in text and "old numbers" not in text
    assert text.count("## Generalisation: DoorKey") == 1
    assert text.index("## Speed") < text.index("## Generalisation") < text.index("## Meta-RIMs")
    assert "| LSTM (ours, 1 seed) |" in text and "| RIMs (ours, 1 seed) |" in text and "Smoke run" in text
    with Image.open(docs / "generalization.png") as image:
        assert image.format == "PNG"
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert {run["core"] for run in results["runs"]} == {"lstm", "rims"}
