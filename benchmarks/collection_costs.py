"""What a collection costs per 100,000 passages: BM25 mining, encoding, exact search; projected to MS MARCO.

Measures, in one run on this machine:

1. the corpus scan and BM25 index (``dkacq.data.mining``: bm25s, saved to disk) over a synthetic corpus of
   ``--passages`` passages of 56 words (MS MARCO's mean), words drawn from English text and a Zipf tail;
2. BM25 search of ``--queries`` queries of 6 words at depth 100 (what mining and the pool scope do);
3. encoding passages at every hidden state with minilm (all-MiniLM-L6-v2, the offline preset), the
   retrieval measures' corpus pass, on English passages of 50-70 tokens (``sample_texts.py``);
4. the exact search of the retrieval measures (``TopK``: every query against every passage, both
   similarities, every hidden state) on random vectors of minilm's width;
5. dense mining end to end (``data.negatives dense`` with minilm: ``mining.dense_rankings``, the corpus
   encoded at the last layer and saved in chunks, the queries encoded and searched exactly in saved
   batches) over ``--dense`` passages of English text, split into the corpus's encoding, the queries'
   encoding and the search.

Each is printed per 100,000 passages (per 1,000 queries for search) and projected linearly to MS MARCO's
8,841,823 passages with 6,980 dev queries. Run: ``python benchmarks/collection_costs.py [--passages N]``.
"""

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sample_texts import SAMPLE_TEXTS

from dkacq.data import mining
from dkacq.data.exact_search import TopK
from dkacq.datamodules.probe_sets import MiningEncoder
from dkacq.encoders.presets import get_preset

MSMARCO_PASSAGES, MSMARCO_QUERIES = 8_841_823, 6_980


def synthetic_corpus(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    english = " ".join(SAMPLE_TEXTS).lower().replace(",", "").replace(".", "").split()
    tail = rng.zipf(1.3, size=count * 16) % 200_000
    passages = []
    for number in range(count):
        words = list(rng.choice(english, 40)) + [f"t{n}" for n in tail[number * 16 : (number + 1) * 16]]
        passages.append((f"p{number}", " ".join(words)))
    return passages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--encode", type=int, default=512, help="passages encoded for the encoding rate")
    parser.add_argument("--dense", type=int, default=2_000, help="passages of the dense mining run")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = synthetic_corpus(args.passages)
    rng = random.Random(0)
    queries = {f"q{i}": " ".join(rng.sample(rng.choice(corpus)[1].split(), 6)) for i in range(args.queries)}
    per = 100_000 / args.passages

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        started = time.perf_counter()
        _, _, index, tokenizer = mining._bm25_index(lambda: iter(corpus), folder)
        indexing = time.perf_counter() - started
        started = time.perf_counter()
        mining._search(folder / "run", queries, 1024, lambda texts: mining._retrieve(index, tokenizer, texts, 100))
        searching = time.perf_counter() - started
        index_bytes = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())

    from dkacq.encoders import loading

    _, encoder = loading.load_encoders(get_preset("minilm"))
    encoder.eval()
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(args.encode)]
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            encoder(**encoder.tokenize(texts[start : start + 64]))
    encoding = (time.perf_counter() - started) / len(texts)

    layers, dim, chunk, chunks = encoder.num_hidden_states, encoder.hidden_size, 4096, 4
    vectors = torch.randn(chunk, dim)
    searches = [TopK(torch.randn(args.queries, dim), 100, similarity) for similarity in ("cosine", "dot")]
    for search in searches:  # the first chunk fills the kept passages: warm-up
        search.add(vectors, torch.arange(chunk))
    started = time.perf_counter()
    for number in range(1, chunks + 1):
        for search in searches:
            search.add(vectors, torch.arange(number * chunk, (number + 1) * chunk))
    exact = (time.perf_counter() - started) * layers / (chunks * chunk * args.queries)  # per passage and query

    dense_encode, dense_query, dense_search, dense_dim = dense_mining(args.dense, queries)

    print(
        f"this machine: {torch.get_num_threads()} threads, corpus of {args.passages:,} passages, {args.queries:,} queries"
    )
    print(
        f"BM25 scan + index (bm25s):   {indexing * per:8.1f} s per 100k passages ({index_bytes * per / 2**20:.0f} MiB on disk)"
    )
    print(
        f"BM25 search, depth 100:      {searching * 1000 / args.queries:8.1f} s per 1,000 queries over {args.passages:,}"
    )
    print(f"minilm, every hidden state:  {1 / encoding:8.1f} passages/s -> {100_000 * encoding / 60:.1f} min per 100k")
    print(f"exact search, {layers} states x 2:  {exact * 100_000 * 1000:8.2f} s per 100k passages and 1,000 queries")
    dense_per = 100_000 / args.dense
    print(
        f"dense mining (minilm, last layer, {args.dense:,} passages): corpus encoding {dense_encode * dense_per / 60:8.1f} min "
        f"per 100k passages ({args.dense / dense_encode:.1f} passages/s; vectors {4 * dense_dim * 100_000 / 2**20:.0f} MiB per 100k); "
        f"query encoding {dense_query * 1000 / args.queries:.1f} s per 1,000 queries; "
        f"exact search {dense_search * dense_per * 1000 / args.queries:.2f} s per 1,000 queries per 100k passages"
    )
    scale = MSMARCO_PASSAGES / 100_000
    print(
        f"MS MARCO (8.8M passages, {MSMARCO_QUERIES:,} queries), projected linearly: BM25 index "
        f"{indexing * per * scale / 3600:.2f} h, search {searching / args.queries * MSMARCO_QUERIES * (MSMARCO_PASSAGES / args.passages) / 3600:.2f} h "
        f"(search time grows with the corpus), minilm encoding {MSMARCO_PASSAGES * encoding / 3600:.1f} h on this CPU, "
        f"exact search {exact * MSMARCO_PASSAGES * MSMARCO_QUERIES / 3600:.1f} h on this CPU; dense mining: corpus "
        f"{dense_encode * MSMARCO_PASSAGES / args.dense / 3600:.1f} h, queries {dense_query * MSMARCO_QUERIES / args.queries / 60:.1f} min, "
        f"search {dense_search * (MSMARCO_PASSAGES / args.dense) * (MSMARCO_QUERIES / args.queries) / 3600:.2f} h on this CPU"
    )


class TimedEncoder(MiningEncoder):
    """minilm's last layer as the dense mining model, with the seconds spent encoding each side."""

    def __init__(self):
        super().__init__(get_preset("minilm"))
        self.seconds = {"query": 0.0, "passage": 0.0}

    def encode(self, texts, side):
        started = time.perf_counter()
        vectors = super().encode(texts, side)
        self.seconds[side] += time.perf_counter() - started
        return vectors


def dense_mining(count: int, queries: dict[str, str]) -> tuple[float, float, float, int]:
    """Seconds of the corpus's encoding, the queries' encoding and the rest of the search (scan, exact
    scoring, saving) of one dense mining run over ``count`` English passages, and the vectors' width."""
    corpus = [(f"p{i}", SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]) for i in range(count)]
    encoder = TimedEncoder()
    encoder.encode(["warm up"], "passage")  # the model's loading is not mining
    encoder.seconds = {"query": 0.0, "passage": 0.0}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        mining.dense_rankings(lambda: iter(corpus), queries, Path(folder), 100, 1024, encoder)
        total = time.perf_counter() - started
    rest = total - encoder.seconds["passage"] - encoder.seconds["query"]
    return encoder.seconds["passage"], encoder.seconds["query"], rest, encoder._encoders[1].hidden_size


if __name__ == "__main__":
    main()
