"""Figures built from small synthetic inputs written here; the builders are shared with test_summary."""

import ast
import csv
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from PIL import Image
from safetensors.torch import load_file, save_file
from scipy.stats import binomtest

import dkacq.report
from dkacq.probe.baselines import BASELINES, METHODS
from dkacq.probe.heads import HEADS
from dkacq.report.attribution_figures import (
    bin_active_shares,
    draw_active_fraction_vs_threshold,
    draw_attribution_comparison,
    draw_attribution_heatmaps,
    plot_active_fraction_vs_threshold,
    plot_attribution_comparison,
    plot_attribution_heatmaps,
)
from dkacq.report.plotting import save_figure
from dkacq.report.probe_figures import METHOD_STYLES, draw_probe_curves, plot_probe_curves, probe_curve_series
from dkacq.report.published import compare_with_published, published_curve
from dkacq.report.stats import read_results

MODELS = ("bert-base-uncased", "dpr-question")
NUM_PASSAGES = (2, 5)
PROBES = ("concat", "passage_only", "query_aware")
LAYERS = (0, 1, 2)
NUM_TEST = 120
NUM_TRAIN = {2: 1480, 5: 960}
"""Training examples per N, as a results table would state them."""
COLUMNS = [
    "dataset",
    "model",
    "pooling",
    "num_passages",
    "layer",
    "probe",
    "best_epoch",
    "val_acc",
    "test_acc",
    "num_train",
    "num_test",
    "predictions",
]
FORMATS = ("png", "pdf", "svg")


def write_results(folder: Path, seed: int = 0) -> tuple[Path, dict[tuple, np.ndarray]]:
    """A results.csv (nq, cls) with prediction files; returns it and the outcomes by
    (model, N, probe, layer). dpr-question's query_aware head is much better than the base's, so some
    layers differ significantly and others do not."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    outcomes: dict[tuple, np.ndarray] = {}
    records = []
    for model in MODELS:
        for n in NUM_PASSAGES:
            labels = torch.from_numpy(rng.integers(0, n, NUM_TEST))
            for probe in PROBES:
                for layer in LAYERS:
                    rate = 1 / n + 0.05 * layer + (0.3 if probe == "query_aware" and model != MODELS[0] else 0)
                    correct = rng.random(NUM_TEST) < min(rate, 0.95)
                    prediction = torch.where(torch.from_numpy(correct), labels, (labels + 1) % n)
                    name = f"predictions/{model}-{n}-{probe}-{layer}.safetensors"
                    (folder / name).parent.mkdir(exist_ok=True)
                    save_file(
                        {
                            "correct": torch.from_numpy(correct.astype(np.uint8)),
                            "prediction": prediction,
                            "label": labels,
                        },
                        str(folder / name),
                    )
                    outcomes[(model, n, probe, layer)] = correct
                    records.append(
                        [
                            "nq",
                            model,
                            "cls",
                            n,
                            layer,
                            probe,
                            int(rng.integers(1, 30)),
                            round(float(rng.random()), 4),
                            float(correct.mean()),
                            NUM_TRAIN[n],
                            NUM_TEST,
                            name,
                        ]
                    )
    path = folder / "results.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(records)
    return path, outcomes


def write_attribution_run(folder: Path, model: str, seed: int = 0, num_texts: int = 50) -> Path:
    """A BERT-like run: intermediate (3 x 37 neurons) and output (3 x 23), thresholds 0.1 and 0.2."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {"intermediate": ("intermediate", 37), "output": ("output", 23)}
    tensors = {"num_texts": torch.tensor(num_texts, dtype=torch.int64)}
    for kind, (_, neurons) in kinds.items():
        loose = rng.integers(0, num_texts + 1, (3, neurons))
        tensors[f"{kind}@0.1"] = torch.from_numpy(loose)
        tensors[f"{kind}@0.2"] = torch.from_numpy(rng.integers(0, loose + 1))
    save_file(tensors, str(folder / "counts.safetensors"))
    summary = {
        "model": model,
        "preset": model,
        "pooling": "cls",
        "dataset": "nq",
        "split": "test",
        "text_side": "query",
        "thresholds": [0.1, 0.2],
        "num_texts": num_texts,
        "kinds": {kind: {"side": side, "num_layers": 3, "num_neurons": n} for kind, (side, n) in kinds.items()},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def shipped_published_rows() -> list[dict[str, str]]:
    with (Path(dkacq.report.__file__).parent / "published_probe_accuracy.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def shipped_curve(dataset: str, pooling: str, model: str, num_passages: int) -> list[tuple[int, float, bool]]:
    """(layer, acc, sig) of one published curve, read with the csv module."""
    return sorted(
        (int(r["layer"]), float(r["acc"]), r["sig_vs_base"] == "1")
        for r in shipped_published_rows()
        if (r["dataset"], r["pooling"], r["model"], int(r["num_passages"])) == (dataset, pooling, model, num_passages)
    )


def write_table(folder: Path, records: list[dict]) -> Path:
    """A results.csv of the given rows (dataset nq, pooling cls, N 2 and head concat unless given); a
    row's ``correct`` (0/1 list) is written as its outcome file, otherwise the row names none."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, record in enumerate(records):
        row = {
            "dataset": "nq",
            "pooling": "cls",
            "num_passages": 2,
            "probe": "concat",
            "best_epoch": 1,
            "val_acc": 0.5,
            "num_train": 100,
            "num_test": 10,
            "predictions": "",
            **record,
        }
        correct = row.pop("correct", None)
        if correct is not None:
            row["predictions"] = f"predictions/{i}.safetensors"
            (folder / "predictions").mkdir(exist_ok=True)
            labels = torch.zeros(len(correct), dtype=torch.int64)
            save_file(
                {
                    "correct": torch.tensor(correct, dtype=torch.uint8),
                    "prediction": 1 - torch.tensor(correct),
                    "label": labels,
                },
                str(folder / row["predictions"]),
            )
            row.setdefault("test_acc", float(np.mean(correct)))
        rows.append(row)
    path = folder / "results.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def naive_bins(counts: np.ndarray, num_texts: int, bins: int = 10) -> np.ndarray:
    """The share (%) of a consecutive neuron bin's neurons active per text, on average over the texts, by
    loops over texts and neurons (the first ``neurons % bins`` bins one neuron larger): text t activates
    neuron n when t < counts[n] (any assignment with those counts gives the same average)."""
    layers, neurons = counts.shape
    expected = np.zeros((layers, bins))
    start = 0
    for b in range(bins):
        size = neurons // bins + (1 if b < neurons % bins else 0)
        for layer in range(layers):
            shares = []
            for text in range(num_texts):
                active = sum(1 for neuron in range(start, start + size) if text < counts[layer, neuron])
                shares.append(active / size * 100)
            expected[layer, b] = sum(shares) / num_texts
        start += size
    assert start == neurons
    return expected


def flagged_layers(outcomes: dict[tuple, np.ndarray], model: str, base: str, n: int, probe: str) -> set[int]:
    """Layers at which ``model`` differs from ``base``: McNemar by scipy's binomial test, Bonferroni over LAYERS."""
    flagged = set()
    for layer in LAYERS:
        a, b = outcomes[(model, n, probe, layer)], outcomes[(base, n, probe, layer)]
        only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
        p_value = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        if p_value * len(LAYERS) < 0.05:
            flagged.add(layer)
    return flagged


def file_format(path: Path) -> str:
    """What the saved file is, read from its content: png, pdf or svg."""
    data = path.read_bytes()
    if data.startswith(b"\x89PNG"):
        with Image.open(path) as image:
            image.verify()
        return "png"
    if data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF"):
        return "pdf"
    if ElementTree.fromstring(data).tag == "{http://www.w3.org/2000/svg}svg":
        return "svg"
    raise AssertionError(f"{path}: neither PNG, PDF nor SVG")


def assert_figure_file(path: Path, figure_format: str) -> None:
    """A saved figure of the given format: a whole file of that format (its content is checked on
    the Figure, by the tests of the draw_* functions)."""
    assert path.is_file() and path.suffix == f".{figure_format}"
    assert file_format(path) == figure_format


def drawn(ax: Axes) -> dict[str, tuple[list[float], list[float]]]:
    """Label -> (x, y) of every line drawn on ``ax`` (axhline and legend handles have no data label)."""
    return {
        line.get_label(): (list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
        for line in ax.get_lines()
    }


def probe_panels(figure: Figure) -> dict[int, Axes]:
    """N -> its panel, read from the panel titles ("N = 5 passages ...")."""
    return {int(ax.get_title().split()[2]): ax for ax in figure.axes if ax.get_title().startswith("N = ")}


@pytest.fixture
def results(tmp_path):
    return write_results(tmp_path / "probe")


def test_bin_active_shares_equals_naive_loop():
    rng = np.random.default_rng(1)
    for neurons, bins in [(37, 10), (30, 10), (10, 10), (23, 4)]:
        counts = rng.integers(0, 41, (4, neurons))
        np.testing.assert_allclose(bin_active_shares(counts, 40, bins), naive_bins(counts, 40, bins))


def test_a_line_breaks_at_missing_layers(tmp_path):
    rows = read_results(
        [write_table(tmp_path, [{"model": "m", "layer": layer, "test_acc": 0.5} for layer in (0, 1, 6)])]
    )
    (panel,) = probe_panels(draw_probe_curves(rows, "nq", "cls", published_overlay=False)).values()
    x, y = drawn(panel)["m concat"]
    assert x == [0, 1, 2, 3, 4, 5, 6]
    assert y[:2] == [0.5, 0.5] and all(np.isnan(y[2:6])) and y[6] == 0.5


def test_a_bin_with_one_always_active_neuron_is_not_shown_as_all_active():
    """What made the published maxima read 100% for a random-init control: one neuron per bin active in
    every text. The share says 1 neuron in 10."""
    counts = np.zeros((2, 100), dtype=int)
    counts[:, ::10] = 40
    np.testing.assert_allclose(bin_active_shares(counts, 40), np.full((2, 10), 10.0))


def test_bin_active_shares_rejects_too_few_neurons():
    with pytest.raises(ValueError):
        bin_active_shares(np.ones((2, 5)), 10)


def test_published_curve_equals_shipped_csv():
    assert len(shipped_published_rows()) == 1152
    for curve in [("nq", "cls", "dpr-question", 2), ("msmarco", "eos", "repllama", 3), ("nq", "mean", "contriever", 5)]:
        layers, acc, sig = published_curve(*curve)
        assert len(layers) in (13, 33)
        assert list(zip(layers.tolist(), acc.tolist(), sig.tolist())) == shipped_curve(*curve)
    reference_eos = published_curve("nq", "eos_reference", "llama", 4)
    assert reference_eos[1].tolist() == published_curve("nq", "eos", "llama", 4)[1].tolist()
    assert all(len(array) == 0 for array in published_curve("demo", "mean", "minilm", 2))


def test_overlay_series_equal_shipped_csv(results):
    rows = read_results([results[0]])
    published = [s for s in probe_curve_series(rows, "nq", "cls") if s.published]
    expected_curves = {(m, n, "concat") for m in MODELS for n in NUM_PASSAGES}
    assert {(s.model, s.num_passages, s.probe) for s in published} == expected_curves
    for s in published:
        expected = [(layer, acc) for layer, acc, _ in shipped_curve("nq", "cls", s.model, s.num_passages)]
        assert list(zip(s.layers.tolist(), s.acc.tolist())) == expected
    assert not any(s.published for s in probe_curve_series(rows, "nq", "cls", published_overlay=False))


def test_compare_with_published_uses_concat_cells_only(results):
    rows = read_results([results[0]])
    published = {
        (m, n, layer): acc for m in MODELS for n in NUM_PASSAGES for layer, acc, _ in shipped_curve("nq", "cls", m, n)
    }
    differences = compare_with_published(rows)
    assert len(differences) == len(MODELS) * len(NUM_PASSAGES) * len(LAYERS)
    ours = {(r.model, r.num_passages, r.layer): r.test_acc for r in rows if r.probe == "concat"}
    for d in differences:
        key = (d.model, d.num_passages, d.layer)
        assert (d.ours, d.published) == (ours[key], published[key])
        assert d.difference == pytest.approx(ours[key] - published[key])


def test_series_carry_significance_only_for_non_base_models(results):
    rows = read_results([results[0]])
    ours = [s for s in probe_curve_series(rows, "nq", "cls") if not s.published]
    assert len(ours) == len(MODELS) * len(NUM_PASSAGES) * len(PROBES)
    for s in ours:
        assert set(s.significant) == (set() if s.model == MODELS[0] else set(LAYERS))
    assert any(any(s.significant.values()) for s in ours)
    assert all(not s.significant for s in probe_curve_series(rows, "nq", "cls", base_model="llama"))


def test_probe_figure_draws_every_point_and_marks_significance(results):
    """Every (model, N, head) curve is drawn at the written layers and accuracies; every point has
    one marker: the base model's its own, the others' filled where McNemar (recomputed here) differs."""
    path, outcomes = results
    base, tuned = MODELS
    figure = draw_probe_curves(read_results([path]), "nq", "cls")
    panels = probe_panels(figure)
    assert sorted(panels) == list(NUM_PASSAGES)
    assert "McNemar exact test vs bert-base-uncased" in figure.get_suptitle()
    any_flagged = False
    for n, ax in panels.items():
        lines = drawn(ax)
        assert "not compared" not in ax.get_title()
        for model in MODELS:
            for probe in PROBES:
                name = f"{model} {probe}"
                accs = [float(outcomes[(model, n, probe, layer)].mean()) for layer in LAYERS]
                assert lines[name][0] == list(LAYERS)
                np.testing.assert_allclose(lines[name][1], accs)
                marks = {
                    label[len(name) + 1 :]: xy
                    for label, xy in lines.items()
                    if label.startswith(name + " ") and not label.endswith("published")
                }
                assert sorted(x for xs, _ in marks.values() for x in xs) == list(LAYERS)
                for xs, ys in marks.values():
                    np.testing.assert_allclose(ys, [accs[LAYERS.index(int(x))] for x in xs])
                if model == base:
                    assert set(marks) == {"base"}
                    continue
                flagged = flagged_layers(outcomes, model, base, n, probe)
                any_flagged |= bool(flagged)
                assert set(marks.get("significant", ([], []))[0]) == flagged
                assert set(marks.get("not significant", ([], []))[0]) == set(LAYERS) - flagged
                assert "not compared" not in marks
            expected = shipped_curve("nq", "cls", model, n)
            assert lines[f"{model} concat published"] == ([float(x[0]) for x in expected], [x[1] for x in expected])
    assert any_flagged


def test_a_one_layer_fit_is_drawn(tmp_path):
    path = write_table(tmp_path, [{"model": "dpr-question", "layer": 7, "test_acc": 0.625}])
    figure = draw_probe_curves(read_results([path]), "nq", "cls", published_overlay=False)
    (ax,) = probe_panels(figure).values()
    lines = drawn(ax)
    assert lines["dpr-question concat"] == ([7.0], [0.625])
    assert lines["dpr-question concat not compared"] == ([7.0], [0.625])
    assert ax.get_lines()[-1].get_marker() not in ("", "None", None)
    low, high = ax.get_xlim()
    assert low < 7 < high and high - low >= 1
    assert figure.get_suptitle().endswith("no significance marks: no base model bert-base-uncased in the inputs")


BASE_ROW = {"model": "bert-base-uncased"}
TUNED_ROW = {"model": "dpr-question"}
MISSING = "predictions/nowhere.safetensors"


@pytest.mark.parametrize(
    "records, reason",
    [
        (
            [{**TUNED_ROW, "layer": 0, "test_acc": 0.6}, {**TUNED_ROW, "layer": 1, "test_acc": 0.7}],
            "no base model bert-base-uncased in the inputs",
        ),
        (
            [{**BASE_ROW, "layer": 0, "correct": [1, 0, 1]}, {**TUNED_ROW, "layer": 1, "correct": [1, 1, 1]}],
            "base model bert-base-uncased has no layers in common with the others",
        ),
        (
            [
                {**BASE_ROW, "layer": 0, "correct": [1, 0, 1]},
                {**TUNED_ROW, "layer": 0, "probe": "query_aware", "correct": [1, 1, 1]},
            ],
            "base model bert-base-uncased has no probe head in common with the others",
        ),
        (
            [{**BASE_ROW, "layer": 0, "test_acc": 0.5}, {**TUNED_ROW, "layer": 0, "test_acc": 0.75}],
            "no outcome files for base model bert-base-uncased",
        ),
        (
            [
                {**BASE_ROW, "layer": 0, "test_acc": 0.5, "predictions": MISSING},
                {**TUNED_ROW, "layer": 0, "correct": [1, 1]},
            ],
            "no outcome files for base model bert-base-uncased",
        ),
        (
            [
                {**BASE_ROW, "layer": 0, "correct": [1, 0]},
                {**TUNED_ROW, "layer": 0, "test_acc": 0.75, "predictions": MISSING},
            ],
            "no outcome files for the models besides base model bert-base-uncased at the layers they share",
        ),
        ([{**BASE_ROW, "layer": 0, "correct": [1, 0]}], "no model but the base model bert-base-uncased to compare"),
        (
            [{**TUNED_ROW, "layer": 0, "test_acc": 0.6, "pooling": "weighted"}],
            "no base model for weighted pooling (see base_models)",
        ),
    ],
)
def test_the_subtitle_says_why_nothing_is_compared(tmp_path, records, reason):
    path = write_table(tmp_path, records)
    pooling = records[0].get("pooling", "cls")
    figure = draw_probe_curves(read_results([path]), "nq", pooling, published_overlay=False)
    assert figure.get_suptitle().splitlines()[-1] == f"no significance marks: {reason}"
    (ax,) = probe_panels(figure).values()
    lines = drawn(ax)
    for record in records:
        name = f"{record['model']} {record.get('probe', 'concat')}"
        mark = "base" if record["model"] == "bert-base-uncased" else "not compared"
        assert float(record["layer"]) in lines[f"{name} {mark}"][0]


def test_a_panel_says_why_it_is_not_compared(tmp_path):
    """The base model at N = 2 only: the N = 5 panel says so, the N = 2 panel is compared."""
    path = write_table(
        tmp_path,
        [
            {**BASE_ROW, "layer": 0, "correct": [1, 0, 0, 0]},
            {**TUNED_ROW, "layer": 0, "correct": [1, 1, 1, 1]},
            {**TUNED_ROW, "layer": 0, "num_passages": 5, "test_acc": 0.4},
        ],
    )
    figure = draw_probe_curves(read_results([path]), "nq", "cls", published_overlay=False)
    panels = probe_panels(figure)
    assert "not compared" not in panels[2].get_title()
    assert panels[5].get_title().splitlines()[-1] == "not compared: no base model bert-base-uncased at N = 5"
    assert drawn(panels[2])["dpr-question concat not significant"] == ([0.0], [1.0])
    assert drawn(panels[5])["dpr-question concat not compared"] == ([0.0], [0.4])


@pytest.mark.parametrize("figure_format", FORMATS)
def test_probe_figure_in_every_format(results, tmp_path, figure_format):
    rows = read_results([results[0]])
    path = plot_probe_curves(rows, tmp_path / f"probe.{figure_format}", "nq", "cls", figure_format=figure_format)
    assert path == tmp_path / f"probe.{figure_format}"
    assert_figure_file(path, figure_format)
    with pytest.raises(ValueError, match="no probe results for dataset 'msmarco'"):
        plot_probe_curves(rows, tmp_path / f"none.{figure_format}", "msmarco", "cls")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [f"probe.{figure_format}"]


def test_a_figure_format_must_match_the_file_name(tmp_path):
    figure = Figure()
    with pytest.raises(ValueError, match=r"does not end in \.svg"):
        save_figure(figure, tmp_path / "figure.png", "svg")
    with pytest.raises(ValueError, match="cannot save a figure as 'jpg'"):
        save_figure(figure, tmp_path / "figure.jpg")
    assert list(tmp_path.iterdir()) == []


def _counts(run: Path) -> dict[str, np.ndarray]:
    """The counts the test wrote, read back with safetensors alone."""
    return {key: value.numpy() for key, value in load_file(str(run / "counts.safetensors")).items()}


def _images(figure: Figure) -> dict[str, np.ndarray]:
    """Panel title -> the matrix its heatmap shows."""
    return {ax.get_title(): np.asarray(ax.images[0].get_array()) for ax in figure.axes if ax.images}


def test_heatmaps_show_the_binned_counts(tmp_path):
    run = write_attribution_run(tmp_path / "tuned", "dpr-question", seed=1)
    counts = _counts(run)
    images = _images(draw_attribution_heatmaps(run, 0.2))
    assert sorted(images) == ["intermediate (37 neurons)", "output (23 neurons)"]
    for kind in ("intermediate", "output"):
        (matrix,) = [image for title, image in images.items() if title.startswith(kind)]
        np.testing.assert_allclose(matrix, naive_bins(counts[f"{kind}@0.2"], 50))
    with pytest.raises(KeyError):
        draw_attribution_heatmaps(run, 0.3)


def test_comparison_shows_both_runs_and_their_difference(tmp_path):
    tuned = write_attribution_run(tmp_path / "tuned", "dpr-question", seed=1)
    base = write_attribution_run(tmp_path / "base", "bert-base-uncased", seed=2)
    a, b = _counts(tuned), _counts(base)
    images = _images(draw_attribution_comparison(tuned, base))
    assert len(images) == 6
    for kind in ("intermediate", "output"):
        expected_a, expected_b = naive_bins(a[f"{kind}@0.1"], 50), naive_bins(b[f"{kind}@0.1"], 50)
        np.testing.assert_allclose(images[f"dpr-question: {kind}"], expected_a)
        np.testing.assert_allclose(images[f"bert-base-uncased: {kind}"], expected_b)
        np.testing.assert_allclose(images[f"dpr-question minus bert-base-uncased: {kind}"], expected_a - expected_b)


def test_active_fraction_shows_each_runs_share_per_threshold(tmp_path):
    runs = {
        model: write_attribution_run(tmp_path / model, model, seed=seed)
        for seed, model in enumerate(("dpr-question", "bert-base-uncased"), start=1)
    }
    figure = draw_active_fraction_vs_threshold(list(runs.values()))
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_title().endswith(" side")}
    assert sorted(panels) == ["intermediate side", "output side"]
    for side, ax in panels.items():
        kind = side.split()[0]
        lines = drawn(ax)
        assert len(lines) == len(runs)
        for model, run in runs.items():
            (label,) = [label for label in lines if label.startswith(model + " ")]
            counts = _counts(run)
            expected = [counts[f"{kind}@{t}"].sum() / (counts[f"{kind}@{t}"].size * 50) * 100 for t in (0.1, 0.2)]
            assert lines[label][0] == [0.1, 0.2]
            np.testing.assert_allclose(lines[label][1], expected)


@pytest.mark.parametrize("figure_format", FORMATS)
def test_attribution_figures_in_every_format(tmp_path, figure_format):
    tuned = write_attribution_run(tmp_path / "tuned", "dpr-question", seed=1)
    base = write_attribution_run(tmp_path / "base", "bert-base-uncased", seed=2)
    out = tmp_path / "out"
    written = [
        plot_attribution_heatmaps(tuned, out / f"heat.{figure_format}", 0.2, figure_format),
        plot_attribution_comparison(tuned, base, out / f"compare.{figure_format}", figure_format=figure_format),
        plot_active_fraction_vs_threshold([tuned, base], out / f"fraction.{figure_format}", figure_format),
    ]
    for path in written:
        assert_figure_file(path, figure_format)
    with pytest.raises(KeyError):
        plot_attribution_heatmaps(tuned, out / f"missing.{figure_format}", 0.3)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}.{figure_format}" for n in ("compare", "fraction", "heat")
    )


RETRIEVAL_MEASURE = re.compile(r"\b(ndcg|mrr|recall|r|p)@\d+\b", re.IGNORECASE)


def test_report_reads_runs_only_through_the_counts_owner():
    """No module of dkacq/report spells a counts key ("kind@threshold") or a run folder's file names."""
    for path in Path(dkacq.report.__file__).parent.glob("*.py"):
        strings = [
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        ]
        for text in strings:
            key_like = RETRIEVAL_MEASURE.sub("", text)  # nDCG@10 and the like are measures' names, not keys
            assert "@" not in key_like and "counts.safetensors" not in text and "summary.json" not in text, (path, text)


def test_methods_differ_by_colour_and_models_by_marker(results):
    colours = [to_rgba(METHOD_STYLES[method].colour) for method in METHODS]
    assert len(set(colours)) == len(colours), "two methods share a colour"
    panel = next(iter(probe_panels(draw_probe_curves(read_results([results[0]]), "nq", "cls")).values()))
    lines = {line.get_label(): line for line in panel.get_lines()}
    for probe in PROBES:
        curves = [lines[f"{model} {probe}"] for model in MODELS]
        assert {to_rgba(line.get_color()) for line in curves} == {to_rgba(METHOD_STYLES[probe].colour)}
        markers = {
            line.get_marker()
            for label, line in lines.items()
            if label.startswith(tuple(f"{m} {probe} " for m in MODELS)) and not label.endswith(("published", "CI"))
        }
        assert len(markers) == len(MODELS), markers


def test_every_method_has_a_line_style():
    assert METHODS == (*HEADS, *BASELINES) and set(PROBES) < set(HEADS)
    assert set(METHOD_STYLES) == set(METHODS)
    styles = [METHOD_STYLES[method].linestyle for method in METHODS]
    assert len(set(map(str, styles))) == len(styles), "two methods share a line style"
    assert all(
        "--" in str(METHOD_STYLES[b].linestyle) or "(7, 3)" in str(METHOD_STYLES[b].linestyle) for b in BASELINES
    )


def test_baselines_dashed_intervals_as_bands_and_the_shortcut_as_a_level(tmp_path):
    """Similarity baselines are curves beside the heads (dashed), every curve has its Wilson band
    (recomputed with scipy), and the shortcut, one level for the settings that share it, is no curve."""
    rng = np.random.default_rng(5)
    records, outcomes = [], {}
    for model in MODELS:
        for probe in ("concat", "similarity_cosine"):
            for layer in LAYERS:
                correct = (rng.random(40) < 0.3 + 0.2 * layer).astype(int).tolist()
                outcomes[(model, probe, layer)] = correct
                untrained = {"best_epoch": "", "val_acc": ""} if probe != "concat" else {}
                records.append(
                    {"model": model, "probe": probe, "layer": layer, "correct": correct, "num_test": 40, **untrained}
                )
        shortcut = {"probe": "shortcut_least_negative", "layer": -1, "best_epoch": "", "val_acc": ""}
        records.append({"model": model, "correct": [1, 1, 0, 0, 0, 1, 0, 0, 1, 0], **shortcut})
    rows = read_results([write_table(tmp_path, records)])
    assert {(s.model, s.probe) for s in probe_curve_series(rows, "nq", "cls")} == {
        (m, p) for m in MODELS for p in ("concat", "similarity_cosine")
    }
    figure = draw_probe_curves(rows, "nq", "cls", published_overlay=False)
    (ax,) = probe_panels(figure).values()
    lines = {line.get_label(): line for line in ax.get_lines()}
    bands = {band.get_label(): band for band in ax.collections}
    for model in MODELS:
        for probe in ("concat", "similarity_cosine"):
            name = f"{model} {probe}"
            assert lines[name].get_linestyle() == ("--" if probe == "similarity_cosine" else "-")
            vertices = {tuple(np.round(v, 9)) for v in bands[f"{name} 95% CI"].get_paths()[0].vertices}
            for layer in LAYERS:
                correct = outcomes[(model, probe, layer)]
                ci = binomtest(sum(correct), len(correct)).proportion_ci(method="wilson")
                assert (layer, round(ci.low, 4)) in {(x, round(y, 4)) for x, y in vertices}
                assert (layer, round(ci.high, 4)) in {(x, round(y, 4)) for x, y in vertices}
    level = lines[f"{MODELS[0]}, {MODELS[1]} shortcut"]
    assert list(level.get_ydata()) == [0.4, 0.4]
    assert not any("shortcut_least_negative" in label for label in lines)
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert "cosine similarity (untrained)" in legend and "95% Wilson interval" in legend
    assert "shortcut_least_negative (query-blind)" in legend
