"""Neuron overlap of two runs: Jaccard per text and of frequent sets, bootstrap intervals, exact random level."""

import itertools

import numpy as np
import pytest
import torch

from dkacq.formats.counts import pack_active, unpack_active
from dkacq.report.neuron_overlap import expected_random_jaccard, jaccard, layer_overlap


def test_packing_is_numpys_little_bit_order():
    active = torch.rand(3, 2, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_active(active)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, 2)
    assert np.array_equal(packed.numpy(), np.packbits(active.numpy(), axis=-1, bitorder="little"))
    assert np.array_equal(unpack_active(packed.numpy(), 13), active.numpy())


@pytest.mark.parametrize("neurons, a, b", [(6, 2, 3), (5, 4, 4), (7, 0, 3), (4, 4, 4)])
def test_random_level_equals_enumerating_every_pair_of_sets(neurons, a, b):
    values = [
        len(set(x) & set(y)) / len(set(x) | set(y))
        for x in itertools.combinations(range(neurons), a)
        for y in itertools.combinations(range(neurons), b)
    ]
    assert expected_random_jaccard(neurons, a, b) == pytest.approx(sum(values) / len(values), rel=1e-12)


def test_hand_made_sets():
    a = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=bool)
    b = np.array([[1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=bool)
    assert np.allclose(jaccard(a, b), [1 / 2, 1, np.nan, 2 / 4], equal_nan=True)
    result = layer_overlap(a, b, share=0.5, resamples=200)
    assert result.texts == 3 and result.per_text.value == pytest.approx((0.5 + 1 + 0.5) / 3)
    # active in at least 2 of 4 texts: a -> {0, 1, 2}, b -> {0, 2}
    assert result.frequent_sizes == (3, 2) and result.frequent.value == pytest.approx(2 / 3)
    assert result.per_text.low <= result.per_text.value <= result.per_text.high
    assert result.frequent.random == pytest.approx(expected_random_jaccard(4, 3, 2))
    expected_random = np.mean(
        [expected_random_jaccard(4, 2, 1), expected_random_jaccard(4, 2, 2), expected_random_jaccard(4, 3, 3)]
    )
    assert result.per_text.random == pytest.approx(expected_random)


def test_identical_runs_overlap_fully_and_independent_ones_at_the_random_level():
    rng = np.random.default_rng(0)
    a = rng.random((200, 300)) < 0.2
    same = layer_overlap(a, a.copy(), resamples=100)
    assert (same.per_text.value, same.per_text.low, same.per_text.high) == (1.0, 1.0, 1.0)
    b = rng.random((200, 300)) < 0.3
    independent = layer_overlap(a, b, share=0.2, resamples=300)
    assert independent.per_text.value == pytest.approx(independent.per_text.random, abs=0.01)
    assert independent.per_text.low < independent.per_text.random < independent.per_text.high
    planted = b.copy()
    planted[:, :60] = a[:, :60]  # share a fifth of the neurons' activity
    assert layer_overlap(a, planted, resamples=100).per_text.low > independent.per_text.high
    with pytest.raises(ValueError, match="shapes"):
        layer_overlap(a, b[:, :10])
