"""``dkacq compare``: rows pair the same texts across two caches, agree with a literal CKA, and are reused
only under the same identity."""

import csv
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import write_probe_files
from test_cka import gram_cka

from dkacq.cli import main
from dkacq.compare.caches import aligned_rows
from dkacq.datamodules.probe import ProbeDataModule
from dkacq.formats.similarity import ROWS_FILE, SUMMARY_FILE, Comparison, ComparisonConflictError


def _fake_cache(name, query_rows, passage_rows, fingerprint="same"):
    index = {"train": (torch.tensor(query_rows), torch.tensor(passage_rows))}
    return SimpleNamespace(folder=name, manifest={"data_fingerprint": fingerprint}, index=index.__getitem__)


def test_rows_pair_the_same_texts_in_two_row_orders():
    # three examples; texts q0..q2 and p0..p5, stored in other orders by the two caches
    order_a = {"q0": 2, "q1": 0, "q2": 1}
    order_b = {"q0": 0, "q1": 2, "q2": 1}
    passages_a = {f"p{i}": (i * 5) % 6 for i in range(6)}
    passages_b = {f"p{i}": (i * 7 + 3) % 6 for i in range(6)}
    examples = [("q0", ["p0", "p1"]), ("q1", ["p2", "p1"]), ("q2", ["p3", "p4"]), ("q0", ["p5", "p0"])]
    a = _fake_cache("a", [order_a[q] for q, _ in examples], [[passages_a[p] for p in ps] for _, ps in examples])
    b = _fake_cache("b", [order_b[q] for q, _ in examples], [[passages_b[p] for p in ps] for _, ps in examples])
    rows_a, rows_b = aligned_rows(a, b, "query", ["train"])
    text_a = {row: text for text, row in order_a.items()}
    assert sorted(text_a[int(r)] for r in rows_a) == ["q0", "q1", "q2"]  # each text once
    assert all(order_b[text_a[int(ra)]] == int(rb) for ra, rb in zip(rows_a, rows_b))
    rows_a, rows_b = aligned_rows(a, b, "passage", ["train"])
    text_a = {row: text for text, row in passages_a.items()}
    assert len(rows_a) == 6 and all(passages_b[text_a[int(ra)]] == int(rb) for ra, rb in zip(rows_a, rows_b))
    other = _fake_cache("c", [0, 1, 2, 0], [[0, 1], [2, 1], [3, 4], [5, 0]], fingerprint="other")
    with pytest.raises(ValueError, match="different texts"):
        aligned_rows(a, other, "query", ["train"])


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_bert_dir):
    folder = tmp_path_factory.mktemp("compare")
    train, test = write_probe_files(folder, num_train=40, num_test=12)
    data = dict(dataset="toy", source="local", train_file=train, test_file=test, cache_dir=str(folder / "cache"))
    a = {"encoder": "bert-mean", "model": str(tiny_bert_dir)}
    b = {"encoder": "bert-mean", "model": str(tiny_bert_dir), "random_init": True}
    out = folder / "out"
    args = ["compare", f"--a={json.dumps(a)}", f"--b={json.dumps(b)}", f"--data={json.dumps(data)}", f"--out_dir={out}"]
    main(args)
    return SimpleNamespace(out=out, args=args, data=data, a=a, b=b)


def _vectors_by_text(data: dict, model: dict, layer: int, side: str) -> dict[str, torch.Tensor]:
    """Each distinct text's vector, read from the cache through the probe set's texts."""
    module = ProbeDataModule(**data, **model)
    probe_set, _ = module.load_probe_set()
    cache = module.open()
    vectors = cache.layer(layer)[0 if side == "query" else 1]
    found = {}
    for split in ("train", "test"):
        query_rows, passage_rows = cache.index(split)
        examples = probe_set[split]
        columns = ["positive_context"] + [f"negative_context_{k}" for k in range(4)]
        for example, query_row, rows in zip(examples, query_rows, passage_rows):
            if side == "query":
                found[example["question"]] = vectors[query_row]
            else:
                found |= {example[column]: vectors[row] for column, row in zip(columns, rows)}
    return found


def test_rows_equal_a_literal_cka_of_the_texts_vectors(compared):
    comparison = Comparison.load(compared.out)
    assert comparison.layers("a") == comparison.layers("b") == [0, 1, 2]
    assert len(comparison.rows) == 2 * 3 * 3
    for row in comparison.rows:
        if row.layer_a == row.layer_b == 1 or (row.layer_a, row.layer_b) == (2, 0):
            x = _vectors_by_text(compared.data, compared.a, row.layer_a, row.side)
            y = _vectors_by_text(compared.data, compared.b, row.layer_b, row.side)
            texts = sorted(x)
            assert row.num_texts == len(texts)
            expected = gram_cka(torch.stack([x[t] for t in texts]), torch.stack([y[t] for t in texts]))
            assert row.cka == pytest.approx(expected, rel=1e-6)
    assert (compared.out / "cka_heatmap.png").stat().st_size > 0 and (compared.out / "cka_diagonal.png").exists()
    summary = json.loads((compared.out / SUMMARY_FILE).read_text())
    assert summary["identity"]["a"]["random_init"] is False and summary["identity"]["b"]["random_init"] is True
    with open(compared.out / ROWS_FILE) as handle:
        header = next(csv.reader(handle))
    assert header[:7] == ["model_a", "model_b", "side", "layer_a", "layer_b", "cka", "debiased_cka"]


def test_a_model_against_itself_is_one_and_other_options_are_refused(compared, tmp_path):
    same = tmp_path / "same"
    args = [f"--a={json.dumps(compared.a)}", f"--b={json.dumps(compared.a)}", f"--data={json.dumps(compared.data)}"]
    main(["compare", *args, f"--out_dir={same}", "--layer_pairs=diagonal"])
    diagonal = Comparison.load(same).rows
    assert [(row.layer_a, row.layer_b) for row in diagonal if row.side == "query"] == [(0, 0), (1, 1), (2, 2)]
    assert all(row.cka == pytest.approx(1.0) and row.mean_cosine == pytest.approx(1.0) for row in diagonal)
    before = (compared.out / ROWS_FILE).stat().st_mtime_ns
    main(compared.args)  # same identity: reused, not computed again
    assert (compared.out / ROWS_FILE).stat().st_mtime_ns == before
    with pytest.raises(ComparisonConflictError, match="layer_pairs"):
        main([*compared.args, "--layer_pairs=diagonal"])
