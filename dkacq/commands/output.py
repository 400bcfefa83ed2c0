"""What a command shows: the libraries' noise left out, one device line, a line per cell, bars that name it.

:func:`quiet` filters what Lightning, torch, transformers, peft and jsonargparse print that a dkacq user
can do nothing about: Lightning's tips, its device lines and seed line repeated for every trainer (one
per probe cell and two for the cache), checkpoint-restoring lines, transformers' load reports, and
third-party deprecation warnings. dkacq's own warnings and every error still show.
"""

import logging
import re
import sys
import warnings

from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from lightning.pytorch.utilities.rank_zero import rank_zero_module, rank_zero_only

PROG = "dkacq"

DROPPED = (
    "💡 Tip:",
    "Restoring states from the checkpoint path",
    "Loaded model weights from the checkpoint",
    "`Trainer.fit` stopped: `max_epochs=",
    "Received SIGTERM:",
    "Bypassing SIGTERM:",
    "TPU available: False",
    "HPU available: False",
)
"""Lightning's info lines that never help a dkacq user: advertisements, which file a cell's best epoch
is restored from (the command names the cell; ``results.csv`` and the checkpoint folder say the rest),
that a fit ran the epochs it was asked for (its bar says so; other reasons to stop still show), and
Lightning's note of a SIGTERM (the command says in one line what a signal stopped and what is saved), and
the TPU and HPU lines of a machine without them (the GPU line is the one accelerator line)."""
DROPPED_WITHIN = ("LOAD REPORT",)
"""transformers' table of the weights a load did not match (``BertModel LOAD REPORT``, e.g. a pooler the
encoder does not use): ``encoders/loading.py`` checks every load itself and refuses, in one line that names
the weights, one that leaves a weight of the encoder unloaded, so the table is noise or a repeat."""
ONCE = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "LOCAL_RANK:",
    "You are using a CUDA device",
    "Seed set to",
)
"""Info lines Lightning repeats for every trainer (a probe cell, each side of the cache): the first of
each wording is shown, each repeat left out."""
LIBRARY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
    "lightning.fabric.utilities.seed",
    "lightning.pytorch.accelerators.cuda",
    "lightning.pytorch.trainer.connectors.signal_connector",
    "transformers.modeling_utils",
    "transformers.modeling_layers",
    "transformers.utils.loading_report",
)
"""Loggers whose records carry those lines. A filter on a logger sees the records created there (not
those of its children), so each is named."""
THIRD_PARTY = r"(lightning|lightning_fabric|lightning_utilities|pytorch_lightning|torch|torchmetrics|transformers|peft|jsonargparse|datasets|huggingface_hub|tensorboard)(\.|$)"
"""Modules whose deprecation and future warnings are about their own internals or the libraries they call:
news for dkacq's maintainers (who pin the versions), not something a user can act on."""
NOISE = (
    r".*does not have many workers",
    r".*is smaller than the logging interval",
    r"LightningCLI's args parameter is intended",
    r"`training_step` returned `None`",
)
"""Lightning's user warnings that do not apply: dkacq's probe batches are tensors already in memory (no
worker would help), the probe logs its training loss per epoch as well as per step, and the commands
hand LightningCLI their arguments on purpose (``dkacq`` runs them from Python), and the
``residual_bilinear`` probe takes no step in its epoch 0 on purpose (``probe/linear_probe.py``)."""
_RANK = re.compile(r"^\[rank: \d+\] ")


class LibraryNoise(logging.Filter):
    """Leaves out :data:`DROPPED` lines and repeats of :data:`ONCE` lines (from :meth:`reset` on).

    From :meth:`reset` until :meth:`release`, the first :data:`ONCE` lines are held back: a command
    checks its options and inputs after Lightning has built its trainer, and a command refused by those
    checks then prints its one-line error alone; one that passes them shows the lines when it starts work.
    """

    def __init__(self):
        super().__init__("")
        self.seen: set[str] = set()
        self.held: list[logging.LogRecord] | None = None

    def reset(self) -> None:
        self.seen.clear()
        self.held = []

    def release(self) -> None:
        """Show the held lines, in order, and hold no more."""
        held, self.held = self.held or [], None
        for record in held:
            logging.getLogger(record.name).callHandlers(record)

    def filter(self, record: logging.LogRecord) -> bool:
        message = _RANK.sub("", record.getMessage())
        if message.startswith(DROPPED) or any(text in message for text in DROPPED_WITHIN):
            return False
        if message.startswith(ONCE):
            if message in self.seen:
                return False
            self.seen.add(message)
            if self.held is not None:
                self.held.append(record)
                return False
        return True


FILTER = LibraryNoise()


def quiet(new_command: bool = False) -> None:
    """Install :data:`FILTER` on the libraries' loggers and the warnings filters; idempotent.

    ``new_command`` starts a command (``run``): its first device line shows again. Building a CLI per
    cell (``build``) leaves the lines already shown out.
    """
    if new_command:
        FILTER.reset()
        # The rank a command starts with is the launcher's (0 unless a DDP launcher, srun or torchrun
        # started this process); a trainer of an earlier command in this process may have left another.
        rank_zero_only.rank = _get_rank() or 0
    loggers = {logging.getLogger(name) for name in LIBRARY_LOGGERS} | {rank_zero_module.log}
    for logger in loggers:
        if FILTER not in logger.filters:
            logger.addFilter(FILTER)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)
    for message in NOISE:
        warnings.filterwarnings("ignore", message=message)


def checked() -> None:
    """The command's checks passed and its work starts: show the device lines held back until now."""
    FILTER.release()


def say(line: str) -> None:
    """A line of the command's own progress on stdout, where the bars are (once, from rank zero)."""
    if rank_zero_only.rank == 0:
        print(line, file=sys.stdout, flush=True)


def has_own_bar(trainer_options: dict) -> bool:
    """Whether the user's callbacks hold a progress bar of their own."""
    callbacks = trainer_options.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return any(isinstance(callback, ProgressBar) for callback in callbacks)


def progress_bar_wanted(trainer_options: dict) -> bool:
    """Whether a trainer of these options shows a bar of dkacq's: the bar is enabled and the user's
    callbacks hold no progress bar of their own."""
    return trainer_options.get("enable_progress_bar") is not False and not has_own_bar(trainer_options)


def cell_line(number: int, total: int, label: str, metrics: list[dict] | None, seconds: float) -> str:
    """``[3/21] demo minilm mean N=5 layer 2 concat: test acc 0.412, 2.3 s``: a cell when it is done."""
    values = [
        f"{key.replace('/', ' ')} {value:.3f}"
        for row in metrics or []
        for key, value in row.items()
        if key.endswith("/acc")
    ]
    return f"[{number}/{total}] {label}: {', '.join([*values, f'{seconds:.1f} s'])}"


def name_subcommands(parsers: dict) -> None:
    """``usage: dkacq fit ...`` in help and errors, where jsonargparse writes ``dkacq [options] fit``
    (``dkacq`` takes no options before its command)."""
    for name, parser in parsers.items():
        parser.prog = f"{PROG} {name}"


class CellProgressBar(TQDMProgressBar):
    """TQDM's bar for one probe cell, named by the cell where Lightning shows ``Epoch 3`` and the logger's
    version (``v_num``)::

        demo minilm mean N=5 layer 2 concat, epoch 3/29: 100%|██████████| 7/7 [00:00<00:00, ..., val/acc=0.285]
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False):
        super().__init__(refresh_rate, process_position, leave)
        self.cell = ""  # the cell's label (ProbeCell.label), set by the command for each cell

    def _named(self, stage: str, default: str) -> str:
        return f"{self.cell}, {stage}" if self.cell else default

    @property
    def train_description(self) -> str:
        return self.cell or super().train_description

    @property
    def validation_description(self) -> str:
        return self._named("validating", super().validation_description)

    @property
    def test_description(self) -> str:
        return self._named("testing", super().test_description)

    def on_train_epoch_start(self, trainer, *_) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        epoch = f"epoch {trainer.current_epoch}"  # counted from 0, as results.csv's best_epoch
        if trainer.max_epochs and trainer.max_epochs > 0:
            epoch += f"/{trainer.max_epochs - 1}"
        self.train_progress_bar.set_description(self._named(epoch, epoch.capitalize()), refresh=False)
        self.train_progress_bar.reset(total=convert_inf(self.total_train_batches))
        self.train_progress_bar.initial = 0

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self.test_description,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=self.BAR_FORMAT,
        )

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or len(trainer.num_val_batches) > 1:
            super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        elif self.has_dataloader_changed(dataloader_idx):  # one loader: no "DataLoader 0" after the name
            self.val_progress_bar.reset(total=convert_inf(self.total_val_batches_current_dataloader))
            self.val_progress_bar.initial = 0

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if len(trainer.num_test_batches) > 1:
            super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        elif self.has_dataloader_changed(dataloader_idx):
            self.test_progress_bar.reset(total=convert_inf(self.total_test_batches_current_dataloader))
            self.test_progress_bar.initial = 0

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
