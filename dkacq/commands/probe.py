"""``dkacq fit`` / ``validate`` / ``test``: one linear probe per (head, layer) on cached embeddings."""

import contextlib
import itertools
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dkacq.commands import output, stopping
from dkacq.data.collection import COLLECTION_FORMATS
from dkacq.data.mining import mining_saved
from dkacq.datamodules.probe import AUTO_OPTIONS, LAYERS, ProbeDataModule
from dkacq.encoders.extraction import at_terminal, saved_batches
from dkacq.formats.atomic import atomic_write_text, check_writable
from dkacq.formats.identity import digest, without
from dkacq.formats.results import ProbeCell, check_cells, check_one_setting_per_cell, finished_ids, read_table
from dkacq.formats.retrieval import RETRIEVAL_FILE
from dkacq.probe.baselines import baseline_cells, record_baselines, record_layer_baselines
from dkacq.probe.heads import DECAYED_HEADS, Head
from dkacq.probe.linear_probe import LinearProbe
from dkacq.probe.results import ProbeResults
from dkacq.probe.retrieval import check_planned_retrieval, record_retrieval

CHECKPOINT_ROOT = Path("checkpoints")
CLI_SETTINGS = dict(
    save_config_callback=None,
    seed_everything_default=42,
    trainer_defaults={"max_epochs": 30, "deterministic": True, "enable_model_summary": False},
    parser_kwargs={"prog": output.PROG, "exit_on_error": False},
)
IDENTITY_GROUPS = ("seed_everything", "trainer", "model", "data", "checkpoint", "optimizer", "lr_scheduler")
"""The parsed options that can change a probe's numbers: everything of these groups but ``NOT_IDENTITY``.
The command's own arguments (``heads``, ``ckpt_path``, ``verbose``) and ``results`` are not among them."""
NOT_IDENTITY = (
    "checkpoint.dirpath",
    "checkpoint.filename",
    "checkpoint.save_top_k",
    "checkpoint.verbose",
    "checkpoint.save_last",
    "checkpoint.auto_insert_metric_name",
    "checkpoint.enable_version_counter",
    "trainer.logger",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.enable_checkpointing",
    "trainer.default_root_dir",
    "trainer.log_every_n_steps",
    "trainer.profiler",
    "data.layers",
    "data.train_file",
    "data.test_file",
    "data.path",
    "data.collection.corpus_file",
    "data.collection.queries_file",
    "data.collection.query_batch",
    "data.label",
    "data.backbone",
    "data.collection.retrieval",
    "data.collection.retrieval_limit",
    "data.cache_dir",
    "data.cache_name",
    "data.extraction_batch_size",
    "data.verify_cache",
    "model.hidden_size",
)
"""Options that decide where outputs go or what is shown, never a number: left out of a cell's identity.
Every other option is in it, with the exact weights and data the embedding cache is built from. Data
files are in it by their content (the cache request's data fingerprint), not by how their paths are
spelled: ``df/train.json`` and ``./df/train.json`` are one setting."""


class ProbeCLI(LightningCLI):
    """Probing runs one fit per (head, layer) cell: a fresh probe, trainer and seed for each, so a cell's
    result does not depend on which cells ran before it. Cells run layer by layer, each layer read once
    for all its heads (:func:`run_cells`); memory holds one layer's vectors at a time.

    Every cell is planned and checked (layers against the model's config, the results table for rows of
    other settings) before the embedding cache is built or any probe fitted.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {key: value for key, value in LightningCLI.subcommands().items() if key in ("fit", "validate", "test")}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            output.name_subcommands(self._subcommand_parsers)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_passages", "model.num_passages")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_top_k": 1,
            }
        )
        parser.add_lightning_class_args(ProbeResults, "results")
        parser.add_argument(
            "--heads",
            type=list[Head] | None,
            default=None,
            help="Probe heads to run, each on every layer (default: model.head alone).",
        )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The trainer, with a bar that names the cell (:class:`~dkacq.commands.output.CellProgressBar`)
        where a bar is shown (at a terminal) and the user's callbacks hold none of their own, and the stop at a batch's
        end on SIGTERM or SIGUSR1 (:mod:`~dkacq.commands.stopping`)."""
        options = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        if not at_terminal() and not output.has_own_bar(options):
            options["enable_progress_bar"] = False  # a log file: a line per cell instead (run_cells)
        if output.progress_bar_wanted(options):
            callbacks.append(output.CellProgressBar())
        callbacks.append(stopping.StopAtBatchEnd())
        return self._instantiate_trainer(options, callbacks)

    @property
    def run_config(self):
        """The parsed options of this run (also when built by :func:`build`, without a subcommand)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    @property
    def results(self) -> ProbeResults:
        return next(callback for callback in self.trainer.callbacks if isinstance(callback, ProbeResults))

    def plan(self, writing: bool = True) -> list[ProbeCell]:
        """Every (head, layer) cell of this run with its identity, checked against the results table.

        The table is checked first (dkacq's, not cut short, and, when ``writing``, writable), then the
        probe set, the model's config file and the weights' identity are read; builds nothing.
        """
        read_table(self.results.results_path)
        if writing:
            check_writable(self.results.results_path)
        config, data = self.run_config, self.datamodule
        if data.hparams.source in COLLECTION_FORMATS:  # its probe set may be mined below
            stopping.STATE.doing(lambda: mining_saved(data.probe_set_folder.parent / "mining"))
        options = config.as_dict()
        unset = [f"data.{key}" for key in AUTO_OPTIONS if options["data"].get(key) is None]
        setting = without(
            {group: options[group] for group in IDENTITY_GROUPS if group in options}, NOT_IDENTITY + tuple(unset)
        )
        setting["embeddings"] = data.cache_request()
        data.check_split_sizes()
        heads = config.heads or [config.model.head]
        cells = []
        for head, layer in itertools.product(heads, data.probed_layers()):
            model = setting["model"] | {"head": head}
            if head not in DECAYED_HEADS:  # no number of this head depends on it
                model.pop("weight_decay", None)
            identity = setting | {"model": model, "layer": layer}
            cells.append(
                ProbeCell(
                    data.hparams.dataset,
                    data.preset.label,
                    data.preset.pooling,
                    data.hparams.num_passages,
                    layer,
                    head,
                    identity,
                )
            )
        check_cells(self.results.results_path, cells + baseline_cells(data))
        check_planned_retrieval(data, self.results.run_dir)
        return cells

    def _checkpoint_folder(self, cell: ProbeCell) -> Path:
        """Unique to the run folder and the cell's identity; under ``checkpoint.dirpath`` when given."""
        if self.run_config.checkpoint.dirpath:
            return Path(self.run_config.checkpoint.dirpath) / cell.name
        run_dir = self.results.run_dir
        return CHECKPOINT_ROOT / f"{run_dir.name}-{digest({'run_dir': str(run_dir.resolve())}, 8)}" / cell.name

    def options(self) -> dict:
        """This run's probe config as a plain dict, as ``--print_config`` shows it, without the arguments
        of the subcommand itself (``ckpt_path``, ``verbose``, ``weights_only``)."""
        options = yaml.safe_load(self._parser(self.subcommand).dump(self.run_config, skip_none=False))
        return {key: value for key, value in options.items() if key in (*IDENTITY_GROUPS, "results", "heads")}

    def cell_cli(self, cell: ProbeCell) -> "ProbeCLI":
        """A fresh CLI for one cell, parsed and instantiated from this run's options with the cell's head,
        layer, checkpoint folder and (unless the user chose a logger) TensorBoard version: fresh classes
        and the same seed for every cell."""
        options = self.options()
        options["model"]["head"] = cell.probe
        options["data"]["layers"] = [cell.layer]
        options["checkpoint"]["dirpath"] = str(self._checkpoint_folder(cell))
        if options["trainer"].get("logger") in (None, True):
            options["trainer"]["logger"] = {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {
                    "save_dir": str(self.results.run_dir),
                    "name": "tensorboard",
                    "version": cell.name,
                    "default_hp_metric": False,
                },
            }
        cli = build(options)
        cli.results.cell = cell
        cli.results.config_file = self.results.config_file
        if isinstance(cli.trainer.progress_bar_callback, output.CellProgressBar):
            cli.trainer.progress_bar_callback.cell = cell.label
        return cli

    def _save_config(self) -> None:
        """This run's options, once per setting, beside its results (every row names its file)."""
        text = yaml.safe_dump(self.options(), sort_keys=False)
        data = self.datamodule
        name = f"{data.hparams.dataset}-{data.preset.label}-{data.preset.pooling}-N{data.hparams.num_passages}"
        path = self.results.run_dir / "configs" / f"{name}-{digest({'config': text}, 8)}.yaml"
        if not path.exists():
            atomic_write_text(path, text)
        self.results.config_file = path

    def _best_checkpoint(self, cell: ProbeCell, ckpt_path: str | None) -> str:
        path = Path(ckpt_path) if ckpt_path else self._checkpoint_folder(cell) / "best.ckpt"
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no trained probe for {cell.label} with these settings; run dkacq fit with the same config first"
            )
        return str(path)

    def todo(self) -> list[ProbeCell]:
        """The cells a fit runs: every cell planned and checked, this setting's config saved, the probe
        set and cache built and the cache files the cells read checked, and (with
        ``results.skip_finished``) those the table holds left out, said once, here."""
        cells = self.plan()
        output.checked()
        self._save_config()
        trainer, data = self.run_config.trainer, self.datamodule
        stopping.STATE.doing(lambda: cache_saved(data.embeddings_folder))
        data.prepare_data(
            trainer.accelerator, trainer.devices, trainer.num_nodes, trainer.strategy, [stopping.StopAtBatchEnd()]
        )
        done = finished_ids(self.results.results_path) if self.results.skip_finished else set()
        todo = [cell for cell in cells if cell.id not in done]
        data.open().check(cell.layer for cell in todo)
        if len(todo) < len(cells):
            skipped = len(cells) - len(todo)
            output.say(
                f"{skipped} of {len(cells)} cells skipped: {self.results.results_path} holds their results "
                f"from these settings (results.skip_finished)"
            )
        return todo

    def settings(self) -> list["ProbeCLI"]:
        """This setting and, with ``data.backbone``, the backbone's: the same options with the backbone's
        weights, read with this model's settings and labelled ``<backbone>@<label>`` (a pair that
        ``dkacq report`` draws and tests)."""
        backbone = self.datamodule.backbone_options()
        if backbone is None:
            return [self]
        options = self.options()
        options["data"] |= backbone
        return [self, build(options)]

    def planned(self, writing: bool = True) -> list[tuple["ProbeCLI", ProbeCell]]:
        """Every (setting, cell) of :meth:`settings`, checked against the table and against each other
        before any work (:meth:`plan`)."""
        settings = self.settings()
        jobs = [(cli, cell) for cli in settings for cell in cli.plan(writing)]
        check_one_setting_per_cell(
            [cell for _, cell in jobs] + [c for cli in settings for c in baseline_cells(cli.datamodule)]
        )
        return jobs

    def fit_cells(self, ckpt_path: str | None = None, share_layers: bool = True, **kwargs) -> None:
        """Fit one probe per cell, keep the best validation epoch, test it and record the result
        (:func:`fit_settings` of this setting, and its backbone's)."""
        settings = self.settings()
        if len(settings) > 1:
            self.planned()
        fit_settings(settings, ckpt_path, share_layers, **kwargs)

    def fit(self, model, datamodule, ckpt_path=None, **kwargs) -> None:
        self.fit_cells(ckpt_path, **kwargs)

    def validate(self, model, datamodule, ckpt_path=None, **kwargs) -> None:
        jobs = self.planned(writing=False)
        output.checked()

        kwargs["verbose"] = False  # no boxed table per cell: run_cells says each in a line

        def validate(parent: "ProbeCLI", cell: ProbeCell, cli: "ProbeCLI") -> list[dict]:
            return cli.trainer.validate(
                cli.model, datamodule=cli.datamodule, ckpt_path=parent._best_checkpoint(cell, ckpt_path), **kwargs
            )

        run_cells(jobs, validate)

    def test(self, model, datamodule, ckpt_path=None, **kwargs) -> None:
        jobs = self.planned()
        output.checked()
        for cli in dict.fromkeys(parent for parent, _ in jobs):
            cli._save_config()

        kwargs["verbose"] = False

        def test(parent: "ProbeCLI", cell: ProbeCell, cli: "ProbeCLI") -> list[dict]:
            return cli.trainer.test(
                cli.model, datamodule=cli.datamodule, ckpt_path=parent._best_checkpoint(cell, ckpt_path), **kwargs
            )

        run_cells(jobs, test)
        print(self.results.results_path)


def run_cells(
    jobs: list[tuple[ProbeCLI, ProbeCell]],
    action: Callable[[ProbeCLI, ProbeCell, ProbeCLI], list[dict]],
    share_layers: bool = True,
) -> None:
    """Run ``action(setting, cell, cell_cli)`` with a fresh CLI (:meth:`ProbeCLI.cell_cli`) for each
    (setting, cell) of ``jobs``; each cell is said on a line of its own when it is done, with the
    accuracies ``action`` returns (what ``trainer.test`` or ``validate`` return) and its time
    (``[3/14] demo minilm mean N=5 layer 2 concat: test acc 0.412, 2.3 s``); at a terminal also when
    it starts, above its bar.

    With ``share_layers`` the cells run layer by layer (every setting and head of layer 0, then of
    layer 1, ...) and each layer's vectors are read once for all of them (:data:`LAYERS`); a cell's
    numbers do not depend on the order, as each is built and seeded afresh. Without it each cell reads
    its own layer, in the order given (what dkacq did before, kept for ``benchmarks/probe_sweep.py``).
    Memory holds one layer's vectors at a time either way: each cell's data is released when it is done.
    """
    if share_layers:
        jobs = sorted(jobs, key=lambda job: job[1].layer)  # stable: settings, then heads, within a layer
    tables = ", ".join(dict.fromkeys(str(parent.results.results_path) for parent, _ in jobs))
    finished = 0
    stopping.STATE.doing(lambda: f"{finished} of {len(jobs)} probe cells done, each recorded in {tables}")
    with LAYERS.sharing() if share_layers else contextlib.nullcontext():
        for number, (parent, cell) in enumerate(jobs, 1):
            started = time.perf_counter()
            if at_terminal():
                output.say(f"[{number}/{len(jobs)}] {cell.label}")
            cli = parent.cell_cli(cell)
            try:
                metrics = action(parent, cell, cli)
            finally:
                cli.datamodule.release()
                del cli
            finished += 1
            output.say(output.cell_line(number, len(jobs), cell.label, metrics, time.perf_counter() - started))


def cache_saved(folder: Path) -> str:
    """What a stopped cache build has saved, for the stop line (:mod:`~dkacq.commands.stopping`)."""
    found = saved_batches(folder)
    if found is None:
        return f"the embedding cache {folder} was being prepared; nothing of it is written yet"
    staging, done, total = found
    return f"the embedding cache {folder} was being built: {done:,} of {total:,} batches are saved in {staging}"


def fit_settings(clis: list[ProbeCLI], ckpt_path: str | None = None, share_layers: bool = True, **kwargs) -> None:
    """Fit every cell of one or more settings (a sweep's N values of a setting, which share a cache),
    reading each layer once for all of them (:func:`run_cells`).

    Every setting is checked, its config saved and its cache built before the first probe is fitted. A
    cell starts from an empty checkpoint folder, so a cell interrupted earlier starts again cleanly;
    after its fit the best validation epoch is tested and its result recorded. Each results table is
    printed once, at the end.
    """
    jobs = [(cli, cell) for cli in clis for cell in cli.todo()]
    done = {id(cli): finished_ids(cli.results.results_path) if cli.results.skip_finished else set() for cli in clis}

    def fit(parent: ProbeCLI, cell: ProbeCell, cli: ProbeCLI) -> list[dict]:
        shutil.rmtree(parent._checkpoint_folder(cell), ignore_errors=True)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, **kwargs)
        metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
        if not hasattr(cli.datamodule, "datasets"):  # set up in the ranks a spawning strategy started, not here
            cli.datamodule.setup("test")
        record_layer_baselines(cli.datamodule, parent.results.run_dir, done[id(parent)], parent.results.config_file)
        return metrics

    run_cells(jobs, fit, share_layers)
    for cli in clis:  # settings or layers whose probes were all finished earlier: their baselines, once
        record_baselines(cli.datamodule, cli.results.run_dir, skip_finished=True, config_file=cli.results.config_file)
        stopping.STATE.doing(lambda cli=cli: f"the probe rows are in {cli.results.results_path}; no retrieval row yet")
        measured = record_retrieval(cli.datamodule, cli.results.run_dir)  # a collection's layers as retrievers, once
        if measured:
            first = measured[0]
            output.say(
                f"retrieval: {len(measured)} rows ({first['num_queries']:,} test queries, scope {first['scope']}, "
                f"{first['num_passages']:,} passages) in {first['seconds']} s -> {cli.results.run_dir / RETRIEVAL_FILE}"
            )
    for path in dict.fromkeys(cli.results.results_path for cli in clis):
        print(path)


def build(options: dict) -> ProbeCLI:
    """The probe CLI parsed from a config dict and instantiated, without running a subcommand: what
    every cell and the sweep use, so that their configs go through the same classes as ``dkacq fit``'s."""
    output.quiet()
    return ProbeCLI(LinearProbe, ProbeDataModule, args=options, run=False, **CLI_SETTINGS)


def run(args: list[str]) -> ProbeCLI:
    output.quiet(new_command=True)
    return ProbeCLI(LinearProbe, ProbeDataModule, args=args, **CLI_SETTINGS)
