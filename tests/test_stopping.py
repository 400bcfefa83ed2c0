"""SIGTERM and SIGUSR1 stop ``dkacq fit`` (cache build and probe cells) and ``dkacq attribute`` at the end
of a batch with one line and a non-zero status; the same command run again ends with the numbers of an
uninterrupted run. Each command is signalled once in a process of its own (its exit status is the
process's); the reruns, the references and a second signal run in this one."""

import csv
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import fit_args, write_probe_files
from safetensors.torch import load_file

from dkacq.cli import main
from dkacq.commands import stopping
from dkacq.formats.counts import read_segments

RUN = """
import sys, time
from dkacq.commands import stopping

def start(self, trainer, *args, **kwargs):  # each batch says so and takes a while: a signal lands inside one
    stopping.STATE.in_batch = True
    print(f"batch of {trainer.state.stage.value}", flush=True)
    time.sleep(0.2)

for hook in ("on_train_batch_start", "on_predict_batch_start"):
    setattr(stopping.StopAtBatchEnd, hook, start)
from dkacq.cli import console
console(sys.argv[1:])
"""


def _signalled(args: list[str], cwd: Path, signum: int, after, env: dict | None = None) -> tuple[int, list[str]]:
    """Run ``dkacq <args>`` in a process of its own, send ``signum`` when ``after(lines)`` holds for its
    stdout lines so far; its exit status and stderr lines."""
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(RUN), *args],
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines, deadline = [], time.time() + 120
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if after(lines):
            process.send_signal(signum)
            break
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert "Traceback" not in stderr, stderr
    return process.returncode, [line for line in stderr.splitlines() if line.startswith("dkacq")]


def _fit_args(model_dir: Path, data: tuple[str, str], folder: Path) -> list[str]:
    options = ["--data.extraction_batch_size=8", "--data.batch_size=8", "--data.val_fraction=0.2"]
    options += ["--data.num_passages=3", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]
    return fit_args(model_dir, data, folder, *options, "--heads=[concat]")


NOT_COMPARED = {"fit_seconds", "config", "predictions"}


def _rows(folder: Path) -> list[dict]:
    with open(folder / "run" / "results.csv", newline="") as file:
        rows = [{k: v for k, v in row.items() if k not in NOT_COMPARED} for row in csv.DictReader(file)]
    return sorted(rows, key=lambda row: (row["layer"], row["probe"]))


def _count(lines: list[str], text: str) -> int:
    return sum(text in line for line in lines)


def test_fit_stopped_in_its_cache_build_and_its_cells_resumes_to_an_uninterrupted_run(
    tiny_bert_dir, tmp_path, monkeypatch, capsys
):
    data = write_probe_files(tmp_path, num_train=40, num_test=12)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    main(_fit_args(tiny_bert_dir, data, whole))
    args = _fit_args(tiny_bert_dir, data, stopped)

    # SIGUSR1 in the cache build, as SLURM sends it before a time limit: the job is requeued, as
    # Lightning's auto-requeue does it (a stand-in scontrol records its arguments).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "probe", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    slurm |= {"SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    code, stderr = _signalled(
        args, tmp_path, signal.SIGUSR1, lambda lines: _count(lines, "batch of predict") == 3, slurm
    )
    assert code == 128 + signal.SIGUSR1, stderr
    assert len(stderr) == 1 and stderr[0].startswith("dkacq: stopped by SIGUSR1: the embedding cache "), stderr
    assert " of " in stderr[0] and "batches are saved in" in stderr[0] and "SLURM job 4242 requeued" in stderr[0]
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert not (stopped / "run" / "results.csv").exists()
    assert int(re.search(r"built: (\d+) of", stderr[0]).group(1)) >= 3

    # SIGTERM in the second probe cell (sent by the process to itself, from inside a batch): the first
    # cell is recorded, and the status is 143, not 0.
    def terminate_in_the_second_cell(self, trainer, *args, **kwargs):
        stopping.STATE.in_batch = True
        if (stopped / "run" / "results.csv").exists() and trainer.training:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(stopping.StopAtBatchEnd, "on_train_batch_start", terminate_in_the_second_cell)
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"dkacq: stopped by SIGTERM: 1 of 3 probe cells done, each recorded in {stopped / 'run' / 'results.csv'}; "
        "run the same command again to resume"
    )
    assert [(row["layer"], row["probe"]) for row in _rows(stopped) if row["probe"] == "concat"] == [("0", "concat")]
    monkeypatch.undo()

    main(args)  # the same command again
    assert _rows(stopped) == _rows(whole)
    (cache,) = (path for path in (whole / "cache/toy").glob("bert-mean*") if path.is_dir())
    for layer in range(3):
        name = f"{cache.name}/layer_{layer:02d}.safetensors"
        for tensor, value in load_file(whole / "cache/toy" / name).items():
            assert torch.equal(load_file(stopped / "cache/toy" / name)[tensor], value)


def _attribute_args(model_dir: Path, data: tuple[str, str], folder: Path, out: str) -> list[str]:
    train, test = data
    return [
        "attribute",
        "--model",
        "bert-mean",
        f"--model.encoder.query.model={model_dir}",
        f"--model.encoder.passage.model={model_dir}",
        "--model.steps=2",
        f"--model.output_dir={folder / out}",
        "--data.dataset=toy",
        "--data.source=local",
        f"--data.train_file={train}",
        f"--data.test_file={test}",
        f"--data.cache_dir={folder / 'cache'}",
        "--data.max_examples=8",
        "--data.batch_size=2",
        "--trainer.enable_progress_bar=false",
    ]


def test_attribute_stopped_by_sigterm_resumes_to_the_uninterrupted_counts(tiny_bert_dir, tmp_path):
    data = write_probe_files(tmp_path, num_train=12, num_test=12)
    main(_attribute_args(tiny_bert_dir, data, tmp_path, "whole"))
    args = _attribute_args(tiny_bert_dir, data, tmp_path, "stopped")
    code, stderr = _signalled(args, tmp_path, signal.SIGTERM, lambda lines: _count(lines, "batch of predict") == 2)
    assert code == 128 + signal.SIGTERM, stderr
    saved = sum(len(segment.texts) for segment in read_segments(tmp_path / "stopped"))
    assert saved in (4, 6)  # the batch in progress when the signal came is finished and saved
    assert stderr == [
        f"dkacq: stopped by SIGTERM: {saved} of 8 texts are counted and saved in {tmp_path / 'stopped' / 'progress'}; "
        "run the same command again to resume"
    ]
    main(args)
    whole, resumed = (load_file(tmp_path / name / "counts.safetensors") for name in ("whole", "stopped"))
    assert whole.keys() == resumed.keys()
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), key
