"""Probe results as rows, and the paired significance test the study should have used.

The published code compares a model's per-example 0/1 correctness with the base model's by an
independent-samples t-test. Both models answer the same test examples (same passage draws), so the
outcomes are paired and McNemar's exact test is the right one: under the null hypothesis the
discordant pairs split 50/50 between the two models.

Every accuracy carries its Wilson 95% interval (:func:`wilson_interval`), read from the table or, for
tables written before it had the columns, computed from ``test_acc`` and ``num_test``.
"""

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from scipy.stats import binom

from dkacq.formats.results import read_correct, read_rows, wilson_interval
from dkacq.probe.baselines import METHODS, SHORTCUT
from dkacq.probe.heads import HEADS

__all__ = ["wilson_interval"]  # re-exported: the report's interval is the table's
log = logging.getLogger("dkacq")


@dataclass(frozen=True)
class ProbeResult:
    """One row of a ``results.csv``: one fitted probe."""

    dataset: str
    model: str
    pooling: str
    num_passages: int
    layer: int
    probe: str
    best_epoch: int | None
    """The tested checkpoint's epoch (0 first); None for an untrained baseline."""
    val_acc: float | None
    test_acc: float
    predictions: Path | None
    """Absolute path of the safetensors file with the per-example outcomes, if the row has one."""
    num_train: int = 0
    num_test: int = 0
    test_acc_low: float | None = None
    test_acc_high: float | None = None
    """The Wilson 95% interval of ``test_acc``; None when the row states neither it nor ``num_test``."""
    max_epochs: int | None = None
    epochs_run: int | None = None
    optimizer_steps: int | None = None
    best_is_last: bool | None = None
    """Whether the tested checkpoint was the last epoch validated; None where the row does not say."""
    fit_seconds: float | None = None
    early_stopping: str = ""
    cell_id: str = ""
    data_fingerprint: str = ""
    """The probe set's content hash: rows of two fingerprints were tested on different items."""

    @property
    def trained(self) -> bool:
        """A fitted probe head (not an untrained baseline)."""
        return self.probe in HEADS

    @property
    def fitting(self) -> str:
        """How a trained probe was fitted, in words ("30 epochs", "early stopping on val/loss min, patience
        10, at most 300 epochs"); "" for a baseline or a table that does not say. Rows of one fitting
        are one *mode* of the report; the baselines belong to every mode."""
        if not self.trained or self.max_epochs is None:
            return ""
        if self.early_stopping:
            return f"early stopping on {self.early_stopping}, at most {self.max_epochs} epochs"
        return f"{self.max_epochs} epochs"

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
    curve and layer), because the report could not tell which one to show, and for a table without
    rows; a table that is cut short or not dkacq's is refused by :func:`~dkacq.formats.results.read_table`.
    Rows naming outcome files that are missing are reported without their paired tests, said in one
    warning per table.
    """
    rows: list[ProbeResult] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such results table")
        records = read_rows(path)
        if not records:
            raise ValueError(f"{path}: no rows, only a header; nothing to report from it")
        missing = [
            r["predictions"] for r in records if r.get("predictions") and not (path.parent / r["predictions"]).is_file()
        ]
        if missing:
            log.warning(
                "%s: %d of %d rows name outcome files that are missing (%s%s); their McNemar tests are left out",
                path,
                len(missing),
                len(records),
                missing[0],
                ", ..." if len(missing) > 1 else "",
            )
        for record in records:
            predictions = record["predictions"].strip()
            test_acc, num_test = float(record["test_acc"]), int(record.get("num_test") or 0)
            low, high = _optional(record, "test_acc_low", float), _optional(record, "test_acc_high", float)
            if (low is None or high is None) and num_test:
                low, high = wilson_interval(round(test_acc * num_test), num_test)
            last = _optional(record, "best_is_last", int)
            rows.append(
                ProbeResult(
                    dataset=record["dataset"],
                    model=record["model"],
                    pooling=record["pooling"],
                    num_passages=int(record["num_passages"]),
                    layer=int(record["layer"]),
                    probe=record["probe"],
                    best_epoch=_optional(record, "best_epoch", int),
                    val_acc=_optional(record, "val_acc", float),
                    test_acc=test_acc,
                    num_train=int(record.get("num_train") or 0),
                    num_test=num_test,
                    predictions=(path.parent / predictions).resolve() if predictions else None,
                    test_acc_low=low,
                    test_acc_high=high,
                    max_epochs=_optional(record, "max_epochs", int),
                    epochs_run=_optional(record, "epochs_run", int),
                    optimizer_steps=_optional(record, "optimizer_steps", int),
                    best_is_last=None if last is None else bool(last),
                    fit_seconds=_optional(record, "fit_seconds", float),
                    early_stopping=(record.get("early_stopping") or "").strip(),
                    cell_id=(record.get("cell_id") or "").strip(),
                    data_fingerprint=(record.get("data_fingerprint") or "").strip(),
                )
            )
    known = (*METHODS, SHORTCUT)
    seen: set[tuple] = set()
    ids: set[str] = set()
    kept: list[ProbeResult] = []
    for row in rows:
        if row.probe not in known:
            raise ValueError(f"unknown probe head '{row.probe}'; expected one of {', '.join(known)}")
        if row.cell_id and row.cell_id in ids:
            continue  # the same cell from the same settings in two tables (e.g. a baseline of two runs)
        key = (*row.curve_key, row.layer, row.fitting)
        if key in seen:
            raise ValueError(f"more than one results row for {key[:-1]}" + (f" ({key[-1]})" if key[-1] else ""))
        seen.add(key)
        ids.add(row.cell_id)
        kept.append(row)
    return kept


def _optional(record: dict[str, str], column: str, kind):
    """A column's value as ``kind``, or None when the table lacks the column or leaves it blank."""
    text = (record.get(column) or "").strip()
    return kind(text) if text else None


def per_layer(rows: Iterable[ProbeResult]) -> list[ProbeResult]:
    """The rows that are points of per-layer curves: every method but the shortcut (which is not at a layer)."""
    return [row for row in rows if row.probe != SHORTCUT]


def shortcut_rows(rows: Iterable[ProbeResult]) -> list[ProbeResult]:
    """The query-blind shortcut's rows (one per setting and N)."""
    return [row for row in rows if row.probe == SHORTCUT]


def interval(row: ProbeResult) -> tuple[float, float] | None:
    """The row's Wilson 95% interval, if known."""
    if row.test_acc_low is None or row.test_acc_high is None:
        return None
    return row.test_acc_low, row.test_acc_high


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
    results = per_layer(results)
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
    probe_sets = {(*row.curve_key[:4], row.layer): row.data_fingerprint for row in base if has_outcomes(row)}
    if all(
        not same_items(probe_sets.get((*row.curve_key[:4], row.layer), ""), row) for row in others if has_outcomes(row)
    ):
        return f"base model {base_model} was tested on other items than the others (another probe set)"
    return None


def same_items(fingerprint: str, row: ProbeResult) -> bool:
    """Whether ``row`` was tested on the items of the probe set ``fingerprint`` (true where either is
    unknown, as in tables written before the column): only such outcomes can be paired."""
    return not fingerprint or not row.data_fingerprint or fingerprint == row.data_fingerprint


@cache
def _warn_unpaired(model: str, base_model: str, dataset: str) -> None:
    log.warning(
        "%s: %s and %s were tested on different probe sets (e.g. negatives mined with each model: name one "
        "data.collection.dense_model); their McNemar tests are left out",
        dataset,
        model,
        base_model,
    )


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
    model and the base have outcome files (:func:`has_outcomes`) of one probe set (:func:`same_items`;
    else it is left out, with one warning); :func:`missing_comparison` says why there is none. The Bonferroni family of a curve is its compared layers.
    Groups without the base model give nothing. The shortcut (not at a layer) is never compared. Rows
    of one fitting mode are expected (:attr:`ProbeResult.fitting`): give each mode's rows separately.
    """
    curves: dict[tuple, dict[int, ProbeResult]] = defaultdict(dict)
    for row in per_layer(results):
        if has_outcomes(row):
            curves[row.curve_key][row.layer] = row
    significance: list[Significance] = []
    for (dataset, pooling, num_passages, probe, model), by_layer in sorted(curves.items()):
        base = curves.get((dataset, pooling, num_passages, probe, base_model))
        if model == base_model or base is None:
            continue
        layers = sorted(set(by_layer) & set(base))
        paired = [layer for layer in layers if same_items(base[layer].data_fingerprint, by_layer[layer])]
        if len(paired) < len(layers):
            _warn_unpaired(model, base_model, dataset)
        layers = paired
        p_values = [
            mcnemar_exact(load_correct(by_layer[layer].predictions), load_correct(base[layer].predictions))
            for layer in layers
        ]
        for layer, p_value, flag in zip(layers, p_values, bonferroni(p_values, alpha)):
            significance.append(
                Significance(dataset, pooling, num_passages, probe, model, base_model, layer, p_value, flag)
            )
    return significance
