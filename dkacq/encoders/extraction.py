"""Filling the embedding cache with ``Trainer.predict`` on every device and node, resumably.

How :func:`build_cache` works:

1. Every process tokenizes the distinct texts and sorts them longest first, and each side is cut into
   batches of ``batch_size`` consecutive texts: batch numbers ``0..Q-1`` are the queries', then come the
   passages'. The batches do not depend on the number of devices, so every vector comes out of the same
   padded batch, and therefore the same arithmetic, as in a one-device build.
2. Global rank 0 prepares the staging folder (:meth:`CacheBuildData.prepare_data`; the other ranks wait):
   its name is a digest of the request, batch size, precision and storage dtype, so a build of the same
   request finds the partial files of an interrupted one and a build of another request never does. It
   is resumed only when ``build.json`` records the same request, layout and texts and every layer file
   has its full size and header; otherwise it is started over: every layer file is created with its
   header and given its full size.
3. Each rank reads which batches are done and takes every ``world_size``-th of the others
   (:meth:`CacheBuildData.setup`), longest first: whole batches, so they stay length-homogeneous.
4. The writer callback (:class:`LayerRowWriter`) writes each batch's rows of every layer at their final
   offsets (``header + row * row_bytes``, positional writes: ranks never interleave) and records the batch
   with the CRC-32 of what it wrote in its rank's progress file (atomically, at most every
   ``commit_seconds`` and when the run ends or fails), so a rerun skips it.
5. When every rank is done, rank 0 reads each layer file once: its sha256 for the manifest, and each
   batch's CRC against what was written (a batch that reached the disk otherwise is named and dropped
   from the progress, to be encoded again). It writes the index and the manifest, with the speed of
   this run, and moves the folder into place; the other ranks wait for it and raise if it failed.
"""

import hashlib
import itertools
import json
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from datasets import DatasetDict
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from dkacq.data.examples import EXAMPLE_COLUMNS
from dkacq.encoders.cache import (
    BUILD_FILE,
    CACHE_FORMAT,
    PROGRESS_DIR,
    CacheDamagedError,
    CacheError,
    EmbeddingCache,
    LayerLayout,
    LayerRows,
    build_digest,
    layer_file,
    layer_file_problem,
    merge_progress,
    prepare_layer_file,
    publish,
    read_back,
    read_json,
    read_manifest,
    read_progress,
    resumable_staging,
    write_rank_progress,
)
from dkacq.encoders.memory import auto_extraction_batch_size, running_dtype
from dkacq.encoders.text_encoder import TextEncoder
from dkacq.formats.atomic import atomic_write_text, check_space, human_bytes
from dkacq.formats.provenance import hardware, package_versions

log = logging.getLogger("dkacq")
SIDES = ("queries", "passages")
IDLE = -1
"""The batch number of an empty batch, given to a rank with nothing left to encode so that it still runs
the predict loop (and its hooks, which meet the other ranks')."""


class PooledStatesExtractor(LightningModule):
    """Predicts ``[num_hidden_states, batch, dim]`` pooled vectors for a batch of tokenized texts of
    either side (``batch["side"]``: 0 queries, 1 passages); None for an idle batch."""

    def __init__(self, query_encoder: TextEncoder, passage_encoder: TextEncoder | None = None):
        super().__init__()
        self.encoders = nn.ModuleList([query_encoder, passage_encoder or query_encoder])

    def setup(self, stage: str) -> None:
        _restore_output_capturing(self)

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if batch["number"] == IDLE:
            return None
        return self.encoders[batch["side"]](batch["input_ids"], batch["attention_mask"])


def _restore_output_capturing(module: nn.Module) -> None:
    """Let transformers models that reached this process by pickling (``ddp_spawn``) return hidden states:
    transformers 5 registers what a model class can capture when a model is constructed, in that process."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # another version of transformers: nothing to restore
        return
    for model in module.modules():
        if isinstance(model, PreTrainedModel) and not _CAN_RECORD_REGISTRY.get(model):
            _CAN_RECORD_REGISTRY[model] = getattr(model, "_can_record_outputs", None)


@dataclass
class BuildPlan:
    """Everything every process must agree on: where the build goes, the files' layout and the batches."""

    folder: Path
    staging: Path
    layout: LayerLayout
    num_layers: int
    batch_size: int
    ids: tuple[list[list[int]], list[list[int]]]
    identity: dict
    """What the partial files are (``build.json``): the request, layout and a digest of the token ids."""

    @property
    def side_batches(self) -> tuple[int, int]:
        return tuple(-(-len(ids) // self.batch_size) for ids in self.ids)

    @property
    def num_batches(self) -> int:
        return sum(self.side_batches)

    def batch(self, number: int) -> tuple[int, int, int]:
        """``(side, start, stop)``: batch ``number`` holds rows ``start:stop`` of that side."""
        queries = self.side_batches[0]
        side, start = (0, number * self.batch_size) if number < queries else (1, (number - queries) * self.batch_size)
        return side, start, min(start + self.batch_size, len(self.ids[side]))

    def segments(self, crcs: Mapping[int, list[int]], layer: int) -> list[tuple[int, int, int]]:
        """Each batch's byte range in a layer file, in file order, with the CRC-32 written there."""
        ranges = []
        for number in range(self.num_batches):
            side, start, stop = self.batch(number)
            ranges.append((self.layout.offset(side, start), self.layout.offset(side, stop), crcs[number][layer]))
        return ranges


def ids_digest(ids: list[list[int]]) -> str:
    digest = hashlib.sha256(np.asarray([len(row) for row in ids], dtype=np.int64).tobytes())
    digest.update(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64).tobytes())
    return digest.hexdigest()


class TokenBatches(Dataset):
    """Batch number -> the padded batch, with its number, side and first row."""

    def __init__(self, plan: BuildPlan, query_encoder: TextEncoder, passage_encoder: TextEncoder):
        self.plan = plan
        self.collate = (query_encoder.collate, passage_encoder.collate)

    def __len__(self) -> int:
        return self.plan.num_batches

    def __getitem__(self, number: int) -> dict:
        if number == IDLE:
            empty = torch.zeros(0, 1, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty, "number": IDLE, "side": IDLE, "start": 0}
        side, start, stop = self.plan.batch(number)
        return dict(self.collate[side](self.plan.ids[side][start:stop]), number=number, side=side, start=start)


class RankBatches(Sampler):
    """The batch numbers one rank encodes, and how many texts of each side they hold."""

    def __init__(self, numbers: list[int], plan: BuildPlan):
        self.numbers = numbers
        self.texts = [0, 0]
        for number in numbers:
            if number != IDLE:
                side, start, stop = plan.batch(number)
                self.texts[side] += stop - start

    def __iter__(self):
        return iter(self.numbers)

    def __len__(self) -> int:
        return len(self.numbers)

    @property
    def num_texts(self) -> int:
        return sum(self.texts)


class CacheBuildData(LightningDataModule):
    """Prepares the staging folder (global rank 0) and gives each rank its share of the batches left."""

    def __init__(self, plan: BuildPlan, query_encoder: TextEncoder, passage_encoder: TextEncoder):
        super().__init__()
        self.prepare_data_per_node = False  # one staging folder, on a file system every node shares
        self.plan = plan
        self.batches = TokenBatches(plan, query_encoder, passage_encoder)
        self.sampler: RankBatches | None = None

    def prepare_data(self) -> None:
        plan = self.plan
        staging, layout = plan.staging, plan.layout
        paths = [layer_file(staging, layer) for layer in range(plan.num_layers)]
        for other in staging.parent.glob(f".{plan.folder.name}.*.partial"):
            if other != staging and other.is_dir():
                size = sum(path.stat().st_blocks * 512 for path in other.rglob("*") if path.is_file())
                log.warning("%s: a partial build of other settings (%s) is left there", other, human_bytes(size))
        problem = None
        if staging.exists():
            found = read_json(staging / BUILD_FILE)
            if found is None:
                problem = f"{BUILD_FILE} is missing or unreadable"
            elif found != plan.identity:
                problem = f"its {BUILD_FILE} records other settings or texts"
            else:
                problem = next(filter(None, (layer_file_problem(path, layout) for path in paths)), None)
            if problem is not None:
                log.warning("%s: %s; starting this build over", staging, problem)
                shutil.rmtree(staging)
        if not staging.exists():
            staging.mkdir(parents=True)
            self._check_space(layout.file_bytes * plan.num_layers)
            for path in paths:
                prepare_layer_file(path, layout)
            (staging / PROGRESS_DIR).mkdir()
            atomic_write_text(staging / BUILD_FILE, json_text(plan.identity))  # last: the files are ready
        else:
            missing = sum(layout.file_bytes - min(path.stat().st_blocks * 512, layout.file_bytes) for path in paths)
            self._check_space(missing)
        done = merge_progress(staging, plan.num_batches, plan.num_layers)
        if done:
            log.info("%s: resuming: %d of %d batches are done", staging, len(done), plan.num_batches)

    def _check_space(self, needed: int) -> None:
        check_space(self.plan.staging, needed, "the embedding cache (data.cache_dir)")

    def setup(self, stage: str) -> None:
        plan, trainer = self.plan, self.trainer
        if read_json(plan.staging / BUILD_FILE) != plan.identity:
            raise CacheError(f"{plan.staging}: not prepared for this build (see the log of global rank 0)")
        done = read_progress(plan.staging, plan.num_batches, plan.num_layers)
        left = [number for number in range(plan.num_batches) if number not in done]
        mine = left[trainer.global_rank :: trainer.world_size] or [IDLE]
        self.sampler = RankBatches(mine, plan)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, sampler=self.sampler)


class LayerRowWriter(Callback):
    """Writes each batch's rows at their offsets in every layer file, records the batches done, and
    finishes the cache when all ranks are done (see the module's docstring)."""

    commit_seconds = 10.0
    """Longest time between two records of the batches done: what a killed build may encode again."""

    def __init__(self, plan: BuildPlan, manifest: dict, index: dict[str, Tensor]):
        super().__init__()
        self.plan, self.manifest, self.index = plan, manifest, index
        self.rows: list[LayerRows] = []
        self.group = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            # rank 0 reads every file back while the others wait: longer than a collective's usual timeout
            self.group = dist.new_group(backend="gloo", timeout=timedelta(days=1))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = [
            LayerRows(layer_file(self.plan.staging, layer), self.plan.layout) for layer in range(self.plan.num_layers)
        ]
        self.done: dict[int, list[int]] = {}
        self.texts = 0
        self.started = self.committed = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch["number"] == IDLE:
            return
        rows = outputs.detach().to("cpu", self.plan.layout.torch_dtype)
        side, start = batch["side"], batch["start"]
        self.done[batch["number"]] = [
            writer.write(side, start, layer) for writer, layer in zip(self.rows, rows, strict=True)
        ]
        self.texts += rows.shape[1]
        if time.perf_counter() - self.committed >= self.commit_seconds:
            self._commit(trainer)

    def _commit(self, trainer: Trainer) -> None:
        write_rank_progress(self.plan.staging, trainer.global_rank, self.done)
        self.committed = time.perf_counter()

    def _close(self) -> None:
        for writer in self.rows:
            writer.close()
        self.rows = []

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.rows:
            try:
                self._commit(trainer)  # what is written is kept for the next attempt
            except Exception as error:  # the first error is the one to see
                log.warning("could not record the batches written: %s", error)
            self._close()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._commit(trainer)
        self._close()
        mine = {
            "texts": self.texts,
            "batches": len(self.done),
            "seconds": time.perf_counter() - self.started,
            **hardware(pl_module.device, trainer.world_size),
        }
        speeds = [mine]
        if self.group is not None:
            _barrier(trainer.strategy)
            speeds = [None] * trainer.world_size
            dist.all_gather_object(speeds, mine, group=self.group)
        failure = None
        if trainer.is_global_zero:
            try:
                finish(self.plan, self.manifest, self.index, speeds, str(trainer.precision))
            except BaseException as error:
                failure = error
        if self.group is not None:
            message = [None if failure is None else f"{type(failure).__name__}: {failure}"]
            dist.broadcast_object_list(message, src=0, group=self.group)
            if failure is None and message[0] is not None:
                raise CacheError(f"{self.plan.staging}: global rank 0 could not finish the cache: {message[0]}")
        if failure is not None:
            raise failure


def _barrier(strategy: Strategy) -> None:
    strategy.barrier("cache rows written")


def finish(plan: BuildPlan, manifest: dict, index: dict[str, Tensor], speeds: list[dict], precision: str) -> None:
    """Read every layer file back once, check each batch against what was written, and publish."""
    staging, layout = plan.staging, plan.layout
    done = read_progress(staging, plan.num_batches, plan.num_layers)
    missing = plan.num_batches - len(done)
    if missing:
        raise CacheError(f"{staging}: {missing} of {plan.num_batches} batches were not written; build again")
    started = time.perf_counter()
    paths = [layer_file(staging, layer) for layer in range(plan.num_layers)]
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        found = list(
            pool.map(lambda layer: read_back(paths[layer], layout, plan.segments(done, layer)), range(len(paths)))
        )
    for path, back in zip(paths, found):
        if not back.header_ok:
            (staging / BUILD_FILE).unlink(missing_ok=True)  # the next attempt starts over
            raise CacheDamagedError(f"{path}: its header differs from what was written; check the disk and build again")
    bad = sorted({number for back in found for number in back.bad})
    if bad:
        merge_progress(staging, plan.num_batches, plan.num_layers, drop=bad)
        names = ", ".join(path.name for path, back in zip(paths, found) if back.bad)
        raise CacheDamagedError(
            f"{staging}: the rows of {len(bad)} batches read back from {names} differ from what was written; "
            f"check the disk and build again (only those batches are encoded again)"
        )
    texts, seconds = sum(speed["texts"] for speed in speeds), max(speed["seconds"] for speed in speeds)
    batches = sum(speed["batches"] for speed in speeds)
    speed = {key: speeds[0][key] for key in ("device", "device_type", "devices")}
    speed.update(
        texts=texts,
        batches=batches,
        resumed_batches=plan.num_batches - batches,
        wall_seconds=seconds,
        texts_per_second=texts / seconds if seconds > 0 else None,
        precision=precision,
        peak_memory_bytes=max(speed["peak_memory_bytes"] for speed in speeds),
        checksum_seconds=time.perf_counter() - started,
    )
    records = {path.name: back.record for path, back in zip(paths, found)}
    publish(
        staging,
        plan.folder,
        dict(manifest, speed=speed),
        index,
        layer_records=records,
        remove=(BUILD_FILE, PROGRESS_DIR),
    )


def saved_batches(folder: Path) -> tuple[Path, int, int] | None:
    """The staging folder of the build into ``folder`` that saved a batch last, with the batches it has
    saved and the build's number of batches; None when no build into ``folder`` has been prepared."""
    found = []
    for staging in folder.parent.glob(f".{folder.name}.*.partial"):
        identity = read_json(staging / BUILD_FILE)
        if not isinstance(identity, dict):
            continue
        layout, size = identity["layout"], identity["batch_size"]
        total = -(-layout["num_queries"] // size) + -(-layout["num_passages"] // size)
        done = read_progress(staging, total, identity["num_hidden_states"])
        changed = max(path.stat().st_mtime_ns for path in [staging, *(staging / PROGRESS_DIR).glob("*")])
        found.append((changed, staging, len(done), total))
    return max(found)[1:] if found else None


def texts_in(batch) -> int:
    """How many texts a batch holds: a list of texts, or a mapping of ``[batch, ...]`` tensors."""
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    return len(batch)


def texts_to_predict(loader) -> int | None:
    """How many texts ``loader`` yields (this process's share), or None when it cannot tell."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    if isinstance(sampler, RankBatches):
        return sampler.num_texts
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


class CacheProgressBar(TextProgressBar):
    """A bar per side, ``caching <label>: queries`` then ``passages``, counting this rank's texts (those
    still to encode, when a build is resumed) and their rate; none when the output is not a terminal
    (:func:`build_cache` then says the build in one line)."""

    @property
    def is_disabled(self) -> bool:
        return super().is_disabled or not at_terminal()

    def __init__(self, label: str):
        super().__init__()
        self.label = label
        self._side: int | None = None

    def describe(self, trainer: Trainer, pl_module: LightningModule) -> str:
        return f"caching {self.label}: {SIDES[self._side or 0]}"

    def _sampler(self, trainer: Trainer) -> RankBatches | None:
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        sampler = getattr(loader, "sampler", None)
        return sampler if isinstance(sampler, RankBatches) else None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._side = None
        super().on_predict_start(trainer, pl_module)
        sampler = self._sampler(trainer)
        if sampler is not None and not sampler.num_texts:  # nothing left: the build only finishes
            self.predict_progress_bar.reset(total=0)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.has_dataloader_changed(dataloader_idx)
        side = batch["side"]
        if side == IDLE or side == self._side:
            return
        if self._side is not None:  # the queries' bar stays as it ended; the passages' starts
            self.predict_progress_bar.close()
            self._side = side
            self.predict_progress_bar = self.init_predict_tqdm()
        self._side = side
        self._texts = 0
        sampler = self._sampler(trainer)
        self.predict_progress_bar.set_description_str(self.describe(trainer, pl_module), refresh=False)
        self.predict_progress_bar.reset(total=sampler.texts[side] if sampler is not None else None)


def sorted_unique(encoder: TextEncoder, texts: list[str]) -> tuple[list[str], list[list[int]]]:
    """Distinct texts and their token ids, longest first: batches of similar length pad little."""
    unique = list(dict.fromkeys(texts))
    ids = encoder.token_ids(unique)
    order = sorted(range(len(unique)), key=lambda i: -len(ids[i]))
    return [unique[i] for i in order], [ids[i] for i in order]


def auto_batch_size(
    query_encoder: TextEncoder,
    passage_encoder: TextEncoder,
    query_ids: list[list[int]],
    passage_ids: list[list[int]],
    precision: str,
    accelerator: str,
) -> int:
    """``batch_size="auto"``: :func:`~dkacq.encoders.memory.auto_extraction_batch_size` for the longest
    text (the first of each side: they are sorted longest first) on the accelerator's first device."""
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    dtype = running_dtype(precision)
    tokens = max(len(ids[0]) for ids in (query_ids, passage_ids) if ids)
    transformers = {id(encoder.transformer): encoder.transformer for encoder in (query_encoder, passage_encoder)}
    configs = [transformer.config for transformer in transformers.values()]
    return auto_extraction_batch_size(configs, dtype, tokens, device)


def default_precision() -> str:
    return "bf16-true" if torch.cuda.is_available() else "32-true"


def json_text(value) -> str:
    return json.dumps(value, indent=1, sort_keys=True, default=str)


def process_rank(
    accelerator: str = "auto", devices: int | str | list[int] = 1, num_nodes: int = 1, strategy: str | Strategy = "auto"
) -> int:
    """The global rank this process has in a build with these trainer settings: 0 in the process the user
    started (and in any one-device build); another in a process started for the build by Lightning's
    ``ddp`` launcher, ``srun`` or ``torchrun``, which runs the user's command again. A caller holding a
    lock around :func:`build_cache` takes it on rank 0 alone: the other ranks join that build."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
    return trainer.global_rank


def _predict(
    plan: BuildPlan,
    extractor: PooledStatesExtractor,
    data: CacheBuildData,
    writer: LayerRowWriter,
    label: str,
    precision: str,
    accelerator: str,
    devices: int | str | list[int],
    num_nodes: int,
    strategy: str | Strategy,
    callbacks: list[Callback],
) -> None:
    trainer = Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        logger=False,
        callbacks=[writer, CacheProgressBar(label), *callbacks],
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # each rank's batches are chosen by CacheBuildData
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.predict(extractor, datamodule=data, return_predictions=False)


def build_cache(
    folder: Path,
    request: dict,
    query_encoder: TextEncoder,
    passage_encoder: TextEncoder,
    probe_set: DatasetDict,
    batch_size: int | Literal["auto"] = 64,
    precision: str | None = None,
    storage_dtype: str = "float32",
    label: str | None = None,
    *,
    accelerator: str = "auto",
    devices: int | str | list[int] = 1,
    num_nodes: int = 1,
    strategy: str | Strategy = "auto",
    callbacks: list[Callback] = (),
) -> EmbeddingCache:
    """Encode every distinct query and passage of ``probe_set`` at every hidden state into ``folder``,
    with ``Trainer.predict`` on ``devices`` of ``accelerator`` on each of ``num_nodes`` nodes (Lightning's
    ``strategy``: ``ddp`` for several devices; every process of a job calls this with the same arguments,
    or the launching one alone with ``ddp_spawn``, which pickles the encoders to its processes: they must
    not have run a forward pass, after which transformers' output hooks cannot be pickled). The files are
    the same, byte for byte, whatever the number of devices (on devices of one kind).

    The folder appears only when complete and checked. A build that stops (an error, Ctrl+C, a killed
    job) leaves its staging folder ``.<name>.<digest>.partial`` beside it, and the next build of the same
    request encodes only the batches it had not written; see the module's docstring. Builds into one
    folder must not run at once (``ProbeDataModule.prepare_data`` holds a lock). A bar per side shows the
    progress: ``caching <label>: queries``, then ``passages`` (``label``: the folder's name when not given).
    ``callbacks`` join the build's trainer, after its writer.
    """
    folder, precision = Path(folder), precision or default_precision()
    label = label or folder.name
    queries, query_ids = sorted_unique(query_encoder, [q for split in probe_set.values() for q in split["question"]])
    passage_texts = [
        p for split in probe_set.values() for column in EXAMPLE_COLUMNS[1:] for p in split[column] if p is not None
    ]
    passages, passage_ids = sorted_unique(passage_encoder, passage_texts)
    if batch_size == "auto":
        batch_size = auto_batch_size(query_encoder, passage_encoder, query_ids, passage_ids, precision, accelerator)
    num_states, dim = query_encoder.num_hidden_states, query_encoder.hidden_size
    if (passage_encoder.num_hidden_states, passage_encoder.hidden_size) != (num_states, dim):
        raise ValueError("query and passage encoders must have the same number of layers and hidden size")

    layout = LayerLayout(len(queries), len(passages), dim, storage_dtype)
    key = {
        "cache_format": CACHE_FORMAT,
        "request": request,
        "batch_size": batch_size,
        "precision": precision,
        "storage_dtype": storage_dtype,
    }
    identity = dict(
        key,
        layout=asdict(layout),
        num_hidden_states=num_states,
        texts={"queries": ids_digest(query_ids), "passages": ids_digest(passage_ids)},
    )
    identity = json.loads(json_text(identity))  # as it reads back from build.json
    plan = BuildPlan(
        folder,
        resumable_staging(folder, build_digest(key)),
        layout,
        num_states,
        batch_size,
        (query_ids, passage_ids),
        identity,
    )
    manifest = dict(
        request,
        num_hidden_states=num_states,
        hidden_size=dim,
        num_queries=len(queries),
        num_passages=len(passages),
        precision=precision,
        storage_dtype=storage_dtype,
        batch_size=batch_size,
        versions=package_versions(),
    )
    writer = LayerRowWriter(plan, manifest, _index(probe_set, queries, passages))
    data = CacheBuildData(plan, query_encoder, passage_encoder)
    _predict(
        plan,
        PooledStatesExtractor(query_encoder, passage_encoder),
        data,
        writer,
        label,
        precision,
        accelerator,
        devices,
        num_nodes,
        strategy,
        list(callbacks),
    )
    found = read_manifest(folder)
    if found is None:
        raise CacheError(f"{folder}: the build ended without a cache")
    if rank_zero_only.rank == 0:
        print(build_line(label, found), flush=True)
    return EmbeddingCache(folder, found)


def build_line(label: str, manifest: dict) -> str:
    """``cached minilm: 4,778 texts at 7 hidden states in 25.1 s (190 texts/s, cpu), read back in 0.1 s``:
    a cache build in one line, at a terminal (under its bars) and in a log file (instead of them)."""
    speed = manifest.get("speed") or {}
    rate = speed.get("texts_per_second")
    device = speed.get("device") if speed.get("device_type") == "cuda" else speed.get("device_type", "?")
    line = (
        f"cached {label}: {speed.get('texts', 0):,} texts at {manifest['num_hidden_states']} hidden states in "
        f"{speed.get('wall_seconds', 0):.1f} s ({f'{rate:,.0f}' if rate else '-'} texts/s, {device})"
    )
    if speed.get("resumed_batches"):
        line += f", {speed['resumed_batches']:,} batches kept from a stopped build"
    return line + f", read back in {speed.get('checksum_seconds', 0):.1f} s"


def at_terminal() -> bool:
    """Whether a person watches the output: stdout and stderr are terminals. Otherwise (a log file, a
    batch job, a pipe) progress bars are left out, as their frames would fill the file, and each cache
    build and probe cell says in one line what it did."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _index(probe_set: DatasetDict, queries: list[str], passages: list[str]) -> dict[str, Tensor]:
    """Per split, every example's query row ``[E]`` and passage rows ``[E, 5]`` (positive first; -1 for
    an absent negative)."""
    query_row = {text: row for row, text in enumerate(queries)}
    passage_row = {text: row for row, text in enumerate(passages)} | {None: -1}
    index = {}
    for name, split in probe_set.items():
        index[f"{name}.query"] = torch.tensor([query_row[q] for q in split["question"]], dtype=torch.long)
        index[f"{name}.passages"] = torch.tensor(
            [[passage_row[p] for p in split[column]] for column in EXAMPLE_COLUMNS[1:]], dtype=torch.long
        ).T.contiguous()
    return index
