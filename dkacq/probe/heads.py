"""Probe heads: from a query vector and N passage vectors to N logits. Pure torch.

``concat`` is the study's probe. A linear map of the concatenation [q, p_1..p_N] adds the query's
contribution ``W_q q`` to the logits without ever multiplying q with a passage, so it cannot tell which
passage matches the query; with the positive at a random position the query only shifts class priors.
``passage_only`` drops q to measure exactly that. ``query_aware`` scores each passage with shared
weights from ``q * p_k`` and ``p_k``: the smallest linear probe that can compare query and passage (a
bilinear form with a diagonal matrix). ``bilinear`` scores ``(U q) . (V p_k) + w . p_k`` with ``U`` and
``V`` of rank ``r``: a full (low-rank) bilinear form, which can compare query and passage along
directions that are not the coordinate axes. ``residual_bilinear`` scores ``s q . p_k + (U q) . (V p_k)``
and starts with ``V = 0``: at initialisation it ranks passages exactly as the untrained dot product (or
cosine, on normalised vectors) does, so a trained probe that is worse than the vectors' own similarity
is never selected (:class:`ResidualBilinearHead`).

:data:`HEADS` are the trained heads; the untrained baselines that are reported beside them are in
:mod:`dkacq.probe.baselines` (``METHODS`` there is both).
"""

from typing import Literal, get_args

import torch
from torch import Tensor, nn

Head = Literal["concat", "passage_only", "query_aware", "bilinear", "residual_bilinear"]
HEADS: tuple[Head, ...] = get_args(Head)
"""Every trained probe head, in the order reports show them; ``concat`` (the study's probe) first."""
DECAYED_HEADS: tuple[Head, ...] = ("residual_bilinear",)
"""The heads whose fit reads ``model.weight_decay`` (the others train with Adam without decay): the option
is part of their cells' identity only."""
DEFAULT_RANK = 64
"""Rank of the ``bilinear`` head's ``U`` and ``V`` unless ``rank`` says otherwise."""


class ConcatHead(nn.Module):
    def __init__(self, dim: int, num_passages: int):
        super().__init__()
        self.linear = nn.Linear((num_passages + 1) * dim, num_passages)

    def forward(self, query: Tensor, passages: Tensor) -> Tensor:
        return self.linear(torch.cat([query, passages.flatten(1)], dim=1))


class PassageOnlyHead(nn.Module):
    def __init__(self, dim: int, num_passages: int):
        super().__init__()
        self.linear = nn.Linear(num_passages * dim, num_passages)

    def forward(self, query: Tensor, passages: Tensor) -> Tensor:
        return self.linear(passages.flatten(1))


class QueryAwareHead(nn.Module):
    def __init__(self, dim: int, num_passages: int):
        super().__init__()
        self.linear = nn.Linear(2 * dim, 1)

    def forward(self, query: Tensor, passages: Tensor) -> Tensor:
        features = torch.cat([query.unsqueeze(1) * passages, passages], dim=-1)
        return self.linear(features).squeeze(-1)


class BilinearHead(nn.Module):
    """``score_k = (U q) . (V p_k) + w . p_k``: a bilinear form of rank ``rank`` plus a passage prior,
    shared over the N positions (a bias would be the same for every passage and cancel in the softmax)."""

    def __init__(self, dim: int, num_passages: int, rank: int = DEFAULT_RANK):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.query_map = nn.Linear(dim, rank, bias=False)
        self.passage_map = nn.Linear(dim, rank, bias=False)
        self.prior = nn.Linear(dim, 1, bias=False)

    def forward(self, query: Tensor, passages: Tensor) -> Tensor:
        projected_query = self.query_map(query).unsqueeze(1)  # [B, 1, r]
        match = (projected_query * self.passage_map(passages)).sum(-1)  # [B, N]
        return match + self.prior(passages).squeeze(-1)


class ResidualBilinearHead(nn.Module):
    """``score_k = s q . p_k + (U q) . (V p_k)``, i.e. ``q^T (s I + U^T V) p_k``: the untrained similarity
    plus a correction of rank ``rank``.

    ``V`` starts at zero and ``s`` at 1, so the untrained head's scores are the dot products (cosines,
    with ``model.normalize``) themselves and its accuracy that of the similarity baseline on the same
    draws; ``U`` starts random, so the gradient of ``V`` is not zero. Weight decay on ``U`` and ``V``
    (``model.weight_decay``, AdamW) pulls the head back towards the similarity, not towards zero scores;
    ``s`` (the softmax temperature) is not decayed. :attr:`evaluates_at_init` makes the probe validate
    this starting point as epoch 0, before any step (:class:`~dkacq.probe.linear_probe.LinearProbe`).
    """

    evaluates_at_init = True

    def __init__(self, dim: int, num_passages: int, rank: int = DEFAULT_RANK):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.scale = nn.Parameter(torch.ones(()))
        self.query_map = nn.Linear(dim, rank, bias=False)
        self.passage_map = nn.Linear(dim, rank, bias=False)
        nn.init.zeros_(self.passage_map.weight)

    def decayed(self) -> list[nn.Parameter]:
        """The parameters weight decay applies to: the low-rank factors, not the scale."""
        return [self.query_map.weight, self.passage_map.weight]

    def forward(self, query: Tensor, passages: Tensor) -> Tensor:
        similarity = torch.einsum("bd,bnd->bn", query, passages)
        correction = (self.query_map(query).unsqueeze(1) * self.passage_map(passages)).sum(-1)
        return self.scale * similarity + correction


def build_head(head: Head, dim: int, num_passages: int, rank: int = DEFAULT_RANK) -> nn.Module:
    """The head's module; ``rank`` is read by ``bilinear`` and ``residual_bilinear`` alone."""
    if head == "bilinear":
        return BilinearHead(dim, num_passages, rank)
    if head == "residual_bilinear":
        return ResidualBilinearHead(dim, num_passages, rank)
    classes = {"concat": ConcatHead, "passage_only": PassageOnlyHead, "query_aware": QueryAwareHead}
    if head not in classes:
        raise ValueError(f"unknown probe head '{head}'; choose one of {', '.join(HEADS)}")
    return classes[head](dim, num_passages)
