"""Untrained baselines against independent computations: similarity by a loop over examples with
torch's cosine_similarity, the shortcut by hand and by counting texts, and their rows in results.csv."""

import csv
import json
import random
from collections import Counter

import pytest
import torch
from conftest import WORDS
from scipy.stats import binomtest
from torch.nn import functional

from dkacq.datamodules.probe import ProbeDataModule
from dkacq.formats.results import ResultConflictError, read_correct, read_identity
from dkacq.probe.baselines import (
    BASELINES,
    METHODS,
    SHORTCUT,
    SHORTCUT_LAYER,
    baseline_cells,
    least_negative_choice,
    record_baselines,
    record_layer_baselines,
    shortcut_outcomes,
    similarity_accuracy,
    similarity_outcomes,
    similarity_scores,
)
from dkacq.probe.heads import HEADS
from dkacq.report.stats import read_results
from dkacq.report.summary import write_report

COLUMNS = ["question", "positive_context"] + [f"negative_context_{k}" for k in range(4)]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))


def write_recurring_negatives(folder, num_train=150, num_test=60, seed=0):
    """Probe files whose negatives come from a small pool with skewed frequencies (some recur often,
    some rarely) and whose positives are all distinct: the shortcut has something to find."""
    rng = random.Random(seed)
    pool = [_sentence(rng) for _ in range(24)]
    weights = [1 / (rank + 1) for rank in range(len(pool))]
    paths = []
    for split, count in (("train", num_train), ("test", num_test)):
        path = folder / f"{split}.jsonl"
        with open(path, "w") as file:
            for _ in range(count):
                negatives = rng.sample(rng.choices(pool, weights, k=12), 1) + rng.choices(pool, weights, k=3)
                texts = [_sentence(rng), f"{_sentence(rng)} {len(paths)}", *negatives]
                file.write(json.dumps(dict(zip(COLUMNS, texts))) + "\n")
        paths.append(str(path))
    return paths


def _data(tmp_path, files, model, **options) -> ProbeDataModule:
    train, test = files
    settings = dict(
        encoder="bert-mean",
        model=str(model),
        dataset="toy",
        source="local",
        train_file=train,
        test_file=test,
        cache_dir=str(tmp_path / "cache"),
        batch_size=16,
        val_fraction=0.2,
        num_passages=4,
    )
    data = ProbeDataModule(**(settings | options))
    data.prepare_data()
    return data


@pytest.fixture
def toy_files(tmp_path):
    return write_recurring_negatives(tmp_path)


def _set_up(data: ProbeDataModule, layer: int) -> ProbeDataModule:
    data.layer = layer
    data.setup("test")
    return data


def test_methods_are_the_heads_then_the_baselines():
    assert (
        METHODS
        == (*HEADS, *BASELINES)
        == (
            "concat",
            "passage_only",
            "query_aware",
            "bilinear",
            "residual_bilinear",
            *BASELINES,
        )
    )
    assert BASELINES == ("similarity_cosine", "similarity_dot") and SHORTCUT not in METHODS


@pytest.mark.parametrize("layer", [0, 2])
def test_similarity_equals_a_naive_loop_over_examples(tmp_path, toy_files, tiny_bert_dir, layer):
    data = _set_up(_data(tmp_path, toy_files, tiny_bert_dir), layer)
    test = data.datasets["test"]
    expected = {"similarity_cosine": [], "similarity_dot": []}
    for index in range(len(test)):
        example = test.__getitems__([index])
        query, passages = example["query"][0], example["passages"][0]
        cosine = [functional.cosine_similarity(query, passage, dim=0).item() for passage in passages]
        dot = [torch.dot(query, passage).item() for passage in passages]
        expected["similarity_cosine"].append(cosine.index(max(cosine)) == example["label"][0].item())
        expected["similarity_dot"].append(dot.index(max(dot)) == example["label"][0].item())
    for method in BASELINES:
        accuracy, correct = similarity_accuracy(data, method)
        assert correct.tolist() == expected[method]
        assert accuracy == pytest.approx(sum(expected[method]) / len(test))
        outcomes = similarity_outcomes(data, method)
        assert torch.equal(outcomes["label"], test.labels) and outcomes["index"].tolist() == list(range(len(test)))
    # the two measures are different rankings of the same draws
    assert similarity_outcomes(data, "similarity_cosine")["prediction"].shape == (len(test),)


def test_similarity_reads_the_cached_vectors_even_when_probes_standardize(tmp_path, toy_files, tiny_bert_dir):
    plain = _set_up(_data(tmp_path, toy_files, tiny_bert_dir), 1)
    scaled = _set_up(_data(tmp_path, toy_files, tiny_bert_dir, standardize=True), 1)
    assert not torch.equal(plain.datasets["test"].queries, scaled.datasets["test"].queries)
    for method in BASELINES:
        assert torch.equal(
            similarity_outcomes(plain, method)["prediction"], similarity_outcomes(scaled, method)["prediction"]
        )


def test_similarity_scores_by_hand():
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    passages = torch.tensor([[[3.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [5.0, 5.0]]])
    torch.testing.assert_close(similarity_scores(query, passages, "dot"), torch.tensor([[3.0, 1.0], [2.0, 10.0]]))
    half = 2**-0.5
    torch.testing.assert_close(similarity_scores(query, passages, "cosine"), torch.tensor([[1.0, half], [1.0, half]]))
    with pytest.raises(ValueError, match="unknown similarity"):
        similarity_scores(query, passages, "euclid")


def test_shortcut_by_hand():
    """Training negatives count a 3, b 2, c d e f g h i 1; unseen texts count 0."""
    train = [["a", "b", "c", "d"], ["a", "b", "e", "f"], ["a", "g", "h", "i"]]
    shown = [["a", "x", "b"], ["b", "c", "a"], ["x", "y", "c"], ["c", "e", "d"], ["a", "b", "h"]]
    expected = [1, 1, 0, 0, 2]  # x unseen; c once; x, y tie at 0: the first; c, e, d tie at 1: the first; h once
    ids = {text: number for number, text in enumerate(sorted({t for row in train + shown for t in row}))}
    choice = least_negative_choice(
        torch.tensor([[ids[t] for t in row] for row in train]), torch.tensor([[ids[t] for t in row] for row in shown])
    )
    assert choice.tolist() == expected
    assert least_negative_choice(torch.tensor([[0, 1]]), torch.zeros(0, 3, dtype=torch.long)).tolist() == []


def test_shortcut_equals_a_count_of_the_texts(tmp_path, toy_files, tiny_bert_dir):
    """The shortcut on a real data module, against a Counter over the probe set's texts."""
    data = _set_up(_data(tmp_path, toy_files, tiny_bert_dir), 0)
    probe_set, _ = data.load_probe_set()
    cache = data.open()
    row_text = {}
    for split in ("train", "test"):
        _, rows = cache.index(split)
        for example, texts in zip(rows.tolist(), zip(*(probe_set[split][column] for column in COLUMNS[1:]))):
            for row, text in zip(example, texts):
                assert row_text.setdefault(row, text) == text
    train = data.datasets["train"]
    counts = Counter(row_text[row] for example in train.passage_rows[:, 1:].tolist() for row in example)
    test = data.datasets["test"]
    expected = []
    for index in range(len(test)):
        shown = [probe_set["test"][index][COLUMNS[1 + column]] for column in test.columns[index].tolist()]
        lowest = min(counts[text] for text in shown)
        expected.append([counts[text] for text in shown].index(lowest))
    outcomes = shortcut_outcomes(data)
    assert outcomes["prediction"].tolist() == expected
    accuracy = outcomes["correct"].float().mean().item()
    assert accuracy > 1 / 4 + 0.2, "the toy negatives recur: the shortcut should be far above chance"


def _rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_baselines_are_recorded_with_their_own_identity(tmp_path, toy_files, tiny_bert_dir):
    data = _data(tmp_path, toy_files, tiny_bert_dir, layers=[0, 2])
    run = tmp_path / "run"
    cells = baseline_cells(data)
    assert [(cell.probe, cell.layer) for cell in cells] == [
        ("similarity_cosine", 0),
        ("similarity_dot", 0),
        ("similarity_cosine", 2),
        ("similarity_dot", 2),
        (SHORTCUT, SHORTCUT_LAYER),
    ]
    written = record_baselines(data, run)
    assert sorted(written, key=cells.index) == cells and data.layer is None and not hasattr(data, "datasets")
    rows = {(row["probe"], int(row["layer"])): row for row in _rows(run / "results.csv")}
    assert set(rows) == {(cell.probe, cell.layer) for cell in cells}
    for cell in cells:
        row = rows[(cell.probe, cell.layer)]
        assert (row["dataset"], row["model"], row["pooling"], row["num_passages"]) == ("toy", cell.model, "mean", "4")
        assert row["cell_id"] == cell.id and row["best_epoch"] == row["val_acc"] == row["learning_rate"] == ""
        correct = read_correct(run / row["predictions"])
        assert len(correct) == int(row["num_test"]) and float(row["test_acc"]) == pytest.approx(
            correct.mean(), abs=1e-5
        )
        wilson = binomtest(int(correct.sum()), len(correct)).proportion_ci(method="wilson")
        assert float(row["test_acc_low"]) == pytest.approx(wilson.low, abs=1e-5)
        assert float(row["test_acc_high"]) == pytest.approx(wilson.high, abs=1e-5)
        identity = read_identity(run / row["predictions"])
        assert identity == json.loads(json.dumps(cell.identity))
        assert set(identity) == {"baseline", "layer", "num_passages", "data", "embeddings"}  # no training options
    # the recorded numbers are those of the functions
    layer_two = _set_up(_data(tmp_path, toy_files, tiny_bert_dir, layers=[0, 2]), 2)
    recorded = read_correct(run / rows[("similarity_dot", 2)]["predictions"])
    assert recorded.tolist() == similarity_outcomes(layer_two, "similarity_dot")["correct"].bool().tolist()
    assert read_correct(run / rows[(SHORTCUT, -1)]["predictions"]).tolist() == (
        shortcut_outcomes(layer_two)["correct"].bool().tolist()
    )

    # resuming writes nothing; a rerun replaces its own rows; other settings are refused
    assert record_baselines(data, run, skip_finished=True) == []
    record_baselines(data, run)
    assert len(_rows(run / "results.csv")) == len(cells)
    with pytest.raises(ResultConflictError, match="from other settings"):
        record_baselines(_data(tmp_path, toy_files, tiny_bert_dir, layers=[0, 2], seed=7), run)

    # the report reads them as methods beside the heads, and the shortcut per data set
    results = read_results([run / "results.csv"])
    assert {row.probe for row in results} == {*BASELINES, SHORTCUT}
    markdown = write_report([run / "results.csv"], [], tmp_path / "report").read_text()
    assert "similarity_cosine (last)" in markdown and "### Query-blind shortcut" in markdown


def test_one_layer_at_a_time_each_baseline_once(tmp_path, toy_files, tiny_bert_dir):
    """What a fit loop calls after the probes of a layer: that layer's baselines, the shortcut once."""
    run, done = tmp_path / "run", set()
    first = record_layer_baselines(_set_up(_data(tmp_path, toy_files, tiny_bert_dir), 1), run, done)
    assert [(cell.probe, cell.layer) for cell in first] == [
        ("similarity_cosine", 1),
        ("similarity_dot", 1),
        (SHORTCUT, SHORTCUT_LAYER),
    ]
    assert record_layer_baselines(_set_up(_data(tmp_path, toy_files, tiny_bert_dir), 1), run, done) == []
    second = record_layer_baselines(_set_up(_data(tmp_path, toy_files, tiny_bert_dir), 2), run, done)
    assert [(cell.probe, cell.layer) for cell in second] == [("similarity_cosine", 2), ("similarity_dot", 2)]
    assert len(_rows(run / "results.csv")) == 5 and done == {cell.id for cell in first + second}
