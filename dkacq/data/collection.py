"""Test collections (a corpus, queries and graded judgements) and the probe examples made from them.

Three ways to read one: a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``, each
plain or gzipped), TREC files (qrels ``qid 0 docid grade``, queries and corpus as TSV or JSONL) and an
``ir_datasets`` id. Each gives the same three streams (:class:`Collection`): passages as
``(doc_id, text)``, queries as ``(query_id, text)`` and judgements as ``(query_id, doc_id, grade)``, so a
collection read any of the three ways gives the same probe set (a passage's text is its title, a space
and its body; the body alone when it has no title).

:func:`read_collection_set` streams the corpus (never holding more of it than the texts the drawn
examples need), splits the judged queries into train and test (the collection's own splits where it has
both, else a seeded split by query), mines negatives (:mod:`dkacq.data.mining`) and returns the
examples with what it dropped and why, and the provenance that goes into the probe set's identity.
Bad input is a :class:`~dkacq.data.examples.ProbeDataError` naming the file, line and field.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import datasets

from dkacq.data import mining
from dkacq.data.examples import (
    EXAMPLE_COLUMNS,
    EXAMPLE_FEATURES,
    ProbeDataError,
    ProbeSetRead,
    file_digest,
    one_line,
)
from dkacq.data.sampling import NUM_NEGATIVES

CollectionFormat = Literal["beir", "trec", "ir_datasets"]
COLLECTION_FORMATS: tuple[str, ...] = ("beir", "trec", "ir_datasets")
COLLECTION_DROP_REASONS = (
    "in_test",  # a train query judged in the test split too, kept in test only (a query)
    "no_relevant",  # a judged query without a passage at the relevance threshold (a query)
    "unknown_query",  # a judged query the queries file does not hold (a query)
    "unknown_passage",  # a relevant passage the corpus does not hold (an example)
    "no_negative",  # a positive for which no negative was found (an example)
)
HEADER_IDS = {"id", "_id", "docid", "doc_id", "doc-id", "qid", "query_id", "query-id", "pid"}
"""First fields that mark a TSV file's first line as a header."""
_log = logging.getLogger("dkacq")


@dataclass(frozen=True)
class CollectionOptions:
    """How a collection becomes probe examples (``--data.collection.*``)."""

    corpus_file: str | None = None
    """TREC files: the corpus, TSV (``docid<TAB>text[<TAB>title]``) or JSONL (``_id``/``title``/``text``)."""
    queries_file: str | None = None
    """TREC files: the queries, TSV (``qid<TAB>text``) or JSONL (``_id``/``text``)."""
    relevance_threshold: int = 1
    """A judged passage is relevant (a positive) when its grade is at least this (default: grade > 0).
    Passages graded above 0 but below it are neither positives nor negatives."""
    negative_ranks: tuple[int, int] = (10, 100)
    """Mined negatives are drawn from these ranks, first to last, 1-based (bm25, dense): skipping the
    top ranks avoids unjudged positives."""
    dense_model: str | None = None
    """``data.negatives dense``: the mining model, a preset name (minilm, contriever, ...) or a hub id or
    folder read as ``data.encoder auto`` reads it (its own pooling, prompts, Normalize, token limits);
    default: the probed model itself. Name one for a study of several models, so that they share one
    probe set (docs/collections.md)."""
    dense_similarity: Literal["dot", "cosine"] | None = None
    """``data.negatives dense``: how the mining model ranks; default: as its authors rank, the
    ``similarity_fn_name`` of its sentence-transformers files, else cosine for a sentence-transformers
    model, else dot product (a model with Normalize ranks the same by both)."""
    dense_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """``data.negatives dense``: the mining model's weights' dtype."""
    num_negatives: int = NUM_NEGATIVES
    """Negatives per example (1 to 4); an example with fewer is kept and is used at N <= its count + 1."""
    seed: int = 42
    """Seed of the train/test split by query and of the negatives' draws."""
    near_duplicate: float | None = 0.9
    """A candidate negative whose word set has at least this Jaccard similarity with the positive's is
    not used (a near-copy of the positive); none excluded when not given."""
    test_fraction: float = 0.2
    """Share of the judged queries held out for test when the collection has test judgements only."""
    train_split: str = "train"
    """Name of the train judgements (BEIR: ``qrels/<name>.tsv``); split by query when absent."""
    test_split: str = "test"
    """Name of the test judgements (BEIR: ``qrels/<name>.tsv``; TREC: ``data.test_file``)."""
    query_batch: int = 1024
    """Queries mined per batch; each batch is saved, so an interrupted mining resumes after the last."""
    retrieval: bool = True
    """Measure each probed layer as a retriever of the test queries (``retrieval.csv`` in the run folder)."""
    retrieval_limit: int = 200_000
    """Largest corpus searched whole by the retrieval measures; above it each test query ranks its
    candidate pool (its BM25 top 100 and its judged passages)."""

    def check(self) -> None:
        if not 1 <= self.num_negatives <= NUM_NEGATIVES:
            raise ValueError(f"collection.num_negatives must be 1..{NUM_NEGATIVES}, got {self.num_negatives}")
        first, last = self.negative_ranks
        if not 1 <= first <= last:
            raise ValueError(f"collection.negative_ranks must be 1 <= first <= last, got {list(self.negative_ranks)}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"collection.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.near_duplicate is not None and not 0 < self.near_duplicate <= 1:
            raise ValueError(f"collection.near_duplicate must be in (0, 1], got {self.near_duplicate}")
        if self.retrieval_limit < 1:
            raise ValueError(f"collection.retrieval_limit must be at least 1, got {self.retrieval_limit}")
        if self.query_batch < 1:
            raise ValueError(f"collection.query_batch must be at least 1, got {self.query_batch}")
        if self.dense_similarity not in (None, "dot", "cosine"):
            raise ValueError(f"collection.dense_similarity must be dot or cosine, got {self.dense_similarity!r}")
        if self.dense_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"collection.dense_dtype must be float32, bfloat16 or float16, got {self.dense_dtype!r}")

    def identity(self) -> dict:
        """Every option that can change the examples; the files are identified by their content, and the
        dense mining model by its resolved identity (weights, settings, similarity, dtype: the mining
        method's record), not by how it is named."""
        options = asdict(self)
        for key in (
            "corpus_file",
            "queries_file",
            "query_batch",
            "retrieval",
            "retrieval_limit",
            "dense_model",
            "dense_similarity",
            "dense_dtype",
        ):
            del options[key]
        options["negative_ranks"] = list(self.negative_ranks)
        return options


def collection_options(options: CollectionOptions | dict | None) -> CollectionOptions:
    """The options checked, from a dataclass, the dict a saved config reloads as, or nothing (defaults)."""
    if options is None:
        options = CollectionOptions()
    elif isinstance(options, dict):
        options = CollectionOptions(**{key: tuple(v) if key == "negative_ranks" else v for key, v in options.items()})
    options.check()
    return options


def passage_text(title: str, text: str) -> str:
    return f"{title} {text}" if title.strip() else text


# --- the three readers ----------------------------------------------------------------------------


class Collection:
    """A corpus, its queries and judgements per split, each read as a stream on every call."""

    name: str

    def passages(self) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def queries(self) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def judgements(self, split: str) -> Iterator[tuple[str, str, int]] | None:
        """The split's ``(query_id, doc_id, grade)``, or ``None`` when the collection has no such split."""
        raise NotImplementedError

    def request(self) -> dict:
        """What identifies the source's content cheaply, for the probe-set store (not the paths)."""
        raise NotImplementedError


class FileCollection(Collection):
    """A BEIR folder or TREC files: corpus, queries and one judgements file per split."""

    def __init__(self, name: str, corpus: Path, queries: Path, qrels: dict[str, Path]):
        self.name, self.corpus_path, self.queries_path, self.qrels = name, corpus, queries, qrels
        for path in (corpus, queries, *qrels.values()):
            if not path.is_file():
                raise ProbeDataError(f"{path}: no such file")

    def passages(self) -> Iterator[tuple[str, str]]:
        return _records(self.corpus_path, with_title=True)

    def queries(self) -> Iterator[tuple[str, str]]:
        return _records(self.queries_path, with_title=False)

    def judgements(self, split: str) -> Iterator[tuple[str, str, int]] | None:
        return _qrels(self.qrels[split]) if split in self.qrels else None

    def request(self) -> dict:
        files = {"corpus": self.corpus_path, "queries": self.queries_path} | {
            f"qrels.{split}": path for split, path in sorted(self.qrels.items())
        }
        return {key: file_digest(path) for key, path in files.items()}


def beir_folder(path: str | os.PathLike, options: CollectionOptions) -> FileCollection:
    """A BEIR task's folder: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv`` (``.gz`` too)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ProbeDataError(f"{path}: no such folder (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/)")
    qrels = {
        split: found
        for split in (options.train_split, options.test_split)
        if (found := _either(folder / "qrels" / f"{split}.tsv")) is not None
    }
    if options.test_split not in qrels:
        raise ProbeDataError(f"{folder / 'qrels' / (options.test_split + '.tsv')}: no such file")
    corpus = _either(folder / "corpus.jsonl") or folder / "corpus.jsonl"
    queries = _either(folder / "queries.jsonl") or folder / "queries.jsonl"
    return FileCollection(os.fspath(path), corpus, queries, qrels)


def trec_files(train: str | None, test: str | None, options: CollectionOptions) -> FileCollection:
    """TREC files: ``test`` (and optionally ``train``) qrels, ``collection.corpus_file`` and
    ``collection.queries_file``."""
    if test is None or options.corpus_file is None or options.queries_file is None:
        raise ProbeDataError(
            "data.source=trec needs data.test_file (qrels), data.collection.corpus_file and "
            "data.collection.queries_file (data.train_file: train qrels, optional)"
        )
    qrels = {options.test_split: Path(test)} | ({options.train_split: Path(train)} if train else {})
    return FileCollection(test, Path(options.corpus_file), Path(options.queries_file), qrels)


class IrDatasetsCollection(Collection):
    """An ``ir_datasets`` id (its docs, queries and qrels; its own download cache). Its judgements are
    the collection's test split: one id is one split."""

    def __init__(self, dataset_id: str, test_split: str):
        try:
            import ir_datasets
        except ImportError as error:
            raise ProbeDataError(
                "data.source=ir_datasets needs the ir_datasets package (pip install ir_datasets)"
            ) from error
        self.name, self.test_split = f"ir_datasets {dataset_id}", test_split
        self.dataset_id, self.version = dataset_id, ir_datasets.__version__
        try:
            self.dataset = ir_datasets.load(dataset_id)
        except KeyError as error:
            raise ProbeDataError(f"{self.name}: no such data set id in ir_datasets") from error
        for part in ("docs", "queries", "qrels"):
            if not getattr(self.dataset, f"has_{part}")():
                raise ProbeDataError(f"{self.name}: has no {part} (choose an id with docs, queries and qrels)")

    def _stream(self, part: str) -> Iterator:
        try:
            yield from getattr(self.dataset, f"{part}_iter")()
        except (OSError, ConnectionError, RuntimeError) as error:
            home = os.environ.get("IR_DATASETS_HOME", "~/.ir_datasets")
            raise ProbeDataError(
                f"{self.name}: its {part} are not in ir_datasets' cache ({home}) and cannot be fetched "
                f"({one_line(error)}); fetch them once with the network: "
                f"dkacq download --data ir_datasets:{self.dataset_id}"
            ) from error

    def fetch(self) -> None:
        """Everything the readers stream, into ir_datasets' own cache by its own downloads: the docs
        (their first is read, which fetches the corpus), every query and every judgement."""
        next(self._stream("docs"), None)
        for part in ("queries", "qrels"):
            for _ in self._stream(part):
                pass

    def passages(self) -> Iterator[tuple[str, str]]:
        docs = (
            (number, doc.doc_id, passage_text(getattr(doc, "title", "") or "", _text(doc)))
            for number, doc in enumerate(self._stream("docs"), 1)
        )
        return _once(docs, f"{self.name} docs", "doc")

    def queries(self) -> Iterator[tuple[str, str]]:
        queries = ((number, query.query_id, _text(query)) for number, query in enumerate(self._stream("queries"), 1))
        return _once(queries, f"{self.name} queries", "query")

    def judgements(self, split: str) -> Iterator[tuple[str, str, int]] | None:
        if split != self.test_split:
            return None
        return ((qrel.query_id, qrel.doc_id, int(qrel.relevance)) for qrel in self._stream("qrels"))

    def request(self) -> dict:
        return {"ir_datasets": self.dataset_id, "version": self.version}


def _text(record) -> str:
    """An ir_datasets doc's or query's text: its ``text`` field, else what the data set calls its text."""
    return record.text if hasattr(record, "text") else record.default_text()


def open_collection(
    source: CollectionFormat,
    options: CollectionOptions,
    path: str | None = None,
    dataset_id: str | None = None,
    train_file: str | None = None,
    test_file: str | None = None,
) -> Collection:
    if source == "beir":
        if path is None:
            raise ProbeDataError("data.source=beir needs data.path, the BEIR folder")
        return beir_folder(path, options)
    if source == "trec":
        return trec_files(train_file, test_file, options)
    if source == "ir_datasets":
        if dataset_id is None:
            raise ProbeDataError("data.source=ir_datasets needs data.dataset_id (e.g. beir/scifact/test)")
        return IrDatasetsCollection(dataset_id, options.test_split)
    raise ProbeDataError(f"unknown collection format {source!r}; expected one of {', '.join(COLLECTION_FORMATS)}")


def _either(path: Path) -> Path | None:
    """``path`` or its gzipped twin, whichever exists."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The file's lines (1-based numbers), gzipped or not, each decoded as UTF-8 on its own, so that an
    error names its line (a text stream decodes blocks ahead of the line it yields)."""
    name = os.fspath(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as file:
            for number, raw in enumerate(file, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ProbeDataError(
                        f"{name}: line {number} is not UTF-8 text ({error.reason} at byte {error.start})"
                    ) from error
                yield number, line.rstrip("\r\n")
    except (OSError, EOFError) as error:
        where = f" after line {number}" if number else ""
        raise ProbeDataError(f"{name}: cannot be read{where} ({one_line(error)})") from error


def _is_jsonl(path: Path) -> bool:
    stem = path.name.removesuffix(".gz")
    if stem.endswith((".jsonl", ".json", ".ndjson")):
        return True
    if stem.endswith((".tsv", ".txt", ".tab")):
        return False
    raise ProbeDataError(f"{path}: unknown file type (expected .jsonl or .tsv, optionally .gz)")


def _records(path: Path, with_title: bool) -> Iterator[tuple[str, str]]:
    """``(id, text)`` of a corpus or queries file, JSONL (``_id``, ``text``, ``title``) or TSV (id, text,
    optional title; a first line of column names is skipped); an id given twice is refused."""
    return _once(_numbered_records(path, with_title), os.fspath(path), "line")


def _once(records: Iterator[tuple[int, str, str]], name: str, unit: str) -> Iterator[tuple[str, str]]:
    """``(id, text)`` of ``records`` (``(position, id, text)``), refusing an id given twice in one line
    that names both positions (an id is a key: the judgements could not say which text they judged)."""
    first: dict[str, int] = {}
    for position, identifier, text in records:
        if first.setdefault(identifier, position) != position:
            raise ProbeDataError(
                f"{name}: {unit} {position} repeats the id {identifier!r} of {unit} {first[identifier]}"
            )
        yield identifier, text


def _numbered_records(path: Path, with_title: bool) -> Iterator[tuple[int, str, str]]:
    name = os.fspath(path)
    if _is_jsonl(path):
        for number, line in _lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ProbeDataError(f"{name}: line {number} is not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise ProbeDataError(f"{name}: line {number} is not a JSON object")
            key = "_id" if "_id" in record else "id"
            identifier = _text_field(record.get(key), name, number, "_id", ids=True)
            text = _text_field(record.get("text"), name, number, "text")
            title = _text_field(record.get("title", ""), name, number, "title") if with_title else ""
            yield number, identifier, passage_text(title, text)
        return
    for number, line in _lines(path):
        fields = line.split("\t")
        if number == 1 and fields[0].strip().lower() in HEADER_IDS:
            continue
        if not line.strip():
            continue
        if len(fields) < 2 or len(fields) > (3 if with_title else 2):
            expected = "id, text and an optional title" if with_title else "id and text"
            raise ProbeDataError(f"{name}: line {number} has {len(fields)} tab-separated fields, expected {expected}")
        title = fields[2] if len(fields) == 3 else ""
        yield number, fields[0], passage_text(title, fields[1])


def _text_field(value, name: str, number: int, field: str, ids: bool = False) -> str:
    if value is None:
        raise ProbeDataError(f"{name}: line {number} has no field {field!r}")
    if ids and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ProbeDataError(f"{name}: line {number} field {field!r} is not a string")
    return value


def _qrels(path: Path) -> Iterator[tuple[str, str, int]]:
    """Judgements: TREC (``qid iteration docid grade``) or BEIR (``query-id corpus-id score`` after a
    header line), whitespace-separated. The first judgement's field count fixes which, for every line:
    a TREC line that lost a field would otherwise read as a BEIR line of another passage."""
    name = os.fspath(path)
    width = None
    for number, line in _lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (3, 4) or width not in (None, len(fields)):
            expected = (
                f"{width}, as the first judgement" if width else "'qid 0 docid grade' or 'query-id corpus-id score'"
            )
            raise ProbeDataError(f"{name}: line {number} has {len(fields)} fields, expected {expected}")
        query, doc, grade = (fields[0], fields[2], fields[3]) if len(fields) == 4 else fields
        try:
            value = int(grade)
        except ValueError:
            if number == 1:  # a header
                continue
            raise ProbeDataError(f"{name}: line {number} field 'grade' is not an integer ({grade!r})") from None
        width = len(fields)
        yield query, doc, value


# --- from a collection to probe examples ---------------------------------------------------------


def _grades(collection: Collection, split: str) -> dict[str, dict[str, int]] | None:
    """query -> passage -> grade of one split (the highest where a pair is judged twice), or ``None``."""
    stream = collection.judgements(split)
    if stream is None:
        return None
    grades: dict[str, dict[str, int]] = {}
    for query, doc, grade in stream:
        judged = grades.setdefault(query, {})
        judged[doc] = max(grade, judged.get(doc, grade))
    return grades


def split_queries(queries: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split of query ids into train and test (sorted ids, shuffled with ``random.Random(seed)``;
    the first ``round(test_fraction * n)`` go to test, at least one to each side)."""
    if len(queries) < 2:
        raise ProbeDataError(f"a split by query needs at least 2 judged queries, got {len(queries)}")
    order = sorted(queries)
    random.Random(seed).shuffle(order)
    num_test = min(max(1, round(test_fraction * len(order))), len(order) - 1)
    return sorted(order[num_test:]), sorted(order[:num_test])


@dataclass(frozen=True)
class JudgedQueries:
    """The judged queries of a collection as split for probing, with their texts and grades."""

    query_ids: dict[str, list[str]]
    """``train`` and ``test`` query ids, sorted; never a query in both."""
    grades: dict[str, dict[str, int]]
    """query -> passage -> grade, for every judged query of either split."""
    positives: dict[str, list[str]]
    """The passages of each query at the relevance threshold (queries with a text and at least one)."""
    texts: dict[str, str]
    """The text of each query in ``positives``."""
    split: dict
    """How the split was made (recorded in the provenance)."""
    dropped: dict[str, dict[str, int]]


def judged_queries(collection: Collection, options: CollectionOptions) -> JudgedQueries:
    """Train and test are the collection's own splits when it has both (queries judged in both are kept
    in test only, counted under ``in_test``), else a seeded split of the test queries by query
    (``options.test_fraction``, ``options.seed``). Reads the judgements and the queries, not the corpus."""
    options.check()
    test = _grades(collection, options.test_split)
    if test is None:
        raise ProbeDataError(f"{collection.name}: no {options.test_split!r} judgements")
    train = _grades(collection, options.train_split) if options.train_split != options.test_split else None
    dropped = {"train": dict.fromkeys(COLLECTION_DROP_REASONS, 0), "test": dict.fromkeys(COLLECTION_DROP_REASONS, 0)}
    if train is None:
        train_ids, test_ids = split_queries(list(test), options.test_fraction, options.seed)
        grades = test
        split = {"kind": "seeded by query", "test_fraction": options.test_fraction, "seed": options.seed}
    else:
        shared = train.keys() & test.keys()
        dropped["train"]["in_test"] = len(shared)
        train_ids, test_ids = sorted(train.keys() - shared), sorted(test)
        grades = train | test
        split = {"kind": "given", "train": options.train_split, "test": options.test_split}

    query_ids = {"train": train_ids, "test": test_ids}
    positives: dict[str, list[str]] = {}
    for name, ids in query_ids.items():
        for query in ids:
            relevant = sorted(doc for doc, grade in grades[query].items() if grade >= options.relevance_threshold)
            if relevant:
                positives[query] = relevant
            else:
                dropped[name]["no_relevant"] += 1
    wanted = set(positives)
    query_texts = {query: text for query, text in collection.queries() if query in wanted}
    for name, ids in query_ids.items():
        dropped[name]["unknown_query"] = sum(1 for query in ids if query in positives and query not in query_texts)
    positives = {query: docs for query, docs in positives.items() if query in query_texts}
    return JudgedQueries(query_ids, grades, positives, query_texts, split, dropped)


def read_collection_set(
    collection: Collection,
    negatives: mining.NegativeSource,
    options: CollectionOptions,
    work_folder: Path,
    encoder: mining.VectorEncoder | None = None,
) -> tuple[ProbeSetRead, dict]:
    """The probe set of a collection and its provenance (what goes into its identity beside the examples).

    The queries are split by :func:`judged_queries`. One example per (query, relevant passage), in
    query-id then passage-id order; its negatives come from :func:`dkacq.data.mining.negatives`, which
    keeps judged passages of grade above 0 out. ``work_folder`` holds the mining's resumable state;
    ``encoder`` is the dense mining model.
    """
    judged_set = judged_queries(collection, options)
    query_ids, grades, positives = judged_set.query_ids, judged_set.grades, judged_set.positives
    query_texts, split, dropped = judged_set.texts, judged_set.split, judged_set.dropped

    judged = {query: {doc for doc, grade in grades[query].items() if grade > 0} for query in positives}
    not_relevant = {query: sorted(doc for doc, grade in grades[query].items() if grade <= 0) for query in positives}
    mined = mining.negatives(
        negatives,
        collection.passages,
        {query: query_texts[query] for query in positives},
        judged,
        not_relevant,
        options,
        work_folder,
        collection.request(),
        encoder,
    )
    needed = {doc for docs in positives.values() for doc in docs} | {
        doc for docs in mined.candidates.values() for doc in docs
    }
    texts = {doc: text for doc, text in collection.passages() if doc in needed}

    splits = {}
    for name, ids in query_ids.items():
        columns: dict[str, list[str | None]] = {column: [] for column in EXAMPLE_COLUMNS}
        for query in ids:
            for positive in positives.get(query, []):
                if positive not in texts:
                    dropped[name]["unknown_passage"] += 1
                    continue
                chosen = mining.choose(
                    texts[positive],
                    [(doc, texts[doc]) for doc in mined.candidates.get(query, []) if doc in texts and doc != positive],
                    options.num_negatives,
                    options.near_duplicate,
                )
                if not chosen:
                    dropped[name]["no_negative"] += 1
                    continue
                row = (query_texts[query], texts[positive], *chosen, *[None] * (NUM_NEGATIVES - len(chosen)))
                for column, value in zip(EXAMPLE_COLUMNS, row, strict=True):
                    columns[column].append(value)
        if not columns["question"]:
            hint = "; mine negatives with data.negatives bm25, dense or random" if negatives == "file" else ""
            raise ProbeDataError(f"{collection.name} ({name} split): gives no examples ({_said(dropped[name])}){hint}")
        splits[name] = datasets.Dataset.from_dict(columns, features=EXAMPLE_FEATURES)
    for name, counts in dropped.items():
        if any(counts.values()):
            _log.warning("%s (%s split): dropped %s", collection.name, name, _said(counts))
    overlap = len(set(splits["train"]["question"]) & set(splits["test"]["question"]))
    read = ProbeSetRead(
        datasets.DatasetDict(splits),
        {name: f"{collection.name} [{name}]" for name in splits},
        dropped,
        overlap,
    )
    provenance = {
        "corpus": mined.corpus,
        "negatives": mined.method,
        "split": split,
        "options": options.identity(),
    }
    return read, provenance


def _said(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in counts.items() if count) or "nothing"
