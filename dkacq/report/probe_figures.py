"""The study's Figures 1-4, per-layer probe accuracy curves, with this project's additions."""

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from dkacq.encoders.presets import base_model_for, model_sort_key, split_control_label
from dkacq.probe.heads import HEADS
from dkacq.report.plotting import legend_below, save_png
from dkacq.report.published import published_curve
from dkacq.report.stats import ProbeResult, significance_vs_base


@dataclass(frozen=True)
class HeadStyle:
    """How a probe head's curves are drawn: one line style per head, the colour being the model's."""

    linestyle: str
    legend: str


HEAD_STYLES: dict[str, HeadStyle] = {
    "concat": HeadStyle("-", "concat (the study's probe)"),
    "passage_only": HeadStyle("-.", "passage_only (no query)"),
    "query_aware": HeadStyle("--", "query_aware"),
}
if set(HEAD_STYLES) != set(HEADS):
    raise RuntimeError(f"HEAD_STYLES must style exactly the probe heads {HEADS}, not {tuple(HEAD_STYLES)}")


@dataclass(frozen=True)
class CurveSeries:
    """One drawn curve: a model's probe head at every layer, ours or the published one."""

    model: str
    probe: str
    num_passages: int
    layers: np.ndarray
    acc: np.ndarray
    significant: Mapping[int, bool] = field(default_factory=dict)
    """Layer -> Bonferroni-corrected McNemar flag against the base model, for the layers tested."""
    published: bool = False


def _colour_pair(model: str) -> tuple[str, bool]:
    """The model whose tab20 pair ``model`` is drawn in, and whether in the pair's light shade: a
    random-init control of seed 0 is its trained model's light shade; any other model has a pair of its own."""
    control = split_control_label(model)
    return (control[0], True) if control and control[1] == 0 else (model, False)


def _model_colours(models: Iterable[str]) -> dict[str, tuple]:
    """A trained model and its random-init control share a hue: dark and light of one tab20 pair."""
    palette = colormaps["tab20"]
    pairs = sorted({_colour_pair(model)[0] for model in models}, key=model_sort_key)
    colours = {}
    for model in models:
        pair, light = _colour_pair(model)
        colours[model] = palette((2 * pairs.index(pair) + light) % 20)
    return colours


def probe_curve_series(
    rows: Sequence[ProbeResult],
    dataset: str,
    pooling: str,
    base_model: str | None = None,
    published_overlay: bool = True,
) -> list[CurveSeries]:
    """The curves of one (dataset, pooling) figure, ordered by N, model and head.

    ``base_model`` defaults to the study's base for the pooling group; significance is computed
    when that model is among the rows. With ``published_overlay``, every model's concat curve that
    the study published for the same dataset, pooling and N is added with ``published=True``.
    """
    rows = [row for row in rows if row.dataset == dataset and row.pooling == pooling]
    base_model = base_model or base_model_for(pooling)
    flags: dict[tuple, dict[int, bool]] = defaultdict(dict)
    if base_model:
        for result in significance_vs_base(rows, base_model):
            flags[result.curve_key][result.layer] = result.significant
    curves: dict[tuple, list[ProbeResult]] = defaultdict(list)
    for row in rows:
        curves[row.curve_key].append(row)
    series = []
    for key in sorted(curves, key=lambda k: (k[2], model_sort_key(k[4]), HEADS.index(k[3]))):
        _, _, num_passages, probe, model = key
        points = sorted(curves[key], key=lambda row: row.layer)
        series.append(CurveSeries(
            model, probe, num_passages,
            np.array([row.layer for row in points]), np.array([row.test_acc for row in points]), flags[key],
        ))
        if published_overlay and probe == "concat":
            layers, acc, _ = published_curve(dataset, pooling, model, num_passages)
            if len(layers):
                series.append(CurveSeries(model, probe, num_passages, layers, acc, published=True))
    return series


def plot_probe_curves(
    rows: Sequence[ProbeResult],
    out_path: Path,
    dataset: str,
    pooling: str,
    base_model: str | None = None,
    published_overlay: bool = True,
) -> Path:
    """The study's Figures 1-4 for one dataset and pooling group, with this project's additions.

    One panel per N: test accuracy per layer of every model (colour) and probe head (line style), the
    chance level 1/N, filled/hollow markers for layers that do/do not differ significantly from the
    base model, and the published curves as wide pale bands under ours.
    """
    base_model = base_model or base_model_for(pooling)
    series = probe_curve_series(rows, dataset, pooling, base_model, published_overlay)
    if not series:
        raise ValueError(f"no probe results for dataset '{dataset}' and pooling '{pooling}'")
    panels = sorted({s.num_passages for s in series})
    models = sorted({s.model for s in series}, key=model_sort_key)
    heads = [head for head in HEADS if any(s.probe == head for s in series)]
    colours = _model_colours(models)
    tested = any(s.significant for s in series)

    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    figure = Figure(figsize=(max(6.2 * ncols, 10.5) + 0.6, 3.9 * nrows + 2.2), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, num_passages in zip(axes, panels):
        ax.axhline(1 / num_passages, color="0.3", linewidth=1, linestyle=":", zorder=0)
        for s in series:
            if s.num_passages == num_passages:
                _draw_series(ax, s, colours[s.model])
        ax.set_title(f"N = {num_passages} passages (chance {1 / num_passages:.2f})")
        ax.set_xlabel("layer (0 = embedding output)")
        ax.set_ylabel("test accuracy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)

    if tested:
        note = f"markers: McNemar exact test vs {base_model}, Bonferroni over layers, alpha 0.05"
    elif base_model and base_model in models:
        note = f"no significance marks: no prediction files to compare with base model {base_model}"
    else:
        note = f"no significance marks: base model {base_model or '(none)'} not in these results"
    figure.suptitle(f"Linear probes on {dataset}, {pooling} pooling: test accuracy per layer\n{note}")

    model_entries = [
        (Line2D([], [], color=colours[m], linewidth=2), f"{m} (base)" if m == base_model else m) for m in models
    ]
    head_entries = [
        (Line2D([], [], color="0.2", linestyle=HEAD_STYLES[h].linestyle, linewidth=1.5), HEAD_STYLES[h].legend)
        for h in heads
    ]
    mark_entries = [(Line2D([], [], color="0.3", linewidth=1, linestyle=":"), "chance (1/N)")]
    if tested:
        mark_entries += [
            (Line2D([], [], linestyle="none", marker="o", color="0.2"), "differs from base (p < 0.05 / layers)"),
            (Line2D([], [], linestyle="none", marker="o", color="0.2", markerfacecolor="white"),
             "no significant difference"),
        ]
    if any(s.published for s in series):
        mark_entries.append((Line2D([], [], color="0.5", linewidth=6, alpha=0.35), "published (the study, concat)"))
    legend_below(figure, [("model (colour)", model_entries), ("probe head (line)", head_entries),
                          ("marks", mark_entries)])
    return save_png(figure, out_path)


def _draw_series(ax: Axes, s: CurveSeries, colour: tuple) -> None:
    """A published curve as a wide pale band; ours as a line with filled (significant) or hollow markers."""
    if s.published:
        ax.plot(s.layers, s.acc, color=colour, linewidth=6, alpha=0.25, solid_capstyle="round", zorder=1)
        return
    ax.plot(s.layers, s.acc, color=colour, linestyle=HEAD_STYLES[s.probe].linestyle, linewidth=1.5, zorder=2)
    for flag in (True, False):
        marked = np.isin(s.layers, [layer for layer, significant in s.significant.items() if significant == flag])
        ax.plot(s.layers[marked], s.acc[marked], linestyle="none", marker="o", markersize=4.5,
                markeredgecolor=colour, markerfacecolor=colour if flag else "white", zorder=3)
