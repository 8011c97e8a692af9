"""MiniGrid / BabyAI wrappers: symbolic partial view, mission tokens, success flag.

Wrapper order built by :func:`wrap_minigrid` (innermost first)::

    gym.make(env_id, **env_kwargs)        # MiniGrid's own max_steps truncation;
                                          # its gen_obs replaced by envs.fast_obs.FastGenObs
    [TimeLimit(max_episode_steps)]        # only when max_episode_steps is given
    [LevelSeedWrapper(level_seeds)]       # only when level_seeds is given
    SuccessInfoWrapper                    # info["is_success"] on every step
    Monitor(info_keywords=("is_success",))
    ImgObsWrapper | MissionTokenWrapper   # (7,7,3) uint8  |  Dict(image, mission)

The image is MiniGrid's partially observed egocentric view, one cell per
pixel, with channels (object index, colour index, state index); values are
small integers, not scaled pixel intensities. It is computed by
:class:`~envs.fast_obs.FastGenObs` (bit-for-bit MiniGrid's ``gen_obs``,
~20x faster) unless the env class overrides ``gen_obs``/``gen_obs_grid``.
"""

from __future__ import annotations

import re
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from minigrid.wrappers import ImgObsWrapper
from stable_baselines3.common.monitor import Monitor

from .fast_obs import install_fast_obs

__all__ = [
    "MISSION_MAX_LEN",
    "MISSION_VOCAB",
    "PAD_ID",
    "UNK_ID",
    "VOCAB_SIZE",
    "MissionTokenWrapper",
    "SuccessInfoWrapper",
    "tokenize_mission",
    "wrap_minigrid",
]

#: Id of the padding token (mission arrays are right-padded with it).
PAD_ID = 0
#: Id given to any word that is not in :data:`MISSION_VOCAB`.
UNK_ID = 1

# Lowercased words of every MiniGrid 3.x / BabyAI mission template (colours,
# object types, BabyAI's verifier grammar, and the fixed MiniGrid missions).
# Ids are positional (word i has id i + 2). APPEND ONLY: checkpoints store
# embeddings indexed by these ids, so never reorder or remove a word.
MISSION_VOCAB: tuple[str, ...] = (
    "a", "after", "and", "at", "avoid", "ball", "behind", "blue", "box", "door",
    "end", "fetch", "find", "from", "front", "get", "go", "goal", "green", "grey",
    "hallway", "in", "key", "lava", "left", "matching", "must", "near", "next", "object",
    "of", "on", "open", "opening", "pick", "purple", "put", "reach", "red", "right",
    "room", "rooms", "square", "the", "then", "to", "traverse", "unlock", "up", "use",
    "yellow", "you", "your", "maze", "wall", "floor", "empty", "agent", "unseen",
)  # fmt: skip

_WORD_TO_ID: dict[str, int] = {w: i + 2 for i, w in enumerate(MISSION_VOCAB)}
#: Number of token ids (padding and unknown included): ids are in [0, VOCAB_SIZE).
VOCAB_SIZE: int = len(MISSION_VOCAB) + 2

#: Length L of the mission token array. The longest mission seen over 1,200
#: BabyAI BossLevel/MiniBossLevel/SynthSeq levels has 37 words; longer ones
#: (possible in principle for BossLevel) are truncated.
MISSION_MAX_LEN = 64

_WORD_RE = re.compile(r"[a-z]+")


def tokenize_mission(mission: str, max_len: int = MISSION_MAX_LEN) -> np.ndarray:
    """Turn a mission string into a fixed-length array of token ids.

    Args:
        mission: the mission text; it is lowercased and split into alphabetic
            words (punctuation such as the comma of "..., then ..." is dropped).
        max_len: length of the returned array; longer missions are truncated,
            shorter ones right-padded with :data:`PAD_ID`.

    Returns:
        int64 array of shape (max_len,); unknown words map to :data:`UNK_ID`.
    """
    ids = [_WORD_TO_ID.get(w, UNK_ID) for w in _WORD_RE.findall(mission.lower())][:max_len]
    out = np.full(max_len, PAD_ID, dtype=np.int64)
    out[: len(ids)] = ids
    return out


class MissionTokenWrapper(gym.ObservationWrapper):
    """Dict observation {"image": (7,7,3) uint8, "mission": (L,) int64 token ids}.

    Stable-Baselines3 vec envs cannot carry strings, so the mission text is
    replaced by token ids from :data:`MISSION_VOCAB` (see :func:`tokenize_mission`).
    The agent's direction is dropped, as with ``ImgObsWrapper``.

    Args:
        env: a MiniGrid/BabyAI env with Dict observations (image, direction, mission).
        max_len: length L of the mission array.
    """

    def __init__(self, env: gym.Env, max_len: int = MISSION_MAX_LEN) -> None:
        super().__init__(env)
        self.max_len = max_len
        self.observation_space = spaces.Dict(
            {
                "image": env.observation_space["image"],
                "mission": spaces.Box(low=0, high=VOCAB_SIZE - 1, shape=(max_len,), dtype=np.int64),
            }
        )

    def observation(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        return {"image": observation["image"], "mission": tokenize_mission(observation["mission"], self.max_len)}


class SuccessInfoWrapper(gym.Wrapper):
    """Add ``info["is_success"]`` to every step.

    MiniGrid and BabyAI give a positive reward only when the task is solved
    (``1 - 0.9 * steps / max_steps``); failures (lava, time-out, wrong object)
    end with reward 0. So success = the episode terminated with reward > 0.
    The flag is present on every step (False until success) so that SB3's
    ``Monitor(info_keywords=("is_success",))`` can always read it.

    It also hands MiniGrid the action as a Python int: MiniGrid's ``step`` compares the action with
    its ``Actions`` IntEnum members one after the other, and a numpy integer (what a vec env passes)
    makes each comparison probe the enum class for numpy's ``__array_*__`` hooks, which took a
    DoorKey step from ~18 to ~67 us. The env sees the same action either way.
    """

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(int(action))
        info = dict(info)
        info["is_success"] = bool(terminated and float(reward) > 0.0)
        return obs, reward, terminated, truncated, info


def wrap_minigrid(env: gym.Env, *, mission: bool = False, fast_obs: bool = True) -> gym.Env:
    """Add the success flag, SB3's Monitor and the observation wrapper to a MiniGrid env.

    Args:
        env: a MiniGrid/BabyAI env from ``gym.make`` (optionally already wrapped
            by a TimeLimit and a :class:`~envs.wrappers.LevelSeedWrapper`).
        mission: False gives the (7,7,3) uint8 image alone; True gives the Dict
            observation of :class:`MissionTokenWrapper`.
        fast_obs: compute MiniGrid's partial view with
            :class:`~envs.fast_obs.FastGenObs` (same observations, much
            faster); envs whose class overrides ``gen_obs`` or
            ``gen_obs_grid`` keep their own either way.

    Returns:
        The wrapped env; episode infos carry ``info["episode"] = {"r", "l", "t", "is_success"}``.
    """
    if fast_obs:
        # MiniGrid's step/reset call self.gen_obs() directly, so a wrapper
        # cannot replace it: the fast version is installed on the base env.
        install_fast_obs(env)
    env = SuccessInfoWrapper(env)
    env = Monitor(env, info_keywords=("is_success",))
    return MissionTokenWrapper(env) if mission else ImgObsWrapper(env)
