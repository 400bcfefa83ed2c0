"""What checking a cache file's sha256 on its first read (``data.verify_cache``, the default) adds to reading it.

Writes a synthetic cache of one layer (``--rows`` vectors of ``--dim`` float32, 150 MB by default) with the
writer extraction uses, then reads the layer as a probe does (the file's tensors, every value touched
once) from the page cache, ``--repeats`` times each without and with the check (the process's memory of
checked files cleared before each), and prints the best times and their ratio, measured in this run.
Run: ``python benchmarks/cache_verify.py [--rows N --dim D --repeats K]``.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dkacq.encoders import cache
from dkacq.encoders.cache import EmbeddingCache, LayerFileWriter, layer_file, publish, staging_folder


def build(folder: Path, rows: int, dim: int) -> EmbeddingCache:
    staging = staging_folder(folder)
    queries = rows // 4
    writer = LayerFileWriter(layer_file(staging, 0), queries, rows - queries, dim, "float32")
    for count in (queries, rows - queries):
        for start in range(0, count, 4096):
            writer.append(torch.randn(min(4096, count - start), dim))
    written = {layer_file(staging, 0).name: writer.close()}
    index = {"train.query": torch.zeros(1, dtype=torch.long), "train.passages": torch.zeros(1, 5, dtype=torch.long)}
    return publish(staging, folder, {"num_hidden_states": 1, "hidden_size": dim}, index, written)


def read(opened: EmbeddingCache) -> float:
    """Seconds to read layer 0 and touch every value, as fitting a probe on it does."""
    cache._VERIFIED.clear()
    started = time.perf_counter()
    queries, passages = opened.layer(0)
    float(queries.sum() + passages.sum())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        built = build(Path(root) / "cache", args.rows, args.dim)
        size = layer_file(built.folder, 0).stat().st_size
        plain, checked = EmbeddingCache(built.folder, built.manifest, verify=False), built
        read(plain)  # into the page cache
        times = {"without": [], "with": []}
        for _ in range(args.repeats):
            times["without"].append(read(plain))
            times["with"].append(read(checked))
    best = {key: min(values) for key, values in times.items()}
    print(f"layer file: {size / 1e6:.0f} MB ({args.rows:,} x {args.dim} float32), read from the page cache")
    print(f"read and touch, no checksum: {best['without'] * 1000:.0f} ms ({size / best['without'] / 1e9:.2f} GB/s)")
    print(f"read and touch, sha256 first: {best['with'] * 1000:.0f} ms ({size / best['with'] / 1e9:.2f} GB/s)")
    print(
        f"ratio with/without: {best['with'] / best['without']:.2f}; the check once costs {best['with'] - best['without']:.3f} s"
    )


if __name__ == "__main__":
    main()
