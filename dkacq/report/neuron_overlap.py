"""Which neurons two attribution runs on the same texts share: Jaccard overlaps per layer and module.

For one layer's module of two runs (a fine-tuned model and its backbone or random-init control, or one
model under two attribution targets), with ``A_t`` and ``B_t`` the neurons active in text ``t``:

- **per text**: ``J_t = |A_t ∩ B_t| / |A_t ∪ B_t|``, averaged over the texts where the union is not empty:
  do the two runs use the same neurons for the same text?
- **frequent sets**: ``J(F_A, F_B)`` for ``F = {neurons active in at least share x 100% of the texts}``:
  do they rely on the same neurons across the text set?

Each comes with a percentile bootstrap interval over texts (the texts resampled with replacement, as
:mod:`dkacq.report.attribution_stats` draws them; the frequent sets recounted on every resample) and with what two random sets of the same sizes would give:
for sets of sizes ``a`` and ``b`` drawn uniformly from ``N`` neurons the intersection is hypergeometric,
so ``E[J] = sum_k P(k) k / (a + b - k)`` exactly (:func:`expected_random_jaccard`; for the per-text
measure, averaged over the texts' own sizes). An overlap near its random level says the two runs share
no more neurons than their numbers of active neurons imply.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.stats import hypergeom

from dkacq.encoders.presets import backbone_of, control_label
from dkacq.formats.counts import AttributionRun
from dkacq.report.attribution_stats import DEFAULT_CONFIDENCE, DEFAULT_SEED, percentile_interval

DEFAULT_SHARE = 0.5
"""The frequent sets: neurons active in at least half of the texts."""
DEFAULT_RESAMPLES = 1000


@cache
def expected_random_jaccard(num_neurons: int, size_a: int, size_b: int) -> float:
    """``E[|A ∩ B| / |A ∪ B|]`` for ``A``, ``B`` drawn uniformly among ``num_neurons`` neurons with the given
    sizes (exact, from the hypergeometric law of the intersection); NaN when both are empty."""
    if not (0 <= size_a <= num_neurons and 0 <= size_b <= num_neurons):
        raise ValueError(f"set sizes {size_a}, {size_b} outside 0..{num_neurons}")
    if size_a + size_b == 0:
        return float("nan")
    k = np.arange(max(0, size_a + size_b - num_neurons), min(size_a, size_b) + 1)
    probability = hypergeom(num_neurons, size_a, size_b).pmf(k)
    return float((probability * k / (size_a + size_b - k)).sum())


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise ``|a ∩ b| / |a ∪ b|`` of two bool arrays ``[..., neurons]``; NaN where the union is empty."""
    union = (a | b).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, (a & b).sum(-1) / np.maximum(union, 1), np.nan)


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    random: float
    """What two random sets of the same sizes would give."""


@dataclass(frozen=True)
class LayerOverlap:
    per_text: Interval
    frequent: Interval
    frequent_sizes: tuple[int, int]
    """``|F_A|``, ``|F_B|``."""
    texts: int
    """Texts with a non-empty union (those the per-text mean is over)."""


def _bounds(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of the resamples where the measure is defined."""
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan")
    low, high = percentile_interval(values, confidence)
    return float(low), float(high)


def layer_overlap(
    a: np.ndarray,
    b: np.ndarray,
    share: float = DEFAULT_SHARE,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> LayerOverlap:
    """The overlaps of two runs' active sets ``a``, ``b`` (bool ``[texts, neurons]``, rows the same texts)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"active sets of shapes {a.shape} and {b.shape}; both must be [texts, neurons] alike")
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    texts, neurons = a.shape
    rng = np.random.default_rng(seed)
    per_text = jaccard(a, b)
    defined = np.isfinite(per_text)
    sizes_a, sizes_b = a.sum(1), b.sum(1)
    random = [expected_random_jaccard(neurons, int(x), int(y)) for x, y in zip(sizes_a[defined], sizes_b[defined])]
    picks = np.stack([rng.integers(0, texts, size=texts) for _ in range(resamples)])
    resampled = per_text[picks]
    finite = np.isfinite(resampled)
    counted = finite.sum(1)
    means = np.where(counted > 0, np.where(finite, resampled, 0).sum(1) / np.maximum(counted, 1), np.nan)
    weights = np.zeros((resamples, texts), dtype=np.float32)
    np.add.at(weights, (np.repeat(np.arange(resamples), texts), picks.ravel()), 1)
    needed = share * texts

    def frequent(counts_a: np.ndarray, counts_b: np.ndarray) -> np.ndarray:
        return jaccard(counts_a >= needed, counts_b >= needed)

    boot = frequent(weights @ a.astype(np.float32), weights @ b.astype(np.float32))
    sets_a, sets_b = a.sum(0) >= needed, b.sum(0) >= needed
    value = float(jaccard(sets_a, sets_b))
    return LayerOverlap(
        Interval(
            float(per_text[defined].mean()) if defined.any() else float("nan"),
            *_bounds(means, confidence),
            float(np.mean(random)) if random else float("nan"),
        ),
        Interval(
            value,
            *_bounds(boot, confidence),
            expected_random_jaccard(neurons, int(sets_a.sum()), int(sets_b.sum())),
        ),
        (int(sets_a.sum()), int(sets_b.sum())),
        int(defined.sum()),
    )


@dataclass(frozen=True)
class OverlapRow:
    kind: str
    layer: int
    threshold: float
    overlap: LayerOverlap


def overlap_pairs(runs: Sequence[AttributionRun]) -> list[tuple[int, int]]:
    """``(i, j)`` index pairs of runs whose neuron sets can be compared: the same texts (data set, split,
    text side), pooling, module kinds and widths, both with per-text active sets; and either a model
    and its backbone or random-init control under one target, or one model under two targets."""
    same = ("dataset", "split", "text_side", "pooling", "kinds")
    labels = {run.model for run in runs}
    pairs = []
    for i, a in enumerate(runs):
        for j, b in enumerate(runs):
            if i == j or not (a.has_active_sets and b.has_active_sets):
                continue
            if not all(getattr(a, key) == getattr(b, key) for key in same):
                continue
            if any(a.num_neurons(kind) != b.num_neurons(kind) for kind in a.kinds):
                continue
            base = b.model in (backbone_of(a.model, labels), control_label(a.model)) and a.target == b.target
            targets = a.model == b.model and (a.target, b.target) == ("relevance", "norm")
            if base or targets:
                pairs.append((i, j))
    return pairs


def run_overlaps(
    a: AttributionRun,
    b: AttributionRun,
    threshold: float,
    share: float = DEFAULT_SHARE,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> list[OverlapRow]:
    """The overlaps of every layer's module of every kind, over the texts both runs counted."""
    keys = [key for key in a.text_keys if key in set(b.text_keys)]
    if not keys:
        raise ValueError(f"{a.run_dir} and {b.run_dir} share no text")
    rows = []
    for kind in a.kinds:
        sets_a, sets_b = a.active_sets(kind, threshold, keys), b.active_sets(kind, threshold, keys)
        for layer in range(sets_a.shape[1]):
            result = layer_overlap(sets_a[:, layer], sets_b[:, layer], share, resamples, confidence, seed)
            rows.append(OverlapRow(kind, layer, threshold, result))
    return rows
