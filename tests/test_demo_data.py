"""The shipped demo set: its properties (always checked) and its equality with a rebuild (checked on
the Python version that built it, since pydoc topics and docstrings change between versions)."""

import gzip
import importlib.util
import json
import math
import random
import re
import statistics
import sys
from pathlib import Path

import pytest

from dkacq.data import demo
from dkacq.data.examples import EXAMPLE_COLUMNS, load_probe_set

_SCRIPT = Path(__file__).parents[1] / "scripts" / "build_demo_set.py"
_spec = importlib.util.spec_from_file_location("build_demo_set", _SCRIPT)
build = sys.modules["build_demo_set"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

NEGATIVES = [f"negative_context_{k}" for k in range(4)]


def read_rows(path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    return {split: read_rows(path) for split, path in build.SPLIT_FILES.items()}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9_]+", text.lower()))


def test_sizes(shipped):
    assert 1500 <= len(shipped["train"]) <= 2500
    assert 350 <= len(shipped["test"]) <= 650
    rows = shipped["train"] + shipped["test"]
    passages = {row[c] for row in rows for c in ["positive_context", *NEGATIVES]}
    assert len(passages) < 8000
    assert sum(path.stat().st_size for path in build.SPLIT_FILES.values()) < 3_000_000


def test_loader_gives_the_schema_without_the_document_column(shipped):
    probe_set = load_probe_set("demo")
    for split, rows in shipped.items():
        assert tuple(probe_set[split].column_names) == EXAMPLE_COLUMNS
        assert probe_set[split][0] == {c: rows[0][c] for c in EXAMPLE_COLUMNS}
        assert len(probe_set[split]) == len(rows)


def test_query_sentence_is_in_no_passage_of_its_example(shipped):
    for rows in shipped.values():
        for row in rows:
            assert all(row["question"] not in row[c] for c in ["positive_context", *NEGATIVES])


def test_passage_lengths(shipped):
    for rows in shipped.values():
        for row in rows:
            assert len(row["question"].split()) >= build.MIN_QUERY_WORDS
            assert build.MIN_POSITIVE_WORDS <= len(row["positive_context"].split()) <= build.MAX_PASSAGE_WORDS


def test_negatives_are_positives_of_other_documents_in_the_same_split(shipped):
    for rows in shipped.values():
        document_of = {row["positive_context"]: row["document"] for row in rows}
        assert len(document_of) == len(rows)
        for row in rows:
            negatives = [row[c] for c in NEGATIVES]
            assert len(set(negatives)) == 4 and row["positive_context"] not in negatives
            assert all(document_of[n] != row["document"] for n in negatives)


def test_no_document_in_both_splits(shipped):
    train = {row["document"] for row in shipped["train"]}
    test = {row["document"] for row in shipped["test"]}
    assert train and test and not train & test


def test_negatives_are_lexically_closer_to_the_query_than_random_passages(shipped):
    rng = random.Random(0)
    for rows in shipped.values():
        hard, chance = [], []
        for row in rows:
            query = words(row["question"])
            hard += [len(query & words(row[c])) for c in NEGATIVES]
            others = [r["positive_context"] for r in rng.sample(rows, 12) if r["document"] != row["document"]]
            chance += [len(query & words(text)) for text in others[:4]]
        assert statistics.mean(hard) > 1.8 * statistics.mean(chance)


def test_bm25_follows_the_formula():
    texts = ["the cat sat on the mat", "a dog sat", "the cat and the dog", "birds fly high in the sky"]
    index = build.BM25(texts, k1=0.9, b=0.4)
    docs = [t.split() for t in texts]
    average = sum(len(d) for d in docs) / len(docs)
    query = ["the", "cat", "sat", "zebra"]
    for i, doc in enumerate(docs):
        expected = 0.0
        for term in query:
            df = sum(term in d for d in docs)
            tf = doc.count(term)
            if tf:
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                expected += idf * tf * 1.9 / (tf + 0.9 * (1 - 0.4 + 0.4 * len(doc) / average))
        assert index.scores("The cat sat, zebra?")[i] == pytest.approx(expected)


def test_shipped_files_equal_a_rebuild(shipped, tmp_path, monkeypatch):
    if build.python_version() != demo.BUILT_WITH_PYTHON:
        pytest.skip(f"the demo set was built with Python {demo.BUILT_WITH_PYTHON}, this is {build.python_version()}")
    monkeypatch.setattr(build, "DEMO_DIR", tmp_path)
    monkeypatch.setattr(
        build, "SPLIT_FILES", {split: tmp_path / path.name for split, path in build.SPLIT_FILES.items()}
    )
    build.main()
    for split, path in build.SPLIT_FILES.items():
        assert read_rows(path) == shipped[split]
    assert f'BUILT_WITH_PYTHON = "{demo.BUILT_WITH_PYTHON}"' in (tmp_path / "__init__.py").read_text()
