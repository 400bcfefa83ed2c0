"""The retrieval table (``<run_dir>/retrieval.csv``): its one owner.

One row per (dataset, model, pooling, layer, similarity): how that layer's untrained similarity ranks a
collection for its test queries (``ndcg@10``, ``mrr@10``, ``recall@100``), over the whole corpus or over
each query's candidate pool (``scope``), with how many queries and passages, the seconds it took, and
its identity: ``cell_id`` (a digest) and ``identity`` (the canonical JSON of the weights, data, pooling
and options that produced it). A row of one key from other settings is refused, naming what differs;
a rerun of the same identity replaces its row. Writes take the file's lock and rename a whole file.
"""

import csv
import json
from pathlib import Path

from dkacq.formats.atomic import atomic_write, file_lock
from dkacq.formats.errors import DkacqError
from dkacq.formats.identity import canonical, differences, digest

RETRIEVAL_FILE = "retrieval.csv"
RETRIEVAL_KEY = ("dataset", "model", "pooling", "layer", "similarity")
RETRIEVAL_COLUMNS = (
    *RETRIEVAL_KEY,
    "scope",
    "ndcg@10",
    "mrr@10",
    "recall@100",
    "num_queries",
    "num_passages",
    "seconds",
    "cell_id",
    "identity",
)


class RetrievalConflictError(DkacqError):
    """The retrieval table holds a row of the same key from other settings."""


def read_retrieval(path: Path) -> list[dict[str, str]]:
    """The rows of a retrieval table (none when there is no file), refused in one line when its header is
    not this format's: by the report, and by ``dkacq fit`` before any work."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        missing = [column for column in RETRIEVAL_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise DkacqError(f"{path}: not a dkacq retrieval table (no column {', '.join(missing)})")
        return list(reader)


def retrieval_row(key: dict, identity: dict, values: dict) -> dict:
    """A row: its key columns, its measures and counts (``values``), and its identity."""
    return {**key, **values, "cell_id": digest(identity), "identity": canonical(identity)}


def _conflict(path: Path, rows: list[dict[str, str]], row: dict) -> str | None:
    for old in rows:
        if (
            all(str(old.get(column)) == str(row[column]) for column in RETRIEVAL_KEY)
            and old["cell_id"] != row["cell_id"]
        ):
            label = " ".join(str(row[column]) for column in RETRIEVAL_KEY)
            changed = differences(json.loads(old["identity"]), json.loads(row["identity"]))
            return f"{path} already holds retrieval {label} from other settings ({changed}); give these settings another results.run_dir"
    return None


def check_retrieval(path: Path, rows: list[dict]) -> None:
    """Refuse, before any work, rows the table holds from other settings."""
    held = read_retrieval(path)
    for row in rows:
        reason = _conflict(path, held, row)
        if reason:
            raise RetrievalConflictError(reason)


def finished_retrieval(path: Path) -> set[str]:
    return {row["cell_id"] for row in read_retrieval(path)}


def upsert_retrieval(path: Path, rows: list[dict]) -> None:
    """Write ``rows``, each replacing a row of the same identity."""
    with file_lock(path):
        held = read_retrieval(path)
        for row in rows:
            reason = _conflict(path, held, row)
            if reason:
                raise RetrievalConflictError(reason)
        ids = {row["cell_id"] for row in rows}
        table = [row for row in held if row["cell_id"] not in ids] + rows

        def write(temporary: Path) -> None:
            with open(temporary, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=RETRIEVAL_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(table)

        atomic_write(path, write)
