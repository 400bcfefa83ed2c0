"""The probe-set readers: DPR JSON, MS MARCO rows, published and local tables, and their errors."""

import gzip
import json
import logging
import os
import random
import shutil

import datasets
import pytest

from dkacq.data import examples
from dkacq.data.examples import EXAMPLE_COLUMNS, ProbeDataError, load_probe_set, read_probe_set


def ctx(title: str, text: str) -> dict:
    return {"title": title, "text": text, "score": 12.5, "title_score": 0, "passage_id": title}


def dpr_record(question: str, positives: list[str], negatives: list[str]) -> dict:
    return {
        "question": question,
        "answers": ["x"],
        "positive_ctxs": [ctx(p, p.lower()) for p in positives],
        "negative_ctxs": [ctx("Random", "unused")],
        "hard_negative_ctxs": [ctx(n, n.lower()) for n in negatives],
    }


SIX = ["N0", "N1", "N2", "N3", "N4", "N5"]
TRAIN_RECORDS = [
    dpr_record("q0", ["P0", "P1"], SIX),
    dpr_record("q1", ["P2"], []),
    dpr_record("q2", ["P3"], ["M0", "M1"]),
]
TEST_RECORDS = [
    dpr_record("q3", ["P4"], ["K0", "K1", "K2"]),
    dpr_record("q4", [], SIX),
    dpr_record("q5", ["P5"], ["L0", "L1", "L2", "L3"]),
]

# Worked out once from random.Random(42) and written down: one stream, train file then test file,
# one draw per positive in file order; q1 (no hard negatives) and q4 (no positive) draw nothing.
HAND_WORKED = {
    "train": [
        ("q0", "P0", ["N5", "N0", "N4", "N2"]),  # sample(6 negatives, 4)
        ("q0", "P1", ["N2", "N1", "N4", "N0"]),  # sample(6 negatives, 4), a fresh draw
        ("q2", "P3", ["M1", "M1", "M1", "M0"]),  # choices(2 negatives, k=4)
    ],
    "test": [
        ("q3", "P4", ["K1", "K0", "K0", "K1"]),  # choices(3 negatives, k=4), continuing the stream
        ("q5", "P5", ["L0", "L2", "L3", "L1"]),  # sample(4 negatives, 4)
    ],
}


def as_rows(expected: list[tuple[str, str, list[str]]]) -> list[dict]:
    """Examples with DPR passage text, title + " " + text."""
    rows = []
    for question, positive, negatives in expected:
        row = {"question": question, "positive_context": f"{positive} {positive.lower()}"}
        row.update({f"negative_context_{k}": f"{n} {n.lower()}" for k, n in enumerate(negatives)})
        rows.append(row)
    return rows


def rows_of(split: datasets.Dataset) -> list[dict]:
    assert tuple(split.column_names) == EXAMPLE_COLUMNS
    return [dict(row) for row in split]


@pytest.fixture
def dpr_files(tmp_path):
    train, test = tmp_path / "biencoder-nq-adv-hn-train.json", tmp_path / "biencoder-nq-dev.json"
    train.write_text(json.dumps(TRAIN_RECORDS, indent=4))
    test.write_text(json.dumps(TEST_RECORDS, indent=4))
    return train, test


def test_hand_worked_values_follow_the_prescribed_random_calls():
    rng = random.Random(42)
    derived = {
        "train": [rng.sample(SIX, 4), rng.sample(SIX, 4), rng.choices(["M0", "M1"], k=4)],
        "test": [rng.choices(["K0", "K1", "K2"], k=4), rng.sample(["L0", "L1", "L2", "L3"], 4)],
    }
    assert derived == {split: [negs for _, _, negs in rows] for split, rows in HAND_WORKED.items()}


def test_dpr_files_give_the_hand_worked_examples(dpr_files):
    train, test = dpr_files
    probe_set = load_probe_set("dpr", str(train), str(test))
    assert set(probe_set) == {"train", "test"}
    for split in ("train", "test"):
        assert rows_of(probe_set[split]) == as_rows(HAND_WORKED[split])


def test_dpr_reads_gzipped_files(dpr_files, tmp_path):
    train, test = dpr_files
    gz_train = tmp_path / "train.json.gz"
    gz_train.write_bytes(gzip.compress(train.read_bytes()))
    probe_set = load_probe_set("dpr", str(gz_train), str(test))
    assert rows_of(probe_set["train"]) == as_rows(HAND_WORKED["train"])
    assert rows_of(probe_set["test"]) == as_rows(HAND_WORKED["test"])


def test_seed_changes_the_draws(dpr_files):
    train, test = dpr_files
    other = load_probe_set("dpr", str(train), str(test), seed=7)
    assert rows_of(other["train"]) != as_rows(HAND_WORKED["train"])


def msmarco_row(query: str, selected: list[int], texts: list[str]) -> dict:
    return {
        "query": query,
        "query_id": 1,
        "answers": ["a"],
        "passages": {"is_selected": selected, "passage_text": texts, "url": [f"http://{t}" for t in texts]},
    }


def test_msmarco_rows_give_one_example_per_selected_passage(tmp_path):
    train_rows = [
        msmarco_row("m0", [0, 1, 0], ["a0", "a1", "a2"]),
        msmarco_row("m1", [0] * 3 + [1] + [0] * 5 + [1], [f"b{i}" for i in range(10)]),
        msmarco_row("m2", [0, 0, 0, 0, 0], [f"c{i}" for i in range(5)]),
        msmarco_row("m3", [1, 1], ["d0", "d1"]),
    ]
    test_rows = [msmarco_row("m4", [1, 0, 0, 0, 0, 0], [f"e{i}" for i in range(6)])]
    train, test = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in train_rows))
    test.write_text("".join(json.dumps(row) + "\n" for row in test_rows))

    rng = random.Random(42)
    b_negatives = ["b0", "b1", "b2", "b4", "b5", "b6", "b7", "b8"]
    expected_train = [
        ("m0", "a1", rng.choices(["a0", "a2"], k=4)),
        ("m1", "b3", rng.sample(b_negatives, 4)),
        ("m1", "b9", rng.sample(b_negatives, 4)),
    ]
    expected_test = [("m4", "e0", rng.sample(["e1", "e2", "e3", "e4", "e5"], 4))]

    def expand(expected):
        return [
            {"question": q, "positive_context": p, **{f"negative_context_{k}": n for k, n in enumerate(negs)}}
            for q, p, negs in expected
        ]

    probe_set = load_probe_set("msmarco", str(train), str(test))
    assert rows_of(probe_set["train"]) == expand(expected_train)
    assert rows_of(probe_set["test"]) == expand(expected_test)

    parquet_train, parquet_test = tmp_path / "train.parquet", tmp_path / "dev.parquet"
    datasets.Dataset.from_list(train_rows).to_parquet(str(parquet_train))
    datasets.Dataset.from_list(test_rows).to_parquet(str(parquet_test))
    from_parquet = load_probe_set("msmarco", str(parquet_train), str(parquet_test))
    assert rows_of(from_parquet["train"]) == expand(expected_train)


def example_rows(prefix: str, n: int) -> list[dict]:
    return [{column: f"{prefix} {column} {i}" for column in EXAMPLE_COLUMNS} for i in range(n)]


@pytest.mark.parametrize("format", ["local", "published"])
@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "parquet"])
def test_tables_round_trip(tmp_path, format, suffix):
    rows = {"train": example_rows("tr", 5), "test": example_rows("te", 3)}
    paths = {}
    for split, split_rows in rows.items():
        path = tmp_path / f"{split}.{suffix}"
        with_extra = [dict(row, document=f"doc{i}") for i, row in enumerate(split_rows)]
        if suffix == "parquet":
            datasets.Dataset.from_list(with_extra).to_parquet(str(path))
        else:
            text = "".join(json.dumps(row) + "\n" for row in with_extra).encode()
            path.write_bytes(gzip.compress(text) if suffix.endswith(".gz") else text)
        paths[split] = str(path)
    probe_set = load_probe_set(format, paths["train"], paths["test"])
    assert {split: rows_of(probe_set[split]) for split in rows} == rows


def assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_dpr_record_without_positive_ctxs(dpr_files):
    train, test = dpr_files
    records = json.loads(test.read_text())
    del records[2]["positive_ctxs"]
    test.write_text(json.dumps(records, indent=2))
    with pytest.raises(ProbeDataError) as error:
        load_probe_set("dpr", str(train), str(test))
    assert str(error.value) == f"{test}: record 2 has no field 'positive_ctxs'"


def test_dpr_ctx_without_text(dpr_files):
    train, test = dpr_files
    records = json.loads(train.read_text())
    del records[0]["hard_negative_ctxs"][3]["text"]
    train.write_text(json.dumps(records))
    with pytest.raises(ProbeDataError) as error:
        load_probe_set("dpr", str(train), str(test))
    assert_one_line(error, "biencoder-nq-adv-hn-train.json", "record 0", "hard_negative_ctxs[3].text")


def record_start(text: str, question: str) -> int:
    """Where the record of ``question`` begins in the text of a DPR file."""
    return text.rindex("{", 0, text.index(f'"{question}"'))


@pytest.mark.parametrize(
    ("cut", "record"),
    [
        (lambda text: 0, 0),  # an empty file
        (lambda text: record_start(text, "q1") + 40, 1),  # inside record 1
        (lambda text: record_start(text, "q2"), 2),  # after the comma that follows record 1
        (lambda text: text.rindex("]"), 3),  # after the last record, before the closing bracket
    ],
)
def test_truncated_json_names_the_record_it_cuts(dpr_files, cut, record):
    train, test = dpr_files
    text = train.read_text()
    train.write_text(text[: cut(text)])
    with pytest.raises(ProbeDataError) as error:
        load_probe_set("dpr", str(train), str(test))
    assert str(error.value) == (f"{train}: not valid JSON at record {record} (parse error: premature EOF)")


@pytest.mark.parametrize(
    ("edit", "record", "detail"),
    [
        (lambda text: text.replace('"q1"', "q1"), 1, "lexical error: invalid char in json text."),
        (
            lambda text: text.replace("\n    },\n    {", "\n    }\n    {", 1),  # no comma after record 0
            1,
            "parse error: after array element, I expect ',' or ']'",
        ),
        (lambda text: text + "[]", 3, "parse error: trailing garbage"),
        (lambda text: text.replace("P3", "\udce9"), 2, "lexical error: invalid bytes in UTF8 string."),
    ],
)
def test_json_syntax_error_names_the_record_it_is_in(dpr_files, edit, record, detail):
    train, test = dpr_files
    train.write_bytes(edit(train.read_text()).encode("utf-8", "surrogateescape"))
    with pytest.raises(ProbeDataError) as error:
        load_probe_set("dpr", str(train), str(test))
    assert str(error.value) == f"{train}: not valid JSON at record {record} ({detail})"


def test_truncated_gzip_file(dpr_files, tmp_path):
    train, test = dpr_files
    gz_train = tmp_path / "train.json.gz"
    gz_train.write_bytes(gzip.compress(train.read_bytes())[:-12])
    with pytest.raises(ProbeDataError) as error:
        load_probe_set("dpr", str(gz_train), str(test))
    assert_one_line(error, "train.json.gz: cannot be read (", "end-of-stream")


@pytest.mark.parametrize("text", ['{"question": "q"}', '\n  {"item": {"question": "q"}}', '"q"'])
def test_json_that_is_not_a_list(dpr_files, text):
    train, test = dpr_files
    train.write_text(text)
    with pytest.raises(ProbeDataError) as error:
        load_probe_set("dpr", str(train), str(test))
    assert str(error.value) == (f"{train}: not a JSON list of records (it starts with {text.strip()[0]!r})")


def test_local_file_missing_a_required_column(tmp_path):
    """The question, the positive and a first negative are required; later negatives may be absent."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    good = example_rows("x", 3)
    train.write_text("".join(json.dumps(row) + "\n" for row in good))
    test.write_text(
        "".join(json.dumps({k: v for k, v in row.items() if k != "negative_context_0"}) + "\n" for row in good)
    )
    with pytest.raises(ProbeDataError) as error:
        load_probe_set("local", str(train), str(test))
    assert str(error.value) == f"{test}: record 0 has no field 'negative_context_0'"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", "record 1 field 'positive_context' is empty"), (None, "record 1 has no field 'positive_context'")],
)
def test_local_file_bad_value(tmp_path, value, expected):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    rows = example_rows("x", 3)
    rows[1]["positive_context"] = value
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    test.write_text("".join(json.dumps(row) + "\n" for row in example_rows("y", 2)))
    with pytest.raises(ProbeDataError) as error:
        load_probe_set("local", str(train), str(test))
    assert str(error.value) == f"{train}: {expected}"


def test_local_file_non_string_value(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    rows = [dict(row, question=i) for i, row in enumerate(example_rows("x", 3))]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    test.write_text("".join(json.dumps(row) + "\n" for row in example_rows("y", 2)))
    with pytest.raises(ProbeDataError) as error:
        load_probe_set("local", str(train), str(test))
    assert_one_line(error, "train.jsonl", "record 0", "'question'", "not a string")


def test_unreadable_jsonl(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text('{"question": "q", "positive_context": \n')
    test.write_text("")
    with pytest.raises(ProbeDataError) as error:
        load_probe_set("local", str(train), str(test))
    assert_one_line(error, "train.jsonl")


def test_msmarco_row_without_selection_flags(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    row = msmarco_row("m", [1, 0], ["a", "b"])
    broken = {"query": "m", "passages": {"passage_text": ["a", "b"], "url": ["u", "v"]}}
    train.write_text(json.dumps(row) + "\n")
    test.write_text(json.dumps(row) + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(ProbeDataError) as error:
        load_probe_set("msmarco", str(train), str(test))
    assert str(error.value) == f"{test}: record 1 has no field 'passages.is_selected'"


def test_unreachable_hub_says_what_to_do():
    with pytest.raises(ProbeDataError) as error:
        load_probe_set("published", hub_id="dkacq-tests/no-such-dataset")
    assert_one_line(error, "dkacq-tests/no-such-dataset", "HF_HOME", "train=")


@pytest.mark.parametrize(
    ("kwargs", "part"),
    [
        ({"format": "dpr"}, "train= and test="),
        ({"format": "local", "train": "a.jsonl"}, "train= and test="),
        ({"format": "published"}, "hub_id="),
        ({"format": "nq"}, "unknown probe format"),
        ({"format": "local", "train": "missing.jsonl", "test": "missing.jsonl"}, "missing.jsonl: no such file"),
    ],
)
def test_bad_arguments(kwargs, part):
    with pytest.raises(ProbeDataError) as error:
        load_probe_set(**kwargs)
    assert_one_line(error, part)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dkacq" and r.levelno == logging.WARNING]


def test_dpr_dropped_records_are_counted_per_split_and_reason(dpr_files, caplog):
    train, test = dpr_files
    with caplog.at_level(logging.WARNING, logger="dkacq"):
        read = read_probe_set("dpr", str(train), str(test))
    # train: q1 has an empty hard_negative_ctxs; test: q4 has an empty positive_ctxs
    assert read.dropped == {
        "train": {"no_positive": 0, "no_negative": 1},
        "test": {"no_positive": 1, "no_negative": 0},
    }
    assert read.sources == {"train": str(train), "test": str(test)}
    assert read.overlapping_questions == 0
    assert warnings_of(caplog) == [
        f"{train} (train split): records dropped for having no positive: 0, no negative: 1",
        f"{test} (test split): records dropped for having no positive: 1, no negative: 0",
    ]


def test_a_record_with_neither_positive_nor_negative_counts_as_no_positive(tmp_path):
    train, test = tmp_path / "train.json", tmp_path / "dev.json"
    train.write_text(json.dumps([dpr_record("a", [], []), dpr_record("b", ["P"], ["N"]), dpr_record("c", [], [])]))
    test.write_text(json.dumps([dpr_record("d", ["P"], ["N"])]))
    read = read_probe_set("dpr", str(train), str(test))
    assert read.dropped["train"] == {"no_positive": 2, "no_negative": 0}


def test_msmarco_dropped_rows_are_counted(tmp_path, caplog):
    train, test = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train_rows = [
        msmarco_row("m0", [0, 1, 0], ["a0", "a1", "a2"]),
        msmarco_row("m1", [0, 0], ["b0", "b1"]),  # nothing selected
        msmarco_row("m2", [1, 1], ["c0", "c1"]),  # everything selected
        msmarco_row("m3", [0, 0, 0], ["d0", "d1", "d2"]),  # nothing selected
    ]
    train.write_text("".join(json.dumps(row) + "\n" for row in train_rows))
    test.write_text(json.dumps(msmarco_row("m4", [1, 0], ["e0", "e1"])) + "\n")
    with caplog.at_level(logging.WARNING, logger="dkacq"):
        read = read_probe_set("msmarco", str(train), str(test))
    assert read.dropped == {
        "train": {"no_positive": 2, "no_negative": 1},
        "test": {"no_positive": 0, "no_negative": 0},
    }
    assert warnings_of(caplog) == [f"{train} (train split): records dropped for having no positive: 2, no negative: 1"]


def test_questions_in_both_splits_are_counted_and_warned_about(tmp_path, caplog):
    train_rows, test_rows = example_rows("tr", 5), example_rows("te", 4)
    for row, question in zip(train_rows, ["who", "what", "what", "when", "why"]):
        row["question"] = question
    for row, question in zip(test_rows, ["what", "when", "when", "how"]):
        row["question"] = question
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in train_rows))
    test.write_text("".join(json.dumps(row) + "\n" for row in test_rows))
    with caplog.at_level(logging.WARNING, logger="dkacq"):
        read = read_probe_set("local", str(train), str(test))
    assert read.overlapping_questions == 2  # "what" and "when", each counted once
    assert read.dropped == {split: {"no_positive": 0, "no_negative": 0} for split in ("train", "test")}
    assert warnings_of(caplog) == [f"distinct questions in both train ({train}) and test ({test}): 2"]


def test_load_probe_set_still_returns_the_examples_alone(dpr_files):
    train, test = dpr_files
    probe_set = load_probe_set("dpr", str(train), str(test))
    assert isinstance(probe_set, datasets.DatasetDict)
    assert rows_of(probe_set["test"]) == as_rows(HAND_WORKED["test"])


def same_file_pair(kind: str, tmp_path, train):
    """A (train, test) pair that is one file, spelled or linked differently, or a copy of it."""
    if kind == "same path":
        return str(train), str(train)
    if kind == "another spelling":
        return str(train), str(tmp_path / "." / ".." / tmp_path.name / train.name)
    if kind == "symlink":
        os.symlink(train, tmp_path / "link.json")
        return str(train), str(tmp_path / "link.json")
    copy = tmp_path / "copy" / train.name
    copy.parent.mkdir()
    shutil.copyfile(train, copy)
    return str(train), str(copy)


@pytest.mark.parametrize("kind", ["same path", "another spelling", "symlink", "copy"])
@pytest.mark.parametrize("format", ["dpr", "local", "msmarco", "published"])
def test_one_file_as_train_and_test_is_refused_before_reading(dpr_files, tmp_path, monkeypatch, kind, format):
    train, _ = dpr_files
    first, second = same_file_pair(kind, tmp_path, train)

    def must_not_read(*args, **kwargs):
        raise AssertionError("the file was read")

    for reader in ("_dpr_split", "_read_table"):
        monkeypatch.setattr(examples, reader, must_not_read)
    with pytest.raises(ProbeDataError) as error:
        load_probe_set(format, first, second)
    if kind == "copy":
        assert str(error.value) == f"{first} and {second}: train= and test= have identical content"
    else:
        assert str(error.value) == f"{first} and {second}: train= and test= are the same file ({train.resolve()})"


def test_files_of_equal_size_but_different_content_are_accepted(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in example_rows("aa", 3)))
    test.write_text("".join(json.dumps(row) + "\n" for row in example_rows("bb", 3)))
    assert train.stat().st_size == test.stat().st_size
    probe_set = load_probe_set("local", str(train), str(test))
    assert rows_of(probe_set["test"]) == example_rows("bb", 3)
