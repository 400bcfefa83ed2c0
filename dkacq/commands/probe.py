"""``dkacq fit`` / ``validate`` / ``test``: one linear probe per (head, layer) on cached embeddings."""

import itertools
import shutil
from pathlib import Path

from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from dkacq.commands.saved_config import SaveConfigBesideOutputs
from dkacq.data.probe_datamodule import ProbeDataModule
from dkacq.probe.heads import Head
from dkacq.probe.linear_probe import LinearProbe
from dkacq.probe.results import ProbeResults, cell_name, probe_cell

CHECKPOINT_ROOT = Path("checkpoints")


class SaveProbeConfig(SaveConfigBesideOutputs):
    def output_folder(self, trainer, pl_module) -> Path:
        results = next(callback for callback in trainer.callbacks if isinstance(callback, ProbeResults))
        return results.run_dir


class ProbeCLI(LightningCLI):
    """Probing runs one fit per layer: a fresh probe, trainer and seed for each, so a layer's result
    does not depend on which layers ran before it; memory holds one layer's vectors at a time."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {key: value for key, value in LightningCLI.subcommands().items() if key in ("fit", "validate", "test")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_passages", "model.num_passages")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {"checkpoint.monitor": "val/acc", "checkpoint.mode": "max", "checkpoint.filename": "best", "checkpoint.save_top_k": 1}
        )
        parser.add_lightning_class_args(ProbeResults, "results")
        parser.add_argument(
            "--heads",
            type=list[Head] | None,
            default=None,
            help="Probe heads to run, each on every layer (default: model.head alone).",
        )

    @property
    def results(self) -> ProbeResults:
        return next(callback for callback in self.trainer.callbacks if isinstance(callback, ProbeResults))

    def _cells(self, datamodule: ProbeDataModule, skip_finished: bool = False):
        """Yield the name of each (head, layer) cell to probe, with fresh classes instantiated for it;
        with ``skip_finished``, cells that have a result already are left out."""
        datamodule.prepare_data()
        config = self.config[self.subcommand]
        heads = config.heads or [config.model.head]
        for head, layer in itertools.product(heads, datamodule.probed_layers()):
            self._set_head(head)
            seed_everything(config.seed_everything, workers=True)
            self.instantiate_classes()
            self.datamodule.layer = layer
            cell = probe_cell(self.datamodule, self.model)
            if skip_finished and self.results.finished(cell):
                continue
            name = cell_name(**cell)
            self.trainer.checkpoint_callback.dirpath = str(self._checkpoint_folder(name))
            if self.trainer.logger is not None:
                self.trainer.loggers = [TensorBoardLogger(self.results.run_dir, name="tensorboard", version=name)]
            yield name

    def _checkpoint_folder(self, cell: str) -> Path:
        return CHECKPOINT_ROOT / self.results.run_dir.name / cell

    def _set_head(self, head: str) -> None:
        """Make ``head`` the model's in the parsed config and in the dump that ``save_hyperparameters``
        reads, so that checkpoints record the head they hold."""
        self.config[self.subcommand].model.head = head
        vars(self).pop("config_dump", None)
        self._dump_config()

    def _best_checkpoint(self, cell: str, ckpt_path: str | None) -> str:
        path = Path(ckpt_path) if ckpt_path else self._checkpoint_folder(cell) / "best.ckpt"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no trained probe for {cell}; run dkacq fit with the same config first")
        return str(path)

    def fit(self, model, datamodule, ckpt_path=None, **kwargs) -> None:
        """Fit one probe per cell, keep the best validation epoch, test it and record the result.

        A cell starts from an empty checkpoint folder, so a cell interrupted earlier starts again cleanly.
        """
        for cell in self._cells(datamodule, skip_finished=self.results.skip_finished):
            shutil.rmtree(self._checkpoint_folder(cell), ignore_errors=True)
            self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, **kwargs)
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")
        print(self.results.results_path)

    def validate(self, model, datamodule, ckpt_path=None, **kwargs) -> None:
        for cell in self._cells(datamodule):
            self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=self._best_checkpoint(cell, ckpt_path), **kwargs)

    def test(self, model, datamodule, ckpt_path=None, **kwargs) -> None:
        for cell in self._cells(datamodule):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=self._best_checkpoint(cell, ckpt_path), **kwargs)
        print(self.results.results_path)


def run(args: list[str]) -> ProbeCLI:
    return ProbeCLI(
        LinearProbe,
        ProbeDataModule,
        save_config_callback=SaveProbeConfig,
        seed_everything_default=42,
        trainer_defaults={"max_epochs": 30, "deterministic": True},
        args=args,
    )
