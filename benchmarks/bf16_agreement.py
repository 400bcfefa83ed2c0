"""How much bf16 changes attribution: all-MiniLM-L6-v2 in bf16 against fp32, on 16 texts.

    python benchmarks/bf16_agreement.py [--texts 16] [--threads 2]

The 7B models of the study are attributed in bf16 (their GPU runs); this measures what that costs on
a model small enough to run both ways. Printed: the Spearman rank correlation of the neuron scores
(all neurons of all modules, per text, then the mean and the worst text; and pooled over texts after
the per-text normalisation), their relative difference, and the Jaccard agreement of the active sets, (text, neuron) pairs
active in one run against the other, at thresholds 0.1 and 0.2, with the count of neurons whose
active-text count differs.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from sample_texts import SAMPLE_TEXTS
from scipy.stats import spearmanr

from dkacq.attribution.counting import active_masks, normalize_per_text
from dkacq.attribution.ig import neuron_scores
from dkacq.attribution.targets import find_targets
from dkacq.encoders.loading import load_encoders
from dkacq.encoders.presets import get_preset

THRESHOLDS = (0.1, 0.2)


def scores_in(dtype: torch.dtype, texts: list[str]) -> torch.Tensor:
    """Normalised scores ``[texts, all neurons]`` (modules concatenated in layer order) with the model in ``dtype``."""
    encoder, _ = load_encoders(get_preset("minilm"), dtype=dtype)
    assert next(encoder.transformer.parameters()).dtype == dtype
    scores = neuron_scores(encoder, encoder.tokenize(texts), find_targets(encoder.transformer))
    assert all(value.dtype == torch.float32 for value in scores.values())
    return torch.cat(list(normalize_per_text(scores).values()), dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = SAMPLE_TEXTS[: args.texts]
    full, half = scores_in(torch.float32, texts), scores_in(torch.bfloat16, texts)

    per_text = [spearmanr(full[row].numpy(), half[row].numpy()).statistic for row in range(len(texts))]
    pooled = spearmanr(full.flatten().numpy(), half.flatten().numpy()).statistic
    print(f"all-MiniLM-L6-v2, {len(texts)} texts, {full.shape[1]} neurons per text, bf16 against fp32")
    print(
        f"Spearman of scores: mean over texts {sum(per_text) / len(per_text):.4f}, worst text "
        f"{min(per_text):.4f}, pooled (normalised) {pooled:.4f}"
    )
    relative = ((half - full).abs() / full.abs().clamp_min(1e-12))[full > 0.01]
    print(
        f"relative score difference where the fp32 normalised score exceeds 0.01: median "
        f"{float(relative.median()):.1e}, 99th percentile {float(relative.quantile(0.99)):.1e}"
    )
    full_masks = active_masks({"all": full}, THRESHOLDS)
    half_masks = active_masks({"all": half}, THRESHOLDS)
    for threshold in THRESHOLDS:
        a, b = full_masks[threshold]["all"], half_masks[threshold]["all"]
        jaccard = (a & b).sum() / (a | b).sum()
        count_changes = int((a.sum(dim=0) != b.sum(dim=0)).sum())
        print(
            f"threshold {threshold:g}: {int(a.sum())} active (text, neuron) pairs in fp32, {int(b.sum())} in bf16, "
            f"Jaccard {float(jaccard):.4f}; {count_changes} neurons change their active-text count"
        )


if __name__ == "__main__":
    main()
