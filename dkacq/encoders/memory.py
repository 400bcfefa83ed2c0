"""How much memory a device offers, and how many texts of an extraction pass fit in it.

Memory models here and in ``dkacq/attribution/passes.py`` are *stated*: bytes per text (or replica)
and token from the model's config, written as formulas so that a CPU test can check a choice against
them. On a GPU the attribution model is then calibrated by measurement on the first batch.
"""

import math

import psutil
import torch

SAFETY_MARGIN = 0.15
"""The share of a device's free memory left unused when choosing a pass: the allocator's fragmentation,
kernels' workspaces and the error of a stated model."""


def free_bytes(device: torch.device) -> int:
    """Memory new tensors can take on ``device`` now: on a GPU the driver's free memory plus what
    torch's caching allocator holds unused; on the CPU the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return int(psutil.virtual_memory().available)


def total_bytes(device: torch.device) -> int:
    """The device's whole memory (a GPU's, or the machine's RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(psutil.virtual_memory().total)


TRUE_PRECISIONS = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


def running_dtype(precision: str) -> torch.dtype:
    """The dtype of weights and activations under Lightning's ``precision``: a ``-true`` precision's own,
    else float32 (mixed precisions keep float32 weights; their half activations leave room to spare)."""
    return TRUE_PRECISIONS.get(precision, torch.float32)


def budget_bytes(available: int, margin: float = SAFETY_MARGIN) -> int:
    """What a pass may use of ``available`` bytes: all but the safety margin."""
    return int(available * (1.0 - margin))


def extraction_bytes_per_text_token(config, element_bytes: int, tokens: int) -> int:
    """Bytes one text of ``tokens`` tokens needs per token in an extraction forward pass (no gradients).

    Every hidden state is kept until pooling (``L + 1`` vectors of the hidden size), and inside one layer
    at a time the query, key, value and attention output (4 hidden), the feed-forward activations
    (2 intermediate: the projection and its activation, or gate and up) and the attention scores with
    their softmax (2 heads x tokens):

        element_bytes x ((L + 1) h + 4 h + 2 f + 2 heads tokens)
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    values = (layers + 1) * hidden + 4 * hidden + 2 * config.intermediate_size + 2 * config.num_attention_heads * tokens
    return element_bytes * values


def extraction_batch_size(config, element_bytes: int, tokens: int, budget: int, most: int) -> int:
    """The largest power of two of texts of ``tokens`` tokens whose extraction pass fits ``budget`` bytes,
    between 1 and ``most``. A power of two, so that devices of similar memory choose the same batches."""
    per_text = tokens * extraction_bytes_per_text_token(config, element_bytes, tokens)
    fit = max(1, budget // per_text)
    return int(min(most, 2 ** int(math.log2(fit))))


AUTO_EXTRACTION_MOST = {"cuda": 1024, "cpu": 64}
"""The largest batch ``auto`` takes: on a CPU larger batches are no faster, and 64 is the default."""


def auto_extraction_batch_size(configs, dtype: torch.dtype, tokens: int, device: torch.device) -> int:
    """``--data.extraction_batch_size auto``: :func:`extraction_batch_size` for the longest text, in the
    device's whole memory less the encoders' weights and the safety margin. The whole memory, not the
    free: every process of a build must choose the same batches (they are the build's layout, and a
    resumed build must find them again), whatever else its device holds at that moment. ``configs``: the
    query and passage encoders' configs (one, when they are the same model); the largest decides."""
    weights = sum(weight_bytes(config, dtype) for config in configs)
    budget = budget_bytes(total_bytes(device) - weights, SAFETY_MARGIN)
    most = AUTO_EXTRACTION_MOST["cuda" if device.type == "cuda" else "cpu"]
    return min(extraction_batch_size(config, dtype.itemsize, tokens, budget, most) for config in configs)


def weight_bytes(config, dtype: torch.dtype) -> int:
    """The bytes of a model's weights in ``dtype``, from its config alone (built on the meta device:
    nothing is allocated or downloaded)."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters()) * dtype.itemsize
