"""``report.md``: probe and attribution results as Markdown tables, linking every figure the inputs allow."""

import csv
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from dkacq.encoders.presets import base_model_for, comparison, control_label, declared_backbone, model_sort_key
from dkacq.formats.atomic import atomic_write
from dkacq.formats.counts import SIDES, AttributionRun
from dkacq.formats.similarity import Comparison
from dkacq.probe.baselines import METHODS, SHORTCUT
from dkacq.probe.heads import HEADS
from dkacq.report.attribution_figures import (
    draw_neuron_overlap,
    plot_active_fraction_vs_threshold,
    plot_attribution_comparison,
    plot_attribution_heatmaps,
    run_title,
)
from dkacq.report.attribution_stats import claim_table, comparable_pairs, module_share_table, share_change_table
from dkacq.report.neuron_overlap import DEFAULT_SHARE, overlap_pairs, run_overlaps
from dkacq.report.plotting import FIGURE_FORMATS, save_figure
from dkacq.report.probe_figures import plot_probe_curves
from dkacq.report.published import PublishedDifference, compare_with_published
from dkacq.report.retrieval_figures import plot_retrieval_curves, read_retrieval_results, retrieval_tables, scope_text
from dkacq.report.similarity_figures import draw_what_changed, plot_comparison
from dkacq.report.stats import (
    ProbeResult,
    has_outcomes,
    interval,
    load_correct,
    mcnemar_exact,
    per_layer,
    read_results,
    shortcut_rows,
    significance_vs_base,
)
from dkacq.report.what_changed import changed_where, summary_sentences

MISSING = "–"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _acc(value: float) -> str:
    return f"{value:.4f}"


def _ci(row: ProbeResult) -> str:
    """The row's Wilson 95% interval, ``[low, high]``."""
    bounds = interval(row)
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds else MISSING


def _acc_ci(row: ProbeResult) -> str:
    """Accuracy and its Wilson 95% interval in one cell: ``0.6090 [0.5668, 0.6497]``."""
    bounds = interval(row)
    return f"{_acc(row.test_acc)} {_ci(row)}" if bounds else _acc(row.test_acc)


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
    order = sorted(curves, key=lambda k: (k[0], k[1], model_sort_key(k[4]), k[2], METHODS.index(k[3])))
    return [sorted(curves[key], key=lambda row: row.layer) for key in order]


def _best(points: Sequence[ProbeResult]) -> ProbeResult:
    """The layer with the highest test accuracy; the lowest such layer on ties."""
    return max(points, key=lambda row: (row.test_acc, -row.layer))


def _sizes(points: Sequence[ProbeResult]) -> str:
    """The examples a curve's probes saw: one figure, or each distinct one where layers differ."""
    sizes = sorted({(row.num_train, row.num_test) for row in points})
    return ", ".join(f"{train:,} / {test:,}" for train, test in sizes)


def _accuracy_table(curves: list[list[ProbeResult]], versus_base: Mapping[tuple, str], title: str = "") -> str:
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
                _ci(last),
                best.layer,
                _acc(best.test_acc),
                _ci(best),
                versus_base.get(first.curve_key, MISSING),
            ]
        )
    return (
        f"### Accuracy per probe{title}\n\n"
        "Test accuracy of the probe at the last layer and at its best layer, with Wilson 95% intervals. "
        "*Train / test*: examples the probes were trained on and tested on. *Layers ≠ base*: layers whose "
        "outcomes differ from the base model's (McNemar exact test, Bonferroni over the compared layers, "
        "alpha 0.05) out of the layers compared. The `similarity_*` rows are untrained: the layer's own "
        "cosine or dot product of query and passage vectors picks the passage.\n\n"
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
                "last-layer 95% CI",
                "best layer",
                "best acc",
                "best 95% CI",
                "layers ≠ base",
            ],
            rows,
        )
    )


def _head_table(curves: list[list[ProbeResult]], title: str = "") -> str:
    heads: dict[tuple, dict[str, list[ProbeResult]]] = defaultdict(dict)
    for points in curves:
        first = points[0]
        heads[(first.dataset, first.pooling, first.model, first.num_passages)][first.probe] = points
    shown = [method for method in METHODS if any(method in by_head for by_head in heads.values())]

    def cells(by_head: dict[str, list[ProbeResult]], pick) -> list[str]:
        return [_acc_ci(pick(by_head[method])) if method in by_head else MISSING for method in shown]

    return (
        f"### Probe heads and baselines{title}\n\n"
        "Test accuracy with its Wilson 95% interval, at the last layer and at each method's best layer. "
        "`concat` is the study's probe; `passage_only` is the same probe without the query (what passage "
        "cues alone give); `query_aware` scores each passage with the query (shared weights over "
        "`q * p_k` and `p_k`); `bilinear` scores `(U q) . (V p_k) + w . p_k` with U, V of low rank; "
        "`residual_bilinear` scores `s q . p_k + (U q) . (V p_k)`, starting at the untrained similarity "
        "(its epoch 0, validated before any step, competes for the best epoch). "
        "`similarity_cosine` and `similarity_dot` are not trained: the passage most similar to the "
        "query at that layer is picked.\n\n"
        + _table(
            [
                "dataset",
                "pooling",
                "model",
                "N",
                "chance",
                *(f"{h} (last)" for h in shown),
                *(f"{h} (best)" for h in shown),
            ],
            [
                [*key, _acc(1 / key[3]), *cells(by_head, lambda p: p[-1]), *cells(by_head, _best)]
                for key, by_head in heads.items()
            ],
        )
    )


def _shortcut_section(rows: list[ProbeResult]) -> str | None:
    """Per data set and N, the query-blind shortcut's accuracy (settings on the same examples share a row)."""
    shortcuts = shortcut_rows(rows)
    if not shortcuts:
        return None
    groups: dict[tuple, list[ProbeResult]] = defaultdict(list)
    for row in shortcuts:
        groups[(row.dataset, row.num_passages, row.num_train, row.num_test, row.test_acc)].append(row)
    table_rows = []
    for (dataset, n, train, test, _), group in sorted(groups.items()):
        first = group[0]
        settings = ", ".join(sorted({f"{row.model} ({row.pooling})" for row in group}, key=model_sort_key))
        table_rows.append(
            [dataset, n, f"{train:,} / {test:,}", _acc(1 / n), _acc(first.test_acc), _ci(first), settings]
        )
    return (
        f"### Query-blind shortcut ({SHORTCUT})\n\n"
        "No vectors and no query: on each test item, pick the shown passage that occurs least often as a "
        "negative in the training split (ties: the first such position). Where this beats chance, "
        "passages recur as negatives and a probe that never compares query and passage (`concat`, "
        "`passage_only`) can beat chance by recognising them; a query-blind curve near this level is "
        "explained by it.\n\n"
        + _table(["dataset", "N", "train / test", "chance", "shortcut acc", "95% CI", "settings"], table_rows)
    )


def _convergence_section(rows: list[ProbeResult], title: str = "") -> str | None:
    """The trained cells whose tested checkpoint was their last validated epoch."""
    recorded = [row for row in rows if row.trained and row.best_is_last is not None]
    if not recorded:
        return None
    last = sorted(
        (row for row in recorded if row.best_is_last),
        key=lambda r: (r.dataset, r.pooling, model_sort_key(r.model), r.num_passages, METHODS.index(r.probe), r.layer),
    )
    text = (
        f"### Cells whose best epoch was the last{title}\n\n"
        f"{len(last)} of {len(recorded)} fitted probes were best at the last epoch validated: they may "
        "still have been improving when training stopped."
    )
    if not last:
        return text
    return (
        text
        + "\n\n"
        + _table(
            [
                "dataset",
                "pooling",
                "model",
                "N",
                "probe",
                "layer",
                "best epoch",
                "epochs run",
                "max epochs",
                "test acc",
            ],
            [
                [
                    r.dataset,
                    r.pooling,
                    r.model,
                    r.num_passages,
                    r.probe,
                    r.layer,
                    MISSING if r.best_epoch is None else r.best_epoch,
                    MISSING if r.epochs_run is None else r.epochs_run,
                    MISSING if r.max_epochs is None else r.max_epochs,
                    _acc_ci(r),
                ]
                for r in last
            ],
        )
    )


def _published_section(rows: list[ProbeResult], out_dir: Path, title: str = "", suffix: str = "") -> str | None:
    """The differences from the published curves: a summary table here, every cell in a CSV file."""
    differences = compare_with_published(per_layer(rows))
    if not differences:
        return None
    name = f"published_differences{suffix}.csv"

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
        f"### Differences from the published accuracies{title}\n\n"
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
    mode: str | None = None,
) -> list[str]:
    """The sections of one fitting mode's rows (all rows when there is one mode: ``mode`` None)."""
    title = f" ({mode})" if mode else ""
    suffix = f"_{_slug(mode)}" if mode else ""
    sections = [f"## Linear probes{': ' + mode if mode else ''}"]
    versus_base: dict[tuple, str] = {}
    for dataset, pooling in sorted({(row.dataset, row.pooling) for row in per_layer(rows)}):
        group = [row for row in rows if (row.dataset, row.pooling) == (dataset, pooling)]
        base = base_model_for(pooling, base_models)
        name = f"probe_{_slug(dataset)}_{_slug(pooling)}{suffix}.{figure_format}"
        plot_probe_curves(group, out_dir / name, dataset, pooling, base, published_overlay, figure_format)
        sections.append(
            f"### {dataset}, {pooling} pooling{title}\n\n"
            + _figure_link(f"probe accuracy, {dataset}, {pooling}{title}", name)
        )
        if base:
            flags: dict[tuple, list[bool]] = defaultdict(list)
            for result in significance_vs_base(group, base):
                flags[result.curve_key].append(result.significant)
            versus_base |= {key: f"{sum(f)}/{len(f)}" for key, f in flags.items()}
            versus_base |= {row.curve_key: "base" for row in group if row.model == base}
    sections += _pair_sections(rows, out_dir, figure_format, title, suffix)
    curves = _curves(per_layer(rows))
    extra = [
        _published_section(rows, out_dir, title, suffix),
        _shortcut_section(rows) if not mode else None,
        _convergence_section(rows, title),
    ]
    return [
        *sections,
        _accuracy_table(curves, versus_base, title),
        _head_table(curves, title),
        *(section for section in extra if section),
    ]


def _pair_sections(rows: list[ProbeResult], out_dir: Path, figure_format: str, title: str, suffix: str) -> list[str]:
    """Each model probed with a declared backbone (``data.backbone``, see encoders.presets.backbone_label) drawn with
    it, and with its random-init control where that was probed, and tested against each, layer by layer
    (McNemar exact test, Bonferroni over the compared layers), as a pooling group is against its base."""
    sections = []
    for dataset, pooling in sorted({(row.dataset, row.pooling) for row in per_layer(rows)}):
        group = [row for row in rows if (row.dataset, row.pooling) == (dataset, pooling)]
        present = {row.model for row in group}
        for model in sorted(present, key=model_sort_key):
            backbone = declared_backbone(model, present)
            if backbone is None:
                continue
            control = control_label(model) if control_label(model) in present else None
            members = [model, backbone, *([control] if control else [])]
            pair = [row for row in group if row.model in members]
            tests = {base: [r for r in significance_vs_base(pair, base) if r.model == model] for base in members[1:]}
            table_rows = []
            for points in _curves(per_layer([row for row in pair if row.model == model])):
                key, last = points[0].curve_key[:4], points[-1]
                cells = [last.num_passages, last.probe, last.layer, _acc(last.test_acc)]
                for base in members[1:]:
                    flags = [result.significant for result in tests[base] if result.curve_key[:4] == key]
                    cells.append(f"{sum(flags)}/{len(flags)}" if flags else MISSING)
                table_rows.append(cells)
            name = f"pair_{_slug(dataset)}_{_slug(pooling)}_{_slug(model)}{suffix}.{figure_format}"
            plot_probe_curves(pair, out_dir / name, dataset, pooling, backbone, False, figure_format)
            header = ["N", "probe", "last layer", "acc", f"layers ≠ {backbone} (fine-tuned vs its backbone)"]
            if control:
                header.append(f"layers ≠ {control} (trained vs its random-init control)")
            sections.append(
                f"### {model} against its backbone, {dataset}, {pooling} pooling{title}\n\n"
                f"{model} and its backbone {backbone}, read with {model}'s settings"
                + (f", and its random-init control {control}" if control else "")
                + ": layers whose test outcomes differ (McNemar exact test, Bonferroni over the compared layers, "
                "alpha 0.05) out of the layers compared; marks in the figure are against the backbone.\n\n"
                + _figure_link(f"{model} against its backbone, {dataset}, {pooling}{title}", name)
                + "\n\n"
                + _table(header, table_rows)
            )
    return sections


def fitting_modes(rows: Sequence[ProbeResult]) -> list[str]:
    """The distinct fittings of the trained rows (:attr:`ProbeResult.fitting`), fewest epochs first."""
    modes = {row.fitting for row in rows if row.trained}
    return sorted(modes, key=lambda mode: (bool("early stopping" in mode), len(mode), mode))


def _mode_rows(rows: Sequence[ProbeResult], mode: str) -> list[ProbeResult]:
    """One mode's trained rows with every untrained row (baselines belong to every mode)."""
    return [row for row in rows if not row.trained or row.fitting == mode]


def _verdict(head: str, a: ProbeResult, b: ProbeResult, alpha: float = 0.05) -> tuple[str, str]:
    """(p-value, verdict) of head ``a`` against concat ``b`` on the same test items (McNemar)."""
    if not (has_outcomes(a) and has_outcomes(b)):
        sign = "higher" if a.test_acc > b.test_acc else "lower" if a.test_acc < b.test_acc else "equal"
        return MISSING, f"{head} {sign} (not tested)"
    p_value = mcnemar_exact(load_correct(a.predictions), load_correct(b.predictions))
    if p_value >= alpha:
        return f"{p_value:.3g}", "no significant difference"
    return f"{p_value:.3g}", f"{head} better" if a.test_acc > b.test_acc else "concat better"


def _modes_section(rows: list[ProbeResult], modes: list[str]) -> str:
    """The fitting modes side by side: how each fit went, and whether each head's comparison with
    concat at the last layer reaches the same conclusion in every mode."""
    summary = []
    for mode in modes:
        trained = [row for row in rows if row.trained and row.fitting == mode]
        recorded = [row for row in trained if row.best_is_last is not None]
        epochs = [row.epochs_run for row in trained if row.epochs_run is not None]
        steps = [row.optimizer_steps for row in trained if row.optimizer_steps is not None]
        seconds = [row.fit_seconds for row in trained if row.fit_seconds is not None]
        summary.append(
            [
                mode or "not recorded",
                len(trained),
                f"{sum(row.best_is_last for row in recorded)}/{len(recorded)}" if recorded else MISSING,
                f"{statistics.median(epochs):g}" if epochs else MISSING,
                f"{statistics.median(steps):g}" if steps else MISSING,
                f"{sum(seconds):.0f}" if seconds else MISSING,
            ]
        )
    by_cell: dict[tuple, dict[str, dict[str, dict[int, ProbeResult]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict))
    )
    for row in rows:
        if row.trained:
            by_cell[(row.dataset, row.pooling, row.model, row.num_passages)][row.fitting][row.probe][row.layer] = row
    comparisons, changed = [], []
    for key in sorted(by_cell, key=lambda k: (k[0], k[1], model_sort_key(k[2]), k[3])):
        by_mode = by_cell[key]
        if any(mode not in by_mode or "concat" not in by_mode[mode] for mode in modes):
            continue
        for head in HEADS[1:]:
            if any(head not in by_mode[mode] for mode in modes):
                continue
            layers = set.intersection(*(set(by_mode[mode][head]) & set(by_mode[mode]["concat"]) for mode in modes))
            if not layers:
                continue
            layer = max(layers)
            verdicts = []
            cells = []
            for mode in modes:
                a, b = by_mode[mode][head][layer], by_mode[mode]["concat"][layer]
                p_value, verdict = _verdict(head, a, b)
                verdicts.append(verdict)
                cells += [f"{_acc(a.test_acc)} vs {_acc(b.test_acc)}", p_value, verdict]
            same = len(set(verdicts)) == 1
            comparisons.append([*key, f"{head} vs concat", layer, *cells, "no" if same else "**yes**"])
            if not same:
                changed.append(f"{key[2]} N={key[3]} {head} vs concat at layer {layer}")
    text = (
        "## Fitting modes compared\n\n"
        "The same settings fitted in each mode; untrained baselines are shared. *Best = last*: fitted "
        "probes whose best validation epoch was the last one validated.\n\n"
        + _table(
            ["mode", "fitted probes", "best = last", "median epochs run", "median optimizer steps", "fit time (s)"],
            summary,
        )
    )
    if not comparisons:
        return text + "\n\nNo setting was fitted in every mode with concat and another head: nothing to compare."
    verdict = (
        f"The conclusions change in {len(changed)} of {len(comparisons)} comparisons: " + "; ".join(changed) + "."
        if changed
        else f"The conclusions are the same in every mode ({len(comparisons)} comparisons)."
    )
    header = ["dataset", "pooling", "model", "N", "comparison", "layer"]
    for mode in modes:
        header += [f"acc ({mode})", f"p ({mode})", f"verdict ({mode})"]
    return (
        text + "\n\n### Head against concat at the last layer, per mode\n\n"
        "Each head against `concat` at the last layer both probed, in every mode: accuracies, the "
        "McNemar exact p-value on the shared test items, and the verdict at alpha 0.05 (one test per "
        "comparison, uncorrected). *Changes*: whether the verdicts differ between modes.\n\n"
        + _table([*header, "changes"], comparisons)
        + "\n\n"
        + verdict
    )


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
    for title, (header, table_rows) in (
        ("The paper's claims, measured", claim_table(runs)),
        (
            "Against the backbone or the random-init control, per layer (paired over texts; * Bonferroni over layers)",
            share_change_table(runs),
        ),
        ("Active share per layer, 95% bootstrap interval over texts", module_share_table(runs)),
    ):
        if table_rows:
            sections.append(f"### {title}\n\n" + _table(header, table_rows))
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
    for i, j in (pair for pair in comparable_pairs(runs) if runs[pair[0]].kinds == runs[pair[1]].kinds):
        links = []
        for threshold in (t for t in runs[i].thresholds if t in runs[j].thresholds):
            name = f"compare_{slugs[i]}_vs_{slugs[j]}_t{threshold:g}.{figure_format}"
            plot_attribution_comparison(runs[i].run_dir, runs[j].run_dir, out_dir / name, threshold, figure_format)
            links.append(_figure_link(f"{slugs[i]} vs {slugs[j]}, threshold {threshold:g}", name))
        if links:
            what = comparison(runs[i].model, runs[j].model, {run.model for run in runs})
            sections.append(f"### {runs[i].model} against {runs[j].model} ({what})\n\n" + "\n\n".join(links))
    return sections


def _what_changed_sections(
    comparisons: list[Comparison],
    rows: list[ProbeResult],
    runs: list[AttributionRun],
    out_dir: Path,
    figure_format: str,
) -> list[str]:
    """Per compared pair: one figure of CKA, probe accuracy and attribution change per hidden state, the
    sentences that state its numbers, the CKA heatmaps, and the numbers as a table."""
    sections = [
        "## What changed where",
        "Per pair of models compared with `dkacq compare` (docs/what-changed.md): linear and debiased CKA "
        "between the two models' vectors of the same texts at each hidden state (1: the same representation "
        "up to rotation and scale), the probe's test accuracy of both, and the change of the active share of "
        "attributed neurons, paired over texts with its 95% bootstrap interval (the feed-forward modules of "
        "layer l feed hidden state l + 1).",
    ]
    for compared in comparisons:
        changed = changed_where(compared, rows, runs)
        a, b = changed.models
        slug = _slug(f"{a}-vs-{b}-{compared.summary.get('dataset', '')}")
        name = f"what_changed_{slug}.{figure_format}"
        save_figure(draw_what_changed(changed), out_dir / name, figure_format)
        heatmap, _ = plot_comparison(compared, out_dir / f"cka_{slug}", figure_format)
        probe = {model: {row.layer: row for row in changed.probe.get(model, [])} for model in (a, b)}
        shares = {(row.kind, row.layer + 1): row for row in changed.shares}
        kinds = list(dict.fromkeys(row.kind for row in changed.shares))
        layers = sorted({row.layer_a for rows in changed.diagonals.values() for row in rows})
        table_rows = []
        for layer in layers:
            cka = [
                next((f"{row.cka:.3f} / {row.debiased_cka:.3f}" for row in rows if row.layer_a == layer), MISSING)
                for rows in changed.diagonals.values()
            ]
            accuracy = [_acc(probe[m][layer].test_acc) if layer in probe[m] else MISSING for m in (a, b)]
            gain = (
                _signed(probe[a][layer].test_acc - probe[b][layer].test_acc)
                if layer in probe[a] and layer in probe[b]
                else MISSING
            )
            change = [
                f"{shares[kind, layer].change:+.2f} [{shares[kind, layer].change_low:+.2f}, "
                f"{shares[kind, layer].change_high:+.2f}]"
                if (kind, layer) in shares
                else MISSING
                for kind in kinds
            ]
            table_rows.append([layer, *cka, *accuracy, gain, *change])
        header = [
            "hidden state",
            *(f"CKA {side} (linear / debiased)" for side in changed.diagonals),
            *(
                (f"{changed.head} acc {a}", f"{changed.head} acc {b}", "gain")
                if changed.head
                else ("probe acc a", "probe acc b", "gain")
            ),
            *(f"{kind} active share change (points)" for kind in kinds),
        ]
        sections.append(
            f"### {a} against {b}\n\n"
            + _figure_link(f"what changed where, {a} against {b}", name)
            + "\n\n"
            + " ".join(summary_sentences(changed))
            + "\n\n"
            + _table(header, table_rows)
            + "\n\nEvery layer pair: "
            + _figure_link(f"CKA heatmaps, {a} against {b}", heatmap.relative_to(out_dir).as_posix())
            + f"\n\nRows: `{compared.folder}`."
        )
    return sections


def _shared_neuron_sections(runs: list[AttributionRun], out_dir: Path, figure_format: str) -> list[str]:
    """Per pair of runs on the same texts whose neuron sets can be matched (:func:`overlap_pairs`)."""
    pairs = overlap_pairs(runs)
    if not pairs:
        return []
    sections = [
        "## Shared neurons",
        "Jaccard overlap of the two runs' active neurons per layer and module: *per text* (the mean over "
        "texts of |A_t ∩ B_t| / |A_t ∪ B_t|) and of the *frequent sets* (neurons active in at least "
        f"{DEFAULT_SHARE:.0%} of the texts), each with its 95% bootstrap interval over texts and, in "
        "parentheses, the exact expectation for random sets of the same sizes (hypergeometric).",
    ]
    for i, j in pairs:
        a, b = runs[i], runs[j]
        threshold = next(t for t in a.thresholds if t in b.thresholds)
        rows = run_overlaps(a, b, threshold)
        title = f"{run_title(a)} against {run_title(b)}, threshold {threshold:g}"
        name = f"shared_neurons_{_slug(a.run_dir.name)}_vs_{_slug(b.run_dir.name)}.{figure_format}"
        save_figure(draw_neuron_overlap(rows, title), out_dir / name, figure_format)
        table_rows = [
            [
                row.kind,
                row.layer,
                f"{row.overlap.per_text.value:.3f} [{row.overlap.per_text.low:.3f}, {row.overlap.per_text.high:.3f}] "
                f"({row.overlap.per_text.random:.3f})",
                f"{row.overlap.frequent.value:.3f} [{row.overlap.frequent.low:.3f}, {row.overlap.frequent.high:.3f}] "
                f"({row.overlap.frequent.random:.3f})",
                f"{row.overlap.frequent_sizes[0]:,} / {row.overlap.frequent_sizes[1]:,}",
                row.overlap.texts,
            ]
            for row in rows
        ]
        sections.append(
            f"### {title}\n\n"
            + _figure_link(f"shared neurons, {title}", name)
            + "\n\n"
            + _table(["kind", "layer", "per text", "frequent sets", "frequent set sizes", "texts"], table_rows)
        )
    return sections


def _retrieval_sections(results_csvs: list[Path], out_dir: Path, figure_format: str) -> list[str]:
    """Per collection, each probed layer's untrained similarity as a retriever (the ``retrieval.csv``
    written beside a results table): a figure against the layer, and per curve its best layer and its
    last layer."""
    rows = read_retrieval_results(retrieval_tables(results_csvs))
    if not rows:
        return []
    sections = [
        "## Each layer as a retriever\n\n"
        "The test queries rank passages by each layer's untrained similarity (the cached pooling; cosine and "
        "dot product), scored with the judgements: nDCG@10, MRR@10, Recall@100 (`retrieval.csv`). Scope "
        "`corpus`: every passage of the corpus ranked; `pool`: each query re-ranks its BM25 top 100 and its "
        "judged passages, so Recall@100 counts only what BM25 or the judgements brought."
    ]
    for dataset in sorted({row.dataset for row in rows}):
        group = [row for row in rows if row.dataset == dataset]
        name = f"retrieval_{_slug(dataset)}.{figure_format}"
        plot_retrieval_curves(group, out_dir / name, dataset, figure_format)
        table = []
        for curve in sorted({row.curve for row in group}, key=lambda c: (model_sort_key(c[1]), c[2], c[3])):
            points = sorted((row for row in group if row.curve == curve), key=lambda row: row.layer)
            best, last = max(points, key=lambda row: (row.ndcg, -row.layer)), points[-1]
            table.append(
                [
                    curve[1],
                    curve[2],
                    curve[3],
                    "/".join(sorted({row.scope for row in points})),
                    best.layer,
                    f"{best.ndcg:.3f}",
                    f"{best.mrr:.3f}",
                    f"{best.recall:.3f}",
                    last.layer,
                    f"{last.ndcg:.3f}",
                    f"{last.mrr:.3f}",
                    f"{last.recall:.3f}",
                ]
            )
        header = ["model", "pooling", "similarity", "scope", "best layer", "nDCG@10", "MRR@10", "R@100"]
        header += ["last layer", "nDCG@10", "MRR@10", "R@100"]
        sections.append(
            f"### {dataset}: {scope_text(group)}\n\n"
            + _figure_link(f"retrieval measures per layer, {dataset}", name)
            + "\n\n"
            + _table(header, table)
        )
    return sections


def write_report(
    results_csvs: list[Path],
    attribution_dirs: list[Path],
    out_dir: Path,
    base_models: dict[str, str] | None = None,
    published_overlay: bool = True,
    figure_format: str = "png",
    comparison_dirs: list[Path] | None = None,
) -> Path:
    """Build every figure the inputs allow into ``out_dir`` and write ``out_dir/report.md``.

    ``base_models`` maps a pooling name to the model that the group's models are tested against,
    overriding the study's (bert-base-uncased for cls and mean, llama for eos); e.g.
    ``{"mean": "minilm-random"}`` for the demo. Figures are saved as ``figure_format`` (png, pdf or
    svg) and report.md links those files.

    Rows of trained probes fitted in different ways (:attr:`ProbeResult.fitting`: e.g. a table of 30
    epochs and one of early stopping, for the same settings) are reported as modes: each mode's figures
    and tables (the untrained baselines in every one), then the modes compared (how each fit went, and
    whether each head's verdict against concat at the last layer is the same in every mode).
    ``comparison_dirs`` (``dkacq compare`` folders) add the "What changed where" section; attribution runs
    with per-text active sets on the same texts add "Shared neurons". Every file is written under a temporary name and renamed
    when complete. Returns the path of ``report.md``. Raises ``ValueError`` when there is no input.
    """
    comparison_dirs = list(comparison_dirs or [])
    if not results_csvs and not attribution_dirs and not comparison_dirs:
        raise ValueError(
            "nothing to report: give results tables (--results) or attribution run folders (--attributions)"
        )
    if figure_format not in FIGURE_FORMATS:
        raise ValueError(f"unknown figure format {figure_format!r}; expected one of {', '.join(FIGURE_FORMATS)}")
    out_dir = Path(out_dir)
    rows = read_results(results_csvs)
    runs = [AttributionRun.load(run_dir) for run_dir in attribution_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    comparisons = [Comparison.load(folder) for folder in comparison_dirs]
    inputs = [*results_csvs, *attribution_dirs, *comparison_dirs]
    sections = ["# dkacq report", "Inputs: " + ", ".join(f"`{path}`" for path in inputs)]
    modes = fitting_modes(rows)
    if rows and len(modes) <= 1:
        sections += _probe_sections(rows, out_dir, base_models, published_overlay, figure_format)
    elif rows:
        for mode in modes:
            mode_rows = _mode_rows(rows, mode)
            sections += _probe_sections(
                mode_rows, out_dir, base_models, published_overlay, figure_format, mode or "not recorded"
            )
        shortcut = _shortcut_section(rows)
        sections += [*([shortcut] if shortcut else []), _modes_section(rows, modes)]
    sections += _retrieval_sections(results_csvs, out_dir, figure_format)
    if runs:
        sections += _attribution_sections(runs, out_dir, figure_format)
        sections += _shared_neuron_sections(runs, out_dir, figure_format)
    if comparisons:
        sections += _what_changed_sections(comparisons, rows, runs, out_dir, figure_format)
    text = "\n\n".join(sections) + "\n"
    return atomic_write(out_dir / "report.md", lambda temporary: temporary.write_text(text, encoding="utf-8"))
