"""A result belongs to exactly the settings that produced it: rows, checkpoints, configs, attribution."""

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dkacq.attribution.module import AttributionConflictError
from dkacq.cli import main
from dkacq.encoders.cache import CacheMismatchError
from dkacq.formats.results import ResultConflictError
from dkacq.probe.heads import HEADS


def _fit_args(model_dir, probe_files, tmp_path, run="run", **options) -> list[str]:
    train, test = probe_files
    settings = {
        "data.encoder": "bert-mean",
        "data.model": str(model_dir),
        "data.dataset": "toy",
        "data.source": "local",
        "data.train_file": train,
        "data.test_file": test,
        "data.cache_dir": str(tmp_path / "cache"),
        "data.batch_size": 32,
        "data.val_fraction": 0.2,
        "data.num_passages": 3,
        "data.layers": "[2]",
        "trainer.max_epochs": 2,
        "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
        "model.learning_rate": 0.05,
        "heads": "[concat]",
        "results.run_dir": str(tmp_path / run),
    } | options
    return [f"--{key}={value}" for key, value in settings.items()]


def _rows(path: Path) -> list[dict]:
    """The rows of the fitted probes (the untrained baselines have rows of their own)."""
    with open(path, newline="") as file:
        return [row for row in csv.DictReader(file) if row["probe"] in HEADS]


@pytest.mark.parametrize(
    "changed",
    [
        {"data.max_examples": 30},
        {"trainer.max_epochs": 3},
        {"model.learning_rate": 0.01},
        {"data.batch_size": 16},
        {"data.val_fraction": 0.3},
        {"data.standardize": "true"},
        {"seed_everything": 7},
        {"data.seed": 5},
    ],
    ids=lambda changed: next(iter(changed)),
)
def test_fit_with_other_settings_into_the_same_run_is_refused_before_any_work(
    changed, tiny_bert_dir, probe_files, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    main(["fit", *_fit_args(tiny_bert_dir, probe_files, tmp_path)])
    results = tmp_path / "run" / "results.csv"
    before = results.read_bytes()
    caches = sorted(path.name for path in (tmp_path / "cache" / "toy").iterdir())
    ((key, value),) = changed.items()
    with pytest.raises(ResultConflictError) as error:
        main(["fit", *_fit_args(tiny_bert_dir, probe_files, tmp_path, **changed)])
    message = str(error.value)
    assert "\n" not in message and str(results) in message and "toy tiny-bert" in message
    assert key.split(".")[-1] in message, "the message names the option that differs"
    assert results.read_bytes() == before
    assert sorted(path.name for path in (tmp_path / "cache" / "toy").iterdir()) == caches, "no cache was built"


def test_each_random_init_seed_is_its_own_model(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1, 2):
        main(
            [
                "fit",
                *_fit_args(
                    tiny_bert_dir, probe_files, tmp_path, **{"data.random_init": "true", "data.init_seed": seed}
                ),
            ]
        )
    rows = _rows(tmp_path / "run" / "results.csv")
    name = Path(tiny_bert_dir).name
    assert sorted(row["model"] for row in rows) == [f"{name}-random", f"{name}-random-seed1", f"{name}-random-seed2"]
    assert sorted(row["init_seed"] for row in rows) == ["0", "1", "2"]


def test_rows_record_their_settings_and_a_rerun_replaces_only_its_own_row(
    tiny_bert_dir, probe_files, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = _fit_args(tiny_bert_dir, probe_files, tmp_path)
    main(["fit", *args])
    (row,) = _rows(tmp_path / "run" / "results.csv")
    assert (row["max_epochs"], row["learning_rate"], row["batch_size"], row["val_fraction"], row["seed"]) == (
        "2",
        "0.05",
        "32",
        "0.2",
        "42",
    )
    assert row["precision"] == "32-true" and row["weights"].startswith("sha256:")
    stored = json.loads(
        __import__("safetensors").safe_open(str(tmp_path / "run" / row["predictions"]), "pt").metadata()["identity"]
    )
    assert stored["trainer"]["max_epochs"] == 2 and stored["layer"] == 2 and stored["model"]["head"] == "concat"
    assert stored["embeddings"]["weights"]["query"]["model"] == row["weights"]
    config = yaml.safe_load((tmp_path / "run" / row["config"]).read_text())
    assert config["trainer"]["max_epochs"] == 2 and config["data"]["layers"] == [2]
    main(["fit", *args])
    (again,) = _rows(tmp_path / "run" / "results.csv")
    assert again["cell_id"] == row["cell_id"]
    assert len(list((tmp_path / "run" / "configs").iterdir())) == 1, "one config file per setting"


def test_checkpoints_are_unique_to_run_and_cell(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    """Two studies whose run folders share a last name keep their own probes; ``dkacq test`` tests its own."""
    monkeypatch.chdir(tmp_path)
    first = _fit_args(tiny_bert_dir, probe_files, tmp_path, run="a/probe")
    second = _fit_args(tiny_bert_dir, probe_files, tmp_path, run="b/probe", **{"model.learning_rate": 0.001})
    main(["fit", *first])
    main(["fit", *second])
    checkpoints = sorted((tmp_path / "checkpoints").rglob("best.ckpt"))
    assert len(checkpoints) == 2 and checkpoints[0].parent.parent != checkpoints[1].parent.parent
    (row_a,), (row_b,) = _rows(tmp_path / "a/probe/results.csv"), _rows(tmp_path / "b/probe/results.csv")
    for path in checkpoints:
        saved = torch.load(path, weights_only=False)
        assert saved["hyper_parameters"]["learning_rate"] in (0.05, 0.001)
    main(["test", *first])
    (retested,) = _rows(tmp_path / "a/probe/results.csv")
    assert retested["test_acc"] == row_a["test_acc"] and retested["cell_id"] == row_a["cell_id"]
    assert _rows(tmp_path / "b/probe/results.csv") == [row_b]


def test_checkpoint_dirpath_and_a_users_logger_are_honoured(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _fit_args(tiny_bert_dir, probe_files, tmp_path) + [
        f"--checkpoint.dirpath={tmp_path / 'mine'}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'csvlogs'}",
    ]
    main(["fit", *args])
    assert len(list((tmp_path / "mine").rglob("best.ckpt"))) == 1
    assert not (tmp_path / "checkpoints").exists()
    assert list((tmp_path / "csvlogs").rglob("metrics.csv"))
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_outputs_get_the_users_umask(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    previous = os.umask(0o022)
    try:
        main(["fit", *_fit_args(tiny_bert_dir, probe_files, tmp_path)])
    finally:
        os.umask(previous)
    (row,) = _rows(tmp_path / "run" / "results.csv")
    for path in (
        tmp_path / "run" / row["predictions"],
        tmp_path / "run" / "results.csv",
        next((tmp_path / "cache").rglob("index.safetensors")),
    ):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_weights_replaced_in_a_folder_refuse_the_stale_cache(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    main(["fit", *_fit_args(model, probe_files, tmp_path)])
    weights = load_file(model / "model.safetensors")
    weights = {key: value + 0.01 for key, value in weights.items()}
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises((CacheMismatchError, ResultConflictError), match="weights"):
        main(["fit", *_fit_args(model, probe_files, tmp_path, run="other")])


def test_a_cache_of_another_precision_is_refused(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *_fit_args(tiny_bert_dir, probe_files, tmp_path)])
    with pytest.raises(CacheMismatchError, match="extraction_precision='32-true' but .*'64-true'"):
        main(
            [
                "fit",
                *_fit_args(
                    tiny_bert_dir, probe_files, tmp_path, run="other", **{"data.extraction_precision": "64-true"}
                ),
            ]
        )


def _attribute_args(model_dir, probe_files, tmp_path, steps=3) -> list[str]:
    train, test = probe_files
    return [
        "--model",
        "bert-mean",
        f"--model.encoder.query.model={model_dir}",
        f"--model.encoder.passage.model={model_dir}",
        f"--model.steps={steps}",
        f"--model.output_dir={tmp_path / 'out'}",
        "--data.dataset=toy",
        "--data.source=local",
        f"--data.train_file={train}",
        f"--data.test_file={test}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.max_examples=3",
    ]


def test_attribution_into_a_folder_of_other_settings_is_refused_before_loading(
    tiny_bert_dir, probe_files, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    main(["attribute", *_attribute_args(tiny_bert_dir, probe_files, tmp_path)])
    folder = tmp_path / "out"
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["identity"]["steps"] == 3 and summary["identity"]["weights"]["model"].startswith("sha256:")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("dkacq.attribution.module.load_encoders", no_loading)
    with pytest.raises(AttributionConflictError, match="steps 3 -> 4") as error:
        main(["attribute", *_attribute_args(tiny_bert_dir, probe_files, tmp_path, steps=4)])
    assert "\n" not in str(error.value)
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == before


def test_an_eos_reference_cache_of_the_older_padding_is_refused(tiny_llama_dir, probe_files, tmp_path, monkeypatch):
    """eos_reference reads padding: a cache whose request does not say what it padded with (an older
    dkacq's, padded with the unknown token) is not served; other poolings' requests do not change."""
    monkeypatch.chdir(tmp_path)
    llama = {"data.encoder": "llama", "data.model": str(tiny_llama_dir), "data.pooling": "eos_reference"}
    main(["fit", *_fit_args(tiny_llama_dir, probe_files, tmp_path, **llama)])
    (manifest,) = _cache_manifests(tmp_path / "cache")
    content = json.loads(manifest.read_text())
    assert content["padding"] == "own-pad-else-eos"
    del content["padding"]
    manifest.write_text(json.dumps(content))
    with pytest.raises(CacheMismatchError, match="padding=None but padding='own-pad-else-eos'"):
        main(["fit", *_fit_args(tiny_llama_dir, probe_files, tmp_path, run="other", **llama)])

    main(["fit", *_fit_args(tiny_llama_dir, probe_files, tmp_path, run="eos", **{**llama, "data.pooling": "eos"})])
    poolings = {json.loads(path.read_text())["pooling"]: path for path in _cache_manifests(tmp_path / "cache")}
    assert "padding" not in json.loads(poolings["eos"].read_text())  # padding not read: request as before


def _cache_manifests(folder: Path) -> list[Path]:
    """The embedding caches' manifests (the probe set has one of its own)."""
    return [path for path in folder.rglob("manifest.json") if "cache_format" in json.loads(path.read_text())]
