"""The random choices of the study: hard-negative sampling and the N-passage draws."""

from __future__ import annotations

import random

import torch

NUM_NEGATIVES = 4


def sample_negatives(negatives: list[str], rng: random.Random, k: int = NUM_NEGATIVES) -> list[str] | None:
    """Draw the ``k`` negatives of one example the way the published sets were made.

    No negatives: ``None`` (drop the example, and no random number is consumed). Fewer than ``k``:
    ``rng.choices`` (with replacement). Otherwise ``rng.sample`` (without replacement, in draw order).
    Callers make one call per positive, in file order, on one stream shared by the train and then
    the test file, so that the draws reproduce the published sets bit for bit.
    """
    if not negatives:
        return None
    if len(negatives) < k:
        return rng.choices(negatives, k=k)
    return rng.sample(negatives, k)


def check_num_passages(num_passages: int) -> None:
    """N, the passages an example shows: the positive and 1..4 of its negatives."""
    if not 2 <= num_passages <= NUM_NEGATIVES + 1:
        raise ValueError(
            f"num_passages must be between 2 and {NUM_NEGATIVES + 1} (the positive and 1 to {NUM_NEGATIVES} "
            f"negatives), got {num_passages}"
        )


def draw_passage_orders(
    num_examples: int, num_passages: int, generator: torch.Generator, present: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw, for every example, which passages it shows and in which order.

    Each row holds the positive (0) and a uniformly random subset of ``num_passages - 1`` of the 4
    negatives (1..4 = ``negative_context_0..3``), in a uniformly random order. The negatives come from
    a random permutation of 1..4 (its first ``num_passages - 1`` entries are a uniform subset in a
    uniform order) and the positive is inserted at a uniform position, which makes the whole
    arrangement uniform. Tensors live on ``generator.device``.

    ``present`` (bool ``[num_examples, 4]``) says which negatives an example has (a mined collection
    may give fewer than 4): absent ones sort after every present one, so the draw is uniform over the
    present ones, and every example must have at least ``num_passages - 1``. The same random numbers
    are drawn either way, so examples with all 4 negatives get the same draws as without ``present``.

    Returns ``columns`` (long, ``[num_examples, num_passages]``) and ``labels`` (long,
    ``[num_examples]``), the position of the positive in each row.
    """
    check_num_passages(num_passages)
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    device = generator.device
    keys = torch.rand(num_examples, NUM_NEGATIVES, generator=generator, device=device, dtype=torch.float64)
    if present is not None:
        if bool((present.sum(dim=1) < num_passages - 1).any()):
            raise ValueError(f"an example has fewer than {num_passages - 1} negatives, too few for N = {num_passages}")
        keys = keys.masked_fill(~present.to(device), 2.0)
    negatives = keys.argsort(dim=1) + 1
    labels = torch.randint(num_passages, (num_examples,), generator=generator, device=device)
    positions = torch.arange(num_passages, device=device).expand(num_examples, -1)
    is_positive = positions == labels[:, None]
    slots = (positions - (positions > labels[:, None]).long()).clamp(max=NUM_NEGATIVES - 1)
    columns = torch.where(is_positive, 0, negatives.gather(1, slots))
    return columns, labels
