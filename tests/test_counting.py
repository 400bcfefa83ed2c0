"""Per-text normalisation, activity thresholds and the distributed count metric."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from dkacq.attribution.counting import (
    ActiveNeuronCounts,
    active_masks,
    counts_from_tensors,
    counts_to_tensors,
    normalize_per_text,
)
from dkacq.attribution.targets import Target
from dkacq.formats.counts import AttributionRun, split_counts_tensors, write_counts, write_summary

THRESHOLDS = (0.1, 0.2)


def make_targets(num_layers: int = 3, widths: dict[str, int] | None = None) -> list[Target]:
    widths = widths or {"intermediate": 6, "output": 4}
    return [
        Target(f"layer.{layer}.{kind}", kind, kind, layer, nn.Linear(2, width))
        for layer in range(num_layers)
        for kind, width in widths.items()
    ]


def random_scores(targets: list[Target], num_texts: int, seed: int) -> dict[str, torch.Tensor]:
    """Heavy-tailed scores, like real ones: a few neurons dominate each text."""
    generator = torch.Generator().manual_seed(seed)
    return {target.name: torch.rand(num_texts, target.num_neurons, generator=generator) ** 6 for target in targets}


def test_normalisation_and_thresholds_by_hand():
    scores = {
        "a": torch.tensor([[1.0, 0.6], [0.5, 0.25], [0.0, 0.0]]),
        "b": torch.tensor([[4.0, 0.2, 0.3], [0.1, 1.0, 0.4], [0.0, 0.0, 0.0]]),
    }
    normalized = normalize_per_text(scores)
    assert torch.allclose(normalized["a"], torch.tensor([[0.25, 0.15], [0.5, 0.25], [0.0, 0.0]]))
    assert torch.allclose(normalized["b"], torch.tensor([[1.0, 0.05, 0.075], [0.1, 1.0, 0.4], [0.0, 0.0, 0.0]]))
    masks = active_masks(normalized, THRESHOLDS)
    assert masks[0.1]["a"].tolist() == [[True, True], [True, True], [False, False]]
    assert masks[0.2]["a"].tolist() == [[True, False], [True, True], [False, False]]
    # 0.1 is not above 0.1: "exceeds" is strict
    assert masks[0.1]["b"].tolist() == [[True, False, False], [False, True, True], [False, False, False]]
    assert masks[0.2]["b"].tolist() == [[True, False, False], [False, True, True], [False, False, False]]


def naive_counts(targets: list[Target], batches: list[dict[str, torch.Tensor]], thresholds) -> dict:
    """Text by text, neuron by neuron."""
    counts = {}
    for target in targets:
        for threshold in thresholds:
            key = (target.kind, threshold)
            counts.setdefault(key, torch.zeros(3, target.num_neurons, dtype=torch.int64))
    for scores in batches:
        for text in range(next(iter(scores.values())).shape[0]):
            largest = max(float(value[text].max()) for value in scores.values())
            for target in targets:
                for neuron, score in enumerate(scores[target.name][text].tolist()):
                    for threshold in thresholds:
                        if score / largest > threshold:
                            counts[target.kind, threshold][target.layer, neuron] += 1
    return counts


def test_metric_counts_equal_a_naive_loop():
    targets = make_targets()
    batches = [random_scores(targets, size, seed) for seed, size in enumerate([5, 1, 7])]
    metric = ActiveNeuronCounts(targets, THRESHOLDS)
    for scores in batches:
        metric.update(scores)
    result = metric.compute()
    expected = naive_counts(targets, batches, THRESHOLDS)
    assert result.num_texts == 13
    assert set(result.counts) == set(expected)
    for key, value in expected.items():
        assert result.counts[key].dtype == torch.int64
        assert torch.equal(result.counts[key], value), key
    assert any(value.sum() > 0 for value in expected.values())
    percentages = result.percentages()
    assert torch.allclose(percentages["output", 0.2], expected["output", 0.2].double() / 13 * 100)


def test_counts_round_trip_through_safetensors(tmp_path):
    targets = make_targets()
    metric = ActiveNeuronCounts(targets, (0.1, 0.01))
    metric.update(random_scores(targets, 4, seed=0))
    tensors = counts_to_tensors(metric.compute())
    assert set(tensors) == {"intermediate@0.1", "intermediate@0.01", "output@0.1", "output@0.01", "num_texts"}
    assert tensors["num_texts"].shape == () and tensors["num_texts"].dtype == torch.int64
    assert tensors["intermediate@0.1"].shape == (3, 6) and tensors["output@0.01"].dtype == torch.int64
    save_file(tensors, tmp_path / "counts.safetensors")
    loaded = counts_from_tensors(load_file(tmp_path / "counts.safetensors"))
    assert loaded.num_texts == 4
    for key, value in metric.compute().counts.items():
        assert torch.equal(loaded.counts[key], value)


def _count_half(rank: int, port: int, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        targets = make_targets()
        everything = random_scores(targets, 10, seed=3)
        metric = ActiveNeuronCounts(targets, THRESHOLDS)
        metric.update({name: value[rank::2] for name, value in everything.items()})
        result = metric.compute()
        if rank == 0:
            torch.save(counts_to_tensors(result), result_file)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_count_what_one_counts(tmp_path):
    result_file = str(tmp_path / "counts.pt")
    mp.spawn(_count_half, args=(free_port(), result_file), nprocs=2, join=True)
    targets = make_targets()
    metric = ActiveNeuronCounts(targets, THRESHOLDS)
    metric.update(random_scores(targets, 10, seed=3))
    expected = counts_to_tensors(metric.compute())
    gathered = torch.load(result_file)
    assert set(gathered) == set(expected)
    for key, value in expected.items():
        assert torch.equal(gathered[key], value), key


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5, -0.1])
def test_thresholds_outside_the_unit_interval_are_refused(threshold):
    for build in (lambda: ActiveNeuronCounts(make_targets(), (0.1, threshold)), lambda: active_masks({}, [threshold])):
        with pytest.raises(ValueError) as error:
            build()
        assert "\n" not in str(error.value) and f"{threshold:g}" in str(error.value)


def test_scores_must_cover_every_target():
    targets = make_targets()
    scores = random_scores(targets, 2, seed=0)
    scores.pop(targets[0].name)
    with pytest.raises(ValueError) as error:
        ActiveNeuronCounts(targets).update(scores)
    assert "\n" not in str(error.value) and targets[0].name in str(error.value)


def test_counts_file_layout_through_the_owner(tmp_path):
    """The writer's keys and dtypes, read back with safetensors itself and by the run reader."""
    intermediate = torch.tensor([[3, 0, 1], [2, 2, 0]], dtype=torch.int64)
    gate = torch.tensor([[1, 4], [0, 5]], dtype=torch.int64)
    down = torch.tensor([[0, 1], [1, 1]], dtype=torch.int64)
    write_summary(
        tmp_path,
        {
            "model": "m",
            "pooling": "eos",
            "dataset": "d",
            "split": "test",
            "text_side": "query",
            "thresholds": [0.1, 0.01, 2.5e-05],
            "kinds": {
                "intermediate": {"side": "intermediate", "num_layers": 2, "num_neurons": 3},
                "gate_proj": {"side": "intermediate", "num_layers": 2, "num_neurons": 2},
            },
        },
    )
    write_counts(
        tmp_path,
        {("intermediate", 0.1): intermediate, ("gate_proj", 0.01): gate, ("gate_proj", 2.5e-05): down},
        num_texts=6,
    )
    expected = {
        "intermediate@0.1": intermediate,
        "gate_proj@0.01": gate,
        "gate_proj@2.5e-05": down,
        "num_texts": torch.tensor(6, dtype=torch.int64),
    }
    stored = load_file(tmp_path / "counts.safetensors")
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        assert stored[key].dtype == torch.int64 and torch.equal(stored[key], value), key
    run = AttributionRun.load(tmp_path)
    assert run.num_texts == 6 and run.kinds == ["gate_proj", "intermediate"]
    assert (run.counts_at("gate_proj", 2.5e-05) == down.numpy()).all()
    assert (run.counts_at("intermediate", 0.1) == intermediate.numpy()).all()
    with pytest.raises(KeyError):
        run.counts_at("intermediate", 0.2)
    counts, num_texts = split_counts_tensors(stored)
    assert num_texts == 6 and counts.keys() == {("intermediate", 0.1), ("gate_proj", 0.01), ("gate_proj", 2.5e-05)}
