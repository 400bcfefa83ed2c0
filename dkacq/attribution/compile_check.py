"""The compiled path's self-check: a run's first batch scored eagerly too, and the two compared.

A wrong compiled graph (a hook traced away, a gradient that misses the probe) gives plausible, wrong
counts; the eager path is the one the oracles of ``tests/test_ig.py`` pin down. So a run with
``--model.compile true`` scores its first batch both ways and stops in one line unless

* the scores agree: per text, the largest difference over every neuron of every target, divided by the
  text's largest eager score (the normalisation the counts use), is at most :data:`TOLERANCE` of the
  model's dtype; and
* the activity agrees: at every threshold, every neuron is active in the compiled scores exactly where it
  is in the eager ones, except a neuron whose eager normalised score lies within the tolerance of the
  threshold (there rounding alone may decide, and either side is right).

The tolerances are the compiler's rounding with room: with inductor, Llama's fused RMSNorm was measured
at 2e-5 of a module's largest score in float32 and 1e-7 in float64 (``dkacq/attribution/ig.py``); bf16
keeps 8 bits of mantissa (a relative step of 2^-8 = 3.9e-3), summed over thousands of terms. A graph
that drops the scaling or the gradient is off by far more (tests/test_compile_check.py).
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from dkacq.attribution.counting import active_masks, normalize_per_text
from dkacq.formats.errors import DkacqError

TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
"""Largest allowed difference, relative to a text's largest eager score, by the model's dtype."""


class CompiledMismatchError(DkacqError):
    """The compiled scores of a run's first batch differ from the eager ones."""


def compare(
    eager: Mapping[str, Tensor], compiled: Mapping[str, Tensor], thresholds: Sequence[float], tolerance: float
) -> dict:
    """The comparison's figures; raises :class:`CompiledMismatchError` (one line) when they disagree."""
    eager_normalized = normalize_per_text(eager)
    maxima = torch.stack([value.amax(dim=1) for value in eager.values()]).amax(dim=0)
    scale = torch.where(maxima > 0, maxima, torch.ones_like(maxima)).unsqueeze(1)
    largest = max(float(((compiled[name] - value).abs() / scale).max()) for name, value in eager.items())
    differing = near = 0
    compiled_masks = active_masks(normalize_per_text(compiled), thresholds)
    for threshold, masks in active_masks(eager_normalized, thresholds).items():
        for name, mask in masks.items():
            changed = mask != compiled_masks[threshold][name]
            excused = (eager_normalized[name] - threshold).abs() <= tolerance
            differing += int((changed & ~excused).sum())
            near += int((changed & excused).sum())
    record = {
        "tolerance": tolerance,
        "largest_difference": largest,
        "activity_differences": differing,
        "activity_differences_within_tolerance_of_a_threshold": near,
    }
    if largest > tolerance or differing:
        raise CompiledMismatchError(
            f"the compiled attribution differs from the eager one on the first batch (largest difference "
            f"{largest:.2e} of a text's largest score, tolerance {tolerance:.0e}; {differing} neurons change "
            f"activity): run without --model.compile, or with another --model.compile_backend"
        )
    return record
