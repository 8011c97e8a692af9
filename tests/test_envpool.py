"""The envpool backend (``env.backend: envpool``, envs/envpool_backend.py) against the gymnasium backend.

Skipped, with the reason shown, where envpool is not installed (``pip install -e ".[envpool]"``),
except the checks that need no envpool (the message that names the extra, and that the gymnasium
backend never imports envpool).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import train
from envs import make_vec_env
from policies.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
INSTALL = 'pip install -e ".[envpool]"'


@pytest.fixture(scope="module")
def envpool() -> Any:
    return pytest.importorskip("envpool", reason=f"envpool is not installed ({INSTALL}); the envpool backend "
                                                  "is not tested here")


# -- without envpool -------------------------------------------------------------------------------

def test_gymnasium_backend_does_not_import_envpool() -> None:
    code = ("import sys; from envs import make_vec_env; make_vec_env('MiniGrid-Empty-5x5-v0', 1, 0).close(); "
            "import agents.config; assert 'envpool' not in sys.modules, 'envpool imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_missing_envpool_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "envpool", None)  # `import envpool` raises ImportError
    code = train.main(["env.backend=envpool", "env.n_envs=2", "total_frames=32", "log.progress_bar=false",
                       "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert INSTALL in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_unknown_backend_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["env.backend=envpol", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "env.backend" in err and "'envpool'" in err and "Traceback" not in err


# -- MiniGrid --------------------------------------------------------------------------------------

def _run(venv: Any, actions: np.ndarray) -> list[tuple[Any, ...]]:
    """Step ``venv`` through ``actions`` (T, n_envs); return (obs, reward, done, infos) per step."""
    out = [(venv.reset(), None, None, None)]
    for row in actions:
        obs, reward, done, infos = venv.step(row)
        out.append((np.copy(obs), reward.copy(), done.copy(), [dict(i) for i in infos]))
    venv.close()
    return out


def _assert_same_steps(gym_steps: list[tuple[Any, ...]], pool_steps: list[tuple[Any, ...]]) -> int:
    ends = 0
    for t, (a, b) in enumerate(zip(gym_steps, pool_steps)):
        assert np.array_equal(a[0], b[0]), f"observations differ at step {t}"
        if t == 0:
            continue
        # envpool computes MiniGrid's 1 - 0.9 t/T in float32: one rounding step from minigrid's float64.
        np.testing.assert_allclose(a[1], b[1], rtol=1e-6, err_msg=f"rewards at step {t}")
        assert np.array_equal(a[2], b[2]), f"dones differ at step {t}: {a[2]} vs {b[2]}"
        for i, (ia, ib) in enumerate(zip(a[3], b[3])):
            assert ia["TimeLimit.truncated"] == ib["TimeLimit.truncated"], (t, i)
            assert ia["is_success"] == ib["is_success"], (t, i)
            assert ("terminal_observation" in ia) == ("terminal_observation" in ib) == bool(a[2][i]), (t, i)
            if a[2][i]:
                ends += 1
                assert np.array_equal(ia["terminal_observation"], ib["terminal_observation"]), (t, i)
                ea, eb = ia["episode"], ib["episode"]
                assert (ea["l"], ea["is_success"]) == (eb["l"], eb["is_success"]), (t, i)
                assert abs(ea["r"] - eb["r"]) < 1e-6, (t, i)
            else:
                assert "episode" not in ib
    return ends


def test_import_envpool_registers_only_the_families_used(envpool: Any) -> None:
    # In a fresh process: the backend's import skips envpool's other registrations (Jumanji's imports
    # matplotlib, seconds), and `import envpool.entry` afterwards still registers every family.
    code = ("import sys; from envs.envpool_backend import import_envpool; envpool = import_envpool(); "
            "ids = set(envpool.list_all_envs()); "
            "assert {'MiniGrid-DoorKey-5x5-v0', 'BabyAI-GoToLocal-v0', 'Pong-v5'} <= ids, sorted(ids)[:5]; "
            "assert 'CartPole-v1' not in ids and 'envpool.jumanji' not in sys.modules, 'all families imported'; "
            "assert 'envpool.entry' not in sys.modules, 'placeholder left behind'; "
            "import envpool.entry; assert 'CartPole-v1' in envpool.list_all_envs(), 'entry did not register'; "
            "assert import_envpool() is envpool")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_a_broken_envpool_registry_is_one_message(envpool: Any) -> None:
    # envpool imports but no registration does (an asset package missing, say): one line naming the
    # extra to reinstall, not an ImportError traceback from inside envpool.
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name in ('envpool.minigrid.registration', 'envpool.entry'):\n"
            "            raise ImportError('no module named ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from envs.envpool_backend import import_envpool\n"
            "try:\n    import_envpool()\nexcept ValueError as exc:\n    print(exc)\n"
            "else:\n    sys.exit('imported a broken registry without a word')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"env.backend=envpool: envpool {envpool.__version__} is installed but its "
                                    "registry does not import (no module named envpool.entry)"), result.stdout
    assert INSTALL in result.stdout and len(result.stdout.strip().splitlines()) == 1


# MiniGrid-Empty-5x5: the same level whatever the seed (agent at (1, 1) facing right, goal at (3, 3)).
TO_GOAL = [2, 2, 1, 2, 2]  # forward, forward, right, forward, forward: reward 1 - 0.9 * 5/100
# 95 left turns face the agent down; then down, down, left turn, forward, forward reaches the goal on
# step 100, the env's step limit: gymnasium says terminated and truncated (SB3: terminal, no bootstrap).
GOAL_ON_LAST_STEP = [0] * 95 + [2, 2, 0, 2, 2]


def test_minigrid_episodes_match_the_gymnasium_backend(envpool: Any) -> None:
    """Goal reached, goal reached on the limit step, and the env's own time limit: same everything."""
    steps = 215
    env0 = (TO_GOAL + GOAL_ON_LAST_STEP + TO_GOAL + [0] * steps)[:steps]
    env1 = [0] * steps  # spins: truncated by the env's limit at steps 100 and 200
    actions = np.array([env0, env1]).T
    gym_steps = _run(make_vec_env("MiniGrid-Empty-5x5-v0", 2, 3), actions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the level-generator warning (another test checks it)
        pool_steps = _run(make_vec_env("MiniGrid-Empty-5x5-v0", 2, 3, backend="envpool"), actions)
    assert _assert_same_steps(gym_steps, pool_steps) == 6  # env 0: goals at 5, 105, 110, limit at 210; env 1: 100, 200
    infos = [step[3] for step in pool_steps[1:]]
    assert infos[104][0]["episode"]["is_success"] and not infos[104][0]["TimeLimit.truncated"]  # goal on the limit
    assert infos[99][1]["TimeLimit.truncated"] and not infos[99][1]["is_success"]


def test_minigrid_max_episode_steps_matches(envpool: Any) -> None:
    """The adapter's own step limit (gymnasium: a TimeLimit) truncates and resets like SB3's."""
    env0 = (TO_GOAL + [0] * 10 + TO_GOAL + [0] * 30)[:30]
    actions = np.array([env0, [0] * 30]).T
    gym_steps = _run(make_vec_env("MiniGrid-Empty-5x5-v0", 2, 0, max_episode_steps=7), actions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pool_steps = _run(make_vec_env("MiniGrid-Empty-5x5-v0", 2, 0, max_episode_steps=7, backend="envpool"),
                          actions)
    assert _assert_same_steps(gym_steps, pool_steps) >= 6


def _transplant(env_id: str, state: Any) -> Any:
    """An upstream minigrid env holding envpool's level (grid, agent position and direction)."""
    import gymnasium as gym
    from minigrid.core.grid import Grid

    env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    grid, _ = Grid.decode(np.asarray(state.grid).reshape(state.width, state.height, 3).astype(np.uint8))
    env.grid, env.carrying, env.step_count = grid, None, 0
    env.agent_pos, env.agent_dir = tuple(int(x) for x in state.agent_pos), int(state.agent_dir)
    return env


def test_minigrid_same_level_same_dynamics_and_observations(envpool: Any) -> None:
    """DoorKey-5x5: envpool's levels, replayed in upstream minigrid, give the same observations and rewards."""
    n, env_id = 16, "MiniGrid-DoorKey-5x5-v0"
    pool = envpool.make_gymnasium(env_id, num_envs=n, seed=list(range(n)))
    obs, _ = pool.reset()
    envs = [_transplant(env_id, s) for s in pool.debug_states(list(range(n)))]
    for i, env in enumerate(envs):
        assert np.array_equal(env.gen_obs()["image"], obs["image"][i])
    rng = np.random.default_rng(0)
    alive, ended = np.ones(n, bool), 0
    for _ in range(250):
        actions = rng.integers(0, 7, n)
        obs, reward, terminated, truncated, _ = pool.step(actions.astype(np.int32))
        for i in np.flatnonzero(alive):
            o, r, te, tr, _ = envs[i].step(int(actions[i]))
            assert np.array_equal(o["image"], obs["image"][i]) and o["direction"] == obs["direction"][i]
            assert abs(r - reward[i]) <= 1e-6 and te == terminated[i] and tr == truncated[i]
            if te or tr:
                alive[i], ended = False, ended + 1
    pool.close()
    assert ended == n


def test_minigrid_seeds_give_other_levels_than_minigrid(envpool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented difference: envpool's level generator has its own RNG, so a seed gives another level.

    That is why the envpool backend warns on MiniGrid/BabyAI and the default stays gymnasium.
    """
    import envs.envpool_backend as backend

    monkeypatch.setattr(backend, "_MINIGRID_WARNED", False)
    with pytest.warns(UserWarning, match="its own random number generator"):
        pool = make_vec_env("MiniGrid-DoorKey-5x5-v0", 8, 0, backend="envpool")
    gym_obs, pool_obs = make_vec_env("MiniGrid-DoorKey-5x5-v0", 8, 0).reset(), pool.reset()
    assert gym_obs.shape == pool_obs.shape and gym_obs.dtype == pool_obs.dtype
    assert not all(np.array_equal(a, b) for a, b in zip(gym_obs, pool_obs))
    pool.close()


def test_seeding_again_with_the_same_seed_gives_the_same_levels(envpool: Any) -> None:
    # seed() with the seeds the pool already had did not rebuild it: the second reset went on to other levels.
    venv = make_vec_env("MiniGrid-DoorKey-5x5-v0", 2, 0, backend="envpool")
    try:
        venv.seed(5)
        first = venv.reset()
        venv.step(np.array([2, 2]))
        venv.seed(5)
        assert np.array_equal(venv.reset(), first)
    finally:
        venv.close()


def test_minigrid_mission_tokens(envpool: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pool = make_vec_env("BabyAI-GoToLocal-v0", 3, 0, mission=True, backend="envpool")
    reference = make_vec_env("BabyAI-GoToLocal-v0", 1, 0, mission=True)
    assert pool.observation_space == reference.observation_space
    obs = pool.reset()
    from envs.minigrid import tokenize_mission

    missions = envpool.make_gymnasium("BabyAI-GoToLocal-v0", num_envs=3, seed=pool._pool.config["env_seed"])
    texts = missions.decode_mission(missions.reset()[0]["mission"])
    assert all(np.array_equal(obs["mission"][i], tokenize_mission(str(texts[i]))) for i in range(3))
    assert all(str(t).startswith("go to") for t in texts)
    pool.close(), reference.close(), missions.close()


# -- Atari -----------------------------------------------------------------------------------------

def test_atari_settings_are_the_gymnasium_backends(envpool: Any) -> None:
    pool = make_vec_env("ALE/Pong-v5", 2, 0, backend="envpool")
    reference = make_vec_env("ALE/Pong-v5", 1, 0)
    assert pool.observation_space == reference.observation_space  # (4, 84, 84) uint8
    assert pool.action_space == reference.action_space  # v5's minimal action set (6 for Pong)
    ale = reference.venv.envs[0].unwrapped  # type: ignore[attr-defined]
    config = pool.pool_config
    # The same sticky actions as the gymnasium backend's ALE (v5's 0.25; envpool's default is 0).
    assert config["repeat_action_probability"] == ale.ale.getFloat("repeat_action_probability") == 0.25
    assert config["frame_skip"] == 4 and config["noop_max"] == 30 and config["use_fire_reset"]
    assert not config["episodic_life"] and not config["reward_clip"] and not config["full_action_space"]
    assert config["max_episode_steps"] == 27000  # 108,000 emulator frames, v5's limit
    assert (config["img_height"], config["img_width"], config["gray_scale"]) == (84, 84, True)
    obs = pool.reset()
    assert obs.shape == (2, 4, 84, 84) and not obs[:, :3].any() and obs[:, 3].any()  # VecFrameStack's zeros
    obs2, _, _, _ = pool.step(np.zeros(2, int))
    assert np.array_equal(obs2[:, 2], obs[:, 3]) and not obs2[:, :2].any()
    pool.close(), reference.close()
    life_loss = make_vec_env("ALE/Breakout-v5", 1, 0, terminal_on_life_loss=True, backend="envpool")
    assert life_loss.pool_config["episodic_life"]
    life_loss.close()


@pytest.mark.parametrize("life_loss", [False, True])
def test_atari_episodes_are_whole_games_with_raw_scores(envpool: Any, life_loss: bool) -> None:
    """No episode end on a lost life by default; with terminal_on_life_loss, dones per life, stats per game."""
    pool = make_vec_env("ALE/Breakout-v5", 1, 5, backend="envpool", clip_rewards=False,
                        terminal_on_life_loss=life_loss)
    pool.reset()
    rng = np.random.default_rng(0)
    steps, dones, score = 0, 0, 0.0
    for _ in range(5000):
        _, reward, done, infos = pool.step(rng.integers(0, 4, 1))
        steps, score, dones = steps + 1, score + float(reward[0]), dones + int(done[0])
        if "episode" in infos[0]:
            break
    else:
        pytest.fail("no game ended in 5000 steps")
    assert infos[0]["episode"]["l"] == steps and infos[0]["episode"]["r"] == score
    assert not infos[0]["TimeLimit.truncated"] and "terminal_observation" in infos[0]
    assert dones == (5 if life_loss else 1)  # Breakout has 5 lives
    pool.close()


def test_atari_rewards_clipped_scores_raw(envpool: Any) -> None:
    # Space Invaders scores 5 to 30 points an invader (Breakout's first rows score 1, which clipping leaves
    # as it is): the same seeds and actions without and with clipping give the raw rewards and their signs,
    # and the same raw episode scores.
    runs = []
    for clip in (False, True):
        pool = make_vec_env("ALE/SpaceInvaders-v5", 2, 1, backend="envpool", clip_rewards=clip)
        pool.reset()
        rng = np.random.default_rng(1)
        rewards, scores = [], []
        for _ in range(400):
            _, reward, _, infos = pool.step(rng.integers(0, pool.action_space.n, 2))
            rewards.append(reward.copy())
            scores += [info["episode"]["r"] for info in infos if "episode" in info]
        pool.close()
        runs.append((np.stack(rewards), scores))
    (raw, raw_scores), (clipped, clipped_scores) = runs
    assert raw.max() > 1.0, "no reward above 1: the test cannot tell clipped from raw"
    np.testing.assert_array_equal(clipped, np.sign(raw))
    assert clipped_scores and clipped_scores == raw_scores and max(clipped_scores) > 1.0


# -- refusals and a training run -------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "expected"), [
    (["env.id=PongNoFrameskip-v4"], "'ALE/<Game>-v5' only"),
    (["env.vec_env=subproc"], "vec_env='subproc'"),
    (["env.level_seeds=[1, 2]"], "level_seeds"),
    (["env.env_kwargs={size: 8}"], "no env_kwargs"),
    (["env.id=MiniGrid-MultiRoom-N4-S5-v1"], "cannot run"),
])
def test_what_envpool_cannot_do_is_one_line(envpool: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            overrides: list[str], expected: str) -> None:
    import gymnasium as gym

    for item in overrides:
        if item.startswith("env.id="):
            if item.split("=", 1)[1] not in gym.registry:
                pytest.skip(f"{item} is not a gymnasium id here")
    code = train.main(["env.backend=envpool", "env.n_envs=2", "log.progress_bar=false", *overrides,
                       "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1, err
    assert not (tmp_path / "run").exists(), "a refused run leaves no empty run folder behind"


def test_train_with_envpool_finishes(envpool: Any, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        code = train.main(["env.backend=envpool", "core.name=lstm", "core.hidden_size=16", "env.n_envs=4",
                           "algo.n_steps=16", "algo.num_minibatches=2", "log.progress_bar=false",
                           "total_frames=128", "--run-dir", str(run_dir)])
    assert code == 0 and (run_dir / "checkpoint.pt").is_file()
    assert "backend: envpool" in (run_dir / "config.yaml").read_text()
    # Resumed (its envs cannot be pickled: fresh episodes), it trains on with the same backend.
    assert not (run_dir / "envs_state.pkl").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        code = train.main(["--resume", str(run_dir), "total_frames=256"])
    assert code == 0 and load_checkpoint(run_dir / "checkpoint.pt")["frames"] == 256
    assert "backend: envpool" in (run_dir / "config.yaml").read_text()
