"""Exact top-k search of query vectors against passage vectors given in chunks (pure torch).

Shared by the dense mining of negatives (``data/mining.py``) and the per-layer retrieval measures
(``probe/retrieval.py``): every passage is scored, so the result is the true top k, with memory bounded
by ``queries x (k + chunk)`` scores whatever the corpus's size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional

Similarity = Literal["cosine", "dot"]


class TopK:
    """The ``k`` highest-scoring passages of every query, over passages given in chunks (exact search:
    a chunk's scores are merged with the kept ones by ``torch.topk``, so memory is ``queries x (k +
    chunk)``; equal scores are ordered as ``topk`` orders them, the same on every run of one device)."""

    def __init__(self, queries: Tensor, k: int, similarity: Similarity = "cosine"):
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"unknown similarity '{similarity}'; choose cosine or dot")
        self.similarity, self.k = similarity, k
        self.queries = functional.normalize(queries.float(), dim=-1) if similarity == "cosine" else queries.float()
        self.scores = torch.full((len(queries), 0), -math.inf, device=queries.device)
        self.rows = torch.zeros((len(queries), 0), dtype=torch.long, device=queries.device)

    def add(self, passages: Tensor, rows: Tensor) -> None:
        """Score passages (``[C, d]``, their corpus rows ``[C]``) against every query."""
        passages = passages.float().to(self.queries.device)
        if self.similarity == "cosine":
            passages = functional.normalize(passages, dim=-1)
        scores = self.queries @ passages.T
        rows = rows.to(scores.device).expand_as(scores)
        scores, rows = torch.cat([self.scores, scores], dim=1), torch.cat([self.rows, rows], dim=1)
        self.scores, order = scores.topk(min(self.k, scores.shape[1]), dim=1)  # a selection, not a sort
        self.rows = rows.gather(1, order)

    def ranking(self) -> list[list[int]]:
        """Each query's passage rows, best first."""
        return self.rows.cpu().tolist()
