"""The ``dkacq`` command end to end on tiny models, and every shipped config parsed."""

import csv
from argparse import ArgumentError
from pathlib import Path

import pytest
import torch
import yaml
from forked import run

from dkacq.cli import main
from dkacq.probe.heads import HEADS

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def _command_of(config: Path) -> str:
    if config.parent.name == "study" and config.name != "probe-study.yaml":
        return "sweep"
    return "attribute" if config.name.startswith("attribute") else "fit"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as done:
        main([_command_of(config), "--config", str(config), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(yaml.safe_load(config.read_text())) <= set(printed)


STUDIES = sorted(path for path in CONFIGS if _command_of(path) == "sweep")


@pytest.mark.parametrize("config", STUDIES, ids=lambda path: path.name)
def test_every_cell_of_every_study_is_instantiated_when_read(config, tmp_path, monkeypatch):
    """A study config is validated in full when it is read: every setting x N and every attribution run
    is parsed and instantiated by the commands' own classes (models are not loaded). A model read from
    its own files (``encoder: auto``) reads them here: offline, a hub model's are stood in for by a
    mean-pooling model's sentence-transformers files."""
    import json

    from jsonargparse import ArgumentParser

    from dkacq.commands.sweep import study_clis, sweep

    modules = [{"path": "", "type": "Transformer"}, {"path": "1_Pooling", "type": "Pooling"}]
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512}))
    monkeypatch.setattr("dkacq.encoders.model_files._files_folder", lambda model, revision: tmp_path)
    parser = ArgumentParser()
    parser.add_function_arguments(sweep)
    options = parser.instantiate_classes(parser.parse_path(str(config)))
    probe_clis, attribution_clis = study_clis(options.run_dir, options.data, options.probes, options.attributions)
    study = yaml.safe_load(config.read_text())
    settings = study["probes"]["settings"] + [
        setting for setting in study["probes"]["settings"] if "backbone" in setting
    ]
    assert len(probe_clis) == len(settings) * len(study["probes"]["num_passages"])
    runs = study.get("attributions") or []
    assert len(attribution_clis) == len(runs) + len([run for run in runs if "backbone" in run])
    settings = [(cli.datamodule.preset.name, cli.datamodule.hparams.num_passages) for cli in probe_clis]
    assert len(set(settings)) == len(settings)
    for cli in attribution_clis:
        assert cli.model.preset.name and cli.datamodule.hparams.dataset == study["data"]["dataset"]


def test_a_typo_in_a_study_is_refused_when_read(tmp_path):
    from jsonargparse import ArgumentParser

    from dkacq.commands.sweep import study_clis, sweep

    study = yaml.safe_load((Path(__file__).parents[1] / "configs/study/demo.yaml").read_text())
    study["probes"]["settings"][0]["max_exampels"] = 10
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    parser = ArgumentParser()
    parser.add_function_arguments(sweep)
    options = parser.instantiate_classes(parser.parse_path(str(path)))
    with pytest.raises(ArgumentError, match="max_exampels"):
        study_clis(options.run_dir, options.data, options.probes, options.attributions)


def _tiny_fit_args(tiny_bert_dir, probe_files, tmp_path) -> list[str]:
    train, test = probe_files
    return [
        "--data.encoder=bert-mean",
        f"--data.model={tiny_bert_dir}",
        "--data.dataset=toy",
        "--data.source=local",
        f"--data.train_file={train}",
        f"--data.test_file={test}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.batch_size=32",
        "--data.val_fraction=0.2",
        "--data.num_passages=3",
        "--trainer.max_epochs=3",
        "--trainer.enable_progress_bar=false",
        "--heads=[concat, query_aware]",
        f"--results.run_dir={tmp_path / 'run'}",
    ]


def test_fit_then_test_every_layer_and_head(tiny_bert_dir, probe_files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = _tiny_fit_args(tiny_bert_dir, probe_files, tmp_path)
    main(["fit", *args])
    results = tmp_path / "run" / "results.csv"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(results)
    with open(results) as file:
        rows = [row for row in csv.DictReader(file) if row["probe"] in HEADS]  # the baselines have rows too
    assert sorted((row["probe"], int(row["layer"])) for row in rows) == [
        (head, layer) for head in ("concat", "query_aware") for layer in range(3)
    ]
    assert {row["model"] for row in rows} == {Path(tiny_bert_dir).name}
    for row in rows:
        name = f"toy-{row['model']}-mean-N3-{row['probe']}-layer{int(row['layer']):02d}-{row['cell_id']}"
        (checkpoint,) = (tmp_path / "checkpoints").glob(f"run-*/{name}/best.ckpt")
        saved = torch.load(checkpoint, weights_only=False)
        assert saved["hyper_parameters"]["head"] == row["probe"]
        assert saved["epoch"] == int(row["best_epoch"])
        assert (tmp_path / "run" / row["predictions"]).exists()
    assert (tmp_path / "run" / "tensorboard").is_dir()
    assert len(list((tmp_path / "run" / "configs").glob("*.yaml"))) == 1 and not (tmp_path / "config.yaml").exists()

    main(["test", *args])
    with open(results) as file:
        retested = [row for row in csv.DictReader(file) if row["probe"] in HEADS]
    assert [(r["probe"], r["layer"], r["test_acc"]) for r in retested] == [
        (r["probe"], r["layer"], r["test_acc"]) for r in rows
    ]
    from lightning.pytorch import Trainer

    validated, validate = [], Trainer.validate

    def recording_validate(self, *positional, **keywords):
        validated.append(validate(self, *positional, **keywords))
        return validated[-1]

    monkeypatch.setattr(Trainer, "validate", recording_validate)
    main(["validate", *args, "--data.layers=[1]"])
    recorded = {row["probe"]: float(row["val_acc"]) for row in rows if row["layer"] == "1"}
    assert [metrics["val/acc"] for (metrics,) in validated] == pytest.approx(
        [recorded["concat"], recorded["query_aware"]], abs=5e-6
    )

    capsys.readouterr()
    main(["report", "--results", str(results), f"--out_dir={tmp_path / 'report'}", "--format=svg"])
    report = tmp_path / "report" / "report.md"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(report)
    assert "(probe_toy_mean.svg)" in report.read_text() and (tmp_path / "report" / "probe_toy_mean.svg").exists()


def test_test_without_a_fitted_probe_says_so(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no trained probe .* run dkacq fit"):
        main(["test", *_tiny_fit_args(tiny_bert_dir, probe_files, tmp_path)])


def test_usage_without_a_command(capsys):
    with pytest.raises(SystemExit) as done:
        main([])
    assert done.value.code == 2 and "dkacq {fit" in capsys.readouterr().out


def test_print_config_shows_every_option_with_its_help(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS[0].parent / "probe.yaml"), "--print_config=comments"])
    printed = capsys.readouterr().out
    assert "scale every dimension of the query and passage vectors" in printed
    assert "Probe heads to run, each on every layer" in printed
    assert "leave out cells that ``results.csv`` holds from the same settings" in printed


def test_an_unknown_encoder_is_refused_when_parsed_in_one_line_without_the_usage():
    err = run(["fit", "--data.encoder", "minlm", "--print_config"]).error()
    assert "usage" not in err
    assert 'Parser key "data.encoder"' in err and "Got value: minlm" in err and "'repllama'" in err
