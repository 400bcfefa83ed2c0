"""From neuron scores to how often each neuron is active.

Per text, every score (all modules, all layers) is divided by the text's largest score; a neuron is
active in a text when its normalised score exceeds a threshold. Over a set of texts, the study
reports per neuron the percentage of texts in which it is active (``count / num_texts * 100``), shown
as one heatmap per side (layers x neuron bins). The counts are stored as :mod:`dkacq.formats.counts`
lays them out.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

from dkacq.attribution.targets import Target
from dkacq.formats.counts import counts_tensors, split_counts_tensors


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
    """

    full_state_update = False

    def __init__(self, targets: Sequence[Target], thresholds: Sequence[float] = (0.1, 0.2), **kwargs):
        super().__init__(**kwargs)
        if not targets:
            raise ValueError("give at least one target to count")
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
        self.add_state("num_texts", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    @staticmethod
    def _state_name(kind: str, threshold_index: int) -> str:
        return f"active_{kind}_{threshold_index}"

    def update(self, scores: Mapping[str, Tensor]) -> None:
        if set(scores) != set(self.slots):
            missing, unknown = set(self.slots) - set(scores), set(scores) - set(self.slots)
            raise ValueError(
                f"scores must cover exactly the metric's targets; missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        masks = active_masks(normalize_per_text(scores), self.thresholds)
        for index, threshold in enumerate(self.thresholds):
            for name, active in masks[threshold].items():
                kind, layer = self.slots[name]
                getattr(self, self._state_name(kind, index))[layer] += active.sum(dim=0)
        self.num_texts += next(iter(scores.values())).shape[0]

    def local(self) -> ActiveCounts:
        """This process's counts so far, not summed across processes (what a progress segment saves)."""
        return self._counts()

    def compute(self) -> ActiveCounts:
        return self._counts()

    def _counts(self) -> ActiveCounts:
        counts = {
            (kind, threshold): getattr(self, self._state_name(kind, index)).clone()
            for kind in self.kinds
            for index, threshold in enumerate(self.thresholds)
        }
        return ActiveCounts(counts, int(self.num_texts))
