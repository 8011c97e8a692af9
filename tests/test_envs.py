"""Tests of the envs package on real MiniGrid, BabyAI and ALE environments."""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.atari_wrappers import ClipRewardEnv, MaxAndSkipEnv
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

import train
from envs import (
    MISSION_MAX_LEN,
    PAD_ID,
    SUITES,
    UNK_ID,
    EnvSpec,
    Suite,
    check_env_id,
    env_family,
    env_seeds,
    get_suite,
    list_suites,
    make_env,
    make_vec_env,
    tokenize_mission,
)

DOORKEY = "MiniGrid-DoorKey-5x5-v0"
PONG = "ALE/Pong-v5"


def _wrapper_chain(env: gym.Env) -> list[gym.Env]:
    """Wrappers from the outermost to the base env."""
    chain = [env]
    while hasattr(chain[-1], "env"):
        chain.append(chain[-1].env)
    return chain


def _rollout(venv, actions: list[np.ndarray]) -> list[np.ndarray]:
    obs = [venv.reset()]
    for a in actions:
        obs.append(venv.step(a)[0])
    return obs


# --------------------------------------------------------------------------- MiniGrid


def test_minigrid_observations_are_symbolic_uint8():
    venv = make_vec_env(DOORKEY, n_envs=2, seed=0)
    assert isinstance(venv, DummyVecEnv)
    obs = venv.reset()
    assert obs.shape == (2, 7, 7, 3) and obs.dtype == np.uint8
    assert venv.observation_space.shape == (7, 7, 3)
    # object / colour / state indices, not pixel intensities
    assert obs[..., 0].max() <= 10 and obs[..., 1].max() <= 5 and obs[..., 2].max() <= 2
    obs, rewards, dones, _infos = venv.step(np.array([2, 0]))
    assert obs.shape == (2, 7, 7, 3) and rewards.shape == (2,) and dones.shape == (2,)
    venv.close()


def test_minigrid_episode_info_success():
    # Empty-5x5: agent at (1, 1) facing east, goal at (3, 3)
    venv = make_vec_env("MiniGrid-Empty-5x5-v0", n_envs=1, seed=0)
    venv.reset()
    for action in [2, 2, 1, 2]:  # forward, forward, turn right, forward
        _, _, dones, infos = venv.step(np.array([action]))
        assert not dones[0]
    _, rewards, dones, infos = venv.step(np.array([2]))
    assert dones[0] and rewards[0] > 0
    episode = infos[0]["episode"]
    assert episode["l"] == 5 and episode["r"] == pytest.approx(rewards[0])
    assert episode["is_success"] is True and infos[0]["is_success"] is True


def test_minigrid_episode_info_failure_on_time_limit():
    venv = make_vec_env(DOORKEY, n_envs=2, seed=0, max_episode_steps=6)
    venv.reset()
    for _ in range(6):
        _, _, dones, infos = venv.step(np.array([0, 0]))  # turn left forever
    assert dones.all()
    for info in infos:
        assert info["episode"]["l"] == 6 and info["episode"]["r"] == 0.0
        assert info["episode"]["is_success"] is False


def test_minigrid_seeding_is_reproducible():
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, 3, size=2) for _ in range(20)]
    a = _rollout(make_vec_env(DOORKEY, n_envs=2, seed=3), actions)
    b = _rollout(make_vec_env(DOORKEY, n_envs=2, seed=3), actions)
    c = _rollout(make_vec_env("MiniGrid-DoorKey-8x8-v0", n_envs=2, seed=3), actions)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # env 0 of a run is env 0 of a larger run with the same seed (its stream does not depend on n_envs)
    single = make_vec_env("MiniGrid-DoorKey-8x8-v0", n_envs=1, seed=4).reset()
    pair = make_vec_env("MiniGrid-DoorKey-8x8-v0", n_envs=2, seed=4).reset()
    assert np.array_equal(single[0], pair[0])


def test_no_two_run_seeds_share_an_env_stream():
    # SB3's seed + i gave runs with seeds 1 and 2 fifteen of sixteen envs in common.
    seeds = {run_seed: env_seeds(run_seed, 16) for run_seed in range(0, 20)}
    streams = [s for per_run in seeds.values() for s in per_run]
    assert len(set(streams)) == len(streams)
    assert env_seeds(3, 16) == seeds[3]  # reproducible
    assert env_seeds([3, 1024], 16) != seeds[3]  # a later stream of the same run is a new one
    # and what the envs see: each env's first level differs between run seeds 1 and 2
    first = {s: make_vec_env("MiniGrid-DoorKey-8x8-v0", n_envs=4, seed=s).reset() for s in (1, 2)}
    for i in range(4):
        for j in range(4):
            assert not np.array_equal(first[1][i], first[2][j])


def test_mission_tokens():
    venv = make_vec_env("BabyAI-GoToLocal-v0", n_envs=2, seed=0, mission=True)
    space = venv.observation_space
    assert isinstance(space, gym.spaces.Dict)
    assert space["mission"].shape == (MISSION_MAX_LEN,) and space["mission"].dtype == np.int64
    obs = venv.reset()
    assert obs["image"].shape == (2, 7, 7, 3) and obs["image"].dtype == np.uint8
    assert obs["mission"].shape == (2, MISSION_MAX_LEN) and obs["mission"].dtype == np.int64
    for i in range(2):
        text = venv.envs[i].unwrapped.mission
        assert np.array_equal(obs["mission"][i], tokenize_mission(text))
        n_words = len(text.split())
        assert (obs["mission"][i, :n_words] > UNK_ID).all()  # every word is in the vocabulary
        assert (obs["mission"][i, n_words:] == PAD_ID).all()


def test_tokenizer():
    ids = tokenize_mission("Go to the red ball, then pick up a zorp")
    assert ids.shape == (MISSION_MAX_LEN,) and ids.dtype == np.int64
    assert ids[9] == UNK_ID and (ids[:9] > UNK_ID).all() and ids[10:].sum() == 0
    assert np.array_equal(tokenize_mission("go to"), tokenize_mission("GO TO"))
    assert tokenize_mission("the " * 100).shape == (MISSION_MAX_LEN,)


@pytest.mark.parametrize(
    "env_id", ["MiniGrid-DoorKey-5x5-v0", "MiniGrid-LockedRoom-v0", "MiniGrid-Fetch-8x8-N3-v0", "BabyAI-Synth-v0"]
)
def test_mission_vocabulary_covers_missions(env_id):
    env = gym.make(env_id)
    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        assert UNK_ID not in tokenize_mission(obs["mission"]), obs["mission"]


def _layout(venv, i=0) -> np.ndarray:
    return venv.envs[i].unwrapped.grid.encode()


def test_level_seeds_fix_the_layout():
    same_a = make_vec_env("MiniGrid-DoorKey-8x8-v0", n_envs=1, seed=0, level_seeds=[7])
    same_b = make_vec_env("MiniGrid-DoorKey-8x8-v0", n_envs=1, seed=123, level_seeds=[7])
    other = make_vec_env("MiniGrid-DoorKey-8x8-v0", n_envs=1, seed=0, level_seeds=[8])
    layouts_a, layouts_b, layouts_other = [], [], []
    for _ in range(3):  # reset repeatedly: every reset uses level seed 7 (or 8)
        for venv, out, level in ((same_a, layouts_a, 7), (same_b, layouts_b, 7), (other, layouts_other, 8)):
            venv.reset()
            out.append(_layout(venv))
            assert venv.reset_infos[0]["level_seed"] == level
    assert all(np.array_equal(x, layouts_a[0]) for x in layouts_a + layouts_b)
    assert not np.array_equal(layouts_a[0], layouts_other[0])


def test_level_seeds_are_drawn_from_the_list():
    def drawn(seed: int) -> list[int]:
        venv = make_vec_env("MiniGrid-DoorKey-8x8-v0", n_envs=2, seed=seed, level_seeds=[10, 11, 12])
        out = []
        for _ in range(8):
            venv.reset()
            out.extend(info["level_seed"] for info in venv.reset_infos)
        return out

    first = drawn(0)
    assert set(first) <= {10, 11, 12} and len(set(first)) > 1
    assert drawn(0) == first  # reproducible


def test_minigrid_wrapper_order():
    env = make_env(DOORKEY, seed=0, level_seeds=[1])
    names = [type(w).__name__ for w in _wrapper_chain(env)]
    assert names[:4] == ["ImgObsWrapper", "Monitor", "SuccessInfoWrapper", "LevelSeedWrapper"]


def test_minigrid_gets_the_vec_envs_numpy_actions_as_python_ints():
    """A numpy integer action makes MiniGrid's IntEnum comparisons ~4x slower; the wrapper passes an int."""
    venv = make_vec_env(DOORKEY, n_envs=2, seed=0)
    venv.reset()
    seen = []
    for env in venv.envs:
        base = env.unwrapped
        original = base.step
        base.step = lambda action, original=original: (seen.append(action), original(action))[1]
    venv.step(np.array([2, 1], dtype=np.int64))
    assert seen == [2, 1] and all(type(action) is int for action in seen)
    venv.close()


# --------------------------------------------------------------------------- Atari


def test_in_process_vec_env_steps_like_sb3s_dummy_vec_env():
    """InProcessVecEnv copies infos one level deep instead of deep-copying them: the same observations,
    rewards, dones and infos as SB3's DummyVecEnv, and a returned info never changes afterwards."""
    ours = make_vec_env(DOORKEY, n_envs=3, seed=5, max_episode_steps=6)
    twin = make_vec_env(DOORKEY, n_envs=3, seed=5, max_episode_steps=6)
    theirs = DummyVecEnv([lambda env=env: env for env in twin.envs])
    theirs._seeds = list(twin._seeds)
    assert type(ours).__name__ == "InProcessVecEnv" and isinstance(ours, DummyVecEnv)
    assert np.array_equal(ours.reset(), theirs.reset())
    rng = np.random.default_rng(0)
    kept = []
    for _ in range(20):
        actions = rng.integers(0, 7, size=3)
        obs_a, rew_a, done_a, infos_a = ours.step(actions)
        obs_b, rew_b, done_b, infos_b = theirs.step(actions)
        assert np.array_equal(obs_a, obs_b) and np.array_equal(rew_a, rew_b) and np.array_equal(done_a, done_b)
        for info_a, info_b in zip(infos_a, infos_b):
            assert info_a.keys() == info_b.keys()
            for key in info_a:
                if key == "terminal_observation":
                    assert np.array_equal(info_a[key], info_b[key])
                elif key == "episode":
                    assert info_a[key]["r"] == info_b[key]["r"] and info_a[key]["l"] == info_b[key]["l"]
                else:
                    assert info_a[key] == info_b[key], key
        kept.append((infos_a, [dict(info) for info in infos_a]))
    assert any("terminal_observation" in info for infos, _ in kept for info in infos)  # episodes ended
    for infos, snapshot in kept:  # later steps and resets left every returned info as it was
        assert [info.keys() for info in infos] == [info.keys() for info in snapshot]
        assert all(info[k] is snap[k] for info, snap in zip(infos, snapshot) for k in info)
    ours.close()
    theirs.close()


@pytest.mark.parametrize("frame_stack", [1, 4])
def test_atari_observation_shape(frame_stack):
    venv = make_vec_env(PONG, n_envs=2, seed=0, frame_stack=frame_stack)
    obs = venv.reset()
    assert obs.shape == (2, frame_stack, 84, 84) and obs.dtype == np.uint8
    assert venv.observation_space.shape == (frame_stack, 84, 84)
    obs, _rewards, _dones, _ = venv.step(np.array([0, 1]))
    assert obs.shape == (2, frame_stack, 84, 84)
    venv.close()


def test_atari_total_frame_skip_is_4_with_sticky_actions():
    venv = make_vec_env(PONG, n_envs=1, seed=0, frame_stack=1)
    venv.reset()
    base = venv.venv.envs[0].unwrapped
    assert base._frameskip == 1
    assert base.ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    start = base.ale.getEpisodeFrameNumber()
    for _ in range(10):
        venv.step(np.array([0]))
    assert base.ale.getEpisodeFrameNumber() - start == 40


def test_atari_seeding_is_reproducible():
    actions = [np.array([a % 6]) for a in range(30)]
    a = _rollout(make_vec_env(PONG, n_envs=1, seed=5, frame_stack=2), actions)
    b = _rollout(make_vec_env(PONG, n_envs=1, seed=5, frame_stack=2), actions)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_atari_monitor_is_below_reward_clipping():
    clipped = make_env(PONG, seed=0, clip_rewards=True)
    chain = _wrapper_chain(clipped)
    types = [type(w) for w in chain]
    assert ClipRewardEnv in types and Monitor in types
    assert types.index(ClipRewardEnv) < types.index(Monitor) < types.index(MaxAndSkipEnv)
    assert clipped.reward(7.0) == 1.0 and clipped.reward(-3.0) == -1.0
    raw = make_env(PONG, seed=0, clip_rewards=False)
    assert ClipRewardEnv not in [type(w) for w in _wrapper_chain(raw)]
    names = [type(w).__name__ for w in _wrapper_chain(raw)]
    assert names[:3] == ["WarpFrame", "FireResetEnv", "Monitor"]  # life loss is not terminal by default
    lives = make_env(PONG, seed=0, terminal_on_life_loss=True)
    names = [type(w).__name__ for w in _wrapper_chain(lives)]
    assert names.index("EpisodicLifeEnv") < names.index("Monitor")


def test_atari_episode_return_is_the_raw_score():
    # one random game of Space Invaders (rewards of 5..30 points) with clipped training rewards
    venv = make_vec_env("ALE/SpaceInvaders-v5", n_envs=1, seed=0, frame_stack=1, clip_rewards=True)
    venv.reset()
    rng = np.random.default_rng(0)
    clipped_sum = 0.0
    for _ in range(5000):
        _, rewards, dones, infos = venv.step(rng.integers(0, venv.action_space.n, size=1))
        assert rewards[0] in (-1.0, 0.0, 1.0)
        clipped_sum += float(rewards[0])
        if dones[0]:
            break
    assert dones[0], "the game did not end"
    assert clipped_sum > 0
    assert infos[0]["episode"]["r"] > clipped_sum  # raw score


def test_atari_mode_and_difficulty_pass_through():
    venv = make_vec_env(PONG, n_envs=1, seed=0, frame_stack=1, env_kwargs={"mode": 1, "difficulty": 1})
    assert venv.reset().shape == (1, 1, 84, 84)
    base = venv.venv.envs[0].unwrapped
    assert base._game_mode == 1 and base._game_difficulty == 1


def test_missing_rom_message(monkeypatch):
    from ale_py import roms

    monkeypatch.setattr(roms, "get_rom_path", lambda name: None)
    with pytest.raises(ValueError, match="ROM.*pip install"):
        check_env_id(PONG)


# --------------------------------------------------------------------------- validation


def test_unknown_env_id_suggests_close_match():
    with pytest.raises(ValueError, match="MiniGrid-DoorKey-5x5-v0"):
        check_env_id("MiniGrid-DoorKey-5x5-v1")
    with pytest.raises(ValueError, match=r"Unknown environment id 'ALE/Pong-v9'.*ALE/Pong-v5"):
        make_vec_env("ALE/Pong-v9")
    with pytest.raises(ValueError, match="Unknown environment id"):
        make_vec_env("NothingLikeThis")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_envs": 0}, "n_envs"),
        ({"n_envs": -2}, "n_envs"),
        ({"frame_stack": 0}, "frame_stack"),
        ({"vec_env": "threads"}, "vec_env"),
        ({"level_seeds": []}, "level_seeds"),
    ],
)
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_vec_env(DOORKEY, **kwargs)


def test_family_specific_options_are_checked():
    with pytest.raises(ValueError, match="mission"):
        make_vec_env(PONG, mission=True)
    with pytest.raises(ValueError, match="frameskip"):
        make_vec_env(PONG, env_kwargs={"frameskip": 4})
    with pytest.raises(ValueError, match="terminal_on_life_loss"):  # was ignored silently
        make_vec_env(DOORKEY, terminal_on_life_loss=True)
    with pytest.raises(ValueError, match="obs_type='ram'"):  # was an OpenCV error at the first reset
        make_vec_env(PONG, env_kwargs={"obs_type": "ram"})
    for p in (2.0, -0.5, "0.25", True):  # 2.0 was taken: every action repeated forever
        with pytest.raises(ValueError, match="repeat_action_probability must be a number in"):
            make_vec_env(PONG, env_kwargs={"repeat_action_probability": p})
    make_vec_env(PONG, env_kwargs={"repeat_action_probability": 0, "obs_type": "rgb"}).close()


@pytest.mark.parametrize("kwargs", [{"mode": 99}, {"difficulty": 9}])
def test_an_atari_mode_ale_refuses_names_the_choices(kwargs, tmp_path, capsys):
    # ALE raised RuntimeError("Invalid game mode requested"), which reached the user as a traceback.
    with pytest.raises(ValueError, match=r"its modes are \[0, 1\], its difficulties \[0, 1, 2, 3\]"):
        make_vec_env(PONG, env_kwargs=kwargs)
    option = next(iter(kwargs))
    code = train.main([f"env.id={PONG}", f"env.env_kwargs={{{option}: {kwargs[option]}}}", "env.n_envs=1",
                       "total_frames=8", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "its modes are" in err, err
    assert not (tmp_path / "run").exists()


def test_env_family():
    assert env_family(DOORKEY) == "minigrid"
    assert env_family("BabyAI-GoToLocal-v0") == "minigrid"
    assert env_family(PONG) == "atari"
    assert env_family("PongNoFrameskip-v4") == "atari"
    assert env_family("CartPole-v1") == "other"


def test_options_rebuild_the_same_env():
    options = {"frame_stack": 4, "mission": True, "env_kwargs": {"size": 6}, "level_seeds": [3, 4]}
    a = make_vec_env("MiniGrid-DoorKey-5x5-v0", 2, 1, **options).reset()
    b = make_vec_env("MiniGrid-DoorKey-5x5-v0", 2, 1, **options).reset()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_subproc_vec_env():
    venv = make_vec_env(DOORKEY, n_envs=2, seed=0, vec_env="subproc")
    try:
        assert isinstance(venv, SubprocVecEnv)
        obs = venv.reset()
        assert np.array_equal(obs, make_vec_env(DOORKEY, n_envs=2, seed=0).reset())
        obs, _rewards, _dones, _infos = venv.step(np.array([0, 2]))
        assert obs.shape == (2, 7, 7, 3) and obs.dtype == np.uint8
    finally:
        venv.close()


# --------------------------------------------------------------------------- suites


def test_suites_list_and_resolve():
    names = {s.name for s in list_suites()}
    assert {"doorkey", "multiroom", "memory", "distshift", "lavacrossing", "seeds", "atari-modes"} <= names
    assert set(SUITES) == names
    doorkey = get_suite("doorkey")
    assert isinstance(doorkey, Suite) and all(isinstance(s, EnvSpec) for s in doorkey.all_specs())
    assert [s.env_id for s in doorkey.train] == ["MiniGrid-DoorKey-5x5-v0"]
    assert [s.env_id for s in doorkey.heldout] == [
        "MiniGrid-DoorKey-6x6-v0",
        "MiniGrid-DoorKey-8x8-v0",
        "MiniGrid-DoorKey-16x16-v0",
    ]
    # The multiroom suite holds out 4 and then 6 rooms (MiniGrid's MultiRoom-N4-S5-v0 has 6).
    for spec, rooms in zip(get_suite("multiroom").heldout, (4, 6), strict=True):
        env = gym.make(spec.env_id)
        env.reset(seed=0)
        assert len(env.unwrapped.rooms) == rooms, spec.env_id
        env.close()
    with pytest.raises(ValueError, match="doorkey"):
        get_suite("no-such-suite")
    with pytest.raises(ValueError, match="accepted"):
        get_suite("doorkey", size=5)


def test_every_suite_env_id_is_registered():
    for suite in list_suites():
        assert suite.train and suite.heldout, suite.name
        for spec in suite.all_specs():
            assert spec.env_id in gym.registry, spec.env_id
            check_env_id(spec.env_id)
            assert spec.name


def test_seeds_suite_is_disjoint_and_builds():
    suite = get_suite("seeds", env_id="MiniGrid-DoorKey-5x5-v0", num_train=50, num_heldout=10)
    train = set(suite.train[0].options["level_seeds"])
    heldout = set(suite.heldout[0].options["level_seeds"])
    assert len(train) == 50 and len(heldout) == 10 and not train & heldout
    venv = suite.heldout[0].make(n_envs=2, seed=0)
    venv.reset()
    assert {info["level_seed"] for info in venv.reset_infos} <= heldout
    default = get_suite("seeds")
    assert default.train[0].env_id == "MiniGrid-DoorKey-8x8-v0"
    assert len(default.train[0].options["level_seeds"]) == 1000
    with pytest.raises(ValueError, match="overlap"):
        get_suite("seeds", train_start=0, num_train=100, heldout_start=50)
    with pytest.raises(ValueError, match="Unknown environment id"):
        get_suite("seeds", env_id="MiniGrid-DoorKey-7x7-v0")
    with pytest.raises(ValueError, match="overlap"):  # ranges that touch without sharing a seed are fine
        get_suite("seeds", train_start=0, num_train=101, heldout_start=100)
    assert get_suite("seeds", train_start=0, num_train=100, heldout_start=100, num_heldout=5).heldout


@pytest.mark.parametrize("params, message", [
    # YAML values from --suite-param or a study file: each was a TypeError, AttributeError or OverflowError.
    ({"num_train": "abc"}, "suite 'seeds': parameter num_train must be an integer, got 'abc'"),
    ({"num_train": 2.5}, "parameter num_train must be an integer, got 2.5"),
    ({"num_train": True}, "parameter num_train must be an integer, got True"),
    ({"env_id": 3}, "parameter env_id must be a string, got 3"),
    ({"heldout_start": 10**27}, "level seeds must be below 2**32"),
    ({"num_heldout": 10**8}, "num_train + num_heldout must be at most 1,000,000"),  # listing them took minutes
])
def test_suite_parameters_of_the_wrong_type_or_size_are_one_clear_error(params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_suite("seeds", **params)


def test_numpy_integers_are_integer_suite_parameters():
    suite = get_suite("seeds", env_id="MiniGrid-DoorKey-5x5-v0", num_train=np.int64(3), num_heldout=np.int32(2))
    assert suite.train[0].options["level_seeds"] == [0, 1, 2] and suite.params["num_train"] == 3


def test_atari_modes_suite_parameter_must_be_a_string():
    with pytest.raises(ValueError, match="suite 'atari-modes': parameter game must be a string, got 1"):
        get_suite("atari-modes", game=1)


def test_atari_modes_suite_lists_other_modes():
    suite = get_suite("atari-modes")
    assert [s.env_id for s in suite.train] == [PONG] and suite.train[0].options == {}
    pairs = {(s.options["env_kwargs"]["mode"], s.options["env_kwargs"]["difficulty"]) for s in suite.heldout}
    assert (0, 0) not in pairs
    assert {(1, 0), (0, 1), (1, 1)} <= pairs
    assert len(pairs) == len(suite.heldout)
    venv = suite.heldout[0].make(n_envs=1, seed=0, frame_stack=1, clip_rewards=False)
    assert venv.reset().shape == (1, 1, 84, 84)
    breakout = get_suite("atari-modes", game="Breakout")
    assert breakout.train[0].env_id == "ALE/Breakout-v5" and len(breakout.heldout) > 1
