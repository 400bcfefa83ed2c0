"""An attribution run killed at any moment resumes where it stopped and counts what an uninterrupted run does."""

import json
import signal
import time

import pytest
import torch
from conftest import attribute_args
from forked import run
from safetensors.torch import load_file

from dkacq.attribution.module import AttributionConflictError
from dkacq.cli import main
from dkacq.formats.counts import AttributionRun, read_segments


def _counting_texts(monkeypatch) -> list[int]:
    from dkacq.attribution.module import AttributionModule

    seen, step = [], AttributionModule.predict_step

    def counting(self, texts, batch_idx):
        seen.append(len(texts))
        return step(self, texts, batch_idx)

    monkeypatch.setattr(AttributionModule, "predict_step", counting)
    return seen


def test_killed_run_resumes_to_the_uninterrupted_counts(tiny_bert_dir, attributed, tmp_path, monkeypatch):
    from dkacq.attribution.module import AttributionModule

    data, whole = attributed
    args = attribute_args(tiny_bert_dir, data, tmp_path, "killed")
    step = AttributionModule.predict_step

    def slow_step(self, texts, batch_idx):
        result = step(self, texts, batch_idx)
        print("batch", flush=True)
        time.sleep(0.3)
        return result

    monkeypatch.setattr(AttributionModule, "predict_step", slow_step)
    progress = tmp_path / "killed" / "progress"
    done = run(args, tmp_path, when=lambda out: out.count("batch") >= 2, signum=signal.SIGKILL)
    assert done.code == -signal.SIGKILL
    monkeypatch.undo()
    (segment,) = progress.glob("*.safetensors")
    counted = int(load_file(segment)["num_texts"])
    assert 0 < counted < 8, "killed mid-run"
    (saved,) = read_segments(tmp_path / "killed")
    assert len(saved.texts) == counted and all(len(table) == counted for table in saved.per_text.values())
    assert not (tmp_path / "killed" / "counts.safetensors").exists()

    counting = _counting_texts(monkeypatch)
    main(args)
    assert sum(counting) == 8 - counted, "only the texts the killed run had not counted"
    expected = load_file(whole / "counts.safetensors")
    resumed = load_file(tmp_path / "killed" / "counts.safetensors")
    assert expected.keys() == resumed.keys()
    assert {"per_text/intermediate@0.1", "per_text/output@0.2"} <= expected.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert int(resumed["num_texts"]) == 8
    keys = AttributionRun.load(whole).text_keys
    assert len(keys) == 8 and AttributionRun.load(tmp_path / "killed").text_keys == keys
    speed = json.loads((tmp_path / "killed" / "summary.json").read_text())["speed"]
    assert speed["texts"] == 8 - counted and speed["wall_seconds"] > 0 and speed["devices"] == 1
    assert speed["texts_per_second"] == pytest.approx(speed["texts"] / speed["wall_seconds"], rel=1e-3, abs=1e-3)
    assert speed["device_type"] == "cpu" and speed["peak_memory_bytes"] > 10**7
    assert not list(progress.glob("*.safetensors")), "segments are removed once the counts are written"


def test_an_unfinished_run_of_other_settings_is_refused(tiny_bert_dir, attributed, tmp_path, monkeypatch):
    from dkacq.attribution.module import AttributionModule

    def interrupt(self, texts, batch_idx):
        if batch_idx == 2:
            raise KeyboardInterrupt
        return step(self, texts, batch_idx)

    step = AttributionModule.predict_step
    monkeypatch.setattr(AttributionModule, "predict_step", interrupt)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        main(attribute_args(tiny_bert_dir, attributed[0], tmp_path, "out"))
    monkeypatch.setattr(AttributionModule, "predict_step", step)
    assert list((tmp_path / "out" / "progress").glob("*.safetensors"))
    with pytest.raises(AttributionConflictError, match="unfinished attribution run of other settings .*steps 2 -> 3"):
        main(attribute_args(tiny_bert_dir, attributed[0], tmp_path, "out", steps=3))


def test_a_run_stopped_after_its_last_text_only_writes_the_counts(tiny_bert_dir, attributed, tmp_path, monkeypatch):
    data, whole = attributed

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dkacq.attribution.module.write_counts", stop)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        main(attribute_args(tiny_bert_dir, data, tmp_path, "out"))
    monkeypatch.undo()
    counted = _counting_texts(monkeypatch)
    main(attribute_args(tiny_bert_dir, data, tmp_path, "out"))
    assert counted == []
    expected, resumed = load_file(whole / "counts.safetensors"), load_file(tmp_path / "out" / "counts.safetensors")
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[key], resumed[key]) for key in expected)
    assert AttributionRun.load(tmp_path / "out").text_keys == AttributionRun.load(whole).text_keys
