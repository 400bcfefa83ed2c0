"""ProbeResults: after each test of a probe, its row in ``results.csv`` and its per-example outcomes,
and in TensorBoard the cell's hyperparameters with its best validation accuracy and the run's curves."""

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from dkacq.formats.atomic import file_lock
from dkacq.formats.results import ProbeCell, read_rows, upsert_result, write_predictions

SUMMARY = "summary"
"""The TensorBoard run, beside the cells' runs, that holds accuracy against layer (:func:`write_summary`)."""
CURVE_COLUMNS = ("test_acc", "val_acc")


class ProbeResults(Callback):
    """Records the tested probe of :attr:`cell` (set by the command for each cell it runs)."""

    def __init__(self, run_dir: str = "runs/probe", skip_finished: bool = False):
        """
        Args:
            run_dir: the run's output folder: ``results.csv``, ``predictions/``, ``configs/`` and
                TensorBoard logs.
            skip_finished: leave out cells that ``results.csv`` holds from the same settings (to resume
                an interrupted run); otherwise such a cell is fitted again and its row replaced. A cell
                held from other settings is refused either way.
        """
        self.run_dir = Path(run_dir)
        self.skip_finished = skip_finished
        self.cell: ProbeCell | None = None
        self.config_file: Path | None = None

    @property
    def results_path(self) -> Path:
        return self.run_dir / "results.csv"

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        data, outcomes, cell = trainer.datamodule, pl_module.test_outcomes, self.cell
        correct = (outcomes["prediction"] == outcomes["label"]).to(torch.uint8)
        predictions = Path("predictions") / f"{cell.name}.safetensors"
        write_predictions(self.run_dir / predictions, {"correct": correct, **outcomes}, cell.identity)
        sizes, hparams = data.split_sizes(), data.hparams
        upsert_result(
            self.results_path,
            cell,
            dict(
                best_epoch=pl_module.checkpoint_epoch if pl_module.checkpoint_epoch is not None else "",
                val_acc=f"{pl_module.checkpoint_val_acc:.5f}" if pl_module.checkpoint_val_acc is not None else "",
                test_acc=f"{correct.float().mean().item():.5f}",
                num_train=sizes["train"],
                num_val=sizes["val"],
                num_test=sizes["test"],
                preset=data.preset.name,
                random_init=int(data.preset.random_init),
                init_seed=data.preset.seed if data.preset.random_init else "",
                standardize=int(hparams.standardize),
                max_examples=hparams.max_examples or "",
                max_epochs=trainer.max_epochs,
                learning_rate=pl_module.hparams.learning_rate,
                batch_size=hparams.batch_size,
                val_fraction=hparams.val_fraction,
                seed=hparams.seed,
                precision=trainer.precision,
                weights=" ".join(
                    sorted(
                        {identity for side in data.cache_request()["weights"].values() for identity in side.values()}
                    )
                ),
                data_fingerprint=data.cache_request()["data_fingerprint"],
                config=self.config_file.relative_to(self.run_dir).as_posix() if self.config_file else "",
                predictions=predictions.as_posix(),
            ),
        )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                self._log_cell(logger, trainer, pl_module)
                write_summary(self.results_path, Path(logger.root_dir) / SUMMARY)

    def _log_cell(self, logger: TensorBoardLogger, trainer: Trainer, pl_module: LightningModule) -> None:
        """The cell's hyperparameters (the data's and the probe's, its layer and ``cell_id``) with
        ``hp_metric``, the validation accuracy of the tested epoch: the number a sweep over settings
        compares in TensorBoard's HPARAMS tab."""
        cell = self.cell
        params = {**dict(trainer.datamodule.hparams), **dict(pl_module.hparams)}
        params = {key: value for key, value in params.items() if not key.startswith("_")}  # LightningCLI's own
        params |= {"layer": cell.layer, "pooling": cell.pooling, "cell_id": cell.id}
        best = pl_module.checkpoint_val_acc
        logger.log_hyperparams(params, {"hp_metric": best} if best is not None else None)


def write_summary(results_path: Path, folder: Path) -> None:
    """Every row of the results table as TensorBoard scalars ``test_acc/<dataset>/<model>/<pooling>/N<n>/<head>``
    (and ``val_acc/...``) at step = layer: accuracy against layer, the study's curves, in TensorBoard.

    Written again from the whole table (under its lock) each time a row is recorded, so that it shows
    exactly what the table holds: a replaced row is not shown twice.
    """
    from torch.utils.tensorboard import SummaryWriter

    with file_lock(results_path):
        rows = sorted(read_rows(results_path), key=lambda row: int(row["layer"]))
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
