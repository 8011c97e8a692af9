"""Atari (ale-py) preprocessing built from Stable-Baselines3's Atari wrappers.

The ALE env is created with ``frameskip=1`` and the frame skip is done by SB3's
``MaxAndSkipEnv`` (skip 4, max over the last two frames), so the agent acts
every 4 emulator frames, never 16. Sticky actions stay as the id defines them
(``ALE/<Game>-v5``: ``repeat_action_probability=0.25``, applied by ALE on
every emulator frame, exactly as v5's own frame skip would).

Per-env wrapper order built by :func:`wrap_atari` (innermost first)::

    gym.make(env_id, frameskip=1, **env_kwargs)   # sticky actions, mode/difficulty
    [LevelSeedWrapper(level_seeds)]               # (added by the factory, when given)
    NoopResetEnv(noop_max=30)
    MaxAndSkipEnv(skip=4)
    [TimeLimit(max_episode_steps)]                # agent steps, only when given
    Monitor                                       # raw game score, agent steps, whole games
    [EpisodicLifeEnv]                             # only when terminal_on_life_loss=True
    [FireResetEnv]                                # games whose action 1 is FIRE
    WarpFrame(84, 84)                             # grayscale (84, 84, 1) uint8
    [ClipRewardEnv]                               # only when clip_rewards=True

and then, on the vec env, ``VecFrameStack(frame_stack)`` (when > 1) and
``VecTransposeImage`` -> observations (frame_stack, 84, 84) uint8.

``terminal_on_life_loss`` is off by default (the v5 protocol of Machado et
al., 2018: an episode is a whole game). The Monitor sits below EpisodicLifeEnv
and ClipRewardEnv, so ``info["episode"]["r"]`` is always the raw score of a
whole game.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from gymnasium.wrappers import TimeLimit
from stable_baselines3.common.atari_wrappers import (
    ClipRewardEnv,
    EpisodicLifeEnv,
    FireResetEnv,
    MaxAndSkipEnv,
    NoopResetEnv,
    WarpFrame,
)
from stable_baselines3.common.monitor import Monitor

__all__ = [
    "FRAME_SKIP",
    "NOOP_MAX",
    "SCREEN_SIZE",
    "atari_modes",
    "check_atari_opencv",
    "check_atari_rom",
    "wrap_atari",
]

FRAME_SKIP = 4
NOOP_MAX = 30
SCREEN_SIZE = 84

_ROM_HELP = (
    "ale-py >= 0.9 ships the Atari ROMs inside the wheel: reinstall it with "
    "`pip install --force-reinstall 'ale-py>=0.9'`, or point the ALE_ROMS_DIR "
    "environment variable at a folder holding the ROM .bin files."
)


def check_atari_rom(env_id: str, game: str) -> None:
    """Raise ValueError when the ROM of an ALE game cannot be found.

    Args:
        env_id: the env id, used in the message.
        game: ALE's snake_case ROM name (the ``game`` kwarg of the id's spec, e.g. "pong").
    """
    try:
        from ale_py import roms

        path = roms.get_rom_path(game)
    except Exception as exc:  # missing file, bad hash, missing ROM folder
        raise ValueError(f"The Atari ROM {game!r} for {env_id!r} could not be loaded ({exc}). {_ROM_HELP}") from exc
    if path is None or not path.exists():
        raise ValueError(f"The Atari ROM {game!r} for {env_id!r} is not installed. {_ROM_HELP}")


def check_atari_opencv() -> None:
    """Raise ValueError when OpenCV, which SB3's ``WarpFrame`` uses to resize frames, is missing."""
    try:
        import cv2  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            "Atari preprocessing (SB3's WarpFrame: grayscale, 84x84 resize) needs OpenCV: "
            "`pip install opencv-python-headless`."
        ) from exc


def wrap_atari(
    env: gym.Env,
    *,
    clip_rewards: bool = True,
    terminal_on_life_loss: bool = False,
    max_episode_steps: int | None = None,
) -> gym.Env:
    """Apply the Atari preprocessing to an ALE env created with ``frameskip=1``.

    Args:
        env: the ALE env (``gym.make(id, frameskip=1, ...)``, possibly level-seeded).
        clip_rewards: clip rewards to their sign {-1, 0, 1} (training); the
            Monitor below still reports the raw score.
        terminal_on_life_loss: end the (learning) episode on each life loss;
            the env is only really reset at game over.
        max_episode_steps: truncate a game after this many steps (each of 4
            frames); None keeps ALE's own limit (108,000 frames for v5). The count,
            like the Monitor's episode length, includes the steps the wrappers above
            take in a reset: FireResetEnv's two (FIRE, then action 2) for games with
            FIRE, and with ``terminal_on_life_loss`` a lost life's no-op step and
            those two again (the no-op starts below are not counted). The envpool
            backend counts the agent's steps only.

    Returns:
        The wrapped env, observations (84, 84, 1) uint8.
    """
    env = NoopResetEnv(env, noop_max=NOOP_MAX)
    env = MaxAndSkipEnv(env, skip=FRAME_SKIP)
    if max_episode_steps is not None:
        env = TimeLimit(env, max_episode_steps=max_episode_steps)
    env = Monitor(env)
    if terminal_on_life_loss:
        env = EpisodicLifeEnv(env)
    if "FIRE" in env.unwrapped.get_action_meanings():  # type: ignore[attr-defined]
        env = FireResetEnv(env)
    env = WarpFrame(env, width=SCREEN_SIZE, height=SCREEN_SIZE)
    if clip_rewards:
        env = ClipRewardEnv(env)
    return env


def atari_modes(env_id: str) -> tuple[list[int], list[int]]:
    """Return the (modes, difficulties) ALE offers for the game of ``env_id``.

    The first of each list is the game's default (ALE's
    ``RomSettings::getDefaultMode`` returns the first available mode; the
    default difficulty is 0, the first available).

    Args:
        env_id: a registered ALE id, e.g. "ALE/Pong-v5".
    """
    env = gym.make(env_id)
    try:
        ale: Any = env.unwrapped.ale  # type: ignore[attr-defined]
        return [int(m) for m in ale.getAvailableModes()], [int(d) for d in ale.getAvailableDifficulties()]
    finally:
        env.close()
