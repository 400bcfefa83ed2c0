"""The residual bilinear head starts at the untrained similarity, is validated there as epoch 0, and
can only be selected above it."""

import pytest
import torch
from conftest import write_probe_files
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn import functional
from torch.utils.data import DataLoader

from dkacq.datamodules.probe import ProbeDataModule, ProbeExamples
from dkacq.probe.baselines import similarity_outcomes
from dkacq.probe.heads import ResidualBilinearHead, build_head
from dkacq.probe.linear_probe import LinearProbe


def test_scores_are_the_formula_and_start_at_the_dot_product():
    torch.manual_seed(0)
    head = build_head("residual_bilinear", 6, 3, rank=2)
    assert isinstance(head, ResidualBilinearHead)
    query, passages = torch.randn(4, 6), torch.randn(4, 3, 6)
    dots = torch.tensor([[float(query[b] @ passages[b, k]) for k in range(3)] for b in range(4)])
    torch.testing.assert_close(head(query, passages), dots)
    with torch.no_grad():
        head.scale.fill_(2.5)
        head.passage_map.weight.normal_()
    u, v = head.query_map.weight, head.passage_map.weight
    matrix = 2.5 * torch.eye(6) + u.T @ v  # q^T (s I + U^T V) p
    expected = torch.einsum("bd,de,bne->bn", query, matrix, passages)
    torch.testing.assert_close(head(query, passages), expected.detach(), rtol=1e-5, atol=1e-5)


def test_improves_on_the_dot_product_on_a_planted_task():
    """The positive is argmax_k q^T (I + A) p_k with A of rank 2: the dot product alone is well above
    chance but below what the head reaches after training with weight decay."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    dim, n = 16, 5
    matrix = torch.eye(dim) + 0.6 * torch.randn(dim, 2, generator=generator) @ torch.randn(2, dim, generator=generator)

    def planted(count):
        query, passages = torch.randn(count, dim, generator=generator), torch.randn(count, n, dim, generator=generator)
        return query, passages, torch.einsum("bd,de,bne->bn", query, matrix, passages).argmax(1)

    train, test = planted(2000), planted(1000)
    torch.manual_seed(0)
    probe = LinearProbe("residual_bilinear", learning_rate=1e-2, num_passages=n, hidden_size=dim, rank=4)

    def accuracy():
        with torch.no_grad():
            return (probe(test[0], test[1]).argmax(1) == test[2]).float().mean().item()

    dot = (torch.einsum("bd,bnd->bn", test[0], test[1]).argmax(1) == test[2]).float().mean().item()
    assert accuracy() == dot and 0.3 < dot < 0.85
    optimizer = probe.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]  # U, V decay; s not
    for _ in range(200):
        optimizer.zero_grad()
        functional.cross_entropy(probe(train[0], train[1]), train[2]).backward()
        optimizer.step()
    assert accuracy() > dot + 0.1


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_bert_dir):
    folder = tmp_path_factory.mktemp("residual")
    train, test = write_probe_files(folder, num_train=60, num_test=30)
    module = ProbeDataModule(
        encoder="bert-mean",
        model=str(tiny_bert_dir),
        dataset="toy",
        source="local",
        train_file=train,
        test_file=test,
        cache_dir=str(folder / "cache"),
        batch_size=16,
        val_fraction=0.25,
        num_passages=4,
        layers=[2],
    )
    module.prepare_data()
    module.setup("fit")
    return module


class StepsAtValidation(Callback):
    def __init__(self):
        self.seen = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            head = pl_module.head_module
            untouched = bool((head.passage_map.weight == 0).all() and head.scale == 1)
            self.seen.append((trainer.current_epoch, untouched, trainer.callback_metrics["val/acc"].item()))


def test_untrained_head_equals_the_cosine_baseline_on_the_same_draws(data):
    probe = LinearProbe("residual_bilinear", num_passages=4, hidden_size=data.hidden_size, normalize=True)
    Trainer(logger=False, enable_progress_bar=False).test(probe, datamodule=data)
    baseline = similarity_outcomes(data, "similarity_cosine")
    assert torch.equal(probe.test_outcomes["prediction"], baseline["prediction"])
    assert torch.equal(probe.test_outcomes["label"], baseline["label"])


class PlantedVectors(LightningDataModule):
    """In-memory examples whose positive is its query plus noise: the cosine finds it almost always."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        queries = torch.randn(300, 8, generator=generator)
        positives = queries + 0.3 * torch.randn(300, 8, generator=generator)
        passages = torch.cat([positives, torch.randn(1200, 8, generator=generator)])
        rows = torch.cat([torch.arange(300)[:, None], 300 + torch.arange(1200).view(300, 4)], dim=1)
        parts = {"train": slice(0, 200), "val": slice(200, 250), "test": slice(250, 300)}
        self.datasets = {
            name: ProbeExamples(queries, passages, torch.arange(300)[part], rows[part], 4, fixed_seed=index)
            for index, (name, part) in enumerate(parts.items())
        }

    def _loader(self, split):
        return DataLoader(self.datasets[split], batch_size=50, collate_fn=lambda batch: batch)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


def _cosine_accuracy(examples: ProbeExamples) -> float:
    batch = examples.__getitems__(list(range(len(examples))))
    cosine = functional.cosine_similarity(batch["query"].unsqueeze(1), batch["passages"], dim=-1)
    return (cosine.argmax(1) == batch["label"]).float().mean().item()


def test_epoch_zero_is_validated_before_any_step_and_wins_over_a_destructive_fit(tmp_path):
    seed_everything(0)
    data = PlantedVectors()
    probe = LinearProbe(
        "residual_bilinear", learning_rate=30.0, num_passages=4, hidden_size=8, normalize=True, weight_decay=0.0
    )
    seen = StepsAtValidation()
    checkpoint = ModelCheckpoint(tmp_path, monitor="val/acc", mode="max", filename="best")
    trainer = Trainer(max_epochs=4, logger=False, enable_progress_bar=False, callbacks=[checkpoint, seen])
    trainer.fit(probe, datamodule=data)
    assert [epoch for epoch, _, _ in seen.seen] == [0, 1, 2, 3]
    assert seen.seen[0][1] and not seen.seen[1][1]  # epoch 0 validates the head as initialised
    assert seen.seen[0][2] == pytest.approx(_cosine_accuracy(data.datasets["val"])) and seen.seen[0][2] > 0.9
    assert all(acc < seen.seen[0][2] for _, _, acc in seen.seen[1:])  # training at this rate only hurts
    trainer.test(probe, datamodule=data, ckpt_path="best")
    assert probe.checkpoint_epoch == 0
    correct = (probe.test_outcomes["prediction"] == probe.test_outcomes["label"]).float().mean().item()
    assert correct == pytest.approx(_cosine_accuracy(data.datasets["test"]))


def test_weight_decay_is_in_the_identity_of_the_head_it_changes(tiny_bert_dir, probe_files, tmp_path):
    """Cells of the other heads keep the identity they had before the option existed."""
    from dkacq.commands.probe import build

    train, test = probe_files
    data = dict(encoder="bert-mean", model=str(tiny_bert_dir), dataset="toy", source="local", train_file=train)
    options = {
        "data": data | {"test_file": test, "cache_dir": str(tmp_path / "cache"), "layers": [1]},
        "heads": ["concat", "residual_bilinear"],
        "results": {"run_dir": str(tmp_path / "run")},
    }
    concat, residual = build(options).plan()
    assert "weight_decay" not in concat.identity["model"] and residual.identity["model"]["weight_decay"] == 0.01
    other = build(options | {"model": {"weight_decay": 0.1}}).plan()
    assert other[0].id == concat.id and other[1].id != residual.id
