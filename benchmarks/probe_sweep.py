"""Time and peak memory of one probe setting's cells (every head x every N) per layer: each cell reading
its layer file for itself (before) against every cell of a layer from one read (after).

Writes a synthetic embedding cache in the real format (random vectors, ``dkacq.encoders.cache``'s
``LayerFileWriter`` and ``publish``, a request and manifest built by hand, no model) shaped like Llama on
NQ, scaled by the flags (default 60,000 train + 6,000 test examples, each with its own query and five
passages, 4096 dims, bfloat16). Then, each in a fresh process so that its peak resident memory is its
own, it fits the cells of every N through ``dkacq.commands.probe.fit_settings`` (the sweep's path: the
real CLIs, trainers, checkpoints, tests and results rows; 1 epoch each at the study's batch, 32,768):

- before: ``share_layers=False``, every cell in the order a sweep ran them before, its data module
  reading the layer for its fit and again for its test;
- after: layer by layer, each layer file read once for all heads and N.

It prints the time per layer, the layer reads, the peak RSS of each process (and above a process that
only imports the same modules), their ratios from this one run, and whether the two results tables are
identical. Run: ``python benchmarks/probe_sweep.py [--train N --test N --dim D --layers L]``, or
``--small`` for a quick check. The layer files are read from the page cache here (just written); a
cold disk makes each read, and so what "after" saves, larger.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADS = ("concat", "passage_only", "query_aware")
NUM_PASSAGES = (2, 3, 4, 5)
BATCH = 32_768
DATASET, ENCODER = "nq-synthetic", "llama"
CHUNK = 4096


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def request(args) -> dict:
    """What the synthetic cache was "built from": stands in for ``ProbeDataModule.cache_request``."""
    from dkacq.encoders.cache import CACHE_FORMAT

    return {
        "cache_format": CACHE_FORMAT,
        "synthetic": {"train": args.train, "test": args.test, "dim": args.dim, "layers": args.layers, "seed": 0},
        "weights": {"query": {"model": "synthetic:random"}, "passage": {"model": "synthetic:random"}},
        "storage_dtype": args.dtype,
        "extraction_precision": "synthetic",
        "data_fingerprint": f"synthetic-{args.train}-{args.test}",
    }


def write_cache(folder: Path, args) -> None:
    """Random rows streamed into every layer file (one chunk in memory), then the index and manifest."""
    import torch

    from dkacq.encoders.cache import LayerFileWriter, layer_file, publish, staging_folder

    examples = args.train + args.test
    queries, passages = examples, 5 * examples
    staging = staging_folder(folder)
    generator = torch.Generator().manual_seed(0)
    written = {}
    for layer in range(args.layers):
        writer = LayerFileWriter(layer_file(staging, layer), queries, passages, args.dim, args.dtype)
        for count in (queries, passages):
            for start in range(0, count, CHUNK):
                writer.append(torch.randn(min(CHUNK, count - start), args.dim, generator=generator))
        written[writer.path.name] = writer.close()
    rows = torch.arange(passages).view(examples, 5)
    index = {
        "train.query": torch.arange(args.train),
        "train.passages": rows[: args.train].contiguous(),
        "test.query": torch.arange(args.train, examples),
        "test.passages": rows[args.train :].contiguous(),
    }
    manifest = dict(
        request(args),
        num_hidden_states=args.layers,
        hidden_size=args.dim,
        num_queries=queries,
        num_passages=passages,
    )
    publish(staging, folder, manifest, index, written)


def fit(folder: Path, run_dir: Path, share_layers: bool, args) -> dict:
    """Every cell of the setting through ``fit_settings``; the seconds, layer reads and seconds reading."""
    from dkacq.commands import probe
    from dkacq.datamodules.probe import ProbeDataModule
    from dkacq.encoders.cache import EmbeddingCache

    fixed = request(args)
    ProbeDataModule.cache_request = lambda self: fixed  # no probe set or model to hash
    ProbeDataModule.num_hidden_states = property(lambda self: args.layers)  # no model config to read
    reads = {"count": 0, "seconds": 0.0}
    original = EmbeddingCache.layer

    def timed_layer(cache, layer):
        start = time.perf_counter()
        vectors = original(cache, layer)
        reads["count"] += 1
        reads["seconds"] += time.perf_counter() - start
        return vectors

    EmbeddingCache.layer = timed_layer
    start = time.perf_counter()
    clis = [
        probe.build(
            {
                "trainer": {
                    "max_epochs": 1,
                    "accelerator": "cpu",
                    "logger": False,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                },
                "data": {
                    "encoder": ENCODER,
                    "dataset": DATASET,
                    "source": "local",
                    "cache_dir": str(folder.parent.parent),
                    "cache_dtype": args.dtype,
                    "num_passages": n,
                    "batch_size": BATCH,
                },
                "heads": list(args.heads),
                "results": {"run_dir": str(run_dir)},
            }
        )
        for n in args.num_passages
    ]
    probe.fit_settings(clis, share_layers=share_layers)
    return {"seconds": time.perf_counter() - start, "reads": reads["count"], "read_seconds": reads["seconds"]}


NOT_NUMBERS = ("config", "fit_seconds")
"""Columns that differ between two runs of the same cells: the run's config file (named after its text,
which holds ``results.run_dir``) and a fit's wall time."""


def numbers(path: Path) -> list[dict]:
    """The rows of a results table without :data:`NOT_NUMBERS`, by ``cell_id`` (the runs' orders differ)."""
    import csv

    with open(path, newline="") as file:
        rows = [{key: value for key, value in row.items() if key not in NOT_NUMBERS} for row in csv.DictReader(file)]
    return sorted(rows, key=lambda row: row["cell_id"])


def step(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if args.step == "write":
        write_cache(args.folder, args)
        result = {}
    elif args.step == "baseline":
        from dkacq.commands import probe  # noqa: F401  the same modules as a fit, nothing run

        result = {}
    else:
        result = fit(args.folder, args.run_dir, args.step == "after", args)
    return result | {"peak_gib": peak_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=60_000, help="training examples (NQ: 58,880)")
    parser.add_argument("--test", type=int, default=6_000, help="test examples (NQ's dev set: 6,515)")
    parser.add_argument("--dim", type=int, default=4096, help="hidden size (Llama-2-7B: 4096)")
    parser.add_argument("--layers", type=int, default=2, help="hidden states in the cache, all probed (Llama: 33)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--heads", nargs="+", default=list(HEADS))
    parser.add_argument("--num-passages", type=int, nargs="+", default=list(NUM_PASSAGES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each fitting process")
    parser.add_argument("--small", action="store_true", help="a quick run: 2,000 + 200 examples, 256 dims")
    parser.add_argument("--step", choices=["write", "baseline", "before", "after"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.train, args.test, args.dim = 2_000, 200, 256
    if args.step:
        print(json.dumps(step(args)))
        return

    shape = [
        f"--train={args.train}",
        f"--test={args.test}",
        f"--dim={args.dim}",
        f"--layers={args.layers}",
        f"--dtype={args.dtype}",
        f"--threads={args.threads}",
        "--heads",
        *args.heads,
        "--num-passages",
        *map(str, args.num_passages),
    ]
    with tempfile.TemporaryDirectory(prefix="probe-sweep-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "cache" / DATASET / ENCODER

        def run(name: str) -> dict:
            command = [sys.executable, str(Path(__file__).resolve()), *shape, f"--step={name}", f"--folder={folder}"]
            command.append(f"--run-dir={tmp / name}")
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"step {name} failed:\n{done.stderr[-4000:]}")
            return json.loads(done.stdout.strip().splitlines()[-1])

        run("write")
        baseline, before, after = run("baseline"), run("before"), run("after")
        tables = [numbers(tmp / name / "results.csv") for name in ("before", "after")]
        same = tables[0] == tables[1]
        outcomes = sorted(path.name for path in (tmp / "after" / "predictions").iterdir())
        same = same and all(
            (tmp / "before" / "predictions" / name).read_bytes() == (tmp / "after" / "predictions" / name).read_bytes()
            for name in outcomes
        )
        rows = len(tables[1])

    examples = args.train + args.test
    vectors = 6 * examples
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[args.dtype]
    file_gib, float_gib = vectors * args.dim * itemsize / 2**30, vectors * args.dim * 4 / 2**30
    cells = args.layers * len(args.heads) * len(args.num_passages)
    print(
        f"synthetic cache: {args.layers} layers x ({examples:,} queries + {5 * examples:,} passages) x {args.dim} "
        f"{args.dtype}; a layer file {file_gib:.2f} GiB, {float_gib:.2f} GiB as float32"
    )
    print(
        f"cells: {args.layers} layers x {len(args.heads)} heads ({', '.join(args.heads)}) x "
        f"N {'/'.join(map(str, args.num_passages))} = {cells} fits, 1 epoch each, batch {BATCH:,}, "
        f"{args.train:,} train / {args.test:,} test examples, {args.threads} threads"
    )
    print(f"baseline process (imports only): peak RSS {baseline['peak_gib']:.2f} GiB")
    for name, result, how in (("before", before, "each cell reads its layer"), ("after", after, "one read a layer")):
        print(
            f"{name:6s} ({how}): {result['seconds']:7.1f} s, {result['seconds'] / args.layers:6.1f} s per layer; "
            f"{result['reads']:3d} layer reads taking {result['read_seconds']:6.1f} s; "
            f"peak RSS {result['peak_gib']:.2f} GiB ({result['peak_gib'] - baseline['peak_gib']:.2f} above baseline "
            f"= {(result['peak_gib'] - baseline['peak_gib']) / float_gib:.2f} x a float32 layer)"
        )
    print(
        f"after / before: time {after['seconds'] / before['seconds']:.3f} "
        f"({before['seconds'] / after['seconds']:.2f}x faster), layer reads {after['reads']}/{before['reads']}, "
        f"peak RSS {after['peak_gib'] / before['peak_gib']:.3f} "
        f"(above baseline {(after['peak_gib'] - baseline['peak_gib']) / (before['peak_gib'] - baseline['peak_gib']):.3f})"
    )
    print(
        f"before and after: the same {rows} rows of results.csv (in another order; all but {', '.join(NOT_NUMBERS)}) "
        "and outcome files: "
        f"{'yes' if same else 'NO'}"
    )


if __name__ == "__main__":
    main()
