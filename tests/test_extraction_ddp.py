"""The embedding cache built on two processes, or resumed after an interruption, is the same, file for file
and byte for byte, as one process's uninterrupted build; a partial build is resumed only by its own request."""

import json
import os
import signal
import time

import pytest
from conftest import write_probe_files
from forked import run

from dkacq.data.examples import load_probe_set
from dkacq.encoders import extraction
from dkacq.encoders.cache import PROGRESS_DIR, layer_file, open_cache
from dkacq.encoders.extraction import IDLE, build_cache, process_rank
from dkacq.encoders.loading import load_encoders

REQUEST = {"model": "tiny", "pooling": "preset's"}
BATCH_SIZE = 8
TWO_PROCESSES = dict(accelerator="cpu", devices=2, strategy="ddp_fork")


@pytest.fixture(scope="module")
def probe_files(tmp_path_factory):
    return write_probe_files(tmp_path_factory.mktemp("probe"), num_train=30, num_test=10)


@pytest.fixture(scope="module")
def probe_set(probe_files):
    return load_probe_set("local", *probe_files)


def _build(folder, preset, probe_set, request=REQUEST, **trainer):
    query_encoder, passage_encoder = load_encoders(preset)
    return build_cache(
        folder, request, query_encoder, passage_encoder, probe_set, BATCH_SIZE, "32-true", label="test", **trainer
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, probe_set):
    """One process's uninterrupted build of a preset, made once per module."""
    folders = {}

    def build(preset):
        if preset.name not in folders:
            folders[preset.name] = _build(tmp_path_factory.mktemp("reference") / "cache", preset, probe_set).folder
        return folders[preset.name]

    return build


@pytest.fixture(params=["tiny_bert_preset", "tiny_llama_preset"])
def reference(request, built):
    """``(preset, folder)`` of the reference build."""
    preset = request.getfixturevalue(request.param)
    return preset, built(preset)


@pytest.fixture
def bert_reference(built, tiny_bert_preset):
    return tiny_bert_preset, built(tiny_bert_preset)


def assert_same_cache(folder, reference):
    """Every file but the manifest has the same bytes (read from disk, whatever the manifest says), and the
    manifest records the same files."""
    names = sorted(path.name for path in reference.iterdir())
    assert sorted(path.name for path in folder.iterdir()) == names
    for name in names:
        if name != "manifest.json":
            assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    manifests = [json.loads((path / "manifest.json").read_text()) for path in (folder, reference)]
    assert manifests[0]["files"] == manifests[1]["files"]
    assert open_cache(folder, REQUEST, verify=True) is not None


def _count_passes(monkeypatch) -> list[int]:
    """The batch numbers encoded by forward passes in this process."""
    numbers = []
    predict_step = extraction.PooledStatesExtractor.predict_step

    def counting(module, batch, batch_idx):
        if batch["number"] != IDLE:
            numbers.append(batch["number"])
        return predict_step(module, batch, batch_idx)

    monkeypatch.setattr(extraction.PooledStatesExtractor, "predict_step", counting)
    return numbers


class Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, batches: int) -> None:
    """Fail in the writer when ``batches`` batches are written, as a crash or Ctrl+C would."""
    write = extraction.LayerRowWriter.on_predict_batch_end
    written = []

    def interrupting(writer, trainer, pl_module, outputs, batch, *args):
        if len(written) == batches:
            raise Interrupted
        written.append(batch["number"])
        write(writer, trainer, pl_module, outputs, batch, *args)

    monkeypatch.setattr(extraction.LayerRowWriter, "on_predict_batch_end", interrupting)


def _interrupted_build(folder, preset, probe_set, monkeypatch, batches, request=REQUEST):
    with monkeypatch.context() as patch:
        _interrupt_after(patch, batches)
        with pytest.raises(Interrupted):
            _build(folder, preset, probe_set, request)
    assert not folder.exists()
    (staging,) = folder.parent.glob(f".{folder.name}.*.partial")
    return staging


def _num_batches(folder) -> int:
    manifest = json.loads((folder / "manifest.json").read_text())
    return sum(-(-manifest[key] // BATCH_SIZE) for key in ("num_queries", "num_passages"))


def test_two_processes_build_the_same_bytes_as_one(built, tiny_llama_preset, tmp_path, probe_set, fork_context):
    """(The BERT family is built on two processes in the test after this one.)"""
    preset, expected = tiny_llama_preset, built(tiny_llama_preset)
    started = time.perf_counter()
    cache = _build(tmp_path / "cache", preset, probe_set, **TWO_PROCESSES)
    seconds = time.perf_counter() - started
    assert_same_cache(cache.folder, expected)
    speed = cache.manifest["speed"]
    assert speed["devices"] == 2 and speed["device_type"] == "cpu"
    assert speed["batches"] == _num_batches(expected) and speed["resumed_batches"] == 0
    assert speed["texts"] == cache.manifest["num_queries"] + cache.manifest["num_passages"]
    assert speed["texts_per_second"] > 0 and speed["peak_memory_bytes"] > 0 and speed["precision"] == "32-true"
    assert [path.name for path in tmp_path.iterdir()] == ["cache"]
    print(f"\n{preset.name}: 2 processes {seconds:.1f} s, encoding {speed['wall_seconds']:.2f} s")


def test_interrupted_build_encodes_only_the_batches_left(reference, tmp_path, monkeypatch, probe_set):
    preset, expected = reference
    staging = _interrupted_build(tmp_path / "cache", preset, probe_set, monkeypatch, batches=7)
    progress = json.loads((staging / PROGRESS_DIR / "rank_00000.json").read_text())
    assert sorted(map(int, progress["batches"])) == list(range(7))
    passes = _count_passes(monkeypatch)
    cache = _build(tmp_path / "cache", preset, probe_set)
    total = _num_batches(expected)
    assert sorted(passes) == list(range(7, total))
    assert cache.manifest["speed"]["batches"] == total - 7 and cache.manifest["speed"]["resumed_batches"] == 7
    assert_same_cache(cache.folder, expected)
    assert [path.name for path in tmp_path.iterdir()] == ["cache"]


def test_build_interrupted_on_one_process_resumes_on_two(
    bert_reference, tmp_path, monkeypatch, probe_set, fork_context
):
    preset, expected = bert_reference
    _interrupted_build(tmp_path / "cache", preset, probe_set, monkeypatch, batches=9)
    cache = _build(tmp_path / "cache", preset, probe_set, **TWO_PROCESSES)
    speed = cache.manifest["speed"]
    assert (speed["batches"], speed["resumed_batches"], speed["devices"]) == (_num_batches(expected) - 9, 9, 2)
    assert_same_cache(cache.folder, expected)


def test_partial_build_of_another_request_is_not_resumed(bert_reference, tmp_path, monkeypatch, probe_set):
    preset, expected = bert_reference
    total = _num_batches(expected)
    other_request = dict(REQUEST, pooling="other")
    other = _interrupted_build(tmp_path / "cache", preset, probe_set, monkeypatch, 5, request=other_request)
    passes = _count_passes(monkeypatch)
    cache = _build(tmp_path / "cache", preset, probe_set)
    assert sorted(passes) == list(range(total)), "every batch encoded again"
    assert_same_cache(cache.folder, expected)
    assert other.is_dir() and len(json.loads((other / PROGRESS_DIR / "rank_00000.json").read_text())["batches"]) == 5
    passes.clear()
    cache = _build(tmp_path / "cache", preset, probe_set, request=other_request)  # its own partial build
    assert sorted(passes) == list(range(5, total)) and not other.exists()
    assert cache.manifest["pooling"] == "other"


def test_build_stopped_after_its_last_batch_only_finishes(bert_reference, tmp_path, monkeypatch, probe_set):
    """Every batch written, then a failure before the cache was in place: the next build encodes nothing
    (its process runs one idle batch) and publishes the same cache."""
    preset, expected = bert_reference

    def failing_publish(*args, **kwargs):
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(extraction, "publish", failing_publish)
        with pytest.raises(Interrupted):
            _build(tmp_path / "cache", preset, probe_set)
    assert not (tmp_path / "cache").exists()
    passes = _count_passes(monkeypatch)
    cache = _build(tmp_path / "cache", preset, probe_set)
    assert passes == [] and cache.manifest["speed"]["resumed_batches"] == _num_batches(expected)
    assert_same_cache(cache.folder, expected)


def _truncate_a_layer_file(staging, probe_set, probe_files, tmp_path):
    path = layer_file(staging, 1)
    os.truncate(path, path.stat().st_size - 8)
    return probe_set


def _change_a_header(staging, probe_set, probe_files, tmp_path):
    with open(layer_file(staging, 0), "r+b") as file:
        file.seek(10)
        file.write(b"X")
    return probe_set


def _other_texts(staging, probe_set, probe_files, tmp_path):
    """The same request (a request that does not name its data) with other texts: not resumed either."""
    tmp_path.mkdir()
    train, test = write_probe_files(tmp_path, num_train=30, num_test=10, seed=1)
    return load_probe_set("local", train, test)


@pytest.mark.parametrize("change", [_truncate_a_layer_file, _change_a_header, _other_texts])
def test_partial_files_that_do_not_fit_are_started_over(
    bert_reference, tmp_path, monkeypatch, probe_set, probe_files, change
):
    preset, expected = bert_reference
    staging = _interrupted_build(tmp_path / "cache", preset, probe_set, monkeypatch, batches=5)
    texts = change(staging, probe_set, probe_files, tmp_path / "other")
    passes = _count_passes(monkeypatch)
    cache = _build(tmp_path / "cache", preset, texts)
    assert cache.manifest["speed"]["resumed_batches"] == 0
    assert len(passes) == cache.manifest["speed"]["batches"]
    if texts is probe_set:
        assert sorted(passes) == list(range(_num_batches(expected)))
        assert_same_cache(cache.folder, expected)


def test_killed_build_resumes(bert_reference, tmp_path, monkeypatch, probe_set):
    """kill -9 in the middle of a build (a process of its own, ``tests/forked.py``): what was recorded is
    kept, and only the rest is encoded."""
    preset, expected = bert_reference
    folder = tmp_path / "cache"
    write = extraction.LayerRowWriter.on_predict_batch_end

    def killing(writer, trainer, pl_module, outputs, batch, *args):
        write(writer, trainer, pl_module, outputs, batch, *args)
        if len(writer.done) == 6:
            os.kill(os.getpid(), signal.SIGKILL)

    with monkeypatch.context() as patch:
        patch.setattr(extraction.LayerRowWriter, "commit_seconds", 0.0)
        patch.setattr(extraction.LayerRowWriter, "on_predict_batch_end", killing)
        child = run([], entry=lambda args: _build(folder, preset, probe_set))
    assert child.code == -signal.SIGKILL, child.stderr[-3000:]
    assert not folder.exists()
    passes = _count_passes(monkeypatch)
    cache = _build(folder, preset, probe_set)
    assert sorted(passes) == list(range(6, _num_batches(expected)))
    assert_same_cache(cache.folder, expected)


def test_process_rank_tells_the_launching_process_from_the_ones_started_for_a_build(monkeypatch):
    assert process_rank() == 0 and process_rank(accelerator="cpu", devices=2, strategy="ddp") == 0
    monkeypatch.setenv("LOCAL_RANK", "1")  # what Lightning's ddp launcher gives the process it starts
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert process_rank(accelerator="cpu", devices=2, strategy="ddp") == 1
    assert process_rank(accelerator="cpu", devices=1) == 0
