"""The peer of this package's throughput and SB3-interop benchmarks, defined once: sb3-contrib's RecurrentPPO.

    python benchmarks/peer.py --frames 102400        # trains it; prints one JSON line (frames/s of learn())

``RecurrentPPO("CnnLstmPolicy")`` on MiniGrid-DoorKey-5x5-v0 as the throughput issue defines it:

* env: SB3's ``make_vec_env`` with 16 envs (DummyVecEnv) and this package's MiniGrid wrapper
  (``envs.minigrid.wrap_minigrid``: image only, the (7, 7, 3) symbolic view, computed by the same fast
  observation code as ``python train.py`` uses, so both sides step the same envs at the same cost);
  SB3 transposes the image to (3, 7, 7).
* features extractor :class:`MinigridCNN`: three 2x2 convolutions of 16, 32 and 64 channels with a
  2x2 max-pool after the first (rl-starter-files' MiniGrid CNN), then a 64-unit linear layer; it reads
  the raw object/colour/state indices (``normalize_images=False``).
* one LSTM of 128 shared by actor and critic (``shared_lstm=True, enable_critic_lstm=False``; the
  critic reads its output detached, sb3-contrib's semantics), actor and critic heads of one hidden
  layer of 64 (tanh), as this package's policies have (sb3-contrib's default would be two).
* PPO: 16 envs x 128 steps, batch 256 (8 minibatches), 4 epochs, lr 1e-3 (constant), gamma 0.99,
  GAE 0.95, clip 0.2, entropy 0.01, value 0.5, max grad norm 0.5; CPU, one torch thread.

sb3-contrib trains on whole 128-step rollout sequences cut at episode starts (padded), not on the
package's 16-step chunks. The benchmarks time this script's whole process from launch to exit
(benchmarks/throughput.py); the JSON line adds the frames/s of ``learn()`` alone.

sb3-contrib is an optional dependency: ``pip install -e ".[sb3]"`` (also in the ``[test]`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python benchmarks/peer.py` from a source checkout

try:
    import sb3_contrib
    from sb3_contrib import RecurrentPPO
except ImportError as exc:  # say which extra brings it, before anything heavy is imported
    raise SystemExit('benchmarks/peer.py needs sb3-contrib: pip install -e ".[sb3]" (or the [test] extra, '
                     f'or pip install "sb3-contrib>=2.3"); import failed: {exc}') from None

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor  # noqa: E402
from stable_baselines3.common.vec_env import VecEnv  # noqa: E402
from torch import nn  # noqa: E402

from envs.minigrid import wrap_minigrid  # noqa: E402

__all__ = ["ENV_ID", "LSTM_HIDDEN_SIZE", "N_ENVS", "PEER_NAME", "POLICY_KWARGS", "PPO_KWARGS", "MinigridCNN",
           "make_peer", "make_peer_env"]

ENV_ID = "MiniGrid-DoorKey-5x5-v0"
N_ENVS = 16
LSTM_HIDDEN_SIZE = 128
PPO_KWARGS: dict[str, Any] = {
    "n_steps": 128, "batch_size": 256, "n_epochs": 4, "learning_rate": 1e-3, "gamma": 0.99, "gae_lambda": 0.95,
    "clip_range": 0.2, "ent_coef": 0.01, "vf_coef": 0.5, "max_grad_norm": 0.5,
}  # fmt: skip
PEER_NAME = f"sb3-contrib RecurrentPPO CnnLstmPolicy (MiniGrid CNN, shared LSTM {LSTM_HIDDEN_SIZE})"


class MinigridCNN(BaseFeaturesExtractor):
    """rl-starter-files' MiniGrid CNN: 2x2 convolutions of 16, 32, 64 channels (max-pool after the first), then a
    linear layer of ``features_dim`` (ReLU throughout). Reads SB3's channel-first (3, 7, 7) image as it comes.

    :param observation_space: the (C, H, W) image space after SB3's ``VecTransposeImage``.
    :param features_dim: width of the final linear layer (64).
    """

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 64) -> None:
        super().__init__(observation_space, features_dim)
        self.cnn = nn.Sequential(
            nn.Conv2d(observation_space.shape[0], 16, (2, 2)), nn.ReLU(), nn.MaxPool2d((2, 2)),
            nn.Conv2d(16, 32, (2, 2)), nn.ReLU(),
            nn.Conv2d(32, 64, (2, 2)), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.cnn(torch.zeros(1, *observation_space.shape)).shape[1]
        self.linear = nn.Sequential(nn.Linear(flat, features_dim), nn.ReLU())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.linear(self.cnn(observations.float()))


POLICY_KWARGS: dict[str, Any] = {
    "features_extractor_class": MinigridCNN,
    "features_extractor_kwargs": {"features_dim": 64},
    "normalize_images": False,  # the image holds object/colour/state indices, not intensities
    "lstm_hidden_size": LSTM_HIDDEN_SIZE,
    "n_lstm_layers": 1,
    "shared_lstm": True,
    "enable_critic_lstm": False,
    "net_arch": {"pi": [64], "vf": [64]},  # one hidden layer per head, as this package's heads
}


def make_peer_env(seed: int = 0, n_envs: int = N_ENVS) -> VecEnv:
    """DoorKey-5x5 through SB3's ``make_vec_env`` and this package's MiniGrid wrapper (image only)."""
    return make_vec_env(ENV_ID, n_envs=n_envs, seed=seed, wrapper_class=wrap_minigrid)


def make_peer(env: VecEnv | None = None, seed: int = 0, device: str = "cpu", **overrides: Any) -> RecurrentPPO:
    """The peer: ``RecurrentPPO("CnnLstmPolicy")`` with :data:`POLICY_KWARGS` and :data:`PPO_KWARGS`.

    :param env: the vec env (default: :func:`make_peer_env` with ``seed``).
    :param overrides: RecurrentPPO arguments replacing :data:`PPO_KWARGS`' (e.g. ``verbose=1``).
    """
    env = make_peer_env(seed) if env is None else env
    return RecurrentPPO("CnnLstmPolicy", env, seed=seed, device=device, policy_kwargs=dict(POLICY_KWARGS),
                        **{**PPO_KWARGS, **overrides})


def main(argv: list[str] | None = None) -> None:
    """Train the peer for ``--frames`` frames and print one JSON line; bad arguments exit 2 with one message."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=102_400, help="frames to train (whole rollouts of 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1, as the issue's peer)")
    args = parser.parse_args(argv)
    # Checked here: torch.set_num_threads(0) raises a RuntimeError, and learn(0) would divide by no frames.
    if args.frames < 1:
        parser.error(f"--frames must be at least 1, got {args.frames}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if not 0 <= args.seed < 2**32:  # numpy's seed range (gymnasium refused a negative one with a traceback)
        parser.error(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    torch.set_num_threads(args.threads)
    model = make_peer(seed=args.seed)
    started = time.perf_counter()
    model.learn(args.frames)
    seconds = time.perf_counter() - started
    model.get_env().close()
    print(json.dumps({"peer": PEER_NAME, "sb3_contrib": sb3_contrib.__version__, "torch": torch.__version__,
                      "torch_threads": torch.get_num_threads(), "frames": int(model.num_timesteps),
                      "learn_seconds": round(seconds, 3), "learn_fps": round(model.num_timesteps / seconds, 1)}),
          flush=True)


if __name__ == "__main__":
    main()
