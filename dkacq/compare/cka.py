"""Linear CKA between two representations of the same texts, from d x d cross-products. Pure torch.

Linear CKA (Kornblith et al. 2019) of ``X`` ``[n, d_x]`` and ``Y`` ``[n, d_y]`` (rows: the same texts)::

    CKA(X, Y) = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)        Xc, Yc: column-centred

equals the Gram-matrix form ``<H K H, H L H> / (||H K H||_F ||H L H||_F)`` with ``K = X X^T``,
``L = Y Y^T`` (n x n), but needs only d x d matrices: memory grows with the widths, not with the
number of texts, so 50,000 texts x 4,096 dimensions take 128 MB per accumulator instead of a 20 GB
Gram matrix, and ``n d_x d_y`` multiply-adds instead of ``n^2 (d_x + d_y)``.

**Debiased CKA** (Nguyen et al. 2021) replaces each HSIC by Song et al.'s (2012) unbiased estimator,
whose bias at small ``n`` otherwise pushes CKA of unrelated representations well above 0. In feature
space (as Kornblith et al.'s reference code writes it), with ``r_i = ||xc_i||^2`` and ``s_i = ||yc_i||^2``::

    HSIC_u(X, Y) ∝ ||Xc^T Yc||_F^2 - n/(n-2) sum_i r_i s_i + (sum_i r_i)(sum_i s_i) / ((n-1)(n-2))

so it needs, beyond the d x d products, one number per text and layer (``r``), never a pair of texts.

**Exactness.** Centring needs the column means, so a layer is read twice: once for its mean (and its
own statistics), once per partner layer for the cross-product, each row chunk centred and accumulated in
float64 whatever the stored dtype (float32 caches, float16/bfloat16 ones) and on whatever device the
chunks are sent to (:data:`CHUNK` rows at a time). Centring before accumulating avoids the cancellation
of ``X^T Y - n m_x m_y^T`` when the means are large (Llama's hidden states).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK = 4096
"""Rows centred and accumulated at once: bounds the float64 copies of the inputs on the device."""


@dataclass(frozen=True)
class LayerStatistics:
    """What one representation contributes to every CKA it takes part in."""

    mean: Tensor
    """float64 ``[d]``: the column means."""
    row_norms: Tensor
    """float64 ``[n]``: ``||xc_i||^2`` of every centred row (for the debiased estimator)."""
    self_product: float
    """``||Xc^T Xc||_F^2``."""

    @property
    def num_texts(self) -> int:
        return len(self.row_norms)


def _chunks(x: Tensor, device: torch.device | str | None, chunk: int):
    for start in range(0, len(x), chunk):
        yield x[start : start + chunk].to(device or x.device, torch.float64)


def layer_statistics(x: Tensor, device: torch.device | str | None = None, chunk: int = CHUNK) -> LayerStatistics:
    """The mean, centred row norms and ``||Xc^T Xc||_F^2`` of ``x`` ``[n, d]`` (two passes over its rows)."""
    if x.dim() != 2 or len(x) < 2:
        raise ValueError(f"expected a [texts, dim] matrix of at least 2 texts, got shape {tuple(x.shape)}")
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=device or x.device)
    for rows in _chunks(x, device, chunk):
        total += rows.sum(0)
    mean = total / len(x)
    product = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=mean.device)
    norms = []
    for rows in _chunks(x, device, chunk):
        rows -= mean
        product.addmm_(rows.T, rows)
        norms.append((rows * rows).sum(1))
    return LayerStatistics(mean, torch.cat(norms), float((product * product).sum()))


@dataclass(frozen=True)
class PairProducts:
    """The cross terms of two representations of the same texts."""

    cross_product: float
    """``||Xc^T Yc||_F^2``."""
    mean_cosine: float | None
    """Mean over texts of the cosine of a text's two raw (uncentred) vectors; None when the widths differ."""


def pair_products(
    x: Tensor,
    y: Tensor,
    stats_x: LayerStatistics,
    stats_y: LayerStatistics,
    device: torch.device | str | None = None,
    chunk: int = CHUNK,
) -> PairProducts:
    """``||Xc^T Yc||_F^2`` accumulated over row chunks in float64, and the mean cosine where widths match."""
    if len(x) != len(y):
        raise ValueError(f"the two representations hold {len(x)} and {len(y)} texts; CKA needs the same texts")
    cross = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=stats_x.mean.device)
    same_width = x.shape[1] == y.shape[1]
    cosine_sum = 0.0
    for rows_x, rows_y in zip(_chunks(x, device, chunk), _chunks(y, device, chunk)):
        if same_width:
            cosine_sum += float(torch.nn.functional.cosine_similarity(rows_x, rows_y, dim=1, eps=1e-12).sum())
        cross.addmm_((rows_x - stats_x.mean).T, rows_y - stats_y.mean)
    return PairProducts(float((cross * cross).sum()), cosine_sum / len(x) if same_width else None)


def linear_cka(products: PairProducts, stats_x: LayerStatistics, stats_y: LayerStatistics) -> float:
    """Linear CKA from the d x d terms; NaN where one representation is constant (no variance)."""
    denominator = (stats_x.self_product * stats_y.self_product) ** 0.5
    return products.cross_product / denominator if denominator > 0 else float("nan")


def _unbiased(product: float, rows_x: Tensor, rows_y: Tensor) -> float:
    """Song et al.'s unbiased HSIC estimator of linear kernels, times ``n (n - 3)`` (which cancels in CKA)."""
    n = len(rows_x)
    return (
        product - n / (n - 2) * float(rows_x @ rows_y) + float(rows_x.sum()) * float(rows_y.sum()) / ((n - 1) * (n - 2))
    )


def debiased_cka(products: PairProducts, stats_x: LayerStatistics, stats_y: LayerStatistics) -> float:
    """Debiased linear CKA (unbiased HSIC estimates); needs at least 4 texts. Its estimates of the self
    terms can be negative for tiny samples of near-constant vectors: NaN then."""
    if stats_x.num_texts < 4:
        raise ValueError(f"debiased CKA needs at least 4 texts, got {stats_x.num_texts}")
    cross = _unbiased(products.cross_product, stats_x.row_norms, stats_y.row_norms)
    self_x = _unbiased(stats_x.self_product, stats_x.row_norms, stats_x.row_norms)
    self_y = _unbiased(stats_y.self_product, stats_y.row_norms, stats_y.row_norms)
    return cross / (self_x * self_y) ** 0.5 if self_x > 0 and self_y > 0 else float("nan")


def cka(x: Tensor, y: Tensor, device: torch.device | str | None = None, chunk: int = CHUNK) -> tuple[float, float]:
    """``(linear CKA, debiased CKA)`` of two representations ``[n, d_x]``, ``[n, d_y]`` of the same texts."""
    stats_x, stats_y = layer_statistics(x, device, chunk), layer_statistics(y, device, chunk)
    products = pair_products(x, y, stats_x, stats_y, device, chunk)
    return linear_cka(products, stats_x, stats_y), debiased_cka(products, stats_x, stats_y)
