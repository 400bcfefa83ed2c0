"""The study's neuron-attribution heatmaps, run against run comparisons, and the active share
against the threshold; every run read through :class:`dkacq.formats.counts.AttributionRun`."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullLocator

from dkacq.formats.counts import SIDES, AttributionRun
from dkacq.report.plotting import legend_below, save_figure


def bin_active_shares(counts: np.ndarray, num_texts: int, bins: int = 10) -> np.ndarray:
    """``[layers, bins]``: the share (in %) of the bin's neurons active in a text, on average over the texts
    (the mean of the bin's per-neuron counts over ``num_texts``).

    The published heatmaps show each bin's most active neuron instead, which saturates: with thousands
    of neurons per bin some neuron is active in nearly every text, so a random-init control reads 100%
    everywhere. The share tells bins (and models) apart. Neurons are split into ``bins`` consecutive
    groups in index order, as ``np.array_split`` does (the first ``num_neurons % bins`` groups hold one
    neuron more), so every neuron is in a bin.
    """
    counts = np.asarray(counts)
    if num_texts <= 0:
        raise ValueError("num_texts must be positive")
    if counts.ndim != 2 or counts.shape[1] < bins:
        raise ValueError(f"counts must be [layers, neurons] with at least {bins} neurons, got {counts.shape}")
    percentages = counts / num_texts * 100
    return np.stack([chunk.mean(axis=1) for chunk in np.array_split(percentages, bins, axis=1)], axis=1)


def _binned(run: AttributionRun, kind: str, threshold: float) -> np.ndarray:
    return bin_active_shares(run.counts_at(kind, threshold), run.num_texts)


def run_title(run: AttributionRun) -> str:
    """The model, pooling and texts of a run, as figure titles and the report name it."""
    texts = {"query": "queries", "passage": "passages"}.get(run.text_side, f"{run.text_side} texts")
    target = "" if run.target == "norm" else f", target {run.target}"
    return f"{run.model} ({run.pooling}, {run.dataset} {run.split} {texts}{target})"


def _kind_title(run: AttributionRun, kind: str) -> str:
    neurons = f"{run.num_neurons(kind):,} neurons"
    return f"{kind} ({neurons})" if kind == run.side(kind) else f"{kind}, {run.side(kind)} side ({neurons})"


def _heatmap(ax: Axes, matrix: np.ndarray, cmap: str, vmin: float, vmax: float, annotate: bool) -> AxesImage:
    """Layers bottom to top (layer 1 at the bottom), bins left to right, both numbered from 1."""
    layers, bins = matrix.shape
    image = ax.imshow(
        matrix,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        aspect="auto",
        origin="lower",
        extent=(0.5, bins + 0.5, 0.5, layers + 0.5),
        interpolation="nearest",
    )
    ax.set_xticks(range(1, bins + 1))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("neuron bin (tenths of the neurons, index order)")
    ax.set_ylabel("layer")
    if annotate:
        decimals = 0 if vmax >= 10 else 1
        for (row, column), value in np.ndenumerate(matrix):
            ax.text(
                column + 1,
                row + 1,
                f"{value:.{decimals}f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > vmin + 0.6 * (vmax - vmin) else "black",
            )
    return image


def draw_attribution_heatmaps(run_dir: Path, threshold: float | None = None) -> Figure:
    """The study's attribution heatmap of one run: one panel per module kind, intermediate side first.

    ``threshold`` defaults to the run's first recorded threshold. Cells are annotated with their
    value when a panel has at most 16 layers.
    """
    run = AttributionRun.load(run_dir)
    threshold = run.default_threshold() if threshold is None else threshold
    matrices = {kind: _binned(run, kind, threshold) for kind in run.kinds}
    num_layers = max(m.shape[0] for m in matrices.values())
    figure = Figure(figsize=(5.6 * len(matrices), min(max(4.5, 0.32 * num_layers + 2), 9)), layout="constrained")
    for ax, (kind, matrix) in zip(figure.subplots(1, len(matrices), squeeze=False)[0], matrices.items()):
        image = _heatmap(ax, matrix, "YlOrRd", 0.0, max(float(matrix.max()), 1e-9), annotate=matrix.shape[0] <= 16)
        ax.set_title(_kind_title(run, kind))
        figure.colorbar(image, ax=ax, label="% of the bin's neurons active per text")
    figure.suptitle(f"Active neurons of {run_title(run)}\nthreshold {threshold:g}, {run.num_texts:,} texts")
    return figure


def plot_attribution_heatmaps(
    run_dir: Path, out_path: Path, threshold: float | None = None, figure_format: str | None = None
) -> Path:
    """:func:`draw_attribution_heatmaps` saved to ``out_path`` as PNG, PDF or SVG (default: its suffix)."""
    return save_figure(draw_attribution_heatmaps(run_dir, threshold), out_path, figure_format)


def draw_attribution_comparison(run_dir_a: Path, run_dir_b: Path, threshold: float | None = None) -> Figure:
    """Run A (e.g. a fine-tuned model) above run B (its backbone), one column per module kind.

    The two runs share one colour scale per column; when every kind has the same shape in both runs,
    a third row shows A - B in percentage points on a diverging scale centred at zero.
    ``threshold`` defaults to A's first recorded threshold that B also has.
    """
    runs = AttributionRun.load(run_dir_a), AttributionRun.load(run_dir_b)
    if runs[0].kinds != runs[1].kinds:
        raise ValueError(f"runs have different module kinds: {runs[0].kinds} vs {runs[1].kinds}")
    if threshold is None:
        shared = [t for t in runs[0].thresholds if t in runs[1].thresholds]
        if not shared:
            raise ValueError("the two runs share no threshold")
        threshold = shared[0]
    kinds = runs[0].kinds
    matrices = [{kind: _binned(run, kind, threshold) for kind in kinds} for run in runs]
    with_difference = all(matrices[0][k].shape == matrices[1][k].shape for k in kinds)
    nrows = 3 if with_difference else 2
    num_layers = max(m.shape[0] for run_matrices in matrices for m in run_matrices.values())
    row_height = min(max(3.0, 0.2 * num_layers + 1.4), 5.0)
    figure = Figure(figsize=(5.8 * len(kinds), row_height * nrows + 1), layout="constrained")
    axes = figure.subplots(nrows, len(kinds), squeeze=False)
    for column, kind in enumerate(kinds):
        vmax = max(max(float(m[kind].max()) for m in matrices), 1e-9)
        for row, (run, run_matrices) in enumerate(zip(runs, matrices)):
            image = _heatmap(axes[row, column], run_matrices[kind], "YlOrRd", 0.0, vmax, annotate=False)
            axes[row, column].set_title(f"{run.model}: {kind}")
        figure.colorbar(image, ax=axes[:2, column], label="% of the bin's neurons active per text")
        if with_difference:
            difference = matrices[0][kind] - matrices[1][kind]
            limit = max(float(np.abs(difference).max()), 1e-9)
            image = _heatmap(axes[2, column], difference, "RdBu_r", -limit, limit, annotate=False)
            axes[2, column].set_title(f"{runs[0].model} minus {runs[1].model}: {kind}")
            figure.colorbar(image, ax=axes[2, column], label="difference (percentage points)")
    figure.suptitle(f"{run_title(runs[0])} vs {run_title(runs[1])}\nthreshold {threshold:g}")
    return figure


def plot_attribution_comparison(
    run_dir_a: Path, run_dir_b: Path, out_path: Path, threshold: float | None = None, figure_format: str | None = None
) -> Path:
    """:func:`draw_attribution_comparison` saved to ``out_path`` as PNG, PDF or SVG (default: its suffix)."""
    return save_figure(draw_attribution_comparison(run_dir_a, run_dir_b, threshold), out_path, figure_format)


def draw_active_fraction_vs_threshold(run_dirs: Sequence[Path]) -> Figure:
    """Percentage of active (neuron, text) pairs against the threshold: a panel per side, a line per run.

    Each run contributes the thresholds it recorded; the x axis is logarithmic when they span a
    factor of ten or more.
    """
    runs = [AttributionRun.load(run_dir) for run_dir in run_dirs]
    if not runs:
        raise ValueError("no attribution runs")
    sides = [side for side in SIDES if any(run.side(kind) == side for run in runs for kind in run.kinds)]
    thresholds = [t for run in runs for t in run.thresholds]
    colours = colormaps["tab10"]
    figure = Figure(figsize=(6.2 * len(sides) + 0.6, 4.6 + 0.25 * len(runs)), layout="constrained")
    axes = figure.subplots(1, len(sides), squeeze=False)[0]
    entries = []
    for index, run in enumerate(runs):
        entries.append((Line2D([], [], color=colours(index % 10), marker="o"), run_title(run)))
        for ax, side in zip(axes, sides):
            if any(run.side(kind) == side for kind in run.kinds):
                ts = sorted(run.thresholds)
                ax.plot(
                    ts,
                    [run.active_percentage(side, t) for t in ts],
                    color=colours(index % 10),
                    marker="o",
                    label=run_title(run),
                )
    for ax, side in zip(axes, sides):
        if min(thresholds) > 0 and max(thresholds) / min(thresholds) >= 10:
            ax.set_xscale("log")
        ax.set_xticks(sorted(set(thresholds)), [f"{t:g}" for t in sorted(set(thresholds))])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(f"{side} side")
        ax.set_xlabel("threshold (fraction of the text's largest neuron score)")
        ax.set_ylabel("active (neuron, text) pairs (%)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    figure.suptitle("Share of active neurons against the activation threshold")
    legend_below(figure, [("run", entries)])
    return figure


def plot_active_fraction_vs_threshold(
    run_dirs: Sequence[Path], out_path: Path, figure_format: str | None = None
) -> Path:
    """:func:`draw_active_fraction_vs_threshold` saved to ``out_path`` as PNG, PDF or SVG (default: its suffix)."""
    return save_figure(draw_active_fraction_vs_threshold(run_dirs), out_path, figure_format)


def draw_neuron_overlap(rows: Sequence, title: str) -> Figure:
    """Jaccard overlap per layer (:class:`dkacq.report.neuron_overlap.OverlapRow`), one panel per module
    kind: per text (mean) and of the frequent sets, each with its bootstrap band, and, dashed, the level
    two random sets of the same sizes would reach."""
    kinds = list(dict.fromkeys(row.kind for row in rows))
    figure = Figure(figsize=(5.2 * len(kinds), 4.4), layout="constrained")
    entries = []
    for ax, kind in zip(figure.subplots(1, len(kinds), squeeze=False)[0], kinds):
        of_kind = sorted((row for row in rows if row.kind == kind), key=lambda row: row.layer)
        layers = [row.layer for row in of_kind]
        for measure, colour, label in (
            ("per_text", "tab:blue", "per text (mean)"),
            ("frequent", "tab:orange", "frequent sets"),
        ):
            values = [getattr(row.overlap, measure) for row in of_kind]
            (line,) = ax.plot(layers, [v.value for v in values], color=colour, marker="o")
            ax.fill_between(layers, [v.low for v in values], [v.high for v in values], color=colour, alpha=0.15)
            (chance,) = ax.plot(layers, [v.random for v in values], color=colour, linestyle="--", linewidth=1)
            if ax is figure.axes[0]:
                entries += [(line, label), (chance, f"{label}: random sets of the same sizes")]
        ax.set_ylim(0, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("Jaccard overlap")
        ax.set_title(kind)
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    legend_below(figure, [("overlap", entries)])
    return figure
