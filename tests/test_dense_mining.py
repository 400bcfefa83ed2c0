"""Dense negatives: a model's last layer over the whole corpus, against sentence-transformers' own ranking."""

import json
from collections import Counter

import pytest
import torch
from conftest import make_collection, write_beir
from test_model_files import save_sentence_transformer

from dkacq.commands.probe import build
from dkacq.data import mining
from dkacq.data.collection import CollectionOptions, beir_folder
from dkacq.datamodules.probe_sets import MiningEncoder, mining_preset
from dkacq.datamodules.texts import TextDataModule
from dkacq.encoders.loading import ModelUnavailableError, weights_identity
from dkacq.encoders.model_files import AutoEncoder, ModelFilesError, similarity_of
from dkacq.encoders.presets import ModelSource

OPTIONS = CollectionOptions(negative_ranks=(2, 6), near_duplicate=None, num_negatives=4, query_batch=5)


@pytest.fixture(scope="module")
def dense_case(tiny_bert_dir, tmp_path_factory):
    """A sentence-transformers folder (mean pooling, prompts, a token limit) and a BEIR folder."""
    folder = tmp_path_factory.mktemp("dense")
    prompts = {"query": "what is ", "document": "the data "}
    model = save_sentence_transformer(tiny_bert_dir, folder / "st", "mean", prompts=prompts, limit=12)
    collection = make_collection()
    return model, collection, write_beir(folder / "beir", collection)


def judged_of(collection):
    return {q: {d for qq, d, g in collection["qrels"] if qq == q and g > 0} for q in collection["queries"]}


def mine(case, folder, options=OPTIONS, encoder=None):
    model, collection, beir = case
    encoder = encoder or MiningEncoder(AutoEncoder(str(model)).preset(), "dot")
    passages = beir_folder(beir, options).passages
    queries, judged = collection["queries"], judged_of(collection)
    return mining.negatives("dense", passages, queries, judged, {}, options, folder, {"t": 1}, encoder)


def test_dense_negatives_are_the_rank_window_of_sentence_transformers_ranking(dense_case, tmp_path, monkeypatch):
    """The candidates of each query are exactly its ranks 2-6 by sentence-transformers' own
    ``encode_query`` / ``encode_document`` dot product, less its judged-relevant passages; another seed
    draws them in another order; a mining stopped mid-corpus resumes to the same negatives, encoding
    only the chunks it had not saved."""
    from sentence_transformers import SentenceTransformer

    model, collection, _ = dense_case
    st = SentenceTransformer(str(model), device="cpu")
    ids = list(collection["docs"])
    texts = [f"{title} {text}" if title else text for title, text in collection["docs"].values()]
    queries = collection["queries"]
    scores = torch.as_tensor(st.encode_query(list(queries.values()))) @ torch.as_tensor(st.encode_document(texts)).T
    judged = judged_of(collection)

    monkeypatch.setattr(mining, "CHUNK", 16)  # 80 passages in 5 saved chunks
    encoded: list[tuple[str, int]] = []
    encoder = MiningEncoder(AutoEncoder(str(model)).preset(), "dot")
    encode = encoder.encode

    def stopping(texts, side):
        if side == "passage" and len([e for e in encoded if e[0] == "passage"]) == 3:
            raise KeyboardInterrupt  # stopped while encoding the fourth chunk
        encoded.append((side, len(texts)))
        return encode(texts, side)

    monkeypatch.setattr(encoder, "encode", stopping)
    with pytest.raises(KeyboardInterrupt):
        mine(dense_case, tmp_path, encoder=encoder)
    (vectors,) = tmp_path.glob("corpus-*/dense-*")
    assert sorted(path.name for path in vectors.glob("chunk_*.npy")) == [f"chunk_0000{i}.npy" for i in range(3)]
    monkeypatch.setattr(
        encoder, "encode", lambda texts, side: encoded.append((side, len(texts))) or encode(texts, side)
    )
    mined = mine(dense_case, tmp_path, encoder=encoder)
    assert [e for e in encoded[3:] if e[0] == "passage"] == [("passage", 16), ("passage", 16)]
    assert [e for e in encoded if e[0] == "query"] == [("query", 5)] * 3 + [("query", 1)]  # 16 queries by 5

    for number, query in enumerate(queries):
        order = scores[number].argsort(descending=True).tolist()
        window = [ids[i] for i in order[1:6]]
        edges = scores[number, order[:7]]
        assert min(edges[0] - edges[1], edges[5] - edges[6]) > 1e-4  # no near-tie at the window's edges
        assert set(mined.candidates[query]) == set(window) - judged[query], query
    assert mined.method["source"] == "dense" and mined.method["similarity"] == "dot"
    assert mined.method["weights"]["query"]["model"].startswith("sha256:")
    assert mined.method["model"]["pooling"] == "mean" and mined.method["model"]["query_prefix"] == "what is "

    fresh = MiningEncoder(AutoEncoder(str(model)).preset(), "dot")
    assert mine(dense_case, tmp_path, encoder=fresh) == mined and fresh._encoders is None  # read back: no model loaded
    reseeded = mine(dense_case, tmp_path / "seed", options=CollectionOptions(**{**vars(OPTIONS), "seed": 7}))
    assert {q: set(c) for q, c in reseeded.candidates.items()} == {q: set(c) for q, c in mined.candidates.items()}
    assert reseeded.candidates != mined.candidates


def test_the_mining_model_is_part_of_the_probe_sets_identity(dense_case, tiny_bert_dir, tmp_path):
    """Through the command's own parser: a named mining model and the probed model's own last layer
    give two probe sets, stored apart, with the mining model's weights and settings in the provenance;
    another similarity is another probe set and other cells; attribution's texts must name their model."""
    model, _, beir = dense_case

    def planned(**collection):
        options = {
            "data": {
                "model": str(tiny_bert_dir),
                "dataset": "toy",
                "source": "beir",
                "path": str(beir),
                "negatives": "dense",
                "cache_dir": str(tmp_path / "cache"),
                "layers": [1],
                "collection": {"num_negatives": 2, **collection},
            },
            "results": {"run_dir": str(tmp_path / "run")},
        }
        return {cell.id for cell in build(options).plan()}

    named, own = planned(dense_model=str(model)), planned()
    assert planned(dense_model=str(model), dense_similarity="dot").isdisjoint(named)
    assert named.isdisjoint(own)
    manifests = {
        path.parent.name: json.loads(path.read_text())
        for path in (tmp_path / "cache/toy").glob("probe_set-dense-*/manifest.json")
    }
    assert len(manifests) == 3 and not (tmp_path / "cache/toy/probe_set").exists()
    weights = {m["provenance"]["negatives"]["weights"]["passage"]["model"] for m in manifests.values()}
    assert weights == {
        weights_identity(ModelSource(str(model)))["model"],
        weights_identity(ModelSource(str(tiny_bert_dir)))["model"],
    }
    # by default each model ranks as its authors do: the sentence-transformers folder by its own
    # similarity function, the bare transformer (no such files) by dot product
    from sentence_transformers import SentenceTransformer

    similarities = Counter(m["provenance"]["negatives"]["similarity"] for m in manifests.values())
    assert SentenceTransformer(str(model), device="cpu").similarity_fn_name == "cosine"
    assert similarities == {"cosine": 1, "dot": 2}
    with pytest.raises(ValueError, match="needs data.collection.dense_model"):
        TextDataModule(dataset="toy", source="beir", path=str(beir), negatives="dense")


def test_a_mining_model_folder_that_does_not_exist_is_one_line_saying_so(tmp_path):
    for probe in (lambda model: similarity_of(model), lambda model: mining_preset(model, None)):
        with pytest.raises(
            ModelUnavailableError, match=r"^cannot load '/no/such/model': no such folder, and not a hub id"
        ):
            probe("/no/such/model")


def test_a_similarity_dkacq_does_not_rank_by_is_one_line(tmp_path):
    (tmp_path / "modules.json").write_text("[]")
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "euclidean"}))
    with pytest.raises(ModelFilesError, match="similarity_fn_name 'euclidean'.*data.collection.dense_similarity"):
        similarity_of(str(tmp_path))
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "dot"}))
    assert similarity_of(str(tmp_path)) == "dot"
