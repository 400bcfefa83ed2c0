"""Bad options are refused in one line before any model is loaded or any cache built."""

import pytest
from forked import run

from dkacq.cli import main


def _args(model_dir, probe_files, tmp_path, **options) -> list[str]:
    train, test = probe_files
    settings = {
        "data.encoder": "bert-mean",
        "data.model": str(model_dir),
        "data.dataset": "toy",
        "data.source": "local",
        "data.train_file": train,
        "data.test_file": test,
        "data.cache_dir": str(tmp_path / "cache"),
        "trainer.max_epochs": 1,
        "trainer.enable_progress_bar": "false",
        "results.run_dir": str(tmp_path / "run"),
    } | options
    return [f"--{key}={value}" for key, value in settings.items()]


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("dkacq.encoders.loading.load_encoders", refuse)


def test_a_layer_the_model_lacks_is_refused_before_caching(
    tiny_bert_dir, probe_files, tmp_path, monkeypatch, no_model_loading
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"layer 99 outside 0\.\.2") as error:
        main(["fit", *_args(tiny_bert_dir, probe_files, tmp_path, **{"data.layers": "[99]"})])
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_a_bad_cache_dtype_is_refused_when_parsed(tiny_bert_dir, probe_files, tmp_path, no_model_loading):
    done = run(["fit", *_args(tiny_bert_dir, probe_files, tmp_path, **{"data.cache_dtype": "float8"})], tmp_path)
    assert "cache_dtype" in done.error()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("num_passages", [1, -3, 6])
def test_num_passages_out_of_range_is_dkacqs_message(num_passages, tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"num_passages must be between 2 and 5 .*got {num_passages}") as error:
        main(["fit", *_args(tiny_bert_dir, probe_files, tmp_path, **{"data.num_passages": num_passages})])
    assert "\n" not in str(error.value)


def test_a_sweep_checks_every_run_before_running_any(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    train, test = probe_files
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"trainer": {"max_epochs": 1, "enable_progress_bar": False}}))
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
                    "settings": [{"encoder": "bert-mean", "model": str(tiny_bert_dir)}],
                    "num_passages": [2],
                    "heads": ["concat"],
                },
                "attributions": [{"model": "minilm-randon", "name": "typo"}],
            }
        )
    )
    with pytest.raises(ValueError, match="unknown preset 'minilm-randon'"):
        main(["sweep", "--config", str(study)])
    assert not (tmp_path / "study").exists()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_other_data_under_the_demo_name_is_refused(probe_files, tmp_path):
    from dkacq.data.examples import ProbeDataError
    from dkacq.datamodules.probe import ProbeDataModule
    from dkacq.datamodules.texts import TextDataModule

    train, test = probe_files
    for module in (ProbeDataModule, TextDataModule):
        with pytest.raises(ProbeDataError, match="data.source=local needs its own data.dataset name") as error:
            module(source="local", train_file=train, test_file=test, cache_dir=str(tmp_path / "cache"))
        assert "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()
