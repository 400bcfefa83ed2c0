"""ProbeDataModule: the probe set and its embedding cache, one layer at a time, as N-passage batches."""

import gc
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from datasets import DatasetDict
from lightning.pytorch import Callback, LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dkacq.data.collection import COLLECTION_FORMATS, CollectionOptions, collection_options
from dkacq.data.mining import NegativeSource
from dkacq.data.sampling import check_num_passages, draw_passage_orders
from dkacq.data.storage import ProbeSource, check_dataset_name, fingerprint
from dkacq.datamodules.probe_sets import load_probe_set, probe_set_folder, probe_set_miner
from dkacq.encoders import extraction, loading
from dkacq.encoders.cache import CACHE_FORMAT, CacheDamagedError, EmbeddingCache, layer_file, open_cache
from dkacq.encoders.model_files import AutoEncoder, check_label
from dkacq.encoders.pooling import Pooling
from dkacq.encoders.presets import EncoderName, EncoderPreset, backbone_label, get_preset
from dkacq.encoders.text_encoder import REFERENCE_PADDING
from dkacq.formats.atomic import check_folder, file_lock

AUTO_OPTIONS = (
    "passage_model",
    "lora_adapter",
    "settings_from",
    "query_prefix",
    "passage_prefix",
    "normalize",
    "query_max_length",
    "passage_max_length",
)
"""Options of ``data.encoder auto`` alone (a preset's settings are fixed); each one unset is left out of a
cell's identity, so that cells recorded before these options existed keep theirs."""
CacheDtype = Literal["float32", "float16", "bfloat16"]
ExtractionPrecision = Literal["32-true", "64-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed"]
log = logging.getLogger("dkacq")


class ProbeExamples(Dataset):
    """One split's examples over one layer's vectors.

    Without fixed ``columns`` every fetch draws a fresh subset and order of the negatives from the
    dataset's own seeded generator, so training sees new draws every epoch, reproducibly. A negative's
    row -1 is an absent negative (a mined collection's example with fewer than 4): it is never drawn.
    """

    def __init__(
        self,
        queries: Tensor,
        passages: Tensor,
        query_rows: Tensor,
        passage_rows: Tensor,
        num_passages: int,
        fixed_seed: int | None = None,
        redraw_seed: int = 0,
    ):
        self.queries, self.passages = queries, passages
        self.query_rows, self.passage_rows = query_rows, passage_rows
        self.num_passages = num_passages
        self.generator = torch.Generator().manual_seed(redraw_seed)
        self.present = passage_rows[:, 1:] >= 0
        self.columns = self.labels = None
        if fixed_seed is not None:
            generator = torch.Generator().manual_seed(fixed_seed)
            self.columns, self.labels = draw_passage_orders(len(query_rows), num_passages, generator, self.present)

    def __len__(self) -> int:
        return len(self.query_rows)

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        if self.columns is None:
            columns, labels = draw_passage_orders(len(index), self.num_passages, self.generator, self.present[index])
        else:
            columns, labels = self.columns[index], self.labels[index]
        rows = self.passage_rows[index].gather(1, columns)
        return {
            "query": self.queries[self.query_rows[index]],
            "passages": self.passages[rows],
            "label": labels,
            "index": index,
        }


class LayerHolder:
    """One layer's vectors, kept in this process for every probe of that layer while :meth:`sharing`.

    A layer file of a large model is several GB, and each probe of a layer (every head, every N) would
    otherwise read it again for fitting and again for testing. While a command shares layers, every
    :meth:`ProbeDataModule.setup` takes its layer from here: the first asks for it to be read, the others
    get the same tensors (never changed in place), and asking for another layer releases the held one
    before the next is read, so the holder holds at most one layer. The key is the cache folder, the
    layer and the file's size, modification time and inode, so a cache rebuilt in between is read again.
    Outside :meth:`sharing` (or with ``enabled`` false) every setup reads its layer itself.
    """

    def __init__(self):
        self.users = 0
        self.enabled = True
        self.key: tuple | None = None
        self.vectors: tuple[Tensor, Tensor] | None = None

    @contextmanager
    def sharing(self) -> Iterator["LayerHolder"]:
        """Share layers within; the held layer is released when the outermost ``sharing`` ends."""
        self.users += 1
        try:
            yield self
        finally:
            self.users -= 1
            if not self.users:
                self.release()

    def release(self) -> None:
        """Drop the held layer (and collect garbage, so that no cycle keeps its tensors alive)."""
        held, self.key, self.vectors = self.vectors, None, None
        if held is not None:
            del held
            gc.collect()

    def layer(self, cache: EmbeddingCache, layer: int) -> tuple[Tensor, Tensor]:
        """Query and passage vectors of ``layer`` (float32): the held ones when they are this file's."""
        if not (self.users and self.enabled):
            return cache.layer(layer)
        try:
            stat = layer_file(cache.folder, layer).stat()
            key = (str(cache.folder.resolve()), layer, stat.st_size, stat.st_mtime_ns, stat.st_ino)
        except OSError:
            key = None  # reading it says what is wrong
        if key is None or key != self.key:
            self.release()
            vectors = cache.layer(layer)
            self.key, self.vectors = key, vectors
        return self.vectors


LAYERS = LayerHolder()
"""The process's holder: :meth:`LayerHolder.sharing` is entered by the probe commands around their cells."""


def _whole_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return batch


def embedding_request(preset: EncoderPreset, data_fingerprint: str, storage_dtype: str, precision: str) -> dict:
    """Everything that decides the numbers in an embedding cache: the exact weights (a hub commit or a
    digest of the files) and the extraction precision as well as the settings."""
    request = {
        "cache_format": CACHE_FORMAT,
        "query_model": vars(preset.query),
        "passage_model": vars(preset.passage),
        "pooling": preset.pooling,
        "query_prefix": preset.query_prefix,
        "passage_prefix": preset.passage_prefix,
        "query_max_length": preset.query_max_length,
        "passage_max_length": preset.passage_max_length,
        "normalize": preset.normalize,
        "random_init": preset.random_init,
        "init_seed": preset.seed,
        "weights": {
            "query": loading.weights_identity(preset.query),
            "passage": loading.weights_identity(preset.passage),
        },
        "storage_dtype": storage_dtype,
        "extraction_precision": precision,
        "data_fingerprint": data_fingerprint,
    }
    if preset.pooling == "eos_reference":  # the padding is read
        request["padding"] = REFERENCE_PADDING
    if preset.lowercase:
        request["lowercase"] = True
    if preset.origins:  # where each setting of an auto encoder came from: a changed file is a new cache
        request["settings_from"] = dict(preset.origins)
    return request


def validation_size(num_train: int, val_fraction: float) -> int:
    """Examples of the train split held out to choose the best epoch: ``val_fraction`` of them, at least one."""
    return max(1, round(val_fraction * num_train))


class ProbeDataModule(LightningDataModule):
    """Probe examples over one layer of an encoder's cached vectors.

    ``prepare_data`` builds the probe set (stored with ``datasets``) and the embedding cache when they
    are missing; ``setup`` opens the one layer in :attr:`layer` and nothing else (from :data:`LAYERS`
    when a command shares layers between its probes).
    """

    def __init__(
        self,
        encoder: EncoderName = "minilm",
        model: str | None = None,
        random_init: bool = False,
        init_seed: int = 0,
        pooling: Pooling | None = None,
        label: str | None = None,
        backbone: str | None = None,
        passage_model: str | None = None,
        lora_adapter: str | None = None,
        settings_from: str | None = None,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        normalize: bool | None = None,
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        dataset: str = "demo",
        source: ProbeSource = "demo",
        train_file: str | None = None,
        test_file: str | None = None,
        hub_id: str | None = None,
        path: str | None = None,
        dataset_id: str | None = None,
        negatives: NegativeSource = "file",
        collection: CollectionOptions | None = None,
        num_passages: int = 5,
        layers: list[int] | None = None,
        max_examples: int | None = None,
        batch_size: int = 32768,
        val_fraction: float = 0.01,
        seed: int = 42,
        standardize: bool = False,
        cache_dir: str = ".cache/dkacq",
        cache_name: str | None = None,
        cache_dtype: CacheDtype = "float32",
        extraction_batch_size: int | Literal["auto"] = 64,
        extraction_precision: ExtractionPrecision | None = None,
        verify_cache: bool = True,
    ):
        """
        Args:
            encoder: preset name (``dkacq.encoders.presets.PRESETS``): bert-cls, dpr-query, dpr-passage,
                dpr-paired, bert-mean, contriever, llama, repllama, or minilm (offline), smollm, smollm-gguf
                (offline); or ``auto``: ``model`` read as its authors encode with it, from its own
                sentence-transformers files (pooling, Normalize, prompts, token limits; see
                docs/any-retriever.md), each setting overridable by the options below.
            model: with a preset, other weights (hub id or folder) probed with the preset's settings; with
                ``auto``, the model (its query tower when ``passage_model`` is given).
            random_init: probe the architecture with fresh weights (the untrained control).
            init_seed: seed of those fresh weights.
            pooling: override the pooling (cls, mean, eos, lasttoken, max, mean_sqrt_len, weightedmean, or
                eos_reference: the published code's read of the last padded position, only to reproduce
                its numbers).
            label: the model's name in results, figures and reports (default: a readable name of the id).
            backbone: the pre-trained model (hub id or folder) this one was fine-tuned from: probed too,
                read with this model's settings, labelled ``<backbone>@<label>``, and compared with it
                by ``dkacq report``.
            passage_model: ``auto``: a separate passage tower (hub id or folder; two-tower retrievers).
            lora_adapter: ``auto``: a peft LoRA adapter (hub id or folder) merged into ``model``.
            settings_from: ``auto``: read the settings from this model's files instead of ``model``'s.
            query_prefix: ``auto``: text put before every query (default: the model's query prompt).
            passage_prefix: ``auto``: text put before every passage (default: its document prompt).
            normalize: ``auto``: L2-normalise every layer's pooled vector (default: whether the model
                has a Normalize module).
            query_max_length: ``auto``: token limit of queries (default: the model's).
            passage_max_length: ``auto``: token limit of passages (default: the model's).
            dataset: the data set's name in results tables (nq, msmarco, demo, ...).
            source: demo (shipped), dpr (DPR retriever JSON), msmarco (v1.1 rows), published (the study's
                preprocessed sets), local (JSONL/Parquet in the probe-example columns), or a collection
                (docs/collections.md): beir (a BEIR folder, ``path``), trec (qrels files as train_file and
                test_file, ``collection.corpus_file``, ``collection.queries_file``) or ir_datasets
                (``dataset_id``).
            train_file: the train split's file (dpr, msmarco, published, local; trec: train qrels).
            test_file: the test split's file; for NQ the DPR dev file, as in the study (trec: test qrels).
            hub_id: a Hugging Face data set id for msmarco or published.
            path: a BEIR folder (source beir).
            dataset_id: an ir_datasets id, e.g. beir/scifact/test (source ir_datasets).
            negatives: where negatives come from: file (the source's own; for a collection its passages
                judged not relevant), bm25 (mined with bm25s over the whole corpus), dense (a model's last
                layer over the whole corpus: collection.dense_model, else this model) or random.
            collection: how a collection becomes examples: relevance threshold, ranks and number of
                mined negatives, seed, near-duplicate exclusion, split by query.
            num_passages: N, passages per example: the positive and N - 1 of its (up to 4) negatives
                (2..5); an example with fewer than N - 1 negatives is left out at this N.
            layers: hidden states to probe, 0 being the embedding output; all of them when not given.
            max_examples: keep only the first this many examples of each split, for quick runs of
                large models on a CPU; all when not given.
            batch_size: examples per optimizer step (the study: 32,768).
            val_fraction: share of the train split held out for choosing the best epoch (the study: 0.01).
            seed: seed of the train/validation split and of the validation and test passage draws, which
                are therefore the same for every model.
            standardize: scale every dimension of the query and passage vectors to zero mean and unit
                variance, with statistics of the training examples.
            cache_dir: folder of probe sets and embedding caches.
            cache_name: folder name of this encoder's cache within ``cache_dir/dataset`` (default: the
                preset's name, with the model, pooling and random-init seed it was given); a cache
                built with other settings is never reused: it is an error.
            cache_dtype: float32, float16 or bfloat16 storage of cached vectors.
            extraction_batch_size: texts per forward pass while caching; ``auto``: the largest power of two
                that fits the device's memory for the longest text (``dkacq/encoders/memory.py``), at most
                1,024 on a GPU and 64 on a CPU; the manifest records the number used.
            extraction_precision: Lightning precision while caching; bf16-true on a GPU by default.
            verify_cache: check each cache file's sha256 against the manifest when this process first
                reads it (one more sequential read of the file; see benchmarks/cache_verify.py); false
                checks sizes alone (always checked).
        """
        super().__init__()
        check_num_passages(num_passages)
        if layers is not None and not layers:
            raise ValueError(
                "data.layers is empty: give the hidden states to probe (e.g. [0, 6]), or leave it out for all"
            )
        check_folder(cache_dir, "data.cache_dir")
        if max_examples is not None and max_examples < 2:
            raise ValueError(f"max_examples must be at least 2, got {max_examples}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        check_dataset_name(dataset, source)
        self.collection = collection_options(collection)
        # ``normalize`` is kept out of hparams: the probe has an option of that name, and Lightning refuses
        # two modules whose hparams disagree on a name.
        self.save_hyperparameters(ignore=["normalize"])
        self.normalize = normalize
        self.preset = self.encoder_preset()
        self.miner = probe_set_miner(self.hparams, self.collection, self.preset)
        self.folder = Path(cache_dir) / dataset
        self.layer: int | None = layers[0] if layers and len(layers) == 1 else None
        self.cache: EmbeddingCache | None = None
        self._request: dict | None = None

    def _option(self, key: str):
        return self.normalize if key == "normalize" else self.hparams[key]

    def auto_encoder(self) -> AutoEncoder | None:
        """The ``auto`` encoder these options describe (None for a preset)."""
        options = {key: self._option(key) for key in (*AUTO_OPTIONS, "label")}
        if self.hparams.encoder != "auto":
            return None
        if self.hparams.model is None:
            raise ValueError("data.encoder auto needs data.model: the hub id or folder of the model to probe")
        hparams = self.hparams
        return AutoEncoder(
            hparams.model,
            pooling=hparams.pooling,
            random_init=hparams.random_init,
            init_seed=hparams.init_seed,
            **options,
        )

    def encoder_preset(self) -> EncoderPreset:
        """The encoder these options give: a preset (with other weights, pooling or label if given) or
        the ``auto`` encoder's settings, read from the model's files before anything is built."""
        hparams = self.hparams
        auto = self.auto_encoder()
        if auto is None:
            given = [f"data.{key}" for key in AUTO_OPTIONS if self._option(key) is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} apply to data.encoder auto; the preset {hparams.encoder} has fixed settings "
                    "(give data.encoder auto with data.model to read any model)"
                )
        if hparams.backbone and hparams.random_init:
            raise ValueError("data.backbone compares trained weights; a random_init control has none: drop one")
        if auto is not None:
            return auto.preset()
        preset = get_preset(hparams.encoder, model=hparams.model, pooling=hparams.pooling)
        if hparams.label:
            preset = replace(preset, label=check_label(hparams.label))
        return preset.randomized(hparams.init_seed) if hparams.random_init else preset

    def backbone_options(self) -> dict | None:
        """The ``data`` options that probe ``backbone`` read as this model is (None without one)."""
        hparams = self.hparams
        if not hparams.backbone:
            return None
        label = backbone_label(hparams.backbone, self.preset.label)
        options = {"model": hparams.backbone, "label": label, "backbone": None, "cache_name": None}
        if hparams.encoder == "auto":
            options |= {"passage_model": None, "lora_adapter": None}
            options["settings_from"] = hparams.settings_from or hparams.model
        return options

    @property
    def probe_set_folder(self) -> Path:
        return probe_set_folder(self.hparams, self.miner)

    @property
    def embeddings_folder(self) -> Path:
        limit = f"-first{self.hparams.max_examples}" if self.hparams.max_examples else ""
        return self.folder / (self.hparams.cache_name or self.preset.name + limit)

    def load_probe_set(self) -> tuple[DatasetDict, str]:
        """The probe set (its first ``max_examples`` per split, if set) and its fingerprint."""
        hparams = self.hparams
        probe_set, data_fingerprint = load_probe_set(hparams, self.collection, self.miner)
        if hparams.max_examples:
            probe_set = DatasetDict(
                {name: split.select(range(min(hparams.max_examples, len(split)))) for name, split in probe_set.items()}
            )
            mined = {"probe_set": data_fingerprint} if hparams.source in COLLECTION_FORMATS else None
            data_fingerprint = fingerprint(probe_set, mined)
        return probe_set, data_fingerprint

    @property
    def precision(self) -> str:
        return self.hparams.extraction_precision or extraction.default_precision()

    def cache_request(self) -> dict:
        """What the cache must have been built from (computed once: it hashes data and weights)."""
        if self._request is None:
            _, data_fingerprint = self.load_probe_set()
            self._request = embedding_request(self.preset, data_fingerprint, self.hparams.cache_dtype, self.precision)
        return self._request

    @cached_property
    def num_hidden_states(self) -> int:
        """Hidden states of the encoder (the embedding output included), read from its config file."""
        counts = {
            loading.model_config(source).num_hidden_layers + 1 for source in (self.preset.query, self.preset.passage)
        }
        if len(counts) != 1:
            raise ValueError(f"{self.preset.name}: query and passage encoders have different numbers of layers")
        return counts.pop()

    def check_split_sizes(self) -> None:
        """Refuse, before the cache is built, splits too small to probe: a test split needs 2 examples
        (one gives no accuracy worth a row, and its outcome file no pairs), a train split enough for one
        held-out validation example and one to train on."""
        probe_set, _ = self.load_probe_set()
        where = self.hparams.train_file or self.hparams.hub_id or self.hparams.source
        test, train = len(probe_set["test"]), len(probe_set["train"])
        if test < 2:
            where = self.hparams.test_file or where
            raise ValueError(f"{where}: the test split has {test} example(s); probing needs at least 2")
        num_val = validation_size(train, self.hparams.val_fraction)
        if train - num_val < 1:
            raise ValueError(
                f"{where}: the train split has {train} example(s), too few to hold out {num_val} for validation "
                f"(data.val_fraction={self.hparams.val_fraction}) and train on the rest"
            )

    def probed_layers(self) -> list[int]:
        """The layers to probe, checked against the model's config before anything is built."""
        layers = self.hparams.layers or list(range(self.num_hidden_states))
        for layer in layers:
            if not 0 <= layer < self.num_hidden_states:
                raise ValueError(f"layer {layer} outside 0..{self.num_hidden_states - 1} of {self.preset.name}")
        return layers

    def prepare_data(
        self,
        accelerator: str = "auto",
        devices: int | str = 1,
        num_nodes: int = 1,
        strategy: str = "auto",
        callbacks: Sequence[Callback] = (),
    ) -> None:
        """Build the cache unless a complete one of the same request exists, on the given devices.

        Global rank 0 builds under a file lock, so that a second job building the same cache waits and
        then reuses it; the other ranks of a distributed build (``ddp``, torchrun, SLURM) join rank 0's
        build without the lock, which rank 0 holds. The cache folder must be on a file system every
        node sees. ``callbacks`` join the build's trainer (the command's stop at a batch's end).
        """
        request = self.cache_request()
        distribution = dict(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
        if extraction.process_rank(**distribution) > 0:
            if open_cache(self.embeddings_folder, request) is None:
                self._build(request, distribution, callbacks)
            return
        try:  # a complete cache is read without its lock, which a read-only file system could not hold
            if open_cache(self.embeddings_folder, request) is not None:
                return
        except CacheDamagedError:
            pass  # checked again under the lock, and rebuilt
        with file_lock(self.embeddings_folder):
            try:
                if open_cache(self.embeddings_folder, request) is not None:
                    return
            except CacheDamagedError as error:
                log.warning("%s (rebuilding it now)", error)
            self._build(request, distribution, callbacks)

    def _build(self, request: dict, distribution: dict, callbacks: Sequence[Callback]) -> None:
        probe_set, _ = self.load_probe_set()
        query_encoder, passage_encoder = loading.load_encoders(self.preset)
        extraction.build_cache(
            self.embeddings_folder,
            request,
            query_encoder,
            passage_encoder,
            probe_set,
            self.hparams.extraction_batch_size,
            self.precision,
            self.hparams.cache_dtype,
            label=self.preset.label,
            callbacks=list(callbacks),
            **distribution,
        )

    def open(self) -> EmbeddingCache:
        """The prepared cache (``prepare_data`` must have run)."""
        if self.cache is None:
            self.cache = open_cache(self.embeddings_folder, self.cache_request(), self.hparams.verify_cache)
            if self.cache is None:
                raise FileNotFoundError(f"{self.embeddings_folder}: no embedding cache; run prepare_data first")
        return self.cache

    @property
    def hidden_size(self) -> int:
        return self.open().hidden_size

    def split_sizes(self) -> dict[str, int]:
        return {name: len(dataset) for name, dataset in self.datasets.items()}

    def cached_vectors(self) -> tuple[Tensor, Tensor]:
        """The probed layer's query and passage vectors as cached, before any standardisation (from
        :data:`LAYERS`, so a layer shared by several cells is still read once)."""
        return LAYERS.layer(self.open(), self.layer)

    def setup(self, stage: str | None = None) -> None:
        if self.layer is None:
            raise ValueError("ProbeDataModule.layer is not set: choose the hidden state to probe")
        cache = self.open()
        queries, passages = LAYERS.layer(cache, self.layer)
        train_query, train_passages = self._usable(*cache.index("train"), "train")
        test_query, test_passages = self._usable(*cache.index("test"), "test")
        order = torch.randperm(len(train_query), generator=torch.Generator().manual_seed(self.hparams.seed))
        num_val = validation_size(len(order), self.hparams.val_fraction)
        val_rows, train_rows = order[:num_val], order[num_val:]
        if self.hparams.standardize:
            queries, passages = self._standardize(
                queries, passages, train_query[train_rows], train_passages[train_rows]
            )
        seed, n = self.hparams.seed, self.hparams.num_passages
        self.datasets = {
            "train": ProbeExamples(
                queries, passages, train_query[train_rows], train_passages[train_rows], n, redraw_seed=seed
            ),
            "val": ProbeExamples(
                queries, passages, train_query[val_rows], train_passages[val_rows], n, fixed_seed=seed + 1
            ),
            "test": ProbeExamples(queries, passages, test_query, test_passages, n, fixed_seed=seed),
        }

    def _usable(self, query_rows: Tensor, passage_rows: Tensor, split: str) -> tuple[Tensor, Tensor]:
        """The examples with at least N - 1 negatives (all of them, unless a collection gave fewer)."""
        keep = (passage_rows[:, 1:] >= 0).sum(dim=1) >= self.hparams.num_passages - 1
        if not bool(keep.all()):
            log.info(
                "%s split: %d of %d examples have fewer than %d negatives and are left out at N = %d",
                split,
                int((~keep).sum()),
                len(keep),
                self.hparams.num_passages - 1,
                self.hparams.num_passages,
            )
            query_rows, passage_rows = query_rows[keep], passage_rows[keep]
        if not len(query_rows):
            raise ValueError(f"the {split} split has no example with {self.hparams.num_passages - 1} negatives")
        return query_rows, passage_rows

    def release(self) -> None:
        """Drop this module's vectors once its probe is done: a finished trainer may hold its loaders
        (and so the datasets) until garbage collection, which must not keep a layer alive."""
        for dataset in getattr(self, "datasets", {}).values():
            dataset.queries = dataset.passages = None
        self.datasets = {}

    @staticmethod
    def _standardize(
        queries: Tensor, passages: Tensor, query_rows: Tensor, passage_rows: Tensor
    ) -> tuple[Tensor, Tensor]:
        def scale(vectors: Tensor, rows: Tensor) -> Tensor:
            fitted = vectors[rows.unique()]
            return (vectors - fitted.mean(0)) / fitted.std(0).clamp_min(1e-6)

        return scale(queries, query_rows), scale(passages, passage_rows)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.datasets[split], batch_size=self.hparams.batch_size, shuffle=split == "train", collate_fn=_whole_batch
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
