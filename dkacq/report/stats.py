"""Probe results as rows, and the paired significance test the study should have used.

The published code compares a model's per-example 0/1 correctness with the base model's by an
independent-samples t-test. Both models answer the same test examples (same passage draws), so the
outcomes are paired and McNemar's exact test is the right one: under the null hypothesis the
discordant pairs split 50/50 between the two models.
"""

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.stats import binom

from dkacq.formats.results import read_correct, read_rows
from dkacq.probe.heads import HEADS


@dataclass(frozen=True)
class ProbeResult:
    """One row of a ``results.csv``: one fitted probe."""

    dataset: str
    model: str
    pooling: str
    num_passages: int
    layer: int
    probe: str
    best_epoch: int
    val_acc: float
    test_acc: float
    predictions: Path | None
    """Absolute path of the safetensors file with the per-example outcomes, if the row has one."""
    num_train: int = 0
    num_test: int = 0

    @property
    def curve_key(self) -> tuple[str, str, int, str, str]:
        """The row's curve: every layer of one (dataset, pooling, N, probe, model)."""
        return self.dataset, self.pooling, self.num_passages, self.probe, self.model


@dataclass(frozen=True)
class Significance:
    """A model against the base model at one layer: same dataset, pooling, N and probe head."""

    dataset: str
    pooling: str
    num_passages: int
    probe: str
    model: str
    base_model: str
    layer: int
    p_value: float
    significant: bool
    """Bonferroni-corrected over the layers at which the model was compared."""

    @property
    def curve_key(self) -> tuple[str, str, int, str, str]:
        """The compared model's curve, as :attr:`ProbeResult.curve_key`."""
        return self.dataset, self.pooling, self.num_passages, self.probe, self.model


def read_results(paths: Iterable[Path]) -> list[ProbeResult]:
    """All rows of the given ``results.csv`` files, prediction paths made absolute.

    Raises ``ValueError`` for an unknown probe head and when two rows describe the same probe (same
    curve and layer), because the report could not tell which one to show.
    """
    rows: list[ProbeResult] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such results table")
        for record in read_rows(path):
            predictions = record["predictions"].strip()
            rows.append(
                ProbeResult(
                    dataset=record["dataset"],
                    model=record["model"],
                    pooling=record["pooling"],
                    num_passages=int(record["num_passages"]),
                    layer=int(record["layer"]),
                    probe=record["probe"],
                    best_epoch=int(record["best_epoch"]),
                    val_acc=float(record["val_acc"]),
                    test_acc=float(record["test_acc"]),
                    num_train=int(record.get("num_train") or 0),
                    num_test=int(record.get("num_test") or 0),
                    predictions=(path.parent / predictions).resolve() if predictions else None,
                )
            )
    seen: set[tuple] = set()
    for row in rows:
        if row.probe not in HEADS:
            raise ValueError(f"unknown probe head '{row.probe}'; expected one of {', '.join(HEADS)}")
        key = (*row.curve_key, row.layer)
        if key in seen:
            raise ValueError(f"more than one results row for {key}")
        seen.add(key)
    return rows


def has_outcomes(row: ProbeResult) -> bool:
    """Whether the row's per-example outcome file is named and exists."""
    return row.predictions is not None and row.predictions.is_file()


def missing_comparison(results: Sequence[ProbeResult], base_model: str | None) -> str | None:
    """Why :func:`significance_vs_base` finds nothing to compare in ``results`` (one line), or None
    when it compares at least one layer.

    The reasons, in the order they are checked: no base model, the base model not among the rows, no
    other model, no probe head or no layer that the base and another model share (same dataset,
    pooling, N and head), no outcome files for the base model or for the others at the shared layers.
    """
    if not base_model:
        return "no base model to compare with"
    base = [row for row in results if row.model == base_model]
    others = [row for row in results if row.model != base_model]
    if not base:
        return f"no base model {base_model} in the inputs"
    if not others:
        return f"no model but the base model {base_model} to compare"

    def cells(rows: Iterable[ProbeResult], outcomes_only: bool = False) -> set[tuple]:
        return {(*row.curve_key[:4], row.layer) for row in rows if has_outcomes(row) or not outcomes_only}

    if not {cell[:4] for cell in cells(base)} & {cell[:4] for cell in cells(others)}:
        return f"base model {base_model} has no probe head in common with the others"
    shared = cells(base) & cells(others)
    if not shared:
        return f"base model {base_model} has no layers in common with the others"
    if not shared & cells(base, outcomes_only=True):
        return f"no outcome files for base model {base_model}"
    if not shared & cells(base, outcomes_only=True) & cells(others, outcomes_only=True):
        return f"no outcome files for the models besides base model {base_model} at the layers they share"
    return None


@lru_cache(maxsize=256)
def load_correct(path: Path) -> np.ndarray:
    """The per-example outcomes (bool [num_test], True where the probe picked the positive), read once."""
    return read_correct(path)


def mcnemar_exact(correct_a: Sequence[int] | np.ndarray, correct_b: Sequence[int] | np.ndarray) -> float:
    """Two-sided exact McNemar p-value of two classifiers' paired 0/1 outcomes.

    With b examples that only A gets right and c that only B gets right, the p-value is
    ``min(1, 2 * P[X <= min(b, c)])`` for ``X ~ Binomial(b + c, 1/2)``; 1 when there is no discordant pair.
    """
    a = np.asarray(correct_a)
    b_ = np.asarray(correct_b)
    if a.shape != b_.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be two vectors of one length, got {a.shape} and {b_.shape}")
    for outcomes in (a, b_):
        if not np.isin(outcomes, (0, 1)).all():
            raise ValueError("outcomes must be 0/1")
    a, b_ = a.astype(bool), b_.astype(bool)
    only_a = int(np.count_nonzero(a & ~b_))
    only_b = int(np.count_nonzero(~a & b_))
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(only_a, only_b), discordant, 0.5)))


def bonferroni(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Significance flags at family-wise level ``alpha``, the family being the given p-values.

    A test is significant when ``p * m < alpha`` with m = ``len(p_values)`` (the published rule).
    """
    m = len(p_values)
    return [p * m < alpha for p in p_values]


def significance_vs_base(results: Sequence[ProbeResult], base_model: str, alpha: float = 0.05) -> list[Significance]:
    """Every model's McNemar p-value against ``base_model`` at each layer, with Bonferroni flags.

    Curves are compared within one (dataset, pooling, N, probe head); a layer counts where both the
    model and the base have outcome files (:func:`has_outcomes`); :func:`missing_comparison` says why
    there is none. The Bonferroni family of a curve is its compared layers.
    Groups without the base model give nothing.
    """
    curves: dict[tuple, dict[int, ProbeResult]] = defaultdict(dict)
    for row in results:
        if has_outcomes(row):
            curves[row.curve_key][row.layer] = row
    significance: list[Significance] = []
    for (dataset, pooling, num_passages, probe, model), by_layer in sorted(curves.items()):
        base = curves.get((dataset, pooling, num_passages, probe, base_model))
        if model == base_model or base is None:
            continue
        layers = sorted(set(by_layer) & set(base))
        p_values = [
            mcnemar_exact(load_correct(by_layer[layer].predictions), load_correct(base[layer].predictions))
            for layer in layers
        ]
        for layer, p_value, flag in zip(layers, p_values, bonferroni(p_values, alpha)):
            significance.append(
                Significance(dataset, pooling, num_passages, probe, model, base_model, layer, p_value, flag)
            )
    return significance
