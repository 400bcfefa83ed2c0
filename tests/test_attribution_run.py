"""``dkacq attribute`` end to end: presets resolved offline, outputs, and 2 processes = 1 process."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from safetensors.torch import load_file

from dkacq.attribution.module import AttributionModule
from dkacq.cli import console, main
from dkacq.commands import attribute
from dkacq.data.examples import ProbeDataError
from dkacq.datamodules.texts import TextDataModule
from dkacq.formats.counts import AttributionRun, text_key


def test_repllama_resolves_offline(capsys):
    with pytest.raises(SystemExit) as done:
        main(["attribute", "--model", "repllama", "--print_config"])
    assert done.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    encoder = config["model"]["encoder"]
    assert encoder["query"]["model"] == "meta-llama/Llama-2-7b-hf"
    assert encoder["query"]["lora_adapter"] == "castorini/repllama-v1-7b-lora-passage"
    assert encoder["pooling"] == "eos"
    assert config["model"]["kinds"] == ["gate_proj", "down_proj"]
    assert config["model"]["thresholds"] == [0.01]
    assert config["model"]["encoder"]["attribution_precision"] == "bf16-true"
    assert config["trainer"]["precision"] is None  # not given: the encoder's, when the trainer is built
    assert config["trainer"]["inference_mode"] is False


def _cli(args: list[str]) -> attribute.AttributionCLI:
    return attribute.build(args)


def test_a_preset_name_in_a_config_file_is_the_preset(tmp_path):
    """``model: NAME`` in a config file never passes through the command line: the parser resolves it."""
    config = tmp_path / "attribute.yaml"
    config.write_text("model: repllama\ndata: {max_examples: 5}\n")
    cli = _cli(["--config", str(config), "--model.steps", "7"])
    assert cli.model.preset.name == "repllama"
    assert cli.model.preset.query.lora_adapter == "castorini/repllama-v1-7b-lora-passage"
    assert cli.model.kinds == ["gate_proj", "down_proj"]
    assert cli.model.hparams.steps == 7
    assert cli.trainer.precision == "bf16-true"  # the study ran the 7B models in bf16
    assert cli.datamodule.hparams.max_examples == 5


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "llama", "--trainer.precision", "32-true"],
        ["--trainer.precision", "32-true", "--model", "llama"],
        ["--model=llama-random-seed3", "--trainer.precision=32-true"],
    ],
)
def test_a_given_precision_wins_over_the_presets_in_any_order(args):
    cli = _cli(args)
    assert cli.trainer.precision == "32-true"
    assert cli.model.preset.pooling == "eos"


def test_a_control_name_gives_its_seed():
    cli = _cli(["--model", "minilm-random-seed2"])
    assert (cli.model.preset.random_init, cli.model.preset.seed) == (True, 2)
    assert cli.model.preset.label == "minilm-random-seed2"
    assert cli.trainer.precision == "32-true"


@pytest.mark.parametrize("name", ["repllma", "minilm-randm", "nopreset-random"])
def test_an_unknown_preset_is_refused_by_name(name, capsys):
    with pytest.raises(SystemExit) as done:
        console(["attribute", "--model", name, "--print_config"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "unknown preset '" in err[0] and "repllama" in err[0], err


def test_a_config_file_or_mapping_is_still_a_config(tmp_path):
    config = tmp_path / "model.yaml"
    config.write_text("encoder: {name: mine, label: mine, query: {model: /m}, passage: {model: /m}, pooling: cls}\n")
    assert _cli(["--model", str(config)]).model.preset.name == "mine"
    mapping = '{"encoder": {"name": "x", "label": "x", "query": {"model": "/m"}, "passage": {"model": "/m"}, "pooling": "mean"}}'
    assert _cli(["--model", mapping]).model.preset.pooling == "mean"


@pytest.mark.parametrize(
    "preset",
    [
        "bert-cls",
        "dpr-query",
        "dpr-passage",
        "dpr-paired",
        "bert-mean",
        "contriever",
        "llama",
        "minilm",
        "smollm",
        "smollm-gguf",
        "minilm-random",
    ],
)
def test_every_preset_prints_its_config(preset, capsys):
    with pytest.raises(SystemExit):
        main(["attribute", f"--model={preset}", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["encoder"]["random_init"] is preset.endswith("-random")


def _module(preset, tmp_path, name="run", **kwargs) -> AttributionModule:
    return AttributionModule(preset, steps=3, thresholds=[0.1, 0.2], output_dir=str(tmp_path / name), **kwargs)


def _data(tmp_path, probe_files, **kwargs) -> TextDataModule:
    train, test = probe_files
    return TextDataModule(
        dataset="toy",
        source="local",
        train_file=train,
        test_file=test,
        cache_dir=str(tmp_path / "cache"),
        **{"max_examples": 9, "batch_size": 2, **kwargs},
    )


def test_attribute_writes_counts_and_provenance(tmp_path, probe_files, tiny_bert_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train, test = probe_files
    main(
        [
            "attribute",
            "--model",
            "bert-mean",
            f"--model.encoder.query.model={tiny_bert_dir}",
            f"--model.encoder.passage.model={tiny_bert_dir}",
            "--model.steps=3",
            f"--model.output_dir={tmp_path / 'out'}",
            "--data.dataset=toy",
            "--data.source=local",
            f"--data.train_file={train}",
            f"--data.test_file={test}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.max_examples=5",
            "--data.text_side=passage",
        ]
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "out")
    counts = load_file(tmp_path / "out" / "counts.safetensors")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert int(counts["num_texts"]) == summary["num_texts"] == 5
    assert counts["intermediate@0.1"].shape == (2, 64) and counts["output@0.2"].shape == (2, 32)
    assert (counts["intermediate@0.2"] <= counts["intermediate@0.1"]).all()
    assert counts["output@0.1"].max() <= 5
    assert summary["text_side"] == "passage" and summary["split"] == "test"
    assert (summary["alpha_rule"], summary["steps"], summary["thresholds"]) == ("reference", 3, [0.1, 0.2])
    assert summary["kinds"]["intermediate"] == {"side": "intermediate", "num_layers": 2, "num_neurons": 64}
    assert {"torch", "transformers", "dkacq"} <= set(summary["versions"])
    assert (tmp_path / "out" / "heatmap@0.1.png").exists()
    # per text and module, how many neurons were active, rows in the order of the text set
    data = TextDataModule(
        dataset="toy",
        source="local",
        train_file=train,
        test_file=test,
        cache_dir=str(tmp_path / "cache"),
        max_examples=5,
        text_side="passage",
    )
    data.setup()
    run = AttributionRun.load(tmp_path / "out")
    assert run.text_keys == tuple(text_key(text) for text in data.texts)
    for key in ("intermediate@0.1", "intermediate@0.2", "output@0.1", "output@0.2"):
        table = counts[f"per_text/{key}"]
        assert table.shape == (5, 2) and table.dtype == torch.int32
        assert torch.equal(table.sum(dim=0).long(), counts[key].sum(dim=1)), key
        kind, threshold = key.split("@")
        active = run.active_sets(kind, float(threshold))  # which neurons, bit-packed by the run
        assert active.shape == (5, 2, counts[key].shape[1])
        assert (active.sum(-1) == table.numpy()).all() and (active.sum(0) == counts[key].numpy()).all(), key
    assert summary["published_readings"] == {} and summary["max_length"] == 256
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["model"]["steps"] == 3
    assert saved["trainer"]["precision"] == "32-true"  # not given: the preset's, recorded as used
    assert not (tmp_path / "config.yaml").exists()


def _counts_of(tmp_path, name, preset, probe_files, devices):
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",  # ranks forked from this process: no new interpreters
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
    )
    trainer.predict(_module(preset, tmp_path, name), datamodule=_data(tmp_path, probe_files), return_predictions=False)
    return load_file(tmp_path / name / "counts.safetensors")


@pytest.mark.slow
def test_two_processes_count_what_one_does(tmp_path, probe_files, tiny_llama_preset, fork_context):
    one = _counts_of(tmp_path, "one", tiny_llama_preset, probe_files, devices=1)
    two = _counts_of(tmp_path, "two", tiny_llama_preset, probe_files, devices=2)
    assert int(one["num_texts"]) == int(two["num_texts"]) == 9
    assert any(key.startswith("per_text/") for key in one)
    assert AttributionRun.load(tmp_path / "one").text_keys == AttributionRun.load(tmp_path / "two").text_keys
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_bad_attribution_input_is_one_line(tmp_path, probe_files, tiny_bert_preset):
    for kwargs, message in (
        (dict(kinds=["attention"]), "unknown target kind 'attention'"),
        (dict(thresholds=[1.5]), "must lie in \\(0, 1\\)"),
        (dict(steps=0), "steps must be at least 1"),
    ):
        with pytest.raises(ValueError, match=message) as error:
            module = AttributionModule(tiny_bert_preset, output_dir=str(tmp_path / "x"), **kwargs)
            Trainer(logger=False, inference_mode=False).predict(module, datamodule=_data(tmp_path, probe_files))
        assert "\n" not in str(error.value)
    train, _ = probe_files
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ProbeDataError, match="holds no records") as error:
        data = TextDataModule(
            dataset="void", source="local", train_file=train, test_file=str(empty), cache_dir=str(tmp_path / "cache")
        )
        data.prepare_data()
        data.setup()
    assert str(error.value) == f"{empty}: holds no records"
    assert not (tmp_path / "x").exists()


def test_the_shipped_config_with_a_7b_preset_runs_it_in_bf16():
    """configs/attribute.yaml invites ``--model NAME``: it must not pin minilm's precision on a 7B model."""
    shipped = str(Path(__file__).parents[1] / "configs" / "attribute.yaml")
    assert _cli(["--config", shipped]).trainer.precision == "32-true"
    cli = _cli(["--config", shipped, "--model", "llama"])
    assert (cli.model.preset.name, cli.trainer.precision) == ("llama", "bf16-true")
