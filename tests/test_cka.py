"""Linear and debiased CKA from d x d cross-products against literal n x n formulas."""

import math

import pytest
import torch

from dkacq.compare.cka import cka, debiased_cka, layer_statistics, linear_cka, pair_products


def gram_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al.'s definition, literally: HSIC = tr(K H L H) with n x n Gram matrices."""
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1 / n, dtype=torch.float64)
    gram_x, gram_y = x.double() @ x.double().T, y.double() @ y.double().T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h)

    return float(hsic(gram_x, gram_y) / torch.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y)))


def song_unbiased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Song et al. (2012), eq. 5, on the raw (uncentred) linear Gram matrices with zeroed diagonals."""
    n = len(x)
    one = torch.ones(n, 1, dtype=torch.float64)

    def tilde(a):
        g = a.double() @ a.double().T
        return g - torch.diag(torch.diag(g))

    def hsic(k, m):
        return float(
            (
                torch.trace(k @ m)
                + (one.T @ k @ one) * (one.T @ m @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one.T @ k @ m @ one)
            ).squeeze()
            / (n * (n - 3))
        )

    gram_x, gram_y = tilde(x), tilde(y)
    return hsic(gram_x, gram_y) / math.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y))


@pytest.fixture(scope="module")
def pair():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 12, generator=generator) + 3.0  # far from centred: centring matters
    mix = torch.randn(12, 7, generator=generator)
    y = torch.tanh(x @ mix) + 0.5 * torch.randn(60, 7, generator=generator)
    return x, y


def test_equals_the_gram_formula_and_chunking_changes_nothing(pair):
    x, y = pair
    expected = gram_cka(x, y)
    assert 0.05 < expected < 0.95
    for chunk in (7, 60, 4096):
        assert cka(x, y, chunk=chunk)[0] == pytest.approx(expected, rel=1e-10)


def test_debiased_equals_the_literal_unbiased_estimator(pair):
    x, y = pair
    expected = song_unbiased_cka(x, y)
    assert cka(x, y, chunk=11)[1] == pytest.approx(expected, rel=1e-9)
    assert abs(expected - gram_cka(x, y)) > 0.01  # the two estimators differ at this n


def test_invariant_to_rotation_and_isotropic_scale(pair):
    x, _ = pair
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    rotated = (x.double() @ rotation * 3.7 + 5.0).float()
    assert cka(x, rotated) == pytest.approx((1.0, 1.0), abs=1e-6)
    assert cka(x, x) == pytest.approx((1.0, 1.0), abs=1e-12)
    anisotropic = x * torch.linspace(0.1, 10, 12)
    assert cka(x, anisotropic)[0] < 0.99  # not invariant to that: the test can fail


def test_unrelated_representations_debias_towards_zero():
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 64, generator=generator), torch.randn(40, 64, generator=generator)
    biased, debiased = cka(x, y)
    assert biased > 0.5 and abs(debiased) < 0.1


def test_mean_cosine_where_widths_match(pair):
    x, y = pair
    stats_x = layer_statistics(x)
    same = pair_products(x, -2 * x, stats_x, layer_statistics(-2 * x), chunk=13)
    assert same.mean_cosine == pytest.approx(-1.0)
    expected = torch.nn.functional.cosine_similarity(x, x + 1, dim=1).mean()
    shifted = pair_products(x, x + 1, stats_x, layer_statistics(x + 1))
    assert shifted.mean_cosine == pytest.approx(float(expected), rel=1e-6)
    assert linear_cka(shifted, stats_x, layer_statistics(x + 1)) == pytest.approx(1.0)
    assert pair_products(x, y, stats_x, layer_statistics(y)).mean_cosine is None


def test_bad_shapes_are_refused(pair):
    x, y = pair
    with pytest.raises(ValueError, match="same texts"):
        pair_products(x, y[:-1], layer_statistics(x), layer_statistics(y[:-1]))
    tiny = x[:3]
    products = pair_products(tiny, tiny, layer_statistics(tiny), layer_statistics(tiny))
    with pytest.raises(ValueError, match="at least 4"):
        debiased_cka(products, layer_statistics(tiny), layer_statistics(tiny))
