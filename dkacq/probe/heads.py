"""Probe heads: from a query vector and N passage vectors to N logits. Pure torch.

``concat`` is the study's probe. A linear map of the concatenation [q, p_1..p_N] adds the query's
contribution ``W_q q`` to the logits without ever multiplying q with a passage, so it cannot tell which
passage matches the query; with the positive at a random position the query only shifts class priors.
``passage_only`` drops q to measure exactly that. ``query_aware`` scores each passage with shared
weights from ``q * p_k`` and ``p_k``: the smallest linear probe that can compare query and passage.
"""

from typing import Literal, get_args

import torch
from torch import Tensor, nn

Head = Literal["concat", "passage_only", "query_aware"]
HEADS: tuple[Head, ...] = get_args(Head)
"""Every probe head, in the order reports show them; ``concat`` (the study's probe) first."""


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


def build_head(head: Head, dim: int, num_passages: int) -> nn.Module:
    classes = {"concat": ConcatHead, "passage_only": PassageOnlyHead, "query_aware": QueryAwareHead}
    if head not in classes:
        raise ValueError(f"unknown probe head '{head}'; choose one of {', '.join(HEADS)}")
    return classes[head](dim, num_passages)
