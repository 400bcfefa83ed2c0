"""The study's Figures 1-4, per-layer probe accuracy curves, with this project's additions: every
method (the trained heads and the untrained similarity baselines, ``METHODS``) with its Wilson 95%
band, and the query-blind shortcut as a level line."""

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from dkacq.encoders.presets import base_model_for, model_sort_key
from dkacq.probe.baselines import METHODS, SHORTCUT
from dkacq.report.plotting import legend_below, save_figure
from dkacq.report.published import published_curve
from dkacq.report.stats import ProbeResult, missing_comparison, per_layer, shortcut_rows, significance_vs_base


@dataclass(frozen=True)
class MethodStyle:
    """How a method's curves are drawn: a colour and a line style of its own (the two say the same, so a
    grey print still tells the methods apart); the model is the marker (:data:`MODEL_MARKERS`). The
    trained heads are thicker, the untrained baselines dashed and thinner."""

    colour: str
    linestyle: str | tuple
    legend: str
    linewidth: float = 1.5


METHOD_STYLES: dict[str, MethodStyle] = {
    "concat": MethodStyle("tab:blue", "-", "concat (the study's probe)"),
    "passage_only": MethodStyle("tab:orange", "-.", "passage_only (no query)"),
    "query_aware": MethodStyle("tab:green", (0, (3, 1, 1, 1, 1, 1)), "query_aware"),
    "bilinear": MethodStyle("tab:red", (0, (1, 1)), "bilinear (low rank)"),
    "residual_bilinear": MethodStyle("tab:purple", (0, (5, 1, 1, 1)), "residual_bilinear (similarity + low rank)"),
    "similarity_cosine": MethodStyle("tab:brown", "--", "cosine similarity (untrained)", 1.1),
    "similarity_dot": MethodStyle("tab:gray", (0, (7, 3)), "dot product (untrained)", 1.1),
}
if set(METHOD_STYLES) != set(METHODS):
    raise RuntimeError(f"METHOD_STYLES must style exactly the methods {METHODS}, not {tuple(METHOD_STYLES)}")
MODEL_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")
"""The marker of each model of a figure, in the presets' plotting order (then repeating)."""
SHORTCUT_STYLE = dict(color="0.45", linewidth=1.2, linestyle=(0, (1, 3)), zorder=0)
"""The shortcut's level line (grey, sparse dots), beside the chance line (dark grey, dotted)."""
BAND_ALPHA = 0.12


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
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    """The Wilson 95% interval at every layer (NaN where a row has none); None for a published curve."""


def _model_markers(models: Sequence[str]) -> dict[str, str]:
    """Model -> its marker, in the presets' plotting order."""
    return {model: MODEL_MARKERS[i % len(MODEL_MARKERS)] for i, model in enumerate(sorted(models, key=model_sort_key))}


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
    the study published for the same dataset, pooling and N is added with ``published=True``. The
    shortcut's rows are not curves and are left out (:func:`draw_probe_curves` draws them as levels).
    """
    rows = [row for row in per_layer(rows) if row.dataset == dataset and row.pooling == pooling]
    base_model = base_model or base_model_for(pooling)
    flags: dict[tuple, dict[int, bool]] = defaultdict(dict)
    if base_model:
        for result in significance_vs_base(rows, base_model):
            flags[result.curve_key][result.layer] = result.significant
    curves: dict[tuple, list[ProbeResult]] = defaultdict(list)
    for row in rows:
        curves[row.curve_key].append(row)
    series = []
    for key in sorted(curves, key=lambda k: (k[2], model_sort_key(k[4]), METHODS.index(k[3]))):
        _, _, num_passages, probe, model = key
        points = sorted(curves[key], key=lambda row: row.layer)
        series.append(
            CurveSeries(
                model,
                probe,
                num_passages,
                np.array([row.layer for row in points]),
                np.array([row.test_acc for row in points]),
                flags[key],
                low=np.array([np.nan if row.test_acc_low is None else row.test_acc_low for row in points]),
                high=np.array([np.nan if row.test_acc_high is None else row.test_acc_high for row in points]),
            )
        )
        if published_overlay and probe == "concat":
            layers, acc, _ = published_curve(dataset, pooling, model, num_passages)
            if len(layers):
                series.append(CurveSeries(model, probe, num_passages, layers, acc, published=True))
    return series


MARKS: dict[str, tuple[dict, str]] = {
    "significant": (dict(markersize=5), "filled: differs from base (p < 0.05 / layers)"),
    "not significant": (dict(markersize=5, markerfacecolor="white"), "hollow: no significant difference"),
    "base": (dict(markersize=5, markeredgecolor="black"), "black edge: base model (the reference)"),
    "not compared": (dict(markersize=3, markerfacecolor="none"), "small, hollow: not compared with the base"),
}
"""How every point of our curves is filled (its shape is the model's): its McNemar flag against the base
model, the base model's own points, and points without a comparison (the figure or panel title says why)."""


def point_marks(s: CurveSeries, base_model: str | None) -> dict[str, np.ndarray]:
    """Mark name -> boolean mask over ``s.layers``: every point of a curve gets exactly one mark."""
    tested = np.isin(s.layers, list(s.significant))
    flagged = np.isin(s.layers, [layer for layer, significant in s.significant.items() if significant])
    is_base = np.full(len(s.layers), s.model == base_model)
    return {
        "significant": tested & flagged,
        "not significant": tested & ~flagged,
        "base": ~tested & is_base,
        "not compared": ~tested & ~is_base,
    }


def panel_reasons(
    rows: Sequence[ProbeResult], dataset: str, pooling: str, base_model: str | None
) -> dict[int, str | None]:
    """N -> why no layer of the panel is compared with the base model (None where some are)."""
    rows = [row for row in rows if row.dataset == dataset and row.pooling == pooling]
    everywhere = base_model is not None and any(row.model == base_model for row in rows)
    reasons = {}
    for num_passages in sorted({row.num_passages for row in rows}):
        panel = [row for row in rows if row.num_passages == num_passages]
        if base_model is None:
            reasons[num_passages] = f"no base model for {pooling} pooling (see base_models)"
        elif everywhere and not any(row.model == base_model for row in panel):
            reasons[num_passages] = f"no base model {base_model} at N = {num_passages}"
        else:
            reasons[num_passages] = missing_comparison(panel, base_model)
    return reasons


def draw_probe_curves(
    rows: Sequence[ProbeResult],
    dataset: str,
    pooling: str,
    base_model: str | None = None,
    published_overlay: bool = True,
) -> Figure:
    """The study's Figures 1-4 for one dataset and pooling group, with this project's additions.

    One panel per N: test accuracy per layer of every method (a colour and line style each: the trained
    heads and, dashed, the untrained similarity baselines) and model (a marker each), each curve with its
    Wilson 95% interval as a pale band and broken where layers are missing, the chance level 1/N, the
    query-blind shortcut's accuracy as a grey level line, every point filled by its mark (:data:`MARKS`:
    filled/hollow for layers that do/do not differ significantly from the base model), and the published
    curves as wide pale bands under ours. Where no layer is compared with the
    base model, the title says why. Each drawn line is labelled ``"<model> <probe>"``, its markers
    ``"<model> <probe> <mark>"``, a published band ``"<model> <probe> published"`` and a shortcut level
    ``"<models> shortcut"`` (the legend is built separately).
    """
    base_model = base_model or base_model_for(pooling)
    shortcuts = [row for row in shortcut_rows(rows) if row.dataset == dataset and row.pooling == pooling]
    rows = per_layer(rows)
    series = probe_curve_series(rows, dataset, pooling, base_model, published_overlay)
    if not series:
        raise ValueError(f"no probe results for dataset '{dataset}' and pooling '{pooling}'")
    panels = sorted({s.num_passages for s in series})
    models = sorted({s.model for s in series}, key=model_sort_key)
    heads = [method for method in METHODS if any(s.probe == method for s in series)]
    markers = _model_markers(models)
    tested = any(s.significant for s in series)
    reasons = panel_reasons(rows, dataset, pooling, base_model)
    shared_reason = not tested and len(set(reasons.values())) == 1

    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    figure = Figure(figsize=(max(6.2 * ncols, 10.5) + 0.6, 3.9 * nrows + 2.2), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    marks_used: set[str] = set()
    for ax, num_passages in zip(axes, panels):
        ax.axhline(1 / num_passages, color="0.3", linewidth=1, linestyle=":", zorder=0)
        for accuracy, names in _shortcut_levels(shortcuts, num_passages):
            ax.axhline(accuracy, label=f"{names} shortcut", **SHORTCUT_STYLE)
        for s in series:
            if s.num_passages == num_passages:
                marks_used |= _draw_series(ax, s, markers[s.model], base_model)
        title = f"N = {num_passages} passages (chance {1 / num_passages:.2f})"
        if reasons.get(num_passages) and not shared_reason:
            title += f"\nnot compared: {reasons[num_passages]}"
        ax.set_title(title)
        ax.set_xlabel("layer (0 = embedding output)")
        ax.set_ylabel("test accuracy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        layers = {int(layer) for s in series if s.num_passages == num_passages for layer in s.layers}
        if len(layers) == 1:
            ax.set_xlim(min(layers) - 1, min(layers) + 1)
        ax.grid(alpha=0.3)

    if tested:
        note = f"markers: McNemar exact test vs {base_model}, Bonferroni over layers, alpha 0.05"
    elif shared_reason:
        note = f"no significance marks: {next(iter(reasons.values()))}"
    else:
        note = "no significance marks: each panel says why"
    figure.suptitle(f"Linear probes on {dataset}, {pooling} pooling: test accuracy per layer\n{note}")

    model_entries = [
        (Line2D([], [], color="0.25", marker=markers[m], linestyle="none"), f"{m} (base)" if m == base_model else m)
        for m in models
    ]
    head_entries = [
        (
            Line2D([], [], color=METHOD_STYLES[h].colour, linestyle=METHOD_STYLES[h].linestyle, linewidth=2),
            METHOD_STYLES[h].legend,
        )
        for h in heads
    ]
    mark_entries = [(Line2D([], [], color="0.3", linewidth=1, linestyle=":"), "chance (1/N)")]
    if any(_shortcut_levels(shortcuts, n) for n in panels):
        mark_entries.append((Line2D([], [], **SHORTCUT_STYLE), f"{SHORTCUT} (query-blind)"))
    if any(s.low is not None and np.isfinite(s.low).any() for s in series):
        mark_entries.append((Patch(color="0.5", alpha=0.3, linewidth=0), "95% Wilson interval"))
    mark_entries += [
        (Line2D([], [], linestyle="none", color="0.3", marker="o", **style), text)
        for mark, (style, text) in MARKS.items()
        if mark in marks_used
    ]
    if any(s.published for s in series):
        concat = METHOD_STYLES["concat"].colour
        mark_entries.append((Line2D([], [], color=concat, linewidth=6, alpha=0.35), "published (the study, concat)"))
    legend_below(
        figure, [("model (marker)", model_entries), ("method (colour)", head_entries), ("marks", mark_entries)]
    )
    return figure


def plot_probe_curves(
    rows: Sequence[ProbeResult],
    out_path: Path,
    dataset: str,
    pooling: str,
    base_model: str | None = None,
    published_overlay: bool = True,
    figure_format: str | None = None,
) -> Path:
    """:func:`draw_probe_curves` saved to ``out_path`` as PNG, PDF or SVG (default: its suffix)."""
    return save_figure(
        draw_probe_curves(rows, dataset, pooling, base_model, published_overlay), out_path, figure_format
    )


def _shortcut_levels(shortcuts: Sequence[ProbeResult], num_passages: int) -> list[tuple[float, str]]:
    """(accuracy, the models whose setting gave it) of each distinct shortcut accuracy at N: settings
    on the same examples share one."""
    levels: dict[float, list[str]] = defaultdict(list)
    for row in shortcuts:
        if row.num_passages == num_passages:
            levels[row.test_acc].append(row.model)
    return [(acc, ", ".join(sorted(models, key=model_sort_key))) for acc, models in sorted(levels.items())]


def with_gaps(layers: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every layer from the first to the last, NaN where a layer has no value: a line breaks where
    layers are missing instead of joining, say, layers 0 and 6 across the ones not probed."""
    full = np.arange(int(layers.min()), int(layers.max()) + 1) if len(layers) else np.asarray(layers)
    filled = np.full(len(full), np.nan)
    filled[np.searchsorted(full, layers)] = values
    return full, filled


def _draw_series(ax: Axes, s: CurveSeries, marker: str, base_model: str | None) -> set[str]:
    """A published curve as a wide pale band in concat's colour, with the model's marker; ours as a line
    in the method's colour over its interval band, every point marked with the model's marker, filled
    by its mark (:data:`MARKS`). Returns the marks used."""
    name = f"{s.model} {s.probe}"
    style = METHOD_STYLES[s.probe]
    colour = style.colour
    if s.published:
        layers, acc = with_gaps(s.layers, s.acc)
        ax.plot(
            layers,
            acc,
            color=colour,
            linewidth=6,
            alpha=0.25,
            solid_capstyle="round",
            zorder=1,
            marker=marker,
            markersize=7,
            label=f"{name} published",
        )
        return set()
    if s.low is not None and s.high is not None and np.isfinite(s.low).any():
        if len(s.layers) == 1:  # a band over one layer has no width: a bar instead
            ax.vlines(s.layers, s.low, s.high, color=colour, alpha=3 * BAND_ALPHA, linewidth=4, zorder=1)
        else:
            (layers, low), (_, high) = with_gaps(s.layers, s.low), with_gaps(s.layers, s.high)
            ax.fill_between(
                layers, low, high, color=colour, alpha=BAND_ALPHA, linewidth=0, zorder=1, label=f"{name} 95% CI"
            )
    layers, acc = with_gaps(s.layers, s.acc)
    ax.plot(layers, acc, color=colour, linestyle=style.linestyle, linewidth=style.linewidth, zorder=2, label=name)
    used = set()
    for mark, where in point_marks(s, base_model).items():
        if where.any():
            look = {"markeredgecolor": colour, "markerfacecolor": colour, "color": colour, **MARKS[mark][0]}
            ax.plot(
                s.layers[where], s.acc[where], linestyle="none", marker=marker, zorder=3, label=f"{name} {mark}", **look
            )
            used.add(mark)
    return used
