"""A faster, bit-for-bit identical replacement for ``MiniGridEnv.gen_obs``.

MiniGrid builds every partial observation by slicing the grid into a new
``Grid`` (allocating a fresh ``Wall()`` for each out-of-bounds cell),
rotating it ``agent_dir + 1`` times cell by cell, running ``process_vis``
with scalar numpy indexing and encoding the result cell by cell. That costs
~300-800 us per step and dominates the env step.

:class:`FastGenObs` returns the same dict (``image``, ``direction``,
``mission``) from a cached encoding of the whole grid:

* At every reset (and whenever the env swaps its ``Grid`` or view size) the
  grid is encoded once into a ``[x, y, 3]`` uint8 array, padded on every
  side with ``view_size - 1`` walls because ``Grid.slice`` shows
  out-of-bounds cells as ``Wall()``; a parallel ``[x, y]`` array holds each
  cell's opacity (``cell and not cell.see_behind()``, the test of
  ``Grid.process_vis``).
* Each step, cells whose object changed (pickup, drop, moving obstacles...)
  are found by comparing ``grid.grid`` with a snapshot of the objects (a
  C-speed identity comparison of two lists) and re-encoded. Objects whose
  encoding can change in place (doors: open/locked; any class with its own
  ``encode``/``see_behind``) are re-encoded whenever they are in view.
  Objects using ``WorldObj.encode`` are assumed not to change ``type`` or
  ``color`` in the middle of an episode (no MiniGrid/BabyAI env does;
  BabyAI's GoToRedBallGrey recolours its distractors during reset, before
  the cache is built).
* The view is a ``view_size`` square window of the padded array; the
  ``agent_dir + 1`` left rotations of ``gen_obs_grid`` become a transpose
  and flips (:func:`view_transform`, checked against a literal replay of
  ``Grid.rotate_left`` in :func:`view_layout`), then one copy.
* The visibility mask is MiniGrid's ``process_vis`` propagation
  (:func:`process_vis_flat`), which depends only on the opacity of the
  window's cells; the hidden cells are memoised per opacity window (a
  bounded cache: the same local wall layouts come back again and again)
  and zeroed with one fancy-index assignment.
* The carried object (or empty) is written in the agent's cell, as
  ``gen_obs_grid`` does.

Cost: ~9 us per observation against ~170-400 us for MiniGrid's (7x7 view),
independent of the grid size.

:func:`gen_obs_uncached` is a simpler, cache-free version of the same
computation, used when the cache cannot be (an agent outside its grid) and
as an independent check in the tests.

Installation is per instance (:func:`install_fast_obs`): the env's
``gen_obs`` attribute shadows the class method with a :class:`FastGenObs`
object. That is a plain module-level class holding the env, whose pickled
state is the env alone (the cache is rebuilt on the next call), so envs stay
picklable and deep-copyable and work in ``SubprocVecEnv``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from minigrid.core.constants import OBJECT_TO_IDX
from minigrid.core.grid import Grid
from minigrid.core.world_object import Wall, WorldObj
from minigrid.minigrid_env import MiniGridEnv

__all__ = [
    "FastGenObs",
    "gen_obs_uncached",
    "install_fast_obs",
    "process_vis_flat",
    "supports_fast_obs",
    "view_layout",
    "view_transform",
]

# Encoding MiniGrid's Grid.encode writes for an empty visible cell (None).
_EMPTY_ENC: tuple[int, int, int] = (OBJECT_TO_IDX["empty"], 0, 0)
# Encoding of a cell the agent cannot see (Grid.encode leaves zeros there).
_UNSEEN_ENC: tuple[int, int, int] = (0, 0, 0)
# Grid.slice puts a fresh ``Wall()`` in every out-of-bounds cell. One shared
# instance is enough here: it is only asked ``encode()`` and ``see_behind()``,
# never stored in the env's grid or mutated.
_OUT_OF_BOUNDS = Wall()
_WALL_ENC: tuple[int, int, int] = tuple(int(v) for v in _OUT_OF_BOUNDS.encode())  # type: ignore[assignment]
# Hidden-cell indices memoised per (view size, direction, opacity window);
# cleared when it reaches this many entries (<= ~1.3 kB each for a 7x7 view)
# so memory stays bounded (~20 MB per process). Random play meets ~50 windows
# on DoorKey-5x5, ~1,000 on BabyAI-BossLevel and ~4,500 on MultiRoom-N6 in
# 30k steps.
_VIS_CACHE_MAX = 1 << 14
_vis_cache: dict[tuple[int, int, bytes], np.ndarray | None] = {}


@functools.cache
def view_layout(view_size: int, agent_dir: int) -> tuple[tuple[int, int], ...]:
    """Where each cell of the agent's rotated view comes from in the un-rotated slice.

    MiniGrid's ``gen_obs_grid`` slices the ``view_size`` x ``view_size``
    square at ``get_view_exts()`` and then calls ``Grid.rotate_left``
    ``agent_dir + 1`` times. This replays those rotations on cell labels.

    Args:
        view_size: the agent's view size (``env.agent_view_size``, odd, >= 3).
        agent_dir: the agent's direction (0 right, 1 down, 2 left, 3 up).

    Returns:
        ``view_size ** 2`` pairs ``(sx, sy)`` in image order (flat index
        ``i * view_size + j`` for ``image[i, j]``): the view cell ``(i, j)``
        shows the grid cell ``(topX + sx, topY + sy)``.
    """
    # cur[x][y] = slice label of the cell at column x, row y (as Grid.get(x, y)).
    cur = [[(sx, sy) for sy in range(view_size)] for sx in range(view_size)]
    for _ in range(agent_dir + 1):
        width, height = len(cur), len(cur[0])
        new: list[list[Any]] = [[None] * width for _ in range(height)]
        for i in range(width):
            for j in range(height):
                # Grid.rotate_left: grid.set(j, grid.height - 1 - i, self.get(i, j)),
                # where the new grid's height is the old width.
                new[j][width - 1 - i] = cur[i][j]
        cur = new
    return tuple(cur[i][j] for i in range(view_size) for j in range(view_size))


@functools.cache
def view_transform(view_size: int, agent_dir: int) -> tuple[bool, slice, slice]:
    """The numpy view operations that turn the un-rotated slice into the agent's view.

    The ``agent_dir + 1`` left rotations of ``gen_obs_grid`` are a symmetry
    of the square, i.e. an optional transpose followed by optional flips;
    this finds which one reproduces :func:`view_layout` exactly.

    Args:
        view_size: the agent's view size.
        agent_dir: the agent's direction (0-3).

    Returns:
        ``(transpose, s0, s1)``: the view of an array ``w`` indexed
        ``[x, y, ...]`` over the slice is ``(w.swapaxes(0, 1) if transpose
        else w)[s0, s1]``.
    """
    labels = np.arange(view_size * view_size).reshape(view_size, view_size)  # labels[sx, sy]
    want = np.array([sx * view_size + sy for sx, sy in view_layout(view_size, agent_dir)]).reshape(view_size, view_size)
    keep, flip = slice(None), slice(None, None, -1)
    for transpose in (False, True):
        for s0 in (keep, flip):
            for s1 in (keep, flip):
                if np.array_equal((labels.T if transpose else labels)[s0, s1], want):
                    return transpose, s0, s1
    raise AssertionError(f"no square symmetry matches the view of direction {agent_dir}")


def process_vis_flat(opaque: Sequence[int], view_size: int) -> list[bool]:
    """MiniGrid's ``Grid.process_vis`` on a flat opacity pattern.

    Args:
        opaque: ``view_size ** 2`` flags in image order (index
            ``i * view_size + j`` for view cell ``(i, j)``); non-zero where
            the cell blocks the view (``cell and not cell.see_behind()``).
            The agent's own cell is the one in the sliced grid (what the
            agent stands on), as ``process_vis`` runs before the carried
            object is put there.
        view_size: the agent's view size.

    Returns:
        The visibility mask, same layout, True where the agent sees the cell.
    """
    vs = view_size
    mask = [False] * (vs * vs)
    mask[(vs // 2) * vs + (vs - 1)] = True  # the agent, at (vs // 2, vs - 1)
    # Same loops, order and updates as process_vis; mask[i, j] is mask[i * vs + j].
    for j in range(vs - 1, -1, -1):
        for i in range(0, vs - 1):
            k = i * vs + j
            if not mask[k] or opaque[k]:
                continue
            mask[k + vs] = True  # (i + 1, j)
            if j > 0:
                mask[k + vs - 1] = True  # (i + 1, j - 1)
                mask[k - 1] = True  # (i, j - 1)
        for i in range(vs - 1, 0, -1):
            k = i * vs + j
            if not mask[k] or opaque[k]:
                continue
            mask[k - vs] = True  # (i - 1, j)
            if j > 0:
                mask[k - vs - 1] = True  # (i - 1, j - 1)
                mask[k - 1] = True  # (i, j - 1)
    return mask


def _is_opaque(cell: WorldObj | None) -> int:
    # The exact test of Grid.process_vis (truthiness included).
    return 1 if cell and not cell.see_behind() else 0


def gen_obs_uncached(env: MiniGridEnv) -> dict[str, Any]:
    """Compute ``env.gen_obs()`` exactly as MiniGrid does, without building grids or caches.

    Reads the view's objects straight from ``env.grid.grid`` and encodes
    them with their own ``encode()``; about 4x faster than MiniGrid and
    about 4x slower than :class:`FastGenObs`. Used by :class:`FastGenObs`
    when its padded grid cannot hold the view (an agent outside its grid).

    Args:
        env: the unwrapped MiniGrid/BabyAI env, after ``reset``.

    Returns:
        ``{"image": (view, view, 3) uint8, "direction": env.agent_dir,
        "mission": env.mission}``, equal to MiniGrid's own ``gen_obs()``.
    """
    grid = env.grid
    vs = env.agent_view_size
    top_x, top_y, _, _ = env.get_view_exts(None)
    top_x, top_y = int(top_x), int(top_y)
    width, height = grid.width, grid.height
    cells_flat = grid.grid
    cells: list[Any] = []
    for sx, sy in view_layout(vs, env.agent_dir):
        x, y = top_x + sx, top_y + sy
        cells.append(cells_flat[y * width + x] if 0 <= x < width and 0 <= y < height else _OUT_OF_BOUNDS)
    if env.see_through_walls:
        mask = [True] * (vs * vs)
    else:
        mask = process_vis_flat([_is_opaque(c) for c in cells], vs)
    carrying = env.carrying
    cells[(vs // 2) * vs + (vs - 1)] = carrying if carrying else None
    flat: list[int] = []
    for k, cell in enumerate(cells):
        if mask[k]:
            flat.extend(_EMPTY_ENC if cell is None else cell.encode())
        else:
            flat.extend(_UNSEEN_ENC)
    # bytearray keeps the array writable, as MiniGrid's np.zeros-based one is.
    image = np.frombuffer(bytearray(flat), dtype=np.uint8).reshape(vs, vs, 3)
    return {"image": image, "direction": env.agent_dir, "mission": env.mission}


@functools.cache
def _is_static_class(cls: type) -> bool:
    """Whether objects of ``cls`` encode and occlude from ``type``/``color`` alone.

    True for Wall, Goal, Floor, Lava, Key, Ball, Box; False for Door (open
    and locked flags) and for any class with its own ``encode``,
    ``see_behind`` or truthiness, which are re-read every step.
    """
    return (
        cls.encode is WorldObj.encode
        and cls.see_behind in (WorldObj.see_behind, Wall.see_behind)
        and not hasattr(cls, "__bool__")
        and not hasattr(cls, "__len__")
    )


def _encode_cell(cell: WorldObj | None) -> tuple[tuple[int, int, int], int]:
    """(Grid.encode's 3 values, process_vis opacity flag) of one grid cell."""
    if cell is None:
        return _EMPTY_ENC, 0
    return tuple(cell.encode()), _is_opaque(cell)  # type: ignore[return-value]


class FastGenObs:
    """Callable that replaces ``gen_obs`` on one MiniGrid env instance.

    MiniGrid's ``step``/``reset`` call ``self.gen_obs()``; an instance
    attribute of that name shadows the class method, so they call this
    instead. It keeps an encoded, wall-padded copy of the env's grid (see the
    module docstring); only the env is pickled or deep-copied, the cache is
    rebuilt on the next call.

    Args:
        env: the unwrapped MiniGrid env whose observations this computes.
    """

    def __init__(self, env: MiniGridEnv) -> None:
        self.env = env
        self._clear()

    def _clear(self) -> None:
        self._grid: Grid | None = None  # the Grid the cache encodes
        self._view_size = 0  # agent_view_size when encoded (sets the padding)
        self._width = 0  # grid size when encoded
        self._height = 0
        self._pad = 0  # walls added on each side
        self._snapshot: list[WorldObj | None] = []  # grid.grid objects when last encoded
        self._enc: np.ndarray = np.zeros((0, 0, 3), np.uint8)  # padded [x, y] -> Grid.encode values
        self._opaque: np.ndarray = np.zeros((0, 0), np.uint8)  # padded [x, y] -> process_vis flag
        # grid.grid index -> [object, padded x, padded y, encoding, opacity] of the
        # objects whose encoding can change in place; refreshed when in view.
        self._dynamic: dict[int, list[Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"env": self.env}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.env = state["env"]
        self._clear()

    # -- cache maintenance -------------------------------------------------

    def _rebuild(self, grid: Grid, view_size: int) -> None:
        """Encode the whole grid, padded with ``view_size - 1`` walls on each side.

        Args:
            grid: the env's current grid.
            view_size: the agent's view size (sets the padding).
        """
        pad = view_size - 1  # the view never reaches further out than this
        width, height = grid.width, grid.height
        enc = np.empty((width + 2 * pad, height + 2 * pad, 3), dtype=np.uint8)
        enc[:] = _WALL_ENC
        opaque = np.ones(enc.shape[:2], dtype=np.uint8)  # out-of-bounds walls block the view
        self._grid, self._view_size, self._width, self._height, self._pad = grid, view_size, width, height, pad
        self._dynamic = {}
        cells = list(grid.grid)
        inner_enc, inner_opaque = [], []
        for k, cell in enumerate(cells):
            code, opq = _encode_cell(cell)
            inner_enc.append(code)
            inner_opaque.append(opq)
            self._track(k, cell, code, opq)
        # grid.grid is row-major (index y * width + x); the padded arrays are [x, y].
        enc[pad : pad + width, pad : pad + height] = (
            np.array(inner_enc, dtype=np.uint8).reshape(height, width, 3).swapaxes(0, 1)
        )
        opaque[pad : pad + width, pad : pad + height] = np.array(inner_opaque, dtype=np.uint8).reshape(height, width).T
        self._enc, self._opaque, self._snapshot = enc, opaque, cells

    def _track(self, k: int, cell: WorldObj | None, code: tuple[int, int, int], opq: int) -> None:
        """Remember ``grid.grid[k]`` for per-step refreshes if its encoding can change in place."""
        if cell is not None and not _is_static_class(type(cell)):
            y, x = divmod(k, self._width)
            self._dynamic[k] = [cell, x + self._pad, y + self._pad, code, opq]

    def _update_cells(self, cells: list[WorldObj | None]) -> None:
        """Re-encode the cells of ``grid.grid`` whose object is not the one encoded."""
        snapshot = self._snapshot
        for k, cell in enumerate(cells):
            if cell is not snapshot[k]:
                code, opq = _encode_cell(cell)
                y, x = divmod(k, self._width)
                self._enc[x + self._pad, y + self._pad] = code
                self._opaque[x + self._pad, y + self._pad] = opq
                self._dynamic.pop(k, None)
                self._track(k, cell, code, opq)
        self._snapshot = list(cells)

    # -- observation -------------------------------------------------------

    def __call__(self) -> dict[str, Any]:
        """The observation dict, equal to MiniGrid's ``gen_obs()``."""
        env = self.env
        grid = env.grid
        if type(grid) is not Grid:
            # A Grid subclass might change slice/encode/process_vis: stay exact.
            return type(env).gen_obs(env)
        vs = env.agent_view_size
        if (
            grid is not self._grid
            or vs != self._view_size
            or env.step_count == 0  # every reset: the level may be rebuilt in place
            or grid.width != self._width
            or grid.height != self._height
            or len(grid.grid) != len(self._snapshot)
        ):
            self._rebuild(grid, vs)
        elif grid.grid != self._snapshot:  # identity comparison first, at C speed
            self._update_cells(grid.grid)

        top_x, top_y, _, _ = env.get_view_exts(None)
        x0, y0 = int(top_x) + self._pad, int(top_y) + self._pad
        x1, y1 = x0 + vs, y0 + vs
        enc, opaque = self._enc, self._opaque
        if x0 < 0 or y0 < 0 or x1 > enc.shape[0] or y1 > enc.shape[1]:
            # Agent outside its grid: the padding does not cover the view.
            return gen_obs_uncached(env)

        # Objects that can change in place (a door opened or unlocked): only
        # those in view are read now; the others are refreshed when they are.
        for entry in self._dynamic.values():
            cell, x, y = entry[0], entry[1], entry[2]
            if x0 <= x < x1 and y0 <= y < y1:
                code, opq = tuple(cell.encode()), _is_opaque(cell)
                if code != entry[3] or opq != entry[4]:
                    entry[3], entry[4] = code, opq
                    enc[x, y] = code
                    opaque[x, y] = opq

        agent_dir = env.agent_dir
        transpose, s0, s1 = view_transform(vs, agent_dir)
        window = enc[x0:x1, y0:y1]
        image = (window.swapaxes(0, 1) if transpose else window)[s0, s1].copy()  # C-contiguous, as MiniGrid's
        if not env.see_through_walls:
            # The mask depends only on the opacity of the view's cells, so it is
            # memoised per (view size, direction, un-rotated opacity window).
            opaque_window = opaque[x0:x1, y0:y1]
            key = (vs, agent_dir, opaque_window.tobytes())
            hidden = _vis_cache.get(key, False)
            if hidden is False:
                in_view = (opaque_window.T if transpose else opaque_window)[s0, s1]
                mask = process_vis_flat(in_view.ravel().tolist(), vs)
                # Flat positions in image.ravel() of the hidden cells' 3 values; None if none.
                hidden_cells = [k for k, seen in enumerate(mask) if not seen]
                hidden = (
                    np.array([3 * k + c for k in hidden_cells for c in range(3)], dtype=np.intp)
                    if hidden_cells
                    else None
                )
                if len(_vis_cache) >= _VIS_CACHE_MAX:
                    _vis_cache.clear()
                _vis_cache[key] = hidden
            if hidden is not None:
                image.reshape(-1)[hidden] = 0  # Grid.encode leaves hidden cells at zero
        # gen_obs_grid: the agent sees what it carries, in its own cell.
        carrying = env.carrying
        image[vs // 2, vs - 1] = carrying.encode() if carrying else _EMPTY_ENC
        return {"image": image, "direction": agent_dir, "mission": env.mission}


def supports_fast_obs(env: gym.Env) -> bool:
    """Whether :class:`FastGenObs` reproduces this env's observations.

    Args:
        env: a MiniGrid/BabyAI env, wrapped or not.

    Returns:
        True when the unwrapped env is a ``MiniGridEnv`` whose class keeps
        MiniGrid's own ``gen_obs`` and ``gen_obs_grid`` (a subclass that
        overrides either computes something else, so it keeps its own). A
        grid that is not exactly a ``Grid`` is checked at every call and
        also falls back to MiniGrid's ``gen_obs``.
    """
    base = env.unwrapped
    if not isinstance(base, MiniGridEnv):
        return False
    cls = type(base)
    return cls.gen_obs is MiniGridEnv.gen_obs and cls.gen_obs_grid is MiniGridEnv.gen_obs_grid


def install_fast_obs(env: gym.Env) -> bool:
    """Make the unwrapped env use :class:`FastGenObs` for its observations.

    Idempotent; does nothing (and returns False) for envs that
    :func:`supports_fast_obs` rejects, which keep MiniGrid's ``gen_obs``.

    Args:
        env: a MiniGrid/BabyAI env, wrapped or not; the attribute is set on
            ``env.unwrapped``.

    Returns:
        True if the fast observation is in use.
    """
    if not supports_fast_obs(env):
        return False
    base = env.unwrapped
    if not isinstance(vars(base).get("gen_obs"), FastGenObs):
        base.gen_obs = FastGenObs(base)
    return True
