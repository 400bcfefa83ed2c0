"""``dkacq attribute``: integrated-gradients neuron attribution of a preset over a text set."""

import re
from dataclasses import asdict
from pathlib import Path

import matplotlib.image
from jsonargparse._actions import _ActionConfigLoad
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from dkacq.attribution.module import AttributionModule
from dkacq.attribution.passes import check_fits
from dkacq.attribution.throughput import TextThroughputBar
from dkacq.commands import output, stopping
from dkacq.commands.saved_config import SaveConfigBesideOutputs
from dkacq.datamodules.texts import TextDataModule
from dkacq.encoders.loading import model_config
from dkacq.encoders.memory import free_bytes
from dkacq.encoders.presets import PRESETS, named_preset
from dkacq.formats.atomic import check_writable
from dkacq.formats.counts import PROGRESS_DIR, SUMMARY_FILE, read_segments
from dkacq.report.attribution_figures import plot_attribution_heatmaps


class DkacqTrainer(Trainer):
    def attribute(self, model: AttributionModule, datamodule: TextDataModule | None = None) -> None:
        """Integrated-gradients attribution of a preset's MLP neurons over a text set."""
        stopping.STATE.doing(lambda: attribution_saved(model, datamodule))
        self.predict(model, datamodule=datamodule, return_predictions=False)
        if not model.written:  # every text was counted by an interrupted run: Lightning ran no epoch
            model.write_results()


def attribution_saved(model: AttributionModule, data: TextDataModule) -> str:
    """What a stopped attribution run has saved, for the stop line (:mod:`~dkacq.commands.stopping`)."""
    folder = model.output_path
    texts = sum(len(segment.texts) for segment in read_segments(folder))
    return f"{texts:,} of {len(data.texts):,} texts are counted and saved in {folder / PROGRESS_DIR}"


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

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            output.name_subcommands(self._subcommand_parsers)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        accept_preset_names(parser)
        parser.link_arguments("data.text_side", "model.text_side")
        parser.add_lightning_class_args(TextThroughputBar, "progress_bar")

    def before_instantiate_classes(self) -> None:
        """``trainer.precision`` not given: the encoder's attribution precision (``bf16-true`` for the 7B
        presets), whether the encoder came from ``--model NAME``, a config file or the sweep."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.precision is None:
            config.trainer.precision = config.model.encoder.attribution_precision

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The trainer, with the ``progress_bar`` options' bar only where a bar is shown and the user's
        callbacks hold none of their own (Lightning refuses a bar with ``enable_progress_bar`` false)."""
        options = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        if not output.progress_bar_wanted(options):
            callbacks = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
        callbacks.append(stopping.StopAtBatchEnd())
        return self._instantiate_trainer(options, callbacks)

    def finished(self) -> bool:
        """Whether the output folder holds this run's counts already; refuses (one line) a folder that
        holds counts of other settings, and one the run cannot write in. Reads the texts, not the model."""
        data = self.datamodule
        data.prepare_data()
        data.setup("predict")
        identity = self.model.identity(data, str(self.trainer.precision))
        folder = self.model.output_path_for(data)
        done = self.model.finished(folder, identity)
        if not done:
            check_writable(folder / SUMMARY_FILE)
        return done

    def before_attribute(self) -> None:
        """Check the output folder (and read the texts) and the GPU's memory before the model is loaded; then start."""
        self.finished()
        self.check_memory()
        output.checked()

    def check_memory(self) -> None:
        """On a GPU, refuse in one line a run whose weights, batch of texts and one replica cannot fit at all."""
        device = self.trainer.strategy.root_device
        if device.type != "cuda":
            return
        model = self.model
        dtype = model.weights_dtype(str(self.trainer.precision))
        texts, tokens = self.datamodule.hparams.batch_size, model.max_length
        check_fits(model.preset.label, model_config(model.source), dtype, texts, tokens, device, free_bytes(device))

    def run_attribution(self) -> None:
        """Attribute and draw, as ``dkacq attribute`` does (for a CLI built by :func:`build`)."""
        self.trainer.attribute(self.model, datamodule=self.datamodule)
        self.after_attribute()

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
    """The ``model`` options that the preset ``name`` stands for: its encoder, modules and thresholds,
    spelled out so that ``--print_config`` shows them (``trainer.precision`` follows the encoder when it
    is not given: :meth:`AttributionCLI.before_instantiate_classes`)."""
    preset = named_preset(name)
    return {
        "encoder": asdict(preset),
        "kinds": list(preset.attribution_kinds),
        "thresholds": list(preset.attribution_thresholds),
    }


class PresetOrConfig(_ActionConfigLoad):
    """``--model``, and ``model:`` in a config file: a preset's name (``repllama``; ``<preset>-random`` or
    ``<preset>-random-seed<k>`` for its random-init control), or what LightningCLI's ``--model`` takes (a
    config file or mapping). jsonargparse resolves a class group's value in this one method, for the
    command line, config files and the sweep's mappings alike, so the name is resolved here. A preset's
    name wins over a file of that name in the working folder (``./NAME`` is the file)."""

    def _load_config(self, value, parser):
        if isinstance(value, str) and _names_a_preset(value):
            value = preset_config(value)
        return super()._load_config(value, parser)


def _names_a_preset(value: str) -> bool:
    """Whether ``value`` is a preset's name. A bare word (letters, digits, ``-``, ``_``) that is neither a
    preset nor a file is refused with the presets' names, not left to the parser's message about files."""
    try:
        named_preset(value)
    except ValueError:
        if re.fullmatch(r"[\w-]+", value) and not Path(value).exists():
            raise
        return False
    return True


def accept_preset_names(parser: LightningArgumentParser) -> None:
    """Let the parser's ``--model`` take a preset name (:class:`PresetOrConfig`). LightningCLI adds the
    model group's config action itself; its class is the one thing changed, so help, ``--print_config``
    and nested config files work as for any class group."""
    action = parser._option_string_actions["--model"]
    if type(action) is not _ActionConfigLoad:
        raise TypeError(f"--model is a {type(action).__name__}; dkacq expects jsonargparse's class-group action")
    action.__class__ = PresetOrConfig
    action.metavar = "NAME|CONFIG"
    action.help = (
        f"a preset ({', '.join(PRESETS)}; NAME-random[-seedK] for its random-init control), "
        "or a config file or mapping of the options below"
    )


CLI_SETTINGS = dict(
    trainer_class=DkacqTrainer,
    save_config_callback=SaveAttributionConfig,
    seed_everything_default=42,
    trainer_defaults={"inference_mode": False, "logger": False},
    parser_kwargs={"prog": output.PROG, "exit_on_error": False},
)


def build(options: dict | list[str]) -> AttributionCLI:
    """The attribution CLI parsed from a config dict (or command-line arguments) and instantiated, without
    running: what the sweep uses, so that its configs go through the same classes as ``dkacq attribute``'s."""
    output.quiet()
    return AttributionCLI(AttributionModule, TextDataModule, args=options, run=False, **CLI_SETTINGS)


def run(args: list[str]) -> AttributionCLI:
    output.quiet(new_command=True)
    return AttributionCLI(AttributionModule, TextDataModule, args=args, **CLI_SETTINGS)
