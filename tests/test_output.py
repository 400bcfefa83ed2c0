"""What a user sees: a quiet ``dkacq fit`` that names each cell, its bars, TensorBoard per cell and per
run, ``dkacq attribute`` without a bar, and usage lines that name the command."""

import csv
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import fit_args, write_probe_files
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_module
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from dkacq.cli import main
from dkacq.commands import output

HEADS, LAYERS, EPOCHS = ("concat", "query_aware"), range(3), 3
DKACQ = Path(sys.executable).with_name("dkacq")
"""The installed console script (``pip install -e .``), in the environment that runs the tests."""


def _fit_args(model_dir: Path, folder: Path, *extra: str) -> list[str]:
    options = ["--data.batch_size=32", "--data.val_fraction=0.2", "--data.num_passages=3"]
    options += [f"--trainer.max_epochs={EPOCHS}", "--trainer.log_every_n_steps=1", f"--heads=[{', '.join(HEADS)}]"]
    return fit_args(model_dir, write_probe_files(folder), folder, *options, *extra)


@pytest.fixture(scope="module")
def fitted(tiny_bert_dir, tmp_path_factory):
    """One ``dkacq fit`` of 2 heads x 3 layers, run as a user runs it: the installed ``dkacq`` script, end to
    end (the one test that starts it; the others fork, ``tests/forked.py``), bars on: its folder, stdout and
    stderr."""
    folder = tmp_path_factory.mktemp("fit")
    done = subprocess.run(
        [DKACQ, *_fit_args(tiny_bert_dir, folder)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done.stdout, done.stderr


def _lines(text: str) -> list[str]:
    """What a terminal keeps of each update: the text between carriage returns and newlines."""
    return [line.rstrip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def _rows(folder: Path) -> list[dict]:
    with open(folder / "run" / "results.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_fit_into_a_log_file_says_each_cell_once_in_order_and_nothing_of_the_libraries(fitted, tiny_bert_dir):
    """Output that is not a terminal (here pipes, as a log file): no bar frames, no boxed test tables, one
    device line, one line per cache build and one per cell with its test accuracy and time."""
    folder, stdout, stderr = fitted
    everything = stdout + stderr
    name = Path(tiny_bert_dir).name
    labels = [f"toy {name} mean N=3 layer {layer} {head}" for layer in LAYERS for head in HEADS]

    assert "\r" not in everything
    lines = stdout.splitlines()
    assert re.fullmatch(
        rf"cached {name}: 960 texts at 3 hidden states in [\d.]+ s \([\d,]+ texts/s, cpu\), read back in [\d.]+ s",
        lines[0],
    ), lines[0]
    cells = [re.fullmatch(r"\[(\d+)/6\] (.*): test acc (0\.\d{3}|1\.000), [\d.]+ s", line) for line in lines[1:-1]]
    assert all(cells), lines
    assert [(int(cell[1]), cell[2]) for cell in cells] == list(enumerate(labels, 1))
    tested = {(row["layer"], row["probe"]): float(row["test_acc"]) for row in _rows(folder)}
    for cell, (layer, head) in zip(cells, [(layer, head) for layer in LAYERS for head in HEADS]):
        assert float(cell[3]) == pytest.approx(tested[str(layer), head], abs=5e-4)
    assert lines[-1] == str(folder / "run" / "results.csv")
    assert stderr.splitlines() == ["Seed set to 42", "GPU available: False, used: False"]
    for noise in ("Test metric", "┏", "Tip", "Traceback", "Warning", "Total params", "v_num", "Restoring states"):
        assert noise not in everything, noise


def test_fit_at_a_terminal_shows_bars_named_by_the_cache_and_the_cell(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dkacq.commands.probe.at_terminal", lambda: True)
    monkeypatch.setattr("dkacq.encoders.extraction.at_terminal", lambda: True)
    main(_fit_args(tiny_bert_dir, tmp_path, "--heads=[concat]", "--data.layers=[2]"))
    out = capsys.readouterr().out
    label = f"toy {Path(tiny_bert_dir).name} mean N=3 layer 2 concat"
    assert any(re.match(r"caching \S+: queries 100%.* 160/160 \[.* texts/s\]", line) for line in _lines(out))
    assert any(re.match(r"caching \S+: passages 100%.* texts/s\]", line) for line in _lines(out))
    assert f"[1/1] {label}\n" in out  # when it starts, above its bar
    assert any(line.startswith(f"{label}, epoch {EPOCHS - 1}/{EPOCHS - 1}: 100%") for line in _lines(out))
    assert any(line.startswith(f"{label}, testing: 100%") for line in _lines(out))
    assert re.search(rf"\[1/1\] {label}: test acc [\d.]+, [\d.]+ s\n", out)
    assert "Test metric" not in out and "┏" not in out


def test_a_resumed_fit_says_once_how_many_cells_it_skips(fitted, tiny_bert_dir, monkeypatch, capsys):
    folder, _, _ = fitted
    monkeypatch.chdir(folder)
    before = _rows(folder)
    main(_fit_args(tiny_bert_dir, folder, "--results.skip_finished=true", "--trainer.enable_progress_bar=false"))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"6 of 6 cells skipped: {folder / 'run' / 'results.csv'}")
    assert printed[1:] == [str(folder / "run" / "results.csv")]
    assert _rows(folder) == before


def _events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return events


def _hparams(events: EventAccumulator) -> dict:
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {key: getattr(value, value.WhichOneof("kind")) for key, value in values.items()}


def test_tensorboard_holds_each_cell_and_the_runs_curves(fitted):
    folder, _, _ = fitted
    rows = [row for row in _rows(folder) if row["probe"] in HEADS]  # the untrained baselines log nothing
    board = folder / "run" / "tensorboard"
    assert len(rows) == len(HEADS) * len(LAYERS)
    for row in rows:
        layer = int(row["layer"])
        cell = board / f"toy-{row['model']}-mean-N3-{row['probe']}-layer{layer:02d}-{row['cell_id']}"
        events = _events(cell)
        assert len(events.Scalars("train/loss_epoch")) == EPOCHS, "the training loss of every epoch"
        assert len(events.Scalars("train/loss")) == EPOCHS * 3, (
            "and of every step (3 batches of the 96 training examples)"
        )
        assert len(events.Scalars("val/acc")) == EPOCHS and len(events.Scalars("test/acc")) == 1
        (best,) = events.Scalars("val/acc_best")
        assert best.value == pytest.approx(float(row["val_acc"]), abs=1e-5), "the best epoch's"
        assert "hp_metric" not in events.Tags()["scalars"]
        experiment = events.PluginTagToContent("hparams")["_hparams_/experiment"]
        infos = plugin_data_pb2.HParamsPluginData.FromString(experiment).experiment.metric_infos
        assert sorted(info.name.tag for info in infos) == ["test/acc", "val/acc_best"]
        assert events.Scalars("test/acc")[0].value == pytest.approx(float(row["test_acc"]), abs=1e-5)
        hparams = _hparams(events)
        assert hparams["layer"] == layer and hparams["layers"] == f"[{layer}]"
        assert hparams["head"] == row["probe"] and hparams["cell_id"] == row["cell_id"]
        assert hparams["learning_rate"] == pytest.approx(float(row["learning_rate"]))
        assert hparams["max_examples"] == "" and hparams["train_file"].endswith("train.jsonl"), "unset: empty"
        assert yaml.safe_load((cell / "hparams.yaml").read_text())["layers"] == [layer]

    summary = _events(board / "summary")
    for head in HEADS:
        curve = f"toy/{rows[0]['model']}/mean/N3/{head}"
        for column in ("test_acc", "val_acc"):
            points = {event.step: event.value for event in summary.Scalars(f"{column}/{curve}")}
            expected = {int(row["layer"]): float(row[column]) for row in rows if row["probe"] == head}
            assert points == pytest.approx(expected, abs=1e-5), column


def _attribute_args(tiny_bert_dir, probe_files, tmp_path) -> list[str]:
    train, test = probe_files
    return [
        "attribute",
        "--model",
        "bert-mean",
        f"--model.encoder.query.model={tiny_bert_dir}",
        f"--model.encoder.passage.model={tiny_bert_dir}",
        "--model.steps=2",
        f"--model.output_dir={tmp_path / 'out'}",
        "--data.dataset=toy",
        "--data.source=local",
        f"--data.train_file={train}",
        f"--data.test_file={test}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.max_examples=4",
        "--data.batch_size=2",
        "--data.text_side=passage",
    ]


def test_attribute_runs_without_a_progress_bar(tiny_bert_dir, probe_files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main([*_attribute_args(tiny_bert_dir, probe_files, tmp_path), "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert out.strip().splitlines() == [str(tmp_path / "out")]
    assert int(load_file(tmp_path / "out" / "counts.safetensors")["num_texts"]) == 4


def test_attributes_bar_counts_texts(tiny_bert_dir, probe_files, tmp_path, monkeypatch, capsys):
    """At a terminal (in a log file, lines: tests/test_throughput.py)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    main(_attribute_args(tiny_bert_dir, probe_files, tmp_path))
    lines = _lines(capsys.readouterr().out)
    assert any(re.match(r"attributing \S+: passages 100%.* 4/4 \[.* texts/s\]$", line) for line in lines), lines
    assert any(re.match(r"attributing \S+: passages: first batch, 2 texts in [\d.]+ s", line) for line in lines), lines
    assert lines[-1] == str(tmp_path / "out")


@pytest.mark.parametrize("command", ["fit", "validate", "test", "attribute"])
def test_usage_names_the_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: dkacq {command} [-c CONFIG]")


def test_quiet_is_idempotent_and_shows_a_repeated_line_once_per_command():
    output.quiet(new_command=True)
    output.quiet()
    logger = rank_zero_module.log
    assert logger.filters.count(output.FILTER) == 1
    shown = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    logger.addHandler(handler)
    try:
        for _ in range(3):
            rank_zero_info("GPU available: False, used: False")
            rank_zero_info("💡 Tip: For seamless cloud logging, try installing litlogger")
        rank_zero_info("Trainer already configured with model summary callbacks")
        assert shown == ["Trainer already configured with model summary callbacks"], "device lines wait for the checks"
        output.checked()
        rank_zero_info("GPU available: False, used: False")
        output.quiet(new_command=True)
        rank_zero_info("GPU available: False, used: False")
        assert len(shown) == 2, "a refused command shows none"
        output.checked()
    finally:
        logger.removeHandler(handler)
    assert shown == [
        "Trainer already configured with model summary callbacks",
        "GPU available: False, used: False",
        "GPU available: False, used: False",
    ]


def test_quiet_leaves_out_the_libraries_deprecations_but_not_dkacqs_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output.quiet()
        for module in (
            "lightning.pytorch.utilities._pytree",
            "torch.utils._pytree",
            "transformers.modeling_utils",
            "peft",
        ):
            warnings.warn_explicit("old API", FutureWarning, "x.py", 1, module=module)
            warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1, module=module)
        warnings.warn_explicit(
            "The 'train_dataloader' does not have many workers",
            UserWarning,
            "x.py",
            1,
            module="lightning.pytorch.trainer",
        )
        warnings.warn_explicit("dkacq says", FutureWarning, "x.py", 1, module="dkacq.data.examples")
        warnings.warn_explicit("dkacq says", UserWarning, "x.py", 1, module="dkacq.encoders.loading")
        warnings.warn_explicit("a torch user warning", UserWarning, "x.py", 1, module="torch.nn.modules")
    assert [(str(warning.message), warning.category) for warning in caught] == [
        ("dkacq says", FutureWarning),
        ("dkacq says", UserWarning),
        ("a torch user warning", UserWarning),
    ]
