"""The attribution run folder (``summary.json`` and ``counts.safetensors``): its one owner.

``counts.safetensors`` holds, per module kind and activity threshold, how many texts each neuron was
active in: an int64 ``[num_layers, num_neurons]`` tensor keyed ``"{kind}@{threshold:g}"``
(``"intermediate@0.1"``), and under ``"num_texts"`` the number of texts counted, a 0-dim int64 tensor.
``summary.json`` records how the counts were made (model, pooling, texts, thresholds, and per kind its
``side``, ``num_layers`` and ``num_neurons``) and the run's identity. Both files are written whole
under a temporary name and renamed, the summary first: a folder with counts is a finished run.

**Per-text counts** (written since per-text tables were added; a file without them is read as before):
``counts.safetensors`` also holds, per kind and threshold, how many neurons of each module were active in
each text: an int32 ``[num_texts, num_layers]`` tensor keyed ``"per_text/{kind}@{threshold:g}"``
(:func:`per_text_key`), whose row ``i`` is the text named by the ``i``-th entry of the file's metadata
``"text_keys"`` (a JSON list of :func:`text_key` values, in the order of the run's text set). Its column
sums are the row sums of the per-neuron counts (``per_text.sum(0) == counts.sum(1)``). Two runs over
the same texts are paired row by row through their text keys (:meth:`AttributionRun.per_text_by_key`).
The table is small (texts x layers per kind and threshold).

**Per-text active sets**: which neurons were active in each text, bit-packed, beside the per-text counts:
a uint8 ``[num_texts, num_layers, ceil(num_neurons / 8)]`` tensor keyed
``"per_text/active:{kind}@{threshold:g}"`` (:func:`active_kind`), rows as above; bit ``j`` (least
significant first) of byte ``b`` is neuron ``8 b + j`` (:func:`pack_active`, :func:`unpack_active`,
``numpy.unpackbits(..., bitorder="little")``). One bit per (text, neuron): 1,000 texts of a 7B Llama's
gate and down projections take 60 MB per threshold, all-MiniLM-L6-v2's 1.4 MB. Neuron overlap between
two runs (:mod:`dkacq.report.neuron_overlap`) reads them.

While a run is in progress, ``progress/<segment>.safetensors`` files hold what each process has counted
so far: its counts (as in ``counts.safetensors``), its per-text tables (rows in the order of its texts),
and in the metadata the keys of the texts it counted (:func:`text_key`) and the run's identity. Each
process rewrites its own segment after every batch, whole or not at all, so a run killed at any moment
resumes from the texts its segments hold; segments of one run never share a text. They are removed once
``counts.safetensors`` is written.
"""

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file

from dkacq.formats.atomic import atomic_write, atomic_write_text
from dkacq.formats.identity import canonical

SUMMARY_FILE = "summary.json"
COUNTS_FILE = "counts.safetensors"
NUM_TEXTS_KEY = "num_texts"
PER_TEXT_PREFIX = "per_text/"
TEXT_KEYS_METADATA = "text_keys"
PROGRESS_DIR = "progress"
SIDES: tuple[str, ...] = ("intermediate", "output")
"""The sides a kind can belong to in ``summary.json``, in the order the report shows them: the wide
hidden side of the feed-forward block, then its projection back to the model width."""


def counts_key(kind: str, threshold: float) -> str:
    """The key of one kind's counts at one threshold in ``counts.safetensors``."""
    return f"{kind}@{threshold:g}"


def parse_counts_key(key: str) -> tuple[str, float]:
    """``(kind, threshold)`` of a key written by :func:`counts_key`."""
    kind, threshold = key.rsplit("@", 1)
    return kind, float(threshold)


ACTIVE_PREFIX = "active:"


def active_kind(kind: str) -> str:
    """The per-text table name of a kind's bit-packed active sets (its per-text counts are under ``kind``)."""
    return ACTIVE_PREFIX + kind


def pack_active(active: torch.Tensor) -> torch.Tensor:
    """bool ``[..., neurons]`` -> uint8 ``[..., ceil(neurons / 8)]``, neuron ``8 b + j`` in bit ``j`` of byte ``b``."""
    padded = torch.nn.functional.pad(active.to(torch.uint8), (0, -active.shape[-1] % 8))
    weights = 2 ** torch.arange(8, device=active.device, dtype=torch.uint8)
    return (padded.view(*active.shape[:-1], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_active(packed: np.ndarray, num_neurons: int) -> np.ndarray:
    """The inverse of :func:`pack_active`, as a bool array ``[..., num_neurons]``."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=num_neurons, bitorder="little").astype(bool)


def per_text_key(kind: str, threshold: float) -> str:
    """The key of one kind's per-text table at one threshold in ``counts.safetensors``."""
    return PER_TEXT_PREFIX + counts_key(kind, threshold)


PerTextTables = dict[tuple[str, float], torch.Tensor]
"""``(kind, threshold)`` -> int32 ``[num_texts, num_layers]``: active neurons per text and module."""


@dataclass(frozen=True)
class PerTextCounts:
    """Per text and module, how many of the module's neurons were active (and, under :func:`active_kind`
    names, which), with the texts' keys."""

    texts: list[str]
    """The :func:`text_key` of each row's text."""
    tables: PerTextTables

    def __post_init__(self):
        for key, table in self.tables.items():
            if table.dim() < 2 or table.shape[0] != len(self.texts):
                raise ValueError(
                    f"per-text table {key} has shape {tuple(table.shape)}, not [{len(self.texts)}, layers, ...]"
                )

    def ordered(self, order: list[str]) -> "PerTextCounts":
        """The rows in the order of ``order`` (text keys), which must name exactly these texts."""
        if sorted(order) != sorted(self.texts):
            raise ValueError("per-text rows and the text set differ")
        row = {key: index for index, key in enumerate(self.texts)}
        index = torch.tensor([row[key] for key in order], dtype=torch.int64)
        return PerTextCounts(list(order), {key: table.index_select(0, index) for key, table in self.tables.items()})


def join_per_text(parts: Iterable[PerTextCounts]) -> PerTextCounts:
    """The rows of several parts (of disjoint texts) one after another."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to join")
    keys = set(parts[0].tables)
    if any(set(part.tables) != keys for part in parts):
        raise ValueError("per-text parts hold different kinds or thresholds")
    texts = [text for part in parts for text in part.texts]
    if len(set(texts)) != len(texts):
        raise ValueError("per-text parts share a text")
    return PerTextCounts(texts, {key: torch.cat([part.tables[key].cpu() for part in parts]) for key in keys})


def counts_tensors(
    counts: Mapping[tuple[str, float], torch.Tensor], num_texts: int, per_text: PerTextTables | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of ``counts.safetensors`` from ``(kind, threshold)`` -> int64 ``[num_layers, num_neurons]``,
    and the per-text tables if given."""
    tensors = {counts_key(kind, threshold): count.cpu().contiguous() for (kind, threshold), count in counts.items()}
    tensors[NUM_TEXTS_KEY] = torch.tensor(num_texts, dtype=torch.int64)
    for (kind, threshold), table in (per_text or {}).items():
        dtype = torch.uint8 if kind.startswith(ACTIVE_PREFIX) else torch.int32
        tensors[per_text_key(kind, threshold)] = table.cpu().to(dtype).contiguous()
    return tensors


def split_counts_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[tuple[str, float], torch.Tensor], int]:
    """The inverse of :func:`counts_tensors` for the per-neuron counts: ``(kind, threshold)`` -> counts, and
    the number of texts (per-text tables are left out: :func:`split_per_text_tensors`)."""
    counts = {
        parse_counts_key(key): value
        for key, value in tensors.items()
        if key != NUM_TEXTS_KEY and not key.startswith(PER_TEXT_PREFIX)
    }
    return counts, int(tensors[NUM_TEXTS_KEY])


def split_per_text_tensors(tensors: Mapping[str, torch.Tensor]) -> PerTextTables:
    """The per-text tables among the tensors of a counts file or segment; empty for a file without them."""
    return {
        parse_counts_key(key.removeprefix(PER_TEXT_PREFIX)): value
        for key, value in tensors.items()
        if key.startswith(PER_TEXT_PREFIX)
    }


def write_counts(
    folder: Path,
    counts: Mapping[tuple[str, float], torch.Tensor],
    num_texts: int,
    per_text: PerTextCounts | None = None,
) -> Path:
    """Write ``folder/counts.safetensors``; call it after :func:`write_summary`. ``per_text``, when given,
    must hold one row per counted text."""
    if per_text is not None and len(per_text.texts) != num_texts:
        raise ValueError(f"per-text counts hold {len(per_text.texts)} texts, the counts {num_texts}")
    tensors = counts_tensors(counts, num_texts, per_text.tables if per_text is not None else None)
    metadata = {TEXT_KEYS_METADATA: json.dumps(per_text.texts)} if per_text is not None else None
    return atomic_write(
        Path(folder) / COUNTS_FILE, lambda temporary: save_file(tensors, str(temporary), metadata=metadata)
    )


def write_summary(folder: Path, summary: dict) -> Path:
    return atomic_write_text(Path(folder) / SUMMARY_FILE, json.dumps(summary, indent=2))


def read_summary(folder: Path) -> dict:
    return json.loads((Path(folder) / SUMMARY_FILE).read_text())


def text_key(text: str) -> str:
    """A short content hash naming a text in progress segments (the texts of a run are distinct)."""
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Segment:
    """What one process of one run had counted when it last saved."""

    counts: dict[tuple[str, float], torch.Tensor]
    num_texts: int
    texts: list[str]
    """The :func:`text_key` of every text counted."""
    identity: dict | None
    per_text: PerTextTables | None = None
    """Per-text tables whose rows follow :attr:`texts`; None in segments written before they existed."""

    def per_text_counts(self) -> PerTextCounts | None:
        return PerTextCounts(list(self.texts), self.per_text) if self.per_text else None


def write_segment(folder: Path, name: str, segment: Segment) -> Path:
    """Write (or replace) ``folder/progress/<name>.safetensors`` whole."""
    tensors = counts_tensors(segment.counts, segment.num_texts, segment.per_text)
    metadata = {"texts": json.dumps(segment.texts), "identity": canonical(segment.identity or {})}
    path = Path(folder) / PROGRESS_DIR / f"{name}.safetensors"
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def read_segments(folder: Path) -> list[Segment]:
    """The progress segments of an unfinished run in ``folder`` (none for a fresh or finished one)."""
    segments = []
    for path in sorted((Path(folder) / PROGRESS_DIR).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
        counts, num_texts = split_counts_tensors(tensors)
        segments.append(
            Segment(
                counts,
                num_texts,
                json.loads(metadata.get("texts", "[]")),
                json.loads(metadata.get("identity", "{}")) or None,
                split_per_text_tensors(tensors) or None,
            )
        )
    return segments


def sum_segments(segments: Iterable[Segment]) -> tuple[dict[tuple[str, float], torch.Tensor], int]:
    """The counts and number of texts of several segments together."""
    total: dict[tuple[str, float], torch.Tensor] = {}
    num_texts = 0
    for segment in segments:
        for key, count in segment.counts.items():
            total[key] = total[key] + count if key in total else count.clone()
        num_texts += segment.num_texts
    return total, num_texts


def clear_segments(folder: Path) -> None:
    for path in (Path(folder) / PROGRESS_DIR).glob("*.safetensors"):
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class AttributionRun:
    """A finished attribution run folder, read: its summary and its counts as numpy arrays."""

    run_dir: Path
    summary: dict
    tensors: dict[str, np.ndarray]
    """The tensors of ``counts.safetensors`` as stored; read them through :meth:`counts_at`."""
    text_keys: tuple[str, ...] | None = None
    """The :func:`text_key` of each per-text row; None for a file without per-text tables."""

    @classmethod
    def load(cls, run_dir: Path) -> "AttributionRun":
        run_dir = Path(run_dir)
        path = str(run_dir / COUNTS_FILE)
        with safe_open(path, framework="numpy") as file:
            metadata = file.metadata() or {}
        keys = metadata.get(TEXT_KEYS_METADATA)
        return cls(run_dir, read_summary(run_dir), load_file(path), tuple(json.loads(keys)) if keys else None)

    @property
    def model(self) -> str:
        """The model's label, as in results tables."""
        return self.summary["model"]

    @property
    def pooling(self) -> str:
        return self.summary["pooling"]

    @property
    def dataset(self) -> str:
        return self.summary["dataset"]

    @property
    def split(self) -> str:
        return self.summary["split"]

    @property
    def text_side(self) -> str:
        """Which encoder read the texts: ``query`` or ``passage``."""
        return self.summary["text_side"]

    @property
    def target(self) -> str:
        """What the scores explain: ``norm`` (also for runs written before targets were recorded),
        ``relevance`` or ``margin``."""
        return self.summary.get("target", "norm")

    @property
    def num_texts(self) -> int:
        return int(self.tensors[NUM_TEXTS_KEY])

    @property
    def thresholds(self) -> list[float]:
        """In the order the run recorded them."""
        return [float(t) for t in self.summary["thresholds"]]

    def default_threshold(self) -> float:
        return self.thresholds[0]

    @property
    def kinds(self) -> list[str]:
        """Module kinds, ordered by side (:data:`SIDES`), then by name."""
        return sorted(self.summary["kinds"], key=lambda kind: (SIDES.index(self.side(kind)), kind))

    def side(self, kind: str) -> str:
        return self.summary["kinds"][kind]["side"]

    def num_neurons(self, kind: str) -> int:
        """Neurons per layer of the kind's modules."""
        return int(self.summary["kinds"][kind]["num_neurons"])

    def counts_at(self, kind: str, threshold: float) -> np.ndarray:
        """``[layers, neurons]``: number of texts in which each neuron is active."""
        key = counts_key(kind, threshold)
        if key not in self.tensors:
            raise KeyError(f"{self.run_dir} has no counts '{key}'; thresholds: {self.thresholds}")
        return self.tensors[key]

    @property
    def has_per_text(self) -> bool:
        return self.text_keys is not None and any(key.startswith(PER_TEXT_PREFIX) for key in self.tensors)

    def per_text_at(self, kind: str, threshold: float) -> np.ndarray:
        """``[texts, layers]``: per text (rows in :attr:`text_keys` order), how many neurons of each layer's
        module of the kind were active. Raises ``KeyError`` for a run without per-text tables."""
        key = per_text_key(kind, threshold)
        if self.text_keys is None or key not in self.tensors:
            raise KeyError(
                f"{self.run_dir} has no per-text counts '{key}' (written by a dkacq without them, or other thresholds)"
            )
        return self.tensors[key]

    @property
    def has_active_sets(self) -> bool:
        return self.has_per_text and any(key.startswith(PER_TEXT_PREFIX + ACTIVE_PREFIX) for key in self.tensors)

    def active_sets(self, kind: str, threshold: float, keys: Iterable[str] | None = None) -> np.ndarray:
        """bool ``[texts, layers, neurons]``: which neurons were active in each text (rows in ``keys`` order,
        default :attr:`text_keys`). Raises ``KeyError`` for a run that did not store them."""
        packed = (
            self.per_text_at(active_kind(kind), threshold)
            if keys is None
            else self.per_text_by_key(active_kind(kind), threshold, keys)
        )
        return unpack_active(packed, self.num_neurons(kind))

    def per_text_by_key(self, kind: str, threshold: float, keys: Iterable[str]) -> np.ndarray:
        """:meth:`per_text_at` with its rows in the order of ``keys`` (text keys this run counted)."""
        row = {key: index for index, key in enumerate(self.text_keys or ())}
        keys = list(keys)
        missing = [key for key in keys if key not in row]
        if missing:
            raise KeyError(f"{self.run_dir} did not count {len(missing)} of the texts asked for")
        return self.per_text_at(kind, threshold)[[row[key] for key in keys]]

    def active_percentage(self, side: str, threshold: float) -> float:
        """Percentage of active (neuron, text) pairs over every neuron of the side's modules and layers."""
        counts = [self.counts_at(kind, threshold).ravel() for kind in self.kinds if self.side(kind) == side]
        return float(np.concatenate(counts).mean() / self.num_texts * 100)
