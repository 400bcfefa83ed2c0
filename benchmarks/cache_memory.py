"""Peak memory of writing and probing the embedding cache, against the size of one layer and of all.

Builds a synthetic cache shaped like BERT on a probe set (13 hidden states, 768 dims; 20,000 queries and
60,000 passages by default) with the streaming layer writer that extraction uses, then, in a fresh
process, opens one layer and runs one training epoch of a concat probe over it at the study's batch
size. Each step runs in its own process and reports its peak resident memory above a baseline process
that only imports the same modules. Run: ``python benchmarks/cache_memory.py [--queries N --passages N]``.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

LAYERS, DIM, EXAMPLES, BATCH = 13, 768, 20_000, 32_768


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(name: str, folder: Path, queries: int, passages: int) -> float:
    import torch

    from dkacq.datamodules.probe import ProbeExamples
    from dkacq.encoders.cache import EmbeddingCache, LayerFileWriter, layer_file, publish, staging_folder
    from dkacq.probe.heads import build_head

    if name == "write":
        staging = staging_folder(folder)
        writers = [LayerFileWriter(layer_file(staging, k), queries, passages, DIM, "float32") for k in range(LAYERS)]
        for count in (queries, passages):
            for start in range(0, count, 256):
                rows = torch.randn(LAYERS, min(256, count - start), DIM)
                for writer, layer_rows in zip(writers, rows):
                    writer.append(layer_rows)
        for writer in writers:
            writer.close()
        generator = torch.Generator().manual_seed(0)
        index = {
            "train.query": torch.randint(queries, (EXAMPLES,), generator=generator),
            "train.passages": torch.randint(passages, (EXAMPLES, 5), generator=generator),
        }
        manifest = {"num_hidden_states": LAYERS, "hidden_size": DIM}
        publish(staging, folder, manifest, index)
    elif name == "probe":
        cache = EmbeddingCache(folder, json.loads((folder / "manifest.json").read_text()))
        query_vectors, passage_vectors = cache.layer(LAYERS - 1)
        query_rows, passage_rows = cache.index("train")
        examples = ProbeExamples(query_vectors, passage_vectors, query_rows, passage_rows, 5)
        head = build_head("concat", DIM, 5)
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-4)
        for start in range(0, len(examples), BATCH):
            batch = examples.__getitems__(list(range(start, min(start + BATCH, len(examples)))))
            loss = torch.nn.functional.cross_entropy(head(batch["query"], batch["passages"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return peak_mib()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--passages", type=int, default=60_000)
    parser.add_argument("--step", choices=["baseline", "write", "probe"])
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()
    if args.step:
        print(step(args.step, args.folder, args.queries, args.passages))
        return
    layer_mib = (args.queries + args.passages) * DIM * 4 / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cache"

        def run(name: str) -> float:
            command = [
                sys.executable,
                __file__,
                "--step",
                name,
                "--folder",
                str(folder),
                "--queries",
                str(args.queries),
                "--passages",
                str(args.passages),
            ]
            return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])

        baseline, write, probe = run("baseline"), run("write"), run("probe")
    batch_mib = min(BATCH, EXAMPLES) * 6 * DIM * 4 / 2**20
    print(f"one layer {layer_mib:.0f} MiB, whole cache {LAYERS * layer_mib:.0f} MiB ({LAYERS} layers)")
    print(
        f"writing the cache: peak {write - baseline:.0f} MiB above baseline = "
        f"{(write - baseline) / layer_mib:.2f} x one layer, {(write - baseline) / (LAYERS * layer_mib):.3f} x the cache"
    )
    print(
        f"probing one layer (one epoch, batch {BATCH}): peak {probe - baseline:.0f} MiB above baseline = "
        f"{(probe - baseline) / layer_mib:.2f} x one layer, {(probe - baseline) / (LAYERS * layer_mib):.3f} x the cache "
        f"(a batch's features alone are {batch_mib:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
