"""The stored probe set: what its manifest records, when it is rebuilt, and two processes storing it at once."""

import hashlib
import json
import logging
import time
from pathlib import Path

import pytest
from datasets import DatasetDict, load_from_disk

from dkacq.data import storage
from dkacq.data.examples import EXAMPLE_COLUMNS, ProbeDataError
from dkacq.data.storage import stored_probe_set


def dpr_record(question: str, positives: list[str], negatives: list[str]) -> dict:
    def ctx(title: str) -> dict:
        return {"title": title, "text": title.lower()}

    return {
        "question": question,
        "positive_ctxs": [ctx(p) for p in positives],
        "hard_negative_ctxs": [ctx(n) for n in negatives],
    }


def example_rows(prefix: str, n: int) -> list[dict]:
    return [{column: f"{prefix} {column} {i}" for column in EXAMPLE_COLUMNS} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def expected_fingerprint(rows: dict[str, list[dict]]) -> str:
    """The fingerprint as specified: sha256 over split names in order, then each column's texts."""
    digest = hashlib.sha256()
    for split in sorted(rows):
        digest.update(split.encode())
        for column in EXAMPLE_COLUMNS:
            for row in rows[split]:
                digest.update(row[column].encode() + b"\0")
    return digest.hexdigest()[:16]


def rows_of(probe_set: DatasetDict) -> dict[str, list[dict]]:
    return {split: [dict(row) for row in probe_set[split]] for split in probe_set}


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dkacq" and r.levelno == logging.WARNING]


@pytest.fixture
def local_files(tmp_path):
    rows = {"train": example_rows("tr", 4), "test": example_rows("te", 3)}
    paths = {split: write_jsonl(tmp_path / f"{split}.jsonl", split_rows) for split, split_rows in rows.items()}
    return rows, paths


@pytest.fixture
def counted_builds(monkeypatch):
    """How many times the store read its source."""
    builds = []
    read = storage.read_probe_set

    def counting(*args, **kwargs):
        builds.append(args)
        return read(*args, **kwargs)

    monkeypatch.setattr(storage, "read_probe_set", counting)
    return builds


def test_manifest_records_dropped_records_and_shared_questions(tmp_path, caplog):
    train, test = tmp_path / "nq-train.json", tmp_path / "nq-dev.json"
    train.write_text(
        json.dumps(
            [
                dpr_record("who", ["P0"], ["N0"]),
                dpr_record("what", [], ["N1"]),  # no positive
                dpr_record("when", ["P1"], []),  # no negative
                dpr_record("where", ["P2"], []),  # no negative
            ]
        )
    )
    test.write_text(
        json.dumps(
            [
                dpr_record("who", ["P3"], ["N2"]),  # also a train example's question
                dpr_record("when", [], []),  # neither: counted as no positive; dropped in both splits, so not shared
                dpr_record("why", ["P4", "P5"], ["N3"]),
            ]
        )
    )
    folder = tmp_path / "cache" / "nq" / "probe_set"
    with caplog.at_level(logging.WARNING, logger="dkacq"):
        probe_set, _ = stored_probe_set(folder, "dpr", str(train), str(test))
    manifest = manifest_of(folder)
    assert manifest["dropped"] == {
        "train": {"no_positive": 1, "no_negative": 2},
        "test": {"no_positive": 1, "no_negative": 0},
    }
    assert manifest["overlapping_questions"] == 1
    assert manifest["num_examples"] == {"train": 1, "test": 3}
    assert probe_set["test"]["question"] == ["who", "why", "why"]
    assert warnings_of(caplog) == [
        f"{train} (train split): records dropped for having no positive: 1, no negative: 2",
        f"{test} (test split): records dropped for having no positive: 1, no negative: 0",
        f"distinct questions in both train ({train}) and test ({test}): 1",
    ]


def test_stored_set_is_reused_until_a_source_file_changes(tmp_path, local_files, counted_builds, caplog):
    rows, paths = local_files
    folder = tmp_path / "probe_set"
    first, first_fingerprint = stored_probe_set(folder, "local", paths["train"], paths["test"])
    again, again_fingerprint = stored_probe_set(folder, "local", paths["train"], paths["test"])
    assert len(counted_builds) == 1
    assert rows_of(again) == rows_of(first) == rows
    assert first_fingerprint == again_fingerprint == expected_fingerprint(rows)
    assert manifest_of(folder)["overlapping_questions"] == 0
    assert manifest_of(folder)["dropped"] == {split: {"no_positive": 0, "no_negative": 0} for split in rows}

    rows["test"] = example_rows("edited", 2)
    write_jsonl(Path(paths["test"]), rows["test"])
    edited, edited_fingerprint = stored_probe_set(folder, "local", paths["train"], paths["test"])
    assert len(counted_builds) == 2
    assert rows_of(edited) == rows_of(load_from_disk(str(folder))) == rows
    assert edited_fingerprint == expected_fingerprint(rows)
    assert list(folder.parent.glob(".probe_set.*")) == []  # no build folder left behind
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("content", ['{"fingerprint": ', "[1, 2]", "\udcff"])
def test_manifest_that_is_not_json_is_rebuilt_with_one_warning(tmp_path, local_files, counted_builds, caplog, content):
    rows, paths = local_files
    folder = tmp_path / "probe_set"
    stored_probe_set(folder, "local", paths["train"], paths["test"])
    (folder / "manifest.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="dkacq"):
        probe_set, fingerprint = stored_probe_set(folder, "local", paths["train"], paths["test"])
    assert len(counted_builds) == 2
    assert rows_of(probe_set) == rows and fingerprint == expected_fingerprint(rows)
    assert manifest_of(folder)["fingerprint"] == expected_fingerprint(rows)
    [warning] = warnings_of(caplog)
    assert warning.startswith(f"{folder / 'manifest.json'}: not valid JSON (")
    assert warning.endswith("); the probe set is rebuilt") and "\n" not in warning


def test_store_of_an_older_format_is_not_reused(tmp_path, local_files):
    """A store written before train and test had to differ may hold one file as both splits."""
    rows, paths = local_files
    folder = tmp_path / "probe_set"
    stored_probe_set(folder, "local", paths["train"], paths["test"])
    old = manifest_of(folder)
    del old["store_format"]
    old.update(test_file=paths["train"], file_digests=old["file_digests"][:1] * 2)
    (folder / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ProbeDataError) as error:
        stored_probe_set(folder, "local", paths["train"], paths["train"])
    assert "train= and test= are the same file" in str(error.value)


def _store_at_once(folder: str, train: str, test: str, barrier, builds: str, result: str) -> None:
    """One of two processes storing the same probe set; each build is logged and slowed down, so
    that the other process asks while it is under way."""
    read = storage.read_probe_set

    def slow_read(*args, **kwargs):
        with open(builds, "a") as file:
            file.write("build\n")
        time.sleep(1.0)
        return read(*args, **kwargs)

    storage.read_probe_set = slow_read
    barrier.wait()
    _, fingerprint = stored_probe_set(Path(folder), "local", train, test)
    Path(result).write_text(fingerprint)


@pytest.mark.slow
def test_two_processes_storing_at_once_build_one_complete_probe_set(tmp_path, local_files, fork_context):
    rows, paths = local_files
    folder = tmp_path / "cache" / "probe_set"
    builds = tmp_path / "builds.txt"
    context = fork_context
    barrier = context.Barrier(2)
    results = [tmp_path / f"result-{i}.txt" for i in range(2)]
    processes = [
        context.Process(
            target=_store_at_once,
            args=(str(folder), paths["train"], paths["test"], barrier, str(builds), str(result)),
        )
        for result in results
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0]
    assert [result.read_text() for result in results] == [expected_fingerprint(rows)] * 2
    assert builds.read_text() == "build\n"  # the second process found the first one's set under the lock
    assert sorted(p.name for p in folder.parent.iterdir()) == ["probe_set", "probe_set.lock"]
    assert sorted(p.name for p in folder.iterdir()) == ["dataset_dict.json", "manifest.json", "test", "train"]
    assert rows_of(load_from_disk(str(folder))) == rows
    assert manifest_of(folder)["fingerprint"] == expected_fingerprint(rows)
