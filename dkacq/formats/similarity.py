"""The folder of a ``dkacq compare`` run (``comparison.json``, ``similarity.csv``): its one owner.

``similarity.csv`` holds one row per (side, layer of model a, layer of model b) with
:data:`SIMILARITY_COLUMNS`: linear CKA, debiased CKA, the mean cosine of a text's two vectors (blank
where the two layers' widths differ), the number of texts, and the digests of the two embedding caches'
requests (``cache_a``, ``cache_b``: the exact weights, data, pooling and precision each was built
from; the requests themselves are in ``comparison.json``). ``comparison.json`` records what was
compared, how, how long it took, and the run's identity (both cache requests and every option that
changes a number): a folder holding another identity is refused, one holding the same is finished.
Both are written whole under a temporary name and renamed, ``comparison.json`` first: a folder with
``similarity.csv`` is a finished comparison.
"""

import csv
import json
from dataclasses import dataclass, fields
from pathlib import Path

from dkacq.formats.atomic import atomic_write, atomic_write_text
from dkacq.formats.errors import DkacqError
from dkacq.formats.identity import recorded_change

SUMMARY_FILE = "comparison.json"
ROWS_FILE = "similarity.csv"


class ComparisonConflictError(DkacqError):
    """A comparison folder holds the results of other caches or options."""


@dataclass(frozen=True)
class SimilarityRow:
    model_a: str
    model_b: str
    side: str
    """``query`` or ``passage``: which texts (and which cached vectors) were compared."""
    layer_a: int
    layer_b: int
    cka: float
    debiased_cka: float
    mean_cosine: float | None
    num_texts: int
    cache_a: str
    cache_b: str


SIMILARITY_COLUMNS = tuple(field.name for field in fields(SimilarityRow))


def _number(text: str) -> float | None:
    return float(text) if text else None


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.8g}" if isinstance(value, float) else str(value)


def diagonal_partner(layer_a: int, states_a: int, states_b: int) -> int:
    """The layer of model b at the relative depth of ``layer_a`` of model a, for models with ``states_a``
    and ``states_b`` hidden states (the same layer for models of equal depth)."""
    return round(layer_a * (states_b - 1) / max(states_a - 1, 1))


def write_comparison(folder: Path, summary: dict, rows: list[SimilarityRow]) -> Path:
    """Write ``comparison.json`` and then ``similarity.csv`` into ``folder``; the path of the rows."""
    folder = Path(folder)
    atomic_write_text(folder / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True))

    def write(temporary: Path) -> None:
        with temporary.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(SIMILARITY_COLUMNS)
            writer.writerows([_cell(getattr(row, name)) for name in SIMILARITY_COLUMNS] for row in rows)

    return atomic_write(folder / ROWS_FILE, write)


def finished(folder: Path, identity: dict) -> bool:
    """Whether ``folder`` holds the finished comparison of ``identity``; raises (one line) when it holds
    another one."""
    changed = recorded_change(Path(folder) / SUMMARY_FILE, identity)
    if changed is not None:
        raise ComparisonConflictError(
            f"{folder} holds a comparison of other caches or options ({changed}); give another out_dir, or remove it"
        )
    return (Path(folder) / SUMMARY_FILE).exists() and (Path(folder) / ROWS_FILE).exists()


@dataclass(frozen=True)
class Comparison:
    """A finished comparison folder, read."""

    folder: Path
    summary: dict
    rows: list[SimilarityRow]

    @classmethod
    def load(cls, folder: Path) -> "Comparison":
        folder = Path(folder)
        summary = json.loads((folder / SUMMARY_FILE).read_text())
        rows = []
        with (folder / ROWS_FILE).open(newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != SIMILARITY_COLUMNS:
                raise ValueError(
                    f"{folder / ROWS_FILE}: columns {reader.fieldnames}, expected {list(SIMILARITY_COLUMNS)}"
                )
            for number, record in enumerate(reader, 2):
                try:
                    rows.append(
                        SimilarityRow(
                            record["model_a"],
                            record["model_b"],
                            record["side"],
                            int(record["layer_a"]),
                            int(record["layer_b"]),
                            float(record["cka"]),
                            float(record["debiased_cka"]),
                            _number(record["mean_cosine"]),
                            int(record["num_texts"]),
                            record["cache_a"],
                            record["cache_b"],
                        )
                    )
                except ValueError as error:
                    raise ValueError(f"{folder / ROWS_FILE}, line {number}: {error}") from None
        return cls(folder, summary, rows)

    @property
    def model_a(self) -> str:
        return self.summary["model_a"]

    @property
    def model_b(self) -> str:
        return self.summary["model_b"]

    @property
    def sides(self) -> list[str]:
        return list(dict.fromkeys(row.side for row in self.rows))

    def layers(self, which: str) -> list[int]:
        """The layers of model ``a`` or ``b`` that the rows hold, in order."""
        return sorted({getattr(row, f"layer_{which}") for row in self.rows})

    def diagonal(self, side: str) -> list[SimilarityRow]:
        """The rows that pair a layer of a with the layer of b at the same relative depth (the same layer
        for two models of equal depth), by layer of a."""
        states = self.summary["num_hidden_states"]
        return sorted(
            (
                row
                for row in self.rows
                if row.side == side and row.layer_b == diagonal_partner(row.layer_a, states["a"], states["b"])
            ),
            key=lambda row: row.layer_a,
        )
