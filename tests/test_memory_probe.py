"""benchmarks/memory_probe.py: the linear probe on known features, the cue's identity and visibility
read from real MiniGrid Memory envs, and the command on a real tiny MemoryS7 checkpoint."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import gymnasium as gym
import minigrid  # noqa: F401  (registers the MiniGrid ids)
import numpy as np
import pytest
import torch

from agents.config import load_config
from envs import make_vec_env
from agents.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("memory_probe", REPO / "benchmarks" / "memory_probe.py")
memory_probe = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = memory_probe  # dataclasses look their module up there
_spec.loader.exec_module(memory_probe)

TINY = ["env.n_envs=2", "algo.n_steps=16", "algo.num_minibatches=1", "total_frames=32", "log.progress_bar=false",
        "core.name=lstm", "core.hidden_size=16"]


def test_probe_reads_a_linear_code_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    noise = rng.normal(size=(400, 20))
    coded = noise.copy()
    coded[:, 7] += 3.0 * (2 * labels - 1)  # one direction carries the label
    assert memory_probe.probe_accuracy(coded, labels) > 0.95
    assert 0.4 < memory_probe.probe_accuracy(noise, labels) < 0.6, "no code: chance"
    # A code spread thinly over all dimensions is still read (the ridge does not wipe it out).
    spread = noise + 0.5 * (2 * labels - 1)[:, None]
    assert memory_probe.probe_accuracy(spread, labels) > 0.9
    with pytest.raises(ValueError, match="at least 4"):
        memory_probe.probe_accuracy(coded[:3], labels[:3])


def test_probe_scores_a_majority_guess_as_chance() -> None:
    # 80% of the labels are ones and the features are noise: a read-out that answers "one" is right 80%
    # of the time, but it has learned nothing about the label, and balanced accuracy says so.
    rng = np.random.default_rng(1)
    labels = (rng.random(400) < 0.8).astype(int)
    assert 0.4 < memory_probe.probe_accuracy(rng.normal(size=(400, 20)), labels) < 0.6
    one_sided = np.array([0, 1, 0, 1, 1, 1, 1, 1])  # the second half has no zeros: nothing to score
    assert memory_probe.probe_accuracy(rng.normal(size=(8, 3)), one_sided) is None


def _memory_env_with_agent_at(x: int) -> gym.Env:
    for seed in range(200):
        env = gym.make("MiniGrid-MemoryS7-v0")
        env.reset(seed=seed)
        if env.unwrapped.agent_pos[0] == x:
            return env
        env.close()
    raise AssertionError(f"no MemoryS7 level in 200 seeds starts the agent at x={x}")


def test_cue_identity_and_visibility_follow_the_grid() -> None:
    env = _memory_env_with_agent_at(3)
    base = env.unwrapped
    cue = base.grid.get(1, base.height // 2 - 1)
    assert memory_probe._cue_is_key(env) == (cue.type == "key")
    # The cue lies one row above the agent's and two columns behind it. Turning left round the compass:
    # east (behind), north (ahead-left, in view), west (ahead-right, in view), south (behind again).
    in_view = [memory_probe._cue_in_view(env)]
    for _ in range(3):
        env.step(base.actions.left)
        in_view.append(memory_probe._cue_in_view(env))
    assert in_view == [False, True, True, False]
    # The other cue type, on another level: identity is read per episode, not fixed.
    kinds = set()
    for seed in range(20):
        env.reset(seed=seed)
        kinds.add(memory_probe._cue_is_key(env))
    assert kinds == {True, False}
    env.close()
    assert memory_probe._cue_in_view(_memory_env_with_agent_at(1)), "from x=1 the cue is in view at once"


def test_a_cue_behind_a_wall_is_not_seen() -> None:
    # MemoryS11: from (7, 7), facing west, the cue's cell lies inside the agent's 7x7 view square, but the
    # hallway's walls hide it: the observation shows it as unseen, and so must the probe.
    env = gym.make("MiniGrid-MemoryS11-v0")
    env.reset(seed=0)
    base = env.unwrapped
    base.agent_pos, base.agent_dir = np.array((7, 7)), 2
    assert base.in_view(1, base.height // 2 - 1), "inside the view square"
    assert not memory_probe._cue_in_view(env)
    base.agent_pos = np.array((4, 5))  # in the hallway's mouth, facing the start room
    assert memory_probe._cue_in_view(env)
    env.close()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as main sets it


class ScriptedPolicy:
    """Takes one fixed action and keeps a perfect memory: its state is +1 / -1 once the cue (key / ball)
    has been in view this episode, 0 before, plus a column of noise. It reads the live envs, so what the
    probe records can be checked against what happened."""

    def __init__(self, envs: list, action: int) -> None:
        self.envs, self.action = envs, action
        self.start_x: list[list[int]] = [[] for _ in envs]  # per env, each episode's starting column

    def initial_state(self, n_envs: int) -> torch.Tensor:
        return torch.zeros(n_envs, 2)

    def act(self, obs, state: torch.Tensor, episode_start: np.ndarray):
        state = state.clone()
        state[torch.as_tensor(episode_start)] = 0.0
        for i, env in enumerate(self.envs):
            if episode_start[i]:
                self.start_x[i].append(int(env.unwrapped.agent_pos[0]))
            if memory_probe._cue_in_view(env):
                state[i, 0] = 1.0 if memory_probe._cue_is_key(env) else -1.0
        state[:, 1] = torch.randn(len(self.envs))
        return np.full(len(self.envs), self.action), state


def _scripted_run(action: int, episodes: int) -> tuple:
    venv = make_vec_env("MiniGrid-MemoryS7-v0", n_envs=4, seed=5, max_episode_steps=12)
    policy = ScriptedPolicy(venv.envs, action)
    try:
        return memory_probe.probe_policy(policy, venv, episodes), policy
    finally:
        venv.close()


def test_an_agent_that_turns_round_sees_every_cue_and_its_memory_reads_perfectly() -> None:
    # Turning left in place faces north within one step, and from every start the cue is then in view.
    # A probe reading the state of another episode (the cue label read before the env's reset, the state
    # taken after it) would score near 0.5 against this perfect memory.
    result, _ = _scripted_run(action=0, episodes=18)
    assert result.episodes == 18
    assert result.cue_seen == 1.0 and result.success_rate == 0.0  # time limit: no object reached
    assert result.probe_after_sighting == 1.0 and result.probe_at_choice == 1.0


def test_an_agent_that_never_turns_sees_the_cue_only_from_the_first_column() -> None:
    # Walking east, the cue (behind, at x=1) is in view only in episodes that start at x=1. The probe
    # counts each env's first episodes (3, 3, 2, 2 here): the expected share follows from the starts.
    result, policy = _scripted_run(action=2, episodes=10)
    quota = [3, 3, 2, 2]
    starting_in_view = sum(x == 1 for starts, n in zip(policy.start_x, quota) for x in starts[:n])
    assert 0 < starting_in_view < 10, "seed 5 should give a mix of starts"
    assert result.episodes == 10
    assert result.cue_seen == pytest.approx(starting_in_view / 10), "a sighting must not carry into the next episode"


class ForgetfulPolicy(ScriptedPolicy):
    """ScriptedPolicy whose memory lasts ``hold`` steps: the state keeps the cue at the sighting and for
    ``hold - 1`` more steps, then only noise, so the probe must fall from 1.0 to chance at lag ``hold``."""

    def __init__(self, envs: list, action: int, hold: int) -> None:
        super().__init__(envs, action)
        self.hold = hold
        self.since = [None] * len(envs)  # steps since the last sighting (None: none this episode)

    def act(self, obs, state: torch.Tensor, episode_start: np.ndarray):
        state = state.clone()
        for i, env in enumerate(self.envs):
            if episode_start[i]:
                self.since[i] = None
            if memory_probe._cue_in_view(env):
                self.since[i] = 0
                state[i, 0] = 1.0 if memory_probe._cue_is_key(env) else -1.0
            elif self.since[i] is not None:
                self.since[i] += 1
            if self.since[i] is None or self.since[i] >= self.hold:
                state[i, 0] = 0.0
        state[:, 1] = torch.randn(len(self.envs))
        return np.full(len(self.envs), self.action), state


def test_probe_by_lag_finds_when_a_memory_fades() -> None:
    # Walking east for the 12-step limit: the episodes that start at x=1 see the cue at their first step
    # only, so their states 0-11 steps after it are all recorded; a memory of 4 steps reads 1.0 at lags
    # 0-3 and chance after, and lags past the episode's end have no episodes and no probe.
    torch.manual_seed(0)
    venv = make_vec_env("MiniGrid-MemoryS7-v0", n_envs=4, seed=5, max_episode_steps=12)
    try:
        result = memory_probe.probe_policy(ForgetfulPolicy(venv.envs, action=2, hold=4), venv, episodes=160)
    finally:
        venv.close()
    lags = result.probe_by_lag
    assert len(lags) == memory_probe.MAX_LAG + 1
    assert lags[0] == result.probe_after_sighting == 1.0
    assert lags[:4] == [1.0] * 4, lags
    faded = lags[4:12]
    assert None not in faded and max(faded) < 0.85 and 0.3 < float(np.mean(faded)) < 0.7, lags
    assert lags[12:] == [None] * (memory_probe.MAX_LAG - 11), "no episode lasts 12 steps past its sighting"
    sighted = result.lag_episodes[0]
    assert sighted >= 16 and result.lag_episodes[:12] == [sighted] * 12 and result.lag_episodes[12:] == [0] * 4
    assert result.probe_at_choice is not None and result.probe_at_choice < 0.85  # the choice is at lag 11


@pytest.fixture(scope="module")
def memory_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("memory") / "run"
    Trainer(load_config(None, [*TINY, "env.id=MiniGrid-MemoryS7-v0"]), run_dir).run()
    return run_dir / "checkpoint.pt"


def test_probe_checkpoint_on_a_held_out_hallway(memory_checkpoint: Path) -> None:
    result = memory_probe.probe_checkpoint(str(memory_checkpoint), episodes=8, n_envs=4, seed=3,
                                           env_id="MiniGrid-MemoryS11-v0")
    assert result.episodes == 8 and result.checkpoint == f"{memory_checkpoint} on MiniGrid-MemoryS11-v0"
    with pytest.raises(ValueError, match="not a MiniGrid-Memory env"):
        memory_probe.probe_checkpoint(str(memory_checkpoint), episodes=8, env_id="MiniGrid-DoorKey-5x5-v0")


def test_probe_checkpoint_is_fixed_by_its_seed(memory_checkpoint: Path) -> None:
    result = memory_probe.probe_checkpoint(str(memory_checkpoint), episodes=12, n_envs=4, seed=3)
    assert result.episodes == 12
    assert result.checkpoint == str(memory_checkpoint)
    again = memory_probe.probe_checkpoint(str(memory_checkpoint), episodes=12, n_envs=4, seed=3)
    assert again == result, "the seed fixes the envs and the sampled actions"


def test_cli_writes_table_and_json_and_refuses_bad_input(
    memory_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new" / "probe.json"  # a missing folder is made, as evaluate.py's --json does
    plot = tmp_path / "plots" / "lag.png"
    assert memory_probe.main([str(memory_checkpoint), "--episodes", "16", "--n-envs", "4", "--json", str(out),
                              "--plot", str(plot)]) == 0
    assert "| probe at choice |" in capsys.readouterr().out
    [row] = json.loads(out.read_text())
    assert row["episodes"] == 16 and row["checkpoint"] == str(memory_checkpoint)
    assert len(row["probe_by_lag"]) == memory_probe.MAX_LAG + 1
    assert plot.read_bytes().startswith(b"\x89PNG")
    before_plot = plot.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        memory_probe.main([str(memory_checkpoint), "--plot", str(plot)])
    assert exit_info.value.code == 2 and "--plot" in capsys.readouterr().err
    assert plot.read_bytes() == before_plot, "an existing plot is never replaced"

    before = out.read_text()
    with pytest.raises(SystemExit) as exit_info:
        memory_probe.main([str(memory_checkpoint), "--json", str(out)])
    assert exit_info.value.code == 2 and "exists" in capsys.readouterr().err
    assert out.read_text() == before, "an existing file is never replaced"

    assert memory_probe.main([str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    # A bad checkpoint after a good one is found before the good one is probed (no "probed" line).
    assert memory_probe.main([str(memory_checkpoint), str(tmp_path / "missing.pt")]) == 2
    assert "probed" not in capsys.readouterr().err
    for bad, message in ((["--seed", "-1"], "--seed must be"), (["--json", str(out / "x.json")], "which is a file"),
                         (["--json", str(tmp_path)], "is a folder"),
                         (["--plot", str(tmp_path / "lag.svg")], "ending in .png"),
                         (["--env", "MiniGrid-DoorKey-5x5-v0"], "not a MiniGrid-Memory env"),
                         (["--env", "MiniGrid-MemoryS8-v0"], "MiniGrid-MemoryS8-v0"),
                         (["--json", str(tmp_path / "same.png"), "--plot", str(tmp_path / "same.png")], "same file")):
        with pytest.raises(SystemExit) as exit_info:
            memory_probe.main([str(memory_checkpoint), *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

    doorkey_dir = tmp_path / "doorkey"
    Trainer(load_config(None, TINY), doorkey_dir).run()
    assert memory_probe.main([str(doorkey_dir / "checkpoint.pt")]) == 2
    assert "not a MiniGrid-Memory env" in capsys.readouterr().err
    # A multi-task run: its checkpoint's env is only the task it ended on, so the probe asks which to measure.
    tasks_dir = tmp_path / "tasks"
    Trainer(load_config(None, [*TINY, "algo.name=multitask_ppo",
                               "meta.tasks=[MiniGrid-MemoryS7-v0, MiniGrid-MemoryS9-v0]"]), tasks_dir).run()
    assert memory_probe.main([str(tasks_dir)]) == 2
    assert ("was trained on several tasks (MiniGrid-MemoryS7-v0, MiniGrid-MemoryS9-v0): give --env"
            in capsys.readouterr().err)
    assert memory_probe.main([str(tasks_dir), "--env", "MiniGrid-MemoryS9-v0", "--episodes", "8", "--n-envs", "2"]) == 0


def test_many_probes_are_drawn_one_panel_per_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past one colour cycle (10 lines) the by-lag plot splits into panels by config folder, so no two lines of a
    panel share a colour; a few lines stay in one panel, whatever their folders."""
    def result(path: str) -> memory_probe.ProbeResult:
        return memory_probe.ProbeResult(path, 8, 0.5, 0.5, 0.5, 0.5, 0.9, 0.8, [0.9] * (memory_probe.MAX_LAG + 1),
                                        [4] * (memory_probe.MAX_LAG + 1))

    study = [result(f"studies/s/runs/{model}/seed_{seed}/checkpoint.pt on MiniGrid-MemoryS13-v0")
             for model in ("lstm", "rims") for seed in range(1, 7)]
    panels = memory_probe.lag_panels(study)
    assert list(panels) == ["lstm", "rims"] and [len(p) for p in panels.values()] == [6, 6]
    assert panels["rims"][0] is study[6]
    assert list(memory_probe.lag_panels(study[:3] + study[6:9])) == [""], "6 lines: one panel"
    # Numbered checkpoints group by their run's config too; two studies' "lstm" folders stay apart; more than
    # ten runs of one config are split, so a panel never holds more lines than colours.
    numbered = [result(f"s/runs/{model}/seed_{seed}/checkpoints/checkpoint_000000{seed}.pt")
                for model in ("lstm", "rims") for seed in range(6)]
    panels = memory_probe.lag_panels(numbered)
    assert list(panels) == ["lstm", "rims"]
    assert memory_probe._line_label(panels["rims"][1], "rims") == "seed_1/checkpoint_0000001"
    two_studies = [result(f"{name}/runs/lstm/seed_{seed}/checkpoint.pt") for name in ("s7", "s13") for seed in range(6)]
    assert list(memory_probe.lag_panels(two_studies)) == ["s7/runs/lstm", "s13/runs/lstm"]
    many = [result(f"out/cfg/seed_{seed}") for seed in range(12)]
    assert {name: len(lines) for name, lines in memory_probe.lag_panels(many).items()} == {"cfg (1/2)": 10,
                                                                                         "cfg (2/2)": 2}
    assert memory_probe._line_label(study[0], "lstm") == "seed_1 on S13"
    # Numbered checkpoints probed from inside their run folder: the folder's own name, not an empty one.
    monkeypatch.chdir(tmp_path)
    inside = [result(f"checkpoints/checkpoint_{frames:012d}.pt") for frames in range(12)]
    assert all(memory_probe._line_label(r, name).startswith(f"{tmp_path.name}/checkpoint_")
               for name, lines in memory_probe.lag_panels(inside).items() for r in lines)
    plot = memory_probe.plot_by_lag(study, tmp_path / "lag.png")
    assert plot.read_bytes().startswith(b"\x89PNG")
