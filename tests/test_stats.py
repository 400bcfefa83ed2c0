"""McNemar's exact test against scipy's binomial test, Bonferroni against hand-computed flags, Wilson
intervals against scipy's, and the results table as the report reads it."""

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.stats import binomtest

from dkacq.formats.results import RESULT_COLUMNS, accuracy_values, read_correct, read_identity, write_predictions
from dkacq.report.stats import (
    ProbeResult,
    bonferroni,
    mcnemar_exact,
    missing_comparison,
    per_layer,
    read_results,
    shortcut_rows,
    significance_vs_base,
    wilson_interval,
)

# (correct_a, correct_b, only_a, only_b)
PAIRED_OUTCOMES = [
    ([1, 1, 0, 0, 1, 0, 1, 1], [1, 0, 1, 0, 1, 0, 0, 1], 2, 1),
    ([1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1], [0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 1, 1], 4, 2),
    ([1] * 25 + [0] * 5, [0] * 30, 25, 0),
    ([0] * 30, [1] * 25 + [0] * 5, 0, 25),
    ([1] * 3 + [0] * 200, [0] * 3 + [1] * 180 + [0] * 20, 3, 180),
    ([1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 1, 0], 2, 2),
    ([1, 0, 0], [0, 0, 0], 1, 0),
    ([1] * 40 + [0] * 17 + [1] * 9, [0] * 40 + [1] * 17 + [1] * 9, 40, 17),
]


@pytest.mark.parametrize("correct_a, correct_b, only_a, only_b", PAIRED_OUTCOMES)
def test_mcnemar_equals_scipy_binomtest(correct_a, correct_b, only_a, only_b):
    expected = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
    assert mcnemar_exact(correct_a, correct_b) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert mcnemar_exact(correct_b, correct_a) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("outcomes", [[1, 0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1]])
def test_mcnemar_without_discordant_pairs_is_one(outcomes):
    assert mcnemar_exact(outcomes, outcomes) == 1.0


def test_mcnemar_accepts_bool_and_uint8_arrays():
    a = np.array([True, True, False, True, True])
    b = np.array([0, 0, 0, 1, 0], dtype=np.uint8)
    assert mcnemar_exact(a, b) == pytest.approx(binomtest(0, 3, 0.5).pvalue)


@pytest.mark.parametrize("a, b", [([1, 0], [1, 0, 1]), ([1, 2], [1, 0]), ([[1, 0]], [[1, 0]])])
def test_mcnemar_rejects_bad_input(a, b):
    with pytest.raises(ValueError):
        mcnemar_exact(a, b)


def test_bonferroni_flags():
    assert bonferroni([0.01, 0.02, 0.004, 0.5]) == [True, False, True, False]
    assert bonferroni([0.25, 0.125], alpha=0.5) == [False, True]
    assert bonferroni([0.049]) == [True]
    assert bonferroni([0.05]) == [False]
    assert bonferroni([0.006] * 10) == [False] * 10
    assert bonferroni([]) == []


def _row(tmp_path, model, layer, probe, correct):
    path = tmp_path / f"{model}-{probe}-{layer}.safetensors"
    labels = torch.zeros(len(correct), dtype=torch.int64)
    save_file(
        {"correct": torch.tensor(correct, dtype=torch.uint8), "prediction": 1 - torch.tensor(correct), "label": labels},
        str(path),
    )
    return ProbeResult("nq", model, "cls", 2, layer, probe, 1, 0.5, float(np.mean(correct)), path)


def test_significance_vs_base(tmp_path):
    base = [[1, 0] * 8, [0] * 16, [0] * 16]
    tuned = [[1, 0] * 8, [1] * 10 + [0] * 6, [1] * 4 + [0] * 12]
    rows = [_row(tmp_path, "bert-base-uncased", layer, "concat", c) for layer, c in enumerate(base)]
    rows += [_row(tmp_path, "dpr-question", layer, "concat", c) for layer, c in enumerate(tuned)]
    rows += [_row(tmp_path, "dpr-question", layer, "query_aware", c) for layer, c in enumerate(tuned)]
    results = significance_vs_base(rows, "bert-base-uncased")
    assert [(r.model, r.probe, r.layer) for r in results] == [("dpr-question", "concat", layer) for layer in range(3)]
    p_values = [1.0, binomtest(0, 10, 0.5).pvalue, binomtest(0, 4, 0.5).pvalue]
    assert [r.p_value for r in results] == pytest.approx(p_values)
    # 3 layers: significant when p < 0.05 / 3; 2/1024 is, 2/16 is not.
    assert [r.significant for r in results] == [False, True, False]
    assert significance_vs_base(rows, "llama") == []


def test_rows_of_different_probe_sets_are_not_paired(tmp_path, caplog):
    """Negatives mined with each model give each its own test items: the layer where the two rows name
    different probe sets is left out, with one warning; rows of one probe set are still paired."""
    base = [
        replace(_row(tmp_path, "bert-base-uncased", layer, "concat", [1, 0] * 8), data_fingerprint="a")
        for layer in range(2)
    ]
    tuned = [_row(tmp_path, "contriever", layer, "concat", [1] * 16) for layer in range(2)]
    tuned = [replace(tuned[0], data_fingerprint="a"), replace(tuned[1], data_fingerprint="b")]
    results = significance_vs_base(base + tuned, "bert-base-uncased")
    assert [r.layer for r in results] == [0] and results[0].p_value == pytest.approx(binomtest(0, 8, 0.5).pvalue)
    assert "different probe sets" in caplog.text and "dense_model" in caplog.text
    assert "other items" in missing_comparison([base[1], tuned[1]], "bert-base-uncased")


def test_read_results(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    header = [
        "dataset",
        "model",
        "pooling",
        "num_passages",
        "layer",
        "probe",
        "best_epoch",
        "val_acc",
        "test_acc",
        "predictions",
    ]
    record = ["nq", "contriever", "mean", "3", "4", "concat", "7", "0.41", "0.39", "preds/x.safetensors"]
    with (folder / "results.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, record])
    (row,) = read_results([folder / "results.csv"])
    assert row == ProbeResult(
        "nq", "contriever", "mean", 3, 4, "concat", 7, 0.41, 0.39, (folder / "preds/x.safetensors").resolve()
    )
    with (folder / "results.csv").open("a", newline="") as handle:
        csv.writer(handle).writerow(record)
    with pytest.raises(ValueError, match="more than one"):
        read_results([folder / "results.csv"])
    with (folder / "other.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, record[:5] + ["mystery"] + record[6:]])
    with pytest.raises(ValueError, match="unknown probe"):
        read_results([folder / "other.csv"])


def test_rows_without_outcome_files_are_not_compared(tmp_path):
    base = [_row(tmp_path, "bert-base-uncased", layer, "concat", [1, 0] * 4) for layer in range(2)]
    tuned = [_row(tmp_path, "dpr-question", layer, "concat", [1] * 8) for layer in range(2)]
    tuned[1].predictions.unlink()
    (result,) = significance_vs_base(base + tuned, "bert-base-uncased")
    assert (result.layer, result.p_value) == (0, pytest.approx(binomtest(0, 4, 0.5).pvalue))
    assert missing_comparison(base + tuned, "bert-base-uncased") is None
    tuned[0].predictions.unlink()
    assert significance_vs_base(base + tuned, "bert-base-uncased") == []
    assert missing_comparison(base + tuned, "bert-base-uncased") == (
        "no outcome files for the models besides base model bert-base-uncased at the layers they share"
    )
    assert missing_comparison(tuned, "bert-base-uncased") == "no base model bert-base-uncased in the inputs"
    assert missing_comparison(base + tuned, None) == "no base model to compare with"


def test_outcomes_are_written_as_csv_beside_the_safetensors_file(tmp_path):
    index, label, prediction = [3, 0, 2, 1, 4], [1, 0, 2, 2, 0], [1, 1, 2, 0, 0]
    correct = [1, 0, 1, 0, 1]
    path = tmp_path / "predictions" / "cell.safetensors"
    write_predictions(
        path,
        {
            "correct": torch.tensor(correct, dtype=torch.uint8),
            "index": torch.tensor(index),
            "prediction": torch.tensor(prediction),
            "label": torch.tensor(label),
        },
        {"layer": 4},
    )
    with (tmp_path / "predictions" / "cell.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["index", "label", "prediction", "correct"]
    assert rows[1:] == [[str(v) for v in row] for row in zip(index, label, prediction, correct)]
    assert read_correct(path).tolist() == [bool(c) for c in correct]
    assert read_identity(path) == {"layer": 4}
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["cell.csv", "cell.safetensors"]
    with pytest.raises(ValueError, match="outcomes lack correct"):
        write_predictions(
            tmp_path / "bad.safetensors", {"prediction": torch.tensor([1]), "label": torch.tensor([1])}, {}
        )
    assert not (tmp_path / "bad.csv").exists() and not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("successes, trials", [(0, 10), (3, 10), (10, 10), (1, 1), (160, 532), (2659, 6515), (50, 100)])
def test_wilson_interval_equals_scipy(successes, trials):
    expected = binomtest(successes, trials).proportion_ci(method="wilson")
    low, high = wilson_interval(successes, trials)
    assert (low, high) == pytest.approx((expected.low, expected.high), rel=1e-12, abs=1e-15)
    assert 0 <= low <= successes / trials <= high <= 1


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.959964: centre (0.8 + z²/20) / (1 + z²/10), half z/(1 + z²/10) sqrt(0.016 + z²/400)
    assert wilson_interval(8, 10) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)
    assert accuracy_values(np.array([1, 1, 0, 1, 1, 1, 1, 1, 0, 1])) == {
        "test_acc": "0.80000",
        "test_acc_low": "0.49016",
        "test_acc_high": "0.94332",
    }
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def _table(path, rows):
    columns = sorted({key for row in rows for key in row}, key=lambda c: RESULT_COLUMNS.index(c))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


CELL = {"dataset": "nq", "model": "minilm", "pooling": "mean", "num_passages": 5, "layer": 6, "predictions": ""}


def test_read_results_with_intervals_convergence_and_baselines(tmp_path):
    trained = {
        **CELL,
        "probe": "bilinear",
        "best_epoch": 29,
        "val_acc": 0.5,
        "test_acc": 0.6,
        "test_acc_low": 0.55,
        "test_acc_high": 0.65,
        "num_test": 100,
        "max_epochs": 30,
        "epochs_run": 30,
        "optimizer_steps": 210,
        "best_is_last": 1,
        "fit_seconds": 3.5,
        "cell_id": "a",
    }
    baseline = {**CELL, "probe": "similarity_dot", "best_epoch": "", "val_acc": "", "test_acc": 0.3, "num_test": 100}
    shortcut = {**baseline, "probe": "shortcut_least_negative", "layer": -1, "cell_id": "s"}
    rows = read_results([_table(tmp_path / "results.csv", [trained, {**baseline, "cell_id": "b"}, shortcut])])
    by_probe = {row.probe: row for row in rows}
    head = by_probe["bilinear"]
    assert (head.test_acc_low, head.test_acc_high, head.best_is_last) == (0.55, 0.65, True)
    assert (head.optimizer_steps, head.epochs_run, head.fit_seconds, head.fitting) == (210, 30, 3.5, "30 epochs")
    similarity = by_probe["similarity_dot"]
    assert (similarity.best_epoch, similarity.val_acc, similarity.trained, similarity.fitting) == (
        None,
        None,
        False,
        "",
    )
    # an interval the table does not state is computed from test_acc and num_test
    expected = binomtest(30, 100).proportion_ci(method="wilson")
    assert (similarity.test_acc_low, similarity.test_acc_high) == pytest.approx((expected.low, expected.high))
    assert [row.probe for row in per_layer(rows)] == ["bilinear", "similarity_dot"]
    assert [row.layer for row in shortcut_rows(rows)] == [-1]

    # the same cell fitted another way is another mode, not a duplicate; one cell in two tables is read once
    stopped = {**trained, "early_stopping": "val/loss min, patience 10", "max_epochs": 300, "cell_id": "c"}
    other = _table(tmp_path / "other.csv", [stopped, {**baseline, "cell_id": "b"}])
    both = read_results([tmp_path / "results.csv", other])
    assert sorted(row.fitting for row in both if row.trained) == [
        "30 epochs",
        "early stopping on val/loss min, patience 10, at most 300 epochs",
    ]
    assert [row.probe for row in both].count("similarity_dot") == 1
    with pytest.raises(ValueError, match="more than one results row"):
        read_results([_table(tmp_path / "twice.csv", [trained, {**trained, "cell_id": "d"}])])
