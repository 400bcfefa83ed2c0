"""Every failure the machine or the input causes is one line, before the work: a full disk, a read-only
cache, a file where a folder belongs, splits too small to probe, an empty layer list, a damaged cache. The
commands run in processes of their own (``tests/forked.py``): their exit status and all of their stderr."""

import errno
import importlib
import shutil

import pytest
from conftest import fit_args, write_probe_files
from forked import run

from dkacq.cli import is_user_error, one_line
from dkacq.formats import atomic
from dkacq.formats.atomic import check_space


@pytest.fixture
def no_model_loading(monkeypatch):
    # imported first: a module imported while the patch is on would keep the patched name for good
    importlib.import_module("dkacq.commands.attribute")
    importlib.import_module("dkacq.commands.probe")
    monkeypatch.setattr("dkacq.encoders.loading.load_encoders", lambda *a, **k: pytest.fail("a model was loaded"))


def test_a_full_disk_is_measured_in_units_that_fit_a_small_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 300_000))
    with pytest.raises(atomic.DkacqError) as error:
        check_space(tmp_path, 1_234_567, "the embedding cache (data.cache_dir)")
    assert str(error.value) == (
        f"{tmp_path}: the embedding cache (data.cache_dir) needs 1.2 MB more, but 300.0 KB are free there; "
        "free some space or choose another folder"
    )
    check_space(tmp_path, 299_999, "the embedding cache")


def test_a_write_that_fills_the_disk_is_one_line_naming_the_folder(tmp_path):
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "results.csv"))
    assert is_user_error(error)
    assert one_line(error) == (
        f"{tmp_path / 'run' / 'results.csv'}: no space left on device; free some space in {tmp_path} or write elsewhere"
    )
    assert not is_user_error(OSError(errno.ENOSPC, "No space left on device"))  # no path: a bug to trace


def test_refused_before_any_work(tiny_bert_dir, tmp_path, no_model_loading):
    data = write_probe_files(tmp_path, num_train=12, num_test=1)
    assert (
        run(fit_args(tiny_bert_dir, data, tmp_path, "--data.layers=[]"), tmp_path)
        .error()
        .startswith("data.layers is empty: give the hidden states to probe")
    )
    line = run(fit_args(tiny_bert_dir, data, tmp_path), tmp_path).error()
    assert line == f"{data[1]}: the test split has 1 example(s); probing needs at least 2"
    data = write_probe_files(tmp_path, num_train=2, num_test=4)
    line = run(fit_args(tiny_bert_dir, data, tmp_path, "--data.val_fraction=0.9"), tmp_path).error()
    assert line.startswith(f"{data[0]}: the train split has 2 example(s), too few to hold out 2 for validation")
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    (tmp_path / "cache").rename(tmp_path / "was-cache")
    (tmp_path / "cache").write_text("a file")
    line = run(fit_args(tiny_bert_dir, data, tmp_path), tmp_path).error()
    assert line == f"{tmp_path / 'cache'}: a file, where dkacq needs a folder for data.cache_dir"
    assert not (tmp_path / "run").exists()


def test_attribution_refuses_an_output_folder_it_cannot_write_before_loading_the_model(tmp_path, no_model_loading):
    train, test = write_probe_files(tmp_path, num_train=4, num_test=4)
    (tmp_path / "runs").write_text("a file")
    args = ["attribute", "--model=minilm", "--data.dataset=toy", "--data.source=local"]
    args += [f"--data.train_file={train}", f"--data.test_file={test}", f"--model.output_dir={tmp_path / 'runs/out'}"]
    line = run(args, tmp_path).error()
    assert line == f"{tmp_path / 'runs'}: a file, where dkacq needs a folder for {tmp_path / 'runs/out/summary.json'}"


def test_a_complete_cache_is_read_without_its_lock_and_refused_once_damaged(tiny_bert_dir, tmp_path):
    """On a read-only file system the lock file cannot be created: a complete cache needs none. Zeroed
    bytes in one of its files (of the right size) stop a fit in one line naming the file, before a cell
    is fitted."""
    from dkacq.datamodules.probe import ProbeDataModule

    train, test = write_probe_files(tmp_path, num_train=8, num_test=4)
    options = dict(encoder="bert-mean", model=str(tiny_bert_dir), dataset="toy", source="local")
    data = ProbeDataModule(**options, train_file=train, test_file=test, cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    lock = data.embeddings_folder.with_name(data.embeddings_folder.name + ".lock")
    lock.unlink(missing_ok=True)
    lock.mkdir()  # no lock file can be made there now
    again = ProbeDataModule(**options, train_file=train, test_file=test, cache_dir=str(tmp_path / "cache"))
    again.prepare_data()
    assert again.open().num_hidden_states == 3

    layer = again.embeddings_folder / "layer_01.safetensors"
    with open(layer, "r+b") as file:
        file.seek(layer.stat().st_size - 64)
        file.write(bytes(64))
    done = run(fit_args(tiny_bert_dir, (train, test), tmp_path), tmp_path)
    assert done.error(started=True) == (
        f"{layer}: checksum differs from manifest.json; delete {again.embeddings_folder} to rebuild it"
    )
    assert done.stdout == "" and not (tmp_path / "run" / "results.csv").exists()
