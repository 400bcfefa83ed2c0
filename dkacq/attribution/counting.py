"""From neuron scores to how often each neuron is active.

Per text, every score (all modules, all layers) is divided by the text's largest score; a neuron is
active in a text when its normalised score exceeds a threshold. Over a set of texts, the study
reports per neuron the percentage of texts in which it is active (``count / num_texts * 100``), shown
as one heatmap per side (layers x neuron bins). Beside these totals the metric keeps, per text and
module, how many of the module's neurons were active (a texts x layers table per kind and threshold),
and which (bit-packed): what intervals over texts, paired comparisons of two runs and neuron overlap need
(:mod:`dkacq.report.attribution_stats`). The counts are stored as :mod:`dkacq.formats.counts` lays
them out.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

from dkacq.attribution.targets import Target
from dkacq.formats.counts import active_kind, counts_tensors, pack_active, split_counts_tensors


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """The thresholds as a tuple; each must lie strictly between 0 and 1 (scores are normalised to 1)."""
    thresholds = tuple(float(threshold) for threshold in thresholds)
    if not thresholds:
        raise ValueError("give at least one activity threshold")
    for threshold in thresholds:
        if not 0 < threshold < 1:
            raise ValueError(f"activity thresholds must lie in (0, 1), got {threshold:g}")
    return thresholds


def normalize_per_text(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every score of a text divided by that text's largest score over all targets.

    ``scores`` maps target name -> ``[num_texts, num_neurons]``. A text whose scores are all 0 stays
    all 0 (no neuron of it is active).
    """
    maxima = torch.stack([value.amax(dim=1) for value in scores.values()]).amax(dim=0)
    divisors = torch.where(maxima > 0, maxima, torch.ones_like(maxima)).unsqueeze(1)
    return {name: value / divisors for name, value in scores.items()}


def active_masks(normalized: Mapping[str, Tensor], thresholds: Sequence[float]) -> dict[float, dict[str, Tensor]]:
    """threshold -> target name -> bool ``[num_texts, num_neurons]``: normalised score > threshold."""
    return {
        threshold: {name: value > threshold for name, value in normalized.items()}
        for threshold in check_thresholds(thresholds)
    }


@dataclass
class ActiveCounts:
    """How many texts each neuron was active in, per kind and threshold.

    Not frozen: torchmetrics rebuilds a metric's result field by field.
    """

    counts: dict[tuple[str, float], Tensor]
    """``(kind, threshold)`` -> int64 ``[num_layers, num_neurons]``."""
    num_texts: int
    per_text: dict[tuple[str, float], Tensor] | None = None
    """``(kind, threshold)`` -> int32 ``[text_capacity, num_layers]``: row ``i``, the text at position ``i``
    of the text set, holds how many neurons of each layer's module were active in it (zeros for a text
    not counted); and ``(active_kind(kind), threshold)`` -> uint8 ``[text_capacity, num_layers, bytes]``,
    which of them, bit-packed (:func:`dkacq.formats.counts.pack_active`). None when the metric keeps no
    per-text table."""
    counted: Tensor | None = None
    """int32 ``[text_capacity]``: how often the text at each position was counted (0 or 1)."""

    def percentages(self) -> dict[tuple[str, float], Tensor]:
        """``(kind, threshold)`` -> float64 percentage of texts in which each neuron was active."""
        return {key: count.double() / max(self.num_texts, 1) * 100 for key, count in self.counts.items()}


def counts_to_tensors(counts: ActiveCounts) -> dict[str, Tensor]:
    """The counts as the tensors of ``counts.safetensors`` (:func:`dkacq.formats.counts.counts_tensors`)."""
    return counts_tensors(counts.counts, counts.num_texts)


def counts_from_tensors(tensors: Mapping[str, Tensor]) -> ActiveCounts:
    """The inverse of :func:`counts_to_tensors`."""
    return ActiveCounts(*split_counts_tensors(tensors))


class ActiveNeuronCounts(Metric):
    """Counts, over the texts seen, how often each neuron is active; sums across processes.

    ``update`` takes the scores of one batch of texts for every target (target name ->
    ``[num_texts, num_neurons]``, as :func:`dkacq.attribution.ig.neuron_scores` returns them): the
    per-text normalisation needs all of a text's targets at once. States, all summed across
    processes: ``active_{kind}_{i}`` (int64 ``[num_layers, num_neurons]`` for the ``i``-th threshold)
    and ``num_texts``.

    With ``text_capacity`` (the size of the text set) it also keeps ``per_text_{kind}_{i}`` (int32
    ``[text_capacity, num_layers]``), whose row ``p`` the text at position ``p`` of the text set fills,
    ``per_text_active_{kind}_{i}`` (uint8 ``[text_capacity, num_layers, ceil(num_neurons / 8)]``: the
    active neurons bit-packed) and ``counted`` (int32 ``[text_capacity]``). Every process writes only its
    own texts' rows, so the sum across processes is the whole table in text order, whatever texts each
    process got (the packed bytes of a row come from one process, so their sum is that process's bytes).
    """

    full_state_update = False

    def __init__(
        self,
        targets: Sequence[Target],
        thresholds: Sequence[float] = (0.1, 0.2),
        text_capacity: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not targets:
            raise ValueError("give at least one target to count")
        if text_capacity is not None and text_capacity < 0:
            raise ValueError(f"text_capacity must not be negative, got {text_capacity}")
        self.text_capacity = text_capacity
        self.thresholds = check_thresholds(thresholds)
        self.slots = {target.name: (target.kind, target.layer) for target in targets}
        self.kinds = list(dict.fromkeys(target.kind for target in targets))
        for kind in self.kinds:
            of_kind = [target for target in targets if target.kind == kind]
            widths = {target.num_neurons for target in of_kind}
            if len(widths) != 1:
                raise ValueError(f"targets of kind '{kind}' differ in width: {sorted(widths)}")
            shape = (1 + max(target.layer for target in of_kind), widths.pop())
            for index in range(len(self.thresholds)):
                self.add_state(
                    self._state_name(kind, index), torch.zeros(shape, dtype=torch.int64), dist_reduce_fx="sum"
                )
                if text_capacity is not None:
                    self.add_state(
                        self._per_text_name(kind, index),
                        torch.zeros(text_capacity, shape[0], dtype=torch.int32),
                        dist_reduce_fx="sum",
                    )
                    self.add_state(
                        self._active_name(kind, index),
                        torch.zeros(text_capacity, shape[0], -(-shape[1] // 8), dtype=torch.uint8),
                        dist_reduce_fx="sum",
                    )
        self.add_state("num_texts", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        if text_capacity is not None:
            self.add_state("counted", torch.zeros(text_capacity, dtype=torch.int32), dist_reduce_fx="sum")

    @staticmethod
    def _state_name(kind: str, threshold_index: int) -> str:
        return f"active_{kind}_{threshold_index}"

    @staticmethod
    def _per_text_name(kind: str, threshold_index: int) -> str:
        return f"per_text_{kind}_{threshold_index}"

    @staticmethod
    def _active_name(kind: str, threshold_index: int) -> str:
        return f"per_text_active_{kind}_{threshold_index}"

    def update(self, scores: Mapping[str, Tensor], positions: Sequence[int] | Tensor | None = None) -> None:
        """Count one batch; ``positions`` (with ``text_capacity``) are the texts' positions in the text set,
        by default the next ones after the texts this process counted so far (one process only)."""
        if set(scores) != set(self.slots):
            missing, unknown = set(self.slots) - set(scores), set(scores) - set(self.slots)
            raise ValueError(
                f"scores must cover exactly the metric's targets; missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        batch = next(iter(scores.values())).shape[0]
        rows = None
        if self.text_capacity is not None:
            if positions is None:
                start = int(self.num_texts)
                positions = range(start, start + batch)
            rows = torch.as_tensor(list(positions) if not isinstance(positions, Tensor) else positions)
            rows = rows.to(device=self.counted.device, dtype=torch.int64)
            if rows.shape != (batch,) or (batch and (rows.min() < 0 or rows.max() >= self.text_capacity)):
                raise ValueError(f"give one position in [0, {self.text_capacity}) per text of the batch")
            self.counted.index_add_(0, rows, torch.ones(batch, dtype=torch.int32, device=rows.device))
        masks = active_masks(normalize_per_text(scores), self.thresholds)
        for index, threshold in enumerate(self.thresholds):
            for name, active in masks[threshold].items():
                kind, layer = self.slots[name]
                getattr(self, self._state_name(kind, index))[layer] += active.sum(dim=0)
                if rows is not None:
                    table = getattr(self, self._per_text_name(kind, index))
                    values = active.sum(dim=1).to(table.device, torch.int32)
                    table.index_put_((rows, torch.full_like(rows, layer)), values, accumulate=True)
                    bits = getattr(self, self._active_name(kind, index))
                    bits[rows, layer] = pack_active(active).to(bits.device)
        self.num_texts += batch

    def local(self) -> ActiveCounts:
        """This process's counts so far, not summed across processes (what a progress segment saves)."""
        return self._counts()

    def compute(self) -> ActiveCounts:
        return self._counts()

    def _counts(self) -> ActiveCounts:
        keys = [(kind, index, threshold) for kind in self.kinds for index, threshold in enumerate(self.thresholds)]
        counts = {
            (kind, threshold): getattr(self, self._state_name(kind, index)).clone() for kind, index, threshold in keys
        }
        if self.text_capacity is None:
            return ActiveCounts(counts, int(self.num_texts))
        per_text = {
            (kind, threshold): getattr(self, self._per_text_name(kind, index)).clone()
            for kind, index, threshold in keys
        } | {
            (active_kind(kind), threshold): getattr(self, self._active_name(kind, index)).to(torch.uint8, copy=True)
            for kind, index, threshold in keys
        }
        return ActiveCounts(counts, int(self.num_texts), per_text, self.counted.clone())
