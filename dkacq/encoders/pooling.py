"""Pooling of one hidden state into one vector per text: pure tensor functions.

``hidden`` is ``[batch, tokens, dim]`` and ``attention_mask`` is ``[batch, tokens]`` with 1 for real
tokens, whatever side the padding is on.
"""

from typing import Literal, get_args

import torch
from torch import Tensor

Pooling = Literal["cls", "mean", "eos", "lasttoken", "max", "mean_sqrt_len", "weightedmean", "eos_reference"]
"""``cls``: first real token. ``mean``: average of real tokens. ``eos``: last real token (the EOS id that
tokenization appends). ``lasttoken``: last real token of the text as its tokenizer gives it (nothing
appended). ``max``: maximum over real tokens, per dimension. ``mean_sqrt_len``: sum of real tokens over
the square root of their number. ``weightedmean``: real tokens weighted by their position (1, 2, ...
from the first real token). These follow sentence-transformers' pooling modes of the same names
(``mean_sqrt_len_tokens`` there). ``eos_reference``: the published code's reading of the last position,
which is padding for every text shorter than the maximum length; kept only to reproduce published numbers."""

POOLINGS: tuple[str, ...] = get_args(Pooling)


def first_token_index(attention_mask: Tensor) -> Tensor:
    """Position of the first real token of each row, for left or right padding."""
    return attention_mask.to(torch.int32).argmax(dim=1)


def cls_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, first_token_index(attention_mask)]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def max_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    return hidden.masked_fill(attention_mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values


def mean_sqrt_len_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1).sqrt()


def weighted_mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Token ``t`` weighted by ``t - first + 1``, ``first`` being the row's first real token."""
    positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
    weights = (positions - first_token_index(attention_mask).unsqueeze(1)) * attention_mask.to(hidden.dtype)
    return (hidden * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp_min(1e-9)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Position of the last real token of each row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(dim=1)


def eos_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask)]


def last_position_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    return hidden[:, -1]


_POOLERS = {
    "cls": cls_pool,
    "mean": mean_pool,
    "eos": eos_pool,
    "lasttoken": eos_pool,
    "max": max_pool,
    "mean_sqrt_len": mean_sqrt_len_pool,
    "weightedmean": weighted_mean_pool,
    "eos_reference": last_position_pool,
}


def pool(hidden: Tensor, attention_mask: Tensor, pooling: Pooling) -> Tensor:
    """One vector per text from one hidden state."""
    if pooling not in _POOLERS:
        raise ValueError(f"unknown pooling '{pooling}'; choose one of {', '.join(POOLINGS)}")
    return _POOLERS[pooling](hidden, attention_mask)
