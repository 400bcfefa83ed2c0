"""The study's published per-layer probe accuracies (its Figures 1-4), shipped as package data.

The values were read from the vector data of the authors' figure files; every published point is a
``concat`` probe. ``sig_vs_base`` marks the points that the figures flag as different from the base
model (t-test, Bonferroni over layers).
"""

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import numpy as np

from dkacq.report.stats import ProbeResult

PUBLISHED_CSV = "published_probe_accuracy.csv"

PUBLISHED_POOLING: dict[str, str] = {"eos_reference": "eos"}
"""Our pooling name -> the published one where they differ: the published EOS curves were computed
with the reference's EOS reading, which dkacq names ``eos_reference``."""


@dataclass(frozen=True)
class PublishedPoint:
    dataset: str
    pooling: str
    model: str
    num_passages: int
    layer: int
    acc: float
    significant: bool


@dataclass(frozen=True)
class PublishedDifference:
    """Our concat probe against the published one at one layer; ``difference = ours - published``."""

    dataset: str
    pooling: str
    model: str
    num_passages: int
    layer: int
    ours: float
    published: float
    difference: float


@cache
def published_points() -> tuple[PublishedPoint, ...]:
    """Every row of the shipped CSV, in file order."""
    text = files("dkacq.report").joinpath(PUBLISHED_CSV).read_text(encoding="utf-8")
    return tuple(
        PublishedPoint(
            dataset=record["dataset"],
            pooling=record["pooling"],
            model=record["model"],
            num_passages=int(record["num_passages"]),
            layer=int(record["layer"]),
            acc=float(record["acc"]),
            significant=record["sig_vs_base"] == "1",
        )
        for record in csv.DictReader(io.StringIO(text))
    )


@cache
def _published_index() -> dict[tuple[str, str, str, int], dict[int, PublishedPoint]]:
    index: dict[tuple[str, str, str, int], dict[int, PublishedPoint]] = {}
    for point in published_points():
        index.setdefault((point.dataset, point.pooling, point.model, point.num_passages), {})[point.layer] = point
    return index


def published_curve(
    dataset: str, pooling: str, model: str, num_passages: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(layers, acc, sig)`` of one published curve, sorted by layer; empty arrays if not published."""
    by_layer = _published_index().get((dataset, PUBLISHED_POOLING.get(pooling, pooling), model, num_passages), {})
    points = [by_layer[layer] for layer in sorted(by_layer)]
    return (
        np.array([p.layer for p in points], dtype=np.int64),
        np.array([p.acc for p in points], dtype=np.float64),
        np.array([p.significant for p in points], dtype=bool),
    )


def compare_with_published(results_rows: Iterable[ProbeResult]) -> list[PublishedDifference]:
    """Per-cell differences for every concat-probe row that has a published counterpart."""
    index = _published_index()
    differences = []
    for row in results_rows:
        if row.probe != "concat":
            continue
        key = (row.dataset, PUBLISHED_POOLING.get(row.pooling, row.pooling), row.model, row.num_passages)
        point = index.get(key, {}).get(row.layer)
        if point is not None:
            differences.append(
                PublishedDifference(
                    row.dataset,
                    row.pooling,
                    row.model,
                    row.num_passages,
                    row.layer,
                    row.test_acc,
                    point.acc,
                    row.test_acc - point.acc,
                )
            )
    return differences
