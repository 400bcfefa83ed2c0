"""dkacq's ``neuron_scores`` on a Llama-2-7B and a BERT-base shape (random weights) on one GPU: eager
against compiled passes, and passes sized by ``replicas_per_pass auto`` against a fixed size, in one run.

    python benchmarks/gpu_attribution.py                  # every measurement, both shapes, ~6 minutes on one H100
    python benchmarks/gpu_attribution.py --tiny           # tiny shapes of both families on the CPU in fp32, in seconds

Each model is built on the GPU from its config (Llama: hidden 4096, intermediate 11008, 32 layers, 32
heads; BERT: hidden 768, intermediate 3072, 12 layers, 12 heads; no download, no tokenizer): texts are
random token ids of 133-153 tokens, pooled at their EOS (Llama, RepLlama's reading) or CLS (BERT), and
the targets are every layer's ``gate_proj`` and ``down_proj`` (Llama, 64) or ``intermediate`` and
``output`` (BERT, 24), with m = 20 steps of the reference rule. For each shape, each pass sizing
(``--replicas-per-pass``, 20 by default, and ``auto``: :class:`dkacq.attribution.passes.PassPlanner`,
as ``dkacq attribute`` runs it) and each path (eager, compiled) is timed; printed in one table:

* s/text: wall time of ``neuron_scores`` over ``--texts`` texts in one batch, after a warm-up (for the
  compiled path the warm-up compiles; its time is in the notes), divided by the number of texts;
* replicas: the pass size used (for ``auto``, the memory model's choice for the batch, after any
  out-of-memory retry; the notes give the calibration the batch measured and the retries);
* useful TFLOP/s: :func:`useful_flops` (linear-layer work of the batched algorithm) over that time, and
  its share of the rate of one large matrix product measured in the same run (bf16 8192^3 on the GPU);
* peak GPU memory of the timed run, the model's weights included (the weights alone are printed too);
* the speed ratio against the published batch-1 loop, whose time per text is extrapolated from one
  timed forward+backward pass per target (W' = alpha W, gradient of F with respect to W', on the
  first text): m times the sum of those pass times.

Then, per shape, the ratios: compiled against eager (speed, peak memory) and auto against fixed; and
the compiled scores against the eager ones (largest difference relative to each module's largest
score, active counts at 0.01), with the compiled path's graph count and graph breaks. ``--compile``
times the compiled path alone, ``--eager`` the eager one; ``--shapes`` picks the shapes. ``--tiny``
compiles with the ``aot_eager`` backend unless ``--backend`` says otherwise (inductor's C++ compilation
takes minutes on a small CPU).
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
from transformers import AutoModel, BertConfig, LlamaConfig

from dkacq.attribution.counting import ActiveNeuronCounts
from dkacq.attribution.ig import alphas_and_weights, neuron_scores
from dkacq.attribution.passes import PassMemory, PassPlanner
from dkacq.attribution.targets import Target, find_targets
from dkacq.encoders.pooling import Pooling, pool

LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
BERT_BASE = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    vocab_size=30522,
    max_position_embeddings=512,
)
TINY = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4, vocab_size=512)
SHAPES = {
    "7b": (LlamaConfig, "eos", LLAMA_7B),
    "bert-base": (BertConfig, "cls", BERT_BASE),
    "tiny-llama": (LlamaConfig, "eos", dict(TINY, num_key_value_heads=4, max_position_embeddings=256)),
    "tiny-bert": (BertConfig, "cls", dict(TINY, max_position_embeddings=256)),
}
"""name -> (config class, pooling, config): the GPU shapes and their ``--tiny`` stand-ins."""
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
        """``batch_width`` is for readings that pad to the batch's width; EOS and CLS pooling pad to the longest row."""
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
    """The bare model of ``shape`` (LlamaModel, BertModel without pooler) with random weights, built
    directly on ``device`` in ``dtype``."""
    config_class, _, settings = SHAPES[shape]
    settings = dict(settings, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if layers is not None:
        settings["num_hidden_layers"] = layers
    torch.manual_seed(0)
    kwargs = {"add_pooling_layer": False} if config_class is BertConfig else {}
    with device:
        model = AutoModel.from_config(config_class(**settings), dtype=dtype, **kwargs)
    return model.eval().requires_grad_(False)


def random_texts(num_texts: int, min_tokens: int, max_tokens: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Token id rows of ``min_tokens..max_tokens`` tokens: BOS, random ids, EOS (as RepLlama tokenizes;
    for BERT the same rows stand for [CLS] ... [SEP])."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_texts):
        length = int(torch.randint(min_tokens, max_tokens + 1, (), generator=generator))
        middle = torch.randint(EOS_ID + 1, vocab_size, (length - 2,), generator=generator).tolist()
        rows.append([BOS_ID, *middle, EOS_ID])
    return rows


def useful_flops(config, lengths: list[int], targets: list[Target], steps: int) -> float:
    """Linear-layer FLOPs of the batched algorithm (what a matrix-multiply unit has to do).

    Per text of ``T`` tokens, per target in layer ``l`` of ``L``, per replica (``steps`` of them): the
    forward of the layers above, ``l+1..L-1``, and their backward to the target's output, activation
    gradients only, which costs as much as the forward: ``(L-1-l) * 2 * 2T (2 d^2 + 2 d d_kv + k d f)``
    (q and o projections ``d x d``, k and v ``d x d_kv``, and ``k`` feed-forward matrices ``d x f``: 3 for
    Llama's gate, up and down, 2 for BERT's intermediate and output); after a target on the intermediate
    side (Llama ``gate_proj``/``up_proj``, BERT ``intermediate``), its own layer's projection back,
    forward and input gradient, ``2 * 2T d f``; after one on the output side, nothing. Once per text and
    target: the contraction ``(sum_k w_k g_k)^T X``, ``2T out in``. Left out: the plain recording pass (one
    forward per text), the target layer's work before the target (once per pass, not per replica),
    attention's two products (``4T^2 d`` per layer forward, about 1% at 150 tokens) and all element-wise work.
    """
    d, f, num_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    d_kv = getattr(config, "num_key_value_heads", config.num_attention_heads) * head_dim
    feed_forward = 3 if isinstance(config, LlamaConfig) else 2
    layer_per_token = 2 * (2 * d * d + 2 * d * d_kv + feed_forward * d * f)
    total = 0.0
    for tokens in lengths:
        for target in targets:
            own_layer = 2 * 2 * tokens * d * f if target.side == "intermediate" else 0
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
    parser.add_argument("--tiny", action="store_true", help="tiny Llama and BERT shapes on the CPU in fp32, in seconds")
    parser.add_argument("--shapes", nargs="+", choices=["7b", "bert-base"], default=["7b", "bert-base"])
    paths = parser.add_mutually_exclusive_group()
    paths.add_argument("--compile", action="store_true", help="time the compiled path only")
    paths.add_argument("--eager", action="store_true", help="time the eager path only")
    parser.add_argument(
        "--backend", default=None, help="torch.compile backend (default: inductor; aot_eager with --tiny)"
    )
    parser.add_argument("--texts", type=int, default=None, help="texts timed per path (default 4; 2 with --tiny)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: each shape's)")
    parser.add_argument("--replicas-per-pass", type=int, default=20, help="the fixed pass size timed against auto")
    parser.add_argument("--no-auto", action="store_true", help="time the fixed pass size only")
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
    args.passes = ["fixed"] if args.no_auto else ["fixed", "auto"]
    if tiny:
        args.shapes = [{"7b": "tiny-llama", "bert-base": "tiny-bert"}[shape] for shape in args.shapes]
    return args


def measure_shape(args, shape: str, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Every (passes, path) of one shape, timed: one row each, printed as they come; and the compiled
    scores compared with the eager ones."""
    start = time.perf_counter()
    model = build_model(shape, args.layers, device, dtype)
    build_seconds = time.perf_counter() - start
    config = model.config
    encoder = RandomTextEncoder(model, SHAPES[shape][1])
    targets = find_targets(model)
    ids = random_texts(args.texts, args.min_tokens, args.max_tokens, config.vocab_size, args.seed)
    batch = {key: value.to(device) for key, value in encoder.collate(ids).items()}
    lengths = [len(row) for row in ids]
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    kinds = ", ".join(dict.fromkeys(target.kind for target in targets))
    print()
    print(
        f"shape {shape}: hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
        f"{config.num_hidden_layers} layers, {str(dtype).removeprefix('torch.')}, weights {weights_gib:.2f} GiB, "
        f"built in {build_seconds:.1f} s"
    )
    flops = useful_flops(config, lengths, targets, args.steps)
    print(
        f"work: {len(ids)} texts of {min(lengths)}-{max(lengths)} tokens, {len(targets)} targets ({kinds}), "
        f"m = {args.steps}; useful work {flops / len(ids) / 1e12:.4g} TFLOP per text (useful_flops)"
    )

    published = None
    if not args.no_published:
        first = {key: value.to(device) for key, value in encoder.collate(ids[:1]).items()}
        with torch.enable_grad():
            pass_seconds = published_pass_seconds(encoder, first, targets, args.steps)
        published = args.steps * sum(pass_seconds)
        print(
            f"published loop: {len(pass_seconds)} passes timed on a text of {lengths[0]} tokens, "
            f"{sum(pass_seconds) / len(pass_seconds) * 1e3:.1f} ms each on average; x {args.steps} steps = "
            f"{published:.2f} s/text extrapolated"
        )

    # the warm-up: two texts (dynamo specialises a size of 1), the layers that make every graph
    warmup_targets = [target for target in targets if target.layer == max(0, config.num_hidden_layers - 2)]
    warmup_batch = {key: value.to(device) for key, value in encoder.collate(ids[:2]).items()}
    rows, scores = [], {}
    for passes in args.passes:
        for path in args.paths:
            compile_option: bool | str = False if path == "eager" else args.backend
            planner = PassPlanner(
                "auto" if passes == "auto" else args.replicas_per_pass,
                args.steps,
                PassMemory.of(config, dtype),
                device,
            )

            def run(targets=targets, batch=batch, compile_option=compile_option, planner=planner):
                def score(replicas: int) -> dict[str, Tensor]:
                    with torch.enable_grad():
                        return neuron_scores(
                            encoder, batch, targets, steps=args.steps, replicas_per_pass=replicas,
                            compile=compile_option,
                        )  # fmt: skip

                return planner.run(score, batch["input_ids"].shape[0], batch["input_ids"].shape[1])

            graphs_before, _ = graph_counts()
            warmup = PassPlanner(planner.setting, args.steps, PassMemory.of(config, dtype), device)
            warmup_seconds, _, _ = timed(
                device, lambda warmup=warmup: run(targets=warmup_targets, batch=warmup_batch, planner=warmup)
            )
            graphs_warm, _ = graph_counts()
            seconds, peak, scores[passes, path] = timed(device, run)
            graphs_after, breaks = graph_counts()
            notes = []
            if path == "compiled":
                notes.append(
                    f"backend {args.backend}; warm-up (compiling) {warmup_seconds:.1f} s; "
                    f"{graphs_warm - graphs_before} graphs; {breaks} graph breaks"
                )
                if graphs_after != graphs_warm:
                    notes.append(f"{graphs_after - graphs_warm} graphs compiled during the timed run")
            if passes == "auto":
                record = planner.record()
                notes.append(f"calibration {record['memory_model']['calibration']:.2f}")
                if record["out_of_memory_retries"]:
                    notes.append(f"out-of-memory retries at {[r['replicas'] for r in record['out_of_memory_retries']]}")
            row = {
                "shape": shape,
                "passes": passes,
                "path": path,
                "replicas": ", ".join(planner.record()["passes_used"]),
                "per_text": seconds / len(ids),
                "rate": flops / seconds / 1e12,
                "peak": peak,
                "published": published,
                "notes": "; ".join(notes),
            }
            rows.append(row)
            print(f"  {passes} {path}: {row['per_text']:.4g} s/text, replicas {row['replicas']}, peak {_gib(peak)} GiB")

    if published is not None:
        rate = flops / len(ids) / published / 1e12
        rows.append({"shape": shape, "passes": "batch 1", "path": "published loop", "replicas": "1",
                     "per_text": published, "rate": rate, "peak": None, "published": published,
                     "notes": "extrapolated"})  # fmt: skip
    for passes in args.passes:
        if (passes, "eager") in scores and (passes, "compiled") in scores:
            compare_scores(shape, passes, targets, scores[passes, "eager"], scores[passes, "compiled"])
    rows_by = {(row["passes"], row["path"]): row for row in rows}
    print_ratios(shape, rows_by)
    return rows


def _gib(peak: float | None) -> str:
    return f"{peak:.1f}" if peak is not None else "n/a"


def compare_scores(shape: str, passes: str, targets, eager: dict[str, Tensor], compiled: dict[str, Tensor]) -> None:
    differences = {name: float((compiled[name] - eager[name]).abs().max() / eager[name].abs().max()) for name in eager}
    worst = max(differences, key=differences.get)
    median = sorted(differences.values())[len(differences) // 2]
    ours, theirs = active_counts(targets, compiled), active_counts(targets, eager)
    differing = sum(int((ours[key] != theirs[key]).sum()) for key in ours)
    active = sum(int(theirs[key].sum()) for key in theirs)
    print(
        f"{shape}, {passes} passes, compiled vs eager scores: largest difference {differences[worst]:.2e} of the "
        f"module's largest score ({worst}), median module {median:.2e}"
    )
    print(
        f"{shape}, {passes} passes, compiled vs eager active counts at {THRESHOLD:g}: {differing} of "
        f"{sum(v.numel() for v in theirs.values())} neuron counts differ ({active} (text, neuron) actives in eager)"
    )


def print_ratios(shape: str, rows: dict) -> None:
    """Speed (time per text of the first over the second, > 1: the second is faster) and peak memory ratios."""
    pairs = [
        (("fixed", "eager"), ("fixed", "compiled"), "compiled vs eager, fixed passes"),
        (("auto", "eager"), ("auto", "compiled"), "compiled vs eager, auto passes"),
        (("fixed", "eager"), ("auto", "eager"), "auto vs fixed passes, eager"),
        (("fixed", "compiled"), ("auto", "compiled"), "auto vs fixed passes, compiled"),
    ]
    for before, after, label in pairs:
        if before in rows and after in rows:
            speed = rows[before]["per_text"] / rows[after]["per_text"]
            peaks = rows[before]["peak"], rows[after]["peak"]
            memory = f", peak memory {peaks[1] / peaks[0]:.2f}x" if None not in peaks else ""
            print(f"{shape}: {label}: speed {speed:.2f}x{memory}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tiny:
        device, dtype, matmul_dtype, matmul_size = torch.device("cpu"), torch.float32, torch.float32, 512
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --tiny for the CPU shapes")
        device, dtype, matmul_dtype, matmul_size = torch.device("cuda"), torch.bfloat16, torch.bfloat16, 8192
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    memory = (
        f", {torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB" if device.type == "cuda" else ""
    )
    print(f"device: {device_name}{memory}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(
        f"passes: fixed {args.replicas_per_pass} replicas" + (", and auto" if "auto" in args.passes else "")
        + f"; paths: {', '.join(args.paths)}"
    )  # fmt: skip
    matmul_rate = matmul_tflops(device, matmul_dtype, matmul_size)
    print(f"matmul rate: {matmul_rate:.4g} TFLOP/s ({str(matmul_dtype).removeprefix('torch.')} {matmul_size}^3)")

    rows = []
    for shape in args.shapes:
        rows += measure_shape(args, shape, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the shape's model is gone
    print()
    print("| shape | passes | path | replicas | s/text | useful TFLOP/s | share of matmul rate | peak GPU GiB | x published loop | notes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['published'] / row['per_text']:.1f}" if row["published"] else "n/a"
        print(
            f"| {row['shape']} | {row['passes']} | {row['path']} | {row['replicas']} | {row['per_text']:.4g} | "
            f"{row['rate']:.4g} | {row['rate'] / matmul_rate:.1%} | {_gib(row['peak'])} | {ratio} | {row['notes']} |"
        )


if __name__ == "__main__":
    main()
