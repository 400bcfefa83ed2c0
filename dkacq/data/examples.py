"""The probe-example schema and the readers that turn every supported source into it.

Every reader returns a ``datasets.DatasetDict`` with the splits ``train`` and ``test`` and the string
columns ``EXAMPLE_COLUMNS``. Every problem with the input is a ``ProbeDataError`` whose message is one
line naming the file (or hub split), the record (its index in file order) and the field.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import datasets
import ijson
import pyarrow as pa
import pyarrow.compute as pc

from dkacq.data.sampling import sample_negatives

EXAMPLE_COLUMNS = (
    "question",
    "positive_context",
    "negative_context_0",
    "negative_context_1",
    "negative_context_2",
    "negative_context_3",
)
REQUIRED_COLUMNS = EXAMPLE_COLUMNS[:3]
"""The question, the positive and one negative; ``negative_context_1..3`` may be null (absent), and an
example with k negatives is used at N <= k + 1."""
ProbeFormat = Literal["demo", "dpr", "msmarco", "published", "local"]
TextSide = Literal["query", "passage"]
"""Which texts of a probe set an encoder reads: the questions or the passages."""
TEXT_COLUMNS: dict[str, str] = {"query": "question", "passage": "positive_context"}
"""The column holding each side's texts once per example (a passage side's positives)."""
DROP_REASONS = ("no_positive", "no_negative")

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_FILES = {"train": DEMO_DIR / "train.jsonl.gz", "test": DEMO_DIR / "test.jsonl.gz"}
MSMARCO_HUB_ID = "microsoft/ms_marco"
MSMARCO_CONFIG = "v1.1"
MSMARCO_SPLITS = {"train": "train", "test": "validation"}
PUBLISHED_SPLITS = {"train": "train", "test": "dev"}

EXAMPLE_FEATURES = datasets.Features({column: datasets.Value("string") for column in EXAMPLE_COLUMNS})
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
_JSON_WHITESPACE = b" \t\n\r"
_log = logging.getLogger("dkacq")
try:
    _ijson = ijson.get_backend("yajl2_c")
except ImportError:  # no compiled wheel for this platform: the fastest backend there is
    _ijson = ijson


class ProbeDataError(ValueError):
    """Bad probe input: a missing or malformed file, record or field. The message is one line."""


@dataclass(frozen=True)
class ProbeSetRead:
    """A probe set with what only reading it can tell, for the store's manifest.

    Dropped records leave no trace in the examples, so the readers count them as they go.
    ``sources`` names each split's file or hub split; ``dropped`` maps split -> reason
    (``DROP_REASONS``) -> records; ``overlapping_questions`` counts the distinct questions of both splits.
    """

    probe_set: datasets.DatasetDict
    sources: dict[str, str]
    dropped: dict[str, dict[str, int]]
    overlapping_questions: int


def load_probe_set(
    format: ProbeFormat = "demo",
    train: str | None = None,
    test: str | None = None,
    hub_id: str | None = None,
    seed: int = 42,
) -> datasets.DatasetDict:
    """Load a probe set as ``DatasetDict(train=..., test=...)`` with the columns ``EXAMPLE_COLUMNS``.

    - ``demo``: the shipped offline set built from Python's documentation (docs/demo-data.md).
    - ``dpr``: ``train`` and ``test`` are DPR retriever JSON files (optionally gzipped), e.g.
      ``biencoder-nq-adv-hn-train.json`` and ``biencoder-nq-dev.json``.
    - ``msmarco``: MS MARCO v1.1 rows, from local JSONL/Parquet files ``train`` and ``test`` or else
      from the hub (``hub_id`` or ``microsoft/ms_marco``; test is its ``validation`` split).
    - ``published``: the authors' preprocessed sets, from local files or from the hub (``hub_id``;
      test is its ``dev`` split).
    - ``local``: JSONL/Parquet files already in ``EXAMPLE_COLUMNS``, every value a non-empty string but
      ``negative_context_1..3``, which may be null or absent (docs/collections.md).

    For ``dpr`` and ``msmarco`` the negatives are sampled with one ``random.Random(seed)`` stream
    through the train and then the test source, as the published sets were made. A record without a
    positive or without a negative gives no example. The same file (or two files of identical
    content) as train and test is refused. Dropped records and questions of both splits are warned
    about on the ``dkacq`` logger; ``read_probe_set`` also returns their counts.
    """
    return read_probe_set(format, train, test, hub_id, seed).probe_set


def read_probe_set(
    format: ProbeFormat = "demo",
    train: str | None = None,
    test: str | None = None,
    hub_id: str | None = None,
    seed: int = 42,
) -> ProbeSetRead:
    """``load_probe_set`` with the counts of dropped records and of questions in both splits."""
    splits = _read_splits(format, train, test, hub_id, seed)
    for split, part in splits.items():
        if any(part.dropped.values()):
            _log.warning(
                "%s (%s split): records dropped for having no positive: %d, no negative: %d",
                part.source,
                split,
                part.dropped["no_positive"],
                part.dropped["no_negative"],
            )
    overlap = len(set(splits["train"].dataset["question"]) & set(splits["test"].dataset["question"]))
    if overlap:
        _log.warning(
            "distinct questions in both train (%s) and test (%s): %d",
            splits["train"].source,
            splits["test"].source,
            overlap,
        )
    return ProbeSetRead(
        probe_set=datasets.DatasetDict({split: part.dataset for split, part in splits.items()}),
        sources={split: part.source for split, part in splits.items()},
        dropped={split: part.dropped for split, part in splits.items()},
        overlapping_questions=overlap,
    )


class _Split(NamedTuple):
    """One split's examples, where they came from and how many records gave none, per reason."""

    dataset: datasets.Dataset
    source: str
    dropped: dict[str, int]


def _read_splits(
    format: ProbeFormat, train: str | None, test: str | None, hub_id: str | None, seed: int
) -> dict[str, _Split]:
    if format == "demo":
        return _table_set(DEMO_FILES["train"], DEMO_FILES["test"], allow_empty=False)
    if format == "local":
        _require_files(format, train, test, "JSONL or Parquet files in EXAMPLE_COLUMNS")
        return _table_set(train, test, allow_empty=False)
    if format == "published":
        return _published_set(train, test, hub_id)
    if format == "dpr":
        _require_files(format, train, test, "DPR retriever JSON files")
        rng = random.Random(seed)
        return {"train": _dpr_split(train, rng), "test": _dpr_split(test, rng)}
    if format == "msmarco":
        return _msmarco_set(train, test, hub_id, seed)
    raise ProbeDataError(f"unknown probe format {format!r}; expected one of demo, dpr, msmarco, published, local")


def _published_set(train: str | None, test: str | None, hub_id: str | None) -> dict[str, _Split]:
    if train is not None or test is not None:
        _require_files("published", train, test, "JSONL or Parquet files of the published sets")
        return _table_set(train, test, allow_empty=True)
    if hub_id is None:
        raise ProbeDataError(
            "format 'published' needs hub_id= (e.g. wshuai190/nq-hard-negative-dpr-sampled-seed-42-sample-4) "
            "or train= and test= files"
        )
    return {
        split: _table_split(_load_hub(hub_id, None, hub_split), f"{hub_id}[{hub_split}]", allow_empty=True)
        for split, hub_split in PUBLISHED_SPLITS.items()
    }


def _msmarco_set(train: str | None, test: str | None, hub_id: str | None, seed: int) -> dict[str, _Split]:
    if train is not None or test is not None:
        _require_files("msmarco", train, test, "JSONL or Parquet files of MS MARCO v1.1 rows")
        sources = {split: (_read_table(path), os.fspath(path)) for split, path in (("train", train), ("test", test))}
    else:
        repo = hub_id or MSMARCO_HUB_ID
        sources = {
            split: (_load_hub(repo, MSMARCO_CONFIG, hub_split), f"{repo}[{hub_split}]")
            for split, hub_split in MSMARCO_SPLITS.items()
        }
    rng = random.Random(seed)
    return {split: _msmarco_split(rows, name, rng) for split, (rows, name) in sources.items()}


def _require_files(format: str, train: str | None, test: str | None, what: str) -> None:
    """Both files are named and are not one file: a test split that is the train split scores the
    probe on the examples it was fitted to."""
    if train is None or test is None:
        raise ProbeDataError(f"format {format!r} needs both train= and test= ({what})")
    train_path, test_path = Path(train), Path(test)
    if not (train_path.is_file() and test_path.is_file()):
        return  # the reader names the missing file
    if os.path.samefile(train_path, test_path):
        raise ProbeDataError(f"{train} and {test}: train= and test= are the same file ({train_path.resolve()})")
    if train_path.stat().st_size == test_path.stat().st_size and file_digest(train_path) == file_digest(test_path):
        raise ProbeDataError(f"{train} and {test}: train= and test= have identical content")


def file_digest(path: str | os.PathLike) -> str:
    """A content hash of a file: identical files are found, and an edited file is never mistaken for
    the one stored."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:16]


class _ExampleColumns:
    """Examples gathered column by column, then turned into one ``datasets.Dataset``."""

    def __init__(self) -> None:
        self.columns: dict[str, list[str]] = {column: [] for column in EXAMPLE_COLUMNS}
        self.dropped = dict.fromkeys(DROP_REASONS, 0)

    def add_record(self, question: str, positives: list[str], negatives: list[str], rng: random.Random) -> None:
        """One example per positive, each with its own draw of negatives; a record without a positive
        or a negative is counted (under ``no_positive`` when it lacks both) and draws nothing."""
        if not positives:
            self.dropped["no_positive"] += 1
        elif not negatives:
            self.dropped["no_negative"] += 1
        else:
            for positive in positives:
                values = (question, positive, *sample_negatives(negatives, rng))
                for column, value in zip(EXAMPLE_COLUMNS, values, strict=True):
                    self.columns[column].append(value)

    def split(self, name: str) -> _Split:
        if not self.columns["question"]:
            raise ProbeDataError(f"{name}: gives no examples (no record has both a positive and a negative)")
        return _Split(datasets.Dataset.from_dict(self.columns, features=EXAMPLE_FEATURES), name, self.dropped)


# --- DPR retriever JSON ---------------------------------------------------------------------------


def _dpr_split(path: str | os.PathLike, rng: random.Random) -> _Split:
    """Examples of one DPR retriever file: one per positive ctx, negatives from ``hard_negative_ctxs``.

    The file is read record by record (the NQ train file is several GB), so only the examples are
    held in memory. A record whose ``positive_ctxs`` or ``hard_negative_ctxs`` is empty gives no
    example and draws nothing.
    """
    name = os.fspath(path)
    path = Path(path)
    examples = _ExampleColumns()
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        stream = opener(path, "rb")
    except OSError as error:
        raise ProbeDataError(f"{name}: cannot be opened ({error.strerror or error})") from error
    with stream:
        for index, record in enumerate(_json_list(stream, name)):
            if not isinstance(record, dict):
                raise ProbeDataError(f"{name}: record {index} is not a JSON object")
            question = _string(record.get("question"), name, index, "question")
            negatives = _ctx_texts(record, "hard_negative_ctxs", name, index)
            examples.add_record(question, _ctx_texts(record, "positive_ctxs", name, index), negatives, rng)
    return examples.split(name)


def _ctx_texts(record: dict, field: str, name: str, index: int) -> list[str]:
    """The passage texts of a record's list of DPR ctxs: ``title + " " + text``, as the published
    sets have them (not stripped, so an empty title leaves a leading space)."""
    texts = []
    for j, ctx in enumerate(_sequence(record.get(field), name, index, field)):
        if not isinstance(ctx, dict):
            raise ProbeDataError(f"{name}: record {index} field '{field}[{j}]' is not a JSON object")
        title = _string(ctx.get("title"), name, index, f"{field}[{j}].title")
        text = _string(ctx.get("text"), name, index, f"{field}[{j}].text")
        texts.append(title + " " + text)
    return texts


def _string(value: Any, name: str, index: int, field: str) -> str:
    if value is None:
        raise ProbeDataError(f"{name}: record {index} has no field {field!r}")
    if not isinstance(value, str):
        raise ProbeDataError(f"{name}: record {index} field {field!r} is not a string")
    return value


def _sequence(value: Any, name: str, index: int, field: str) -> list:
    if value is None:
        raise ProbeDataError(f"{name}: record {index} has no field {field!r}")
    if not isinstance(value, list):
        raise ProbeDataError(f"{name}: record {index} field {field!r} is not a list")
    return value


def _json_list(stream: io.BufferedReader | gzip.GzipFile, name: str) -> Iterator[Any]:
    """The elements of a file holding one JSON list, decoded one at a time by ijson.

    ``items`` would yield nothing for a top-level object (or the value of its key ``"item"``), so the
    first byte is checked here. The compiled backends' errors give no position, so a syntax error is
    placed by the record being read when it was found. Numbers that are not integers come as
    ``Decimal``; the readers use only strings and lists.
    """
    records = 0
    try:
        while (head := stream.peek(1)[:1]) and head in _JSON_WHITESPACE:
            stream.read(1)
        if head and head != b"[":
            start = head.decode("ascii", "backslashreplace")
            raise ProbeDataError(f"{name}: not a JSON list of records (it starts with {start!r})")
        for record in _ijson.items(stream, "item"):
            yield record
            records += 1
    except ijson.JSONError as error:
        raise ProbeDataError(f"{name}: not valid JSON at record {records} ({_json_error(error)})") from error
    except (OSError, EOFError) as error:
        raise ProbeDataError(f"{name}: cannot be read ({one_line(error)})") from error


def _json_error(error: ijson.JSONError) -> str:
    """What is wrong, in one line: yajl's message goes on to quote the text around the error over
    several lines, and comes as bytes when the text is not UTF-8."""
    message = error.args[0] if error.args else ""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return str(message).split("\n", 1)[0] or type(error).__name__


# --- MS MARCO v1.1 rows ---------------------------------------------------------------------------


def _msmarco_split(rows: datasets.Dataset, name: str, rng: random.Random) -> _Split:
    """Examples of MS MARCO rows: one per selected passage, negatives = the query's other passages.

    A row with no selected passage, or with every passage selected, gives no example.
    """
    for field in ("query", "passages"):
        if field not in rows.column_names:
            raise ProbeDataError(f"{name}: record 0 has no field {field!r}")
    examples = _ExampleColumns()
    index = 0
    for batch in rows.select_columns(["query", "passages"]).iter(batch_size=1024):
        for query, passages in zip(batch["query"], batch["passages"], strict=True):
            query = _string(query, name, index, "query")
            if not isinstance(passages, dict):
                raise ProbeDataError(f"{name}: record {index} has no field 'passages'")
            flags = _sequence(passages.get("is_selected"), name, index, "passages.is_selected")
            texts = _sequence(passages.get("passage_text"), name, index, "passages.passage_text")
            if len(flags) != len(texts):
                raise ProbeDataError(
                    f"{name}: record {index} field 'passages.is_selected' has {len(flags)} entries "
                    f"but 'passages.passage_text' has {len(texts)}"
                )
            for j, text in enumerate(texts):
                _string(text, name, index, f"passages.passage_text[{j}]")
            positives = [text for flag, text in zip(flags, texts) if flag == 1]
            negatives = [text for flag, text in zip(flags, texts) if flag != 1]
            examples.add_record(query, positives, negatives, rng)
            index += 1
    return examples.split(name)


# --- tables already in EXAMPLE_COLUMNS ------------------------------------------------------------


def _table_set(train: str | os.PathLike, test: str | os.PathLike, allow_empty: bool) -> dict[str, _Split]:
    return {
        split: _table_split(_read_table(path), os.fspath(path), allow_empty)
        for split, path in (("train", train), ("test", test))
    }


def _table_split(table: datasets.Dataset, name: str, allow_empty: bool) -> _Split:
    """A table of finished examples: every record is one, so none is dropped."""
    return _Split(_checked(table, name, allow_empty), name, dict.fromkeys(DROP_REASONS, 0))


def _read_table(path: str | os.PathLike) -> datasets.Dataset:
    """A local JSONL (optionally gzipped) or Parquet file as a ``datasets.Dataset``."""
    name = os.fspath(path)
    path = Path(path)
    if not path.is_file():
        raise ProbeDataError(f"{name}: no such file")
    if path.stat().st_size == 0:
        raise ProbeDataError(f"{name}: holds no records")
    if path.name.endswith(".parquet"):
        builder, kind = "parquet", "Parquet"
    elif path.name.endswith(_JSON_SUFFIXES):
        builder, kind = "json", "JSON lines"
    else:
        raise ProbeDataError(f"{name}: unknown file type (expected .jsonl, .json, .jsonl.gz or .parquet)")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:
        raise ProbeDataError(f"{name}: cannot be read as {kind} ({one_line(error)})") from error


def _checked(table: datasets.Dataset, name: str, allow_empty: bool) -> datasets.Dataset:
    """``table`` reduced to ``EXAMPLE_COLUMNS`` after every value was checked to be a string (or null,
    in the negative columns after the first: an example with fewer negatives).

    ``allow_empty`` lets empty strings through: the published sets are taken as their authors made
    them, while local sets must have text in every field.
    """
    if table.num_rows == 0:
        raise ProbeDataError(f"{name}: holds no records")
    for column in EXAMPLE_COLUMNS:
        absent = column not in table.column_names or pa.types.is_null(table.data.column(column).type)
        if absent and column not in REQUIRED_COLUMNS:  # no example has this many negatives
            table = table.remove_columns([column]) if column in table.column_names else table
            table = table.add_column(column, pa.array([None] * table.num_rows, pa.string()))
            continue
        if column not in table.column_names:
            raise ProbeDataError(f"{name}: record 0 has no field {column!r}")
        values = table.data.column(column)
        if pa.types.is_null(values.type):
            raise ProbeDataError(f"{name}: record 0 has no field {column!r}")
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            index = _first(pc.is_valid(values))
            raise ProbeDataError(f"{name}: record {index} field {column!r} is not a string ({values.type})")
        missing = _first(pc.is_null(values))
        if missing >= 0 and column in REQUIRED_COLUMNS:
            raise ProbeDataError(f"{name}: record {missing} has no field {column!r}")
        if not allow_empty:
            empty = _first(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0))
            if empty >= 0:
                raise ProbeDataError(f"{name}: record {empty} field {column!r} is empty")
    table = table.select_columns(list(EXAMPLE_COLUMNS))
    return table if table.features == EXAMPLE_FEATURES else table.cast(EXAMPLE_FEATURES)


def _first(mask: pa.ChunkedArray) -> int:
    """Index of the first true entry of a boolean column, or -1."""
    return pc.index(mask, True).as_py()


# --- the hub --------------------------------------------------------------------------------------


def _load_hub(hub_id: str, config: str | None, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as error:
        raise ProbeDataError(
            f"cannot load {hub_id} (split {split!r}) from the Hugging Face hub ({one_line(error)}); "
            "connect to the network, or set HF_HOME to a cache that already holds it, "
            "or pass local files as train= and test="
        ) from error


def one_line(error: BaseException) -> str:
    """The innermost cause of ``error`` as one short line."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
