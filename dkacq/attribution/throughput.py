"""A progress bar that shows texts per second while attributing."""

import time

from lightning.pytorch.callbacks import TQDMProgressBar


class TextThroughputBar(TQDMProgressBar):
    """TQDM's bar, with the rate in texts (a batch holds several) next to batches."""

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        super().on_predict_epoch_start(trainer, pl_module)
        self._texts, self._start = 0, time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._texts += len(batch)
        if self.predict_progress_bar is not None:
            rate = self._texts / max(time.perf_counter() - self._start, 1e-9)
            self.predict_progress_bar.set_postfix(texts=self._texts, texts_per_s=f"{rate:.2f}")
