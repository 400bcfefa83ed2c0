"""``dkacq sweep`` resumes: a stopped sweep run again runs each remaining cell once and none twice."""

import csv
from collections import Counter

import pytest
import yaml
from lightning.pytorch import Trainer

from dkacq.cli import main
from dkacq.encoders import extraction
from dkacq.probe.heads import HEADS


def _study(tmp_path, tiny_bert_dir, probe_files) -> str:
    train, test = probe_files
    base = tmp_path / "probe-base.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "max_epochs": 2,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "logger": False,
                },
                "model": {"learning_rate": 0.01},
                "data": {"batch_size": 32, "val_fraction": 0.2},
            }
        )
    )
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "study"),
                "data": {
                    "dataset": "toy",
                    "source": "local",
                    "train_file": train,
                    "test_file": test,
                    "cache_dir": str(tmp_path / "cache"),
                },
                "probes": {
                    "config": str(base),
                    "settings": [
                        {"encoder": "bert-mean", "model": str(tiny_bert_dir)},
                        {"encoder": "bert-mean", "model": str(tiny_bert_dir), "random_init": True},
                    ],
                    "num_passages": [2, 3],
                    "heads": ["concat"],
                },
                "base_models": {"mean": "tiny-bert0-random"},
            }
        )
    )
    return str(study)


def test_stopped_sweep_resumes_each_cell_once(tmp_path, tiny_bert_dir, probe_files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = _study(tmp_path, tiny_bert_dir, probe_files)
    fits, builds = Counter(), Counter()
    original_fit, original_build = Trainer.fit, extraction.build_cache

    def counting_fit(trainer, model, datamodule=None, **kwargs):
        cell = (datamodule.preset.label, datamodule.hparams.num_passages, datamodule.layer)
        fits[cell] += 1
        if sum(fits.values()) == 5 and not hasattr(counting_fit, "stopped"):
            counting_fit.stopped = cell
            raise KeyboardInterrupt
        return original_fit(trainer, model, datamodule=datamodule, **kwargs)

    def counting_build(folder, *args, **kwargs):
        builds[folder.name] += 1
        return original_build(folder, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", counting_fit)
    monkeypatch.setattr(extraction, "build_cache", counting_build)
    with pytest.raises(KeyboardInterrupt):
        main(["sweep", "--config", study])
    assert sum(fits.values()) == 5
    main(["sweep", "--config", study])

    expected = {
        (label, n, layer) for label in ("tiny-bert0", "tiny-bert0-random") for n in (2, 3) for layer in range(3)
    }
    assert set(fits) == expected
    assert all(count == 1 for cell, count in fits.items() if cell != counting_fit.stopped)
    assert fits[counting_fit.stopped] == 2, "the interrupted cell starts again"
    assert sorted(builds.values()) == [1, 1], "one embedding cache per setting, for all its cells"
    with open(tmp_path / "study" / "probe" / "results.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["probe"] in HEADS]
    assert len(rows) == len(expected)
    assert (tmp_path / "study" / "report" / "report.md").exists()


def test_a_sweep_rerun_with_other_settings_is_refused_before_any_work(
    tmp_path, tiny_bert_dir, probe_files, monkeypatch
):
    """Raising max_examples and epochs used to skip every cell and report the old numbers."""
    from dkacq.attribution.module import AttributionConflictError
    from dkacq.formats.results import ResultConflictError

    monkeypatch.chdir(tmp_path)
    study_path = tmp_path / "study.yaml"
    study = yaml.safe_load(open(_study(tmp_path, tiny_bert_dir, probe_files)))
    study["probes"]["settings"] = [
        {"encoder": "bert-mean", "model": str(tiny_bert_dir), "max_examples": 60, "layers": [2]}
    ]
    study["probes"]["num_passages"] = [2]
    study["attributions"] = [
        {
            "model": "bert-mean",
            "name": "tiny",
            "options": {
                "model": {
                    "encoder": {"query": {"model": str(tiny_bert_dir)}, "passage": {"model": str(tiny_bert_dir)}},
                    "steps": 2,
                },
                "data": {"max_examples": 2},
            },
        }
    ]
    study_path.write_text(yaml.safe_dump(study))
    main(["sweep", "--config", str(study_path)])
    results = tmp_path / "study" / "probe" / "results.csv"
    before = results.read_bytes()
    counts = (tmp_path / "study" / "attribution" / "tiny" / "counts.safetensors").read_bytes()
    caches = sorted(path.name for path in (tmp_path / "cache" / "toy").iterdir())

    def no_fit(*args, **kwargs):
        raise AssertionError("a probe was fitted")

    monkeypatch.setattr(Trainer, "fit", no_fit)
    main(["sweep", "--config", str(study_path)])  # the same settings: every cell is done
    study["probes"]["settings"][0]["max_examples"] = 80
    study_path.write_text(yaml.safe_dump(study))
    with pytest.raises(ResultConflictError, match="max_examples 60 -> 80") as error:
        main(["sweep", "--config", str(study_path)])
    assert "\n" not in str(error.value)
    study["probes"]["settings"][0]["max_examples"] = 60
    study["attributions"][0]["options"]["model"]["steps"] = 3
    study_path.write_text(yaml.safe_dump(study))
    with pytest.raises(AttributionConflictError, match="steps 2 -> 3"):
        main(["sweep", "--config", str(study_path)])
    assert results.read_bytes() == before
    assert (tmp_path / "study" / "attribution" / "tiny" / "counts.safetensors").read_bytes() == counts
    assert sorted(path.name for path in (tmp_path / "cache" / "toy").iterdir()) == caches


def test_two_settings_of_one_cell_are_refused_before_any_work(tmp_path, tiny_bert_dir, probe_files, monkeypatch):
    """Two settings that differ only in an option the table's row does not name would share its rows:
    the second used to be refused only after the first had been cached and fitted."""
    from dkacq.formats.results import ResultConflictError

    monkeypatch.chdir(tmp_path)
    study_path = tmp_path / "study.yaml"
    study = yaml.safe_load(open(_study(tmp_path, tiny_bert_dir, probe_files)))
    study["probes"]["settings"] = [
        {"encoder": "bert-mean", "model": str(tiny_bert_dir), "max_examples": 60, "layers": [2]},
        {"encoder": "bert-mean", "model": str(tiny_bert_dir), "max_examples": 80, "layers": [1, 2]},
    ]
    study["probes"]["num_passages"] = [2]
    study_path.write_text(yaml.safe_dump(study))
    with pytest.raises(ResultConflictError, match=r"two settings .* layer 2 concat \(data.max_examples 60 -> 80, "):
        main(["sweep", "--config", str(study_path)])
    built = {path.name for path in (tmp_path / "cache" / "toy").iterdir()}
    assert built <= {"probe_set", "probe_set.lock"}, built  # the probe set (read to plan), no embeddings
    assert not (tmp_path / "study").exists()

    study["probes"]["settings"][1] |= {"layers": [1], "max_examples": 60}  # distinct cells: both run
    study_path.write_text(yaml.safe_dump(study))
    main(["sweep", "--config", str(study_path)])
    with open(tmp_path / "study" / "probe" / "results.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["probe"] == "concat"]
    assert sorted(row["layer"] for row in rows) == ["1", "2"]
