"""Probe heads, the N-passage draws, best-epoch selection and the results they record."""

import copy
import csv
import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from dkacq.datamodules.probe import ProbeDataModule
from dkacq.encoders.cache import CacheMismatchError
from dkacq.formats.results import ProbeCell
from dkacq.probe.heads import build_head
from dkacq.probe.linear_probe import LinearProbe
from dkacq.probe.results import ProbeResults


def _data(tmp_path, files, **kwargs) -> ProbeDataModule:
    train, test = files
    options = dict(
        encoder="bert-mean",
        model=kwargs.pop("model"),
        dataset="toy",
        source="local",
        train_file=train,
        test_file=test,
        cache_dir=str(tmp_path / "cache"),
        batch_size=16,
        val_fraction=0.25,
    )
    return ProbeDataModule(**(options | kwargs))


def test_concat_head_cannot_compare_query_with_passages():
    torch.manual_seed(0)
    queries, passages, other_passages = torch.randn(2, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    for head, query_blind in (("concat", True), ("passage_only", True), ("query_aware", False)):
        probe = build_head(head, 8, 5)
        shift = probe(queries[:1], passages) - probe(queries[1:], passages)
        shift_elsewhere = probe(queries[:1], other_passages) - probe(queries[1:], other_passages)
        assert torch.allclose(shift, shift_elsewhere, atol=1e-6) is query_blind, head


def test_draws_are_shared_across_models_and_redrawn_in_training(tmp_path, probe_files, tiny_bert_dir):
    modules = [
        _data(tmp_path, probe_files, model=str(tiny_bert_dir), layers=[1]),
        _data(tmp_path, probe_files, model=str(tiny_bert_dir), layers=[1], random_init=True),
    ]
    for module in modules:
        module.prepare_data()
        module.setup("fit")
    first, second = (module.datasets["test"] for module in modules)
    assert torch.equal(first.columns, second.columns) and torch.equal(first.labels, second.labels)
    assert torch.equal(modules[0].datasets["val"].labels, modules[1].datasets["val"].labels)
    train = modules[0].datasets["train"]
    indices = list(range(len(train)))
    epoch_one, epoch_two = train.__getitems__(indices), train.__getitems__(indices)
    assert not torch.equal(epoch_one["label"], epoch_two["label"])
    # the batch holds the cached vectors the draw points at
    queries, passages = modules[0].open().layer(1)
    query_rows, passage_rows = modules[0].open().index("test")
    batch = first.__getitems__([3])
    assert torch.equal(batch["query"][0], queries[query_rows[3]])
    positive = batch["passages"][0, batch["label"][0]]
    assert torch.equal(positive, passages[passage_rows[3, 0]])


class EpochRecorder(Callback):
    """Validation accuracy and a copy of the probe after every epoch."""

    def __init__(self):
        self.val_acc, self.weights = [], []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_acc.append(trainer.callback_metrics["val/acc"].item())
            self.weights.append(copy.deepcopy(pl_module.head_module.state_dict()))


def test_tested_checkpoint_is_the_best_validation_epoch(tmp_path, probe_files, tiny_bert_dir):
    seed_everything(0)
    data = _data(tmp_path, probe_files, model=str(tiny_bert_dir), layers=[2], num_passages=3)
    probe = LinearProbe("concat", learning_rate=0.05, num_passages=3)
    recorder, results = EpochRecorder(), ProbeResults(str(tmp_path / "run"))
    results.cell = ProbeCell("toy", "tiny", "mean", 3, 2, "concat", {"test": "best epoch"})
    trainer = Trainer(
        max_epochs=12,
        logger=False,
        enable_progress_bar=False,
        callbacks=[
            ModelCheckpoint(tmp_path / "ckpt", monitor="val/acc", mode="max", filename="best"),
            recorder,
            results,
        ],
    )
    trainer.fit(probe, datamodule=data)
    trainer.test(probe, datamodule=data, ckpt_path="best")

    best = max(range(len(recorder.val_acc)), key=lambda epoch: (recorder.val_acc[epoch], -epoch))
    assert best != len(recorder.val_acc) - 1, "choose a setting where the last epoch is not the best"
    with open(results.results_path) as file:
        (row,) = list(csv.DictReader(file))
    assert int(row["best_epoch"]) == best
    assert float(row["val_acc"]) == pytest.approx(recorder.val_acc[best], abs=1e-5)

    head = build_head("concat", data.hidden_size, 3)
    head.load_state_dict(recorder.weights[best])
    test_set, correct = data.datasets["test"], 0
    for index in range(len(test_set)):
        example = test_set.__getitems__([index])
        correct += int(head(example["query"], example["passages"]).argmax() == example["label"][0])
    assert float(row["test_acc"]) == pytest.approx(correct / len(test_set), abs=1e-5)


def test_num_passages_outside_two_to_five_is_one_line(tmp_path, probe_files, tiny_bert_dir):
    with pytest.raises(ValueError, match="num_passages must be between 2 and 5") as error:
        _data(tmp_path, probe_files, model=str(tiny_bert_dir), num_passages=6)
    assert "\n" not in str(error.value)


def test_unknown_preset_in_data_module(tmp_path, probe_files):
    with pytest.raises(ValueError, match="unknown preset 'bert-huge'"):
        _data(tmp_path, probe_files, model=None, encoder="bert-huge")


def test_cache_of_another_pooling_is_refused(tmp_path, probe_files, tiny_bert_dir):
    _data(tmp_path, probe_files, model=str(tiny_bert_dir), cache_name="shared").prepare_data()
    other = _data(tmp_path, probe_files, model=str(tiny_bert_dir), cache_name="shared", pooling="cls")
    with pytest.raises(CacheMismatchError, match="pooling='mean' but pooling='cls' was requested") as error:
        other.prepare_data()
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "cache").rglob("*.partial"))


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"question": "q", "answers": [], "hard_negative_ctxs": []}]', "positive_ctxs"),
        ('[{"question": "q", "positive_ctxs": [{"title": "t", "te', "JSON"),
    ],
)
def test_bad_dpr_file_leaves_nothing_behind(tmp_path, tiny_bert_dir, content, message):
    from dkacq.data.examples import ProbeDataError

    bad, test = tmp_path / "bad.json", tmp_path / "test.json"
    bad.write_text(content)
    test.write_text("[]")
    data = _data(tmp_path, (str(bad), str(test)), model=str(tiny_bert_dir), source="dpr")
    with pytest.raises(ProbeDataError, match=message) as error:
        data.prepare_data()
    assert "\n" not in str(error.value) and "bad.json" in str(error.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))
    assert not (tmp_path / "cache" / "toy" / "probe_set").exists()


def test_cache_holds_one_file_per_hidden_state(tmp_path, probe_files, tiny_bert_dir):
    data = _data(tmp_path, probe_files, model=str(tiny_bert_dir), layers=[0])
    data.prepare_data()
    cache = data.open()
    sizes = [f.stat().st_size for f in sorted(cache.folder.glob("layer_*.safetensors"))]
    assert len(sizes) == cache.num_hidden_states == 3
    rows = cache.manifest["num_queries"] + cache.manifest["num_passages"]
    assert all(math.isclose(size, rows * cache.hidden_size * 4, rel_tol=0.05) for size in sizes)


def test_edited_source_file_rebuilds_the_probe_set_and_refuses_the_old_cache(tmp_path, probe_files, tiny_bert_dir):
    data = _data(tmp_path, probe_files, model=str(tiny_bert_dir))
    data.prepare_data()
    train, _ = probe_files
    lines = open(train).read().splitlines()
    with open(train, "w") as file:
        file.write("\n".join(lines[:-1]) + "\n")
    edited = _data(tmp_path, probe_files, model=str(tiny_bert_dir))
    probe_set, _ = edited.load_probe_set()
    assert len(probe_set["train"]) == len(lines) - 1
    with pytest.raises(CacheMismatchError, match="data_fingerprint"):
        edited.prepare_data()
