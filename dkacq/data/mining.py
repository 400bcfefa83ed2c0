"""Negatives for collections that have none: from the judgements, BM25 or a dense model over the whole
corpus, or random.

- ``file``: the query's judged passages of grade 0 or below (judged not relevant), in a seeded order.
- ``bm25``: ``bm25s`` over the whole corpus (Lucene BM25, k1 = 1.5, b = 0.75, lower-cased words of two or
  more characters, English stop words, no stemming), drawn at random (seeded per query) from the ranks
  ``collection.negative_ranks`` of each query's ranking.
- ``dense``: a model's vectors over the whole corpus, exact search (:class:`~dkacq.data.exact_search.TopK`),
  drawn from the same ranks. The model comes as a :class:`VectorEncoder` (built by ``datamodules/``,
  which may load encoders); its identity is the method's record.
- ``random``: passages drawn uniformly from the corpus (seeded per query).

A passage the query's judgements grade above 0 is never a negative, whatever the relevance threshold;
a candidate whose words nearly equal the positive's is skipped (:func:`choose`). Each query's draws come
from ``random.Random("<seed>/<query id>")``, so they do not depend on the order a reader gives.

Resumable and bounded: the corpus is first read whole and checked (its content digest and the row ->
passage id map, saved as ``doc_ids.npy``), so that a bad line is refused before the costly pass that
tokenizes or encodes it reads the corpus again; the BM25 index is saved with ``bm25s`` and memory-mapped
for search; a dense model's passage vectors are saved chunk by chunk as they are encoded (``chunk_NNNNN.npy``, ``CHUNK``
passages each), so a stopped encoding resumes after its last saved chunk. The queries are searched in
batches of ``collection.query_batch``, each saved as ``batch_NNNNN.npy`` (passage rows, ``[queries,
depth]``) when done: a run stopped at any point resumes after its last saved batch. All of it lives
under the work folder, in folders named by digests of what they hold, so other settings never reuse them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch

from dkacq.data.exact_search import Similarity, TopK
from dkacq.data.examples import ProbeDataError
from dkacq.formats.atomic import atomic_write, atomic_write_text, replace_folder, staging_folder
from dkacq.formats.identity import digest

if TYPE_CHECKING:
    from dkacq.data.collection import CollectionOptions

NegativeSource = Literal["file", "bm25", "random", "dense"]
NEGATIVE_SOURCES: tuple[str, ...] = ("file", "bm25", "random", "dense")
BM25 = {"method": "lucene", "k1": 1.5, "b": 0.75}
TOKENIZER = {"lower": True, "splitter": r"(?u)\b\w\w+\b", "stopwords": "english", "stemmer": None}
CHUNK = 10_000
"""Passages tokenized (BM25) or encoded and saved (dense) at once."""
RESERVE = 3
"""Candidates kept per negative wanted, so near-duplicates of the positive can be skipped."""
_WORDS = re.compile(r"\w+")
_log = logging.getLogger("dkacq")

Passages = Callable[[], Iterator[tuple[str, str]]]


class VectorEncoder(Protocol):
    """A dense mining model: its texts' vectors, the similarity it ranks by, the device it searches on,
    and ``identity``: everything that decides its vectors (weights, pooling, prefixes, lengths,
    normalisation, dtype) and, under ``similarity``, its ranking. The identity less the similarity names
    the saved vectors (shared by both similarities), the whole of it the method's record."""

    identity: dict
    similarity: Similarity
    device: torch.device

    def encode(self, texts: list[str], side: Literal["query", "passage"]) -> torch.Tensor:
        """``[len(texts), dim]`` float32 vectors, on the CPU."""
        ...


@dataclass(frozen=True)
class Mined:
    """Per query, candidate negatives in draw order; the corpus's digest and size; the method's record."""

    candidates: dict[str, list[str]]
    corpus: dict
    method: dict


def check_source(negatives: str) -> None:
    """Before any work: the name is one of the sources."""
    if negatives not in NEGATIVE_SOURCES:
        raise ProbeDataError(f"unknown data.negatives {negatives!r}; expected one of {', '.join(NEGATIVE_SOURCES)}")


def negatives(
    source: NegativeSource,
    passages: Passages,
    queries: dict[str, str],
    judged: dict[str, set[str]],
    not_relevant: dict[str, list[str]],
    options: CollectionOptions,
    folder: Path,
    collection_request: dict,
    encoder: VectorEncoder | None = None,
) -> Mined:
    """Candidate negatives of every query in ``queries`` (id -> text), ``RESERVE`` per negative wanted.

    ``judged``: the passages of each query graded above 0 (never negatives); ``not_relevant``: those
    graded 0 or below (the ``file`` source). ``collection_request`` identifies the collection's content
    cheaply (file digests or an ir_datasets id), naming the work folders. ``encoder``: the ``dense``
    source's model.
    """
    check_source(source)
    started = time.perf_counter()
    folder = work_folder(folder, collection_request)
    wanted = options.num_negatives * RESERVE
    if source in ("bm25", "dense"):
        first, last = options.negative_ranks
        if source == "bm25":
            corpus, ranked = bm25_rankings(passages, queries, folder, last, options.query_batch)
            method = {"source": "bm25", "library": f"bm25s {_bm25s().__version__}", **BM25, "tokenizer": TOKENIZER}
        else:
            if encoder is None:
                raise ProbeDataError("data.negatives=dense needs a mining model (data.collection.dense_model)")
            corpus, ranked = dense_rankings(passages, queries, folder, last, options.query_batch, encoder)
            method = {"source": "dense", **encoder.identity}
        ranked = {query: found[first - 1 : last] for query, found in ranked.items()}
        print(
            f"mined {source} negatives of {len(queries):,} queries over {corpus['passages']:,} passages "
            f"in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    else:
        corpus, doc_ids = _scan(passages, folder)
        method = {"source": source}
        if source == "random":
            ranked = {
                query: [
                    str(doc_ids[row])
                    for row in _rng(options, query).sample(
                        range(len(doc_ids)), min(len(doc_ids), wanted + len(judged[query]))
                    )
                ]
                for query in queries
            }
        else:
            ranked = {query: list(not_relevant.get(query, [])) for query in queries}
    candidates = {}
    for query in queries:
        pool = [str(doc) for doc in dict.fromkeys(ranked[query]) if str(doc) not in judged[query]]
        if source != "random":  # random's are drawn in order already
            _rng(options, query).shuffle(pool)
        candidates[query] = pool[:wanted]
    return Mined(candidates, corpus, method)


def mining_saved(folder: Path) -> str:
    """What the mining under ``folder`` (a data set's mining folder) keeps for a rerun, in words: the
    line a stopped command prints (``commands/stopping.py``)."""
    folder = Path(folder)
    chunks = len(list(folder.glob("corpus-*/dense-*/chunk_*.npy")))
    batches = len(list(folder.glob("corpus-*/**/batch_*.npy")))
    kept = ["the BM25 index"] if any(folder.glob("corpus-*/bm25-*/done.json")) else []
    kept += [f"{chunks:,} chunk{'s' * (chunks != 1)} of passage vectors"] if chunks else []
    kept += [f"{batches:,} batch{'es' * (batches != 1)} of searched queries"] if batches else []
    return f"mining the probe set's negatives in {folder}: {', '.join(kept) or 'nothing'} saved"


def work_folder(folder: Path, collection_request: dict) -> Path:
    """Where a collection's corpus scan, index and searches are kept, under the mining folder."""
    return Path(folder) / f"corpus-{digest(collection_request, 16)}"


def bm25_rankings(
    passages: Passages, queries: dict[str, str], folder: Path, depth: int, batch: int
) -> tuple[dict, dict[str, list[str]]]:
    """The corpus's digest and size, and each query's top ``depth`` passage ids by BM25 (fewer where
    fewer passages share a word with it), with the index and searches kept in ``folder``."""
    corpus, doc_ids, index, tokenizer = _bm25_index(passages, folder)
    run = _run_folder(folder, "bm25", queries, depth, batch)
    rows = _search(run, queries, batch, lambda texts: _retrieve(index, tokenizer, texts, depth))
    return corpus, _passage_ids(doc_ids, rows)


def dense_rankings(
    passages: Passages, queries: dict[str, str], folder: Path, depth: int, batch: int, encoder: VectorEncoder
) -> tuple[dict, dict[str, list[str]]]:
    """The corpus's digest and size, and each query's top ``depth`` passage ids by ``encoder``'s
    similarity (exact search over every passage), with the vectors and searches kept in ``folder``."""
    corpus, doc_ids, vectors = _dense_index(passages, folder, encoder)
    run = _run_folder(vectors, f"dense-{encoder.similarity}", queries, depth, batch)
    rows = _search(run, queries, batch, lambda texts: _dense_retrieve(vectors, encoder, texts, depth, len(doc_ids)))
    return corpus, _passage_ids(doc_ids, rows)


def _passage_ids(doc_ids: np.ndarray, rows: dict[str, np.ndarray]) -> dict[str, list[str]]:
    return {query: [str(doc_ids[row]) for row in found if row >= 0] for query, found in rows.items()}


def choose(positive: str, candidates: list[tuple[str, str]], count: int, near_duplicate: float | None) -> list[str]:
    """The first ``count`` candidate texts that are neither the positive's text, nor a near-duplicate of
    it (Jaccard similarity of lower-cased word sets at least ``near_duplicate``), nor a repeat."""
    chosen: list[str] = []
    words = _word_set(positive)
    for _, text in candidates:
        if len(chosen) == count:
            break
        if text == positive or text in chosen:
            continue
        if near_duplicate is not None and jaccard(words, _word_set(text)) >= near_duplicate:
            continue
        chosen.append(text)
    return chosen


def jaccard(first: set[str], second: set[str]) -> float:
    if not first and not second:
        return 1.0
    return len(first & second) / len(first | second)


def _word_set(text: str) -> set[str]:
    return set(_WORDS.findall(text.lower()))


def _rng(options: CollectionOptions, query: str) -> random.Random:
    return random.Random(f"{options.seed}/{query}")


def _bm25s():
    try:
        import bm25s
    except ImportError as error:
        raise ProbeDataError("data.negatives=bm25 needs the bm25s package (pip install bm25s)") from error
    return bm25s


# --- the corpus scan and the index ----------------------------------------------------------------


def _scan(passages: Passages, folder: Path, each_chunk: Callable[[int, list[str]], None] | None = None):
    """The corpus's digest and size and its row -> passage id array, saved in ``folder`` (read back when
    there); ``each_chunk`` is given every chunk's number and texts, in corpus order, when the scan runs."""
    info_path, ids_path = folder / "corpus.json", folder / "doc_ids.npy"
    if each_chunk is None and info_path.is_file() and ids_path.is_file():
        return json.loads(info_path.read_text()), np.load(ids_path)
    hashed, ids = hashlib.sha256(), []
    stream = passages()  # the readers refuse an id given twice
    number = 0
    while chunk := list(islice(stream, CHUNK)):
        for identifier, text in chunk:
            hashed.update(identifier.encode() + b"\t" + text.encode() + b"\n")
        ids.extend(identifier for identifier, _ in chunk)
        if each_chunk is not None:
            each_chunk(number, [text for _, text in chunk])
        number += 1
    if not ids:
        raise ProbeDataError("corpus: holds no passages")
    doc_ids = np.asarray(ids)
    info = {"digest": hashed.hexdigest()[:16], "passages": len(ids)}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(ids_path, lambda path: _save_npy(path, doc_ids))
    atomic_write_text(info_path, json.dumps(info))
    return info, doc_ids


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as file:
        np.save(file, array, allow_pickle=False)


def _tokenizer():
    bm25s = _bm25s()
    return bm25s.tokenization.Tokenizer(
        lower=TOKENIZER["lower"], splitter=TOKENIZER["splitter"], stopwords=TOKENIZER["stopwords"]
    )


def _bm25_index(passages: Passages, folder: Path):
    """The corpus scan and the BM25 index, built in one pass over the corpus unless saved already."""
    bm25s = _bm25s()
    index_folder = folder / f"bm25-{digest({'library': bm25s.__version__, **BM25, **TOKENIZER}, 12)}"
    if not ((index_folder / "done.json").is_file() and (folder / "corpus.json").is_file()):
        _scan(passages, folder)  # a bad line is refused before the tokenizing pass
        _build_index(passages, folder, index_folder)
    corpus, doc_ids = _scan(passages, folder)
    tokenizer = _tokenizer()
    tokenizer.load_vocab(str(index_folder))
    return corpus, doc_ids, bm25s.BM25.load(str(index_folder), mmap=True, load_vocab=True), tokenizer


def _build_index(passages: Passages, folder: Path, index_folder: Path) -> None:
    bm25s = _bm25s()
    tokenizer, token_ids = _tokenizer(), []

    def tokenize(_: int, texts: list[str]) -> None:
        token_ids.extend(tokenizer.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False))

    started = time.perf_counter()
    corpus, _ = _scan(passages, folder, tokenize)
    retriever = bm25s.BM25(**BM25)
    retriever.index(bm25s.tokenization.Tokenized(token_ids, tokenizer.get_vocab_dict()), show_progress=False)
    token_ids.clear()
    staging = staging_folder(index_folder)
    try:
        retriever.save(str(staging), show_progress=False)
        tokenizer.save_vocab(str(staging))
        atomic_write_text(staging / "done.json", json.dumps({"seconds": time.perf_counter() - started, **corpus}))
        replace_folder(staging, index_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _run_folder(folder: Path, method: str, queries: dict[str, str], depth: int, size: int) -> Path:
    """Where one search of these queries (their texts), at this depth and batch size, saves its batches."""
    key = {"queries": digest({query: queries[query] for query in sorted(queries)}, 16), "depth": depth, "batch": size}
    return folder / f"{method}-run-{digest(key, 12)}"


def _search(
    run: Path, queries: dict[str, str], size: int, retrieve: Callable[[list[str]], np.ndarray]
) -> dict[str, np.ndarray]:
    """Every query's passage rows (``retrieve``: a batch of query texts -> ``[batch, depth]`` rows, -1
    past the corpus's end or without a match), in batches of ``size`` saved in ``run`` as they finish,
    so that a stopped search resumes."""
    order = sorted(queries)
    run.mkdir(parents=True, exist_ok=True)
    found: dict[str, np.ndarray] = {}
    for number, start in enumerate(range(0, len(order), size)):
        batch = order[start : start + size]
        path = run / f"batch_{number:05d}.npy"
        if path.is_file():
            rows = np.load(path)
        else:
            rows = retrieve([queries[query] for query in batch])
            atomic_write(path, lambda temporary, rows=rows: _save_npy(temporary, rows))
        found.update(zip(batch, rows, strict=True))
    return found


def _retrieve(index, tokenizer, texts: list[str], depth: int) -> np.ndarray:
    num_docs = index.scores["num_docs"]
    k = min(depth, num_docs)
    tokens = tokenizer.tokenize(texts, update_vocab=False, return_as="ids", show_progress=False)
    documents, scores = index.retrieve(tokens, k=k, show_progress=False, n_threads=-1)
    rows = np.where(scores > 0, documents, -1).astype(np.int64)
    if k < depth:
        rows = np.pad(rows, ((0, 0), (0, depth - k)), constant_values=-1)
    return rows


# --- dense: the corpus's vectors, saved chunk by chunk, and exact search --------------------------------


def _dense_index(passages: Passages, folder: Path, encoder: VectorEncoder) -> tuple[dict, np.ndarray, Path]:
    """The corpus scan and its passages' vectors (``chunk_NNNNN.npy``), encoded in one pass over the corpus
    unless saved already; a chunk saved by a stopped pass is kept, not encoded again."""
    encoding = {key: value for key, value in encoder.identity.items() if key != "similarity"}
    vectors = folder / f"dense-{digest({'chunk': CHUNK, **encoding}, 12)}"
    if not ((vectors / "done.json").is_file() and (folder / "corpus.json").is_file()):
        _scan(passages, folder)  # a bad line is refused before any passage is encoded
        vectors.mkdir(parents=True, exist_ok=True)
        kept = len(list(vectors.glob("chunk_*.npy")))
        print(
            f"dense negatives: encoding the corpus into {vectors}"
            + (f" ({kept} chunks of {CHUNK:,} kept from a stopped run)" if kept else "")
            + "; a stopped run resumes after its last saved chunk",
            flush=True,
        )
        started = time.perf_counter()

        def encode(number: int, texts: list[str]) -> None:
            path = vectors / f"chunk_{number:05d}.npy"
            if not path.is_file():
                array = encoder.encode(texts, "passage").float().numpy()
                atomic_write(path, lambda temporary: _save_npy(temporary, array))

        corpus, _ = _scan(passages, folder, encode)
        done = {"seconds": time.perf_counter() - started, **corpus}
        atomic_write_text(vectors / "done.json", json.dumps(done))
    corpus, doc_ids = _scan(passages, folder)
    return corpus, doc_ids, vectors


def _dense_retrieve(vectors: Path, encoder: VectorEncoder, texts: list[str], depth: int, size: int) -> np.ndarray:
    """The top ``depth`` passage rows of each query text, every saved chunk scored on the encoder's device."""
    search = TopK(encoder.encode(texts, "query").to(encoder.device), min(depth, size), encoder.similarity)
    for number, start in enumerate(range(0, size, CHUNK)):
        chunk = torch.from_numpy(np.load(vectors / f"chunk_{number:05d}.npy"))
        search.add(chunk, torch.arange(start, start + len(chunk)))
    rows = search.rows.cpu().numpy().astype(np.int64)
    if rows.shape[1] < depth:
        rows = np.pad(rows, ((0, 0), (0, depth - rows.shape[1])), constant_values=-1)
    return rows
