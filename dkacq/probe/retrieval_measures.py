"""How well each layer's untrained similarity retrieves: the measures of a ranking, and a pool's ranking.

The similarity baselines (:mod:`dkacq.probe.baselines`) pick the positive among N shown passages; these
rank a whole corpus (or each query's candidate pool) by the same similarity, as a retriever would, and
score the ranking with the judgements: nDCG@10 (gain = the grade of every passage graded above 0, the
ideal ranking from all of the query's judged passages, log2 discount, as trec_eval's ``ndcg_cut``),
MRR@10 (1 / rank of the first passage at the relevance threshold in the top 10, else 0) and Recall@100
(the share of the query's passages at the threshold found in the top 100). Pure torch and Python: the
encoding that feeds it and the rows are in ``probe/retrieval.py``, the corpus's exact search in
``data/exact_search.py``.
"""

from __future__ import annotations

import math

from torch import Tensor
from torch.nn import functional

from dkacq.data.exact_search import Similarity

MEASURES = ("ndcg@10", "mrr@10", "recall@100")
DEPTH = 100
"""Passages kept per query: the deepest cut of :data:`MEASURES`."""


def pool_ranking(query: Tensor, passages: Tensor, similarity: Similarity = "cosine") -> list[int]:
    """The order of one query's pool of passages (``[P, d]``) by similarity, best first, ties by position."""
    if similarity == "cosine":
        query, passages = functional.normalize(query.float(), dim=-1), functional.normalize(passages.float(), dim=-1)
    scores = passages.float() @ query.float()
    return scores.argsort(descending=True, stable=True).tolist()


def query_measures(ranking: list[str], grades: dict[str, int], threshold: int = 1) -> dict[str, float]:
    """nDCG@10, MRR@10 and Recall@100 of one query's ranking (passage ids, best first) against its
    judgements (passage id -> grade)."""
    relevant = {doc for doc, grade in grades.items() if grade >= threshold}
    if not relevant:
        raise ValueError("a query without a relevant passage has no retrieval measures")
    gains = sorted((grade for grade in grades.values() if grade > 0), reverse=True)[:10]
    ideal = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains))
    dcg = sum(max(grades.get(doc, 0), 0) / math.log2(rank + 2) for rank, doc in enumerate(ranking[:10]))
    first = next((rank for rank, doc in enumerate(ranking[:10]) if doc in relevant), None)
    return {
        "ndcg@10": dcg / ideal,
        "mrr@10": 0.0 if first is None else 1.0 / (first + 1),
        "recall@100": len(relevant & set(ranking[:100])) / len(relevant),
    }


def mean_measures(per_query: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each measure over the queries."""
    if not per_query:
        raise ValueError("no queries to average")
    return {measure: sum(values[measure] for values in per_query) / len(per_query) for measure in MEASURES}
