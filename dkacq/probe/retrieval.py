"""Each probed layer of an encoder as a retriever over a collection: its test queries against the corpus.

When the corpus holds at most ``collection.retrieval_limit`` passages, every passage is encoded (at every
probed layer, in one forward pass per batch) and searched exactly (:class:`dkacq.data.exact_search.TopK`,
chunk by chunk, on the GPU when there is one): scope ``corpus``. Above it, each test query ranks its
candidate pool, its BM25 top 100 and its judged passages (a re-ranking view): scope ``pool``. The
vectors are those of the probe's cache (same encoder, pooling, prefixes, lengths), computed afresh
since the cache holds only the probe set's passages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from dkacq.data.collection import COLLECTION_FORMATS, judged_queries, open_collection
from dkacq.data.exact_search import Similarity, TopK
from dkacq.data.mining import bm25_rankings, work_folder
from dkacq.encoders import loading
from dkacq.encoders.text_encoder import encode_texts
from dkacq.formats.identity import digest
from dkacq.formats.retrieval import RETRIEVAL_FILE, check_retrieval, finished_retrieval, retrieval_row, upsert_retrieval
from dkacq.probe.retrieval_measures import DEPTH, mean_measures, pool_ranking, query_measures

WINDOW = 4096
"""Passages read at once and sorted by length, so that a batch pads little."""


SIMILARITIES: tuple[Similarity, ...] = ("cosine", "dot")


@dataclass(frozen=True)
class LayerRetrieval:
    """Mean measures per (similarity, probed layer), and what they were measured on."""

    measures: dict[tuple[str, int], dict[str, float]]
    scope: str
    num_queries: int
    num_passages: int
    seconds: float


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def layer_retrieval(data, layers: list[int]) -> LayerRetrieval:
    """Retrieval measures of a collection's test queries at ``layers`` of ``data``'s encoder (a
    ``ProbeDataModule`` whose source is a collection), for each of :data:`SIMILARITIES`."""
    hparams, options = data.hparams, data.collection
    started = time.perf_counter()
    collection = open_collection(
        hparams.source, options, hparams.path, hparams.dataset_id, hparams.train_file, hparams.test_file
    )
    judged = judged_queries(collection, options)
    queries = [query for query in judged.query_ids["test"] if query in judged.positives]
    query_encoder, passage_encoder = (encoder.to(_device()).eval() for encoder in loading.load_encoders(data.preset))
    query_vectors = encode_texts(query_encoder, [judged.texts[query] for query in queries], layers)
    keys = [(similarity, index) for similarity in SIMILARITIES for index in range(len(layers))]

    head = list(islice(collection.passages(), options.retrieval_limit + 1))
    if len(head) <= options.retrieval_limit:
        scope, num_passages = "corpus", len(head)
        rankings = _corpus_rankings(head, query_vectors, passage_encoder, layers, keys)
    else:
        del head
        scope = "pool"
        folder = work_folder(data.probe_set_folder.parent / "mining", collection.request())
        rankings, num_passages = _pool_rankings(
            collection, judged, queries, query_vectors, passage_encoder, layers, keys, folder, options.query_batch
        )
    measures = {
        (similarity, layers[index]): mean_measures(
            [
                query_measures(ranking, judged.grades[query], options.relevance_threshold)
                for query, ranking in zip(queries, rankings[similarity, index], strict=True)
            ]
        )
        for similarity, index in keys
    }
    return LayerRetrieval(measures, scope, len(queries), num_passages, time.perf_counter() - started)


def _corpus_rankings(passages, query_vectors, encoder, layers, keys) -> dict[tuple, list[list[str]]]:
    """Per (similarity, layer index), per query, the top :data:`DEPTH` passage ids of the whole corpus."""
    device = _device()
    searches = {
        (similarity, index): TopK(query_vectors[index].to(device), DEPTH, similarity) for similarity, index in keys
    }
    ids = [doc for doc, _ in passages]
    for start in range(0, len(passages), WINDOW):
        window = passages[start : start + WINDOW]
        vectors = encode_texts(encoder, [text for _, text in window], layers)
        rows = torch.arange(start, start + len(window))
        for (_, index), search in searches.items():
            search.add(vectors[index], rows)
    return {key: [[ids[row] for row in ranking] for ranking in search.ranking()] for key, search in searches.items()}


def _pool_rankings(collection, judged, queries, query_vectors, encoder, layers, keys, folder, batch):
    """Per (similarity, layer index), per query, its pool (BM25 top :data:`DEPTH` and its judged
    passages) in similarity order; and the corpus's size."""
    corpus, ranked = bm25_rankings(
        collection.passages, {query: judged.texts[query] for query in queries}, folder, DEPTH, batch
    )
    pools = {query: list(dict.fromkeys([*ranked[query], *sorted(judged.grades[query])])) for query in queries}
    needed = {doc for pool in pools.values() for doc in pool}
    texts = {doc: text for doc, text in collection.passages() if doc in needed}
    ids = sorted(texts)
    row = {doc: number for number, doc in enumerate(ids)}
    vectors = encode_texts(encoder, [texts[doc] for doc in ids], layers)
    rankings = {}
    for similarity, index in keys:
        per_query = []
        for number, query in enumerate(queries):
            pool = [doc for doc in pools[query] if doc in row]
            shown = vectors[index, [row[doc] for doc in pool]]
            per_query.append(
                [pool[position] for position in pool_ranking(query_vectors[index, number], shown, similarity)]
            )
        rankings[similarity, index] = per_query
    return rankings, corpus["passages"]


def retrieval_identity(data, layer: int, similarity: str) -> dict:
    """Everything that decides a retrieval row: the encoder's weights, pooling and data (the cache
    request, whose data fingerprint holds the collection's mining and split), the layer, the similarity
    and the corpus limit that decides the scope."""
    return {
        "retrieval": similarity,
        "layer": layer,
        "retrieval_limit": data.collection.retrieval_limit,
        "embeddings": data.cache_request(),
    }


def retrieval_rows(data) -> list[tuple[dict, dict]]:
    """The (key, identity) of every row a collection's setting writes: each similarity at each probed layer."""
    key = {"dataset": data.hparams.dataset, "model": data.preset.label, "pooling": data.preset.pooling}
    return [
        (key | {"layer": layer, "similarity": similarity}, retrieval_identity(data, layer, similarity))
        for layer in data.probed_layers()
        for similarity in SIMILARITIES
    ]


def wants_retrieval(data) -> bool:
    return data.hparams.source in COLLECTION_FORMATS and data.collection.retrieval


def check_planned_retrieval(data, run_dir: Path) -> None:
    """Refuse, before any work, retrieval rows that the run's table holds from other settings."""
    if wants_retrieval(data):
        check_retrieval(
            Path(run_dir) / RETRIEVAL_FILE, [retrieval_row(key, identity, {}) for key, identity in retrieval_rows(data)]
        )


def record_retrieval(data, run_dir: Path) -> list[dict]:
    """Measure and write the retrieval rows of a collection's setting that ``run_dir/retrieval.csv``
    lacks (all probed layers in one pass over the corpus); the rows written."""
    if not wants_retrieval(data):
        return []
    path = Path(run_dir) / RETRIEVAL_FILE
    done = finished_retrieval(path)
    todo = [(key, identity) for key, identity in retrieval_rows(data) if digest(identity) not in done]
    if not todo:
        return []
    found = layer_retrieval(data, sorted({key["layer"] for key, _ in todo}))
    counts = {
        "scope": found.scope,
        "num_queries": found.num_queries,
        "num_passages": found.num_passages,
        "seconds": f"{found.seconds:.1f}",
    }
    rows = [
        retrieval_row(
            key,
            identity,
            counts | {m: f"{v:.5f}" for m, v in found.measures[key["similarity"], key["layer"]].items()},
        )
        for key, identity in todo
    ]
    upsert_retrieval(path, rows)
    return rows
