"""The progress of ``dkacq attribute``: texts attributed, texts per second and the time left, also in a log file."""

import sys
import time

from dkacq.encoders.extraction import TextProgressBar, texts_to_predict

PLURALS = {"query": "queries", "passage": "passages"}


def duration(seconds: float) -> str:
    """``41 s``, ``3 min 20 s``, ``2 h 05 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class TextThroughputBar(TextProgressBar):
    """TQDM's bar counted in texts (a batch holds several), with the rate in texts per second::

        attributing minilm: queries 100%|██████████| 200/200 [00:41<00:00, 4.85 texts/s]

    The first batch of a run is slower than the others (it compiles, with ``--model.compile``, and
    measures the memory a pass takes, on a GPU), so its time is reported on a line of its own, and
    the rate and the time left count only the batches after it. A line says when the model is being
    loaded, so a run shows something within seconds. When the output is not a terminal (a log file,
    a batch job), lines replace the bar's frames: one at the start, one after the first batch, one every
    ``log_every_seconds`` and one at the end::

        attributing minilm: queries: loading the model
        attributing minilm: queries: 200 texts to attribute
        attributing minilm: queries: first batch, 8 texts in 3.1 s (compiling and measuring memory included)
        attributing minilm: queries: 40/200 texts, 4.85 texts/s, about 33 s left
        attributing minilm: queries: 200/200 texts in 44 s, 4.85 texts/s after the first batch

    Counts are this process's texts (with several devices, rank zero's share).
    """

    def __init__(
        self,
        refresh_rate: int = 1,
        process_position: int = 0,
        leave: bool = False,
        description: str | None = None,
        log_every_seconds: float = 30.0,
    ):
        """
        Args:
            refresh_rate: batches between updates of the bar.
            process_position: the bar's line, for several processes.
            leave: TQDM's option for training bars (a predict bar always stays).
            description: what the bar says it does (default: the preset and the text side).
            log_every_seconds: when the output is not a terminal, a progress line at most this often.
        """
        super().__init__(refresh_rate, process_position, leave, description)
        self.log_every_seconds = log_every_seconds
        self.as_lines = False
        self.total: int | None = None
        self.started = self.last_line = 0.0
        self.first: tuple[int, float] | None = None
        """Texts of the first batch and the time when it ended."""

    def describe(self, trainer, pl_module) -> str:
        if self.description:
            return self.description
        preset, side = getattr(pl_module, "preset", None), getattr(pl_module.hparams, "text_side", None)
        if preset is None or side is None:
            return "attributing"
        return f"attributing {preset.label}: {PLURALS.get(side, side)}"

    @property
    def is_disabled(self) -> bool:
        return super().is_disabled or self.as_lines

    def say(self, trainer, line: str) -> None:
        if trainer.is_global_zero and not super().is_disabled:
            if self.as_lines or self._predict_progress_bar is None:
                print(f"{self.describe(trainer, trainer.lightning_module)}: {line}", file=sys.stdout, flush=True)
            else:
                self.predict_progress_bar.write(f"{self.describe(trainer, trainer.lightning_module)}: {line}")

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.as_lines = not sys.stdout.isatty()
        if stage == "predict":
            self.say(trainer, "loading the model")

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        loaders = trainer.predict_dataloaders
        self.total = texts_to_predict(loaders[0] if isinstance(loaders, (list, tuple)) else loaders)
        self.started = self.last_line = time.perf_counter()
        self.first = None
        if self.as_lines:
            self.say(trainer, f"{self.total if self.total is not None else 'the'} texts to attribute")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        now = time.perf_counter()
        if self.first is None:
            self.first = (self._texts, now)
            self.last_line = now
            seconds = now - self.started
            self.say(
                trainer,
                f"first batch, {self._texts} texts in {seconds:.1f} s (compiling and measuring memory included)",
            )
            bar = self._predict_progress_bar
            if bar is not None and not bar.disable:  # the bar's rate and time left leave the first batch out
                # (and tqdm's close, which skips its final newline for a bar drawn before start_t, finds none)
                bar.initial, bar.start_t = bar.n, bar._time()
                bar.last_print_t = bar.start_t
        elif self.as_lines and now - self.last_line >= self.log_every_seconds:
            self.last_line = now
            self.say(trainer, self.progress(now))

    def rate(self, now: float) -> float | None:
        """Texts per second after the first batch."""
        texts, since = self.first
        return (self._texts - texts) / (now - since) if now > since and self._texts > texts else None

    def progress(self, now: float) -> str:
        rate = self.rate(now)
        line = f"{self._texts}/{self.total} texts"
        if rate is not None:
            line += f", {rate:.3g} texts/s"
            if self.total is not None:
                line += f", about {duration((self.total - self._texts) / rate)} left"
        return line

    def on_predict_end(self, trainer, pl_module) -> None:
        super().on_predict_end(trainer, pl_module)
        if self.as_lines and self.first is not None:
            now = time.perf_counter()
            rate = self.rate(now)
            after = f", {rate:.3g} texts/s after the first batch" if rate is not None else ""
            self.say(trainer, f"{self._texts}/{self.total} texts in {duration(now - self.started)}{after}")
