"""Negative sampling and the N-passage draws."""

import itertools
import random

import pytest
import torch

from dkacq.data.sampling import draw_passage_orders, sample_negatives


def test_no_negatives_drops_the_example_and_draws_nothing():
    rng = random.Random(42)
    assert sample_negatives([], rng) is None
    assert rng.getstate() == random.Random(42).getstate()


def test_few_negatives_are_drawn_with_replacement_many_without():
    oracle = random.Random(42)
    expected_few = oracle.choices(["a", "b"], k=4)
    expected_many = oracle.sample(["a", "b", "c", "d", "e"], 4)
    rng = random.Random(42)
    assert sample_negatives(["a", "b"], rng) == expected_few
    assert sample_negatives(["a", "b", "c", "d", "e"], rng) == expected_many
    assert expected_few == ["b", "a", "a", "a"]
    assert expected_many == ["a", "e", "c", "b"]


def test_exactly_four_negatives_are_a_permutation():
    assert sorted(sample_negatives(["a", "b", "c", "d"], random.Random(0))) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("num_passages", [2, 3, 4, 5])
def test_rows_are_the_positive_and_distinct_negatives(num_passages):
    columns, labels = draw_passage_orders(1000, num_passages, torch.Generator().manual_seed(0))
    assert columns.shape == (1000, num_passages) and labels.shape == (1000,)
    assert columns.dtype == labels.dtype == torch.long
    assert ((columns == 0).sum(dim=1) == 1).all()
    assert (columns[torch.arange(1000), labels] == 0).all()
    assert ((columns >= 0) & (columns <= 4)).all()
    assert (columns.sort(dim=1).values.diff(dim=1) > 0).all()


def _chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_positive_position_and_negative_choice_are_uniform():
    columns, labels = draw_passage_orders(50_000, 5, torch.Generator().manual_seed(1))
    # df = 4: the 0.999 quantile of chi-square is 18.5.
    assert _chi_square(torch.bincount(labels, minlength=5).double()) < 18.5
    columns, _ = draw_passage_orders(50_000, 2, torch.Generator().manual_seed(2))
    negatives = columns.max(dim=1).values
    assert _chi_square(torch.bincount(negatives, minlength=5)[1:].double()) < 18.5


def test_every_arrangement_is_equally_likely():
    columns, _ = draw_passage_orders(72_000, 3, torch.Generator().manual_seed(3))
    arrangements = {row: i for i, row in enumerate(p for p in itertools.permutations(range(5), 3) if 0 in p)}
    assert len(arrangements) == 36
    codes = torch.tensor([arrangements[tuple(row)] for row in columns.tolist()])
    counts = torch.bincount(codes, minlength=36).double()
    # df = 35: the 0.999 quantile of chi-square is 66.6.
    assert (counts > 0).all() and _chi_square(counts) < 66.6


def test_same_seed_same_draws_other_seed_other_draws():
    first = draw_passage_orders(500, 4, torch.Generator().manual_seed(42))
    again = draw_passage_orders(500, 4, torch.Generator().manual_seed(42))
    other = draw_passage_orders(500, 4, torch.Generator().manual_seed(43))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_no_examples():
    columns, labels = draw_passage_orders(0, 5, torch.Generator().manual_seed(0))
    assert columns.shape == (0, 5) and labels.shape == (0,)


@pytest.mark.parametrize("num_passages", [0, 1, 6])
def test_num_passages_out_of_range(num_passages):
    with pytest.raises(ValueError, match="num_passages") as info:
        draw_passage_orders(10, num_passages, torch.Generator().manual_seed(0))
    assert "\n" not in str(info.value)
