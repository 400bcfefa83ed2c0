"""Layer-by-layer similarity of two embedding caches of the same texts (:mod:`dkacq.compare.cka` per pair).

Two caches of one probe set hold the same texts, but each in its own row order (texts are sorted by
their token count under each model's tokenizer, ``encoders/extraction.py``); their indexes map every
example to its rows, so the examples pair the rows: a text is its query (or each of its passages) in
both. Each distinct text counts once.

Every layer of each model is read once for its statistics (mean, centred row norms, its own d x d
product); each pair of layers is then one pass of row chunks over the two layers' vectors. Layers of
model b are kept in memory between pairs while they fit in ``hold_bytes``, read again otherwise.
"""

import time
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor

from dkacq.compare.cka import debiased_cka, layer_statistics, linear_cka, pair_products
from dkacq.encoders.cache import EmbeddingCache
from dkacq.formats.similarity import SimilarityRow, diagonal_partner

Side = Literal["query", "passage"]
SIDES: tuple[Side, ...] = ("query", "passage")
LayerPairs = Literal["all", "diagonal"]
HOLD_BYTES = 2 << 30
"""Model b's aligned layers are kept in memory between layer pairs up to this many bytes."""


def aligned_rows(
    cache_a: EmbeddingCache, cache_b: EmbeddingCache, side: Side, splits: Iterable[str]
) -> tuple[Tensor, Tensor]:
    """``(rows_a, rows_b)``: for every distinct text of ``side`` in ``splits``, its row in each cache.

    Raises ``ValueError`` when the two caches do not hold the same texts (their data fingerprints
    differ) or their indexes do not pair rows one to one.
    """
    found = {cache.folder: cache.manifest.get("data_fingerprint") for cache in (cache_a, cache_b)}
    if len(set(found.values())) != 1:
        raise ValueError(
            "the two caches hold different texts ("
            + ", ".join(f"{folder}: data_fingerprint {value}" for folder, value in found.items())
            + "); compare caches of one probe set with the same max_examples"
        )
    pairs = []
    for split in splits:
        (query_a, passages_a), (query_b, passages_b) = cache_a.index(split), cache_b.index(split)
        if side == "query":
            pairs.append(torch.stack([query_a, query_b], dim=1))
        else:
            pairs.append(torch.stack([passages_a.flatten(), passages_b.flatten()], dim=1))
    pairs = torch.cat(pairs).unique(dim=0)
    if len(pairs[:, 0].unique()) != len(pairs) or len(pairs[:, 1].unique()) != len(pairs):
        raise ValueError(f"{cache_a.folder} and {cache_b.folder} do not pair their {side} rows one to one")
    return pairs[:, 0], pairs[:, 1]


class _AlignedLayers:
    """One side's vectors of a cache's layers, in the aligned row order; kept once read while
    ``hold`` says they fit."""

    def __init__(self, cache: EmbeddingCache, side: Side, rows: Tensor, hold: bool):
        self.cache, self.side, self.rows, self.hold = cache, side, rows, hold
        self.held: dict[int, Tensor] = {}

    def __getitem__(self, layer: int) -> Tensor:
        if layer in self.held:
            return self.held[layer]
        queries, passages = self.cache.layer(layer)
        vectors = (queries if self.side == "query" else passages).index_select(0, self.rows)
        if self.hold:
            self.held[layer] = vectors
        return vectors


def cache_similarity(
    cache_a: EmbeddingCache,
    cache_b: EmbeddingCache,
    labels: tuple[str, str],
    identities: tuple[str, str],
    sides: Iterable[Side] = SIDES,
    splits: Iterable[str] | None = None,
    layer_pairs: LayerPairs = "all",
    device: str | torch.device = "cpu",
    hold_bytes: int = HOLD_BYTES,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[SimilarityRow], dict]:
    """Every requested (side, layer of a, layer of b) row, and the texts and time it took per side.

    ``labels`` are the two models' names in the rows, ``identities`` the digests of the two caches'
    requests; ``splits`` default to those both indexes hold.
    """
    splits = list(splits) if splits is not None else sorted(set(cache_a.splits()) & set(cache_b.splits()))
    states_a, states_b = cache_a.num_hidden_states, cache_b.num_hidden_states
    partners = {
        layer: list(range(states_b)) if layer_pairs == "all" else [diagonal_partner(layer, states_a, states_b)]
        for layer in range(states_a)
    }
    rows: list[SimilarityRow] = []
    texts, seconds = {}, {}
    for side in sides:
        started = time.perf_counter()
        rows_a, rows_b = aligned_rows(cache_a, cache_b, side, splits)
        texts[side] = len(rows_a)
        layers_a = _AlignedLayers(cache_a, side, rows_a, hold=False)
        layers_b = _AlignedLayers(cache_b, side, rows_b, len(rows_b) * cache_b.hidden_size * 4 * states_b <= hold_bytes)
        stats_b = {
            layer: layer_statistics(layers_b[layer], device)
            for layer in sorted({b for wanted in partners.values() for b in wanted})
        }
        for layer_a in range(states_a):
            if progress:
                progress(f"{side} layer {layer_a} of {labels[0]} against {len(partners[layer_a])} of {labels[1]}")
            x = layers_a[layer_a]
            stats_a = layer_statistics(x, device)
            for layer_b in partners[layer_a]:
                products = pair_products(x, layers_b[layer_b], stats_a, stats_b[layer_b], device)
                rows.append(
                    SimilarityRow(
                        labels[0],
                        labels[1],
                        side,
                        layer_a,
                        layer_b,
                        linear_cka(products, stats_a, stats_b[layer_b]),
                        debiased_cka(products, stats_a, stats_b[layer_b]),
                        products.mean_cosine,
                        len(rows_a),
                        identities[0],
                        identities[1],
                    )
                )
        seconds[side] = time.perf_counter() - started
    return rows, {"num_texts": texts, "seconds": seconds, "splits": splits}
