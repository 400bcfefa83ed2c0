"""Pooling of one hidden state into one vector per text: pure tensor functions.

``hidden`` is ``[batch, tokens, dim]`` and ``attention_mask`` is ``[batch, tokens]`` with 1 for real
tokens, whatever side the padding is on.
"""

from typing import Literal, get_args

import torch
from torch import Tensor

Pooling = Literal["cls", "mean", "eos", "eos_reference"]
"""``cls``: first token. ``mean``: average of real tokens. ``eos``: last real token (the EOS id that
tokenization appends). ``eos_reference``: the published code's reading of the last position, which is
padding for every text shorter than the maximum length; kept only to reproduce published numbers."""

POOLINGS: tuple[str, ...] = get_args(Pooling)


def cls_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    return hidden[:, 0]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Position of the last real token of each row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(dim=1)


def eos_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask)]


def last_position_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    return hidden[:, -1]


_POOLERS = {"cls": cls_pool, "mean": mean_pool, "eos": eos_pool, "eos_reference": last_position_pool}


def pool(hidden: Tensor, attention_mask: Tensor, pooling: Pooling) -> Tensor:
    """One vector per text from one hidden state."""
    if pooling not in _POOLERS:
        raise ValueError(f"unknown pooling '{pooling}'; choose one of {', '.join(POOLINGS)}")
    return _POOLERS[pooling](hidden, attention_mask)
