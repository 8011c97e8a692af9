"""This package's recurrent cores inside sb3-contrib's ``RecurrentPPO``.

    from sb3_contrib import RecurrentPPO
    from policies.sb3 import RecurrentCorePolicy

    model = RecurrentPPO(RecurrentCorePolicy, env, policy_kwargs={"core": "rims", "core_kwargs": {"k_active": 4}})

sb3-contrib's ``RecurrentActorCriticPolicy`` is written around ``nn.LSTM``: the algorithm sizes its
state buffers from ``policy.lstm_actor.num_layers`` and ``.hidden_size``, carries states as ``(h, c)``
pairs of shape ``(num_layers, n_envs, hidden_size)``, and resets them by multiplying with
``1 - episode_start``. :class:`CoreAsLSTM` makes any core of :mod:`policies.cores` look like that:

* **State mapping.** A core's state is one flat ``(B, state_size)`` tensor. The adapter reports
  ``num_layers = 1`` and ``hidden_size = ceil(state_size / 2)``; ``h`` is the first half of the flat
  state and ``c`` the second. When ``state_size`` is odd, ``c`` carries one padding column that is
  always zero: one extra float per env in each of the four state tensors (actor and critic ``h`` and
  ``c``), i.e. ``2 * n_steps * n_envs`` floats in the rollout buffer (under 0.4% of RIMs' state at
  any size, nothing for an even ``state_size``). No core state is duplicated or dropped.
* **Resets.** Every core's initial state is zeros, so sb3-contrib's multiply-by-``(1 - episode_start)``
  gives exactly the core's initial state. The policy nevertheless hands the episode starts to the core
  itself (``_process_sequence`` below): the core then resets with its own ``torch.where`` (a NaN in a
  finished episode cannot leak through ``0 * NaN``) and runs the whole sequence in one call, through
  its fused or native time loop, instead of sb3-contrib's Python loop of one-step calls whenever a
  sequence holds an episode start (which is nearly every training minibatch).
* **Critic.** As in sb3-contrib (``RecurrentActorCriticPolicy`` and ``CnnLstmPolicy`` alike), the
  default is a second, separate core of the same kind for the critic (``enable_critic_lstm=True``);
  ``shared_lstm=True`` gives one core whose output the critic reads detached (the value loss does not
  train the core, sb3-contrib's semantics; half the recurrent compute), and
  ``shared_lstm=False, enable_critic_lstm=False`` a feed-forward critic.

The features extractor is, by default, :class:`EncoderFeaturesExtractor`: this package's own
encoders (:func:`policies.encoders.make_encoder`), so MiniGrid's symbolic grid goes through the grid
encoder (index embeddings and a small CNN). SB3 transposes (H, W, 3) uint8 observations to channel
first; the extractor transposes MiniGrid grids back. Because these encoders scale their own inputs
(grid indices are categories), ``normalize_images`` defaults to False.

This is the only module of the package that imports sb3-contrib (an optional extra:
``pip install "modular-memory-rl[sb3]"``); :mod:`policies` never imports it.
"""

from __future__ import annotations

try:  # first, so a missing extra is one clear message before anything heavy is imported
    from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
except ImportError as exc:
    raise ImportError(
        "policies.sb3 needs sb3-contrib, which is not installed: "
        'pip install "modular-memory-rl[sb3]" (or pip install "sb3-contrib>=2.3")'
    ) from exc

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import Schedule
from torch import Tensor, nn

from policies.cores import CORES, RecurrentCore, make_core
from policies.encoders import make_encoder
from policies.policy import check_core_revision

__all__ = ["CoreAsLSTM", "EncoderFeaturesExtractor", "RecurrentCorePolicy"]

# MiniGrid views are at most this many cells a side (as policies.encoders decides what a grid is).
_MAX_GRID_SIDE = 32


class CoreAsLSTM(nn.Module):
    """A core of this package dressed as the ``nn.LSTM`` sb3-contrib expects.

    ``out, (h, c) = adapter(seq, (h, c))`` with ``seq`` of shape ``(T, B, input_size)`` and ``h``,
    ``c`` of shape ``(1, B, hidden_size)``; ``out`` is ``(T, B, output_size)`` (the core's output,
    which need not be ``hidden_size`` wide). ``(h, c)`` is the core's flat state cut in two halves,
    the second padded with one zero column when ``state_size`` is odd.

    :param core: the core to wrap (its ``input_size`` is the features width).
    """

    def __init__(self, core: RecurrentCore) -> None:
        super().__init__()
        self.core = core
        self.input_size = core.input_size
        self.output_size = core.output_size
        self.state_size = core.state_size
        self.num_layers = 1
        self.hidden_size = (core.state_size + 1) // 2
        # 0 or 1 zero column appended to the state so it splits into two equal halves.
        self.padding = 2 * self.hidden_size - core.state_size

    def to_flat(self, state: tuple[Tensor, Tensor]) -> Tensor:
        """``(h, c)``, each ``(1, B, hidden_size)`` -> the core's flat ``(B, state_size)`` state."""
        h, c = state
        expected = (1, h.shape[1] if h.dim() == 3 else -1, self.hidden_size)
        if h.dim() != 3 or tuple(h.shape) != expected or tuple(c.shape) != expected:
            raise ValueError(
                f"the recurrent state must be a pair of tensors of shape (1, n_envs, {self.hidden_size}) "
                f"(this core's state of {self.state_size} floats, cut in two halves), got "
                f"{tuple(h.shape)} and {tuple(c.shape)}"
            )
        return torch.cat([h[0], c[0]], dim=1)[:, : self.state_size]

    def from_flat(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """The core's flat ``(B, state_size)`` state -> ``(h, c)``, each ``(1, B, hidden_size)``."""
        if self.padding:
            state = torch.cat([state, state.new_zeros(state.shape[0], self.padding)], dim=1)
        h, c = state.unsqueeze(0).split(self.hidden_size, dim=2)
        return h.contiguous(), c.contiguous()

    def forward(
        self,
        seq: Tensor,
        state: tuple[Tensor, Tensor] | None = None,
        episode_starts: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run the core over a sequence, ``nn.LSTM``-style.

        :param seq: ``(T, B, input_size)`` features.
        :param state: ``(h, c)`` entering step 0, each ``(1, B, hidden_size)``; None = the initial state.
        :param episode_starts: ``(T, B)``, true (or 1.0) where the state entering step t is reset to the
            initial state; None = no resets (how ``nn.LSTM`` is called).
        :return: ``(out, (h, c))`` with ``out`` of shape ``(T, B, output_size)``.
        """
        steps, batch = seq.shape[:2]
        flat = self.core.initial_state(batch, seq.device) if state is None else self.to_flat(state)
        if episode_starts is None:
            starts = torch.zeros(steps, batch, dtype=torch.bool, device=seq.device)
        else:
            starts = episode_starts.reshape(steps, batch).to(torch.bool)
        out, flat = self.core(seq.contiguous(), flat.contiguous(), starts)
        return out, self.from_flat(flat)


def _grid_layout(space: spaces.Space) -> str | None:
    """``"hwc"`` for a MiniGrid grid (H, W, 3), ``"chw"`` for one SB3 transposed to (3, H, W), else None."""
    if not (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3):
        return None
    if space.shape[-1] == 3 and max(space.shape[:2]) <= _MAX_GRID_SIDE:
        return "hwc"
    if space.shape[0] == 3 and max(space.shape[1:]) <= _MAX_GRID_SIDE:
        return "chw"
    return None


def _channel_last(space: spaces.Box) -> spaces.Box:
    """The (H, W, 3) space of a grid space SB3's ``VecTransposeImage`` turned into (3, H, W)."""
    return spaces.Box(low=np.transpose(space.low, (1, 2, 0)), high=np.transpose(space.high, (1, 2, 0)),
                      dtype=space.dtype)


class EncoderFeaturesExtractor(BaseFeaturesExtractor):
    """SB3 features extractor around this package's encoders (:func:`policies.encoders.make_encoder`).

    MiniGrid's symbolic grid gets the grid encoder (index embeddings read by a small CNN), stacked
    Atari frames the Nature CNN, flat vectors an MLP, and a Dict of grid and mission tokens both. SB3
    wraps envs with (H, W, 3) uint8 observations in ``VecTransposeImage``, so a grid arrives as
    (3, H, W): it is transposed back before the grid encoder reads it. The encoders scale their own
    inputs, so use it with ``normalize_images=False`` (SB3 would divide grid indices by 255).

    :param observation_space: the policy's observation space (after SB3's own wrapping).
    :raises ValueError: if no encoder of this package takes the space.
    """

    def __init__(self, observation_space: spaces.Space) -> None:
        # Keys (None for a non-Dict space) whose grid SB3 transposed to channel first.
        transposed: list[str | None] = []
        if isinstance(observation_space, spaces.Dict):
            subspaces = {}
            for key, sub in observation_space.spaces.items():
                if _grid_layout(sub) == "chw":
                    transposed.append(key)
                    sub = _channel_last(sub)
                subspaces[key] = sub
            encoder_space: spaces.Space = spaces.Dict(subspaces)
        elif _grid_layout(observation_space) == "chw":
            transposed.append(None)
            encoder_space = _channel_last(observation_space)
        else:
            encoder_space = observation_space
        encoder = make_encoder(encoder_space)
        super().__init__(observation_space, int(encoder.output_size))
        self.encoder = encoder
        self.transposed = tuple(transposed)

    def forward(self, observations: Tensor | dict[str, Tensor]) -> Tensor:
        """:param observations: a batch as SB3's ``preprocess_obs`` gives it. :return: ``(N, features_dim)``."""
        if isinstance(observations, dict):
            observations = {key: value.permute(0, 2, 3, 1) if key in self.transposed else value
                            for key, value in observations.items()}
        elif self.transposed:
            observations = observations.permute(0, 2, 3, 1)
        return self.encoder(observations)


class RecurrentCorePolicy(RecurrentActorCriticPolicy):
    """sb3-contrib's recurrent actor-critic with a core of this package in place of its LSTM.

    Use it as ``RecurrentPPO(RecurrentCorePolicy, env, policy_kwargs={"core": "rims", "core_kwargs": {...}})``.
    Every argument but the core ones is ``RecurrentActorCriticPolicy``'s; the LSTM's own
    (``lstm_hidden_size``, ``n_lstm_layers``, ``lstm_kwargs``) are replaced by ``core``/``core_kwargs``.
    The state sb3-contrib carries, saves and resets is the core's state (see :class:`CoreAsLSTM`).

    :param core: a core name of :data:`policies.cores.CORES` (lstm, gru, rims, brims, thalnet).
    :param core_kwargs: the core's constructor arguments (``input_size`` is the features width, set here),
        e.g. ``{"num_modules": 6, "module_size": 32, "k_active": 4}``; None = the core's defaults.
    :param features_extractor_class: by default :class:`EncoderFeaturesExtractor` (this package's encoders).
    :param normalize_images: False by default: this package's encoders scale their own inputs.
    :param shared_lstm: one core for actor and critic; the critic reads its output detached (sb3-contrib's
        semantics: only the actor's loss trains the core).
    :param enable_critic_lstm: a second core for the critic (the default, as sb3-contrib's own policies).
    :param core_revision: what a saved model records (``RecurrentPPO.load`` passes it back): the revision of
        the core's computation its weights were trained with; None (a new policy) skips the check.
    :raises ValueError: for an unknown core name or an argument the core does not take (one message), or
        ``normalize_images=True`` with this package's extractor.
    :raises CheckpointError: for a ``core_revision`` other than the one this version of the core computes.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        core: str = "rims",
        core_kwargs: Mapping[str, Any] | None = None,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        use_sde: bool = False,
        log_std_init: float = 0.0,
        full_std: bool = True,
        use_expln: bool = False,
        squash_output: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = EncoderFeaturesExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        share_features_extractor: bool = True,
        normalize_images: bool = False,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        shared_lstm: bool = False,
        enable_critic_lstm: bool = True,
        lstm_hidden_size: int | None = None,
        n_lstm_layers: int | None = None,
        lstm_kwargs: dict[str, Any] | None = None,
        core_revision: int | None = None,
    ) -> None:
        given = [name for name, value in (("lstm_hidden_size", lstm_hidden_size), ("n_lstm_layers", n_lstm_layers),
                                          ("lstm_kwargs", lstm_kwargs)) if value is not None]
        if given:  # sb3-contrib's LSTM arguments: a TypeError before, which did not say what to use instead
            raise ValueError(f"{', '.join(given)} belong(s) to sb3-contrib's LSTM; this policy's core takes "
                             f"core_kwargs instead (e.g. core='lstm', core_kwargs={{'hidden_size': 64}})")
        if shared_lstm and enable_critic_lstm:  # sb3-contrib asserts this; said here as the other argument errors are
            raise ValueError("shared_lstm=True needs enable_critic_lstm=False (one core for actor and critic, or a "
                             "second core for the critic, not both)")
        if not isinstance(core, str) or core not in CORES:
            raise ValueError(f"core must be one of {', '.join(map(repr, CORES))}, got {core!r}")
        if core_kwargs is not None and not isinstance(core_kwargs, Mapping):
            raise ValueError(f"core_kwargs must be a dict of the {core!r} core's arguments, got {core_kwargs!r}")
        if core_revision is not None:  # a saved model's (RecurrentPPO.load): its weights fit one computation only
            check_core_revision({"core": core, "core_revision": core_revision}, CORES[core].revision, "this saved model")
        if normalize_images and issubclass(features_extractor_class, EncoderFeaturesExtractor):
            raise ValueError("normalize_images=True would divide MiniGrid's grid indices by 255 before this "
                             "package's encoders read them (they scale their own inputs); leave it False")
        core_kwargs = dict(core_kwargs or {})
        if float(core_kwargs.get("dropout") or 0.0) > 0.0:
            # sb3-contrib collects rollouts in eval mode and trains in train mode, so with dropout the
            # PPO ratio is not 1 before the first update (shared/DESIGN.md, known pitfalls).
            warnings.warn("core dropout > 0: sb3-contrib collects rollouts with dropout off and trains with it "
                          "on, so PPO's ratio differs from 1 before the first update", stacklevel=2)
        # Read by _build_mlp_extractor, which the parent's constructor calls before it returns.
        self.core_name = core
        self.core_kwargs = core_kwargs
        self._separate_critic_core = enable_critic_lstm
        super().__init__(
            observation_space, action_space, lr_schedule, net_arch, activation_fn, ortho_init, use_sde,
            log_std_init, full_std, use_expln, squash_output, features_extractor_class, features_extractor_kwargs,
            share_features_extractor, normalize_images, optimizer_class, optimizer_kwargs,
            # The parent builds a throwaway nn.LSTM for each role; width 1 keeps it negligible.
            lstm_hidden_size=1, n_lstm_layers=1, shared_lstm=shared_lstm, enable_critic_lstm=enable_critic_lstm,
        )
        actor, critic = self._cores
        del self._cores
        self.lstm_actor = actor  # replaces the parent's throwaway LSTMs (and their parameters)
        self.lstm_critic = critic
        if self.critic is not None:  # the feed-forward critic maps features to the core's output width
            self.critic = nn.Linear(self.features_dim, actor.output_size)
        # predict() starts from zeros of this shape for each env: the core's initial state.
        self.lstm_hidden_state_shape = (actor.num_layers, 1, actor.hidden_size)
        # The parent's optimizer holds the throwaway LSTMs' parameters and not the cores'.
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _build_mlp_extractor(self) -> None:
        """Build the cores (the features width is known now), then the heads on the core's output width."""
        # A plain tuple, not registered: the parent's constructor would overwrite lstm_actor/lstm_critic.
        self._cores = tuple(
            CoreAsLSTM(make_core(self.core_name, self.features_dim, **self.core_kwargs)) if wanted else None
            for wanted in (True, self._separate_critic_core)
        )
        self.lstm_output_dim = self._cores[0].output_size
        super()._build_mlp_extractor()

    @staticmethod
    def _process_sequence(
        features: Tensor,
        lstm_states: tuple[Tensor, Tensor],
        episode_starts: Tensor,
        lstm: nn.Module,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run the recurrent module over a batch of sequences, as sb3-contrib's method of the same name.

        For a :class:`CoreAsLSTM` the episode starts go to the core, which resets and runs the whole
        sequence in one call (sb3-contrib loops over steps in Python when any start is present).

        :param features: ``(n_seq * T, features_dim)``, sequence by sequence.
        :param lstm_states: ``(h, c)`` entering each sequence, each ``(1, n_seq, hidden_size)``.
        :param episode_starts: ``(n_seq * T,)``, 1.0 where the state entering that step is reset.
        :param lstm: the adapter (or an ``nn.LSTM``, handed to sb3-contrib's own code).
        :return: ``(n_seq * T, output_size)`` outputs and the state after the last step.
        """
        if not isinstance(lstm, CoreAsLSTM):
            return RecurrentActorCriticPolicy._process_sequence(features, lstm_states, episode_starts, lstm)
        n_seq = lstm_states[0].shape[1]
        sequence = features.reshape((n_seq, -1, lstm.input_size)).swapaxes(0, 1)  # (T, n_seq, features)
        starts = episode_starts.reshape((n_seq, -1)).swapaxes(0, 1)
        out, state = lstm(sequence, lstm_states, starts)
        return torch.flatten(out.transpose(0, 1), start_dim=0, end_dim=1), state

    def _get_constructor_parameters(self) -> dict[str, Any]:
        """The constructor arguments ``policy.save``/``RecurrentCorePolicy.load`` rebuild the policy from."""
        data = super()._get_constructor_parameters()
        data.update(core=self.core_name, core_kwargs=self.core_kwargs, shared_lstm=self.shared_lstm,
                    enable_critic_lstm=self.enable_critic_lstm, core_revision=CORES[self.core_name].revision)
        return data
