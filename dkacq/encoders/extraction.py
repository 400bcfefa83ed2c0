"""Filling the embedding cache with ``Trainer.predict`` and a writer callback that streams to disk."""

import shutil
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from datasets import DatasetDict
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from dkacq.data.examples import EXAMPLE_COLUMNS
from dkacq.encoders.cache import EmbeddingCache, LayerFileWriter, layer_file, publish, staging_folder
from dkacq.encoders.text_encoder import TextEncoder
from dkacq.formats.provenance import package_versions


class PooledStatesExtractor(LightningModule):
    """Predicts ``[num_hidden_states, batch, dim]`` pooled vectors for a batch of tokenized texts."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.encoder(batch["input_ids"], batch["attention_mask"])


class LayerStreamWriter(BasePredictionWriter):
    """Appends each batch's rows of every layer to that layer's file, in batch order."""

    def __init__(self, writers: list[LayerFileWriter]):
        super().__init__(write_interval="batch")
        self.writers = writers

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for writer, rows in zip(self.writers, prediction, strict=True):
            writer.append(rows)


def texts_in(batch) -> int:
    """How many texts a batch holds: a list of texts, or a mapping of ``[batch, ...]`` tensors."""
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    return len(batch)


def texts_to_predict(loader) -> int | None:
    """How many texts ``loader`` yields (this process's share), or None when it cannot tell."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    try:
        return len(sampler)
    except TypeError:
        return None


class TextProgressBar(TQDMProgressBar):
    """TQDM's predict bar counted in texts, not batches, with its rate in texts per second::

    caching minilm: passages 100%|██████████| 2432/2432 [00:05<00:00, 410.20 texts/s]
    """

    BAR_FORMAT = (
        "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
    )

    def __init__(
        self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False, description: str | None = None
    ):
        """
        Args:
            refresh_rate: batches between updates of the bar.
            process_position: the bar's line, for several processes.
            leave: TQDM's option for training bars (a predict bar always stays).
            description: what the bar says it does (default: :meth:`describe`).
        """
        super().__init__(refresh_rate, process_position, leave)
        self.description = description
        self._texts = 0

    def describe(self, trainer: Trainer, pl_module: LightningModule) -> str:
        return self.description or self.predict_description

    def init_predict_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self.describe(self.trainer, self.trainer.lightning_module),
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            unit=" texts",
            bar_format=self.BAR_FORMAT,
        )

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        loaders = trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        self._texts = 0
        self.predict_progress_bar.reset(total=texts_to_predict(loader))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._texts += texts_in(batch)
        bar, batches = self.predict_progress_bar, convert_inf(self.total_predict_batches_current_dataloader)
        if bar is not None and not bar.disable and self._should_update(batch_idx + 1, batches):
            bar.n = self._texts
            bar.refresh()


def sorted_unique(encoder: TextEncoder, texts: list[str]) -> tuple[list[str], list[list[int]]]:
    """Distinct texts and their token ids, longest first: batches of similar length pad little."""
    unique = list(dict.fromkeys(texts))
    ids = encoder.token_ids(unique)
    order = sorted(range(len(unique)), key=lambda i: -len(ids[i]))
    return [unique[i] for i in order], [ids[i] for i in order]


def default_precision() -> str:
    return "bf16-true" if torch.cuda.is_available() else "32-true"


def _predict(
    encoder: TextEncoder,
    ids: list[list[int]],
    writers: list[LayerFileWriter],
    batch_size: int,
    precision: str,
    description: str,
):
    batches = BatchSampler(SequentialSampler(ids), batch_size, drop_last=False)
    loader = DataLoader(ids, batch_sampler=batches, collate_fn=encoder.collate)
    trainer = Trainer(
        accelerator="auto",
        devices=1,
        precision=precision,
        logger=False,
        callbacks=[LayerStreamWriter(writers), TextProgressBar(description=description)],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.predict(PooledStatesExtractor(encoder), loader, return_predictions=False)


def build_cache(
    folder: Path,
    request: dict,
    query_encoder: TextEncoder,
    passage_encoder: TextEncoder,
    probe_set: DatasetDict,
    batch_size: int = 64,
    precision: str | None = None,
    storage_dtype: str = "float32",
    label: str | None = None,
) -> EmbeddingCache:
    """Encode every distinct query and passage of ``probe_set`` at every hidden state into ``folder``.

    The folder appears only when complete and checked (built in a temporary folder of its own, every
    file read back against what was written, then renamed); a failed build leaves nothing behind. A bar
    per side shows the progress: ``caching <label>: queries``, then ``passages`` (``label``: the folder's
    name when not given).
    """
    precision = precision or default_precision()
    label = label or folder.name
    queries, query_ids = sorted_unique(query_encoder, [q for split in probe_set.values() for q in split["question"]])
    passage_texts = [p for split in probe_set.values() for column in EXAMPLE_COLUMNS[1:] for p in split[column]]
    passages, passage_ids = sorted_unique(passage_encoder, passage_texts)
    num_states, dim = query_encoder.num_hidden_states, query_encoder.hidden_size
    if (passage_encoder.num_hidden_states, passage_encoder.hidden_size) != (num_states, dim):
        raise ValueError("query and passage encoders must have the same number of layers and hidden size")

    staging = staging_folder(folder)
    writers = []
    try:
        for layer in range(num_states):
            writers.append(LayerFileWriter(layer_file(staging, layer), len(queries), len(passages), dim, storage_dtype))
        _predict(query_encoder, query_ids, writers, batch_size, precision, f"caching {label}: queries")
        _predict(passage_encoder, passage_ids, writers, batch_size, precision, f"caching {label}: passages")
        written = {writer.path.name: writer.close() for writer in writers}
        manifest = dict(
            request,
            num_hidden_states=num_states,
            hidden_size=dim,
            num_queries=len(queries),
            num_passages=len(passages),
            precision=precision,
            storage_dtype=storage_dtype,
            versions=package_versions(),
        )
        return publish(staging, folder, manifest, _index(probe_set, queries, passages), written)
    except BaseException:
        for writer in writers:
            writer.file.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _index(probe_set: DatasetDict, queries: list[str], passages: list[str]) -> dict[str, Tensor]:
    """Per split, every example's query row ``[E]`` and passage rows ``[E, 5]`` (positive first)."""
    query_row = {text: row for row, text in enumerate(queries)}
    passage_row = {text: row for row, text in enumerate(passages)}
    index = {}
    for name, split in probe_set.items():
        index[f"{name}.query"] = torch.tensor([query_row[q] for q in split["question"]], dtype=torch.long)
        index[f"{name}.passages"] = torch.tensor(
            [[passage_row[p] for p in split[column]] for column in EXAMPLE_COLUMNS[1:]], dtype=torch.long
        ).T.contiguous()
    return index
