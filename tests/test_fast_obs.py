"""FastGenObs must give exactly MiniGrid's own gen_obs() output, step after step.

The reference is always the class method, ``type(env.unwrapped).gen_obs(env.unwrapped)``,
which the instance attribute installed by ``install_fast_obs`` does not touch.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import gymnasium as gym
import minigrid  # noqa: F401  (registers the MiniGrid and BabyAI ids)
import numpy as np
import pytest
from minigrid.core.world_object import Ball, Door, Key
from minigrid.envs import DoorKeyEnv
from minigrid.minigrid_env import MiniGridEnv
from stable_baselines3.common.vec_env import DummyVecEnv

from envs import make_env, make_vec_env
from envs.fast_obs import FastGenObs, gen_obs_uncached, install_fast_obs, process_vis_flat, view_layout, view_transform


def _reference(base: MiniGridEnv) -> dict[str, Any]:
    """MiniGrid's own observation, whatever is installed on the instance."""
    return type(base).gen_obs(base)


def _assert_same_obs(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    """Assert two gen_obs() dicts are identical: keys, image bits, dtype, layout, direction, mission."""
    assert got.keys() == want.keys(), where
    g, w = got["image"], want["image"]
    assert g.dtype == w.dtype == np.uint8 and g.shape == w.shape, where
    assert g.flags["C_CONTIGUOUS"] and g.flags["WRITEABLE"], where
    np.testing.assert_array_equal(g, w, err_msg=where)
    assert got["direction"] == want["direction"] and type(got["direction"]) is type(want["direction"]), where
    assert got["mission"] == want["mission"], where


def _check_base(base: MiniGridEnv, where: str) -> None:
    """The installed fast obs and the cache-free version both equal MiniGrid's."""
    want = _reference(base)
    _assert_same_obs(base.gen_obs(), want, where)
    _assert_same_obs(gen_obs_uncached(base), want, where)


def _play(env: gym.Env, n_steps: int, max_episode_len: int, seed: int) -> int:
    """Random actions over several episodes, checking every observation; returns episodes played.

    Args:
        env: an env built by ``envs.make_env`` (image observation only).
        n_steps: total steps checked (besides the resets).
        max_episode_len: an episode is cut (by a new reset) after this many steps.
        seed: seeds the resets (seed, seed + 1, ...) and the actions.
    """
    base = env.unwrapped
    rng = np.random.default_rng(seed)
    episode, t, done = -1, 0, True
    for _ in range(n_steps):
        if done or t == max_episode_len:
            episode, t = episode + 1, 0
            obs, _ = env.reset(seed=seed + episode)
            np.testing.assert_array_equal(obs, _reference(base)["image"])
            _check_base(base, f"reset {episode}")
        # Extra weight on pickup/drop/toggle so that keys move and doors open.
        action = int(rng.choice(7, p=[0.2, 0.2, 0.25, 0.1, 0.1, 0.15, 0.0]))
        obs, _, terminated, truncated, _ = env.step(action)
        np.testing.assert_array_equal(obs, _reference(base)["image"], err_msg=f"episode {episode} step {t}")
        _check_base(base, f"episode {episode} step {t}")
        t += 1
        done = terminated or truncated
    return episode + 1


CASES = [
    ("MiniGrid-DoorKey-5x5-v0", None),
    ("MiniGrid-DoorKey-8x8-v0", None),
    ("MiniGrid-MultiRoom-N2-S4-v0", None),
    ("MiniGrid-MemoryS7-v0", None),
    ("MiniGrid-LavaCrossingS9N1-v0", None),
    ("MiniGrid-DistShift1-v0", None),
    ("MiniGrid-KeyCorridorS3R1-v0", None),
    ("MiniGrid-Dynamic-Obstacles-5x5-v0", None),  # obstacles move every step
    ("BabyAI-GoToLocal-v0", None),
    ("BabyAI-UnlockPickup-v0", None),
    ("MiniGrid-DoorKey-8x8-v0", {"agent_view_size": 5}),
    ("MiniGrid-DoorKey-5x5-v0", {"agent_view_size": 3}),
    ("MiniGrid-KeyCorridorS3R1-v0", {"agent_view_size": 9}),
    ("MiniGrid-DoorKey-8x8-v0", {"see_through_walls": True}),
]


@pytest.mark.parametrize(("env_id", "env_kwargs"), CASES)
def test_fast_obs_equals_minigrid(env_id: str, env_kwargs: dict[str, Any] | None) -> None:
    env = make_env(env_id, seed=0, env_kwargs=env_kwargs)
    base = env.unwrapped
    assert isinstance(vars(base).get("gen_obs"), FastGenObs), "wrap_minigrid must install the fast obs"
    for key, value in (env_kwargs or {}).items():
        assert getattr(base, key) == value
    assert _play(env, n_steps=300, max_episode_len=80, seed=10) >= 4


def test_mission_observation_unchanged() -> None:
    """The Dict observation (image + mission tokens) is built from the same obs."""
    fast = make_env("BabyAI-GoToLocal-v0", seed=0, mission=True)
    slow = make_env("BabyAI-GoToLocal-v0", seed=0, mission=True)
    slow.unwrapped.__dict__.pop("gen_obs")  # back to MiniGrid's class method
    a, _ = fast.reset(seed=3)
    b, _ = slow.reset(seed=3)
    for t in range(60):
        for key in ("image", "mission"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"step {t} {key}")
        a, *_ = fast.step(t % 6)
        b, *_ = slow.step(t % 6)


def test_grid_changed_behind_the_agents_back() -> None:
    """Doors opened/locked and objects added/removed anywhere, in view or not, show up exactly."""
    env = make_env("MiniGrid-KeyCorridorS3R1-v0", seed=0, env_kwargs={"agent_view_size": 5})
    base = env.unwrapped
    rng = np.random.default_rng(1)
    for ep in range(3):
        env.reset(seed=ep)
        for t in range(120):
            if t % 3 == 0:
                for obj in base.grid.grid:
                    if isinstance(obj, Door):
                        obj.is_open = bool(rng.integers(2))
                        obj.is_locked = not obj.is_open and bool(rng.integers(2))
                x, y = int(rng.integers(1, base.grid.width - 1)), int(rng.integers(1, base.grid.height - 1))
                if (x, y) != tuple(base.agent_pos) and not isinstance(base.grid.get(x, y), Door):
                    choice = int(rng.integers(3))
                    base.grid.set(x, y, [None, Ball("red"), Key("yellow")][choice])
            if t % 7 == 0:  # something else in the agent's hands
                base.carrying = [None, Ball("purple"), Key("green")][int(rng.integers(3))]
            _check_base(base, f"episode {ep} step {t}")
            env.step(int(rng.integers(3)))  # turn / forward only: the env itself stays consistent


def test_view_size_changed_mid_episode() -> None:
    """Setting agent_view_size on the base env mid-episode is followed (the cache is rebuilt)."""
    env = gym.make("MiniGrid-DoorKey-8x8-v0")
    assert install_fast_obs(env)
    base = env.unwrapped
    env.reset(seed=0)
    for t in range(40):
        env.step(t % 3)
        _check_base(base, f"view 7 step {t}")
    base.agent_view_size = 5
    for t in range(40):
        env.step((t + 1) % 3)
        _check_base(base, f"view 5 step {t}")


@pytest.mark.parametrize("view_size", [3, 5, 7, 9, 11])
def test_view_transform_matches_rotations(view_size: int) -> None:
    """The numpy transpose/flip of each direction gives the cells MiniGrid's rotate_left does."""
    labels = np.arange(view_size * view_size).reshape(view_size, view_size)
    for agent_dir in range(4):
        transpose, s0, s1 = view_transform(view_size, agent_dir)
        got = (labels.T if transpose else labels)[s0, s1].ravel().tolist()
        want = [sx * view_size + sy for sx, sy in view_layout(view_size, agent_dir)]
        assert got == want
    # Direction 3 (up) rotates four times: the identity.
    assert view_layout(view_size, 3) == tuple((i, j) for i in range(view_size) for j in range(view_size))


def test_process_vis_flat_blocks_behind_walls() -> None:
    """A wall row right in front of the agent hides everything beyond it."""
    vs = 5
    opaque = [0] * (vs * vs)
    for i in range(vs):
        opaque[i * vs + (vs - 2)] = 1  # row j = vs - 2, just in front of the agent
    mask = process_vis_flat(opaque, vs)
    for i in range(vs):
        for j in range(vs):
            assert mask[i * vs + j] == (j >= vs - 2), (i, j)


def test_pickled_vec_env_keeps_exact_observations() -> None:
    """pickle.dumps of the whole DummyVecEnv (the trainer's snapshot) restores working fast obs."""
    venv = make_vec_env("MiniGrid-DoorKey-5x5-v0", n_envs=3, seed=0)
    assert isinstance(venv, DummyVecEnv)
    venv.reset()
    rng = np.random.default_rng(0)
    for _ in range(30):
        venv.step(rng.integers(0, 7, size=3))
    restored = pickle.loads(pickle.dumps(venv))
    copied = copy.deepcopy(venv)
    for t in range(150):
        actions = rng.integers(0, 7, size=3)
        obs = [v.step(actions)[0] for v in (venv, restored, copied)]
        np.testing.assert_array_equal(obs[1], obs[0], err_msg=f"pickled, step {t}")
        np.testing.assert_array_equal(obs[2], obs[0], err_msg=f"deep-copied, step {t}")
        for v in (restored, copied):
            for env in v.envs:
                base = env.unwrapped
                gen_obs = vars(base)["gen_obs"]
                assert isinstance(gen_obs, FastGenObs) and gen_obs.env is base  # bound to its own copy
                _check_base(base, f"step {t}")


def test_fallback_for_incompatible_envs() -> None:
    """Envs whose class computes its own observation, and non-MiniGrid envs, are left alone."""

    class CustomObsDoorKey(DoorKeyEnv):
        def gen_obs(self):  # pragma: no cover - never called here
            return super().gen_obs()

    custom = CustomObsDoorKey(size=5)
    assert not install_fast_obs(custom)
    assert "gen_obs" not in vars(custom)

    cartpole = gym.make("CartPole-v1")
    assert not install_fast_obs(cartpole)

    env = gym.make("MiniGrid-DoorKey-5x5-v0")
    assert install_fast_obs(env) and install_fast_obs(env)  # idempotent
    first = vars(env.unwrapped)["gen_obs"]
    install_fast_obs(env)
    assert vars(env.unwrapped)["gen_obs"] is first


def test_wrap_minigrid_can_disable_fast_obs() -> None:
    from envs.minigrid import wrap_minigrid

    env = wrap_minigrid(gym.make("MiniGrid-DoorKey-5x5-v0"), fast_obs=False)
    assert "gen_obs" not in vars(env.unwrapped)
