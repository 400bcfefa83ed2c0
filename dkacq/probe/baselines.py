"""Untrained baselines, recorded beside the probes so that a reader can tell what training added.

- ``similarity_cosine`` and ``similarity_dot``: at every probed layer, pick the passage whose vector has
  the largest cosine (or dot product) with the query's vector, as a retriever would rank them with
  that layer as its embedding. No training, so no option of the probe's fit is in their identity. They
  read the layer's vectors as cached (``data.standardize`` is not applied: it rescales each dimension
  with training statistics and would change the geometry that a similarity measures), on exactly the
  test draws of the probes (``ProbeDataModule.datasets["test"]``: fixed columns and labels), so their
  per-example outcomes pair with the probes' for McNemar's test.
- ``shortcut_least_negative``: no vectors and no query at all. Count how often each passage text is a
  negative among the training split's examples (every negative of each; the validation share is left
  out, as the probes never train on it); on each test item pick the shown passage with the lowest
  count, ties going to the first such position. A passage that the training data never shows as a
  negative is more likely to be the positive wherever negatives recur across examples, so a
  query-blind probe (``concat``, ``passage_only``) can beat chance by learning passage identity alone;
  this baseline says how far that goes. It is stored as a row with ``layer`` = :data:`SHORTCUT_LAYER`
  (-1: it is not at a layer; an integer keeps every reader of the table's ``layer`` column working)
  and the setting's model and pooling (a setting may probe its own subset of the data, ``max_examples``),
  with an outcome file like every other row, so it gets an interval and pairs with the probes.

Passage texts are identified by their rows in the embedding cache, which holds each distinct text once
(``encoders/extraction.py``), so counting rows counts texts.

:func:`record_layer_baselines` computes the baselines of a set-up layer (what a fit loop calls once per
layer, with the data module its probes used) and :func:`record_baselines` those of every probed layer of
a prepared setting; both write rows and outcome files through :mod:`dkacq.formats.results`.
:func:`baseline_cells` are the cells they write, for checking against the table before any work.
"""

from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor
from torch.nn import functional

from dkacq.formats.results import (
    ProbeCell,
    accuracy_values,
    check_cells,
    finished_ids,
    upsert_result,
    write_predictions,
)
from dkacq.probe.heads import HEADS
from dkacq.probe.results import setting_values

Baseline = Literal["similarity_cosine", "similarity_dot"]
BASELINES: tuple[Baseline, ...] = get_args(Baseline)
"""The untrained per-layer baselines, in the order reports show them (after the heads)."""
METHODS: tuple[str, ...] = (*HEADS, *BASELINES)
"""Every per-layer method a report draws as a curve: the trained heads, then the untrained baselines."""
SHORTCUT = "shortcut_least_negative"
"""The query-blind, vector-free shortcut baseline (one row per setting and N, not per layer)."""
SHORTCUT_LAYER = -1
"""The ``layer`` of a shortcut row: not a hidden state."""
MEASURES: dict[str, str] = {"similarity_cosine": "cosine", "similarity_dot": "dot"}
CHUNK = 4096
"""Test examples scored at once (bounds the memory of the gathered passage vectors)."""


def similarity_scores(query: Tensor, passages: Tensor, measure: Literal["cosine", "dot"]) -> Tensor:
    """Score of each passage ``[B, N, d]`` against its query ``[B, d]``: ``[B, N]``."""
    if measure == "cosine":
        query, passages = functional.normalize(query, dim=-1), functional.normalize(passages, dim=-1)
    elif measure != "dot":
        raise ValueError(f"unknown similarity '{measure}'; choose cosine or dot")
    return torch.einsum("bd,bnd->bn", query, passages)


def _vectors(data) -> tuple[Tensor, Tensor]:
    """The probed layer's query and passage vectors as cached (before any standardisation)."""
    test = data.datasets["test"]
    if data.hparams.standardize:
        return data.cached_vectors()
    return test.queries, test.passages


def similarity_outcomes(data, method: Baseline) -> dict[str, Tensor]:
    """Per test example of a set-up ``ProbeDataModule`` (its current layer): ``index``, ``label``,
    ``prediction`` (the position of the most similar passage; the first on ties) and ``correct``."""
    if method not in MEASURES:
        raise ValueError(f"unknown similarity baseline '{method}'; choose one of {', '.join(BASELINES)}")
    test = data.datasets["test"]
    queries, passages = _vectors(data)
    predictions = []
    for start in range(0, len(test), CHUNK):
        index = torch.arange(start, min(start + CHUNK, len(test)))
        rows = test.passage_rows[index].gather(1, test.columns[index])
        scores = similarity_scores(queries[test.query_rows[index]].float(), passages[rows].float(), MEASURES[method])
        predictions.append(scores.argmax(dim=1))
    prediction = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    return _outcomes(prediction, test.labels)


def similarity_accuracy(data, method: Baseline) -> tuple[float, Tensor]:
    """Test accuracy of a similarity baseline and its per-example correctness (bool ``[num_test]``)."""
    outcomes = similarity_outcomes(data, method)
    correct = outcomes["correct"].bool()
    return correct.float().mean().item(), correct


def least_negative_choice(train_negatives: Tensor, shown: Tensor) -> Tensor:
    """For each row of ``shown`` (text ids ``[E, N]``), the position of the text that occurs least
    often in ``train_negatives`` (text ids, any shape); the first such position on ties."""
    if not shown.numel():
        return torch.zeros(len(shown), dtype=torch.long)
    negatives = train_negatives.reshape(-1).long()
    negatives = negatives[negatives >= 0]  # absent negatives of a mined collection's examples
    counts = torch.bincount(negatives, minlength=int(shown.max()) + 1)
    return counts[shown.long()].argmin(dim=1)


def shortcut_outcomes(data) -> dict[str, Tensor]:
    """The shortcut's per-example outcomes on the test draws of a set-up ``ProbeDataModule``."""
    train, test = data.datasets["train"], data.datasets["test"]
    shown = test.passage_rows.gather(1, test.columns)
    return _outcomes(least_negative_choice(train.passage_rows[:, 1:], shown), test.labels)


def _outcomes(prediction: Tensor, labels: Tensor) -> dict[str, Tensor]:
    prediction, labels = prediction.long(), labels.long()
    return {
        "index": torch.arange(len(labels)),
        "label": labels,
        "prediction": prediction,
        "correct": (prediction == labels).to(torch.uint8),
    }


def baseline_identity(data, method: str, layer: int) -> dict:
    """Everything that decides a baseline's numbers: the method, the layer, N, the data options of the
    test draws (and, for the shortcut, of the train/validation split), and the embedding cache's request
    (weights, data content, pooling, ...). No option of a probe's fit."""
    hparams = data.hparams
    options = {"dataset": hparams.dataset, "seed": hparams.seed, "max_examples": hparams.max_examples}
    if method == SHORTCUT:
        options["val_fraction"] = hparams.val_fraction
    return {
        "baseline": method,
        "layer": layer,
        "num_passages": hparams.num_passages,
        "data": options,
        "embeddings": data.cache_request(),
    }


def baseline_cells(data, layers: list[int] | None = None) -> list[ProbeCell]:
    """The cells :func:`record_baselines` writes for a ``ProbeDataModule`` (set up or not): each
    similarity baseline at each layer (default: the probed layers), then the shortcut."""
    layers = data.probed_layers() if layers is None else layers
    hparams, preset = data.hparams, data.preset
    keys = [(method, layer) for layer in layers for method in BASELINES] + [(SHORTCUT, SHORTCUT_LAYER)]
    return [
        ProbeCell(
            hparams.dataset,
            preset.label,
            preset.pooling,
            hparams.num_passages,
            layer,
            method,
            baseline_identity(data, method, layer),
        )
        for method, layer in keys
    ]


def record_layer_baselines(
    data, run_dir: str | Path, done: set[str] | None = None, config_file: str | Path | None = None
) -> list[ProbeCell]:
    """Compute and record the baselines of a set-up ``ProbeDataModule`` at its current layer (each
    similarity baseline), and the shortcut, which reads no layer, into ``run_dir/results.csv``.

    Cells whose ids are in ``done`` are left out, and the ids of those written are added to it: give the
    same set to every call of one setting (starting from ``finished_ids`` of the table to resume) and
    each baseline is computed once however many probes share its layer. ``config_file`` (the run's
    saved config, under ``run_dir``) is named in the rows. Returns the cells written.
    """
    run_dir, done = Path(run_dir), set() if done is None else done
    cells = [
        cell
        for cell in baseline_cells(data, [data.layer])
        if cell.id not in done and (cell.layer == data.layer or cell.probe == SHORTCUT)
    ]
    if not cells:
        return []
    check_cells(run_dir / "results.csv", cells)
    config = Path(config_file).relative_to(run_dir).as_posix() if config_file else ""
    for cell in cells:
        outcomes = shortcut_outcomes(data) if cell.probe == SHORTCUT else similarity_outcomes(data, cell.probe)
        _record(data, run_dir, cell, outcomes, config)
        done.add(cell.id)
    return cells


def record_baselines(
    data, run_dir: str | Path, skip_finished: bool = False, config_file: str | Path | None = None
) -> list[ProbeCell]:
    """Compute and record every baseline of a prepared ``ProbeDataModule`` at every probed layer.

    Sets up one layer at a time (``data.layer`` and ``data.datasets`` are restored afterwards) and calls
    :func:`record_layer_baselines`. Cells the table holds from other settings are refused first; with
    ``skip_finished`` those it holds from these settings are left out. Returns the cells written.
    """
    run_dir = Path(run_dir)
    path = run_dir / "results.csv"
    cells = baseline_cells(data)
    check_cells(path, cells)
    done = finished_ids(path) if skip_finished else set()
    todo = [cell for cell in cells if cell.id not in done]
    if not todo:
        return []
    layers = sorted({cell.layer for cell in todo if cell.layer != SHORTCUT_LAYER}) or data.probed_layers()[:1]
    kept_layer, kept_datasets = data.layer, getattr(data, "datasets", None)
    written: list[ProbeCell] = []
    try:
        for layer in layers:
            data.layer = layer
            data.setup("test")
            written += record_layer_baselines(data, run_dir, done, config_file)
    finally:
        data.layer = kept_layer
        if kept_datasets is None:
            vars(data).pop("datasets", None)
        else:
            data.datasets = kept_datasets
    return written


def _record(data, run_dir: Path, cell: ProbeCell, outcomes: dict[str, Tensor], config: str) -> None:
    predictions = Path("predictions") / f"{cell.name}.safetensors"
    write_predictions(run_dir / predictions, outcomes, cell.identity)
    upsert_result(
        run_dir / "results.csv",
        cell,
        dict(
            **accuracy_values(outcomes["correct"]),
            **setting_values(data),
            config=config,
            predictions=predictions.as_posix(),
        ),
    )
