"""The compiled attribution path (``neuron_scores(..., compile=...)``) against the oracles, and the GPU benchmark's CPU shape.

The oracle comparisons of test_ig.py run here with ``compile="aot_eager"``: dynamo traces every layer
with its replica hooks and AOTAutograd builds the compiled forward and backward, which is where the
compiled path can go wrong (a hook left out of a graph, a gradient that does not reach the probe), but
the graphs run on the eager kernels, so the tolerances stay test_ig's. Inductor's C++ compilation takes
minutes per model on a small CPU; it is checked once, on Llama, against the eager path.
"""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from captum.attr import IntegratedGradients
from test_ig import (
    TEXTS,
    assert_relatively_close,
    encoder_for,
    naive_scores,
    padded_batch,
    pooled_norm,
    scaled_parameters,
)

from dkacq.attribution.counting import ActiveNeuronCounts
from dkacq.attribution.ig import neuron_scores, path_attributions
from dkacq.attribution.targets import architecture_family, find_targets
from dkacq.encoders.loading import load_encoders

BACKEND = "aot_eager"
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.mark.parametrize(
    "family, pooling, side",
    [
        ("bert", "mean", "right"),
        ("bert", "cls", "left"),
        ("llama", "eos", "right"),
        ("llama", "eos", "left"),
        ("llama", "eos_reference", "max_length"),
    ],
)
@pytest.mark.parametrize("rule", ["reference", "riemann_right"])
def test_compiled_scores_equal_the_published_loop(request, family, pooling, side, rule):
    encoder = encoder_for(request.getfixturevalue(f"tiny_{family}_preset"), pooling)
    batch = encoder.tokenize(TEXTS) if side == "max_length" else padded_batch(encoder, TEXTS, side)
    targets = find_targets(encoder.transformer, list(architecture_family(encoder.transformer).kinds))
    scores = neuron_scores(encoder, batch, targets, rule=rule, steps=20, compile=BACKEND)
    expected = naive_scores(encoder, TEXTS, targets, rule, steps=20)
    assert list(scores) == [target.name for target in targets]
    for name, value in expected.items():
        assert scores[name].dtype == torch.float64
        assert_relatively_close(scores[name], value, 1e-9)


@pytest.mark.parametrize("replicas_per_pass", [1, 2, 7])
def test_compiled_splits_change_nothing(tiny_llama_preset, replicas_per_pass):
    encoder = encoder_for(tiny_llama_preset)
    batch = padded_batch(encoder, TEXTS, "left")
    targets = find_targets(encoder.transformer, ["gate_proj", "up_proj", "down_proj"])
    whole = neuron_scores(encoder, batch, targets, steps=5)
    split = neuron_scores(encoder, batch, targets, steps=5, replicas_per_pass=replicas_per_pass, compile=BACKEND)
    for name in whole:
        assert_relatively_close(split[name], whole[name], 1e-12)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("replicas_per_pass", [None, 12])
def test_compiled_scores_of_a_text_do_not_depend_on_its_batch(request, family, replicas_per_pass):
    encoder = encoder_for(request.getfixturevalue(f"tiny_{family}_preset"))
    targets = find_targets(encoder.transformer)
    alone = [neuron_scores(encoder, encoder.tokenize([text]), targets, steps=4, compile=BACKEND) for text in TEXTS]
    batch = padded_batch(encoder, TEXTS, "right")
    together = neuron_scores(encoder, batch, targets, steps=4, replicas_per_pass=replicas_per_pass, compile=BACKEND)
    for row, scores in enumerate(alone):
        for name, value in scores.items():
            assert_relatively_close(together[name][row : row + 1], value, 1e-9)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_compiled_attributions_equal_captum_and_are_complete(request, family):
    """Captum's riemann_right on one text, and completeness (sum of attributions = F(W, b) - F(0, 0)) on all."""
    encoder = encoder_for(request.getfixturevalue(f"tiny_{family}_preset"))
    targets = find_targets(encoder.transformer)
    batch = encoder.tokenize(TEXTS[1:2])
    steps = 16
    attributions = dict(path_attributions(encoder, batch, targets, "riemann_right", steps, compile=BACKEND))
    for target in targets:
        names = [f"{target.name}.{key}" for key, _ in target.module.named_parameters()]

        def f_of_parameters(*stacked: torch.Tensor, names=names) -> torch.Tensor:
            return torch.cat([pooled_norm(encoder, batch, dict(zip(names, step))) for step in zip(*stacked)])

        inputs = tuple(value.unsqueeze(0) for _, value in target.module.named_parameters())
        expected = IntegratedGradients(f_of_parameters).attribute(
            inputs, baselines=tuple(torch.zeros_like(x) for x in inputs), method="riemann_right", n_steps=steps
        )
        actual = [attributions[target].weight, attributions[target].bias][: len(expected)]
        for value, captum_value in zip(actual, expected):
            assert_relatively_close(value, captum_value, 1e-7)

    batch = encoder.tokenize(TEXTS)
    f_full = pooled_norm(encoder, batch, {})
    for target, attribution in path_attributions(encoder, batch, targets, "riemann_right", 300, compile=BACKEND):
        difference = f_full - pooled_norm(encoder, batch, scaled_parameters(target, 0.0))
        total = attribution.weight.sum(dim=(1, 2))
        if attribution.bias is not None:
            total = total + attribution.bias.sum(dim=1)
        assert torch.all((total - difference).abs() <= 0.01 * difference.abs()), (target.name, total, difference)


def test_hooks_of_the_compiled_path_are_removed_and_parameters_restored(tiny_llama_preset):
    """The model is left as found: no hook, parameters that required grad still do; and an eager hook
    added after compiling is not ignored by the compiled layers (the teammate's layer.compile() bug)."""
    encoder = encoder_for(tiny_llama_preset)
    transformer = encoder.transformer
    transformer.requires_grad_(True)
    batch = padded_batch(encoder, TEXTS, "right")
    targets = find_targets(transformer)
    before = neuron_scores(encoder, batch, targets, steps=3, compile=BACKEND)
    modules = list(transformer.modules())
    assert not any(module._forward_hooks for module in modules)
    assert all(parameter.requires_grad for parameter in transformer.parameters())

    handle = transformer.layers[1].mlp.register_forward_hook(lambda module, args, output: 2 * output)
    try:
        doubled = neuron_scores(encoder, batch, targets, steps=3, compile=BACKEND)
        eager_doubled = neuron_scores(encoder, batch, targets, steps=3)
    finally:
        handle.remove()
    for name in before:
        assert_relatively_close(doubled[name], eager_doubled[name], 1e-9)
    assert any((doubled[name] - before[name]).abs().max() > 1e-3 * before[name].abs().max() for name in before)


@pytest.mark.slow
def test_inductor_scores_and_active_counts_equal_the_eager_path(tiny_llama_preset):
    """The real backend, on the float32 model as dkacq loads it. Llama, the family the compiled path is
    for (RepLlama on a GPU): its RMSNorm, float32 inside whatever the model's dtype, is where inductor's
    fused arithmetic rounds differently. Inductor's C++ build of a second family would add a quarter
    minute for no other kind of graph (the aot_eager tests above trace every family)."""
    preset = tiny_llama_preset
    encoder, _ = load_encoders(preset)
    batch = padded_batch(encoder, TEXTS, "left")
    targets = find_targets(encoder.transformer)
    eager = neuron_scores(encoder, batch, targets, steps=8)
    compiled = neuron_scores(encoder, batch, targets, steps=8, compile=True)
    for name in eager:
        assert compiled[name].dtype == torch.float32
        assert_relatively_close(compiled[name], eager[name], 1e-4)
    thresholds = (0.01, 0.1, 0.2)
    counts = []
    for scores in (eager, compiled):
        metric = ActiveNeuronCounts(targets, thresholds)
        metric.update(scores)
        counts.append(metric.compute().counts)
    assert counts[0].keys() == counts[1].keys()
    for key in counts[0]:
        assert torch.equal(counts[0][key], counts[1][key]), key


def parse_table(output: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """The benchmark's table: (shape, passes, path) -> column -> cell."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[tuple(cells[:3])] = dict(zip(header, cells))
    return rows


@pytest.mark.slow
def test_gpu_benchmark_runs_its_tiny_shapes_on_the_cpu(capsys):
    """The plumbing, fast: dynamo's graphs run as traced (the compiled numbers are checked above)."""
    spec = importlib.util.spec_from_file_location("gpu_attribution", ROOT / "benchmarks" / "gpu_attribution.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    threads = torch.get_num_threads()
    try:  # in this process: the benchmark's imports are the suite's (a subprocess would spend seconds on them)
        benchmark.main(["--tiny", "--backend", "eager", "--steps", "4", "--layers", "2", "--replicas-per-pass", "4"])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()  # the benchmark's graphs do not count against later tests' recompile limits
    output = capsys.readouterr().out
    rate = float(re.search(r"matmul rate: ([\d.e+-]+) TFLOP/s", output).group(1))
    assert rate > 0
    assert len(re.findall(r"useful work ([\d.e+-]+) TFLOP per text", output)) == 2
    rows = parse_table(output)
    expected = {
        (shape, passes, path)
        for shape in ("tiny-llama", "tiny-bert")
        for passes, path in (("fixed", "eager"), ("fixed", "compiled"), ("auto", "eager"), ("auto", "compiled"),
                             ("batch 1", "published loop"))
    }  # fmt: skip
    assert set(rows) == expected
    for key, row in rows.items():
        assert float(row["s/text"]) > 0
        assert float(row["useful TFLOP/s"]) > 0
        assert float(row["share of matmul rate"].rstrip("%")) > 0 or key[2] == "published loop"  # 0.0% rounded
        assert float(row["x published loop"]) > 0
        assert row["peak GPU GiB"] == "n/a"
    for shape in ("tiny-llama", "tiny-bert"):
        assert "graph breaks" in rows[shape, "fixed", "compiled"]["notes"]
        # the CPU's memory holds every replica of the 2 texts: auto takes them in one pass; fixed, one text's 4
        assert rows[shape, "auto", "eager"]["replicas"] == "8" and rows[shape, "fixed", "eager"]["replicas"] == "4"
        for label in ("compiled vs eager, fixed passes", "auto vs fixed passes, eager"):
            assert re.search(rf"{shape}: {label}: speed [\d.]+x", output)
        for passes in ("fixed", "auto"):
            difference = re.search(
                rf"{shape}, {passes} passes, compiled vs eager scores: largest difference ([\d.e+-]+)", output
            )
            assert float(difference.group(1)) < 1e-5
            assert re.search(
                rf"{shape}, {passes} passes, compiled vs eager active counts at 0.01: 0 of \d+ neuron counts differ",
                output,
            )
