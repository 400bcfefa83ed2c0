"""Every shipped config is run, not only parsed: on the tiny models and data of conftest.py, one epoch.

The configs keep their structure (presets, poolings, heads, N, attribution runs); only the weights, the
data and the sizes are swapped for tiny ones, as torchgeo runs its configs with ``fast_dev_run``.
"""

import csv
from pathlib import Path

import pytest
import yaml
from conftest import make_collection, write_beir

from dkacq.cli import main
from dkacq.encoders.presets import PRESETS
from dkacq.probe.heads import HEADS

CONFIGS = Path(__file__).parents[1] / "configs"
STUDIES = sorted(path for path in (CONFIGS / "study").glob("*.yaml") if path.name != "probe-study.yaml")
FIT_CONFIGS = [CONFIGS / "probe.yaml", CONFIGS / "study" / "probe-study.yaml"]


def _tiny_model(preset: str, tiny_bert_dir, tiny_llama_dir, folder: Path) -> str:
    """A tiny model of the preset's architecture, in a folder named after the preset (the folder's name is
    the model's label in results, so the settings of a study stay apart as their real models would)."""
    name = preset.removesuffix("-random")
    link = folder / name
    if not link.exists():
        folder.mkdir(parents=True, exist_ok=True)
        link.symlink_to(tiny_llama_dir if PRESETS[name].pooling.startswith("eos") else tiny_bert_dir)
    return str(link)


def _tiny_data(probe_files, tmp_path) -> dict:
    train, test = probe_files
    return {
        "dataset": "toy",
        "source": "local",
        "train_file": train,
        "test_file": test,
        "cache_dir": str(tmp_path / "cache"),
    }


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda path: path.name)
def test_fit_config_runs(config, tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _tiny_data(probe_files, tmp_path)
    main(
        [
            "fit",
            "--config",
            str(config),
            f"--data.model={tiny_bert_dir}",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--data.batch_size=64",
            f"--results.run_dir={tmp_path / 'run'}",
            *(f"--data.{key}={value}" for key, value in data.items()),
        ]
    )
    heads = yaml.safe_load(config.read_text()).get("heads") or ["concat"]
    with open(tmp_path / "run" / "results.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["probe"] in HEADS]  # baselines have rows too
    assert sorted((row["probe"], row["layer"]) for row in rows) == sorted(
        (h, str(layer)) for h in heads for layer in range(3)
    )


def test_attribute_config_runs(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _tiny_data(probe_files, tmp_path)
    main(
        [
            "attribute",
            "--config",
            str(CONFIGS / "attribute.yaml"),
            f"--model.encoder.query.model={tiny_bert_dir}",
            f"--model.encoder.passage.model={tiny_bert_dir}",
            "--data.max_examples=2",
            "--model.steps=2",
            f"--model.output_dir={tmp_path / 'out'}",
            *(f"--data.{key}={value}" for key, value in data.items()),
        ]
    )
    assert (tmp_path / "out" / "counts.safetensors").exists()


@pytest.mark.parametrize("config", STUDIES, ids=lambda path: path.name)
def test_study_config_runs(config, tiny_bert_dir, tiny_llama_dir, probe_files, tmp_path, monkeypatch):
    study = yaml.safe_load(config.read_text())
    monkeypatch.chdir(tmp_path)
    study["run_dir"] = str(tmp_path / "study")
    probes = study["probes"]
    if study["data"].get("source") == "beir":
        # a collection: a tiny BEIR folder of its layout, mined as configured; one setting per tiny
        # architecture (BERT, Llama) and one head (the other studies run every head): mining, splitting
        # and the retrieval rows are what this study adds, and they do not depend on the model or head
        study["data"] |= {"path": str(write_beir(tmp_path / "beir", make_collection())), "cache_dir": "cache"}
        eos = [s for s in probes["settings"] if PRESETS[s["encoder"]].pooling.startswith("eos")]
        probes["settings"], probes["heads"] = probes["settings"][:1] + eos[:1], probes["heads"][:1]
    else:
        study["data"] = _tiny_data(probe_files, tmp_path)
    probes["config"] = str(Path(__file__).parents[1] / probes["config"])
    probes["num_passages"] = probes["num_passages"][:1]
    probes["options"] = {"trainer": {"max_epochs": 1, "enable_progress_bar": False}}
    for setting in probes["settings"]:
        setting["model"] = _tiny_model(setting["encoder"], tiny_bert_dir, tiny_llama_dir, tmp_path / "models")
        setting["layers"] = [2]
        setting.pop("max_examples", None)
    for run in study.get("attributions", []):
        tiny = {
            "model": _tiny_model(run["model"], tiny_bert_dir, tiny_llama_dir, tmp_path / "models"),
            "revision": None,
            "gguf_file": None,
            "lora_adapter": None,
        }
        options = run.setdefault("options", {})
        options.setdefault("model", {}).update({"encoder": {"query": tiny, "passage": tiny}, "steps": 2})
        options.setdefault("data", {}).update({"max_examples": 2, "batch_size": 2})
        options["trainer"] = {"enable_progress_bar": False}
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(study))
    main(["sweep", "--config", str(path)])

    with open(tmp_path / "study" / "probe" / "results.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["probe"] in HEADS]  # baselines have rows too
    expected = len(probes["settings"]) * len(probes["heads"])
    assert len(rows) == expected and {row["layer"] for row in rows} == {"2"}
    for run in study.get("attributions", []):
        assert (tmp_path / "study" / "attribution" / run["name"] / "counts.safetensors").exists(), run["name"]
    assert (tmp_path / "study" / "report" / "report.md").exists()
    if study["data"]["source"] == "beir":
        with open(tmp_path / "study" / "probe" / "retrieval.csv") as file:
            retrieval = list(csv.DictReader(file))
        assert len(retrieval) == 2 * len(probes["settings"])  # cosine and dot at layer 2
        assert {row["scope"] for row in retrieval} == {"corpus"}
