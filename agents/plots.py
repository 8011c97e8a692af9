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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_bars", "plot_episode_info", "save_figure"]

_ACTIVE_KEY = re.compile(r"^active(_\d+)?$")
# ThalNet modules shown one panel each; beyond this the panels would be unreadable.
MAX_READ_PANELS = 8


def _layer_suffixes(trace: dict[str, np.ndarray]) -> list[str]:
    """``[""]`` for RIMs, ``["_0", "_1", ...]`` for BRIMs (in layer order), ``[]`` for other cores."""
    suffixes = [m.group(1) or "" for key in trace if (m := _ACTIVE_KEY.match(key))]
    return sorted(suffixes, key=lambda s: int(s[1:]) if s else -1)


def _heatmap(fig: Figure, ax: Axes, data: np.ndarray, title: str, ylabel: str, vmin: float | None = None,
             vmax: float | None = None, cmap: str = "viridis") -> None:
    """Draw ``data`` (rows x time) with time on the x axis and a colour bar."""
    image = ax.imshow(data, aspect="auto", interpolation="nearest", origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_ylabel(ylabel)
    if data.shape[0] <= 16:  # one tick per module while they are readable
        ax.set_yticks(range(data.shape[0]))
    fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03)


def plot_episode_info(trace: dict[str, np.ndarray], title: str = "") -> Figure:
    """Figure of a core's diagnostics over one episode (module x time heatmaps).

    Panels: for RIMs (and each BRIMs layer) which modules were active at each step and the
    attention each module put on the input slot (and on the top-down slot, for BRIMs); for
    ThalNet the read weights of each module over the center; for every core the norm of
    the recurrent state, the only panel for LSTM/GRU (which report no diagnostics).

    :param trace: info key -> array with time first, for one env (see the module docstring).
    :param title: figure title (e.g. the checkpoint and env).
    :return: the figure; ``save_figure`` writes it, a notebook shows it.
    """
    panels: list[tuple[str, np.ndarray, str, dict]] = []  # (title, rows x time, ylabel, heatmap kwargs)
    for suffix in _layer_suffixes(trace):
        layer = f" (layer {suffix[1:]})" if suffix else ""
        active = np.asarray(trace[f"active{suffix}"], dtype=float)  # (T, K)
        panels.append((f"active modules{layer}", active.T, "module", {"vmin": 0, "vmax": 1, "cmap": "Greys"}))
        attention = trace.get(f"input_attention{suffix}")
        if attention is not None and attention.shape[-1] > 1:
            panels.append((f"input attention on the input slot{layer}", attention[..., 1].T, "module",
                           {"vmin": 0, "vmax": 1}))
        if attention is not None and attention.shape[-1] > 2:
            panels.append((f"input attention on the top-down slot{layer}", attention[..., 2].T, "module",
                           {"vmin": 0, "vmax": 1}))
    if "read_weights" in trace:
        reads = np.asarray(trace["read_weights"], dtype=float)  # (T, M, S)
        for module in range(min(reads.shape[1], MAX_READ_PANELS)):
            panels.append((f"read weights of module {module} over the center", reads[:, module, :].T,
                           "center position", {"vmin": 0}))

    norm = trace.get("state_norm")
    n_rows = len(panels) + (1 if norm is not None else 0)
    if n_rows == 0:
        raise ValueError("the trace holds nothing to plot (no module diagnostics and no state_norm)")
    fig = Figure(figsize=(10, 1.9 * len(panels) + (1.6 if norm is not None else 0) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)  # an Agg canvas: savefig works without pyplot or a display
    axes = fig.subplots(n_rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (panel_title, data, ylabel, kwargs) in zip(axes, panels, strict=False):  # the last axis is the norm's
        _heatmap(fig, ax, data, panel_title, ylabel, **kwargs)
    if norm is not None:
        ax = axes[-1]
        ax.plot(np.arange(len(norm)), norm, color="tab:blue")
        ax.set_xlim(-0.5, len(norm) - 0.5)
        what = "recurrent state norm" if panels else "recurrent state norm (this core reports no module diagnostics)"
        ax.set_title(what, fontsize=9, loc="left")
        ax.set_ylabel("||state||")
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=10)
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


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
