"""LinearProbe: one head trained on one layer's cached vectors to pick the positive among N passages."""

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.nn import functional
from torchmetrics import CatMetric
from torchmetrics.classification import MulticlassAccuracy

from dkacq.data.sampling import check_num_passages
from dkacq.probe.heads import DEFAULT_RANK, Head, build_head


class LinearProbe(LightningModule):
    """A probe head with softmax cross-entropy, Adam, and accuracy per split.

    The test split's per-example outcomes (example index, prediction, label) are gathered across
    devices into ``test_outcomes`` for the paired significance tests of the report; examples that a
    distributed sampler repeated to even out the shards are kept once.
    """

    def __init__(
        self,
        head: Head = "concat",
        learning_rate: float = 1e-4,
        num_passages: int = 5,
        hidden_size: int | None = None,
        rank: int = DEFAULT_RANK,
        normalize: bool = False,
        weight_decay: float = 0.01,
    ):
        """
        Args:
            head: ``concat`` (the study's probe), ``passage_only`` (concat without the query: how much
                of the accuracy needs the query at all), ``query_aware`` (shared weights over
                ``q * p_k`` and ``p_k``: can compare query and passage) or ``bilinear``
                (``(U q) . (V p_k) + w . p_k`` with U, V of rank ``rank``) or ``residual_bilinear``
                (``s q . p_k + (U q) . (V p_k)``, starting at the untrained similarity: validated before
                its first step as epoch 0, so the selected epoch is never worse on validation than the
                dot product, or the cosine with ``normalize``).
            learning_rate: Adam's learning rate (the study: 1e-4).
            num_passages: N, passages per example; set from the data module's ``num_passages``.
            hidden_size: vector size of the probed layer; read from the cache when not given.
            rank: rank of the ``bilinear`` and ``residual_bilinear`` heads' U and V (the others ignore it).
            normalize: scale the query and every passage vector to unit L2 norm before the head (any
                head), so that the probe sees directions only, not the layer's vector lengths.
        """
        super().__init__()
        check_num_passages(num_passages)
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must not be negative, got {weight_decay}")
        self.save_hyperparameters()
        self.head_module = build_head(head, hidden_size, num_passages, rank) if hidden_size else None
        self.accuracy = torch.nn.ModuleDict(
            {f"{split}_acc": MulticlassAccuracy(num_passages, average="micro") for split in ("train", "val", "test")}
        )
        self.test_index, self.test_prediction, self.test_label = CatMetric(), CatMetric(), CatMetric()
        self.test_outcomes: dict[str, Tensor] | None = None
        self.checkpoint_epoch: int | None = None
        self.checkpoint_val_acc: float | None = None

    def setup(self, stage: str) -> None:
        if self.head_module is None:
            self.hparams.hidden_size = self.trainer.datamodule.hidden_size
            self.head_module = build_head(
                self.hparams.head, self.hparams.hidden_size, self.hparams.num_passages, self.hparams.rank
            )

    def forward(self, query: Tensor, passages: Tensor) -> Tensor:
        if self.hparams.normalize:
            query, passages = functional.normalize(query, dim=-1), functional.normalize(passages, dim=-1)
        return self.head_module(query, passages)

    def _step(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor]:
        logits = self(batch["query"], batch["passages"])
        loss = functional.cross_entropy(logits, batch["label"])
        prediction = logits.argmax(dim=1)
        accuracy = self.accuracy[f"{split}_acc"]
        accuracy(prediction, batch["label"])
        self.log(f"{split}/loss", loss, prog_bar=split != "test", batch_size=len(prediction))
        if split == "train":  # train/loss is per step; its mean over the epoch beside val/loss
            self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=len(prediction))
        self.log(f"{split}/acc", accuracy, prog_bar=True, on_epoch=True, on_step=False)
        return loss, prediction

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        """The batch's loss; None (no optimizer step) throughout epoch 0 for a head that starts at the
        untrained similarity, so that epoch's validation is the head as initialised, which best-epoch
        selection then weighs like any other epoch (its training epochs are 1 to ``max_epochs - 1``)."""
        if self.current_epoch == 0 and getattr(self.head_module, "evaluates_at_init", False):
            return None
        return self._step(batch, "train")[0]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, prediction = self._step(batch, "test")
        self.test_index.update(batch["index"])
        self.test_prediction.update(prediction)
        self.test_label.update(batch["label"])

    def on_test_epoch_start(self) -> None:
        for metric in (self.test_index, self.test_prediction, self.test_label):
            metric.reset()

    def on_test_epoch_end(self) -> None:
        index = self.test_index.compute().long()
        order = index.argsort()
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = index[order][1:] != index[order][:-1]
        keep = order[first]
        self.test_outcomes = {
            "index": index[keep].cpu(),
            "prediction": self.test_prediction.compute().long()[keep].cpu(),
            "label": self.test_label.compute().long()[keep].cpu(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Remember which epoch a tested probe comes from and its validation accuracy then."""
        self.checkpoint_epoch = checkpoint.get("epoch")
        for key, state in checkpoint.get("callbacks", {}).items():
            if key.startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
                self.checkpoint_val_acc = float(state["best_model_score"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decayed = getattr(self.head_module, "decayed", None)
        if decayed is None:
            return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)
        chosen = {id(parameter) for parameter in decayed()}
        groups = [
            {"params": [p for p in self.parameters() if id(p) in chosen], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in self.parameters() if id(p) not in chosen], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
