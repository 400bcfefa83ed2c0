"""The report's figures: per-layer probe accuracy curves and neuron-attribution heatmaps (PNG).

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot), so building a
report changes no global matplotlib state and needs no display.
"""

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullLocator
from safetensors.numpy import load_file

from dkacq.report.published import published_curve
from dkacq.report.stats import PROBES, ProbeResult, base_model_for, significance_vs_base

MODEL_ORDER: tuple[str, ...] = (
    "bert-base-uncased", "dpr-question", "dpr-context", "dpr-paired", "contriever", "llama", "repllama",
    "minilm", "smollm",
)
"""Models in legend order (the study's order); others follow alphabetically."""

HEAD_STYLES: dict[str, str] = {"concat": "-", "query_aware": "--", "passage_only": "-."}
HEAD_LABELS: dict[str, str] = {
    "concat": "concat (the study's probe)",
    "query_aware": "query_aware",
    "passage_only": "passage_only (no query)",
}
SIDES: tuple[str, ...] = ("intermediate", "output")
DPI = 150


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces ``path`` once the block completes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _save(figure: Figure, out_path: Path) -> Path:
    with atomic_output(out_path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    return Path(out_path)


def _legend_below(figure: Figure, groups: Sequence[tuple[str, Sequence[tuple[Line2D, str]]]]) -> None:
    """One legend under the panels, one column per group, each column headed by the group's title."""
    groups = [(title, entries) for title, entries in groups if entries]
    height = 1 + max(len(entries) for _, entries in groups)
    handles, labels, headers = [], [], []
    for title, entries in groups:
        headers.append(len(labels))
        column = [(Line2D([], [], linestyle="none"), title), *entries]
        column += [(Line2D([], [], linestyle="none"), "")] * (height - len(column))
        handles += [handle for handle, _ in column]
        labels += [label for _, label in column]
    legend = figure.legend(handles, labels, loc="outside lower center", ncols=len(groups), frameon=False,
                           handlelength=3, columnspacing=2.5)
    for index in headers:
        legend.get_texts()[index].set_fontweight("bold")


# --------------------------------------------------------------------------- probe curves


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


def model_sort_key(model: str) -> tuple[int, str, bool]:
    """Study order, unknown models alphabetically after, each random-init control after its model."""
    family = model.removesuffix("-random")
    rank = MODEL_ORDER.index(family) if family in MODEL_ORDER else len(MODEL_ORDER)
    return rank, family, model != family


def _model_colours(models: Iterable[str]) -> dict[str, tuple]:
    """A trained model and its random-init control share a hue: dark and light of one tab20 pair."""
    palette = colormaps["tab20"]
    families = sorted({model.removesuffix("-random") for model in models}, key=model_sort_key)
    colours = {}
    for model in models:
        family = model.removesuffix("-random")
        colours[model] = palette((2 * families.index(family) + (model != family)) % 20)
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
    for key in sorted(curves, key=lambda k: (k[2], model_sort_key(k[4]), PROBES.index(k[3]))):
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
    heads = [head for head in HEAD_STYLES if any(s.probe == head for s in series)]
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
        (Line2D([], [], color="0.2", linestyle=HEAD_STYLES[h], linewidth=1.5), HEAD_LABELS[h]) for h in heads
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
    _legend_below(figure, [("model (colour)", model_entries), ("probe head (line)", head_entries),
                           ("marks", mark_entries)])
    return _save(figure, out_path)


def _draw_series(ax: Axes, s: CurveSeries, colour: tuple) -> None:
    """A published curve as a wide pale band; ours as a line with filled (significant) or hollow markers."""
    if s.published:
        ax.plot(s.layers, s.acc, color=colour, linewidth=6, alpha=0.25, solid_capstyle="round", zorder=1)
        return
    ax.plot(s.layers, s.acc, color=colour, linestyle=HEAD_STYLES[s.probe], linewidth=1.5, zorder=2)
    for flag in (True, False):
        marked = np.isin(s.layers, [layer for layer, significant in s.significant.items() if significant == flag])
        ax.plot(s.layers[marked], s.acc[marked], linestyle="none", marker="o", markersize=4.5,
                markeredgecolor=colour, markerfacecolor=colour if flag else "white", zorder=3)


# --------------------------------------------------------------------------- attribution


def bin_max_percentages(counts: np.ndarray, num_texts: int, bins: int = 10) -> np.ndarray:
    """``[layers, bins]``: the largest percentage of texts in which a neuron of the bin is active.

    Neurons are split into ``bins`` consecutive groups in index order, as ``np.array_split`` does (the
    first ``num_neurons % bins`` groups hold one neuron more), so every neuron is in a bin; the
    published plotting code uses ``num_neurons // bins`` per bin and leaves the remainder out.
    """
    counts = np.asarray(counts)
    if num_texts <= 0:
        raise ValueError("num_texts must be positive")
    if counts.ndim != 2 or counts.shape[1] < bins:
        raise ValueError(f"counts must be [layers, neurons] with at least {bins} neurons, got {counts.shape}")
    percentages = counts / num_texts * 100
    return np.stack([chunk.max(axis=1) for chunk in np.array_split(percentages, bins, axis=1)], axis=1)


@dataclass(frozen=True)
class AttributionRun:
    """One attribution run folder: its ``summary.json`` and its activation counts."""

    run_dir: Path
    summary: dict
    counts: dict[str, np.ndarray]

    @classmethod
    def load(cls, run_dir: Path) -> "AttributionRun":
        run_dir = Path(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        return cls(run_dir, summary, load_file(str(run_dir / "counts.safetensors")))

    @property
    def model(self) -> str:
        return self.summary["model"]

    @property
    def title(self) -> str:
        s = self.summary
        texts = {"query": "queries", "passage": "passages"}.get(s["text_side"], f"{s['text_side']} texts")
        return f"{s['model']} ({s['pooling']}, {s['dataset']} {s['split']} {texts})"

    @property
    def num_texts(self) -> int:
        return int(self.counts["num_texts"])

    @property
    def thresholds(self) -> list[float]:
        return [float(t) for t in self.summary["thresholds"]]

    @property
    def kinds(self) -> list[str]:
        """Module kinds, intermediate side first."""
        return sorted(self.summary["kinds"], key=lambda kind: (SIDES.index(self.side(kind)), kind))

    def side(self, kind: str) -> str:
        return self.summary["kinds"][kind]["side"]

    def kind_title(self, kind: str) -> str:
        neurons = f"{self.summary['kinds'][kind]['num_neurons']:,} neurons"
        return f"{kind} ({neurons})" if kind == self.side(kind) else f"{kind}, {self.side(kind)} side ({neurons})"

    def default_threshold(self) -> float:
        return self.thresholds[0]

    def counts_at(self, kind: str, threshold: float) -> np.ndarray:
        """``[layers, neurons]``: number of texts in which each neuron is active."""
        key = f"{kind}@{threshold:g}"
        if key not in self.counts:
            raise KeyError(f"{self.run_dir} has no counts '{key}'; thresholds: {self.thresholds}")
        return self.counts[key]

    def binned(self, kind: str, threshold: float, bins: int = 10) -> np.ndarray:
        return bin_max_percentages(self.counts_at(kind, threshold), self.num_texts, bins)

    def active_percentage(self, side: str, threshold: float) -> float:
        """Percentage of active (neuron, text) pairs over every neuron of the side's modules and layers."""
        counts = [self.counts_at(kind, threshold).ravel() for kind in self.kinds if self.side(kind) == side]
        return float(np.concatenate(counts).mean() / self.num_texts * 100)


def _heatmap(ax: Axes, matrix: np.ndarray, cmap: str, vmin: float, vmax: float, annotate: bool) -> AxesImage:
    """Layers bottom to top (layer 1 at the bottom), bins left to right, both numbered from 1."""
    layers, bins = matrix.shape
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="lower",
                      extent=(0.5, bins + 0.5, 0.5, layers + 0.5), interpolation="nearest")
    ax.set_xticks(range(1, bins + 1))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("neuron bin (tenths of the neurons, index order)")
    ax.set_ylabel("layer")
    if annotate:
        decimals = 0 if vmax >= 10 else 1
        for (row, column), value in np.ndenumerate(matrix):
            ax.text(column + 1, row + 1, f"{value:.{decimals}f}", ha="center", va="center", fontsize=7,
                    color="white" if value > vmin + 0.6 * (vmax - vmin) else "black")
    return image


def plot_attribution_heatmaps(run_dir: Path, out_path: Path, threshold: float | None = None) -> Path:
    """The study's attribution heatmap of one run: one panel per module kind, intermediate side first.

    ``threshold`` defaults to the run's first recorded threshold. Cells are annotated with their
    value when a panel has at most 16 layers.
    """
    run = AttributionRun.load(run_dir)
    threshold = run.default_threshold() if threshold is None else threshold
    matrices = {kind: run.binned(kind, threshold) for kind in run.kinds}
    num_layers = max(m.shape[0] for m in matrices.values())
    figure = Figure(figsize=(5.6 * len(matrices), min(max(4.5, 0.32 * num_layers + 2), 9)), layout="constrained")
    for ax, (kind, matrix) in zip(figure.subplots(1, len(matrices), squeeze=False)[0], matrices.items()):
        image = _heatmap(ax, matrix, "YlOrRd", 0.0, max(float(matrix.max()), 1e-9), annotate=matrix.shape[0] <= 16)
        ax.set_title(run.kind_title(kind))
        figure.colorbar(image, ax=ax, label="% of texts (most active neuron of the bin)")
    figure.suptitle(f"Active neurons of {run.title}\nthreshold {threshold:g}, {run.num_texts:,} texts")
    return _save(figure, out_path)


def plot_attribution_comparison(
    run_dir_a: Path, run_dir_b: Path, out_path: Path, threshold: float | None = None
) -> Path:
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
    matrices = [{kind: run.binned(kind, threshold) for kind in kinds} for run in runs]
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
        figure.colorbar(image, ax=axes[:2, column], label="% of texts (most active neuron of the bin)")
        if with_difference:
            difference = matrices[0][kind] - matrices[1][kind]
            limit = max(float(np.abs(difference).max()), 1e-9)
            image = _heatmap(axes[2, column], difference, "RdBu_r", -limit, limit, annotate=False)
            axes[2, column].set_title(f"{runs[0].model} minus {runs[1].model}: {kind}")
            figure.colorbar(image, ax=axes[2, column], label="difference (percentage points)")
    figure.suptitle(f"{runs[0].title} vs {runs[1].title}\nthreshold {threshold:g}")
    return _save(figure, out_path)


def plot_active_fraction_vs_threshold(run_dirs: Sequence[Path], out_path: Path) -> Path:
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
        entries.append((Line2D([], [], color=colours(index % 10), marker="o"), run.title))
        for ax, side in zip(axes, sides):
            if any(run.side(kind) == side for kind in run.kinds):
                ts = sorted(run.thresholds)
                ax.plot(ts, [run.active_percentage(side, t) for t in ts], color=colours(index % 10), marker="o")
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
    _legend_below(figure, [("run", entries)])
    return _save(figure, out_path)
