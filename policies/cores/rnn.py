"""LSTM and GRU baselines behind the recurrent-core protocol.

Both wrap a one-layer ``nn.LSTM`` / ``nn.GRU`` and run its fused kernel over whole
stretches of the sequence: one kernel call per stretch between the time steps at
which some env resets, instead of one Python step per time step. An update's replay,
which needs no final state, runs the LSTM's episode pieces as padded columns of one
call instead (``FusedRNNCore.outputs``).

State layouts (flat, batch first):

* ``LSTMCore``: ``(B, 2H)`` = ``[h | c]``, hidden state then cell state.
* ``GRUCore``: ``(B, H)`` = ``h``.
"""

from __future__ import annotations

from itertools import pairwise
from typing import ClassVar

import torch
from torch import Tensor, nn

from policies.cores.base import RecurrentCore, check_positive_int, reset_state


class FusedRNNCore(RecurrentCore):
    """A one-layer ``nn.LSTM`` or ``nn.GRU`` (``rnn_class``) run with its fused sequence kernel.

    Subclasses only choose ``rnn_class`` and ``num_state_parts`` (how many ``(B, H)``
    tensors the cell carries: 2 for LSTM's ``h, c``, 1 for GRU's ``h``).

    :param input_size: width of the features fed to the core at each step.
    :param hidden_size: width ``H`` of the hidden state, which is also the output width.
    """

    rnn_class: ClassVar[type[nn.RNNBase]]
    num_state_parts: ClassVar[int]

    def __init__(self, input_size: int, hidden_size: int = 128) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.output_size = hidden_size
        self.state_size = self.num_state_parts * hidden_size
        # PyTorch's default initialisation (uniform in +-1/sqrt(H)); never all ones.
        self.rnn = self.rnn_class(input_size, hidden_size, num_layers=1)

    def _split_state(self, state: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Flat ``(B, parts*H)`` state -> what ``self.rnn`` takes: ``(1, B, H)`` tensor(s)."""
        parts = tuple(p.unsqueeze(0).contiguous() for p in state.split(self.hidden_size, dim=1))
        return parts if self.num_state_parts > 1 else parts[0]

    def _join_state(self, rnn_state: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """What ``self.rnn`` returns as state -> flat ``(B, parts*H)``."""
        parts = rnn_state if isinstance(rnn_state, tuple) else (rnn_state,)
        return torch.cat([p.squeeze(0) for p in parts], dim=1)

    def forward(
        self,
        x: Tensor,
        state: Tensor,
        episode_starts: Tensor,
        return_info: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Run the core over a sequence (same contract as ``RecurrentCore.forward``).

        :param x: inputs, shape ``(T, B, input_size)``.
        :param state: state entering step 0, shape ``(B, state_size)``.
        :param episode_starts: ``(T, B)`` bool; true resets that env's state before step t.
        :param return_info: also return an (empty) diagnostics dict.
        :return: ``(out, state)`` with out ``(T, B, hidden_size)``, or ``(out, state, {})``.
        """
        self.check_inputs(x, state, episode_starts)
        episode_starts = episode_starts.to(torch.bool)
        T = x.shape[0]
        # Segment boundaries: step 0 plus every later step at which any env resets.
        # One host read of the (T,) reset pattern, then one fused call per segment.
        reset_steps = episode_starts.any(dim=1).tolist()
        bounds = [0] + [t for t in range(1, T) if reset_steps[t]] + [T]
        # The state stays in the kernel's (1, B, H) layout between segments and is flattened once at the
        # end: a split and a join per segment cost ~10% of a minibatch's core time once episodes are short
        # (a segment at nearly every step). Copies and selections only, so the numbers are the same.
        rnn_state = self._split_state(state)
        outs: list[Tensor] = []
        for start, end in pairwise(bounds):
            if reset_steps[start]:
                rnn_state = self._reset_parts(rnn_state, episode_starts[start])
            out, rnn_state = self._run_rnn(x[start:end], rnn_state)
            outs.append(out)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        state = self._join_state(rnn_state)
        if return_info:
            return out, state, {}
        return out, state

    def outputs(self, x: Tensor, state: Tensor, episode_starts: Tensor) -> Tensor:
        """The outputs of ``forward`` (same values), without the final state: in one fused kernel call where
        that is cheaper than forward's call per stretch.

        ``forward`` makes one kernel call per stretch between resets: about 11 calls for a minibatch of
        16 chunks of 16 steps once DoorKey episodes are short, each costing ~0.7 ms forward and backward
        whatever its length (measured: 10 ms for 10 stretches, 3 ms for one). Here every episode piece (a
        stretch of one env between its resets) becomes a column of its own, left-aligned and zero-padded to
        T steps, and entering with the stored state (the env's first piece) or zeros (a piece that starts
        an episode); one call runs all columns (5.3 ms for those 10 stretches) and the outputs are gathered
        back to ``(T, B)``. Padding comes after a piece's last step, so it never reaches a kept output; it
        does spoil the kernel's final state, which is why this returns none.

        Each column's arithmetic is that of forward's calls, so the outputs are forward's (to the bit in
        float32 on this project's CPU for two or more envs, so the first update's replay still reproduces
        the rollout exactly; with one env, forward with autograd itself rounds differently from the
        rollout's inference, and the packed call matches the rollout); the weight gradients sum the same
        terms in another order, so they differ in rounding.
        """
        self.check_inputs(x, state, episode_starts)
        if self._forward_hooks or self._forward_pre_hooks:
            # A user's hook on the core (README, "look inside a step") fires where forward runs, as for every core.
            return self(x, state, episode_starts)[0]
        T = episode_starts.shape[0]
        starts = episode_starts.to(device="cpu", dtype=torch.bool)
        later_resets = int(starts[1:].sum())
        saved_calls = int(starts[1:].any(dim=1).sum())  # forward's calls beyond its first
        # Packing adds a padded column of T steps per reset and saves a call per reset time. A call costs
        # about as much as 80 (step, column) cells of an LSTM of 128 (forward and backward, one thread:
        # ~0.7-1 ms against ~10 us), and a cell's cost grows with the hidden size squared. Measured: 16-step
        # chunks (DoorKey, 11 reset times) and 8-64-step ones pack, 2-2.5x faster; whole 128-step sequences
        # of 2 envs, every env resetting at one step, and Atari's LSTM of 510 with an episode end in its
        # 128 steps ran faster as forward's calls, where the padding costs more than the calls it saves.
        if later_resets == 0 or later_resets * T * (self.hidden_size / 128) ** 2 > 80 * saved_calls:
            return self(x, state, episode_starts)[0]
        return self._packed_outputs(x, state, starts)

    def _packed_outputs(self, x: Tensor, state: Tensor, starts: Tensor) -> Tensor:
        """``outputs`` by one kernel call over the episode pieces as columns; ``starts`` on the CPU."""
        T, B = starts.shape
        # Pieces in env-major order: piece p of env b starts at step piece_step[p].
        piece_starts = starts.clone()
        piece_starts[0] = True
        piece_env, piece_step = piece_starts.T.nonzero(as_tuple=True)
        n_pieces = piece_env.numel()
        piece_of = (piece_starts.T.reshape(-1).cumsum(0) - 1).view(B, T).T  # (T, B): the piece holding step t
        position = torch.arange(T).unsqueeze(1) - piece_step[piece_of]  # (T, B): step within its piece
        steps = torch.arange(T * B).view(T, B)
        # Padded (T, pieces) layout <- (T, B) steps; index T*B is an appended zero row.
        source = torch.full((T, n_pieces), T * B, dtype=torch.long)
        source[position, piece_of] = steps
        # An env's first piece enters with its stored state, unless the env resets at step 0; others with zeros.
        entry = torch.where((piece_step == 0) & ~starts[0][piece_env], piece_env, B)
        target = position * n_pieces + piece_of  # (T, B) -> flat index into the padded output
        device = x.device
        source, entry, target = source.to(device), entry.to(device), target.to(device)

        features = torch.cat([x.reshape(T * B, -1), x.new_zeros(1, x.shape[-1])])
        padded = features.index_select(0, source.reshape(-1)).view(T, n_pieces, -1)
        zero_row = state.new_zeros(1, state.shape[1])
        entry_state = torch.cat([state, zero_row]).index_select(0, entry)
        out, _ = self._run_rnn(padded, self._split_state(entry_state))
        return out.reshape(T * n_pieces, -1).index_select(0, target.reshape(-1)).view(T, B, -1)

    def _run_rnn(self, x: Tensor, rnn_state: Tensor | tuple[Tensor, Tensor]
                 ) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        """``self.rnn(x, rnn_state)``: the same ATen kernel (``torch.lstm`` / ``torch.gru``) on the same
        weights, called directly. nn.LSTM's forward spends ~45 us a call on Python argument handling, a
        fifth of a rollout step's LSTM time; a minibatch calls it once per segment."""
        rnn = self.rnn
        weights = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
        if isinstance(rnn_state, tuple):
            out, h, c = torch.lstm(x, rnn_state, weights, True, 1, 0.0, self.training, False, False)
            return out, (h, c)
        return torch.gru(x, rnn_state, weights, True, 1, 0.0, self.training, False, False)

    @staticmethod
    def _reset_parts(rnn_state: Tensor | tuple[Tensor, Tensor], starts: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """``reset_state`` for the kernel's ``(1, B, H)`` state part(s)."""
        if isinstance(rnn_state, tuple):
            return tuple(reset_state(part, starts, batch_dim=1) for part in rnn_state)
        return reset_state(rnn_state, starts, batch_dim=1)


class LSTMCore(FusedRNNCore):
    """One-layer LSTM baseline; state ``(B, 2*hidden_size)`` = ``[h | c]``, output ``h``.

    :param input_size: width of the features fed to the core at each step.
    :param hidden_size: width of ``h`` and ``c`` (and of the output).
    """

    rnn_class = nn.LSTM
    num_state_parts = 2


class GRUCore(FusedRNNCore):
    """One-layer GRU baseline; state ``(B, hidden_size)`` = ``h``, output ``h``.

    :param input_size: width of the features fed to the core at each step.
    :param hidden_size: width of ``h`` (and of the output).
    """

    rnn_class = nn.GRU
    num_state_parts = 1
    # torch's CPU GRU gains nothing from the one packed call (16 chunks of 16 steps with 10 stretches,
    # forward and backward: 7.3 ms packed, 7.5 ms per stretch), so it keeps forward's calls and numerics.
    outputs = RecurrentCore.outputs
