"""An attribution run killed at any moment resumes where it stopped and counts what an uninterrupted run does."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from dkacq.attribution.module import AttributionConflictError
from dkacq.cli import main
from dkacq.formats.counts import AttributionRun, read_segments


def _args(model_dir, probe_files, tmp_path, out: str, steps: int = 3) -> list[str]:
    train, test = probe_files
    return [
        "attribute",
        "--model",
        "bert-mean",
        f"--model.encoder.query.model={model_dir}",
        f"--model.encoder.passage.model={model_dir}",
        f"--model.steps={steps}",
        f"--model.output_dir={tmp_path / out}",
        "--data.dataset=toy",
        "--data.source=local",
        f"--data.train_file={train}",
        f"--data.test_file={test}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.max_examples=12",
        "--data.batch_size=2",
    ]


SLOW_RUN = """
import sys, time
from dkacq.attribution.module import AttributionModule
from dkacq.cli import main

step = AttributionModule.predict_step
def slow_step(self, texts, batch_idx):
    result = step(self, texts, batch_idx)
    time.sleep(1.0)
    return result
AttributionModule.predict_step = slow_step
main(sys.argv[1:])
"""


def _counting_texts(monkeypatch) -> list[int]:
    from dkacq.attribution.module import AttributionModule

    seen, step = [], AttributionModule.predict_step

    def counting(self, texts, batch_idx):
        seen.append(len(texts))
        return step(self, texts, batch_idx)

    monkeypatch.setattr(AttributionModule, "predict_step", counting)
    return seen


def test_killed_run_resumes_to_the_uninterrupted_counts(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    main(_args(tiny_bert_dir, probe_files, tmp_path, "whole"))
    args = _args(tiny_bert_dir, probe_files, tmp_path, "killed")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SLOW_RUN), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = tmp_path / "killed" / "progress"
    deadline = time.time() + 120
    while time.time() < deadline and not list(progress.glob("*.safetensors")):
        time.sleep(0.05)
    time.sleep(1.5)  # a batch or two more
    process.send_signal(signal.SIGKILL)
    process.wait()
    (segment,) = progress.glob("*.safetensors")
    counted = int(load_file(segment)["num_texts"])
    assert 0 < counted < 12, "killed mid-run"
    (saved,) = read_segments(tmp_path / "killed")
    assert len(saved.texts) == counted and all(len(table) == counted for table in saved.per_text.values())
    assert not (tmp_path / "killed" / "counts.safetensors").exists()

    attributed = _counting_texts(monkeypatch)
    main(args)
    assert sum(attributed) == 12 - counted, "only the texts the killed run had not counted"
    whole, resumed = (
        load_file(tmp_path / "whole" / "counts.safetensors"),
        load_file(tmp_path / "killed" / "counts.safetensors"),
    )
    assert whole.keys() == resumed.keys()
    assert {"per_text/intermediate@0.1", "per_text/output@0.2"} <= whole.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert int(resumed["num_texts"]) == 12
    keys = AttributionRun.load(tmp_path / "whole").text_keys
    assert len(keys) == 12 and AttributionRun.load(tmp_path / "killed").text_keys == keys
    speed = json.loads((tmp_path / "killed" / "summary.json").read_text())["speed"]
    assert speed["texts"] == 12 - counted and speed["wall_seconds"] > 0 and speed["devices"] == 1
    assert speed["texts_per_second"] == pytest.approx(speed["texts"] / speed["wall_seconds"], rel=1e-3, abs=1e-3)
    assert speed["device_type"] == "cpu" and speed["peak_memory_bytes"] > 10**7
    assert not list(progress.glob("*.safetensors")), "segments are removed once the counts are written"


def test_an_unfinished_run_of_other_settings_is_refused(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    from dkacq.attribution.module import AttributionModule

    def interrupt(self, texts, batch_idx):
        if batch_idx == 2:
            raise KeyboardInterrupt
        return step(self, texts, batch_idx)

    step = AttributionModule.predict_step
    monkeypatch.setattr(AttributionModule, "predict_step", interrupt)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        main(_args(tiny_bert_dir, probe_files, tmp_path, "out"))
    monkeypatch.setattr(AttributionModule, "predict_step", step)
    assert list((tmp_path / "out" / "progress").glob("*.safetensors"))
    with pytest.raises(AttributionConflictError, match="unfinished attribution run of other settings .*steps 3 -> 4"):
        main(_args(tiny_bert_dir, probe_files, tmp_path, "out", steps=4))


def test_a_run_stopped_after_its_last_text_only_writes_the_counts(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    main(_args(tiny_bert_dir, probe_files, tmp_path, "whole"))

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dkacq.attribution.module.write_counts", stop)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        main(_args(tiny_bert_dir, probe_files, tmp_path, "out"))
    monkeypatch.undo()
    attributed = _counting_texts(monkeypatch)
    main(_args(tiny_bert_dir, probe_files, tmp_path, "out"))
    assert attributed == []
    whole, resumed = (
        load_file(tmp_path / "whole" / "counts.safetensors"),
        load_file(tmp_path / "out" / "counts.safetensors"),
    )
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert AttributionRun.load(tmp_path / "out").text_keys == AttributionRun.load(tmp_path / "whole").text_keys
