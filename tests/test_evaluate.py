"""Evaluation: load_policy round trip, evaluate_policy, the evaluate.py CLI (tables, JSON, video, plots,
errors), all on real tiny checkpoints (benchmarks/generalization.py is a study wrapper: tests/test_publish.py)."""

from __future__ import annotations

import builtins
import importlib.util
import json
import math
import os
import re
import stat
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
from agents.evaluation import (
    EvalTarget,
    EvaluationError,
    bootstrap_ci,
    episode_seeds,
    evaluate_policy,
    evaluation_options,
    make_policy_env,
    own_targets,
    resolve_targets,
    step_uniforms,
)
from agents.trainer import Trainer
from policies import CheckpointError, Policy, RecurrentActorCritic, load_policy
from policies.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from policies.policy import _inverse_cdf_sample

ROOT = Path(__file__).resolve().parent.parent
TINY = ["env.n_envs=2", "algo.n_steps=16", "algo.num_minibatches=1", "total_frames=32", "log.progress_bar=false"]
TINY_CORES = {
    "rims": ["core.name=rims", "core.num_modules=2", "core.module_size=8", "core.k_active=1"],
    "lstm": ["core.name=lstm", "core.hidden_size=16"],
}
DOORKEY_5, DOORKEY_6 = "MiniGrid-DoorKey-5x5-v0", "MiniGrid-DoorKey-6x6-v0"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as evaluate.main sets it


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


def test_a_run_still_training_towards_its_first_checkpoint_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was called "a run stopped before its first checkpoint: there is nothing to resume".
    from agents.run_dir import RunLock

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\n")
    with RunLock(run):  # a trainer at work there (flock: another open file of this process is refused too)
        code, _, err = _run_cli(capsys, run)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{run} is being trained now (pid {os.getpid()}) and has written no checkpoint yet" in err
    code, _, err = _run_cli(capsys, run)  # stopped: no holder any more
    assert code == 2 and "holds a run stopped before its first checkpoint: there is nothing to load or resume" in err


# -- load_policy ------------------------------------------------------------------------------


def test_load_policy_expands_home_and_points_at_numbered_checkpoints(
    rims_run: tuple[Path, Trainer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(rims_run[0].parent))  # a notebook's "~/...": no shell expands it
    assert load_policy(f"~/{rims_run[0].name}").path == rims_run[0] / "checkpoint.pt"
    folder = tmp_path / "checkpoints"  # a run's checkpoints/ folder holds only numbered checkpoints
    folder.mkdir()
    for frames in (32, 64):
        (folder / f"checkpoint_{frames:012d}.pt").write_bytes((rims_run[0] / "checkpoint.pt").read_bytes())
    newest = folder / "checkpoint_000000000064.pt"
    hint = (f"(2 numbered checkpoint(s) are there, the newest {newest}: give that file to load it, or copy it to "
            f"{tmp_path / 'checkpoint.pt'} to continue the run with --resume {tmp_path})")
    with pytest.raises(CheckpointError, match=re.escape(hint)):
        load_policy(folder)
    # A run folder whose checkpoint.pt is gone: the numbered ones in its checkpoints/ are named.
    with pytest.raises(CheckpointError, match=re.escape(f"the newest {newest}: give that file to load it")):
        load_policy(tmp_path)


def test_policy_act_names_its_arguments_wrong_shapes(rims_run: tuple[Path, Trainer]) -> None:
    # Each of these failed deep in the model with a message about something else ("the core was built with
    # input_size=64", "shape '[1, 3, -1]' is invalid", "'NoneType' object has no attribute 'shape'").
    policy = load_policy(rims_run[0])
    obs, state, starts = np.zeros((2, 7, 7, 3), np.uint8), policy.initial_state(2), np.ones(2, bool)
    size = policy.model.state_size
    for args, message in (
        ((obs, state, np.ones(1, bool)), "episode_start must have shape (n_envs,) = (2,) for 2 envs' obs, got (1,)"),
        ((obs, state, np.ones((1, 2), bool)), "episode_start must have shape (n_envs,) = (2,) for 2 envs' obs, "
                                              "got (1, 2)"),
        ((obs, state[0], starts), f"state must have shape (n_envs, state_size) = (2, {size}) for 2 envs' obs, "
                                  f"got ({size},)"),
        ((obs, None, starts), "state must be a tensor: policy.initial_state(2) for the first step"),
        ((obs[0], state, starts), "obs must have shape (n_envs, 7, 7, 3), got (7, 7, 3)"),
        # A raw RuntimeError from inside the model ("Input dtypes must be the same", "cannot reshape ... 0 elements").
        ((obs, state.double(), starts), "state must be a torch.float32 tensor on cpu (as initial_state gives it), "
                                        "got torch.float64 on cpu"),
        ((obs[:0], policy.initial_state(0), starts[:0]), "obs holds no envs"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            policy.act(*args)
    raw, _ = gym.make(DOORKEY_5).reset(seed=0)  # a raw MiniGrid observation: a dict with a mission string
    with pytest.raises(ValueError, match=re.escape("obs is a dict (keys image, direction, mission)")) as error:
        policy.act(raw, policy.initial_state(1), np.ones(1, bool))
    assert "make_policy_env" in str(error.value)
    assert policy.act(obs, state, starts)[0].shape == (2,)


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

    venv = make_policy_env(loaded, n_envs=2, seed=3)
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


def test_act_with_uniforms_samples_by_the_inverse_cdf(rims_run: tuple[Path, Trainer]) -> None:
    policy = load_policy(rims_run[0])
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 6, size=(4, *policy.observation_space.shape)).astype(np.uint8)
    state, starts = policy.initial_state(4), np.ones(4, dtype=bool)
    with torch.no_grad():
        dist, _, _ = policy.model(torch.as_tensor(obs)[None], state, torch.as_tensor(starts)[None])
    cumulative = dist.probs[0].double().cumsum(-1).numpy()
    uniforms = np.array([1e-9, 0.3, 0.7, 1 - 1e-9])
    actions, new_state = policy.act(obs, state, starts, uniforms=uniforms)
    expected = [min(int(np.searchsorted(row, u, side="right")), row.size - 1) for row, u in zip(cumulative, uniforms)]
    assert actions.shape == (4,) and actions.tolist() == expected
    assert actions[0] == 0 and actions[3] == cumulative.shape[1] - 1  # the ends of the distribution
    torch.testing.assert_close(new_state, policy.act(obs, state, starts)[1])  # the state does not depend on it


def test_box_actions_by_the_inverse_cdf_are_finite_at_the_ends(tmp_path: Path) -> None:
    # A float32 u within ~1.5e-8 of 1 rounded to 1, and erfinv(1) gave an infinite action (an evaluation
    # episode's return was -inf). Uniforms out of (0, 1) or of the wrong shape are named.
    run_dir = tmp_path / "pendulum"
    Trainer(load_config(None, [*TINY_CORES["lstm"], "env.id=Pendulum-v1", *TINY]), run_dir).run()
    policy = load_policy(run_dir)
    obs, starts = np.zeros((3, 3), np.float32), np.ones(3, bool)
    ends = np.array([[1e-9], [0.5], [1 - 1e-9]])
    with torch.no_grad():
        dist, _, _ = policy.model(torch.as_tensor(obs)[None], policy.initial_state(3), torch.as_tensor(starts)[None])
    raw = _inverse_cdf_sample(dist, torch.as_tensor(ends))[0]
    assert torch.isfinite(raw).all() and raw[0, 0] < raw[1, 0] < raw[2, 0]  # ~6 SDs either side of the mean
    # What act returns is clipped to the action space, as SB3's predict does (Pendulum's torque in [-2, 2]).
    actions, _ = policy.act(obs, policy.initial_state(3), starts, uniforms=ends)
    assert actions.shape == (3, 1) and actions[0, 0] == -2.0 and actions[2, 0] == 2.0
    assert actions[1, 0] == pytest.approx(float(raw[1, 0]))
    with pytest.raises(ValueError, match="uniforms must lie strictly between 0 and 1"):
        policy.act(obs, policy.initial_state(3), starts, uniforms=np.array([[0.5], [1.5], [0.2]]))
    with pytest.raises(ValueError, match=re.escape("uniforms must have shape (n_envs, action_dim) = (3, 1)")):
        policy.act(obs, policy.initial_state(3), starts, uniforms=np.full((3, 2), 0.5))


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


class _SeededLengthEnv(gym.Env):
    """Episodes of 1 to 4 steps (the reset seed picks), reward = the action taken: the return
    depends on the episode's seed (its length) and on its sampled actions."""

    observation_space = spaces.Box(0, 255, (7, 7, 3), np.uint8)
    action_space = spaces.Discrete(7)

    def __init__(self) -> None:
        self.length, self.t = 1, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.length = 1 + int(self.np_random.integers(4))
        self.t = 0
        return np.zeros((7, 7, 3), np.uint8), {}

    def step(self, action):
        self.t += 1
        return np.full((7, 7, 3), self.t, np.uint8), float(action), self.t >= self.length, False, {}


gym.register("EvalTestSeededLength-v0", entry_point=_SeededLengthEnv)


def test_parallel_evaluation_gives_the_episodes_of_sequential_evaluation(rims_run: tuple[Path, Trainer]) -> None:
    # Episode i is seeded by its own seeds (env reset and action samples), so running the episodes
    # one at a time in one env or side by side in several gives the same per-episode returns, in
    # episode order, and exactly the asked number of episodes (no favouring of short ones).
    policy = load_policy(rims_run[0])
    sequential = evaluate_policy(policy, "EvalTestSeededLength-v0", {}, episodes=9, seed=5, n_envs=1)
    for n_envs in (4, 9):
        parallel = evaluate_policy(policy, "EvalTestSeededLength-v0", {}, episodes=9, seed=5, n_envs=n_envs)
        assert parallel["episodes"] == len(parallel["returns"]) == 9 and parallel["n_envs"] == n_envs
        assert parallel["returns"] == sequential["returns"] and parallel["lengths"] == sequential["lengths"]
        assert parallel["mean_return"] == sequential["mean_return"]
    assert len(set(sequential["lengths"])) > 1 and len(set(sequential["returns"])) > 1  # the test can tell
    # Each length is the one its episode's env seed gives, whatever ran before it in that env.
    env_seeds, _ = episode_seeds(5, 9)
    expected = []
    for env_seed in env_seeds:
        env = _SeededLengthEnv()
        env.reset(seed=int(env_seed))
        expected.append(env.length)
    assert sequential["lengths"] == expected
    other = evaluate_policy(policy, "EvalTestSeededLength-v0", {}, episodes=9, seed=6, n_envs=3)
    assert other["returns"] != sequential["returns"]  # the seed matters


def test_parallel_equals_sequential_on_minigrid(rims_run: tuple[Path, Trainer]) -> None:
    # Empty-5x5 with 100 steps: the untrained policy reaches the goal in some episodes and not in others, so
    # returns and lengths differ between episodes (on DoorKey every episode timed out with return 0: equal
    # lists whatever ran in which env).
    policy = load_policy(rims_run[0])
    env_id = "MiniGrid-Empty-5x5-v0"
    options = evaluation_options(policy, EvalTarget(env_id), {"max_episode_steps": 100})
    one = evaluate_policy(policy, env_id, options, episodes=5, seed=11, n_envs=1, record_info=True)
    many = evaluate_policy(policy, env_id, options, episodes=5, seed=11, n_envs=5, record_info=True)
    assert len(set(one["returns"])) > 1 and len(set(one["lengths"])) > 1, "the test cannot tell episodes apart"
    assert one["returns"] == many["returns"] and one["lengths"] == many["lengths"] and many["episodes"] == 5
    np.testing.assert_array_equal(one["trace"]["active"], many["trace"]["active"])  # episode 0, both ways
    assert len(many["trace"]["state_norm"]) == many["lengths"][0] == many["first_episode"]["length"]


def test_episode_seeds_and_uniforms_are_per_episode() -> None:
    seeds, keys = episode_seeds(3, 5)
    seeds_more, keys_more = episode_seeds(3, 8)
    np.testing.assert_array_equal(seeds, seeds_more[:5])  # episode i does not depend on how many run
    np.testing.assert_array_equal(keys, keys_more[:5])
    assert len(set(seeds.tolist())) == 5 and not np.array_equal(seeds, keys)
    u = step_uniforms(np.repeat(keys[:1], 1000), np.arange(1000))
    assert u.min() > 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.05
    np.testing.assert_array_equal(u[:10], step_uniforms(np.repeat(keys[:1], 10), np.arange(10)))


def test_bootstrap_ci_on_known_arrays() -> None:
    assert bootstrap_ci([0.7] * 20) == (0.7, 0.7)
    assert bootstrap_ci([2.0]) == (2.0, 2.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    # Half successes over 100 episodes: the mean's standard error is 0.05, so about 0.5 +- 0.098.
    low, high = bootstrap_ci([0.0, 1.0] * 50)
    assert 0.38 < low < 0.42 and 0.58 < high < 0.62
    assert bootstrap_ci([0.0, 1.0] * 50) == (low, high)  # a fixed seed: a pure function
    low, high = bootstrap_ci(np.arange(10.0))
    assert 2.5 < low < 4.5 < 5.5 < high < 6.5  # around the mean 4.5
    low90, high90 = bootstrap_ci(np.arange(10.0), confidence=0.9)
    assert low < low90 < high90 < high


@pytest.mark.parametrize(("field", "value", "named"), [
    (("env", "id"), None, "env.id is a NoneType"), (("env", "options"), "oops", "env.options is a str"),
    (("config",), "oops", "config is a str")])
def test_a_checkpoint_with_hand_damaged_fields_is_named_not_a_traceback(
    rims_run: tuple[Path, Trainer], field: tuple[str, ...], value: object, named: str
) -> None:
    from policies.policy import policy_from_checkpoint

    data = load_checkpoint(rims_run[0])
    parent = data
    for key in field[:-1]:
        parent = parent[key]
    parent[field[-1]] = value
    with pytest.raises(CheckpointError, match=f"has malformed fields \\({named}\\)"):
        policy_from_checkpoint(data)


def test_evaluate_policy_and_the_cli_default_to_a_seed_no_training_run_uses() -> None:
    """Episode i's env seed is env_seeds(seed)[i], the one a training run of that seed starts env i on: a
    default of 0 (a valid training seed) replayed the first training levels of seed-0 runs."""
    import inspect

    from agents.evaluation import evaluate_policy

    from agents.evaluation import make_policy_env

    assert inspect.signature(evaluate_policy).parameters["seed"].default == evaluate.DEFAULT_SEED == 10_000
    assert inspect.signature(make_policy_env).parameters["seed"].default == evaluate.DEFAULT_SEED


def test_success_rate_interval_is_wilsons_and_never_a_point() -> None:
    """A bootstrap of 5 failures resamples only failures ("0% [0%, 0%]"); Wilson's interval for 0 of 5
    reaches 43% (values from the closed form, as statsmodels' proportion_confint(method="wilson") gives)."""
    from agents.evaluation import summarize, wilson_interval

    assert wilson_interval(0, 5) == pytest.approx((0.0, 0.434482), abs=1e-6)
    assert wilson_interval(5, 5) == pytest.approx((0.565518, 1.0), abs=1e-6)
    assert wilson_interval(50, 100) == pytest.approx((0.403832, 0.596168), abs=1e-6)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    summary = summarize([{"r": 0.0, "l": 10, "is_success": 0}] * 5)
    assert summary["success_rate"] == 0.0 and summary["success_rate_ci"] == pytest.approx([0.0, 0.434482], abs=1e-6)


def test_evaluation_options_carry_preprocessing_but_not_the_training_level() -> None:
    model = RecurrentActorCritic(spaces.Box(0, 255, (7, 7, 3), np.uint8), spaces.Discrete(7),
                                 core="lstm", core_kwargs={"hidden_size": 8})
    policy = Policy(model, DOORKEY_5, {"frame_stack": 1, "env_kwargs": {"size": 5}, "max_episode_steps": 9})
    own = evaluation_options(policy, EvalTarget(DOORKEY_5))
    assert own == {"frame_stack": 1, "env_kwargs": {"size": 5}, "max_episode_steps": 9, "clip_rewards": False}
    other = evaluation_options(policy, EvalTarget(DOORKEY_6, {"level_seeds": [3]}), {"max_episode_steps": 4})
    assert other == {"frame_stack": 1, "level_seeds": [3], "clip_rewards": False, "max_episode_steps": 4}
    # A suite's env is the suite's, whatever the checkpoint trained on: its train row too, and every row of a
    # suite whose envs share an id (atari-modes) alike, not the training env_kwargs in one and not the others.
    suite_train = evaluation_options(policy, EvalTarget(DOORKEY_5, {}, "DoorKey-5x5", "train"))
    assert suite_train == {"frame_stack": 1, "clip_rewards": False}
    held = evaluation_options(policy, EvalTarget(DOORKEY_5, {"env_kwargs": {"size": 7}}, "DoorKey-5x5 s7", "held-out"))
    assert held == {"frame_stack": 1, "env_kwargs": {"size": 7}, "clip_rewards": False}
    # Still marked as an env the checkpoint trained on (not held out), though run without its training settings.
    assert EvalTarget(DOORKEY_5, {}, "DoorKey-5x5", "train").is_training_env(policy)


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
        "--plot", out / "plots", "--json", out / "results.json", "--no-progress", "--max-video-frames", "4",
    )
    assert code == 0
    assert DOORKEY_5 in stdout and DOORKEY_6 in stdout and "mean return [95% CI]" in stdout and "success" in stdout
    # The checkpoint's own training env is marked; the other one is not.
    assert f"{DOORKEY_5} *" in stdout and f"{DOORKEY_6} *" not in stdout
    assert "* an env the checkpoint was trained on" in stdout
    report = json.loads((out / "results.json").read_text())
    (run,) = report["checkpoints"]
    assert run["core"] == "rims" and [r["env_id"] for r in run["results"]] == [DOORKEY_5, DOORKEY_6]
    assert [r["training_env"] for r in run["results"]] == [True, False]
    for result in run["results"]:
        assert result["episodes"] == 3 and len(result["returns"]) == 3 and len(result["truncated"]) == 3
        assert all(math.isfinite(result[k]) for k in ("mean_return", "std_return", "mean_length"))
        low, high = result["mean_return_ci"]
        assert low <= result["mean_return"] <= high
        assert result["success_rate"] is not None and len(result["success_rate_ci"]) == 2
        video, plot = Path(result["video"]), Path(result["plot"])
        assert video.suffix == ".gif" and video.stat().st_size > 0 and plot.stat().st_size > 0
        frames = iio.imread(video, index=None)
        assert frames.ndim == 4 and 1 <= frames.shape[0] <= 4 and frames.shape[-1] == 3
        # The video was cut at 4 frames of the episode's length + 1, and the output says so.
        first = result["first_episode"]
        assert result["video_frames"] == 4 and result["video_frames_total"] == first["length"] + 1
        assert f"{video} shows the first 4 of the episode's {first['length'] + 1} frames" in stdout
        with Image.open(plot) as image:
            assert image.format == "PNG" and image.size[0] > 100
    assert not list(out.rglob(".*tmp*"))  # atomic writes leave no temporaries


def test_deterministic_actions_ignore_the_random_stream_and_the_cli_passes_the_flag(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = load_policy(rims_run[0])
    venv = make_policy_env(policy, n_envs=4, seed=3)
    obs, state, starts = venv.reset(), policy.initial_state(4), np.ones(4, dtype=bool)
    low, high = np.full(4, 0.001), np.full(4, 0.999)  # the two ends of every env's inverse CDF
    sampled = [policy.act(obs, state, starts, uniforms=u)[0] for u in (low, high)]
    assert (sampled[0] != sampled[1]).any()  # sampling follows the stream
    chosen = [policy.act(obs, state, starts, deterministic=True, uniforms=u)[0] for u in (low, high)]
    np.testing.assert_array_equal(chosen[0], chosen[1])  # the most likely action, whatever the stream
    np.testing.assert_array_equal(chosen[0], policy.act(obs, state, starts, deterministic=True)[0])
    venv.close()
    for seed in ("1", "2"):
        code, stdout, _ = _run_cli(capsys, rims_run[0], "--deterministic", "--seed", seed, "--episodes", "2",
                                   "--max-episode-steps", "5", "--json", tmp_path / f"r{seed}.json", "--no-progress")
        assert code == 0 and "deterministic actions" in stdout
        report = json.loads((tmp_path / f"r{seed}.json").read_text())
        assert report["deterministic"] is True and report["seed"] == int(seed)
        assert len(report["checkpoints"][0]["results"][0]["returns"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is not None, reason="imageio-ffmpeg is installed here")
def test_mp4_video_without_imageio_ffmpeg_is_refused_before_evaluating(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, err = _run_cli(capsys, rims_run[0], "--video", tmp_path / "video", "--video-format", "mp4",
                                 "--episodes", "1", "--no-progress")
    assert code == 2 and err == ("error: --video-format mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg); "
                                 "use gif\n"), err
    assert stdout == "" and list(tmp_path.iterdir()) == []


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


def test_cli_suite_train_env_is_not_called_the_checkpoints_env(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Trained on DoorKey-5x5, evaluated on the memory suite: its train env is the suite's, not the checkpoint's.
    code, stdout, _ = _run_cli(capsys, rims_run[0], "--suite", "memory", "--episodes", "1", "--max-episode-steps", "2",
                               "--no-progress", "--plot", tmp_path / "plots")
    assert code == 0 and "suite train env" in stdout and " * " not in stdout
    assert "trained on" not in stdout.split("\n", 1)[1]
    assert "(train)" not in stdout


def test_a_multitask_checkpoint_counts_every_task_as_a_training_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A run trained on DoorKey-5x5 and 6x6: 6x6 is a suite's held-out env, but not held out for this checkpoint,
    # and evaluating it with no --env runs both tasks, not only the first.
    # Each task is evaluated with the options it was trained with (the env section's step limit here), though the
    # checkpoint records only the task it ended on.
    run_dir = tmp_path / "tiny-multitask"
    Trainer(load_config(None, [*TINY_CORES["lstm"], "algo.name=multitask_ppo", f"meta.tasks=[{DOORKEY_5}, {DOORKEY_6}]",
                               "env.max_episode_steps=3", *TINY]), run_dir).run()
    results = tmp_path / "own.json"
    code, stdout, _ = _run_cli(capsys, run_dir, "--episodes", "1", "--no-progress", "--json", results)
    assert code == 0 and f"trained on {DOORKEY_5}, {DOORKEY_6})" in stdout
    run = json.loads(results.read_text())["checkpoints"][0]
    assert [(r["name"], r["training_env"]) for r in run["results"]] == [("DoorKey-5x5", True), ("DoorKey-6x6", True)]
    assert [r["mean_length"] for r in run["results"]] == [3.0, 3.0]  # an untrained policy: cut at the step limit
    assert run["train_envs"] == [DOORKEY_5, DOORKEY_6] and run["train_env"] in run["train_envs"]
    policy = load_policy(run_dir)
    for target in own_targets(policy):
        assert evaluation_options(policy, target)["max_episode_steps"] == 3
    code, stdout, _ = _run_cli(capsys, run_dir, "--suite", "doorkey", "--episodes", "1", "--max-episode-steps", "2",
                               "--no-progress", "--json", results, "--overwrite")
    assert code == 0
    # The suite's rows run as the suite defines them, without the training step limit, and the output says so.
    assert ("was trained with env.max_episode_steps=3; a suite's envs are as the suite defines them, without these "
            f"(--env {DOORKEY_6} evaluates with them)") in stdout
    marked = {r["name"]: r["training_env"] for r in json.loads(results.read_text())["checkpoints"][0]["results"]}
    assert marked == {"DoorKey-5x5": True, "DoorKey-6x6": True, "DoorKey-8x8": False, "DoorKey-16x16": False}


def test_a_checkpoint_given_from_its_own_folder_is_labelled_by_the_folder(
    rims_run: tuple[Path, Trainer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "." and "checkpoint.pt" from inside the run folder gave an empty label and files named "-DoorKey-5x5.png".
    assert evaluate.checkpoint_labels([Path("runs/a"), Path("runs/b/checkpoint.pt"), Path("c/checkpoint_01.pt")]) == [
        "a", "b", "checkpoint_01"]
    monkeypatch.chdir(rims_run[0])
    # The same name twice: full paths, absolute where the path as typed does not name the run.
    other = tmp_path / "tiny-rims" / "checkpoint.pt"
    assert evaluate.checkpoint_labels([Path("."), Path("checkpoint.pt"), other]) == [
        str(rims_run[0]), str(rims_run[0] / "checkpoint.pt"), str(other)]
    assert evaluate.checkpoint_labels([Path(".")]) == ["tiny-rims"]
    assert evaluate.checkpoint_labels([Path("checkpoint.pt")]) == ["tiny-rims"]
    plots = tmp_path / "plots"
    code = evaluate.main([".", "--episodes", "1", "--max-episode-steps", "2", "--no-progress", "--plot", str(plots)])
    assert code == 0 and [p.name for p in plots.iterdir()] == ["tiny-rims-DoorKey-5x5.png"]


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
    (folder / "config.yaml").write_text((ROOT / "configs" / "minigrid" / "doorkey-rims-ppo.yaml").read_text())
    (folder / "notes.txt").write_text("a checkpoint? no: notes\n")
    (folder / "empty.pt").write_bytes(b"")
    # Checkpoints that load (the format and checksum hold) but were changed after training wrote them.
    checkpoint = load_checkpoint(rims_run[0] / "checkpoint.pt")
    checkpoint["action_space"] = {"type": "Discrete", "n": -3}
    save_checkpoint(folder / "bad-space.pt", checkpoint)
    checkpoint = load_checkpoint(rims_run[0] / "checkpoint.pt")
    next(iter(checkpoint["policy"]["state_dict"].values())).view(-1)[0] = float("nan")
    save_checkpoint(folder / "nan-weights.pt", checkpoint)
    return {"folder": folder, "run": rims_run[0]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{folder}/config.yaml"], "config.yaml is a YAML/text file (a config?"),
        (["{folder}/notes.txt"], "notes.txt is a text file, not a checkpoint"),
        (["{folder}/empty.pt"], "is empty (0 bytes)"),
        (["https://example.org/runs/checkpoint.pt"], "URLs are not supported"),
        (["{folder}/missing.pt"], "not found"),
        (["{folder}/truncated.pt"], "truncated"),
        (["{folder}/foreign.pt"], "not a checkpoint of this package"),
        (["{folder}/future.pt"], "format version 999"),
        (["{folder}/malicious.pt"], "would run code"),
        (["{folder}/bad-space.pt"], "stores an observation or action space gymnasium cannot build (n (counts)"),
        (["{folder}/nan-weights.pt"], "holds non-finite weights (nan or inf in "),
        (["{run}", "--env", "ALE/Pong-v5"], "Discrete(6)"),
        (["{run}", "--env", "MiniGrid-DorKey-5x5-v0"], "Did you mean"),
        (["{run}", "--suite", "doorkeys"], "available suites"),
    ],
    ids=["yaml", "text", "empty", "url", "missing", "truncated", "foreign", "future-version", "malicious",
         "impossible-space", "nan-weights", "space-mismatch", "unknown-env",
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



def test_list_suites_in_a_subprocess_prints_no_ale_banner() -> None:
    # Listing the suites builds an Atari env; ALE's Info-level banner used to land on stderr.
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--list-suites"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "atari-modes" in result.stdout
    assert "A.L.E" not in result.stderr + result.stdout and "Stella" not in result.stderr + result.stdout

# -- outputs are checked before any episode runs; nothing is lost or silently replaced ----------


def _cli_process(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, argv), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_existing_json_is_refused_before_any_episode_and_kept(rims_run: tuple[Path, Trainer], tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text('{"episodes": 1, "checkpoints": []}\n')
    args = (rims_run[0], "--env", DOORKEY_6, "--episodes", "1", "--max-episode-steps", "2", "--json", results)
    refused = _cli_process(*args, "--plot", tmp_path / "plots")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: --json {results} exists; pass --overwrite to replace it, or choose another name"]
    assert refused.stdout == "" and not (tmp_path / "plots").exists()  # no episode ran, nothing written
    assert results.read_text() == '{"episodes": 1, "checkpoints": []}\n'
    replaced = _cli_process(*args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(results.read_text())["checkpoints"][0]["results"][0]["env_id"] == DOORKEY_6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left


@pytest.mark.parametrize(
    ("option", "where", "message"),
    [
        ("--json", "{file}/results.json", "is under {file}, which is a file, not a folder"),
        ("--json", "{tmp}", "is a folder; give a file name"),
        ("--json", "/proc/evaluate-test/results.json", "cannot write in /proc"),
        ("--plot", "{file}", "is a file, not a folder"),
        ("--video", "{file}/videos", "is under {file}, which is a file, not a folder"),
        ("--plot", "/proc/evaluate-test", "cannot write in /proc"),
    ],
    ids=["json-under-file", "json-is-folder", "json-unwritable", "plot-is-file", "video-under-file", "plot-unwritable"],
)
def test_unusable_destinations_exit_2_before_any_episode(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, where: str,
    message: str,
) -> None:
    file = tmp_path / "a-file"
    file.write_text("keep me\n")
    target = where.format(file=file, tmp=tmp_path)
    code, stdout, stderr = _run_cli(capsys, rims_run[0], "--episodes", "1", option, target)
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"error: {option} {target}") and message.format(file=file) in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert file.read_text() == "keep me\n"


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_json_over_a_link_or_pipe_is_refused_even_with_overwrite(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    # The results are renamed over --json: that would replace the link (its target left stale) or the pipe.
    target = tmp_path / "results.json"
    target.write_text('{"earlier": "results"}\n')
    path = tmp_path / "out.json"
    if kind == "symlink":
        path.symlink_to(target)
    else:
        os.mkfifo(path)
    code, stdout, stderr = _run_cli(capsys, rims_run[0], "--episodes", "1", "--json", path, "--overwrite")
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert f"--json {path} is a link, pipe or device, not a regular file" in stderr
    assert path.is_symlink() if kind == "symlink" else stat.S_ISFIFO(path.lstat().st_mode)
    assert target.read_text() == '{"earlier": "results"}\n'


def test_existing_plot_and_video_files_are_refused_without_overwrite(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plots = tmp_path / "plots"
    plots.mkdir()
    earlier = plots / "tiny-rims-DoorKey-5x5.png"
    earlier.write_bytes(b"an earlier plot")
    args = (rims_run[0], "--episodes", "1", "--max-episode-steps", "2", "--no-progress", "--plot", plots)
    code, stdout, stderr = _run_cli(capsys, *args)
    assert code == 2 and stdout == "" and f"--plot: {earlier} exists; pass --overwrite" in stderr
    assert earlier.read_bytes() == b"an earlier plot"
    code, _, _ = _run_cli(capsys, *args, "--overwrite")
    assert code == 0
    with Image.open(earlier) as image:
        assert image.format == "PNG"


def test_outputs_that_appear_during_the_evaluation_are_kept_and_this_calls_go_beside_them(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outputs are checked before the first episode; another evaluate.py writing the same names meanwhile
    had its results replaced without a word. Now neither call's files are lost."""
    import agents.evaluation

    results, plots = tmp_path / "results.json", tmp_path / "plots"
    real = agents.evaluation.evaluate_policy

    def with_a_concurrent_writer(*args, **kwargs):  # another process finishing first, with the same names
        results.write_text('{"other": "call"}\n')
        plots.mkdir(exist_ok=True)
        (plots / "tiny-rims-DoorKey-5x5.png").write_bytes(b"the other call's plot")
        return real(*args, **kwargs)

    monkeypatch.setattr(agents.evaluation, "evaluate_policy", with_a_concurrent_writer)
    code, stdout, stderr = _run_cli(capsys, rims_run[0], "--episodes", "1", "--max-episode-steps", "2", "--no-progress",
                                    "--json", results, "--plot", plots)
    assert code == 0, stderr
    assert results.read_text() == '{"other": "call"}\n'
    assert (plots / "tiny-rims-DoorKey-5x5.png").read_bytes() == b"the other call's plot"
    assert json.loads((tmp_path / "results-1.json").read_text())["episodes"] == 1
    assert f"results written to {tmp_path / 'results-1.json'}" in stdout
    assert f"note: {results} appeared during the evaluation (another process?) and is kept" in stdout
    with Image.open(plots / "tiny-rims-DoorKey-5x5-1.png") as image:
        assert image.format == "PNG"
    assert [p for p in [*tmp_path.iterdir(), *plots.iterdir()] if p.name.startswith(".")] == []  # no temporary file


def test_an_output_that_must_not_replace_a_file_keeps_it_without_hard_links_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """atomic_output(replace=False) links its file in (atomic refusal of an existing name); on a file system
    without hard links it checks, then renames. Either way an existing file stays, and no temporary file."""
    from agents.run_dir import OutputExistsError, atomic_output

    def no_links(source: object, target: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    for linking in (True, False):
        folder = tmp_path / str(linking)
        folder.mkdir()
        if not linking:
            monkeypatch.setattr(os, "link", no_links)
        with atomic_output(folder / "new.json", replace=False) as temp:
            temp.write_text("new")
        (folder / "old.json").write_text("old")
        with pytest.raises(OutputExistsError), atomic_output(folder / "old.json", replace=False) as temp:
            temp.write_text("other")
        assert (folder / "new.json").read_text() == "new" and (folder / "old.json").read_text() == "old"
        assert sorted(p.name for p in folder.iterdir()) == ["new.json", "old.json"]
    # Any other FileExistsError (a parent folder that is a file) is not a name to number around: one message.
    (tmp_path / "afile").write_text("")
    with pytest.raises(FileExistsError) as info, atomic_output(tmp_path / "afile" / "x.json", replace=False) as temp:
        temp.write_text("x")
    assert not isinstance(info.value, OutputExistsError)


def test_json_naming_one_of_this_calls_plots_is_refused_before_the_episodes(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plots = tmp_path / "plots"
    base = (rims_run[0], "--episodes", "1", "--max-episode-steps", "2", "--no-progress", "--plot", plots)
    plot = plots / "tiny-rims-DoorKey-5x5.png"
    # The same path, a folder holding the plots, a file inside a plot's path: each would take the other's place.
    for json_path, clash in ((plot, plot), (plots, plot), (plot / "results.json", plot)):
        code, stdout, stderr = _run_cli(capsys, *base, "--json", json_path, "--overwrite")
        assert code == 2 and stdout == "", stderr
        assert f"--json {json_path} overlaps {clash}, which this call's --plot/--video writes" in stderr
    assert not plots.exists()


def test_json_never_replaces_a_checkpoint_even_with_overwrite(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `evaluate.py --overwrite --json runs/*/checkpoint.pt` makes the first checkpoint the JSON path.
    copy = tmp_path / "checkpoint.pt"
    copy.write_bytes((rims_run[0] / "checkpoint.pt").read_bytes())
    before = copy.read_bytes()
    code, stdout, stderr = _run_cli(capsys, "--overwrite", "--json", copy, rims_run[0], "--episodes", "1")
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert f"--json {copy} exists and is not a results file of evaluate.py" in stderr
    assert copy.read_bytes() == before


def test_json_replaces_only_earlier_results_with_overwrite(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A run's training log starts with "{" too: `--json runs/x/metrics.jsonl --overwrite` replaced it, and the
    # rows before a later --resume were lost. So were provenance.json and a study's evaluation points.
    log = tmp_path / "metrics.jsonl"
    log.write_text((rims_run[0] / "metrics.jsonl").read_text())
    provenance = tmp_path / "provenance.json"
    provenance.write_text(json.dumps({"sessions": [{"command": "train.py"}]}))
    for path in (log, provenance):
        before = path.read_bytes()
        code, stdout, stderr = _run_cli(capsys, "--overwrite", "--json", path, rims_run[0], "--episodes", "1",
                                        "--max-episode-steps", "2", "--no-progress")
        assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1, stderr
        assert "is not a results file of evaluate.py" in stderr and path.read_bytes() == before
    # Nor a study's evaluation point, which has evaluate.py's shape plus the settings it was made with.
    point = tmp_path / "point_000000001024.json"
    point.write_text(json.dumps({"episodes": 3, "checkpoints": [], "study_eval": {"episodes": 3}}))
    code, _, stderr = _run_cli(capsys, "--overwrite", "--json", point, rims_run[0], "--episodes", "1")
    assert code == 2 and "is not a results file of evaluate.py" in stderr
    # Its own earlier results are replaced with --overwrite.
    results = tmp_path / "results.json"
    args = ("--json", results, rims_run[0], "--episodes", "1", "--max-episode-steps", "2", "--no-progress")
    assert _run_cli(capsys, *args)[0] == 0
    first = json.loads(results.read_text())
    assert _run_cli(capsys, "--overwrite", "--seed", "7", *args)[0] == 0
    assert json.loads(results.read_text())["seed"] == 7 != first["seed"]


def test_inputs_that_name_one_file_get_numbered_plots(
    rims_run: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plots = tmp_path / "plots"
    code, _, stderr = _run_cli(capsys, rims_run[0], f"{rims_run[0]}/", "--episodes", "1", "--max-episode-steps", "2",
                               "--no-progress", "--plot", plots)
    assert code == 0, stderr
    names = sorted(p.name for p in plots.iterdir())
    assert len(names) == 2 and names[0] == names[1].replace(".png", "-2.png"), names


def test_an_empty_output_path_is_refused(rims_run: tuple[Path, Trainer], tmp_path: Path) -> None:
    # "" (an unset shell variable) would be the current directory.
    for option in ("--plot", "--video", "--json"):
        result = _cli_process(rims_run[0], option, "")
        assert result.returncode == 2 and result.stdout == ""
        assert f"argument {option}: an empty path" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--seed", "-1"], "--seed must be >= 0, got -1"),
     (["--episodes", "99999999999999999999999"], "--episodes must be between 1 and 1,000,000"),
     (["--n-envs", "100000"], "--n-envs must be between 1 and 65,536"),
     (["--torch-threads", "99999"], "--torch-threads must be between 0 and this machine's")],
    ids=["negative-seed", "huge-episodes", "huge-n-envs", "more-threads-than-cpus"],
)
def test_out_of_range_numbers_are_one_line_exit_2(rims_run: tuple[Path, Trainer], args: list[str],
                                                    message: str) -> None:
    result = _cli_process(rims_run[0], *args)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"evaluate.py: error: {message}") and line.endswith("(see --help)"), line


def test_load_policy_refuses_non_paths_urls_and_missing_gpus(rims_run: tuple[Path, Trainer], tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"takes the path of a checkpoint file .* got dict .*policy_from_checkpoint"):
        load_policy({"policy": {}})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got int"):
        load_policy(3)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="URLs are not supported"):
        load_policy("https://example.org/checkpoint.pt")
    with pytest.raises(CheckpointError, match="URLs are not supported"):
        load_policy(Path("s3://bucket/checkpoint.pt"))  # what Path() leaves of a URL
    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_text("core:\n  name: rims\n")
    with pytest.raises(CheckpointError, match="is a YAML/text file"):
        load_policy(yaml_file)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"no CUDA GPU here .* use device='cpu'"):
            load_policy(rims_run[0], "cuda")
    with pytest.raises(ValueError, match="is not a torch device"):
        load_policy(rims_run[0], "gpu0")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_evaluation_leaves_the_callers_random_streams_as_they_were(rims_run: tuple[Path, Trainer],
                                                                     device: str) -> None:
    """evaluate_policy seeds torch (which seeds every GPU's generator too) inside a fork of the CPU's and the
    policy device's states: a run evaluating during training draws the same rollouts as without it."""
    policy = load_policy(rims_run[0], device)  # building the model draws its initial weights: before
    torch.manual_seed(123)
    before = torch.get_rng_state(), (torch.cuda.get_rng_state() if device == "cuda" else None)
    evaluate_policy(policy, DOORKEY_5, episodes=2, options={"max_episode_steps": 5})
    assert torch.equal(torch.get_rng_state(), before[0])
    if device == "cuda":
        assert torch.equal(torch.cuda.get_rng_state(), before[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line_exit_2(rims_run: tuple[Path, Trainer],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    for device in ("cuda", "cuda:9"):  # the message repeats the device as given
        code, stdout, stderr = _run_cli(capsys, rims_run[0], "--device", device, "--episodes", "1")
        assert code == 2 and stdout == ""
        assert stderr.strip().splitlines() == [
            f"error: --device {device}, but no CUDA GPU is available here; use --device cpu"]


def test_the_argument_parser_imports_no_heavy_library() -> None:
    # A fresh interpreter: what evaluate.py and its parser import on their own.
    code = ("import sys, evaluate; evaluate.parse_args(['run/checkpoint.pt', '--suite', 'doorkey']); "
            "evaluate.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'gymnasium', 'ale_py', 'stable_baselines3', 'minigrid', 'matplotlib',"
            " 'numpy', 'agents.evaluation', 'envs', 'policies') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

