"""Each run's parsed configuration saved beside its outputs, so every result can be rerun exactly."""

from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback


class SaveConfigBesideOutputs(SaveConfigCallback):
    """Writes ``config.yaml`` into the run's output folder.

    Lightning's default writes it into the logger's folder, which is the working directory when
    logging is off; subclasses say where a command's outputs are.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def output_folder(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        raise NotImplementedError

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = self.output_folder(trainer, pl_module)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, folder / self.config_filename, skip_none=False, overwrite=True, multifile=self.multifile)
