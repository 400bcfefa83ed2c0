"""Each run's parsed configuration saved beside its outputs, so every result can be rerun exactly."""

from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from dkacq.formats.atomic import atomic_write_text


class SaveConfigBesideOutputs(SaveConfigCallback):
    """Writes ``config.yaml`` into the run's output folder, whole or not at all.

    Lightning's default writes it into the logger's folder, which is the working directory when
    logging is off; subclasses say where a command's outputs are.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def output_folder(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        raise NotImplementedError

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        atomic_write_text(self.output_folder(trainer, pl_module) / self.config_filename, text)
