"""Evaluating a trained policy: episodes in a vector env, raw scores, success rates, videos and traces.

Read :func:`evaluate_policy` for the loop. The rest decides *where* to evaluate
(a suite's train and held-out envs, given ids, or the policy's own training env)
and with which env options, and checks that the env's spaces fit the policy
before any episode runs.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv
from tqdm import tqdm

from envs import check_env_id, get_suite, make_vec_env
from policies.policy import Policy

__all__ = [
    "CARRIED_OPTIONS",
    "EvalTarget",
    "EvaluationError",
    "check_spaces",
    "evaluate_policy",
    "evaluation_options",
    "resolve_targets",
    "save_video",
    "short_env_name",
    "summarize",
]

# make_vec_env options that define the observation/action interface the policy was trained with:
# they go with the policy to any env it is evaluated on.
CARRIED_OPTIONS: tuple[str, ...] = ("vec_env", "frame_stack", "mission", "terminal_on_life_loss")
# Options that describe the training env itself (its kwargs, levels, step limit): they apply only
# when evaluating on the training env id (a suite entry brings its own).
SAME_ENV_OPTIONS: tuple[str, ...] = ("env_kwargs", "level_seeds", "max_episode_steps")

# Frames larger than this (pixels per side) are subsampled in videos: a 16x16 MiniGrid renders at
# 512x512 and thousands of such frames would not fit in memory.
MAX_VIDEO_SIDE = 256


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked (unknown env or suite, spaces that do not fit, ...)."""


@dataclass
class EvalTarget:
    """One env to evaluate on.

    :param env_id: gymnasium id.
    :param options: ``make_vec_env`` options that define this env (a suite entry's ``env_kwargs``,
        ``level_seeds``...); they override the policy's training options.
    :param name: short display name (e.g. ``"DoorKey-6x6"``).
    :param split: ``"train"``, ``"held-out"``, or ``""`` when the env is not part of a suite.
    """

    env_id: str
    options: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    split: str = ""

    @property
    def label(self) -> str:
        """Display name with the split, e.g. ``"DoorKey-6x6 (held-out)"``."""
        return f"{self.name} ({self.split})" if self.split else self.name


def short_env_name(env_id: str) -> str:
    """``"DoorKey-5x5"`` for ``"MiniGrid-DoorKey-5x5-v0"``, ``"Pong"`` for ``"ALE/Pong-v5"``."""
    short = env_id.split("/")[-1]
    for prefix in ("MiniGrid-", "BabyAI-"):
        short = short.removeprefix(prefix)
    return short.rsplit("-v", 1)[0]


def resolve_targets(
    suite: str | None = None,
    env_ids: list[str] | None = None,
    suite_params: dict[str, Any] | None = None,
) -> list[EvalTarget] | None:
    """Turn ``--suite`` / ``--env`` into the envs to evaluate on.

    :param suite: a suite name (``envs.list_suites``): its train envs then its held-out envs.
    :param env_ids: gymnasium ids, evaluated in order (repeats are dropped).
    :param suite_params: parameters of a parametric suite (e.g. ``{"game": "Breakout"}``).
    :return: the targets, or None when neither is given (each policy's own training env).
    :raises EvaluationError: unknown suite or env id (with the known names / close matches).
    """
    targets: list[EvalTarget] = []
    if suite is not None:
        try:
            built = get_suite(suite, **(suite_params or {}))
        except ValueError as exc:
            raise EvaluationError(str(exc)) from None
        targets += [EvalTarget(s.env_id, dict(s.options), s.name, "train") for s in built.train]
        targets += [EvalTarget(s.env_id, dict(s.options), s.name, "held-out") for s in built.heldout]
    for env_id in dict.fromkeys(env_ids or []):
        try:
            check_env_id(env_id)
        except ValueError as exc:
            raise EvaluationError(str(exc)) from None
        targets.append(EvalTarget(env_id, {}, short_env_name(env_id)))
    return targets or None


def own_target(policy: Policy) -> EvalTarget:
    """The env the policy was trained on, with all its training options."""
    return EvalTarget(policy.env_id, {}, short_env_name(policy.env_id), "train")


def evaluation_options(policy: Policy, target: EvalTarget, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``make_vec_env`` options for evaluating ``policy`` on ``target``.

    Preprocessing options (frame stack, mission tokens, ...) always come from the policy's
    training options; options describing the training env itself (``env_kwargs``,
    ``level_seeds``, ``max_episode_steps``) only when the target is the same env id, since
    a 5x5 step limit or a list of training levels means nothing for another env. Then the
    target's own options, raw rewards (``clip_rewards=False``) and ``overrides`` on top.

    :param policy: the policy to evaluate.
    :param target: the env to evaluate it on.
    :param overrides: options that win over everything (e.g. ``{"max_episode_steps": 50}``).
    """
    carried = CARRIED_OPTIONS + (SAME_ENV_OPTIONS if target.env_id == policy.env_id else ())
    options = {key: value for key, value in policy.env_options.items() if key in carried}
    return {**options, **target.options, "clip_rewards": False, **(overrides or {})}


def _spaces_error(policy: Policy, env_id: str, venv: VecEnv) -> str | None:
    problems = []
    if venv.observation_space != policy.observation_space:
        problems.append(f"observation space {venv.observation_space} (the policy expects {policy.observation_space})")
    if venv.action_space != policy.action_space:
        problems.append(f"action space {venv.action_space} (the policy expects {policy.action_space})")
    if not problems:
        return None
    where = f" from {policy.path}" if policy.path is not None else ""
    return (f"env {env_id!r} does not fit the policy{where}, trained on {policy.env_id!r}: "
            f"it has {' and '.join(problems)}")


def check_spaces(policy: Policy, env_id: str, options: dict[str, Any]) -> None:
    """Build one copy of the env and check its spaces equal the policy's, without running it.

    :param policy: the policy to evaluate.
    :param env_id: the env id.
    :param options: its ``make_vec_env`` options (``evaluation_options``).
    :raises EvaluationError: naming both spaces when they differ, or when the env cannot be built.
    """
    venv = _make_venv(env_id, 1, 0, options)
    try:
        message = _spaces_error(policy, env_id, venv)
    finally:
        venv.close()
    if message is not None:
        raise EvaluationError(message)


def _make_venv(env_id: str, n_envs: int, seed: int, options: dict[str, Any]) -> VecEnv:
    try:
        return make_vec_env(env_id, n_envs, seed, **options)
    except (ValueError, TypeError) as exc:  # TypeError: an env_kwargs key the env does not take
        raise EvaluationError(f"cannot build env {env_id!r} with options {options}: {exc}") from None


def _render_env0(venv: VecEnv) -> np.ndarray:
    frame = np.asarray(venv.env_method("render", indices=[0])[0])
    step = max(1, math.ceil(max(frame.shape[:2]) / MAX_VIDEO_SIDE))
    return frame[::step, ::step] if step > 1 else frame


def evaluate_policy(
    policy: Policy,
    env_id: str,
    options: dict[str, Any] | None = None,
    episodes: int = 100,
    seed: int = 0,
    deterministic: bool = False,
    record_video: bool = False,
    record_info: bool = False,
    n_envs: int = 8,
    progress: bool = False,
    desc: str | None = None,
    max_video_frames: int = 1000,
) -> dict[str, Any]:
    """Run ``episodes`` finished episodes of ``policy`` on ``env_id`` and summarise them.

    The episodes run in a vector env of ``n_envs`` copies. Sub-env i must finish a fixed
    quota of episodes (``episodes`` split as evenly as possible) and its later episodes
    are ignored: keeping "the first N episodes to finish" would over-count short episodes
    (failures that end early, or easy levels), biasing the score.

    The recurrent state is carried from step to step and reset where an episode starts
    (the vec env's ``dones``), exactly as in training.

    :param policy: the policy (``policies.load_policy``).
    :param env_id: gymnasium id of the env.
    :param options: ``make_vec_env`` options; None means ``evaluation_options`` for ``env_id``
        (the policy's training options that apply). ``clip_rewards`` defaults to False, so
        returns are raw scores.
    :param episodes: number of finished episodes to count.
    :param seed: env i is seeded with ``seed + i``; action sampling is seeded with ``seed`` too
        (without touching the caller's global torch RNG).
    :param deterministic: take the most likely action instead of sampling.
    :param record_video: keep the rendered frames of sub-env 0's first episode (``"frames"``).
    :param record_info: keep the core's diagnostics over sub-env 0's first episode (``"trace"``:
        info key -> array, time first, plus ``"state_norm"`` (T,), the recurrent state's norm).
    :param n_envs: parallel envs (capped at ``episodes``).
    :param progress: show a tqdm bar counting finished episodes.
    :param desc: the bar's label.
    :param max_video_frames: stop recording frames after this many (very long episodes).
    :return: ``{"env_id", "options", "episodes", "returns", "lengths", "successes" (None when
        the env does not report ``is_success``), "mean_return", "std_return", "success_rate",
        "mean_length", "seconds"}`` plus ``"frames"`` / ``"trace"`` when recorded.
    :raises EvaluationError: if the env cannot be built or its spaces do not fit the policy.
    """
    if episodes < 1:
        raise EvaluationError(f"episodes must be >= 1, got {episodes}")
    if options is None:
        options = evaluation_options(policy, EvalTarget(env_id))
    options = {"clip_rewards": False, **options}
    if record_video:
        options["render_mode"] = "rgb_array"
    n_envs = max(1, min(n_envs, episodes))
    quota = [episodes // n_envs + (1 if i < episodes % n_envs else 0) for i in range(n_envs)]

    venv = _make_venv(env_id, n_envs, seed, options)
    message = _spaces_error(policy, env_id, venv)
    if message is not None:
        venv.close()
        raise EvaluationError(message)

    per_env: list[list[dict[str, float]]] = [[] for _ in range(n_envs)]
    frames: list[np.ndarray] = []
    steps_info: list[dict[str, np.ndarray]] = []
    recording = record_video or record_info  # until sub-env 0 finishes its first episode
    bar = tqdm(total=episodes, desc=desc or short_env_name(env_id), unit="ep", disable=not progress,
               dynamic_ncols=True, leave=False)
    started = time.perf_counter()
    try:
        # Sampling uses torch's global RNG: fork it so evaluation is seeded and the caller's stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            obs = venv.reset()
            state = policy.initial_state(n_envs)
            starts = np.ones(n_envs, dtype=bool)
            while any(len(done) < q for done, q in zip(per_env, quota, strict=True)):
                if record_video and recording and len(frames) < max_video_frames:
                    frames.append(_render_env0(venv))
                if record_info and recording:
                    actions, state, info = policy.act(obs, state, starts, deterministic, return_info=True)
                    step = {key: value[0] for key, value in info.items()}
                    step["state_norm"] = np.asarray(float(state[0].norm()))
                    steps_info.append(step)
                else:
                    actions, state = policy.act(obs, state, starts, deterministic)
                obs, _rewards, dones, infos = venv.step(actions)
                for i, info_i in enumerate(infos):
                    # The Monitor reports a finished episode (a whole game for Atari, even with
                    # terminal_on_life_loss) with its raw return; extras beyond the quota are ignored.
                    if "episode" in info_i and len(per_env[i]) < quota[i]:
                        episode = {"r": float(info_i["episode"]["r"]), "l": int(info_i["episode"]["l"])}
                        if "is_success" in info_i["episode"] or "is_success" in info_i:
                            episode["is_success"] = float(info_i["episode"].get("is_success", info_i.get("is_success")))
                        per_env[i].append(episode)
                        bar.update(1)
                if "episode" in infos[0]:
                    recording = False
                starts = np.asarray(dones, dtype=bool)
    finally:
        bar.close()
        venv.close()

    results = summarize([episode for done in per_env for episode in done])
    results.update(env_id=env_id, options=options, seconds=time.perf_counter() - started)
    if record_video:
        results["frames"] = frames
    if record_info:
        results["trace"] = {key: np.stack([step[key] for step in steps_info]) for key in steps_info[0]}
    return results


def summarize(episodes: list[dict[str, float]]) -> dict[str, Any]:
    """Mean/std return, success rate and mean length of finished episodes.

    :param episodes: ``{"r": return, "l": length, "is_success"?: 0/1}`` per episode.
    :return: per-episode lists and the summary numbers; ``success_rate`` and ``successes``
        are None unless every episode reports ``is_success``.
    """
    returns = [e["r"] for e in episodes]
    lengths = [e["l"] for e in episodes]
    has_success = bool(episodes) and all("is_success" in e for e in episodes)
    successes = [e["is_success"] for e in episodes] if has_success else None
    return {
        "episodes": len(episodes),
        "returns": returns,
        "lengths": lengths,
        "successes": successes,
        "mean_return": float(np.mean(returns)) if returns else float("nan"),
        "std_return": float(np.std(returns)) if returns else float("nan"),
        "success_rate": float(np.mean(successes)) if successes else None,
        "mean_length": float(np.mean(lengths)) if lengths else float("nan"),
    }


def video_format_available(suffix: str) -> bool:
    """Whether imageio can write a video with this file suffix here (MP4 needs imageio-ffmpeg)."""
    if suffix == ".gif":
        return True
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def save_video(frames: list[np.ndarray], path: str | Path, fps: int = 10) -> Path:
    """Write RGB frames as a GIF (no ffmpeg needed) or an MP4 (needs imageio-ffmpeg).

    :param frames: ``(H, W, 3)`` uint8 frames, all the same size.
    :param path: output file; its suffix (``.gif`` or ``.mp4``) picks the format.
    :param fps: frames per second.
    :raises EvaluationError: no frames, or MP4 without imageio-ffmpeg.
    """
    import imageio.v3 as iio  # imported here: only video writing needs it

    path = Path(path)
    if not frames:
        raise EvaluationError(f"no frames to write to {path}")
    if not video_format_available(path.suffix):
        raise EvaluationError(f"writing {path.suffix} videos needs imageio-ffmpeg (pip install imageio-ffmpeg); "
                              "use GIF instead")
    path.parent.mkdir(parents=True, exist_ok=True)
    stack = np.stack(frames).astype(np.uint8)
    if path.suffix == ".gif":
        # Pillow's GIF writer takes the frame duration in milliseconds; loop=0 repeats forever.
        iio.imwrite(path, stack, duration=int(1000 / fps), loop=0)
    else:
        iio.imwrite(path, stack, fps=fps)
    return path
