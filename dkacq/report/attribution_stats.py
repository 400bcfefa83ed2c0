"""Intervals over texts and paired comparisons of attribution runs, from their per-text active counts.

The texts are the sampling unit: a run attributes a sample of texts, and every number it reports (a
neuron's active percentage, a module's active share) would come out differently on other texts. The
intervals here resample texts with replacement (percentile bootstrap); the comparisons pair two runs
over the same texts (a fine-tuned model and its backbone, text by text).

**What is resampled, and why nothing more is stored.** A run folder's counts keep, per text and
module, how many of the module's neurons were active (:mod:`dkacq.formats.counts`): enough for
intervals of a module's (or a side's) active share and for paired per-text tests, at texts x layers
numbers per kind and threshold. Per-text activity of single neurons (texts x every neuron, 46,080 per
BERT text and 483,328 per Llama-2-7B text, per threshold) is kept bit-packed for the neuron overlap of
two runs (:mod:`dkacq.report.neuron_overlap`), and is not needed for what the report shows of single
neurons: a neuron's percentage is the mean of its 0/1 activity over the texts,
and the bootstrap distribution of such a mean is exactly ``Binomial(n, k/n) / n`` for a neuron active in
``k`` of ``n`` texts, so its percentile interval follows from ``k`` and ``n`` alone
(:func:`neuron_percentage_intervals`). Only joint statistics over several neurons (the largest
percentage of a heatmap bin, a neuron's paired change between two runs) would need the per-neuron
table; the report gives none of those intervals.

**Bootstrap contract.** :func:`bootstrap_means` draws resample ``b`` as ``rng.integers(0, n, size=n)``
(row indices of the texts), one call per resample, in order; paired statistics use the same indices
for both runs. Each public function seeds its own ``numpy`` generator from ``seed``.

**Paired test.** Per layer, the per-text active shares of two runs over the same texts are compared by
Wilcoxon's signed-rank test (``scipy.stats.wilcoxon``, two-sided, zero differences dropped), Bonferroni-
corrected over the layers of a kind, as the probe comparisons are over layers.

**The paper's claims** (:data:`PUBLISHED_CLAIMS`) become rows with intervals when both runs exist:
"intermediate-layer activations" is read as the active share of the feed-forward blocks' intermediate
side (BERT's ``intermediate``, Llama's ``gate_proj``/``up_proj``) over all layers, and a change "by
32-41%" as the relative change of that share, ``share(model) / share(backbone) - 1``.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom, wilcoxon

from dkacq.encoders.presets import backbone_of, comparison, control_label
from dkacq.formats.counts import AttributionRun

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0
MISSING = "–"


# --------------------------------------------------------------------------- the statistics


def bootstrap_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[resamples, *values.shape[1:]]``: the mean over rows (texts) of each resample of ``values``' rows.

    Resample ``b`` takes the rows ``rng.integers(0, n, size=n)``, one draw per resample, in order.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim < 1 or len(values) == 0:
        raise ValueError("bootstrap needs at least one text")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    n = len(values)
    means = np.empty((resamples, *values.shape[1:]))
    for b in range(resamples):
        means[b] = values[rng.integers(0, n, size=n)].mean(axis=0)
    return means


def paired_bootstrap_means(
    values: np.ndarray, base: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bootstrap_means` of two tables whose rows are the same texts, with the same rows drawn for both."""
    values, base = np.asarray(values, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if values.shape != base.shape:
        raise ValueError(f"paired tables differ in shape: {values.shape} vs {base.shape}")
    both = bootstrap_means(np.stack([values, base], axis=1), resamples, rng)
    return both[:, 0], both[:, 1]


def percentile_interval(samples: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """The central ``confidence`` interval of bootstrap samples (axis 0), numpy's default (linear) quantiles."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence:g}")
    low, high = np.quantile(np.asarray(samples), [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return low, high


def bootstrap_interval(
    values: np.ndarray,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, low, high)`` over the rows (texts) of ``values``, per column: the mean and its percentile
    bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    low, high = percentile_interval(bootstrap_means(values, resamples, np.random.default_rng(seed)), confidence)
    return values.mean(axis=0), low, high


def neuron_percentage_intervals(
    counts: np.ndarray, num_texts: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` in percent, per neuron: the percentile bootstrap interval over texts of the
    percentage of texts in which the neuron is active, from its count alone.

    Resampling ``n`` texts, a neuron active in ``k`` of them is active in ``Binomial(n, k/n)`` of the
    resample, so the bootstrap distribution of its percentage is exactly that, and its quantiles are
    the binomial's (no resampling noise). Neurons are resampled one at a time: the intervals are
    marginal, not joint.
    """
    if num_texts < 1:
        raise ValueError("num_texts must be positive")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence:g}")
    share = np.asarray(counts, dtype=np.float64) / num_texts
    low = binom.ppf((1 - confidence) / 2, num_texts, share)
    high = binom.ppf((1 + confidence) / 2, num_texts, share)
    return low / num_texts * 100, high / num_texts * 100


def paired_test(values: np.ndarray, base: np.ndarray) -> float:
    """Two-sided p-value of Wilcoxon's signed-rank test on paired values (scipy's defaults: zero
    differences dropped); 1.0 when every pair is equal (no evidence of any change)."""
    values, base = np.asarray(values, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if values.shape != base.shape or values.ndim != 1:
        raise ValueError("paired_test takes two 1-d arrays of one length")
    if np.all(values == base):
        return 1.0
    return float(wilcoxon(values, base).pvalue)


# --------------------------------------------------------------------------- per-text shares of a run


def _threshold(run: AttributionRun, threshold: float | None) -> float:
    return run.default_threshold() if threshold is None else float(threshold)


def kind_shares(run: AttributionRun, kind: str, threshold: float, keys: Sequence[str] | None = None) -> np.ndarray:
    """``[texts, layers + 1]`` in percent: per text, the share of each layer's module of ``kind`` that was
    active, and last the share over all layers; rows in ``keys`` order (text keys), else the run's."""
    table = run.per_text_at(kind, threshold) if keys is None else run.per_text_by_key(kind, threshold, keys)
    table = table.astype(np.float64)
    neurons = run.num_neurons(kind)
    every = table.sum(axis=1, keepdims=True) / (table.shape[1] * neurons)
    return np.concatenate([table / neurons, every], axis=1) * 100


def side_share(run: AttributionRun, side: str, threshold: float, keys: Sequence[str] | None = None) -> np.ndarray:
    """``[texts]`` in percent: per text, the share of every neuron of the side's modules (all kinds and
    layers) that was active; rows in ``keys`` order, else the run's."""
    kinds = [kind for kind in run.kinds if run.side(kind) == side]
    if not kinds:
        raise KeyError(f"{run.run_dir} has no modules on the {side} side")
    active, neurons = 0.0, 0
    for kind in kinds:
        table = run.per_text_at(kind, threshold) if keys is None else run.per_text_by_key(kind, threshold, keys)
        active = active + table.astype(np.float64).sum(axis=1)
        neurons += table.shape[1] * run.num_neurons(kind)
    return active / neurons * 100


def common_texts(run: AttributionRun, base: AttributionRun) -> list[str]:
    """The text keys both runs counted, in ``run``'s order; raises when they share none."""
    if not (run.has_per_text and base.has_per_text):
        raise ValueError("both runs need per-text counts (written by this dkacq or later)")
    theirs = set(base.text_keys)
    keys = [key for key in run.text_keys if key in theirs]
    if not keys:
        raise ValueError(f"{run.run_dir} and {base.run_dir} share no text")
    return keys


@dataclass(frozen=True)
class ModuleShare:
    """A run's active share of one kind's module at one layer (or over all its layers), with its interval."""

    run_dir: str
    model: str
    dataset: str
    text_side: str
    kind: str
    side: str
    threshold: float
    layer: int | None
    """0-based; None for the share over every layer of the kind."""
    num_texts: int
    share: float
    """Percentage of the module's neurons active, averaged over texts."""
    low: float
    high: float


def module_shares(
    run: AttributionRun,
    threshold: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[ModuleShare]:
    """Per kind, per layer and over all layers: the active share and its bootstrap interval over texts
    (at the run's first threshold unless given). Empty for a run without per-text counts."""
    if not run.has_per_text:
        return []
    threshold = _threshold(run, threshold)
    rows = []
    for kind in run.kinds:
        shares = kind_shares(run, kind, threshold)
        mean, low, high = bootstrap_interval(shares, confidence, resamples, seed)
        layers = shares.shape[1] - 1
        for column in range(layers + 1):
            rows.append(
                ModuleShare(
                    str(run.run_dir),
                    run.model,
                    run.dataset,
                    run.text_side,
                    kind,
                    run.side(kind),
                    threshold,
                    column if column < layers else None,
                    len(shares),
                    float(mean[column]),
                    float(low[column]),
                    float(high[column]),
                )
            )
    return rows


# --------------------------------------------------------------------------- two runs over the same texts


@dataclass(frozen=True)
class ShareChange:
    """A model against its backbone (or any base run) over the same texts, one kind at one layer."""

    model: str
    base_model: str
    dataset: str
    split: str
    text_side: str
    kind: str
    side: str
    threshold: float
    layer: int | None
    """0-based; None for the share over every layer of the kind."""
    num_texts: int
    share: float
    base_share: float
    change: float
    """``share - base_share`` in percentage points."""
    change_low: float
    change_high: float
    relative_change: float
    """``share / base_share - 1`` in percent (nan when the base share is 0)."""
    relative_low: float
    relative_high: float
    """nan when some resample's base share is 0 (a ratio without a value there)."""
    p_value: float
    """Wilcoxon signed-rank over texts of the per-text shares."""
    significant: bool
    """Bonferroni over the kind's layers (the all-layers row: p < alpha alone)."""


def _relative(values: np.ndarray, base: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base > 0, values / np.where(base > 0, base, 1) - 1, np.nan) * 100


def _nan_interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`percentile_interval` per column, nan for a column with an undefined sample."""
    if np.isnan(samples).any():
        nan = np.full(samples.shape[1:], np.nan)
        finite = ~np.isnan(samples).any(axis=0)
        low, high = nan.copy(), nan.copy()
        if finite.any():
            low[finite], high[finite] = percentile_interval(samples[:, finite], confidence)
        return low, high
    return percentile_interval(samples, confidence)


def compare_runs(
    run: AttributionRun,
    base: AttributionRun,
    threshold: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    alpha: float = 0.05,
) -> list[ShareChange]:
    """Per kind both runs share, per layer and over all layers: ``run``'s active share against ``base``'s
    over the texts both counted, with paired bootstrap intervals for the change (points and relative)
    and Wilcoxon's signed-rank test. At ``run``'s first threshold unless given; raises when a run lacks
    it or per-text counts."""
    threshold = _threshold(run, threshold)
    keys = common_texts(run, base)
    rows = []
    for kind in (kind for kind in run.kinds if kind in base.kinds):
        values, base_values = kind_shares(run, kind, threshold, keys), kind_shares(base, kind, threshold, keys)
        if values.shape != base_values.shape:
            raise ValueError(
                f"{kind} has {values.shape[1] - 1} layers in one run, {base_values.shape[1] - 1} in the other"
            )
        means, base_means = paired_bootstrap_means(values, base_values, resamples, np.random.default_rng(seed))
        change_low, change_high = percentile_interval(means - base_means, confidence)
        relative_low, relative_high = _nan_interval(_relative(means, base_means), confidence)
        share, base_share = values.mean(axis=0), base_values.mean(axis=0)
        relative = _relative(share, base_share)
        layers = values.shape[1] - 1
        p_values = [paired_test(values[:, column], base_values[:, column]) for column in range(layers + 1)]
        for column in range(layers + 1):
            bound = alpha / layers if column < layers else alpha
            rows.append(
                ShareChange(
                    run.model,
                    base.model,
                    run.dataset,
                    run.split,
                    run.text_side,
                    kind,
                    run.side(kind),
                    threshold,
                    column if column < layers else None,
                    len(keys),
                    float(share[column]),
                    float(base_share[column]),
                    float(share[column] - base_share[column]),
                    float(change_low[column]),
                    float(change_high[column]),
                    float(relative[column]),
                    float(relative_low[column]),
                    float(relative_high[column]),
                    p_values[column],
                    p_values[column] < bound,
                )
            )
    return rows


def comparable_pairs(runs: Sequence[AttributionRun]) -> list[tuple[int, int]]:
    """``(model run, base run)`` index pairs on the same texts and pooling: a fine-tuned model and its
    backbone, or a model and its random-init control, on the same data set, split, text side, pooling and
    attribution target. Their difference is what fine-tuning, or training at all, changed."""
    same = ("dataset", "split", "text_side", "pooling", "target")
    labels = {run.model for run in runs}
    return [
        (i, j)
        for i, a in enumerate(runs)
        for j, b in enumerate(runs)
        if b.model in (backbone_of(a.model, labels), control_label(a.model))
        and all(getattr(a, key) == getattr(b, key) for key in same)
    ]


# --------------------------------------------------------------------------- the paper's claims


@dataclass(frozen=True)
class PublishedClaim:
    """A sentence of the paper about how fine-tuning changed a side's active share."""

    model: str
    base_model: str
    side: str
    direction: int
    """+1: the model's share is higher than its backbone's; -1: lower."""
    low: float | None
    high: float | None
    """The published relative change, in percent, where the claim gives one."""
    text: str


PUBLISHED_CLAIMS: tuple[PublishedClaim, ...] = (
    PublishedClaim(
        "dpr-question", "bert-base-uncased", "intermediate", +1, 32.0, 41.0,
        "DPR-query raises intermediate-layer activations by 32-41% over BERT",
    ),
    PublishedClaim(
        "contriever", "bert-base-uncased", "intermediate", -1, None, None,
        "Contriever lowers intermediate-layer activations against BERT",
    ),
    PublishedClaim(
        "repllama", "llama", "intermediate", -1, None, None,
        "RepLlama lowers intermediate-layer activations against Llama",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class ClaimCheck:
    """One published claim measured on two runs over the same texts."""

    claim: PublishedClaim
    dataset: str
    split: str
    text_side: str
    pooling: str
    threshold: float
    num_texts: int
    share: float
    base_share: float
    relative_change: float
    """``share / base_share - 1`` in percent."""
    relative_low: float
    relative_high: float
    p_value: float
    """Wilcoxon signed-rank over texts of the per-text side shares."""
    verdict: str
    """``holds`` (the interval lies on the claimed side and, where a range was published, meets it),
    ``other magnitude`` (the claimed side, but the interval misses the published range), ``opposite``
    (the interval lies on the other side) or ``unresolved`` (the interval contains no change)."""


def _verdict(claim: PublishedClaim, low: float, high: float) -> str:
    if np.isnan(low) or np.isnan(high) or low <= 0 <= high:
        return "unresolved"
    if (low > 0) != (claim.direction > 0):
        return "opposite"
    if claim.low is not None and claim.high is not None and (high < claim.low or low > claim.high):
        return "other magnitude"
    return "holds"


def check_claims(
    runs: Sequence[AttributionRun],
    claims: Iterable[PublishedClaim] = PUBLISHED_CLAIMS,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[ClaimCheck]:
    """A row per claim, pair of runs (the claim's model and base model on the same data set, split, text
    side and pooling, both with per-text counts and the study's target, ``norm``) and threshold both runs
    recorded; none where a run is missing."""
    rows = []
    same = ("dataset", "split", "text_side", "pooling", "target")
    for claim in claims:
        for run in (r for r in runs if r.model == claim.model and r.has_per_text and r.target == "norm"):
            for base in runs:
                if not (
                    base.model == claim.base_model
                    and base.has_per_text
                    and all(getattr(run, key) == getattr(base, key) for key in same)
                ):
                    continue
                keys = common_texts(run, base)
                for threshold in (t for t in run.thresholds if t in base.thresholds):
                    values = side_share(run, claim.side, threshold, keys)
                    base_values = side_share(base, claim.side, threshold, keys)
                    means, base_means = paired_bootstrap_means(
                        values, base_values, resamples, np.random.default_rng(seed)
                    )
                    low, high = _nan_interval(_relative(means, base_means)[:, None], confidence)
                    rows.append(
                        ClaimCheck(
                            claim,
                            run.dataset,
                            run.split,
                            run.text_side,
                            run.pooling,
                            threshold,
                            len(keys),
                            float(values.mean()),
                            float(base_values.mean()),
                            float(_relative(values.mean(), base_values.mean())),
                            float(low[0]),
                            float(high[0]),
                            paired_test(values, base_values),
                            _verdict(claim, float(low[0]), float(high[0])),
                        )
                    )
    return rows


# --------------------------------------------------------------------------- tables for report.md


def _interval(value: float, low: float, high: float, signed: bool = False, digits: int = 2) -> str:
    if np.isnan(value):
        return MISSING
    form = f"{{:{'+' if signed else ''}.{digits}f}}"
    bounds = MISSING if np.isnan(low) else f"[{form.format(low)}, {form.format(high)}]"
    return f"{form.format(value)} {bounds}"


def _published(claim: PublishedClaim) -> str:
    if claim.low is not None and claim.high is not None:
        return f"{claim.low:+.0f} to {claim.high:+.0f}"
    return "higher" if claim.direction > 0 else "lower"


def _layer(layer: int | None) -> str:
    return "all" if layer is None else str(layer + 1)


def module_share_table(
    runs: Sequence[AttributionRun], confidence: float = DEFAULT_CONFIDENCE, **kwargs
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of every run's active shares per kind and layer (layers numbered from 1), each
    with its bootstrap interval; runs without per-text counts give no rows."""
    header = ["model", "dataset", "text side", "threshold", "kind", "layer", "texts", f"active % [{confidence:.0%} CI]"]
    rows = [
        [
            row.model,
            row.dataset,
            row.text_side,
            f"{row.threshold:g}",
            row.kind,
            _layer(row.layer),
            str(row.num_texts),
            _interval(row.share, row.low, row.high),
        ]
        for run in runs
        for row in module_shares(run, confidence=confidence, **kwargs)
    ]
    return header, rows


def share_change_table(
    runs: Sequence[AttributionRun], confidence: float = DEFAULT_CONFIDENCE, **kwargs
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of every comparable pair (:func:`comparable_pairs`) with per-text counts: per kind and layer, both
    shares, the change in points and relative, with paired bootstrap intervals, and the signed-rank
    p-value (``*``: significant after Bonferroni over the kind's layers)."""
    header = [
        "model",
        "base",
        "comparison",
        "dataset",
        "text side",
        "threshold",
        "kind",
        "layer",
        "texts",
        "active %",
        "base active %",
        f"change, points [{confidence:.0%} CI]",
        "relative change %",
        "p (Wilcoxon)",
    ]
    rows = []
    labels = {run.model for run in runs}
    for i, j in comparable_pairs(runs):
        if not (runs[i].has_per_text and runs[j].has_per_text):
            continue
        for row in compare_runs(runs[i], runs[j], confidence=confidence, **kwargs):
            rows.append(
                [
                    row.model,
                    row.base_model,
                    comparison(row.model, row.base_model, labels),
                    row.dataset,
                    row.text_side,
                    f"{row.threshold:g}",
                    row.kind,
                    _layer(row.layer),
                    str(row.num_texts),
                    f"{row.share:.2f}",
                    f"{row.base_share:.2f}",
                    _interval(row.change, row.change_low, row.change_high, signed=True),
                    _interval(row.relative_change, row.relative_low, row.relative_high, signed=True, digits=1),
                    f"{row.p_value:.2g}{'*' if row.significant else ''}",
                ]
            )
    return header, rows


def claim_table(
    runs: Sequence[AttributionRun], confidence: float = DEFAULT_CONFIDENCE, **kwargs
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of :func:`check_claims`: each published claim measured where both runs exist."""
    header = [
        "published claim",
        "dataset",
        "text side",
        "threshold",
        "texts",
        "active %",
        "base active %",
        f"relative change % [{confidence:.0%} CI]",
        "published",
        "p (Wilcoxon)",
        "verdict",
    ]
    rows = [
        [
            row.claim.text,
            row.dataset,
            row.text_side,
            f"{row.threshold:g}",
            str(row.num_texts),
            f"{row.share:.2f}",
            f"{row.base_share:.2f}",
            _interval(row.relative_change, row.relative_low, row.relative_high, signed=True, digits=1),
            _published(row.claim),
            f"{row.p_value:.2g}",
            row.verdict,
        ]
        for row in check_claims(runs, confidence=confidence, **kwargs)
    ]
    return header, rows
