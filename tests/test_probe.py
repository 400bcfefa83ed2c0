"""Probe heads, the N-passage draws, best-epoch selection and the results they record."""

import copy
import csv
import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from scipy.stats import binomtest
from torch.nn import functional

from dkacq.datamodules.probe import ProbeDataModule
from dkacq.encoders.cache import CacheMismatchError
from dkacq.formats.results import ProbeCell
from dkacq.probe.heads import HEADS, BilinearHead, build_head
from dkacq.probe.linear_probe import LinearProbe
from dkacq.probe.results import ProbeResults, best_is_last, best_validation_epoch


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
    for head, query_blind in (("concat", True), ("passage_only", True), ("query_aware", False), ("bilinear", False)):
        probe = build_head(head, 8, 5)
        shift = probe(queries[:1], passages) - probe(queries[1:], passages)
        shift_elsewhere = probe(queries[:1], other_passages) - probe(queries[1:], other_passages)
        assert torch.allclose(shift, shift_elsewhere, atol=1e-6) is query_blind, head


def _planted(generator, matrix, count, num_passages):
    """Random queries and passages; the positive is the passage of the largest q^T A p."""
    dim = matrix.shape[0]
    query = torch.randn(count, dim, generator=generator)
    passages = torch.randn(count, num_passages, dim, generator=generator)
    return query, passages, torch.einsum("bd,de,bne->bn", query, matrix, passages).argmax(dim=1)


def _fit(head, data, steps=200):
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        functional.cross_entropy(head(data[0], data[1]), data[2]).backward()
        optimizer.step()
    return head


def test_bilinear_head_learns_a_planted_low_rank_rule_that_concat_cannot():
    """The positive is argmax_k q^T A p_k with A of rank 2: a bilinear head of rank 4 learns it, the
    concat head (which never multiplies q with a passage) stays at chance."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    dim, num_passages = 16, 5
    matrix = torch.randn(dim, 2, generator=generator) @ torch.randn(2, dim, generator=generator)
    train = _planted(generator, matrix, 2000, num_passages)
    test = _planted(generator, matrix, 1000, num_passages)
    accuracy = {}
    for head in ("bilinear", "concat"):
        torch.manual_seed(0)
        fitted = _fit(build_head(head, dim, num_passages, rank=4), train)
        with torch.no_grad():
            accuracy[head] = (fitted(test[0], test[1]).argmax(dim=1) == test[2]).float().mean().item()
    assert accuracy["bilinear"] > 0.9, accuracy
    assert accuracy["concat"] < 0.3, accuracy  # chance is 0.2; 0.3 is far above its 1000-item noise


def test_bilinear_head_is_the_score_it_says():
    torch.manual_seed(0)
    head = build_head("bilinear", 6, 3, rank=2)
    assert isinstance(head, BilinearHead) and head.query_map.weight.shape == (2, 6)
    query, passages = torch.randn(4, 6), torch.randn(4, 3, 6)
    u, v, w = (weight.detach() for weight in (head.query_map.weight, head.passage_map.weight, head.prior.weight[0]))
    expected = torch.tensor(
        [[float((u @ query[b]) @ (v @ passages[b, k]) + w @ passages[b, k]) for k in range(3)] for b in range(4)]
    )
    torch.testing.assert_close(head(query, passages), expected, rtol=1e-5, atol=1e-5)
    assert "bilinear" in HEADS
    with pytest.raises(ValueError, match="rank must be at least 1"):
        LinearProbe("bilinear", rank=0)


def test_probe_options_rank_and_normalize():
    probe = LinearProbe("bilinear", num_passages=3, hidden_size=8, rank=3)
    assert probe.head_module.query_map.out_features == 3
    assert LinearProbe("concat", num_passages=3, hidden_size=8).hparams.rank == 64
    torch.manual_seed(0)
    normalized = LinearProbe("query_aware", num_passages=3, hidden_size=8, normalize=True)
    query, passages = torch.randn(2, 8), torch.randn(2, 3, 8)
    scaled = normalized(query * 7.5, passages * torch.tensor([0.1, 3.0, 40.0])[None, :, None])
    torch.testing.assert_close(scaled, normalized(query, passages))
    plain = LinearProbe("query_aware", num_passages=3, hidden_size=8)
    plain.load_state_dict(normalized.state_dict())
    expected = plain(functional.normalize(query, dim=-1), functional.normalize(passages, dim=-1))
    torch.testing.assert_close(normalized(query, passages), expected)


@pytest.mark.parametrize(
    "history, best, last",
    [
        ([0.3, 0.5, 0.5, 0.4], 1, False),  # a tie does not replace the first best
        ([0.3, 0.4, 0.6], 2, True),
        ([0.5, 0.5], 0, False),
        ([0.7], 0, True),
        ([0.2, 0.6, 0.1, 0.6, 0.61], 4, True),
    ],
)
def test_convergence_flags_from_a_hand_made_history(history, best, last):
    assert best_validation_epoch(history) == best
    assert best_is_last(range(len(history)), best) is last
    losses = [-value for value in history]
    assert best_validation_epoch(losses, mode="min") == best


def test_convergence_flags_unknown():
    assert best_is_last([], 3) is None and best_is_last([0, 1], None) is None
    assert best_is_last([0, 2, 4], 4) is True and best_is_last([0, 2, 4], 3) is False  # validated every 2nd epoch
    with pytest.raises(ValueError):
        best_validation_epoch([])


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
    wilson = binomtest(correct, len(test_set)).proportion_ci(method="wilson")
    assert float(row["test_acc_low"]) == pytest.approx(wilson.low, abs=1e-5)
    assert float(row["test_acc_high"]) == pytest.approx(wilson.high, abs=1e-5)

    # how the fit went: 12 epochs of ceil(num_train / 16) steps, best epoch not the last
    steps_per_epoch = math.ceil(int(row["num_train"]) / 16)
    assert (row["epochs_run"], row["optimizer_steps"]) == ("12", str(12 * steps_per_epoch))
    assert row["best_is_last"] == "0" and row["early_stopping"] == ""
    assert 0 < float(row["fit_seconds"]) < 600
    assert (row["rank"], row["normalize"]) == ("", "0")

    # testing again without a fit keeps how the fit went
    again = ProbeResults(str(tmp_path / "run"))
    again.cell = results.cell
    Trainer(max_epochs=12, logger=False, enable_progress_bar=False, callbacks=[again]).test(
        LinearProbe("concat", learning_rate=0.05, num_passages=3),
        datamodule=data,
        ckpt_path=str(tmp_path / "ckpt" / "best.ckpt"),
    )
    with open(results.results_path) as file:
        (retested,) = list(csv.DictReader(file))
    assert retested == row


def test_early_stopping_is_recorded(tmp_path, probe_files, tiny_bert_dir):
    """Early stopping on val/loss: the row says how many epochs ran, the rule, and whether the tested
    epoch (best val/acc) was the last one, all as the epochs recorded here say."""
    seed_everything(0)
    data = _data(tmp_path, probe_files, model=str(tiny_bert_dir), layers=[2], num_passages=3)
    probe = LinearProbe("bilinear", learning_rate=0.05, num_passages=3, rank=4)
    recorder, results = EpochRecorder(), ProbeResults(str(tmp_path / "run"))
    results.cell = ProbeCell("toy", "tiny", "mean", 3, 2, "bilinear", {"test": "early stopping"})
    trainer = Trainer(
        max_epochs=200,
        logger=False,
        enable_progress_bar=False,
        callbacks=[
            ModelCheckpoint(tmp_path / "ckpt", monitor="val/acc", mode="max", filename="best"),
            EarlyStopping(monitor="val/loss", mode="min", patience=2),
            recorder,
            results,
        ],
    )
    trainer.fit(probe, datamodule=data)
    trainer.test(probe, datamodule=data, ckpt_path="best")
    with open(results.results_path) as file:
        (row,) = list(csv.DictReader(file))
    epochs = len(recorder.val_acc)
    assert 3 <= epochs < 200 and row["epochs_run"] == str(epochs)
    assert row["early_stopping"] == "val/loss min, patience 2"
    best = best_validation_epoch(recorder.val_acc)
    assert int(row["best_epoch"]) == best
    assert row["best_is_last"] == str(int(best == epochs - 1))
    assert row["optimizer_steps"] == str(epochs * math.ceil(int(row["num_train"]) / 16))
    assert (row["rank"], row["normalize"]) == ("4", "0")


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
    with pytest.raises(CacheMismatchError, match="data_fingerprint.*another data.dataset name"):
        edited.prepare_data()
