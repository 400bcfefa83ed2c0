"""Figures of a ``dkacq compare`` run: the layer x layer CKA heatmaps and the CKA diagonal, every run
read through :class:`dkacq.formats.similarity.Comparison`; and the report's "what changed where" figure,
the CKA diagonal beside the probe and attribution changes per layer."""

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dkacq.formats.similarity import Comparison
from dkacq.report.plotting import save_figure
from dkacq.report.what_changed import ChangedWhere

MEASURES = {"cka": "linear CKA", "debiased_cka": "debiased CKA"}


def cka_matrix(comparison: Comparison, side: str, measure: str = "cka") -> np.ndarray:
    """``[layers of a, layers of b]``: the measure of every pair the run holds (NaN where it holds none)."""
    layers_a, layers_b = comparison.layers("a"), comparison.layers("b")
    matrix = np.full((len(layers_a), len(layers_b)), np.nan)
    for row in comparison.rows:
        if row.side == side:
            matrix[layers_a.index(row.layer_a), layers_b.index(row.layer_b)] = getattr(row, measure)
    return matrix


def _title(comparison: Comparison) -> str:
    texts = ", ".join(f"{count:,} {side} texts" for side, count in comparison.summary["num_texts"].items())
    return f"{comparison.model_a} against {comparison.model_b} ({comparison.summary['dataset']}; {texts})"


def draw_cka_heatmaps(comparison: Comparison) -> Figure:
    """One panel per (measure, side): layers of model a bottom to top, layers of model b left to right."""
    sides = comparison.sides
    layers_a, layers_b = comparison.layers("a"), comparison.layers("b")
    size = min(max(3.6, 0.28 * max(len(layers_a), len(layers_b)) + 2), 8)
    figure = Figure(figsize=(size * len(sides) + 1, size * len(MEASURES)), layout="constrained")
    axes = figure.subplots(len(MEASURES), len(sides), squeeze=False)
    for row, (measure, name) in enumerate(MEASURES.items()):
        for column, side in enumerate(sides):
            ax = axes[row, column]
            matrix = cka_matrix(comparison, side, measure)
            image = ax.imshow(
                matrix,
                cmap="viridis",
                vmin=0.0,
                vmax=1.0,
                origin="lower",
                aspect="auto",
                interpolation="nearest",
                extent=(layers_b[0] - 0.5, layers_b[-1] + 0.5, layers_a[0] - 0.5, layers_a[-1] + 0.5),
            )
            if matrix.size <= 256:
                for (i, j), value in np.ndenumerate(matrix):
                    if np.isfinite(value):
                        ax.text(
                            layers_b[j],
                            layers_a[i],
                            f"{value:.2f}",
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="black" if value > 0.6 else "white",
                        )
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(f"layer of {comparison.model_b}")
            ax.set_ylabel(f"layer of {comparison.model_a}")
            ax.set_title(f"{name}, {side} vectors")
        figure.colorbar(image, ax=axes[row, :], label=name)
    figure.suptitle(_title(comparison))
    return figure


def draw_cka_diagonal(comparison: Comparison) -> Figure:
    """CKA of each layer of model a with the layer of model b at the same relative depth, per side."""
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = figure.subplots()
    for side, colour in zip(comparison.sides, ("tab:blue", "tab:orange", "tab:green")):
        rows = comparison.diagonal(side)
        layers = [row.layer_a for row in rows]
        ax.plot(layers, [row.cka for row in rows], color=colour, marker="o", label=f"{side}: linear CKA")
        ax.plot(
            layers,
            [row.debiased_cka for row in rows],
            color=colour,
            linestyle="--",
            marker=".",
            label=f"{side}: debiased CKA",
        )
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"layer of {comparison.model_a}")
    ax.set_ylabel(f"CKA with {comparison.model_b}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(comparison), fontsize=9)
    return figure


def figure_paths(out_dir: Path, figure_format: str = "png") -> tuple[Path, Path]:
    """Where :func:`plot_comparison` saves the heatmaps and the diagonal curve."""
    return Path(out_dir) / f"cka_heatmap.{figure_format}", Path(out_dir) / f"cka_diagonal.{figure_format}"


def plot_comparison(comparison: Comparison, out_dir: Path, figure_format: str = "png") -> tuple[Path, Path]:
    """Both figures saved into ``out_dir`` (:func:`figure_paths`)."""
    heatmap, diagonal = figure_paths(out_dir, figure_format)
    return (
        save_figure(draw_cka_heatmaps(comparison), heatmap, figure_format),
        save_figure(draw_cka_diagonal(comparison), diagonal, figure_format),
    )


def draw_what_changed(changed: ChangedWhere) -> Figure:
    """Per hidden state, on one figure: the CKA diagonal of the pair (top), both models' probe accuracy
    with Wilson bands (middle), and the change of the attributed active share with its paired bootstrap
    interval, drawn at the hidden state the modules feed (bottom)."""
    a, b = changed.models
    panels = 1 + bool(changed.head) + bool(changed.shares)
    figure = Figure(figsize=(6.8, 2.7 * panels + 0.8), layout="constrained")
    axes = list(figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0])
    ax = axes.pop(0)
    for (side, rows), colour in zip(changed.diagonals.items(), ("tab:blue", "tab:orange")):
        layers = [row.layer_a for row in rows]
        ax.plot(layers, [row.cka for row in rows], color=colour, marker="o", label=f"{side}: linear CKA")
        ax.plot(layers, [row.debiased_cka for row in rows], color=colour, linestyle="--", label=f"{side}: debiased")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
    ax.set_ylabel(f"CKA, {a} vs {b}")
    ax.legend(fontsize=7)
    if changed.head:
        ax = axes.pop(0)
        for model, colour in zip((a, b), ("tab:green", "tab:gray")):
            rows = changed.probe[model]
            layers = [row.layer for row in rows]
            ax.plot(layers, [row.test_acc for row in rows], color=colour, marker="o", label=model)
            if all(row.test_acc_low is not None for row in rows):
                ax.fill_between(
                    layers,
                    [row.test_acc_low for row in rows],
                    [row.test_acc_high for row in rows],
                    color=colour,
                    alpha=0.15,
                )
        ax.axhline(1 / changed.num_passages, color="0.3", linestyle=":", linewidth=1, label="chance")
        ax.set_ylabel(f"{changed.head} acc (N = {changed.num_passages})")
        ax.legend(fontsize=7)
    if changed.shares:
        ax = axes.pop(0)
        for kind, colour in zip(
            dict.fromkeys(row.kind for row in changed.shares), ("tab:red", "tab:purple", "tab:brown")
        ):
            rows = [row for row in changed.shares if row.kind == kind]
            layers = [row.layer + 1 for row in rows]
            ax.errorbar(
                layers,
                [row.change for row in rows],
                yerr=[[row.change - row.change_low for row in rows], [row.change_high - row.change for row in rows]],
                color=colour,
                marker="o",
                capsize=3,
                label=f"{kind} ({rows[0].text_side} texts)",
            )
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_ylabel("active share change (points)")
        ax.legend(fontsize=7)
    for ax in figure.axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.axes[-1].set_xlabel("hidden state (0: embeddings)")
    figure.suptitle(f"What changed where: {a} against {b}")
    return figure
