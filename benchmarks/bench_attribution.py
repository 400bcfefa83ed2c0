"""The published batch-1 attribution loop against dkacq's batched ``neuron_scores``, on all-MiniLM-L6-v2.

    python benchmarks/bench_attribution.py [--texts 8] [--threads 2] [--repeats 3]

Prints the speed ratio, the largest score difference, whether the active counts at 0.1 and 0.2
agree, and dkacq's achieved GFLOP/s against this machine's fp32 matmul rate measured in the same run.
On a shared machine, timings move with the load of other processes: the load average is printed
with them, dkacq's time is the best of ``--repeats`` runs, and the naive loop's is also given as its
number of passes times its median pass time, which bursts of load on other processes move less.
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from sample_texts import SAMPLE_TEXTS
from torch.func import functional_call

from dkacq.attribution.counting import ActiveNeuronCounts, counts_to_tensors
from dkacq.attribution.ig import alphas_and_weights, neuron_scores
from dkacq.attribution.targets import BERT_FAMILY, Target, architecture_family, find_targets
from dkacq.encoders.loading import load_encoders
from dkacq.encoders.presets import get_preset
from dkacq.encoders.text_encoder import TextEncoder

STEPS = 20
THRESHOLDS = (0.1, 0.2)


def naive_scores(
    encoder: TextEncoder, texts: list[str], targets: list[Target], pass_seconds: list[float]
) -> dict[str, torch.Tensor]:
    """The published algorithm: per text (batch 1, no padding), per module, per alpha, W' = alpha W and
    b' = alpha b, one forward and one backward with respect to W'. Appends each pass's time to
    ``pass_seconds``."""
    alphas, weights = alphas_and_weights("reference", STEPS)
    scores = {target.name: [] for target in targets}
    for text in texts:
        batch = encoder.tokenize([text])
        for target in targets:
            weight, bias = target.module.weight, target.module.bias
            gradient_sum = torch.zeros_like(weight)
            for alpha, step_weight in zip(alphas.tolist(), weights.tolist()):
                start = time.perf_counter()
                scaled_weight = (alpha * weight).requires_grad_()
                parameters = {f"{target.name}.weight": scaled_weight, f"{target.name}.bias": alpha * bias}
                output = functional_call(encoder.transformer, parameters, kwargs=batch)
                f = encoder.pool(output.last_hidden_state, batch["attention_mask"]).norm(dim=-1).sum()
                (gradient,) = torch.autograd.grad(f, scaled_weight)
                gradient_sum += step_weight * gradient
                pass_seconds.append(time.perf_counter() - start)
            scores[target.name].append((weight * gradient_sum).abs().sum(dim=-1))
    return {name: torch.stack(rows) for name, rows in scores.items()}


def useful_flops(encoder: TextEncoder, lengths: list[int], targets: list[Target]) -> float:
    """Matrix-multiply FLOPs that integrated gradients cannot avoid, for BERT-family models.

    Per text of ``T`` real tokens (padding is not useful work), per target in layer ``l``, per alpha:
    the forward from the module's output to the top and the backward to it, gradients of activations
    only. A full layer's forward is ``T (8 d^2 + 4 d f) + 4 T^2 d`` (Q, K, V, O projections; the two
    feed-forward matrices; QK^T and PV), its backward the same plus ``4 T^2 d`` (both operands of the
    two attention products need gradients, each linear layer needs one product). After an
    ``intermediate`` module its own layer still applies ``output.dense`` (``2 T d f`` forward, as much
    backward); after an ``output`` module only a layer norm. Once per text and target: the
    contraction ``(sum_k w_k g_k)^T X``, ``2 T out in``. Element-wise work (norms, GELU, softmax) is
    left out.
    """
    config = encoder.transformer.config
    d, f, num_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    total = 0.0
    for tokens in lengths:
        layer_forward = tokens * (8 * d * d + 4 * d * f) + 4 * tokens * tokens * d
        layer_backward = layer_forward + 4 * tokens * tokens * d
        for target in targets:
            own_layer = 2 * tokens * d * f if target.kind == "intermediate" else 0
            above = num_layers - 1 - target.layer
            per_alpha = 2 * own_layer + above * (layer_forward + layer_backward)
            module = target.module
            total += STEPS * per_alpha + 2 * tokens * module.out_features * module.in_features
    return total


def matmul_gflops(repeats: int = 10, size: int = 1024) -> float:
    """The best fp32 rate of square matrix products on this machine's current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def active_counts(targets: list[Target], scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    metric = ActiveNeuronCounts(targets, THRESHOLDS)
    metric.update(scores)
    return counts_to_tensors(metric.compute())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder, _ = load_encoders(get_preset("minilm"))
    assert architecture_family(encoder.transformer) is BERT_FAMILY
    targets = find_targets(encoder.transformer)
    texts = SAMPLE_TEXTS[: args.texts]
    batch = encoder.tokenize(texts)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    print(
        f"all-MiniLM-L6-v2, {len(texts)} texts of {min(lengths)}-{max(lengths)} tokens (padded to "
        f"{batch['input_ids'].shape[1]}), {len(targets)} modules, {STEPS} steps, {args.threads} threads"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    matmul_rate = matmul_gflops()

    dkacq_seconds = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        scores = neuron_scores(encoder, batch, targets, steps=STEPS)
        dkacq_seconds = min(dkacq_seconds, time.perf_counter() - start)
    pass_seconds: list[float] = []
    start = time.perf_counter()
    reference = naive_scores(encoder, texts, targets, pass_seconds)
    naive_seconds = time.perf_counter() - start
    steady_naive_seconds = len(pass_seconds) * sorted(pass_seconds)[len(pass_seconds) // 2]
    matmul_rate = max(matmul_rate, matmul_gflops())
    print(f"load average after: {os.getloadavg()[0]:.2f}")

    differences = {
        name: float((scores[name] - reference[name]).abs().max() / reference[name].abs().max()) for name in scores
    }
    worst = max(differences, key=differences.get)
    ours, theirs = active_counts(targets, scores), active_counts(targets, reference)
    flops = useful_flops(encoder, lengths, targets)
    print(
        f"naive loop: {naive_seconds:.1f} s ({len(pass_seconds)} forward+backward passes, "
        f"{naive_seconds / len(pass_seconds) * 1e3:.1f} ms each on average; at the median pass time "
        f"{steady_naive_seconds:.1f} s)"
    )
    print(f"dkacq neuron_scores: {dkacq_seconds:.2f} s (best of {args.repeats})")
    print(
        f"speed ratio: {naive_seconds / dkacq_seconds:.1f}x (at the naive loop's median pass time: "
        f"{steady_naive_seconds / dkacq_seconds:.1f}x)"
    )
    print(f"largest score difference: {differences[worst]:.1e} of the module's largest score ({worst})")
    for threshold in THRESHOLDS:
        keys = [key for key in ours if key.endswith(f"@{threshold:g}")]
        same = all(torch.equal(ours[key], theirs[key]) for key in keys)
        differing = sum(int((ours[key] != theirs[key]).sum()) for key in keys)
        print(f"active counts at {threshold:g}: {'identical' if same else f'{differing} neurons differ'}")
    print(f"fp32 matmul rate ({args.threads} threads, 1024^2): {matmul_rate:.0f} GFLOP/s")
    print(
        f"useful work: {flops / 1e12:.2f} TFLOP; dkacq {flops / dkacq_seconds / 1e9:.0f} GFLOP/s "
        f"({flops / dkacq_seconds / 1e9 / matmul_rate:.0%} of the matmul rate), naive loop "
        f"{flops / steady_naive_seconds / 1e9:.0f} GFLOP/s at its median pass time"
    )


if __name__ == "__main__":
    main()
