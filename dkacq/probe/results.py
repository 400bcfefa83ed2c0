"""ProbeResults: after each test of a probe, its row in ``results.csv`` and its per-example outcomes."""

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from dkacq.formats.results import ProbeCell, upsert_result, write_predictions


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
                weights=" ".join(sorted({identity for side in data.cache_request()["weights"].values() for identity in side.values()})),
                data_fingerprint=data.cache_request()["data_fingerprint"],
                config=self.config_file.relative_to(self.run_dir).as_posix() if self.config_file else "",
                predictions=predictions.as_posix(),
            ),
        )
