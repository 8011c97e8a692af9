"""A faster, bit-for-bit identical replacement for ``MiniGridEnv.gen_obs``.

MiniGrid builds every partial observation by slicing the grid into a new
``Grid`` (allocating a fresh ``Wall()`` for each out-of-bounds cell),
rotating it ``agent_dir + 1`` times cell by cell, running ``process_vis``
with scalar numpy indexing and finally encoding cell by cell into numpy.
That costs ~400-800 us per step and dominates the env step.

:class:`FastGenObs` produces the same dict (``image``, ``direction``,
``mission``) directly:

* a per-(view size, direction) table, computed once by replaying
  ``Grid.rotate_left`` on cell labels, maps every cell of the final view
  to its cell of the un-rotated slice, so the view is read straight from
  the flat ``grid.grid`` list (no intermediate grids);
* the visibility mask is MiniGrid's ``process_vis`` propagation, run on a
  flat Python list of booleans in the same order with the same tests;
* visible cells are encoded with each object's own ``encode()`` (object
  state such as a door's open/locked flags lives in the objects, so asking
  them every step is what keeps the result exact without any cache to
  invalidate), and the image is built in one go from a byte buffer.

The observation is the same whatever the env does to its grid, because
nothing is cached between steps. Only the grid's cells inside the view are
touched, so the cost does not grow with the grid size (BabyAI's 22x22 levels
cost the same as a 5x5 room).

Installation is per instance (:func:`install_fast_obs`): the env's
``gen_obs`` attribute is shadowed by a :class:`FastGenObs` object, which is
a plain module-level class holding the env, so the env stays picklable and
deep-copyable and works in ``SubprocVecEnv``.
"""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
import numpy as np
from minigrid.core.constants import OBJECT_TO_IDX
from minigrid.core.grid import Grid
from minigrid.core.world_object import Wall
from minigrid.minigrid_env import MiniGridEnv

__all__ = ["FastGenObs", "fast_gen_obs", "install_fast_obs", "supports_fast_obs", "view_layout"]

# Encoding MiniGrid's Grid.encode writes for an empty visible cell (None).
_EMPTY_ENC: tuple[int, int, int] = (OBJECT_TO_IDX["empty"], 0, 0)
# Encoding of a cell the agent cannot see (Grid.encode leaves zeros there).
_UNSEEN_ENC: tuple[int, int, int] = (0, 0, 0)
# Grid.slice puts a fresh ``Wall()`` in every out-of-bounds cell. One shared
# instance is enough here: it is only asked ``encode()`` and ``see_behind()``,
# never stored in the env's grid or mutated.
_OUT_OF_BOUNDS = Wall()


@functools.lru_cache(maxsize=None)
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


def fast_gen_obs(env: MiniGridEnv) -> dict[str, Any]:
    """Compute ``env.gen_obs()`` exactly as MiniGrid does, but without building grids.

    Args:
        env: the unwrapped MiniGrid/BabyAI env, after ``reset`` (its grid,
            agent position and direction set).

    Returns:
        ``{"image": (view, view, 3) uint8, "direction": env.agent_dir,
        "mission": env.mission}``, equal to MiniGrid's own ``gen_obs()``.
    """
    grid = env.grid
    if type(grid) is not Grid:
        # A Grid subclass might change slice/encode/process_vis: stay exact.
        return type(env).gen_obs(env)
    vs = env.agent_view_size
    top_x, top_y, _, _ = env.get_view_exts(None)
    # agent_pos is often a tuple of numpy ints; plain ints make the loops below faster.
    top_x, top_y = int(top_x), int(top_y)
    width, height = grid.width, grid.height
    cells_flat = grid.grid

    # Gather the view in its final (rotated) order; out-of-bounds cells are walls.
    cells: list[Any] = []
    append = cells.append
    for sx, sy in view_layout(vs, env.agent_dir):
        x = top_x + sx
        y = top_y + sy
        if 0 <= x < width and 0 <= y < height:
            append(cells_flat[y * width + x])
        else:
            append(_OUT_OF_BOUNDS)

    n = vs * vs
    agent_k = (vs // 2) * vs + (vs - 1)  # view position (vs // 2, vs - 1), flat
    if not env.see_through_walls:
        # Grid.process_vis, with mask[i, j] stored at mask[i * vs + j]. It runs
        # on the sliced grid *before* the carried object replaces the agent's
        # cell, so the cell under the agent (e.g. an open door) counts here.
        mask = [False] * n
        mask[agent_k] = True
        for j in range(vs - 1, -1, -1):
            for i in range(0, vs - 1):
                k = i * vs + j
                if not mask[k]:
                    continue
                cell = cells[k]
                if cell and not cell.see_behind():
                    continue
                mask[k + vs] = True  # (i + 1, j)
                if j > 0:
                    mask[k + vs - 1] = True  # (i + 1, j - 1)
                    mask[k - 1] = True  # (i, j - 1)
            for i in range(vs - 1, 0, -1):
                k = i * vs + j
                if not mask[k]:
                    continue
                cell = cells[k]
                if cell and not cell.see_behind():
                    continue
                mask[k - vs] = True  # (i - 1, j)
                if j > 0:
                    mask[k - vs - 1] = True  # (i - 1, j - 1)
                    mask[k - 1] = True  # (i, j - 1)
    else:
        mask = [True] * n

    # gen_obs_grid: the agent sees what it carries, in its own cell.
    carrying = env.carrying
    cells[agent_k] = carrying if carrying else None

    # Grid.encode(vis_mask): visible cells get their encoding (empty for None),
    # the others stay zero.
    flat: list[int] = []
    extend = flat.extend
    for k in range(n):
        if mask[k]:
            cell = cells[k]
            extend(_EMPTY_ENC if cell is None else cell.encode())
        else:
            extend(_UNSEEN_ENC)
    # bytearray keeps the array writable, as MiniGrid's np.zeros-based one is.
    image = np.frombuffer(bytearray(flat), dtype=np.uint8).reshape(vs, vs, 3)
    return {"image": image, "direction": env.agent_dir, "mission": env.mission}


class FastGenObs:
    """Callable that replaces ``gen_obs`` on one MiniGrid env instance.

    MiniGrid's ``step``/``reset`` call ``self.gen_obs()``; an instance
    attribute of that name shadows the class method, so they call this
    instead. A plain class (not a bound method, lambda or closure) keeps the
    env picklable: pickle and deepcopy store it as an object holding a
    reference back to the env, a cycle they both handle.

    Args:
        env: the unwrapped MiniGrid env whose observations this computes.
    """

    __slots__ = ("env",)

    def __init__(self, env: MiniGridEnv) -> None:
        self.env = env

    def __call__(self) -> dict[str, Any]:
        return fast_gen_obs(self.env)

    def __getstate__(self) -> dict[str, Any]:
        return {"env": self.env}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.env = state["env"]


def supports_fast_obs(env: gym.Env) -> bool:
    """Whether :class:`FastGenObs` reproduces this env's observations.

    Args:
        env: a MiniGrid/BabyAI env, wrapped or not.

    Returns:
        True when the unwrapped env is a ``MiniGridEnv`` whose class keeps
        MiniGrid's own ``gen_obs`` and ``gen_obs_grid`` (a subclass that
        overrides either computes something else, so it keeps its own).
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
