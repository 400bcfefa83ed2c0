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
from dkacq.formats.counts import (
    AttributionRun,
    active_kind,
    split_counts_tensors,
    unpack_active,
    write_counts,
    write_summary,
)

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
        metric = ActiveNeuronCounts(targets, THRESHOLDS, text_capacity=10)
        positions = list(range(rank, 10, 2))
        metric.update({name: value[positions] for name, value in everything.items()}, positions)
        result = metric.compute()
        if rank == 0:
            tensors = counts_to_tensors(result)
            tensors.update(
                {f"per_text/{kind}@{threshold}": table for (kind, threshold), table in result.per_text.items()}
            )
            torch.save({**tensors, "counted": result.counted}, result_file)
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
    metric = ActiveNeuronCounts(targets, THRESHOLDS, text_capacity=10)
    metric.update(random_scores(targets, 10, seed=3))
    result = metric.compute()
    expected = counts_to_tensors(result)
    expected.update({f"per_text/{kind}@{threshold}": table for (kind, threshold), table in result.per_text.items()})
    expected["counted"] = torch.ones(10, dtype=torch.int32)
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


def naive_per_text(targets: list[Target], scores: dict[str, torch.Tensor], thresholds) -> dict:
    """Text by text, module by module: how many of the module's neurons exceed the threshold."""
    num_texts = next(iter(scores.values())).shape[0]
    tables = {}
    for target in targets:
        for threshold in thresholds:
            tables.setdefault((target.kind, threshold), torch.zeros(num_texts, 3, dtype=torch.int32))
    for text in range(num_texts):
        largest = max(float(value[text].max()) for value in scores.values())
        for target in targets:
            for threshold in thresholds:
                active = sum(score / largest > threshold for score in scores[target.name][text].tolist())
                tables[target.kind, threshold][text, target.layer] = active
    return tables


def test_per_text_counts_equal_a_naive_loop_in_text_order():
    """Batches arrive out of text order (as after a resume or on several processes): rows follow positions."""
    targets = make_targets()
    everything = random_scores(targets, 9, seed=5)
    metric = ActiveNeuronCounts(targets, THRESHOLDS, text_capacity=9)
    for positions in ([4, 0, 7], [8], [1, 2, 3, 5, 6]):
        metric.update({name: value[positions] for name, value in everything.items()}, positions)
    result = metric.compute()
    expected = naive_per_text(targets, everything, THRESHOLDS)
    assert result.counted.tolist() == [1] * 9 and result.num_texts == 9
    assert set(result.per_text) == set(expected) | {(active_kind(kind), threshold) for kind, threshold in expected}
    for target in targets:  # which neurons, bit-packed: the naive masks
        for threshold in THRESHOLDS:
            packed = result.per_text[active_kind(target.kind), threshold][:, target.layer].numpy()
            scores = everything[target.name]
            largest = torch.stack([value.amax(dim=1) for value in everything.values()]).amax(dim=0)
            mask = (scores / largest[:, None] > threshold).numpy()
            assert (unpack_active(packed, target.num_neurons) == mask).all(), (target.name, threshold)
    for key, table in expected.items():
        assert result.per_text[key].dtype == torch.int32
        assert torch.equal(result.per_text[key], table), key
        # the per-text table's column sums are the per-neuron counts' row sums
        assert torch.equal(table.sum(dim=0).long(), result.counts[key].sum(dim=1)), key
    assert any(table.sum() > 0 for table in expected.values())


def test_per_text_positions_default_to_counting_order_and_are_checked():
    targets = make_targets()
    scores = random_scores(targets, 4, seed=1)
    metric = ActiveNeuronCounts(targets, THRESHOLDS, text_capacity=6)
    metric.update({name: value[:3] for name, value in scores.items()})
    metric.update({name: value[3:] for name, value in scores.items()})
    result = metric.compute()
    assert result.counted.tolist() == [1, 1, 1, 1, 0, 0]
    for key, table in naive_per_text(targets, scores, THRESHOLDS).items():
        assert torch.equal(result.per_text[key][:4], table) and not result.per_text[key][4:].any()
    with pytest.raises(ValueError, match=r"position in \[0, 6\)"):
        metric.update({name: value[:1] for name, value in scores.items()}, [6])
    assert ActiveNeuronCounts(targets, THRESHOLDS).compute().per_text is None


def test_counts_file_with_per_text_tables_and_without(tmp_path):
    """New keys beside the old ones; the old keys read as before; a file without per-text tables reads too."""
    from dkacq.formats.counts import PerTextCounts, split_per_text_tensors

    targets = make_targets()
    scores = random_scores(targets, 4, seed=2)
    metric = ActiveNeuronCounts(targets, THRESHOLDS, text_capacity=4)
    metric.update(scores)
    result = metric.compute()
    keys = ["k0", "k1", "k2", "k3"]
    summary = {
        "model": "m",
        "pooling": "mean",
        "dataset": "d",
        "split": "test",
        "text_side": "query",
        "thresholds": list(THRESHOLDS),
        "kinds": {
            "intermediate": {"side": "intermediate", "num_layers": 3, "num_neurons": 6},
            "output": {"side": "output", "num_layers": 3, "num_neurons": 4},
        },
    }
    new, old = tmp_path / "new", tmp_path / "old"
    for folder in (new, old):
        write_summary(folder, summary)
    write_counts(new, result.counts, 4, PerTextCounts(keys, result.per_text))
    write_counts(old, result.counts, 4)
    stored = load_file(new / "counts.safetensors")
    assert set(stored) == {
        "intermediate@0.1",
        "intermediate@0.2",
        "output@0.1",
        "output@0.2",
        "num_texts",
        "per_text/intermediate@0.1",
        "per_text/intermediate@0.2",
        "per_text/output@0.1",
        "per_text/output@0.2",
        "per_text/active:intermediate@0.1",
        "per_text/active:intermediate@0.2",
        "per_text/active:output@0.1",
        "per_text/active:output@0.2",
    }
    assert stored["per_text/active:intermediate@0.1"].dtype == torch.uint8  # 6 neurons in one byte
    assert stored["per_text/active:intermediate@0.1"].shape == (4, 3, 1)
    counts, num_texts = split_counts_tensors(stored)
    assert num_texts == 4 and set(counts) == set(result.counts)
    assert set(split_per_text_tensors(stored)) == set(result.per_text)
    run, plain = AttributionRun.load(new), AttributionRun.load(old)
    assert run.has_per_text and run.text_keys == tuple(keys)
    assert (run.per_text_at("output", 0.2) == result.per_text["output", 0.2].numpy()).all()
    assert (run.per_text_by_key("output", 0.2, ["k2", "k0"]) == result.per_text["output", 0.2].numpy()[[2, 0]]).all()
    assert (plain.counts_at("output", 0.2) == run.counts_at("output", 0.2)).all()
    assert run.has_active_sets and not plain.has_active_sets
    assert (run.active_sets("output", 0.2).sum(-1) == result.per_text["output", 0.2].numpy()).all()
    assert not plain.has_per_text and plain.text_keys is None
    with pytest.raises(KeyError, match="no per-text counts"):
        plain.per_text_at("output", 0.2)
    with pytest.raises(ValueError, match="3 texts, the counts 4"):
        write_counts(new, result.counts, 4, PerTextCounts(keys[:3], {}))


def test_segments_carry_per_text_rows(tmp_path):
    from dkacq.formats.counts import PerTextCounts, Segment, join_per_text, read_segments, write_segment

    table = torch.arange(6, dtype=torch.int32).view(3, 2)
    write_segment(
        tmp_path,
        "a",
        Segment(
            {("output", 0.1): torch.ones(2, 3, dtype=torch.int64)},
            3,
            ["x", "y", "z"],
            {"i": 1},
            {("output", 0.1): table},
        ),
    )
    write_segment(tmp_path, "b", Segment({("output", 0.1): torch.ones(2, 3, dtype=torch.int64)}, 1, ["w"], {"i": 1}))
    first, second = read_segments(tmp_path)
    assert first.texts == ["x", "y", "z"] and torch.equal(first.per_text[("output", 0.1)], table)
    assert second.per_text is None and second.per_text_counts() is None
    joined = join_per_text(
        [first.per_text_counts(), PerTextCounts(["w"], {("output", 0.1): torch.tensor([[9, 9]], dtype=torch.int32)})]
    )
    ordered = joined.ordered(["w", "z", "x", "y"])
    assert ordered.texts == ["w", "z", "x", "y"]
    assert ordered.tables["output", 0.1].tolist() == [[9, 9], [4, 5], [0, 1], [2, 3]]
    with pytest.raises(ValueError, match="share a text"):
        join_per_text([first.per_text_counts(), first.per_text_counts()])
