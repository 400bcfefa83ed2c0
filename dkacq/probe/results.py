"""ProbeResults: after each test of a probe, its row in ``results.csv`` and its per-example outcomes,
and in TensorBoard the cell's hyperparameters with its best validation accuracy and the run's curves.

The row also says how the fit went (``formats.results.CONVERGENCE_COLUMNS``): epochs trained, optimizer
steps, the fit's wall time, the early stopping rule if any, and whether the tested checkpoint (the best
validation epoch) was the last epoch validated, a sign that more epochs might have helped.
"""

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.tensorboard.summary import hparams

from dkacq.formats.atomic import file_lock
from dkacq.formats.results import (
    CONVERGENCE_COLUMNS,
    ProbeCell,
    accuracy_values,
    read_rows,
    upsert_result,
    write_predictions,
)

SUMMARY = "summary"
"""The TensorBoard run, beside the cells' runs, that holds accuracy against layer (:func:`write_summary`)."""
CURVE_COLUMNS = ("test_acc", "val_acc")


class ProbeResults(Callback):
    """Records the tested probe of :attr:`cell` (set by the command for each cell it runs)."""

    def __init__(self, run_dir: str = "runs/probe", skip_finished: bool = True):
        """
        Args:
            run_dir: the run's output folder: ``results.csv``, ``predictions/``, ``configs/`` and
                TensorBoard logs.
            skip_finished: leave out cells that ``results.csv`` holds from the same settings, so that a
                stopped run resumes when run again (a cell's numbers depend on nothing but its identity);
                false fits such a cell again and replaces its row. A cell held from other settings is
                refused either way.
        """
        self.run_dir = Path(run_dir)
        self.skip_finished = skip_finished
        self.cell: ProbeCell | None = None
        self.config_file: Path | None = None
        self.validated_epochs: list[int] = []
        """Epochs validated during this callback's last fit (sanity checks left out)."""
        self.fit_record: dict[str, str] | None = None
        """How the last fit went, as table values; None when this callback saw no fit (``dkacq test``)."""
        self._fit_started: float | None = None

    @property
    def results_path(self) -> Path:
        return self.run_dir / "results.csv"

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.validated_epochs, self.fit_record, self._fit_started = [], None, time.perf_counter()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self.validated_epochs.append(trainer.current_epoch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        seconds = time.perf_counter() - self._fit_started if self._fit_started is not None else None
        self.fit_record = dict(
            epochs_run=str(trainer.current_epoch),
            optimizer_steps=str(trainer.global_step),
            fit_seconds=f"{seconds:.2f}" if seconds is not None else "",
            early_stopping="; ".join(
                f"{callback.monitor} {callback.mode}, patience {callback.patience}"
                for callback in trainer.early_stopping_callbacks
            ),
        )

    def convergence_values(self, pl_module: LightningModule) -> dict[str, str]:
        """The row's :data:`~dkacq.formats.results.CONVERGENCE_COLUMNS` from the fit this callback saw
        (all blank when it saw none: the tested checkpoint then comes from an earlier run)."""
        if self.fit_record is None:
            return {column: "" for column in CONVERGENCE_COLUMNS}
        last = best_is_last(self.validated_epochs, pl_module.checkpoint_epoch)
        return {**self.fit_record, "best_is_last": "" if last is None else str(int(last))}

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        data, outcomes, cell = trainer.datamodule, pl_module.test_outcomes, self.cell
        correct = (outcomes["prediction"] == outcomes["label"]).to(torch.uint8)
        predictions = Path("predictions") / f"{cell.name}.safetensors"
        write_predictions(self.run_dir / predictions, {"correct": correct, **outcomes}, cell.identity)
        hparams, probe = data.hparams, pl_module.hparams
        upsert_result(
            self.results_path,
            cell,
            dict(
                best_epoch=pl_module.checkpoint_epoch if pl_module.checkpoint_epoch is not None else "",
                val_acc=f"{pl_module.checkpoint_val_acc:.5f}" if pl_module.checkpoint_val_acc is not None else "",
                **accuracy_values(correct),
                **self.convergence_values(pl_module),
                rank=probe.get("rank", "") if probe.get("head") in ("bilinear", "residual_bilinear") else "",
                normalize=int(bool(probe.get("normalize", False))),
                **setting_values(data),
                standardize=int(hparams.standardize),
                max_epochs=trainer.max_epochs,
                learning_rate=pl_module.hparams.learning_rate,
                batch_size=hparams.batch_size,
                precision=trainer.precision,
                config=self.config_file.relative_to(self.run_dir).as_posix() if self.config_file else "",
                predictions=predictions.as_posix(),
            ),
            keep=CONVERGENCE_COLUMNS,
        )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                self._log_cell(logger, trainer, pl_module, float(correct.float().mean()))
                write_summary(self.results_path, Path(logger.root_dir) / SUMMARY)

    def _log_cell(
        self, logger: TensorBoardLogger, trainer: Trainer, pl_module: LightningModule, test_acc: float
    ) -> None:
        """The cell's hyperparameters (the data's and the probe's, its layer and ``cell_id``) in
        TensorBoard's HPARAMS tab with two metrics by name: ``test/acc``, the tested checkpoint's test
        accuracy, and ``val/acc_best``, the validation accuracy of that (best) epoch: what a sweep over
        settings compares. Options left unset show as empty, not as "None"."""
        cell = self.cell
        params = {**dict(trainer.datamodule.hparams), **dict(pl_module.hparams)}
        params = {key: value for key, value in params.items() if not key.startswith("_")}  # LightningCLI's own
        params |= {"layer": cell.layer, "pooling": cell.pooling, "cell_id": cell.id}
        logger.log_hyperparams(params)  # hparams.yaml, unset options as null
        best = pl_module.checkpoint_val_acc
        metrics = {"test/acc": test_acc, "val/acc_best": float("nan") if best is None else best}
        logger.log_metrics({"val/acc_best": metrics["val/acc_best"]}, step=trainer.global_step)
        shown = {key: "" if value is None else value for key, value in _flatten_dict(_convert_params(params)).items()}
        writer = logger.experiment._get_file_writer()
        for summary in hparams(logger._sanitize_params(shown), metrics):
            writer.add_summary(summary, trainer.global_step)


def setting_values(data) -> dict:
    """The table values a set-up ``ProbeDataModule`` decides: split sizes, the preset and its weights,
    the data's fingerprint, and the data options every row shows (for probes and baselines alike)."""
    sizes, hparams, request = data.split_sizes(), data.hparams, data.cache_request()
    return dict(
        num_train=sizes["train"],
        num_val=sizes["val"],
        num_test=sizes["test"],
        preset=data.preset.name,
        random_init=int(data.preset.random_init),
        init_seed=data.preset.seed if data.preset.random_init else "",
        max_examples=hparams.max_examples or "",
        val_fraction=hparams.val_fraction,
        seed=hparams.seed,
        weights=" ".join(sorted({identity for side in request["weights"].values() for identity in side.values()})),
        data_fingerprint=request["data_fingerprint"],
    )


def best_validation_epoch(history: Sequence[float], mode: str = "max") -> int:
    """The epoch a ``ModelCheckpoint`` of this ``mode`` keeps from a history of validation values
    (one per epoch, epoch 0 first): the first best one, since only a strict improvement replaces it."""
    if not history:
        raise ValueError("no validation epochs")
    best = 0
    for epoch, value in enumerate(history):
        if (value > history[best]) if mode == "max" else (value < history[best]):
            best = epoch
    return best


def best_is_last(validated_epochs: Sequence[int], best_epoch: int | None) -> bool | None:
    """Whether the best validation epoch (the tested checkpoint's) is the last epoch validated: the
    probe might still have been improving when training stopped. None when either is unknown."""
    if best_epoch is None or not validated_epochs:
        return None
    return best_epoch == max(validated_epochs)


def write_summary(results_path: Path, folder: Path) -> None:
    """Every row of the results table as TensorBoard scalars ``test_acc/<dataset>/<model>/<pooling>/N<n>/<head>``
    (and ``val_acc/...``) at step = layer: accuracy against layer, the study's curves, in TensorBoard.
    Untrained similarity baselines are curves too; rows that are not at a layer (``layer`` < 0, the
    query-blind shortcut of :mod:`dkacq.probe.baselines`) are left out.

    Written again from the whole table (under its lock) each time a row is recorded, so that it shows
    exactly what the table holds: a replaced row is not shown twice.
    """
    from torch.utils.tensorboard import SummaryWriter

    with file_lock(results_path):
        rows = sorted(
            (row for row in read_rows(results_path) if int(row["layer"]) >= 0), key=lambda row: int(row["layer"])
        )
        folder.mkdir(parents=True, exist_ok=True)
        earlier = list(folder.glob("events.out.tfevents.*"))
        writer = SummaryWriter(str(folder))
        try:
            for row in rows:
                curve = f"{row['dataset']}/{row['model']}/{row['pooling']}/N{row['num_passages']}/{row['probe']}"
                for column in CURVE_COLUMNS:
                    if row.get(column):
                        writer.add_scalar(f"{column}/{curve}", float(row[column]), global_step=int(row["layer"]))
        finally:
            writer.close()
        for path in earlier:
            path.unlink(missing_ok=True)
