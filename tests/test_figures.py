"""Figures built from small synthetic inputs written here; the builders are shared with test_summary."""

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import dkacq.report
from dkacq.probe.heads import HEADS
from dkacq.report.attribution_figures import (
    bin_max_percentages,
    plot_active_fraction_vs_threshold,
    plot_attribution_comparison,
    plot_attribution_heatmaps,
)
from dkacq.report.probe_figures import HEAD_STYLES, plot_probe_curves, probe_curve_series
from dkacq.report.published import compare_with_published, published_curve
from dkacq.report.stats import read_results

MODELS = ("bert-base-uncased", "dpr-question")
NUM_PASSAGES = (2, 5)
PROBES = ("concat", "passage_only", "query_aware")
LAYERS = (0, 1, 2)
NUM_TEST = 120
COLUMNS = ["dataset", "model", "pooling", "num_passages", "layer", "probe", "best_epoch", "val_acc", "test_acc",
           "predictions"]


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
                    save_file({"correct": torch.from_numpy(correct.astype(np.uint8)), "prediction": prediction,
                               "label": labels}, str(folder / name))
                    outcomes[(model, n, probe, layer)] = correct
                    records.append(["nq", model, "cls", n, layer, probe, int(rng.integers(1, 30)),
                                    round(float(rng.random()), 4), float(correct.mean()), name])
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
        "model": model, "preset": model, "pooling": "cls", "dataset": "nq", "split": "test", "text_side": "query",
        "thresholds": [0.1, 0.2], "num_texts": num_texts,
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
        (int(r["layer"]), float(r["acc"]), r["sig_vs_base"] == "1") for r in shipped_published_rows()
        if (r["dataset"], r["pooling"], r["model"], int(r["num_passages"])) == (dataset, pooling, model, num_passages)
    )


def assert_png(path: Path, min_width: int = 600, min_height: int = 400) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= min_height
        assert image.width <= 4000 and image.height <= 4000
        image.verify()


@pytest.fixture
def results(tmp_path):
    return write_results(tmp_path / "probe")


def test_bin_max_percentages_equals_naive_loop():
    rng = np.random.default_rng(1)
    for neurons, bins in [(37, 10), (30, 10), (10, 10), (23, 4)]:
        counts = rng.integers(0, 41, (4, neurons))
        expected = np.zeros((4, bins))
        start = 0
        for b in range(bins):
            size = neurons // bins + (1 if b < neurons % bins else 0)
            for layer in range(4):
                best = 0.0
                for neuron in range(start, start + size):
                    best = max(best, counts[layer, neuron] / 40 * 100)
                expected[layer, b] = best
            start += size
        assert start == neurons
        np.testing.assert_allclose(bin_max_percentages(counts, 40, bins), expected)


def test_bin_max_percentages_rejects_too_few_neurons():
    with pytest.raises(ValueError):
        bin_max_percentages(np.ones((2, 5)), 10)


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
    published = {(m, n, layer): acc for m in MODELS for n in NUM_PASSAGES
                 for layer, acc, _ in shipped_curve("nq", "cls", m, n)}
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


def test_probe_figure_is_a_png(results, tmp_path):
    rows = read_results([results[0]])
    assert_png(plot_probe_curves(rows, tmp_path / "probe.png", "nq", "cls"))
    with pytest.raises(ValueError):
        plot_probe_curves(rows, tmp_path / "none.png", "msmarco", "cls")


def test_attribution_figures_are_pngs(tmp_path):
    tuned = write_attribution_run(tmp_path / "tuned", "dpr-question", seed=1)
    base = write_attribution_run(tmp_path / "base", "bert-base-uncased", seed=2)
    assert_png(plot_attribution_heatmaps(tuned, tmp_path / "heat.png", 0.2))
    assert_png(plot_attribution_comparison(tuned, base, tmp_path / "compare.png"))
    assert_png(plot_active_fraction_vs_threshold([tuned, base], tmp_path / "fraction.png"))
    with pytest.raises(KeyError):
        plot_attribution_heatmaps(tuned, tmp_path / "missing.png", 0.3)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["compare.png", "fraction.png", "heat.png"]


def test_report_reads_runs_only_through_the_counts_owner():
    """No module of dkacq/report spells a counts key ("kind@threshold") or a run folder's file names."""
    for path in Path(dkacq.report.__file__).parent.glob("*.py"):
        strings = [node.value for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)]
        for text in strings:
            assert "@" not in text and "counts.safetensors" not in text and "summary.json" not in text, (path, text)


def test_every_probe_head_has_a_line_style():
    assert set(HEAD_STYLES) == set(HEADS) == set(PROBES)
