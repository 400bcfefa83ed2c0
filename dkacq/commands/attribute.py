"""``dkacq attribute``: integrated-gradients neuron attribution of a preset over a text set."""

import json
from dataclasses import asdict
from pathlib import Path

import matplotlib.image
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from dkacq.attribution.module import AttributionModule
from dkacq.attribution.throughput import TextThroughputBar
from dkacq.commands.saved_config import SaveConfigBesideOutputs
from dkacq.datamodules.texts import TextDataModule
from dkacq.encoders.presets import PRESETS, get_preset
from dkacq.report.figures import plot_attribution_heatmaps


class DkacqTrainer(Trainer):
    def attribute(self, model: AttributionModule, datamodule: TextDataModule | None = None) -> None:
        """Integrated-gradients attribution of a preset's MLP neurons over a text set."""
        self.predict(model, datamodule=datamodule, return_predictions=False)


class SaveAttributionConfig(SaveConfigBesideOutputs):
    """Writes ``config.yaml`` beside the counts when they are written: not at setup, when the output
    folder has not been checked yet (it may hold another run's results)."""

    def output_folder(self, trainer, pl_module) -> Path:
        return pl_module.output_path

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, "predict")


class AttributionCLI(LightningCLI):
    """``dkacq attribute``: one predict pass over the texts, gradients on, counts written at the end."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"attribute": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.text_side", "model.text_side")
        parser.add_lightning_class_args(TextThroughputBar, "progress_bar")

    def after_attribute(self) -> None:
        """Draw the study's heatmap per threshold beside the counts, log it to TensorBoard, and print
        the output folder."""
        if not self.trainer.is_global_zero:
            return
        folder = self.model.output_path
        board = TensorBoardLogger(folder, name="tensorboard", version="").experiment
        for threshold in self.model.thresholds:
            png = plot_attribution_heatmaps(folder, folder / f"heatmap@{threshold:g}.png", threshold)
            board.add_image(f"active neurons/threshold {threshold:g}", matplotlib.image.imread(png), dataformats="HWC")
        board.close()
        print(folder)


def preset_config(name: str) -> dict:
    """The configuration that ``--model NAME`` stands for: the preset's encoder, modules, thresholds
    and precision, spelled out so that ``--print_config`` shows them."""
    random_init = name.endswith("-random") and name.removesuffix("-random") in PRESETS
    preset = get_preset(name.removesuffix("-random") if random_init else name, random_init)
    return {
        "model": {
            "encoder": asdict(preset),
            "kinds": list(preset.attribution_kinds),
            "thresholds": list(preset.attribution_thresholds),
        },
        "trainer": {"precision": preset.attribution_precision},
    }


def expand_model_shorthand(args: list[str]) -> list[str]:
    """Replace ``--model NAME`` (a preset, or ``NAME-random`` for its random-init control) by the
    configuration it stands for; anything else after ``--model`` is left to the parser."""
    expanded, position = [], 0
    while position < len(args):
        argument = args[position]
        name = None
        if argument == "--model" and position + 1 < len(args):
            name, step = args[position + 1], 2
        elif argument.startswith("--model="):
            name, step = argument.removeprefix("--model="), 1
        if name is not None and (name in PRESETS or name.removesuffix("-random") in PRESETS):
            expanded += ["--config", json.dumps(preset_config(name))]
            position += step
        elif name is not None and not name.lstrip().startswith("{") and not Path(name).exists():
            raise ValueError(f"unknown model '{name}'; choose a preset ({', '.join(PRESETS)}) or <preset>-random")
        else:
            expanded.append(argument)
            position += 1
    return expanded


def run(args: list[str], run: bool = True) -> AttributionCLI:
    """The attribution CLI on ``args``; with ``run=False`` (no subcommand in ``args``) it only parses
    and instantiates, so that a sweep can check every run before starting any."""
    return AttributionCLI(
        AttributionModule,
        TextDataModule,
        trainer_class=DkacqTrainer,
        save_config_callback=SaveAttributionConfig,
        seed_everything_default=42,
        trainer_defaults={"inference_mode": False, "logger": False},
        args=expand_model_shorthand(args),
        run=run,
    )
