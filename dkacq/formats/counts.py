"""The attribution run folder (``summary.json`` and ``counts.safetensors``): its one owner.

``counts.safetensors`` holds, per module kind and activity threshold, how many texts each neuron was
active in: an int64 ``[num_layers, num_neurons]`` tensor keyed ``"{kind}@{threshold:g}"``
(``"intermediate@0.1"``), and under ``"num_texts"`` the number of texts counted, a 0-dim int64 tensor.
``summary.json`` records how the counts were made (model, pooling, texts, thresholds, and per kind its
``side``, ``num_layers`` and ``num_neurons``) and the run's identity. Both files are written whole
under a temporary name and renamed, the summary first: a folder with counts is a finished run.

While a run is in progress, ``progress/<segment>.safetensors`` files hold what each process has counted
so far: its counts (as in ``counts.safetensors``), and in the metadata the keys of the texts it counted
(:func:`text_key`) and the run's identity. Each process rewrites its own segment after every batch, whole
or not at all, so a run killed at any moment resumes from the texts its segments hold; segments of one
run never share a text. They are removed once ``counts.safetensors`` is written.
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


def counts_tensors(counts: Mapping[tuple[str, float], torch.Tensor], num_texts: int) -> dict[str, torch.Tensor]:
    """The tensors of ``counts.safetensors`` from ``(kind, threshold)`` -> int64 ``[num_layers, num_neurons]``."""
    tensors = {counts_key(kind, threshold): count.cpu().contiguous() for (kind, threshold), count in counts.items()}
    tensors[NUM_TEXTS_KEY] = torch.tensor(num_texts, dtype=torch.int64)
    return tensors


def split_counts_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[tuple[str, float], torch.Tensor], int]:
    """The inverse of :func:`counts_tensors`: ``(kind, threshold)`` -> counts, and the number of texts."""
    counts = {parse_counts_key(key): value for key, value in tensors.items() if key != NUM_TEXTS_KEY}
    return counts, int(tensors[NUM_TEXTS_KEY])


def write_counts(folder: Path, counts: Mapping[tuple[str, float], torch.Tensor], num_texts: int) -> Path:
    """Write ``folder/counts.safetensors``; call it after :func:`write_summary`."""
    tensors = counts_tensors(counts, num_texts)
    return atomic_write(Path(folder) / COUNTS_FILE, lambda temporary: save_file(tensors, str(temporary)))


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


def write_segment(folder: Path, name: str, segment: Segment) -> Path:
    """Write (or replace) ``folder/progress/<name>.safetensors`` whole."""
    tensors = counts_tensors(segment.counts, segment.num_texts)
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

    @classmethod
    def load(cls, run_dir: Path) -> "AttributionRun":
        run_dir = Path(run_dir)
        return cls(run_dir, read_summary(run_dir), load_file(str(run_dir / COUNTS_FILE)))

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

    def active_percentage(self, side: str, threshold: float) -> float:
        """Percentage of active (neuron, text) pairs over every neuron of the side's modules and layers."""
        counts = [self.counts_at(kind, threshold).ravel() for kind in self.kinds if self.side(kind) == side]
        return float(np.concatenate(counts).mean() / self.num_texts * 100)
