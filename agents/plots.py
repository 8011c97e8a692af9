"""Plots of what a recurrent core did during an episode, and of evaluation results.

Figures are built as bare ``matplotlib.figure.Figure`` objects, never through pyplot's
global state, so saving PNGs works headless (Agg canvas) and a notebook with the
inline backend still shows a returned figure.

A *trace* is what ``agents.evaluation.evaluate_policy(..., record_info=True)`` returns
under ``"trace"`` (or what a notebook collects from ``policy.act(..., return_info=True)``):
a dict of numpy arrays with time first, for one env::

    active{l}           (T, K) bool        RIMs (l = "") / BRIMs layer l (l = "_0", "_1", ...)
    input_attention{l}  (T, K, slots)      slot 0 is the null slot, slot 1 the input (bottom-up),
                                           slot 2 (BRIMs) the top-down input
    read_weights        (T, M, S)          ThalNet: how much module m reads from center position s
    state_norm          (T,)               norm of the recurrent state after each step
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

__all__ = ["episode_caption", "plot_bars", "plot_episode_info", "plot_probability_of_improvement", "save_figure",
           "save_figure_atomic", "write_png"]

_ACTIVE_KEY = re.compile(r"^active(_\d+)?$")
# ThalNet modules shown one panel each; beyond this the panels would be unreadable.
MAX_READ_PANELS = 8
# Module on/off: two colours with a key, not a 0-1 colour scale (there is nothing in between).
INACTIVE_COLOUR, ACTIVE_COLOUR = "#e6e6e6", "#1f4e9c"
# Behaviour events (agents.evaluation's words) -> line colour; others are grey.
EVENT_COLOURS = {"picks up key": "#c8a000", "opens door": "#8b4513", "reaches goal": "#2ca02c",
                 "steps into lava": "#d62728"}


def _layer_suffixes(trace: dict[str, np.ndarray]) -> list[str]:
    """``[""]`` for RIMs, ``["_0", "_1", ...]`` for BRIMs (in layer order), ``[]`` for other cores."""
    suffixes = [m.group(1) or "" for key in trace if (m := _ACTIVE_KEY.match(key))]
    return sorted(suffixes, key=lambda s: int(s[1:]) if s else -1)


def _heatmap(fig: Figure, ax: Axes, data: np.ndarray, title: str, ylabel: str, colorbar_label: str,
             vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis") -> None:
    """Draw ``data`` (rows x time) with time on the x axis and a labelled colour bar."""
    image = ax.imshow(data, aspect="auto", interpolation="nearest", origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_ylabel(ylabel)
    if data.shape[0] <= 16:  # one tick per module while they are readable
        ax.set_yticks(range(data.shape[0]))
    bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03)
    bar.set_label(colorbar_label, fontsize=8)


def _on_off(ax: Axes, active: np.ndarray, title: str) -> None:
    """Draw which modules were active (rows x time, bool) in two colours, with a key."""
    cmap = ListedColormap([INACTIVE_COLOUR, ACTIVE_COLOUR])
    ax.imshow(active.astype(float), aspect="auto", interpolation="nearest", origin="lower", cmap=cmap,
              norm=BoundaryNorm([-0.5, 0.5, 1.5], cmap.N))
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_ylabel("module")
    if active.shape[0] <= 16:
        ax.set_yticks(range(active.shape[0]))
    # The key sits above the panel, right of its title: beside it, it would push every colour bar
    # below out to the right.
    ax.legend(handles=[Patch(facecolor=ACTIVE_COLOUR, label="active"),
                       Patch(facecolor=INACTIVE_COLOUR, edgecolor="#999999", label="inactive")],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, fontsize=8, frameon=False,
              borderaxespad=0.1, handlelength=1.2)


def episode_caption(episode: dict[str, Any], episodes: int | None = None) -> str:
    """One line on the episode a figure shows: which one, its return, success, length, how it ended.

    :param episode: ``{"index", "return", "length", "success" (None if unknown), "truncated"}``
        (``evaluate_policy``'s ``"first_episode"``).
    :param episodes: how many episodes the evaluation ran, if it is worth saying.
    """
    index = episode.get("index", 0)
    which = f"episode {index}" + (f" of {episodes} (seeded; the first)" if episodes and index == 0 else
                                  f" of {episodes}" if episodes else "")
    parts = [which]
    if episode.get("return") is not None:
        parts.append(f"return {episode['return']:.2f}")
    if episode.get("success") is not None:
        parts.append("success" if episode["success"] else "no success")
    if episode.get("length") is not None:
        parts.append(f"{episode['length']} steps")
    if episode.get("truncated") is not None:
        parts.append("timed out (truncated at the step limit)" if episode["truncated"]
                     else "ended by the env (terminated)")
    return ", ".join(parts)


def _event_kinds(events: Sequence[tuple[int, str]]) -> list[str]:
    """The kinds of events, in order of first occurrence."""
    return list(dict.fromkeys(what for _, what in events))


def _draw_events(fig: Figure, strip: Axes, axes: Sequence[Axes], events: Sequence[tuple[int, str]]) -> None:
    """Behaviour events: every one as a tick on its kind's row of the top strip; the first key pickup,
    door opening, goal (or lava) as a dashed line across every panel, named in a legend.

    Only first occurrences cross the panels: a weakly trained agent picks the key up and drops it
    dozens of times in one episode, and a line (or a label) for each would hide the panels.
    """
    kinds = _event_kinds(events)
    colours = {what: EVENT_COLOURS.get(what, "#7f7f7f") for what in kinds}
    strip.set_title("what the agent did", fontsize=9, loc="left")
    for row, what in enumerate(kinds):
        steps = [step for step, w in events if w == what]
        strip.plot(steps, [row] * len(steps), linestyle="none", marker="|", markersize=9, markeredgewidth=1.5,
                   color=colours[what])
    strip.set_ylim(-0.6, len(kinds) - 0.4)
    strip.set_yticks(range(len(kinds)), kinds, fontsize=8)
    strip.invert_yaxis()  # first kind on top
    handles = []
    for what in (kind for kind in kinds if kind in EVENT_COLOURS):  # milestones; drops etc. stay in the strip
        steps = [step for step, w in events if w == what]
        for ax in axes:
            ax.axvline(steps[0], color=colours[what], linestyle="--", linewidth=1.2, alpha=0.9)
        label = (f"{what} (step {steps[0]})" if len(steps) == 1
                 else f"{what} ({len(steps)} times, first at step {steps[0]})")
        handles.append(Line2D([], [], color=colours[what], linestyle="--", label=label))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize=8,
                   frameon=False, title="dashed lines: the first time the agent", title_fontsize=8)


def plot_episode_info(
    trace: dict[str, np.ndarray],
    title: str = "",
    episode: dict[str, Any] | None = None,
    episodes: int | None = None,
) -> Figure:
    """Figure of a core's diagnostics over one episode (module x time panels).

    Panels: for RIMs (and each BRIMs layer) which modules were active at each step (two colours
    with a key) and how much attention each module gave to the observation (and, for BRIMs, to
    the layer above); for ThalNet how much each module read from each center position; for every
    core the size (norm) of the recurrent state, the only panel for LSTM/GRU (which report no
    diagnostics). With ``episode``, the title says which episode this is, its return, success,
    length and whether it timed out, and dashed lines mark its behaviour events (MiniGrid: the
    steps where the agent picks up the key, opens the door, reaches the goal).

    :param trace: info key -> array with time first, for one env (see the module docstring).
    :param title: figure title (e.g. the checkpoint and env).
    :param episode: the episode shown (``evaluate_policy``'s ``"first_episode"``: index, return,
        success, length, truncated, events as ``(step, words)``), or None.
    :param episodes: how many episodes the evaluation ran (for the caption).
    :return: the figure; ``save_figure`` writes it, a notebook shows it.
    """
    panels: list[tuple[str, np.ndarray, str, str, dict]] = []  # (title, rows x time, ylabel, bar label, kwargs)
    for suffix in _layer_suffixes(trace):
        layer = f" (layer {suffix[1:]})" if suffix else ""
        active = np.asarray(trace[f"active{suffix}"], dtype=bool)  # (T, K)
        panels.append((f"which modules are active at each step{layer}", active.T, "module", "", {"on_off": True}))
        attention = trace.get(f"input_attention{suffix}")
        if attention is not None and attention.shape[-1] > 1:
            panels.append((f"attention each module gives to the observation{layer} (the rest goes to an empty "
                           "input)", attention[..., 1].T, "module", "attention to the observation",
                           {"vmin": 0, "vmax": 1}))
        if attention is not None and attention.shape[-1] > 2:
            panels.append((f"attention each module gives to the layer above{layer} (top-down)", attention[..., 2].T,
                           "module", "attention to the layer above", {"vmin": 0, "vmax": 1}))
    if "read_weights" in trace:
        reads = np.asarray(trace["read_weights"], dtype=float)  # (T, M, S)
        for module in range(min(reads.shape[1], MAX_READ_PANELS)):
            panels.append((f"how much module {module} reads from each position of the center", reads[:, module, :].T,
                           "center position", "read weight", {"vmin": 0}))

    norm = trace.get("state_norm")
    n_rows = len(panels) + (1 if norm is not None else 0)
    if n_rows == 0:
        raise ValueError("the trace holds nothing to plot (no module diagnostics and no state_norm)")
    events = list((episode or {}).get("events") or [])
    strip_rows = len(_event_kinds(events))
    height = 1.9 * len(panels) + (1.6 if norm is not None else 0) + 0.8 + (0.5 + 0.25 * strip_rows if events else 0)
    fig = Figure(figsize=(11, height), layout="constrained")
    FigureCanvasAgg(fig)  # an Agg canvas: savefig works without pyplot or a display
    ratios = [1.0] * n_rows
    if events:  # a strip on top, a row per kind of event, above the panels the first ones cross
        ratios = [0.15 + 0.13 * strip_rows, *ratios]
    all_axes = fig.subplots(len(ratios), 1, sharex=True, squeeze=False, height_ratios=ratios)[:, 0]
    strip, axes = (all_axes[0], all_axes[1:]) if events else (None, all_axes)
    for ax, (panel_title, data, ylabel, bar_label, kwargs) in zip(axes, panels, strict=False):  # last: the norm
        if kwargs.pop("on_off", False):
            _on_off(ax, data, panel_title)
        else:
            _heatmap(fig, ax, data, panel_title, ylabel, bar_label, **kwargs)
    if norm is not None:
        ax = axes[-1]
        ax.plot(np.arange(len(norm)), norm, color="tab:blue")
        ax.set_xlim(-0.5, len(norm) - 0.5)
        what = "size of the memory: norm of the recurrent state after each step"
        ax.set_title(what if panels else f"{what} (this core reports no module diagnostics)", fontsize=9, loc="left")
        ax.set_ylabel("state norm")
    axes[-1].set_xlabel("step of the episode")
    if strip is not None:
        _draw_events(fig, strip, axes, events)
    lines = [title] if title else []
    if episode is not None:
        caption = episode_caption(episode, episodes)
        if episode.get("events") == []:  # MiniGrid reported none: say so, or the missing lines look like a bug
            caption += "; no key picked up, door opened or goal reached"
        lines.append(caption)
    if lines:
        fig.suptitle("\n".join(lines), fontsize=10)
    return fig


def plot_bars(
    groups: Sequence[str],
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    ylabel: str,
    title: str = "",
    colors: dict[str, str] | None = None,
    hatched: Sequence[str] = (),
) -> Figure:
    """Grouped bar plot with error bars (e.g. mean return per env, one bar per core).

    :param groups: x-axis groups (e.g. env names), in order.
    :param series: bar series name -> (values per group, error per group; NaN for none).
    :param ylabel: y-axis label.
    :param title: figure title.
    :param colors: series name -> matplotlib colour (default: the colour cycle).
    :param hatched: series drawn light and hatched (e.g. reference numbers from elsewhere).
    """
    fig = Figure(figsize=(max(5.0, 1.6 * len(groups) + 2), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, (values, errors)) in enumerate(series.items()):
        errors_array = np.asarray(errors, dtype=float)
        style: dict = {"color": (colors or {}).get(name, f"C{i}")}
        if name in hatched:
            style.update(alpha=0.45, hatch="//", edgecolor="black", linewidth=0.5)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name,
               yerr=None if np.isnan(errors_array).all() else np.nan_to_num(errors_array, nan=0.0),
               capsize=3, **style)
    ax.set_xticks(x, list(groups))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_probability_of_improvement(pois: dict[tuple[str, str], tuple[float, float, float]],
                                    order: Sequence[str], xlabel: str,
                                    p_values: dict[tuple[str, str], float] | None = None,
                                    alpha: float = 0.05, adjusted: dict[tuple[str, str], float] | None = None) -> Figure:
    """One row per pair ``(x, y)``: P(x > y) with its interval, coloured as ``x``'s place in ``order``.

    :param pois: ``{(x, y): (point, low, high)}``, as ``agents.report.poi_interval`` gives.
    :param order: the labels in the order that sets their colours (``C0``, ``C1``, ...).
    :param xlabel: what the probability is of.
    :param p_values: each pair's permutation test p-value: written in its label, and a pair the test
        does not separate from 0.5 (p >= ``alpha``) is drawn with a hollow marker, however its interval lies.
    :param adjusted: the pairs' Holm-adjusted p-values (``agents.report.holm_family``), written after the raw
        one; a pair outside the family gets none.
    """
    from agents.report import p_text  # one rule for printing a p-value next to its verdict

    pairs = list(pois)
    figure = Figure(figsize=(7, 0.5 * len(pairs) + 1.4))
    ax = figure.add_subplot(1, 1, 1)
    for i, (x, y) in enumerate(pairs):
        point, low, high = pois[x, y]
        color = f"C{order.index(x)}"
        hollow = p_values is not None and p_values[x, y] >= alpha
        ax.errorbar(point, i, xerr=[[point - low], [high - point]], fmt="o", capsize=5, color=color,
                    markerfacecolor="white" if hollow else color)
    ax.axvline(0.5, color="grey", linestyle="--")
    adjusted = adjusted or {}
    labels = [f"P({x} > {y})" + ("" if p_values is None else f", p {p_text(p_values[x, y], alpha)}")
              + (f" (Holm {p_text(adjusted[x, y], alpha)})" if (x, y) in adjusted else "") for x, y in pairs]
    ax.set_yticks(range(len(pairs)), labels)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.6, len(pairs) - 0.4)
    ax.set_xlabel(xlabel + ("" if p_values is None else f"; hollow: permutation test p >= {alpha:g}"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # long labels: tight_layout may give up
        figure.tight_layout()
    return figure


def write_png(fig: Figure, target: str | Path, dpi: int = 100) -> None:
    """Draw ``fig`` as a PNG into the file ``target``: the one place both writers below
    set how. "tight": the image spans every drawn text, so a long label tight_layout gave up on stays whole."""
    fig.savefig(target, format="png", dpi=dpi, bbox_inches="tight")


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(fig, path, dpi)
    return path


def save_figure_atomic(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG like :func:`save_figure`, but through a temporary file renamed over the old
    one (``atomic_output``), so that a plot rebuilt over an old one is never left half-written."""
    from agents.run_dir import atomic_output

    path = Path(path)
    with atomic_output(path) as temp:
        write_png(fig, temp, dpi)
    return path
