"""What integrated gradients explain: a function F of each text's pooled final vector ``v``. Pure torch.

- ``norm``: ``||v||``, the study's (before any normalisation): how strongly the text is represented,
  which is not what a retriever optimises.
- ``relevance``: ``s(v, u)``, the score of the text against its partner from the other side of its
  example (a query's positive passage; a positive passage's query), whose vector ``u`` is held fixed:
  the retrieval objective itself.
- ``margin``: ``s(v, u) - mean_j s(v, n_j)`` for query texts, with the example's negative passages
  ``n_j`` held fixed as well: what separates the positive from the drawn negatives. For positive
  passage texts it would be ``s(u, v) - mean_j s(u, n_j)``, which with fixed negatives differs from
  ``relevance`` by a constant and so has the same attributions; it is refused there
  (:func:`check_objective`) rather than reported as something else.

``s`` is the dot product, or the cosine (both vectors L2-normalised) for models used that way. The
fixed vectors are computed once per text under the unscaled model (:class:`Partners`), so every point
of the integration path scores against the same vectors.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor
from torch.nn import functional

Objective = Literal["norm", "relevance", "margin"]
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)
Similarity = Literal["dot", "cosine"]


@dataclass(frozen=True)
class Partners:
    """The fixed vectors each text of a batch is scored against (rows follow the batch's texts)."""

    positive: Tensor
    """``[texts, d]``: the vector of the text's partner (for passage texts, their query)."""
    negatives: Tensor | None = None
    """``[texts, m, d]``: the example's negative passages (``margin`` only)."""


ObjectiveFunction = Callable[[Tensor, Tensor], Tensor]
"""``(pooled [rows, d], text [rows]) -> F [rows]``: ``text`` is each row's text in the caller's batch."""


def check_objective(objective: Objective, text_side: str) -> None:
    """Refuse (one line) an objective that the text side cannot have."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown attribution target '{objective}'; choose one of {', '.join(OBJECTIVES)}")
    if objective == "margin" and text_side != "query":
        raise ValueError(
            "the margin target attributes query texts (for passage texts, with the negatives fixed, it equals "
            "relevance up to a constant); use target relevance for passages"
        )


def pooled_norm(pooled: Tensor, texts: Tensor) -> Tensor:
    return pooled.norm(dim=-1)


def objective_function(
    objective: Objective, similarity: Similarity = "dot", partners: Partners | None = None
) -> ObjectiveFunction:
    """F for ``objective``; ``relevance`` and ``margin`` need ``partners`` (``margin`` with negatives)."""
    if objective == "norm":
        return pooled_norm
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown attribution target '{objective}'; choose one of {', '.join(OBJECTIVES)}")
    if similarity not in get_args(Similarity):
        raise ValueError(f"unknown similarity '{similarity}'; choose dot or cosine")
    if partners is None or (objective == "margin" and partners.negatives is None):
        raise ValueError(f"the {objective} target needs the fixed vectors of each text's example")

    def unit(vectors: Tensor) -> Tensor:
        return functional.normalize(vectors, dim=-1) if similarity == "cosine" else vectors

    def scores(pooled: Tensor, texts: Tensor) -> Tensor:
        vector = unit(pooled)
        value = (vector * unit(partners.positive.to(pooled)).index_select(0, texts)).sum(-1)
        if objective == "margin":
            negatives = unit(partners.negatives.to(pooled)).index_select(0, texts)
            value = value - torch.einsum("rd,rmd->rm", vector, negatives).mean(-1)
        return value

    return scores
