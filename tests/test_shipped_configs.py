"""Every shipped config is run, not only parsed: on the tiny models and data of conftest.py, one epoch.

The configs keep their structure (presets, poolings, heads, N, attribution runs); only the weights, the
data and the sizes are swapped for tiny ones, as torchgeo runs its configs with ``fast_dev_run``.
"""

import csv
import json
import shutil
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
WHOLE_STUDIES = ["msmarco.yaml", "nq.yaml"]
"""The study on its two data sets: the same settings and attribution runs, each run half in the tests."""


def _tiny_model(preset: str, tiny_bert_dir, tiny_llama_dir, folder: Path) -> str:
    """A tiny model of the preset's architecture, in a folder named after the preset (the folder's name is
    the model's label in results, so the settings of a study stay apart as their real models would)."""
    name = preset.removesuffix("-random")
    link = folder / name
    if not link.exists():
        folder.mkdir(parents=True, exist_ok=True)
        link.symlink_to(tiny_llama_dir if PRESETS[name].pooling.startswith("eos") else tiny_bert_dir)
    return str(link)


def _tiny_auto_model(model: str, tiny_bert_dir, folder: Path) -> str:
    """A tiny BERT with sentence-transformers files in a folder named like the hub model's last part: mean
    pooling, Normalize and "query: " / "passage: " prompts for an E5-like id, CLS and a query instruction
    for any other (BGE-like); ``bert-base-uncased``, a backbone, is the tiny BERT alone."""
    target = folder / model.rsplit("/", 1)[-1]
    if target.exists():
        return str(target)
    shutil.copytree(tiny_bert_dir, target)
    if model == "bert-base-uncased":
        return str(target)
    e5 = "e5" in model
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    prompts = {"query": "query: ", "document": "passage: "} if e5 else {"query": "what is the ", "document": ""}
    (target / "modules.json").write_text(json.dumps(modules))
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean" if e5 else "cls"}))
    (target / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    return str(target)


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


def test_whole_studies_list_the_same_settings_and_runs():
    studies = [yaml.safe_load((CONFIGS / "study" / name).read_text()) for name in WHOLE_STUDIES]
    assert all(study["probes"] == studies[0]["probes"] for study in studies)
    assert all(study["attributions"] == studies[0]["attributions"] for study in studies)


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
    if config.name in WHOLE_STUDIES:
        # NQ and MS MARCO list the same settings and runs: between them, each setting and each model's
        # attribution runs in one of the two, with one head (heads do not depend on the setting, and the
        # smaller studies run each of them); every cell of both is instantiated in tests/test_cli.py
        part, parts = WHOLE_STUDIES.index(config.name), len(WHOLE_STUDIES)
        probes["settings"], probes["heads"] = probes["settings"][part::parts], probes["heads"][-1:]
        firsts = {run["model"]: run for run in reversed(study.get("attributions", []))}
        study["attributions"] = [run for run in study["attributions"] if firsts[run["model"]] is run][part::parts]
    probes["config"] = str(Path(__file__).parents[1] / probes["config"])
    probes["num_passages"] = probes["num_passages"][:1]
    probes["options"] = {"trainer": {"max_epochs": 1, "enable_progress_bar": False}}
    models = tmp_path / "models"
    if any(setting["encoder"] == "auto" for setting in probes["settings"]):
        # the first retriever's pair and control, one head, one attribution run and its backbone's: quick
        first = probes["settings"][0]["model"]
        probes["settings"] = [setting for setting in probes["settings"] if setting["model"] == first]
        probes["heads"] = probes["heads"][-1:]
        study["attributions"] = study["attributions"][:1]
    for setting in probes["settings"]:
        if setting["encoder"] == "auto":
            setting["model"] = _tiny_auto_model(setting["model"], tiny_bert_dir, models)
            if "backbone" in setting:
                setting["backbone"] = _tiny_auto_model(setting["backbone"], tiny_bert_dir, models)
        else:
            setting["model"] = _tiny_model(setting["encoder"], tiny_bert_dir, tiny_llama_dir, models)
        setting["layers"] = [2]
        setting.pop("max_examples", None)
    for run in study.get("attributions", []):
        if run["model"] == "auto":
            auto = run["options"]["model"]["auto"]
            auto["model"] = _tiny_auto_model(auto["model"], tiny_bert_dir, models)
            if "backbone" in run:
                run["backbone"] = _tiny_auto_model(run["backbone"], tiny_bert_dir, models)
            run["options"]["model"].update({"steps": 1, "thresholds": [0.1]})  # one heatmap a run
            run["options"]["data"].update({"max_examples": 2, "batch_size": 2})
            run["options"]["trainer"] = {"enable_progress_bar": False}
            continue
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
    for run in study.get("comparisons", []):  # the probes' settings, so their caches are the ones compared
        for key in ("a", "b"):
            name = run[key]
            tiny = _tiny_model(name, tiny_bert_dir, tiny_llama_dir, tmp_path / "models")
            run[key] = {"encoder": name.removesuffix("-random"), "model": tiny}
            if name.endswith("-random"):
                run[key]["random_init"] = True
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(study))
    main(["sweep", "--config", str(path)])

    with open(tmp_path / "study" / "probe" / "results.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["probe"] in HEADS]  # baselines have rows too
    paired = [setting for setting in probes["settings"] if setting.get("backbone")]  # each probes its backbone too
    expected = (len(probes["settings"]) + len(paired)) * len(probes["heads"])
    assert len(rows) == expected and {row["layer"] for row in rows} == {"2"}
    folders = [run["name"] for run in study.get("attributions", [])]
    folders += [f"{run['name']}-backbone" for run in study.get("attributions", []) if run.get("backbone")]
    for name in folders:
        assert (tmp_path / "study" / "attribution" / name / "counts.safetensors").exists(), name
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    for setting in paired:  # each pair drawn and tested, and named for what it compares
        label = Path(setting["model"]).name
        assert f"### {label} against its backbone" in report
        assert f"layers ≠ bert-base-uncased@{label} (fine-tuned vs its backbone)" in report
        assert f"layers ≠ {label}-random (trained vs its random-init control)" in report
    for run in study.get("attributions", []):
        if run.get("backbone"):
            label = Path(run["options"]["model"]["auto"]["model"]).name
            assert f"### {label} against bert-base-uncased@{label} (fine-tuned vs its backbone)" in report
    if study["data"]["source"] == "beir":
        with open(tmp_path / "study" / "probe" / "retrieval.csv") as file:
            retrieval = list(csv.DictReader(file))
        assert len(retrieval) == 2 * len(probes["settings"])  # cosine and dot at layer 2
        assert {row["scope"] for row in retrieval} == {"corpus"}
    for run in study.get("comparisons", []):
        assert (tmp_path / "study" / "compare" / run["name"] / "similarity.csv").exists(), run["name"]
    if study.get("comparisons"):
        assert "## What changed where" in report and "## Shared neurons" in report
        caches = {path.parent.name for path in (tmp_path / "cache").rglob("layer_00.safetensors")}
        assert len(caches) == len(probes["settings"]) + len(paired)  # compare opened the probes' caches, built none
