"""Passes that fit the device: how many (text, alpha) replicas one attribution pass holds, chosen from a
memory model, and a batch retried with half as many when the device runs out of memory.

**The memory model** of one batch of ``n`` texts, padded to ``T`` tokens, attributed in passes of ``R``
replicas (:func:`dkacq.attribution.ig.neuron_scores`; see "Memory" in its module docstring):

    peak = weights + batch_bytes(n) + R x T x replica_token_bytes(T)

* ``batch_bytes(n) = 3 n h f a``: the target in progress's weight gradient, its attribution and their
  absolute values, ``[n, out, in]`` each in the accumulation dtype (``a`` bytes; the largest target, a
  feed-forward projection, has ``h x f`` weights);
* ``replica_token_bytes(T) = c L e (10 h + 3 f + heads T)``: the autograd activations of one replica row,
  per token, of every layer from the target's to the top (at most ``L``), in the model's dtype (``e``
  bytes); ``c``, the calibration, is 1 as stated, and on a GPU it is measured on the first batch:
  ``c = (peak - allocated before - batch_bytes(n)) / (R T replica_token_bytes_stated(T))``.

Checked against the H100 figures of docs/reproduce.md (Llama-2-7B shape, bf16, 4 texts of 133-153
tokens, m = 20): as stated, 4.81 MiB per replica and token at 153 tokens; measured, 40 replicas took
12 GiB more than 20, 4.0 MiB (``c`` = 0.84); ``batch_bytes(4)`` = 2.0 GiB, where the 26 GiB peak at
20 replicas, less 12.3 GiB of weights and 12.0 GiB of replicas, leaves 1.7 GiB.

**Choosing a pass** (``replicas_per_pass="auto"``): the largest ``R`` with
``batch_bytes(n) + R T replica_token_bytes(T)`` within the budget, the device's free memory when the
first batch starts (the model loaded) less :data:`~dkacq.encoders.memory.SAFETY_MARGIN`, or a limit the
user gives; at least 1, at most the batch's ``n x steps``, and a multiple of ``steps`` from ``steps`` up
(a pass then holds whole texts). Each batch is sized for its own longest text.

**Out of memory.** A pass that raises :class:`torch.OutOfMemoryError` ends the batch's attempt; nothing
of it has been counted (counts are updated only with a batch's finished scores), so the batch is run
again, from its first target, with half the replicas, down to 1. Any split gives the same scores (the
batching identity), hence the same counts. The failed size, halved, becomes a ceiling in replica-tokens
for every later batch. Each retry is recorded.
"""

import gc
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from dkacq.encoders.memory import SAFETY_MARGIN, budget_bytes, free_bytes, weight_bytes
from dkacq.formats.errors import DkacqError

GIB = 2**30
ReplicasSetting = int | Literal["auto"]


class AttributionMemoryError(DkacqError):
    """A batch does not fit the device even one replica at a time."""


@dataclass
class PassMemory:
    """The memory model of attribution passes (module docstring), from a transformer's config."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    element_bytes: int
    accumulate_bytes: int
    calibration: float = 1.0

    @classmethod
    def of(cls, config, dtype: torch.dtype) -> "PassMemory":
        accumulate = torch.promote_types(dtype, torch.float32)
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            element_bytes=dtype.itemsize,
            accumulate_bytes=accumulate.itemsize,
        )

    def stated_replica_token_bytes(self, tokens: int) -> int:
        """``L e (10 h + 3 f + heads T)``."""
        values = 10 * self.hidden + 3 * self.intermediate + self.heads * tokens
        return self.num_layers * self.element_bytes * values

    def replica_token_bytes(self, tokens: int) -> float:
        return self.calibration * self.stated_replica_token_bytes(tokens)

    def batch_bytes(self, texts: int) -> int:
        """``3 n h f a``."""
        return 3 * texts * self.hidden * self.intermediate * self.accumulate_bytes

    def pass_bytes(self, replicas: int, tokens: int) -> float:
        return replicas * tokens * self.replica_token_bytes(tokens)

    def calibrate(self, peak: int, replicas: int, texts: int, tokens: int) -> None:
        """``c`` from a batch's measured peak above what was allocated before it (module docstring),
        within 0.25..4; left as it is when the peak holds nothing beyond the batch's accumulators."""
        passes = peak - self.batch_bytes(texts)
        if passes > 0:
            stated = replicas * tokens * self.stated_replica_token_bytes(tokens)
            self.calibration = max(0.25, min(4.0, passes / stated))

    def replicas_that_fit(self, budget: float, texts: int, tokens: int) -> int:
        """The most replicas of ``tokens`` tokens whose pass fits ``budget`` bytes beside the batch (0: none)."""
        room = budget - self.batch_bytes(texts)
        return max(0, int(room // (tokens * self.replica_token_bytes(tokens))))


def check_fits(
    label: str, config, dtype: torch.dtype, texts: int, tokens: int, device: torch.device, free: int
) -> None:
    """Refuse, before the model is loaded, a run that cannot fit ``device`` even one replica per pass: a
    batch of ``texts`` texts and one replica of ``tokens`` tokens, by the stated model, against what the
    weights leave of ``free`` bytes less the safety margin (what ``auto`` will have to work with)."""
    memory = PassMemory.of(config, dtype)
    weights = weight_bytes(config, dtype)
    batch, one = memory.batch_bytes(texts), memory.pass_bytes(1, tokens)
    available = budget_bytes(max(0, free - weights), SAFETY_MARGIN)
    if batch + one > available:
        raise AttributionMemoryError(
            f"{label} in {str(dtype).removeprefix('torch.')} cannot be attributed on {device}: beside its weights "
            f"({weights / GIB:.1f} GiB) a batch of {texts} texts needs {batch / GIB:.1f} GiB and one replica of "
            f"{tokens} tokens {one / GIB:.2f} GiB, and {available / GIB:.1f} GiB are left of the "
            f"{free / GIB:.1f} GiB free, less the safety margin: lower data.batch_size or model.max_length "
            f"(docs/reproduce.md)"
        )


def pass_size(replicas: int, steps: int, texts: int) -> int:
    """What ``neuron_scores`` makes of ``replicas`` per pass for ``texts`` texts: at most every replica of
    the batch; from ``steps`` up, whole texts per pass (a multiple of ``steps``)."""
    replicas = max(1, min(replicas, texts * steps))
    return replicas if replicas < steps else replicas // steps * steps


class PassPlanner:
    """Sizes each batch's passes and retries a batch that runs out of memory with half as many replicas.

    ``setting``: a number of replicas per pass, or ``"auto"`` (the memory model). ``limit_bytes``: the
    memory passes may take beyond what is allocated when the first batch starts (default: the device's
    free memory then, less the safety margin). On a GPU the first batch's peak calibrates the model.
    """

    def __init__(
        self,
        setting: ReplicasSetting,
        steps: int,
        memory: PassMemory,
        device: torch.device,
        limit_bytes: int | None = None,
    ):
        if setting != "auto" and (not isinstance(setting, int) or setting < 1):
            raise ValueError(f"replicas_per_pass must be a positive number or auto, got {setting!r}")
        self.setting = setting
        self.steps = steps
        self.memory = memory
        self.device = device
        self.limit_bytes = limit_bytes
        self.budget: int | None = None
        self.ceiling: int | None = None
        """Replica-tokens per pass not to exceed: half of a pass that ran out of memory."""
        self.used: Counter[int] = Counter()
        self.retries: list[dict] = []
        self.batches = 0
        self.first_batch_seconds: float | None = None
        self.measured: dict | None = None

    def start(self) -> None:
        """Fix the budget: called before the first batch, with the model loaded."""
        if self.budget is None:
            available = self.limit_bytes if self.limit_bytes is not None else free_bytes(self.device)
            self.budget = available if self.limit_bytes is not None else budget_bytes(available, SAFETY_MARGIN)

    def replicas(self, texts: int, tokens: int) -> int:
        """Replicas per pass for a batch of ``texts`` texts padded to ``tokens`` tokens."""
        if self.setting == "auto":
            self.start()
            replicas = self.memory.replicas_that_fit(self.budget, texts, tokens)
            if replicas < 1:
                raise AttributionMemoryError(self._too_big(texts, tokens))
        else:
            replicas = self.setting
        if self.ceiling is not None:
            replicas = min(replicas, self.ceiling // tokens)
        return pass_size(replicas, self.steps, texts)

    def run(self, score: Callable[[int], dict], texts: int, tokens: int) -> dict:
        """``score(replicas_per_pass)`` for a batch, sized by :meth:`replicas`, retried on running out of memory."""
        replicas = self.replicas(texts, tokens)
        started = time.perf_counter()
        while True:
            measuring = self.device.type == "cuda" and self.measured is None
            if measuring:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
            try:
                scores = score(replicas)
                break
            except torch.OutOfMemoryError:
                if replicas == 1:
                    raise AttributionMemoryError(self._too_big(texts, tokens)) from None
            self.retries.append({"batch": self.batches, "replicas": replicas, "tokens": tokens})
            self.ceiling = min(self.ceiling or replicas * tokens, replicas * tokens) // 2
            replicas = pass_size(replicas // 2, self.steps, texts)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if measuring:
            peak = torch.cuda.max_memory_allocated(self.device) - before
            self.measured = {"peak_bytes": int(peak), "replicas": replicas, "texts": texts, "tokens": tokens}
            self.memory.calibrate(peak, replicas, texts, tokens)
        if self.first_batch_seconds is None:
            self.first_batch_seconds = time.perf_counter() - started
        self.used[replicas] += 1
        self.batches += 1
        return scores

    def _too_big(self, texts: int, tokens: int) -> str:
        budget = self.budget if self.budget is not None else 0
        needed = self.memory.batch_bytes(texts) + self.memory.pass_bytes(1, tokens)
        return (
            f"a batch of {texts} texts of {tokens} tokens needs {needed / GIB:.2f} GiB for attribution even one "
            f"replica per pass, and {budget / GIB:.2f} GiB are there to use on {self.device}: lower "
            f"data.batch_size or model.max_length"
        )

    def record(self) -> dict:
        """What the summary keeps: the setting, budget, model and its calibration, sizes used, retries."""
        return {
            "replicas_per_pass": self.setting,
            "budget_bytes": self.budget,
            "safety_margin": SAFETY_MARGIN if self.limit_bytes is None else 0.0,
            "memory_model": {
                "stated_bytes_per_replica_token_at_128": self.memory.stated_replica_token_bytes(128),
                "calibration": self.memory.calibration,
                "first_batch": self.measured,
            },
            "passes_used": {str(size): count for size, count in sorted(self.used.items())},
            "out_of_memory_retries": self.retries,
            "first_batch_seconds": self.first_batch_seconds,
        }
