"""``dkacq attribute``'s progress: lines a log file can hold, the first batch's time apart."""

import re

from lightning.pytorch import Trainer
from test_attribution_run import _data, _module

from dkacq.attribution.throughput import TextThroughputBar, duration


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0.4, 41, 59.6, 200, 3599, 7500)] == [
        "0 s", "41 s", "1 min 00 s", "3 min 20 s", "59 min 59 s", "2 h 05 min",
    ]  # fmt: skip


def test_progress_in_a_file_is_lines_with_rate_and_time_left(tmp_path, probe_files, tiny_bert_preset, capsys):
    trainer = Trainer(
        accelerator="cpu", inference_mode=False, logger=False, callbacks=[TextThroughputBar(log_every_seconds=0)]
    )
    trainer.predict(
        _module(tiny_bert_preset, tmp_path),
        datamodule=_data(tmp_path, probe_files, max_examples=5),
        return_predictions=False,
    )
    output = capsys.readouterr().out
    assert "\r" not in output  # no bar frames
    lines = [line.removeprefix("attributing tiny-bert: queries: ") for line in output.splitlines()]
    assert lines[:2] == ["loading the model", "5 texts to attribute"]
    assert re.fullmatch(r"first batch, 2 texts in [\d.]+ s \(compiling and measuring memory included\)", lines[2])
    progress = [re.fullmatch(r"(\d+)/5 texts, ([\d.e+-]+) texts/s, about (.+) left", line) for line in lines[3:5]]
    assert [int(match.group(1)) for match in progress] == [4, 5]  # batches of 2 texts, the last of 1
    for match in progress:
        rate = float(match.group(2))
        assert rate > 0 and match.group(3) == duration((5 - int(match.group(1))) / rate)
    assert re.fullmatch(r"5/5 texts in \d+ s, [\d.e+-]+ texts/s after the first batch", lines[5])
    assert len(lines) == 6
