"""SIGTERM and SIGUSR1 stop ``dkacq fit`` (cache build and probe cells) and ``dkacq attribute`` at the end
of a batch with one line and a non-zero status; the same command run again ends with the numbers of an
uninterrupted run. Every stopped and resumed run is a process of its own (``tests/forked.py``), signalled
from outside while a batch is in progress (each batch here says so on stdout and takes 0.2 s)."""

import csv
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import attribute_args, fit_args, write_probe_files
from forked import run
from safetensors.torch import load_file

from dkacq.cli import main
from dkacq.commands import stopping
from dkacq.encoders import extraction
from dkacq.formats.counts import read_segments


@pytest.fixture
def slow_batches(monkeypatch):
    """Each training and predict batch prints ``batch of <stage>`` and takes 0.2 s: a signal lands inside one."""

    def start(self, trainer, *args, **kwargs):
        stopping.STATE.in_batch = True
        sys.stdout.write(f"batch of {trainer.state.stage.value}\n")  # one write: ranks share the file, and
        sys.stdout.flush()  # print's two writes (unbuffered, PYTHONUNBUFFERED) can interleave between them
        time.sleep(0.2 / trainer.world_size)

    for hook in ("on_train_batch_start", "on_predict_batch_start"):
        monkeypatch.setattr(stopping.StopAtBatchEnd, hook, start)


def _fit_args(model_dir: Path, data: tuple[str, str], folder: Path) -> list[str]:
    options = ["--data.extraction_batch_size=32", "--data.batch_size=8", "--data.val_fraction=0.2"]
    options += ["--data.num_passages=3", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]
    return fit_args(model_dir, data, folder, *options, "--heads=[concat]")


NOT_COMPARED = {"fit_seconds", "config", "predictions"}


def _rows(folder: Path) -> list[dict]:
    with open(folder / "run" / "results.csv", newline="") as file:
        rows = [{k: v for k, v in row.items() if k not in NOT_COMPARED} for row in csv.DictReader(file)]
    return sorted(rows, key=lambda row: (row["layer"], row["probe"]))


def _batches(stdout: str, stage: str) -> int:
    return stdout.count(f"batch of {stage}\n")


@pytest.fixture(scope="module")
def fitted(tiny_bert_dir, tmp_path_factory) -> tuple[tuple[str, str], Path]:
    """An uninterrupted fit of 3 cells (:func:`_fit_args`): its probe files and its folder."""
    folder = tmp_path_factory.mktemp("stopping")
    data = write_probe_files(folder, num_train=40, num_test=12)
    main(_fit_args(tiny_bert_dir, data, folder / "whole"))
    return data, folder / "whole"


def test_fit_stopped_in_its_cache_build_and_its_cells_resumes_to_an_uninterrupted_run(
    tiny_bert_dir, fitted, tmp_path, slow_batches
):
    data, whole = fitted
    stopped = tmp_path / "stopped"
    args = _fit_args(tiny_bert_dir, data, stopped)

    # SIGUSR1 in the cache build, as SLURM sends it before a time limit: the job is requeued, as
    # Lightning's auto-requeue does it (a stand-in scontrol records its arguments).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "probe", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    slurm |= {"SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = run(args, tmp_path, slurm, lambda out: _batches(out, "predict") >= 3, signal.SIGUSR1)
    line = done.stopped(signal.SIGUSR1)
    assert line.startswith("dkacq: stopped by SIGUSR1: the embedding cache ") and line.endswith(
        "; run the same command again to resume; SLURM job 4242 requeued"
    )
    first = int(re.search(r"built: (\d+) of (\d+) batches are saved in ", line).group(1))
    assert first >= 3  # the batch in progress when the signal came is finished and saved
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert not (stopped / "run" / "results.csv").exists()

    # SIGTERM in the resumed cache build: it goes on from the saved batches, and stops again.
    done = run(args, tmp_path, when=lambda out: _batches(out, "predict") >= 2)
    second = int(re.search(r"^dkacq: stopped by SIGTERM: .* built: (\d+) of", done.stopped(signal.SIGTERM)).group(1))
    assert second >= first + 2 and _batches(done.stdout, "predict") == second - first
    assert not (stopped / "run" / "results.csv").exists()

    # SIGTERM in the second probe cell: the first cell is recorded, and the status is 143, not 0.
    done = run(args, tmp_path, when=lambda out: "[1/3] " in out and _batches(out.split("[1/3] ")[1], "train"))
    assert done.stopped(signal.SIGTERM) == (
        f"dkacq: stopped by SIGTERM: 1 of 3 probe cells done, each recorded in {stopped / 'run' / 'results.csv'}; "
        "run the same command again to resume"
    )
    assert [(row["layer"], row["probe"]) for row in _rows(stopped) if row["probe"] == "concat"] == [("0", "concat")]

    stdout = run(args, tmp_path).succeeded()  # the same command again
    assert _batches(stdout, "predict") == 0
    assert f"1 of 3 cells skipped: {stopped / 'run' / 'results.csv'}" in stdout
    assert _rows(stopped) == _rows(whole)
    (cache,) = (path for path in (whole / "cache/toy").glob("bert-mean*") if path.is_dir())
    for layer in range(3):
        name = f"{cache.name}/layer_{layer:02d}.safetensors"
        for tensor, value in load_file(whole / "cache/toy" / name).items():
            assert torch.equal(load_file(stopped / "cache/toy" / name)[tensor], value)


def test_attribute_stopped_by_sigterm_resumes_to_the_uninterrupted_counts(
    tiny_bert_dir, attributed, tmp_path, slow_batches
):
    data, whole = attributed
    args = attribute_args(tiny_bert_dir, data, tmp_path)
    done = run(args, tmp_path, when=lambda out: _batches(out, "predict") >= 2)
    line = done.stopped(signal.SIGTERM)
    saved = sum(len(segment.texts) for segment in read_segments(tmp_path / "run"))
    assert saved in (4, 6)  # the batch in progress when the signal came is finished and saved
    assert line == (
        f"dkacq: stopped by SIGTERM: {saved} of 8 texts are counted and saved in {tmp_path / 'run' / 'progress'}; "
        "run the same command again to resume"
    )
    stdout = run(args, tmp_path).succeeded()
    assert _batches(stdout, "predict") == (8 - saved) // 2, "only the texts the stopped run had not counted"
    expected, resumed = (load_file(folder / "counts.safetensors") for folder in (whole, tmp_path / "run"))
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key


def test_a_fit_on_two_ranks_stopped_in_its_cache_build_resumes_to_an_uninterrupted_build(
    tiny_bert_dir, fitted, tmp_path, slow_batches, monkeypatch
):
    """Two CPU ranks (gloo) that Lightning's ``ddp_fork`` starts, signalled as a scheduler signals a job
    (every process): each rank stops at the end of its batch, and the rerun encodes only what was not
    recorded. (A rank started this way records its batches every ``commit_seconds``, not when stopped:
    Lightning calls the callbacks' ``on_exception`` in the launching process only. Here it records each
    batch.)"""
    monkeypatch.setattr(extraction.LayerRowWriter, "commit_seconds", 0.0)
    data, reference = fitted
    two = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp_fork", "--data.layers=[2]"]
    args = _fit_args(tiny_bert_dir, data, tmp_path) + two
    done = run(args, tmp_path, when=lambda out: _batches(out, "predict") >= 2, group=True)
    line = done.stopped(signal.SIGTERM)
    assert re.fullmatch(
        r"dkacq: stopped by SIGTERM: the embedding cache .* was being built: \d+ of 11 batches .*", line
    )
    begun = _batches(done.stdout, "predict")
    assert not (tmp_path / "run" / "results.csv").exists()
    stdout = run(args, tmp_path).succeeded()  # the cache, then the cell on two ranks
    assert _batches(stdout, "predict") == 11 - begun  # each batch begun was finished and recorded
    assert _cache_files(tmp_path) == _cache_files(reference)
    assert [(row["layer"], row["probe"]) for row in _rows(tmp_path) if row["probe"] == "concat"] == [("2", "concat")]


def _cache_files(folder: Path) -> dict[str, bytes]:
    (cache,) = (path for path in (folder / "cache/toy").glob("bert-mean*") if path.is_dir())
    return {path.name: path.read_bytes() for path in cache.glob("*.safetensors")}
