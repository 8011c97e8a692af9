"""The episode figure says what it shows: titles, axis and colour-bar labels, the on/off key, the
episode's summary and its behaviour events (checked on the figure's texts, then drawn to a PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from agents.plots import (episode_caption, plot_episode_info, plot_probability_of_improvement, save_figure,
                          save_figure_atomic)


def _texts(fig: Figure) -> list[str]:
    """Every text on the figure: titles, labels, annotations, legend entries."""
    texts = [text.get_text() for text in fig.texts]
    if fig._suptitle is not None:
        texts.append(fig._suptitle.get_text())
    for legend in fig.legends:
        texts += [legend.get_title().get_text(), *(text.get_text() for text in legend.get_texts())]
    for ax in fig.axes:
        texts += [ax.get_title(loc="left"), ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        texts += [text.get_text() for text in ax.texts]
        if ax.get_legend() is not None:
            texts += [text.get_text() for text in ax.get_legend().get_texts()]
    return [text for text in texts if text]


def _rims_trace(steps: int = 12, modules: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"active": rng.random((steps, modules)) > 0.5,
            "input_attention": rng.dirichlet(np.ones(2), size=(steps, modules)),
            "state_norm": rng.random(steps)}


def test_rims_figure_names_the_episode_its_panels_and_events(tmp_path: Path) -> None:
    episode = {"index": 0, "return": 0.5, "length": 12, "success": False, "truncated": True,
               "events": [(3, "picks up key"), (5, "opens door"), (9, "picks up key")]}
    fig = plot_episode_info(_rims_trace(), "tiny-rims (rims) on DoorKey-6x6 (held-out)", episode=episode, episodes=100)
    texts = _texts(fig)
    title = fig._suptitle.get_text()
    assert title.splitlines() == ["tiny-rims (rims) on DoorKey-6x6 (held-out)",
                                  "episode 0 of 100 (seeded; the first), return 0.50, no success, 12 steps, "
                                  "timed out (truncated at the step limit)"]
    # On/off panel: two colours with a key, no colour bar.
    assert "which modules are active at each step" in texts
    active_ax = next(ax for ax in fig.axes if ax.get_title(loc="left") == "which modules are active at each step")
    assert [t.get_text() for t in active_ax.get_legend().get_texts()] == ["active", "inactive"]
    assert active_ax.images[0].cmap.N == 2
    # Every colour bar is labelled; one for the attention panel only.
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert [ax.get_ylabel() for ax in colorbars] == ["attention to the observation"]
    assert any(text.startswith("attention each module gives to the observation") for text in texts)
    assert "size of the memory: norm of the recurrent state after each step" in texts
    assert "state norm" in texts and "step of the episode" in texts
    # Behaviour events: a row per kind in the strip above the panels, the first of each in a legend.
    strip = next(ax for ax in fig.axes if ax.get_title(loc="left") == "what the agent did")
    assert [label.get_text() for label in strip.get_yticklabels()] == ["picks up key", "opens door"]
    assert "picks up key (2 times, first at step 3)" in texts and "opens door (step 5)" in texts
    assert "dashed lines: the first time the agent" in texts
    # Plain words only.
    assert not [t for t in texts if "input slot" in t or "recurrent state norm" in t]
    path = save_figure(fig, tmp_path / "rims.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 1000


def test_brims_and_thalnet_colour_bars_are_labelled() -> None:
    rng = np.random.default_rng(1)
    steps = 6
    brims = {"state_norm": rng.random(steps)}
    for layer, slots in ((0, 3), (1, 2)):
        brims[f"active_{layer}"] = rng.random((steps, 3)) > 0.5
        brims[f"input_attention_{layer}"] = rng.dirichlet(np.ones(slots), size=(steps, 3))
    fig = plot_episode_info(brims)
    texts = _texts(fig)
    assert "which modules are active at each step (layer 0)" in texts
    assert any(t.startswith("attention each module gives to the layer above (layer 0)") for t in texts)
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert labels == ["attention to the observation", "attention to the layer above", "attention to the observation"]
    thalnet = {"read_weights": rng.dirichlet(np.ones(5), size=(steps, 2)), "state_norm": rng.random(steps)}
    fig = plot_episode_info(thalnet)
    assert "how much module 1 reads from each position of the center" in _texts(fig)
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"] == ["read weight", "read weight"]


def test_lstm_figure_says_there_are_no_module_diagnostics() -> None:
    fig = plot_episode_info({"state_norm": np.arange(5.0)}, episode={"index": 0, "return": 1.0, "length": 5,
                                                                   "success": True, "truncated": False})
    texts = _texts(fig)
    assert any("this core reports no module diagnostics" in t for t in texts)
    assert fig._suptitle.get_text() == "episode 0, return 1.00, success, 5 steps, ended by the env (terminated)"


def test_a_minigrid_episode_without_events_says_so() -> None:
    episode = {"index": 0, "return": 0.0, "length": 12, "success": False, "truncated": True, "events": []}
    fig = plot_episode_info(_rims_trace(), "t", episode=episode)
    assert fig._suptitle.get_text().endswith("; no key picked up, door opened or goal reached")
    assert "what the agent did" not in _texts(fig)


def test_episode_caption_without_success_information() -> None:
    assert episode_caption({"index": 3, "return": -21.0, "length": 900, "success": None, "truncated": False}, 10) \
        == "episode 3 of 10, return -21.00, 900 steps, ended by the env (terminated)"


def test_saved_figures_keep_a_label_wider_than_the_figure(tmp_path: Path) -> None:
    """A label that overflows the figure (long pair names, a long x label: tight_layout gives up) is saved
    whole, by both writers: the PNG spans every drawn text instead of cutting it at the figure's edge."""
    order = ["a-model-with-a-long-label.ppo", "another-long-label.scratch"]
    fig = plot_probability_of_improvement({(order[0], order[1]): (0.4, 0.1, 0.8)}, order,
                                          xlabel="a deliberately long x label " * 4)
    renderer = FigureCanvasAgg(fig).get_renderer()
    drawn = fig.get_tightbbox(renderer)  # inches: everything drawn, labels included
    assert drawn.width > fig.get_figwidth()  # the label does overflow the 7-inch figure
    for save in (save_figure, save_figure_atomic):
        path = save(fig, tmp_path / f"{save.__name__}.png", dpi=100)
        width, _ = Image.open(path).size
        assert width >= drawn.width * 100 - 1, save.__name__


def test_a_pair_its_permutation_test_does_not_separate_is_drawn_hollow() -> None:
    """An interval off 0.5 with p 0.095 (five runs against five) must not look like a separated pair."""
    order = ["x", "y", "z"]
    fig = plot_probability_of_improvement({("x", "y"): (0.84, 0.52, 1.0), ("z", "y"): (0.96, 0.76, 1.0)}, order,
                                          "P", p_values={("x", "y"): 0.095, ("z", "y"): 0.016})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["P(x > y), p 0.095", "P(z > y), p 0.016"]
    faces = [line.get_markerfacecolor() for line in ax.lines if line.get_marker() == "o"]
    assert faces == ["white", "C2"]
    assert "hollow: permutation test p >= 0.05" in ax.get_xlabel()


def test_a_pairs_holm_adjusted_p_is_written_beside_its_raw_one() -> None:
    order = ["x", "y", "z"]
    fig = plot_probability_of_improvement({("x", "y"): (0.84, 0.52, 1.0), ("z", "y"): (0.96, 0.76, 1.0)}, order,
                                          "P", p_values={("x", "y"): 0.095, ("z", "y"): 0.016},
                                          adjusted={("z", "y"): 0.032})  # (x, y) outside the family
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["P(x > y), p 0.095", "P(z > y), p 0.016 (Holm 0.032)"]
