"""``report.md``: probe and attribution results as Markdown tables, linking every figure the inputs allow."""

import csv
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from dkacq.encoders.presets import backbone_of, base_model_for, control_label, model_sort_key
from dkacq.formats.atomic import atomic_write
from dkacq.formats.counts import SIDES, AttributionRun
from dkacq.probe.heads import HEADS
from dkacq.report.attribution_figures import (
    plot_active_fraction_vs_threshold,
    plot_attribution_comparison,
    plot_attribution_heatmaps,
    run_title,
)
from dkacq.report.plotting import FIGURE_FORMATS
from dkacq.report.probe_figures import plot_probe_curves
from dkacq.report.published import PublishedDifference, compare_with_published
from dkacq.report.stats import ProbeResult, read_results, significance_vs_base

MISSING = "–"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _acc(value: float) -> str:
    return f"{value:.4f}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def _figure_link(description: str, name: str) -> str:
    """An embedded image for PNG and SVG; a link for PDF, which Markdown viewers do not show inline."""
    return f"[{description} (PDF)]({name})" if name.endswith(".pdf") else f"![{description}]({name})"


def _signed(value: float) -> str:
    return f"{value:+.4f}"


def _curves(rows: Iterable[ProbeResult]) -> list[list[ProbeResult]]:
    """Each curve's rows sorted by layer, curves in (dataset, pooling, model, N, head) order."""
    curves: dict[tuple, list[ProbeResult]] = defaultdict(list)
    for row in rows:
        curves[row.curve_key].append(row)
    order = sorted(curves, key=lambda k: (k[0], k[1], model_sort_key(k[4]), k[2], HEADS.index(k[3])))
    return [sorted(curves[key], key=lambda row: row.layer) for key in order]


def _best(points: Sequence[ProbeResult]) -> ProbeResult:
    """The layer with the highest test accuracy; the lowest such layer on ties."""
    return max(points, key=lambda row: (row.test_acc, -row.layer))


def _sizes(points: Sequence[ProbeResult]) -> str:
    """The examples a curve's probes saw: one figure, or each distinct one where layers differ."""
    sizes = sorted({(row.num_train, row.num_test) for row in points})
    return ", ".join(f"{train:,} / {test:,}" for train, test in sizes)


def _accuracy_table(curves: list[list[ProbeResult]], versus_base: Mapping[tuple, str]) -> str:
    rows = []
    for points in curves:
        first, last, best = points[0], points[-1], _best(points)
        rows.append(
            [
                first.dataset,
                first.pooling,
                first.model,
                first.num_passages,
                first.probe,
                _sizes(points),
                len(points),
                last.layer,
                _acc(last.test_acc),
                best.layer,
                _acc(best.test_acc),
                versus_base.get(first.curve_key, MISSING),
            ]
        )
    return (
        "### Accuracy per probe\n\n"
        "Test accuracy of the probe at the last layer and at its best layer. *Train / test*: examples the "
        "probes were trained on and tested on. *Layers ≠ base*: layers whose "
        "outcomes differ from the base model's (McNemar exact test, Bonferroni over the compared layers, "
        "alpha 0.05) out of the layers compared.\n\n"
        + _table(
            [
                "dataset",
                "pooling",
                "model",
                "N",
                "probe",
                "train / test",
                "layers",
                "last layer",
                "last-layer acc",
                "best layer",
                "best acc",
                "layers ≠ base",
            ],
            rows,
        )
    )


def _head_table(curves: list[list[ProbeResult]]) -> str:
    heads: dict[tuple, dict[str, list[ProbeResult]]] = defaultdict(dict)
    for points in curves:
        first = points[0]
        heads[(first.dataset, first.pooling, first.model, first.num_passages)][first.probe] = points

    def cells(by_head: dict[str, list[ProbeResult]], pick) -> list[str]:
        return [_acc(pick(by_head[head]).test_acc) if head in by_head else MISSING for head in HEADS]

    return (
        "### Probe heads\n\n"
        "`concat` is the study's probe; `passage_only` is the same probe without the query (what passage "
        "cues alone give); `query_aware` scores each passage with the query (shared weights).\n\n"
        + _table(
            [
                "dataset",
                "pooling",
                "model",
                "N",
                "chance",
                *(f"{h} (last)" for h in HEADS),
                *(f"{h} (best)" for h in HEADS),
            ],
            [
                [*key, _acc(1 / key[3]), *cells(by_head, lambda p: p[-1]), *cells(by_head, _best)]
                for key, by_head in heads.items()
            ],
        )
    )


def _published_section(rows: list[ProbeResult], out_dir: Path) -> str | None:
    """The differences from the published curves: a summary table here, every cell in a CSV file."""
    differences = compare_with_published(rows)
    if not differences:
        return None
    name = "published_differences.csv"

    def write(temporary: Path) -> None:
        with temporary.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["dataset", "pooling", "model", "num_passages", "layer", "ours", "published", "difference"])
            writer.writerows(
                [
                    d.dataset,
                    d.pooling,
                    d.model,
                    d.num_passages,
                    d.layer,
                    _acc(d.ours),
                    _acc(d.published),
                    _signed(d.difference),
                ]
                for d in differences
            )

    atomic_write(out_dir / name, write)
    by_curve: dict[tuple, list[PublishedDifference]] = defaultdict(list)
    for d in differences:
        by_curve[(d.dataset, d.pooling, d.model, d.num_passages)].append(d)
    table_rows = []
    for key in sorted(by_curve, key=lambda k: (k[0], k[1], model_sort_key(k[2]), k[3])):
        cells = by_curve[key]
        last = max(cells, key=lambda d: d.layer)
        table_rows.append(
            [
                *key,
                len(cells),
                last.layer,
                _acc(last.ours),
                _acc(last.published),
                _signed(last.difference),
                _signed(sum(d.difference for d in cells) / len(cells)),
                _acc(max(abs(d.difference) for d in cells)),
            ]
        )
    return (
        "### Differences from the published accuracies\n\n"
        "Concat probe, ours minus the study's (Figures 1-4), over the layers both have; *last layer* is "
        f"the last such layer. Every cell: [{name}]({name}).\n\n"
        + _table(
            [
                "dataset",
                "pooling",
                "model",
                "N",
                "layers compared",
                "last layer",
                "ours",
                "published",
                "difference",
                "mean difference",
                "largest abs. difference",
            ],
            table_rows,
        )
    )


def _probe_sections(
    rows: list[ProbeResult],
    out_dir: Path,
    base_models: Mapping[str, str] | None,
    published_overlay: bool,
    figure_format: str,
) -> list[str]:
    sections = ["## Linear probes"]
    versus_base: dict[tuple, str] = {}
    for dataset, pooling in sorted({(row.dataset, row.pooling) for row in rows}):
        group = [row for row in rows if (row.dataset, row.pooling) == (dataset, pooling)]
        base = base_model_for(pooling, base_models)
        name = f"probe_{_slug(dataset)}_{_slug(pooling)}.{figure_format}"
        plot_probe_curves(group, out_dir / name, dataset, pooling, base, published_overlay, figure_format)
        sections.append(
            f"### {dataset}, {pooling} pooling\n\n" + _figure_link(f"probe accuracy, {dataset}, {pooling}", name)
        )
        if base:
            flags: dict[tuple, list[bool]] = defaultdict(list)
            for result in significance_vs_base(group, base):
                flags[result.curve_key].append(result.significant)
            versus_base |= {key: f"{sum(f)}/{len(f)}" for key, f in flags.items()}
            versus_base |= {row.curve_key: "base" for row in group if row.model == base}
    curves = _curves(rows)
    published = _published_section(rows, out_dir)
    return [*sections, _accuracy_table(curves, versus_base), _head_table(curves), *([published] if published else [])]


def _comparison_pairs(runs: Sequence[AttributionRun]) -> list[tuple[int, int]]:
    """(fine-tuned or trained run, backbone or random-init run) index pairs on the same texts and pooling:
    the difference of the two is what fine-tuning, or training at all, changed."""
    same = ("dataset", "split", "text_side", "pooling")
    return [
        (i, j)
        for i, a in enumerate(runs)
        for j, b in enumerate(runs)
        if b.model in (backbone_of(a.model), control_label(a.model))
        and all(getattr(a, k) == getattr(b, k) for k in same)
        and a.kinds == b.kinds
    ]


def _attribution_sections(runs: list[AttributionRun], out_dir: Path, figure_format: str) -> list[str]:
    slugs: list[str] = []
    seen: Counter[str] = Counter()
    for run in runs:
        slug = _slug(f"{run.model}-{run.pooling}-{run.dataset}-{run.split}-{run.text_side}")
        seen[slug] += 1
        slugs.append(slug if seen[slug] == 1 else f"{slug}-{seen[slug]}")
    rows = []
    for slug, run in zip(slugs, runs):
        sides = {run.side(kind) for kind in run.kinds}
        for threshold in run.thresholds:
            rows.append(
                [
                    slug,
                    run.model,
                    run.pooling,
                    run.dataset,
                    run.split,
                    run.text_side,
                    run.num_texts,
                    f"{threshold:g}",
                    *(f"{run.active_percentage(side, threshold):.2f}" if side in sides else MISSING for side in SIDES),
                ]
            )
    sections = [
        "## Neuron attribution",
        "Mean over every neuron of a side's modules (all layers) of the percentage of texts in which the "
        "neuron is active, i.e. the percentage of active (neuron, text) pairs.\n\n"
        + _table(
            [
                "run",
                "model",
                "pooling",
                "dataset",
                "split",
                "text side",
                "texts",
                "threshold",
                *(f"{side} active %" for side in SIDES),
            ],
            rows,
        )
        + "\n\nRun folders: "
        + ", ".join(f"`{slug}` = `{run.run_dir}`" for slug, run in zip(slugs, runs)),
    ]
    name = f"active_fraction_vs_threshold.{figure_format}"
    plot_active_fraction_vs_threshold([run.run_dir for run in runs], out_dir / name, figure_format)
    sections.append(
        "### Active share against the threshold\n\n" + _figure_link("active share against the threshold", name)
    )
    for slug, run in zip(slugs, runs):
        links = []
        for threshold in run.thresholds:
            name = f"attribution_{slug}_t{threshold:g}.{figure_format}"
            plot_attribution_heatmaps(run.run_dir, out_dir / name, threshold, figure_format)
            links.append(_figure_link(f"heatmap, {slug}, threshold {threshold:g}", name))
        sections.append(f"### {run_title(run)}\n\n" + "\n\n".join(links))
    for i, j in _comparison_pairs(runs):
        links = []
        for threshold in (t for t in runs[i].thresholds if t in runs[j].thresholds):
            name = f"compare_{slugs[i]}_vs_{slugs[j]}_t{threshold:g}.{figure_format}"
            plot_attribution_comparison(runs[i].run_dir, runs[j].run_dir, out_dir / name, threshold, figure_format)
            links.append(_figure_link(f"{slugs[i]} vs {slugs[j]}, threshold {threshold:g}", name))
        if links:
            sections.append(f"### {runs[i].model} against {runs[j].model}\n\n" + "\n\n".join(links))
    return sections


def write_report(
    results_csvs: list[Path],
    attribution_dirs: list[Path],
    out_dir: Path,
    base_models: dict[str, str] | None = None,
    published_overlay: bool = True,
    figure_format: str = "png",
) -> Path:
    """Build every figure the inputs allow into ``out_dir`` and write ``out_dir/report.md``.

    ``base_models`` maps a pooling name to the model that the group's models are tested against,
    overriding the study's (bert-base-uncased for cls and mean, llama for eos); e.g.
    ``{"mean": "minilm-random"}`` for the demo. Figures are saved as ``figure_format`` (png, pdf or
    svg) and report.md links those files. Every file is written under a temporary name and renamed
    when complete. Returns the path of ``report.md``. Raises ``ValueError`` when there is no input.
    """
    if not results_csvs and not attribution_dirs:
        raise ValueError(
            "nothing to report: give results tables (--results) or attribution run folders (--attributions)"
        )
    if figure_format not in FIGURE_FORMATS:
        raise ValueError(f"unknown figure format {figure_format!r}; expected one of {', '.join(FIGURE_FORMATS)}")
    out_dir = Path(out_dir)
    rows = read_results(results_csvs)
    runs = [AttributionRun.load(run_dir) for run_dir in attribution_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = [*results_csvs, *attribution_dirs]
    sections = ["# dkacq report", "Inputs: " + ", ".join(f"`{path}`" for path in inputs)]
    if rows:
        sections += _probe_sections(rows, out_dir, base_models, published_overlay, figure_format)
    if runs:
        sections += _attribution_sections(runs, out_dir, figure_format)
    text = "\n\n".join(sections) + "\n"
    return atomic_write(out_dir / "report.md", lambda temporary: temporary.write_text(text, encoding="utf-8"))
