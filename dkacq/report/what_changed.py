"""What fine-tuning changed, and where: per pair of models (a fine-tuned model and its backbone or
random-init control), the representation similarity of each layer (CKA diagonal, ``dkacq compare``), what
a probe reads from it (test accuracy of both), and how the attribution changed (active share, paired over
texts), side by side per layer, with a few generated sentences that state the numbers.

Hidden state ``h`` is the output of transformer layer ``h`` (0: the embeddings), so the attributed
feed-forward modules of layer ``l`` (0-based) feed hidden state ``l + 1``: their changes are drawn there.
"""

from dataclasses import dataclass

from dkacq.formats.counts import AttributionRun
from dkacq.formats.similarity import Comparison, SimilarityRow
from dkacq.report.attribution_stats import ShareChange, compare_runs
from dkacq.report.stats import ProbeResult, per_layer

HEAD_PREFERENCE = ("query_aware", "residual_bilinear", "bilinear", "concat", "passage_only")
"""The probe drawn for a pair: the first of these that both models have (the query-aware probe reads
what the layer holds about query-passage matching; the study's concat probe cannot)."""
LOW_CKA = 0.5
"""The level the summary reports CKA falling below."""


@dataclass(frozen=True)
class ChangedWhere:
    """Everything the section draws for one pair."""

    comparison: Comparison
    diagonals: dict[str, list[SimilarityRow]]
    """side -> the CKA diagonal."""
    head: str | None
    num_passages: int | None
    probe: dict[str, list[ProbeResult]]
    """model -> its probe's rows by layer (empty when the results hold no common probe)."""
    shares: list[ShareChange]
    """Per-layer active-share changes of the pair's attribution runs (empty without them)."""

    @property
    def models(self) -> tuple[str, str]:
        return self.comparison.model_a, self.comparison.model_b


def _probe_rows(rows: list[ProbeResult], comparison: Comparison) -> tuple[str | None, int | None, dict]:
    a, b = comparison.model_a, comparison.model_b
    dataset = comparison.summary.get("dataset")
    found = [row for row in per_layer(rows) if row.model in (a, b) and row.dataset == dataset]
    for head in HEAD_PREFERENCE:
        ns = [
            n
            for n in sorted({row.num_passages for row in found}, reverse=True)
            if all(any(r.model == m and r.probe == head and r.num_passages == n for r in found) for m in (a, b))
        ]
        if ns:
            picked = {
                model: sorted(
                    (r for r in found if r.model == model and r.probe == head and r.num_passages == ns[0]),
                    key=lambda r: r.layer,
                )
                for model in (a, b)
            }
            return head, ns[0], picked
    return None, None, {}


def _share_changes(runs: list[AttributionRun], comparison: Comparison) -> list[ShareChange]:
    """The paired share changes of model a's run against model b's: the study's target, query texts first."""
    for side in ("query", "passage"):
        for run in runs:
            if (run.model, run.text_side, run.target) != (comparison.model_a, side, "norm") or not run.has_per_text:
                continue
            for base in runs:
                same = all(
                    getattr(base, key) == getattr(run, key) for key in ("dataset", "split", "text_side", "target")
                )
                if base.model == comparison.model_b and same and base.has_per_text:
                    return [row for row in compare_runs(run, base) if row.layer is not None]
    return []


def changed_where(comparison: Comparison, rows: list[ProbeResult], runs: list[AttributionRun]) -> ChangedWhere:
    head, n, probe = _probe_rows(rows, comparison)
    diagonals = {side: comparison.diagonal(side) for side in comparison.sides}
    return ChangedWhere(comparison, diagonals, head, n, probe, _share_changes(runs, comparison))


def summary_sentences(changed: ChangedWhere) -> list[str]:
    """The numbers of the section in words: where CKA falls, what the probe gains, how attribution moved."""
    a, b = changed.models
    sentences = []
    for side, diagonal in changed.diagonals.items():
        if not diagonal:
            continue
        low = next((row for row in diagonal if row.cka < LOW_CKA), None)
        lowest = min(diagonal, key=lambda row: row.cka)
        start = (
            f"falls below {LOW_CKA} at hidden state {low.layer_a} ({low.cka:.2f})"
            if low
            else f"stays above {LOW_CKA} at every hidden state"
        )
        sentences.append(
            f"Linear CKA of {a} with {b} on {side} texts {start}; it is {diagonal[-1].cka:.2f} at the last "
            f"(debiased {diagonal[-1].debiased_cka:.2f}), lowest at hidden state {lowest.layer_a} ({lowest.cka:.2f})."
        )
    if changed.head:
        by_layer = {row.layer: row for row in changed.probe[b]}
        gains = [
            (row, row.test_acc - by_layer[row.layer].test_acc) for row in changed.probe[a] if row.layer in by_layer
        ]
        if gains:
            best, gain = max(gains, key=lambda item: item[1])
            last, last_gain = gains[-1]

            def versus(row: ProbeResult) -> str:
                return f"({row.test_acc:.2f} against {by_layer[row.layer].test_acc:.2f})"

            where = f"at hidden state {best.layer}"
            where += (
                f", the last {versus(best)}"
                if best is last
                else f" {versus(best)} and {last_gain:+.2f} at the last {versus(last)}"
            )
            sentences.append(
                f"The {changed.head} probe (N = {changed.num_passages}) gains {gain:+.2f} over {b} {where}."
            )
    for kind in dict.fromkeys(row.kind for row in changed.shares):
        rows = [row for row in changed.shares if row.kind == kind]
        largest = max(rows, key=lambda row: abs(row.change))
        significant = [row.layer + 1 for row in rows if row.significant]
        sentences.append(
            f"Attribution ({rows[0].text_side} texts, threshold {rows[0].threshold:g}): the active share of "
            f"{kind} neurons changes most below hidden state {largest.layer + 1}, by {largest.change:+.1f} points "
            f"[{largest.change_low:+.1f}, {largest.change_high:+.1f}] ({largest.share:.1f}% against "
            f"{largest.base_share:.1f}%); significant (Wilcoxon, Bonferroni) below hidden states "
            + (", ".join(str(layer) for layer in significant) if significant else "none")
            + "."
        )
    return sentences
