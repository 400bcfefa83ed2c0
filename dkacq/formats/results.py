"""The results table (``results.csv``) and the per-example outcome files of probes: their one owner.

A row is one tested probe, or one untrained baseline (``probe`` is then the baseline's name, see
:mod:`dkacq.probe.baselines`). Its cell (dataset, model, pooling, N, layer, head) is what a report shows;
its ``cell_id`` is the digest of every option and input that produced it (:mod:`dkacq.formats.identity`),
whose full text is stored in the row's outcome file. A table never holds two rows of one cell with
different identities: such a write is refused, because a report could not tell which one to show.
Writes take a file lock, so concurrent processes never lose each other's rows.

Every accuracy comes with its Wilson 95% interval (``test_acc_low``, ``test_acc_high``,
:func:`accuracy_values`); a trained probe's row also says how its fit went (:data:`CONVERGENCE_COLUMNS`).
"""

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file

from dkacq.formats.atomic import atomic_write, file_lock
from dkacq.formats.errors import DkacqError
from dkacq.formats.identity import canonical, differences, digest

RESULT_COLUMNS = (
    "dataset",
    "model",
    "pooling",
    "num_passages",
    "layer",
    "probe",
    "best_epoch",
    "val_acc",
    "test_acc",
    "test_acc_low",
    "test_acc_high",
    "num_train",
    "num_val",
    "num_test",
    "preset",
    "random_init",
    "init_seed",
    "standardize",
    "max_examples",
    "max_epochs",
    "epochs_run",
    "optimizer_steps",
    "best_is_last",
    "fit_seconds",
    "early_stopping",
    "learning_rate",
    "rank",
    "normalize",
    "batch_size",
    "val_fraction",
    "seed",
    "precision",
    "weights",
    "data_fingerprint",
    "cell_id",
    "config",
    "predictions",
)
CELL_KEY = ("dataset", "model", "pooling", "num_passages", "layer", "probe")
"""The columns a report shows a row under."""
CONVERGENCE_COLUMNS = ("epochs_run", "optimizer_steps", "best_is_last", "fit_seconds", "early_stopping")
"""How a probe's fit went: epochs trained, optimizer steps, whether the best validation epoch (the tested
checkpoint) was the last one validated (1/0), the fit's wall time in seconds, and the early stopping
rule (``<monitor> <mode>, patience <p>``; blank for a fixed number of epochs). Blank for a row written
by ``dkacq test`` alone, which keeps those of the row it replaces (:func:`upsert_result`'s ``keep``)."""
CONFIDENCE = 0.95
"""Level of the Wilson intervals in ``test_acc_low`` and ``test_acc_high``."""


def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``successes / trials``.

    ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with z the normal quantile of
    ``(1 + confidence) / 2``: unlike the normal (Wald) interval it stays inside [0, 1] and keeps close
    to its level at accuracies near 0 or 1 and for small test sets. Raises for ``trials < 1``.
    """
    if trials < 1:
        raise ValueError(f"an interval needs at least one trial, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in 0..{trials}, got {successes}")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def accuracy_values(correct: torch.Tensor | np.ndarray) -> dict[str, str]:
    """``test_acc`` and its Wilson interval (``test_acc_low``, ``test_acc_high``) from per-example
    correctness, as the table stores them (5 decimals)."""
    flags = np.asarray(correct).astype(bool).reshape(-1)
    if flags.size == 0:
        raise ValueError("no test examples: an accuracy needs at least one")
    low, high = wilson_interval(int(flags.sum()), int(flags.size))
    return {"test_acc": f"{flags.mean():.5f}", "test_acc_low": f"{low:.5f}", "test_acc_high": f"{high:.5f}"}


class ResultConflictError(ValueError):
    """A results table already holds this cell from other settings."""


@dataclass(frozen=True)
class ProbeCell:
    """One probe to fit: what a report shows it as, and the identity of everything that produced it."""

    dataset: str
    model: str
    pooling: str
    num_passages: int
    layer: int
    probe: str
    identity: dict

    @property
    def id(self) -> str:
        return digest(self.identity)

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(str(getattr(self, column)) for column in CELL_KEY)

    @property
    def name(self) -> str:
        """File name of the cell's outputs: readable, and unique to its identity."""
        return f"{self.dataset}-{self.model}-{self.pooling}-N{self.num_passages}-{self.probe}-layer{self.layer:02d}-{self.id}"

    @property
    def label(self) -> str:
        return f"{self.dataset} {self.model} {self.pooling} N={self.num_passages} layer {self.layer} {self.probe}"


class ResultsTableError(DkacqError):
    """A results table that dkacq cannot read or write as it is: another program's table, one cut short,
    one that cannot be written."""


REQUIRED_COLUMNS = (*CELL_KEY, "test_acc")
"""The columns without which a table is not one of dkacq's (every version of the table has had them;
a report also reads tables made by hand with these columns)."""


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a results table (none when it does not exist or is empty).

    Refused in one line naming the file, and the line where it applies: a header that is not dkacq's
    (another program's table, or one saved with ``;`` separators), a row whose number of fields differs
    from the header's, and a table whose last row is cut short (no end of line, or an open quote).
    Columns that dkacq does not write (a user's notes) are read and kept.
    """
    try:
        with open(path, encoding="utf-8", newline="") as file:
            data = file.read()
    except FileNotFoundError:
        return [], []
    except UnicodeDecodeError as error:
        raise ResultsTableError(f"{path}: not a text file ({error.reason} at byte {error.start})") from None
    if not data.strip():
        return [], []
    try:
        records = list(csv.reader(io.StringIO(data), strict=True))
    except csv.Error as error:
        raise ResultsTableError(f"{path}: {error}; the table may have been cut short") from None
    header = records[0]
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        separator = next((mark for mark in (";", "\t", "|") if len(header) == 1 and mark in header[0]), None)
        how = f"its fields are separated by '{separator}', dkacq's by ','" if separator else f"no {', '.join(missing)}"
        raise ResultsTableError(
            f"{path}: not a dkacq results table ({how}); give dkacq another results.run_dir, or save it as dkacq wrote it"
        )
    if not data.endswith("\n"):
        raise ResultsTableError(
            f"{path}: its last row (line {len(records)}) is cut short (no end of line); remove or complete that row"
        )
    rows = []
    for number, record in enumerate(records[1:], 2):
        if not record:
            continue
        if len(record) != len(header):
            raise ResultsTableError(
                f"{path}: line {number} has {len(record)} fields where the header has {len(header)}; "
                "remove or repair that row"
            )
        rows.append(dict(zip(header, record)))
    return header, rows


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a results table (none when it does not exist yet), checked by :func:`read_table`."""
    return read_table(path)[1]


OUTCOME_COLUMNS = ("index", "label", "prediction", "correct")
"""Columns of the CSV copy of an outcome file, one row per test example."""


def outcomes_csv_path(path: Path) -> Path:
    """The CSV copy beside the safetensors outcome file ``path``: same name, ``.csv``."""
    return Path(path).with_suffix(".csv")


def write_predictions(path: Path, outcomes: dict[str, torch.Tensor], identity: dict) -> None:
    """Per-example outcomes of a tested probe, with the identity of the cell in the file's metadata.

    A CSV copy with the columns :data:`OUTCOME_COLUMNS` goes beside it (:func:`outcomes_csv_path`), so
    that the outcomes can be read without dkacq (spreadsheets, pandas, R, awk): CSV rather than Parquet,
    because the table is a few thousand small integers per probe, ``results.csv`` is CSV already, and
    a reader then needs no pyarrow. ``index`` defaults to 0, 1, ... when ``outcomes`` has none.
    """
    columns = {
        name: [int(v) for v in outcomes[name].reshape(-1).tolist()] for name in OUTCOME_COLUMNS if name in outcomes
    }
    missing = [name for name in ("label", "prediction", "correct") if name not in columns]
    if missing:
        raise ValueError(f"outcomes lack {', '.join(missing)}; got {', '.join(outcomes)}")
    columns.setdefault("index", list(range(len(columns["correct"]))))
    if len({len(values) for values in columns.values()}) != 1:
        raise ValueError(f"outcome columns differ in length: { {name: len(v) for name, v in columns.items()} }")

    def write_csv(temporary: Path) -> None:
        with open(temporary, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(OUTCOME_COLUMNS)
            writer.writerows(zip(*(columns[name] for name in OUTCOME_COLUMNS)))

    atomic_write(outcomes_csv_path(path), write_csv)
    atomic_write(
        path, lambda temporary: save_file(outcomes, str(temporary), metadata={"identity": canonical(identity)})
    )


def read_correct(path: Path) -> np.ndarray:
    """An outcome file's per-example correctness (bool ``[num_test]``, True where the probe picked the positive)."""
    return load_numpy(str(path))["correct"].astype(bool)


def read_identity(path: Path) -> dict | None:
    """The identity stored in an outcome file, or None when the file or its metadata is missing."""
    try:
        with safe_open(str(path), framework="pt") as file:
            text = (file.metadata() or {}).get("identity")
    except (OSError, ValueError):
        return None
    return json.loads(text) if text else None


def _row_key(row: dict) -> tuple[str, ...]:
    return tuple(str(row.get(column, "")) for column in CELL_KEY)


def conflict(path: Path, rows: list[dict[str, str]], cell: ProbeCell) -> str | None:
    """A one-line reason why ``cell`` cannot go into the table at ``path``, or None."""
    for row in rows:
        if _row_key(row) != cell.key or row.get("cell_id") == cell.id:
            continue
        outcomes = path.parent / row["predictions"] if row.get("predictions") else None
        old = read_identity(outcomes) if outcomes else None
        changed = differences(old, cell.identity) if old else ""
        if not changed:
            why = "its outcome file records no identity" if not old else "the same options, digested otherwise"
            changed = f"cell_id {row.get('cell_id') or 'unknown'} -> {cell.id}: {why}"
        lacking = [column for column in RESULT_COLUMNS if column not in row]
        if lacking:
            more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
            changed += f"; the table, an older dkacq's, lacks {', '.join(lacking[:3])}{more}"
        return (
            f"{path} already holds {cell.label} from other settings ({changed}); "
            f"give these settings another results.run_dir, or remove that row"
        )
    return None


def check_cells(path: Path, cells: list[ProbeCell]) -> None:
    """Refuse, before any work, a table that cannot be read (:func:`read_table`), and cells that it
    holds from other settings."""
    rows = read_rows(path)
    for cell in cells:
        reason = conflict(path, rows, cell)
        if reason:
            raise ResultConflictError(reason)


def check_one_setting_per_cell(cells: list[ProbeCell]) -> None:
    """Refuse, before any work, two cells of one plan (a sweep's) that would share a row of the table:
    the second would be refused only once the first had been fitted."""
    first: dict[tuple[str, ...], ProbeCell] = {}
    for cell in cells:
        other = first.setdefault(cell.key, cell)
        if other.id != cell.id:
            raise ResultConflictError(
                f"two settings of this study give {cell.label} ({differences(other.identity, cell.identity)}); "
                "the results table holds one row per cell: run one of them with another results.run_dir"
            )


def finished_ids(path: Path) -> set[str]:
    """The identities of the cells the table holds a result for."""
    return {row["cell_id"] for row in read_rows(path) if row.get("cell_id")}


def upsert_result(path: Path, cell: ProbeCell, values: dict, keep: tuple[str, ...] = ()) -> None:
    """Write the row of ``cell`` into the table, replacing an earlier row of the same identity.

    Columns in ``keep`` that ``values`` leaves blank keep the replaced row's values (e.g. how the fit
    went, :data:`CONVERGENCE_COLUMNS`, when a probe is only tested again). Columns that dkacq does not
    write (a user's notes) stay where they are with their values, a replaced row's included (blank in a
    new row); an older table gains the columns it lacks, blank in its rows.
    """
    new = {column: values.get(column, "") for column in RESULT_COLUMNS}
    new.update({column: getattr(cell, column) for column in CELL_KEY}, cell_id=cell.id)
    with file_lock(path):
        header, rows = read_table(path)
        reason = conflict(path, rows, cell)
        if reason:
            raise ResultConflictError(reason)
        for old in rows:
            if old.get("cell_id") == cell.id:
                new.update({column: old[column] for column in keep if new[column] in ("", None) and old.get(column)})
                new.update({column: value for column, value in old.items() if column not in RESULT_COLUMNS})
        rows = [row for row in rows if row.get("cell_id") != cell.id] + [new]
        columns = header + [column for column in RESULT_COLUMNS if column not in header]  # a user's columns kept

        def write(temporary: Path) -> None:
            with open(temporary, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=columns, restval="")
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(path, write)
