"""The embedding cache records every file's size and sha256 and refuses damaged files with one line."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file

from dkacq.data.examples import EXAMPLE_COLUMNS
from dkacq.encoders import cache, extraction
from dkacq.encoders.cache import (
    CacheDamagedError,
    CacheError,
    LayerFileWriter,
    file_record,
    layer_file,
    open_cache,
    staging_folder,
)
from dkacq.encoders.extraction import build_cache
from dkacq.encoders.loading import load_encoders

REQUEST = {"model": "tiny-bert", "pooling": "mean"}


def _probe_set() -> DatasetDict:
    words = "the python list dict function class module value return string file error type".split()
    rows = [
        [" ".join(words[(i + k) % len(words) : (i + k) % len(words) + 3]) + f" {i}" for k in range(6)]
        for i in range(12)
    ]
    columns = {column: [row[k] for row in rows] for k, column in enumerate(EXAMPLE_COLUMNS)}
    return DatasetDict(
        {
            "train": Dataset.from_dict({c: v[:8] for c, v in columns.items()}),
            "test": Dataset.from_dict({c: v[8:] for c, v in columns.items()}),
        }
    )


def _build(folder, preset):
    query_encoder, passage_encoder = load_encoders(preset)
    return build_cache(folder, REQUEST, query_encoder, passage_encoder, _probe_set(), batch_size=4, precision="32-true")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_bert_preset):
    return _build(tmp_path_factory.mktemp("built") / "cache", tiny_bert_preset).folder


@pytest.fixture
def cache_folder(built, tmp_path):
    """A private copy of the built cache, free to damage."""
    return shutil.copytree(built, tmp_path / "cache")


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_manifest_records_every_file_size_and_sha256(cache_folder):
    manifest = json.loads((cache_folder / "manifest.json").read_text())
    names = ["index.safetensors"] + [f"layer_{k:02d}.safetensors" for k in range(manifest["num_hidden_states"])]
    assert sorted(manifest["files"]) == sorted(names)
    assert sorted(p.name for p in cache_folder.iterdir()) == sorted(names + ["manifest.json"])
    for name in names:
        path = cache_folder / name
        assert manifest["files"][name] == {
            "bytes": os.stat(path).st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    assert open_cache(cache_folder, REQUEST, verify=True) is not None


def test_streamed_layer_file_reads_back_as_written(tmp_path):
    torch.manual_seed(0)
    queries, passages = torch.randn(5, 8), torch.randn(7, 8)
    path = tmp_path / "layer_00.safetensors"
    writer = LayerFileWriter(path, 5, 7, 8, "float32")
    for rows in (queries[:3], queries[3:], passages[:4], passages[4:]):
        writer.append(rows)
    record = writer.close()
    assert record == {"bytes": os.stat(path).st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    tensors = load_file(path)
    assert torch.equal(tensors["queries"], queries) and torch.equal(tensors["passages"], passages)


def test_truncated_layer_file_is_one_line_naming_it(cache_folder):
    cache = open_cache(cache_folder, REQUEST)
    path = layer_file(cache_folder, 1)
    size = os.stat(path).st_size
    os.truncate(path, size - 100)
    with pytest.raises(CacheDamagedError) as error:
        cache.layer(1)
    message = _one_line(error)
    assert str(path) in message and f"{size - 100:,} bytes, expected {size:,}" in message
    assert f"delete {cache_folder} to rebuild it" in message
    with pytest.raises(CacheDamagedError, match="layer_01.safetensors") as error:
        open_cache(cache_folder, REQUEST)
    assert str(path) in _one_line(error)


def test_unreadable_layer_file_of_right_size_is_one_line_naming_it(cache_folder):
    cache = open_cache(cache_folder, REQUEST)
    path = layer_file(cache_folder, 0)
    with open(path, "r+b") as file:
        file.write(b"\xff" * 16)  # header length and start of the header
    with pytest.raises(CacheDamagedError) as error:
        cache.layer(0)
    message = _one_line(error)
    assert str(path) in message and "unreadable" in message


def test_zeros_in_place_are_refused_when_first_read_and_served_only_without_verify(cache_folder):
    path = layer_file(cache_folder, 2)
    original = load_file(path)
    size = os.stat(path).st_size
    with open(path, "r+b") as file:
        file.seek(size - 64)
        file.write(bytes(64))
    cache = open_cache(cache_folder, REQUEST)  # sizes only: a stat per file
    with pytest.raises(CacheDamagedError) as error:
        cache.layer(2)
    message = _one_line(error)
    assert str(path) in message and "checksum differs" in message
    _, passages = open_cache(cache_folder, REQUEST, verify=False).layer(2)
    assert torch.equal(passages[-1, -16:], torch.zeros(16))
    assert torch.equal(passages[:-1], original["passages"][:-1])


def test_each_file_is_checksummed_once_per_process(cache_folder, monkeypatch):
    hashed = []
    monkeypatch.setattr(cache, "_VERIFIED", set())
    monkeypatch.setattr(cache, "file_record", lambda path: hashed.append(path.name) or file_record(path))
    opened = open_cache(cache_folder, REQUEST)
    assert hashed == []
    for _ in range(2):
        opened.layer(1)
        opened.index("train")
        open_cache(cache_folder, REQUEST).layer(1)
    assert sorted(hashed) == ["index.safetensors", "layer_01.safetensors"]


@pytest.mark.parametrize("text", ['{"model": ', "[1, 2]", "\xff\xfe"])
def test_garbage_manifest_is_one_line_naming_it(cache_folder, text):
    (cache_folder / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CacheDamagedError) as error:
        open_cache(cache_folder, REQUEST)
    message = _one_line(error)
    assert str(cache_folder / "manifest.json") in message and f"delete {cache_folder} to rebuild it" in message


def test_manifest_without_file_records_is_damaged(cache_folder):
    path = cache_folder / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["files"]
    path.write_text(json.dumps(manifest))
    for request in (REQUEST, REQUEST | {"pooling": "cls"}):  # damaged, not mismatched: it is rebuilt, not kept
        with pytest.raises(CacheError) as error:
            open_cache(cache_folder, request)
        assert isinstance(error.value, CacheDamagedError)
        assert "older dkacq" in _one_line(error) and str(path) in str(error.value)


def test_missing_layer_file_is_one_line(cache_folder):
    path = layer_file(cache_folder, 0)
    path.unlink()
    with pytest.raises(CacheDamagedError, match="missing") as error:
        open_cache(cache_folder, REQUEST)
    assert str(path) in _one_line(error)


def test_files_get_the_umask_mode(tmp_path, tiny_bert_preset):
    previous = os.umask(0o022)
    try:
        folder = _build(tmp_path / "cache", tiny_bert_preset).folder
    finally:
        os.umask(previous)
    for name in ("index.safetensors", "manifest.json", "layer_00.safetensors"):
        assert os.stat(folder / name).st_mode & 0o777 == 0o644, name
    assert os.stat(folder).st_mode & 0o777 == 0o755


def test_rebuild_replaces_an_existing_folder(cache_folder, tiny_bert_preset):
    (cache_folder / "stale.txt").write_text("from an earlier build")
    _build(cache_folder, tiny_bert_preset)
    assert not (cache_folder / "stale.txt").exists()
    assert sorted(p.name for p in cache_folder.parent.iterdir()) == ["cache"]
    assert open_cache(cache_folder, REQUEST, verify=True) is not None


def _fail_in_passages(monkeypatch):
    """An error in the first batch of passages, after the queries were written."""
    write = extraction.LayerRowWriter.on_predict_batch_end

    def failing(writer, trainer, pl_module, outputs, batch, *args):
        if batch["side"] == 1:
            raise RuntimeError("simulated failure")
        write(writer, trainer, pl_module, outputs, batch, *args)

    monkeypatch.setattr(extraction.LayerRowWriter, "on_predict_batch_end", failing)
    return RuntimeError


def _bad_write(monkeypatch):
    """Rows of one batch reach the disk otherwise than they were sent: caught by the read-back."""
    pwrite = cache._pwrite_all
    calls = []

    def damaging(fd, data, offset):
        calls.append(1)
        if len(calls) == 5:
            data = bytes(memoryview(data).cast("B"))[:-4] + bytes(4)
        pwrite(fd, data, offset)

    monkeypatch.setattr(cache, "_pwrite_all", damaging)
    return CacheDamagedError


@pytest.mark.parametrize("failure", [_fail_in_passages, _bad_write])
def test_failing_build_leaves_no_target_and_resumes(tmp_path, tiny_bert_preset, monkeypatch, failure, built):
    """A build that fails leaves no cache, only its staging folder; the next build finishes it, and the
    cache is the same as a build that never failed."""
    expected = failure(monkeypatch)
    with pytest.raises(expected):
        _build(tmp_path / "caches" / "cache", tiny_bert_preset)
    left = list((tmp_path / "caches").iterdir())
    assert len(left) == 1 and left[0].name.startswith(".cache.") and left[0].name.endswith(".partial")
    monkeypatch.undo()
    folder = _build(tmp_path / "caches" / "cache", tiny_bert_preset).folder
    assert [p.name for p in (tmp_path / "caches").iterdir()] == ["cache"]
    for path in built.iterdir():
        if path.name != "manifest.json":
            assert (folder / path.name).read_bytes() == path.read_bytes(), path.name


def test_concurrent_builds_get_their_own_staging_folders(tmp_path):
    target = tmp_path / "cache"
    first, second = staging_folder(target), staging_folder(target)
    assert first != second and first.is_dir() and second.is_dir()
    assert first.parent == target.parent and not target.exists()
