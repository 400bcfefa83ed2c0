"""Each layer file is read once per fit and per sweep (every head and N of it from one read), memory holds
at most one layer, and the results are exactly those of fitting each cell on its own."""

import csv
import os
import re
import weakref
from collections import Counter
from pathlib import Path

import torch
import yaml

from dkacq.cli import main
from dkacq.datamodules.probe import LAYERS, LayerHolder, ProbeDataModule
from dkacq.encoders.cache import EmbeddingCache, LayerFileWriter, layer_file, publish, staging_folder

HEADS, NUM_PASSAGES, LAYER_COUNT = ("concat", "query_aware"), (2, 3), 3
BASE = {
    "trainer": {"max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False, "logger": False},
    "model": {"learning_rate": 0.01},
    "data": {"batch_size": 32, "val_fraction": 0.2},
}


class LayerReads:
    """Counts ``EmbeddingCache.layer`` calls and checks, at each, that no other layer's vectors are alive."""

    def __init__(self, monkeypatch):
        self.counts, self.alive = Counter(), []
        original = EmbeddingCache.layer

        def counting(cache, layer):
            key = (cache.folder.name, layer)
            living = {other for other, ref in self.alive if ref() is not None and other != key}
            assert not living, f"reading {key} while {living} are still in memory"
            self.counts[key] += 1
            vectors = original(cache, layer)
            self.alive += [(key, weakref.ref(tensor)) for tensor in vectors]
            return vectors

        monkeypatch.setattr(EmbeddingCache, "layer", counting)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return [row for row in csv.DictReader(file) if row["probe"] in HEADS]  # baselines have rows too


def _numbers(row: dict) -> dict:
    """A row but for the run's config file (named after the run's options, which differ: layers, heads)
    and a fit's wall time (where the table records it)."""
    return {key: value for key, value in row.items() if key not in ("config", "fit_seconds")}


def _data_options(tmp_path, probe_files) -> dict:
    train, test = probe_files
    return {
        "encoder": "bert-mean",
        "dataset": "toy",
        "source": "local",
        "train_file": train,
        "test_file": test,
        "cache_dir": str(tmp_path / "cache"),
    }


def test_a_sweep_reads_each_layer_once_and_equals_each_cell_fitted_alone(
    tmp_path, tiny_bert_dir, probe_files, monkeypatch, capsys
):
    """Two settings (standardized, and the random-init control: a cache each) x N in (2, 3) x 2 heads x 3
    layers: 24 cells from 6 layer reads; every row, to the last digit, and every outcome file equal those of 24
    separate ``dkacq fit --data.layers [L] --heads [H]`` runs that each read their layer for themselves
    (the path before layers were shared)."""
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "probe-base.yaml"
    base.write_text(yaml.safe_dump(BASE))
    data = _data_options(tmp_path, probe_files)
    settings = [{"model": str(tiny_bert_dir), "standardize": True}, {"model": str(tiny_bert_dir), "random_init": True}]
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "study"),
                "data": data,
                "probes": {
                    "config": str(base),
                    "settings": settings,
                    "num_passages": list(NUM_PASSAGES),
                    "heads": list(HEADS),
                },
            }
        )
    )
    reads = LayerReads(monkeypatch)
    main(["sweep", "--config", str(study)])
    announced = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    cells = len(settings) * len(NUM_PASSAGES) * len(HEADS) * LAYER_COUNT
    per_setting = cells // len(settings)  # counted over a setting's N values and heads
    assert [line.split()[0] for line in announced] == [f"[{k}/{per_setting}]" for k in range(1, per_setting + 1)] * 2
    assert sorted(reads.counts.values()) == [1] * len(settings) * LAYER_COUNT, reads.counts
    assert LAYERS.vectors is None, "the holder lets go of its layer when the sweep's probes are done"

    swept = _rows(tmp_path / "study" / "probe" / "results.csv")
    assert len(swept) == cells
    for setting in ("0", "1"):  # each setting's N values and heads layer by layer, one setting after the other
        layers = [int(row["layer"]) for row in swept if row["random_init"] == setting]
        assert layers == sorted(layers) and len(layers) == per_setting
    assert [row["random_init"] for row in swept] == sorted(row["random_init"] for row in swept)

    monkeypatch.setattr(LAYERS, "enabled", False)  # every setup reads its own layer, as before
    reads.counts.clear()
    for row in swept:  # in the sweep's order, so that the two tables' rows are in the same order
        setting = settings[int(row["random_init"])]
        options = {**data, **setting, "num_passages": int(row["num_passages"])}
        args = [f"--data.{key}={value}" for key, value in options.items()]
        main(
            [
                "fit",
                "--config",
                str(base),
                *args,
                f"--data.layers=[{row['layer']}]",
                f"--heads=[{row['probe']}]",
                f"--results.run_dir={tmp_path / 'alone'}",
            ]
        )
    assert sum(reads.counts.values()) >= 2 * cells, (
        "alone, each cell reads its layer to fit and to test (and its baselines)"
    )

    alone = _rows(tmp_path / "alone" / "results.csv")  # cell_id included: the same identities
    assert [_numbers(row) for row in alone] == [_numbers(row) for row in swept]
    for row in swept:
        swept_outcomes = (tmp_path / "study" / "probe" / row["predictions"]).read_bytes()
        assert (tmp_path / "alone" / row["predictions"]).read_bytes() == swept_outcomes, row["cell_id"]


def _fit_args(tiny_bert_dir, probe_files, tmp_path) -> list[str]:
    options = {**_data_options(tmp_path, probe_files), "model": str(tiny_bert_dir), "num_passages": 3}
    return [
        *(f"--data.{key}={value}" for key, value in options.items()),
        "--data.batch_size=32",
        "--data.val_fraction=0.2",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        f"--heads=[{', '.join(HEADS)}]",
        f"--results.run_dir={tmp_path / 'run'}",
    ]


def test_fit_test_and_validate_read_each_layer_once(tmp_path, tiny_bert_dir, probe_files, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = _fit_args(tiny_bert_dir, probe_files, tmp_path)
    reads = LayerReads(monkeypatch)
    main(["fit", *args])
    announced = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    name = Path(tiny_bert_dir).name
    labels = [f"toy {name} mean N=3 layer {layer} {head}" for layer in range(LAYER_COUNT) for head in HEADS]
    assert announced == [f"[{number}/{len(labels)}] {label}" for number, label in enumerate(labels, 1)]
    assert sorted(reads.counts.values()) == [1] * LAYER_COUNT
    fitted = _rows(tmp_path / "run" / "results.csv")

    for command in ("test", "validate"):
        reads.counts.clear()
        main([command, *args])
        assert sorted(reads.counts.values()) == [1] * LAYER_COUNT, command
    assert [(row["probe"], row["layer"], row["test_acc"]) for row in _rows(tmp_path / "run" / "results.csv")] == [
        (row["probe"], row["layer"], row["test_acc"]) for row in fitted
    ]
    assert LAYERS.vectors is None


def _tiny_cache(folder: Path, layers: int = 2, dim: int = 4) -> EmbeddingCache:
    staging = staging_folder(folder)
    for layer in range(layers):
        writer = LayerFileWriter(layer_file(staging, layer), 3, 5, dim, "bfloat16")
        writer.append(torch.full((3, dim), float(layer)))
        writer.append(torch.full((5, dim), float(layer)))
        writer.close()
    index = {"train.query": torch.arange(3), "train.passages": torch.arange(15).view(3, 5) % 5}
    return publish(staging, folder, {"num_hidden_states": layers, "hidden_size": dim}, index)


def test_the_holder_holds_one_layer_and_rereads_a_changed_file(tmp_path, monkeypatch):
    cache = _tiny_cache(tmp_path / "cache")
    holder = LayerHolder()
    reads = LayerReads(monkeypatch)

    assert holder.layer(cache, 0)[0] is not holder.layer(cache, 0)[0], "outside sharing every call reads"
    assert reads.counts[("cache", 0)] == 2
    reads.counts.clear()
    with holder.sharing():
        first = holder.layer(cache, 0)
        with holder.sharing():  # nested: the outer one keeps the layer
            assert holder.layer(cache, 0)[1] is first[1]
        assert holder.vectors is not None and holder.key[1] == 0
        del first
        second = holder.layer(cache, 1)  # LayerReads fails here if layer 0 were still alive
        assert holder.vectors is second and holder.key[1] == 1
        assert second[0].dtype == torch.float32 and second[0].eq(1).all()
        # a cache rebuilt in place (new file, new inode) is read again
        path = layer_file(cache.folder, 1)
        copy = path.with_suffix(".copy")
        copy.write_bytes(path.read_bytes())
        os.replace(copy, path)
        del second
        assert holder.layer(cache, 1)[0].eq(1).all()
    assert holder.vectors is None and holder.key is None
    assert reads.counts == Counter({("cache", 0): 1, ("cache", 1): 2})


def test_the_data_module_releases_its_vectors(tmp_path, tiny_bert_dir, probe_files):
    module = ProbeDataModule(model=str(tiny_bert_dir), layers=[1], **_data_options(tmp_path, probe_files))
    module.prepare_data()
    with LAYERS.sharing():
        module.setup("fit")
        train = module.datasets["train"]
        held = weakref.ref(LAYERS.vectors[0])
        assert train.queries is LAYERS.vectors[0]
        module.release()
        assert module.datasets == {} and train.queries is None
        assert held() is not None, "the holder keeps the layer for the next probe of it"
    assert held() is None and LAYERS.vectors is None
