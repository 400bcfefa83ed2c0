"""The attribution run folder (``summary.json`` and ``counts.safetensors``): its one owner.

``counts.safetensors`` holds, per module kind and activity threshold, how many texts each neuron was
active in: an int64 ``[num_layers, num_neurons]`` tensor keyed ``"{kind}@{threshold:g}"``
(``"intermediate@0.1"``), and under ``"num_texts"`` the number of texts counted, a 0-dim int64 tensor.
``summary.json`` records how the counts were made (model, pooling, texts, thresholds, and per kind its
``side``, ``num_layers`` and ``num_neurons``) and the run's identity. Both files are written whole
under a temporary name and renamed, the summary first: a folder with counts is a finished run.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from dkacq.formats.atomic import atomic_write, atomic_write_text

SUMMARY_FILE = "summary.json"
COUNTS_FILE = "counts.safetensors"
NUM_TEXTS_KEY = "num_texts"
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
