"""Linear CKA from d x d cross-products (``dkacq.compare.cka``) against the n x n Gram form, in one run.

For each number of texts, random representations ``X`` ``[n, d_x]`` and ``Y = tanh(X M) + noise``
``[n, d_y]`` are compared both ways in float64 on the CPU: the cross-product form (row chunks,
``||Xc^T Yc||^2``) and the Gram form (``<HKH, HLH> / (||HKH|| ||HLH||)``, what a naive implementation
builds). Prints the seconds of each, their ratio, the largest accumulator each needs, and the two
values (which must agree). Run: ``python benchmarks/cka_forms.py [--texts 1000 4000 8000 --dim 384]``.
"""

import argparse
import time

import torch

from dkacq.compare.cka import cka


def gram_form(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    k, m = x @ x.T, y @ y.T  # centring the features centres the Gram matrices: H K H
    return float((k * m).sum() / (k.norm() * m.norm()))


def timed(function, *args) -> tuple[float, float]:
    started = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, nargs="+", default=[1000, 4000, 8000])
    parser.add_argument("--dim", type=int, default=384)
    options = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d = {options.dim}")
    print("texts  cross-product s  Gram s  Gram/cross  cross MiB  Gram MiB  CKA (cross)  CKA (Gram)")
    for n in options.texts:
        x = torch.randn(n, options.dim, generator=generator)
        y = torch.tanh(x @ torch.randn(options.dim, options.dim, generator=generator) / options.dim**0.5)
        y += 0.5 * torch.randn(n, options.dim, generator=generator)
        cross_seconds, (value, _) = timed(cka, x, y)
        gram_seconds, gram_value = timed(gram_form, x, y)
        print(
            f"{n:5d}  {cross_seconds:15.3f}  {gram_seconds:6.3f}  {gram_seconds / cross_seconds:10.1f}  "
            f"{3 * options.dim**2 * 8 / 2**20:9.1f}  {2 * n * n * 8 / 2**20:8.1f}  {value:11.8f}  {gram_value:10.8f}"
        )


if __name__ == "__main__":
    main()
