"""dkacq's ``neuron_scores`` on a Llama-2-7B-shaped model (random bf16 weights) on one GPU, eager and compiled.

    python benchmarks/gpu_attribution.py                  # every measurement, ~5 minutes on one H100
    python benchmarks/gpu_attribution.py --tiny           # a tiny shape on the CPU in fp32, in seconds

The model is built on the GPU from a ``LlamaConfig`` (hidden 4096, intermediate 11008, 32 layers, 32
heads; no download, no tokenizer): texts are random token ids of 133-153 tokens ending in the EOS id,
pooled at that EOS (RepLlama's reading), and the targets are every layer's ``gate_proj`` and
``down_proj`` (64), with m = 20 steps of the reference rule. Printed, for each path timed (eager,
compiled), in one table:

* s/text: wall time of ``neuron_scores`` over ``--texts`` texts, after a warm-up (for the compiled path
  the warm-up compiles; its time is printed apart), divided by the number of texts;
* useful TFLOP/s: :func:`useful_flops` (linear-layer work of the batched algorithm) over that time, and
  its share of the rate of one large matrix product measured in the same run (bf16 8192^3 on the GPU);
* peak GPU memory of the timed run, the model's weights included (the weights alone are printed too);
* the speed ratio against the published batch-1 loop, whose time per text is extrapolated from one
  timed forward+backward pass per target (W' = alpha W, gradient of F with respect to W', on the
  first text): m times the sum of those pass times.

With both paths, the compiled scores are compared with the eager ones (largest difference relative to
each module's largest score, and the active counts at the Llama threshold 0.01), and the compiled
path's graph count and graph breaks are printed. ``--compile`` times the compiled path alone,
``--eager`` the eager one. ``--tiny`` compiles with the ``aot_eager`` backend unless ``--backend``
says otherwise (inductor's C++ compilation takes minutes on a small CPU).
"""

import argparse
import os
import platform
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
import transformers
from torch import Tensor, nn
from torch.func import functional_call
from transformers import AutoModel, LlamaConfig

from dkacq.attribution.counting import ActiveNeuronCounts
from dkacq.attribution.ig import alphas_and_weights, neuron_scores
from dkacq.attribution.targets import Target, find_targets
from dkacq.encoders.pooling import Pooling, pool

SHAPES = {
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    ),
}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
THRESHOLD = 0.01
"""The Llama presets' activity threshold (the study's)."""


class RandomTextEncoder:
    """What ``neuron_scores`` uses of a :class:`~dkacq.encoders.text_encoder.TextEncoder`, without a tokenizer:
    ``transformer``, ``collate`` (token id rows to a right-padded batch) and ``pool``."""

    def __init__(self, transformer: nn.Module, pooling: Pooling = "eos"):
        self.transformer = transformer
        self.pooling = pooling

    def collate(self, ids: list[list[int]], batch_width: int | None = None) -> dict[str, Tensor]:
        """``batch_width`` is for readings that pad to the batch's width; EOS pooling pads to the longest row."""
        length = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), length), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention_mask[row, : len(tokens)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        return pool(hidden, attention_mask, self.pooling)


def build_model(shape: str, layers: int | None, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A LlamaModel of ``shape`` with random weights, built directly on ``device`` in ``dtype``."""
    settings = dict(SHAPES[shape], pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if layers is not None:
        settings["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with device:
        model = AutoModel.from_config(LlamaConfig(**settings), dtype=dtype)
    return model.eval().requires_grad_(False)


def random_texts(num_texts: int, min_tokens: int, max_tokens: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Token id rows of ``min_tokens..max_tokens`` tokens: BOS, random ids, EOS (as RepLlama tokenizes)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_texts):
        length = int(torch.randint(min_tokens, max_tokens + 1, (), generator=generator))
        middle = torch.randint(EOS_ID + 1, vocab_size, (length - 2,), generator=generator).tolist()
        rows.append([BOS_ID, *middle, EOS_ID])
    return rows


def useful_flops(config: LlamaConfig, lengths: list[int], targets: list[Target], steps: int) -> float:
    """Linear-layer FLOPs of the batched algorithm (what a matrix-multiply unit has to do), for Llama.

    Per text of ``T`` tokens, per target in layer ``l`` of ``L``, per replica (``steps`` of them): the
    forward of the layers above, ``l+1..L-1``, and their backward to the target's output, activation
    gradients only, which costs as much as the forward: ``(L-1-l) * 2 * 2T (2 d^2 + 2 d d_kv + 3 d f)``
    (q and o projections ``d x d``, k and v ``d x d_kv``, gate, up and down ``d x f``); after a ``gate_proj``
    or ``up_proj`` target, its own layer's ``down_proj``, forward and input gradient, ``2 * 2T d f``; after
    a ``down_proj``, nothing. Once per text and target: the contraction ``(sum_k w_k g_k)^T X``,
    ``2T out in``. Left out: the plain recording pass (one forward per text), the target layer's work
    before the target (once per pass, not per replica), attention's two products (``4T^2 d`` per layer
    forward, about 1% at 150 tokens) and all element-wise work.
    """
    d, f, num_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    d_kv = config.num_key_value_heads * head_dim
    layer_per_token = 2 * (2 * d * d + 2 * d * d_kv + 3 * d * f)
    total = 0.0
    for tokens in lengths:
        for target in targets:
            own_layer = 2 * 2 * tokens * d * f if target.kind in ("gate_proj", "up_proj") else 0
            above = (num_layers - 1 - target.layer) * 2 * tokens * layer_per_token
            module = target.module
            total += steps * (above + own_layer) + 2 * tokens * module.out_features * module.in_features
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """The best rate of ``size^3`` matrix products in ``dtype`` on ``device`` (5 back to back per timing)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * size**3 / best / 1e12


def published_pass_seconds(
    encoder: RandomTextEncoder, batch: dict[str, Tensor], targets: list[Target], steps: int
) -> list[float]:
    """One pass of the published loop per target, on one text: W' = alpha W (b' = alpha b), a batch-1
    forward, the gradient of F with respect to W'; the alphas cycle through the path. Seconds each."""
    alphas, _ = alphas_and_weights("reference", steps)
    device = batch["input_ids"].device

    def one_pass(target: Target, alpha: float) -> None:
        parameters = {f"{target.name}.{key}": alpha * value for key, value in target.module.named_parameters()}
        scaled_weight = parameters[f"{target.name}.weight"].requires_grad_()
        output = functional_call(encoder.transformer, parameters, kwargs=batch)
        f = encoder.pool(output.last_hidden_state, batch["attention_mask"]).float().norm(dim=-1).sum()
        torch.autograd.grad(f, scaled_weight)

    for target in targets[:2]:
        one_pass(target, 1.0)
    seconds = []
    for index, target in enumerate(targets):
        synchronize(device)
        start = time.perf_counter()
        one_pass(target, float(alphas[index % steps]))
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def timed(device: torch.device, run: Callable[[], dict[str, Tensor]]) -> tuple[float, float | None, dict[str, Tensor]]:
    """Seconds, peak GPU memory in GiB (None on the CPU) and the result of ``run()``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak, result


def active_counts(targets: list[Target], scores: dict[str, Tensor]) -> dict[tuple[str, float], Tensor]:
    """``(kind, threshold)`` -> how many of the texts each neuron is active in ``[layers, neurons]``."""
    metric = ActiveNeuronCounts(targets, (THRESHOLD,))
    metric.update({name: value.cpu() for name, value in scores.items()})
    return metric.compute().counts


def graph_counts() -> tuple[int, int]:
    """Graphs dynamo compiled so far in this process, and graph breaks."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama shape on the CPU in fp32, in seconds")
    paths = parser.add_mutually_exclusive_group()
    paths.add_argument("--compile", action="store_true", help="time the compiled path only")
    paths.add_argument("--eager", action="store_true", help="time the eager path only")
    parser.add_argument(
        "--backend", default=None, help="torch.compile backend (default: inductor; aot_eager with --tiny)"
    )
    parser.add_argument("--texts", type=int, default=None, help="texts timed per path (default 4; 2 with --tiny)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's, 32 or 4)")
    parser.add_argument("--replicas-per-pass", type=int, default=20, help="(text, alpha) replicas per pass")
    parser.add_argument("--steps", type=int, default=20, help="m, points on the path")
    parser.add_argument("--min-tokens", type=int, default=None, help="shortest text (default 133; 12 with --tiny)")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest text (default 153; 20 with --tiny)")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32", "float64"],
        default=None,
        help="model dtype (default bf16; fp32 tiny)",
    )
    parser.add_argument("--no-published", action="store_true", help="skip timing the published loop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.texts = args.texts or (2 if tiny else 4)
    args.min_tokens = args.min_tokens or (12 if tiny else 133)
    args.max_tokens = args.max_tokens or (20 if tiny else 153)
    args.backend = args.backend or ("aot_eager" if tiny else "inductor")
    args.paths = ["compiled"] if args.compile else ["eager"] if args.eager else ["eager", "compiled"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tiny:
        device, dtype, matmul_dtype, matmul_size = torch.device("cpu"), torch.float32, torch.float32, 512
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --tiny for the CPU shape")
        device, dtype, matmul_dtype, matmul_size = torch.device("cuda"), torch.bfloat16, torch.bfloat16, 8192
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype)
    shape = "tiny" if args.tiny else "7b"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    start = time.perf_counter()
    model = build_model(shape, args.layers, device, dtype)
    build_seconds = time.perf_counter() - start
    config = model.config
    encoder = RandomTextEncoder(model)
    targets = find_targets(model)
    ids = random_texts(args.texts, args.min_tokens, args.max_tokens, config.vocab_size, args.seed)
    batch = {key: value.to(device) for key, value in encoder.collate(ids).items()}
    lengths = [len(row) for row in ids]
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(
        f"device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"model built in {build_seconds:.1f} s"
    )
    print(
        f"shape: {shape}, hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
        f"{config.num_hidden_layers} layers, {str(dtype).removeprefix('torch.')}, weights {weights_gib:.2f} GiB"
    )
    print(
        f"work: {len(ids)} texts of {min(lengths)}-{max(lengths)} tokens, {len(targets)} targets (gate_proj, "
        f"down_proj), m = {args.steps}, replicas_per_pass {args.replicas_per_pass}"
    )

    matmul_rate = matmul_tflops(device, matmul_dtype, matmul_size)
    print(f"matmul rate: {matmul_rate:.4g} TFLOP/s ({str(matmul_dtype).removeprefix('torch.')} {matmul_size}^3)")
    flops = useful_flops(config, lengths, targets, args.steps)
    print(f"useful work: {flops / len(ids) / 1e12:.4g} TFLOP per text (useful_flops)")

    published_seconds_per_text = None
    if not args.no_published:
        first = encoder.collate(ids[:1])
        first = {key: value.to(device) for key, value in first.items()}
        with torch.enable_grad():
            pass_seconds = published_pass_seconds(encoder, first, targets, args.steps)
        published_seconds_per_text = args.steps * sum(pass_seconds)
        print(
            f"published loop: {len(pass_seconds)} passes timed on a text of {lengths[0]} tokens, "
            f"{sum(pass_seconds) / len(pass_seconds) * 1e3:.1f} ms each on average; x {args.steps} steps = "
            f"{published_seconds_per_text:.2f} s/text extrapolated"
        )

    warmup_targets = [target for target in targets if target.layer == max(0, config.num_hidden_layers - 2)]
    warmup_batch = {key: value.to(device) for key, value in encoder.collate(ids[:1]).items()}
    rows, scores = [], {}
    for path in args.paths:
        compile_option: bool | str = False if path == "eager" else args.backend

        def run(targets=targets, batch=batch, compile_option=compile_option) -> dict[str, Tensor]:
            with torch.enable_grad():
                return neuron_scores(
                    encoder, batch, targets, steps=args.steps, replicas_per_pass=args.replicas_per_pass,
                    compile=compile_option,
                )  # fmt: skip

        graphs_before, _ = graph_counts()
        warmup_seconds, _, _ = timed(device, lambda run=run: run(targets=warmup_targets, batch=warmup_batch))
        graphs_warm, _ = graph_counts()
        seconds, peak, scores[path] = timed(device, run)
        graphs_after, breaks = graph_counts()
        note = ""
        if path == "compiled":
            note = (
                f"backend {args.backend}; warm-up (compiling) {warmup_seconds:.1f} s; "
                f"{graphs_warm - graphs_before} graphs; {breaks} graph breaks"
            )
            if graphs_after != graphs_warm:
                note += f"; {graphs_after - graphs_warm} graphs compiled during the timed run"
        rows.append((path, seconds / len(ids), flops / seconds / 1e12, peak, note))

    if published_seconds_per_text is not None:
        rows.append(("published loop", published_seconds_per_text, flops / len(ids) / published_seconds_per_text / 1e12, None, "extrapolated"))  # fmt: skip
    print()
    print("| path | s/text | useful TFLOP/s | share of matmul rate | peak GPU GiB | x published loop | notes |")
    print("|---|---|---|---|---|---|---|")
    for path, per_text, rate, peak, note in rows:
        peak_text = f"{peak:.1f}" if peak is not None else "n/a"
        ratio = f"{published_seconds_per_text / per_text:.1f}" if published_seconds_per_text else "n/a"
        print(f"| {path} | {per_text:.4g} | {rate:.4g} | {rate / matmul_rate:.1%} | {peak_text} | {ratio} | {note} |")

    if "eager" in scores and "compiled" in scores:
        eager, compiled = scores["eager"], scores["compiled"]
        differences = {
            name: float((compiled[name] - eager[name]).abs().max() / eager[name].abs().max()) for name in eager
        }
        worst = max(differences, key=differences.get)
        median = sorted(differences.values())[len(differences) // 2]
        ours, theirs = active_counts(targets, compiled), active_counts(targets, eager)
        differing = sum(int((ours[key] != theirs[key]).sum()) for key in ours)
        active = sum(int(theirs[key].sum()) for key in theirs)
        per_text = {row[0]: row[1] for row in rows}
        print()
        print(f"compiled vs eager speed: {per_text['eager'] / per_text['compiled']:.2f}x")
        print(
            f"compiled vs eager scores: largest difference {differences[worst]:.2e} of the module's largest "
            f"score ({worst}), median module {median:.2e}"
        )
        print(
            f"compiled vs eager active counts at {THRESHOLD:g}: {differing} of "
            f"{sum(v.numel() for v in theirs.values())} neuron counts differ ({active} (text, neuron) actives in eager)"
        )


if __name__ == "__main__":
    main()
