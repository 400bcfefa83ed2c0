"""Collections: BEIR folders, TREC files and ir_datasets ids read into probe sets, with mined negatives."""

import csv
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_collection, write_beir

from dkacq.cli import main
from dkacq.commands.probe import build
from dkacq.data import mining
from dkacq.data.collection import CollectionOptions, beir_folder, judged_queries, read_collection_set, split_queries
from dkacq.data.exact_search import TopK
from dkacq.data.examples import ProbeDataError
from dkacq.data.sampling import draw_passage_orders
from dkacq.data.storage import stored_probe_set
from dkacq.datamodules.probe import ProbeDataModule
from dkacq.formats.results import ResultConflictError
from dkacq.probe.retrieval import layer_retrieval
from dkacq.probe.retrieval_measures import mean_measures, query_measures


def write_trec(folder: Path, collection: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "collection.tsv", "w") as file:
        file.writelines(f"{doc}\t{text}\t{title}\n" for doc, (title, text) in collection["docs"].items())
    with open(folder / "queries.tsv", "w") as file:
        file.writelines(f"{query}\t{text}\n" for query, text in collection["queries"].items())
    with open(folder / "qrels.txt", "w") as file:
        file.writelines(f"{q} 0 {d} {g}\n" for q, d, g in collection["qrels"])
    return {
        "test_file": str(folder / "qrels.txt"),
        "corpus": str(folder / "collection.tsv"),
        "queries": str(folder / "queries.tsv"),
    }


@pytest.fixture(scope="session")
def collection():
    return make_collection()


@pytest.fixture(scope="session")
def beir_dir(tmp_path_factory, collection):
    return write_beir(tmp_path_factory.mktemp("beir") / "toy", collection)


def lucene_bm25_scores(docs: dict, query: str, k1: float = 1.5, b: float = 0.75) -> dict[str, float]:
    """The literal Lucene BM25 formula over lower-cased words of 2+ characters (no stop word occurs); a
    word repeated in the query counts once per occurrence, as in a Lucene query of repeated terms."""

    def words(text):
        return re.findall(r"\w\w+", text.lower())

    texts = {doc: words(f"{title} {text}" if title else text) for doc, (title, text) in docs.items()}
    average = sum(map(len, texts.values())) / len(texts)
    frequency = Counter(word for tokens in texts.values() for word in set(tokens))
    scores = {}
    for doc, tokens in texts.items():
        counts, score = Counter(tokens), 0.0
        for word in words(query):
            if counts[word]:
                idf = math.log(1 + (len(texts) - frequency[word] + 0.5) / (frequency[word] + 0.5))
                tf = counts[word]
                score += idf * tf / (tf + k1 * (1 - b + b * len(tokens) / average))
        scores[doc] = score
    return scores


def test_bm25_negatives_come_from_the_rank_window_of_a_literal_bm25_and_never_a_judged_passage(
    collection, beir_dir, tmp_path
):
    options = CollectionOptions(negative_ranks=(2, 6), near_duplicate=None, num_negatives=4)
    queries = collection["queries"]
    judged = {q: {d for qq, d, g in collection["qrels"] if qq == q and g > 0} for q in queries}
    mined = mining.negatives(
        "bm25", beir_folder(beir_dir, options).passages, queries, judged, {}, options, tmp_path, {"t": 1}
    )
    for query, text in queries.items():
        scores = lucene_bm25_scores(collection["docs"], text)
        ranked = sorted(scores.values(), reverse=True)
        high, low = ranked[1] + 1e-5, ranked[5] - 1e-5  # ranks 2 and 6, with room for float32 and ties
        inside = {doc for doc, score in scores.items() if low < score < high and doc not in judged[query]}
        certain = {doc for doc, score in scores.items() if low + 2e-5 < score < high - 2e-5} - judged[query]
        chosen = set(mined.candidates[query])
        assert certain <= chosen <= inside and len(chosen) == 5 - len(judged[query] & chosen_window(scores, 2, 6)), (
            query
        )
    assert mined.corpus["passages"] == len(collection["docs"])
    assert mined.method["library"].startswith("bm25s ")


def chosen_window(scores: dict[str, float], first: int, last: int) -> set[str]:
    return set(sorted(scores, key=lambda doc: -scores[doc])[first - 1 : last])


def test_mining_resumes_after_its_last_saved_batch(collection, beir_dir, tmp_path, monkeypatch):
    options = CollectionOptions(query_batch=5)
    source = beir_folder(beir_dir, options)
    queries = collection["queries"]
    judged = {query: set() for query in queries}
    first = mining.negatives("bm25", source.passages, queries, judged, {}, options, tmp_path, {"t": 1})
    (run,) = tmp_path.glob("corpus-*/bm25-run-*")
    assert len(list(run.glob("batch_*.npy"))) == 4  # 16 queries in batches of 5
    (run / "batch_00002.npy").unlink()  # stopped while searching the third batch
    searched, built = [], []
    retrieve, build = mining._retrieve, mining._build_index
    monkeypatch.setattr(mining, "_retrieve", lambda *args: searched.append(len(args[2])) or retrieve(*args))
    monkeypatch.setattr(mining, "_build_index", lambda *args: built.append(1) or build(*args))
    again = mining.negatives("bm25", source.passages, queries, judged, {}, options, tmp_path, {"t": 1})
    assert searched == [5] and not built
    assert again == first
    (run / "batch_00003.npy").unlink()
    assert mining.mining_saved(tmp_path) == (
        f"mining the probe set's negatives in {tmp_path}: the BM25 index, 3 batches of searched queries saved"
    )
    dense = tmp_path / "dense" / "corpus-a" / "dense-b"
    (dense / "dense-cosine-run-c").mkdir(parents=True)
    for path in (dense / "chunk_00000.npy", dense / "dense-cosine-run-c" / "batch_00000.npy"):
        path.touch()
    assert mining.mining_saved(tmp_path / "dense").endswith(
        ": 1 chunk of passage vectors, 1 batch of searched queries saved"
    )
    assert (
        mining.mining_saved(tmp_path / "none")
        == f"mining the probe set's negatives in {tmp_path / 'none'}: nothing saved"
    )


def test_judged_relevant_and_near_duplicates_are_never_negatives():
    positive = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    near = "alpha beta gamma delta epsilon zeta eta theta iota lambda"  # Jaccard 9/11
    other = "one two three"
    candidates = [("a", positive), ("b", near), ("c", other), ("d", other), ("e", "four five")]
    assert mining.choose(positive, candidates, 4, near_duplicate=0.8) == [other, "four five"]
    assert mining.choose(positive, candidates, 1, near_duplicate=None) == [near]


def test_split_by_query_is_seeded_disjoint_and_covers_every_query():
    queries = [f"q{i}" for i in range(50)]
    train, test = split_queries(queries, 0.2, seed=3)
    assert len(test) == 10 and not set(train) & set(test) and sorted(train + test) == sorted(queries)
    assert split_queries(list(reversed(queries)), 0.2, seed=3) == (train, test)
    assert split_queries(queries, 0.2, seed=4) != (train, test)


def test_graded_judgements_threshold_and_counts(collection, beir_dir, tmp_path, caplog):
    options = CollectionOptions(relevance_threshold=2, near_duplicate=None)
    read, provenance = read_collection_set(beir_folder(beir_dir, options), "file", options, tmp_path)
    graded = {(q, d): g for q, d, g in collection["qrels"]}
    texts = {doc: f"{title} {text}" if title else text for doc, (title, text) in collection["docs"].items()}
    by_text = {text: doc for doc, text in texts.items()}
    query_of = {text: query for query, text in collection["queries"].items()}
    for split in ("train", "test"):
        for row in read.probe_set[split]:
            query = query_of[row["question"]]
            assert graded[query, by_text[row["positive_context"]]] == 2
            negatives = [row[f"negative_context_{k}"] for k in range(4)]
            # file negatives: the judged-0 passage only; the grade-1 passage is neither positive nor negative
            assert [graded[query, by_text[text]] for text in negatives if text is not None] == [0]
    assert provenance["split"]["kind"] == "seeded by query"
    threshold_three = CollectionOptions(relevance_threshold=3)
    with pytest.raises(ProbeDataError, match="no_relevant"):
        read_collection_set(beir_folder(beir_dir, threshold_three), "file", threshold_three, tmp_path)


def test_given_splits_are_used_and_a_query_judged_in_both_stays_in_test(collection, tmp_path):
    train_queries = {f"q{j:02d}" for j in range(10)}
    folder = write_beir(tmp_path / "beir", collection, train_queries=train_queries)
    with open(folder / "qrels" / "train.tsv", "a") as file:  # q12 is a test query: judged in train too
        file.write("q12\td0\t1\n")
    options = CollectionOptions(near_duplicate=None)
    read, provenance = read_collection_set(beir_folder(folder, options), "bm25", options, tmp_path / "work")
    assert provenance["split"]["kind"] == "given"
    assert read.dropped["train"]["in_test"] == 1
    questions = {split: set(read.probe_set[split]["question"]) for split in ("train", "test")}
    expected = {
        split: {text for query, text in collection["queries"].items() if (query in train_queries) == (split == "train")}
        for split in ("train", "test")
    }
    assert questions == expected


def test_gzipped_and_plain_folders_and_both_path_spellings_give_one_stored_set(
    collection, beir_dir, tmp_path, monkeypatch
):
    gz = write_beir(tmp_path / "gz", collection, gzipped=True)
    monkeypatch.chdir(beir_dir.parent)
    built = []
    read = read_collection_set
    monkeypatch.setattr("dkacq.data.storage.read_collection_set", lambda *a: built.append(1) or read(*a))
    plain_set, plain_print = stored_probe_set(tmp_path / "a" / "probe_set", "beir", path="toy", negatives="bm25")
    _, again = stored_probe_set(tmp_path / "a" / "probe_set", "beir", path=f"./{beir_dir.name}/", negatives="bm25")
    assert again == plain_print and len(built) == 1
    gz_set, gz_print = stored_probe_set(tmp_path / "b" / "probe_set", "beir", path=str(gz), negatives="bm25")
    assert gz_print == plain_print
    assert all(gz_set[split].to_dict() == plain_set[split].to_dict() for split in ("train", "test"))
    _, other = stored_probe_set(tmp_path / "a" / "probe_set", "beir", path="toy", negatives="random")
    assert other != plain_print and len(built) == 3


def test_local_files_by_another_path_spelling_are_not_rebuilt(tmp_path, monkeypatch, probe_files):
    monkeypatch.chdir(Path(probe_files[0]).parent)
    train, test = Path(probe_files[0]).name, Path(probe_files[1]).name
    _, first = stored_probe_set(tmp_path / "s", "local", train, test)
    mtime = (tmp_path / "s" / "manifest.json").stat().st_mtime_ns
    _, second = stored_probe_set(tmp_path / "s", "local", f"./{train}", f"./{test}")
    assert second == first and (tmp_path / "s" / "manifest.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("corpus.jsonl", '{"_id": "d0", "text": "a"}\n{"_id": "d1"}\n', r"corpus.jsonl: line 2 has no field 'text'"),
        ("corpus.jsonl", '{"_id": "d0", "text": "a"}\n{"_id": \n', r"corpus.jsonl: line 2 is not valid JSON"),
        ("queries.jsonl", '{"_id": "q0", "text": 3}\n', r"queries.jsonl: line 1 field 'text' is not a string"),
        (
            "queries.jsonl",
            '{"_id": "q0", "text": "a"}\n\n{"_id": "q0", "text": "b"}\n',
            r"line 3 repeats the id 'q0' of line 1",
        ),
        (
            "corpus.jsonl",
            '{"_id": "d0", "text": "a"}\n{"_id": "d1", "text": "b"}\n{"_id": 0, "text": "c"}\n{"_id": "0", "text": "c"}\n',
            r"corpus.jsonl: line 4 repeats the id '0' of line 3",
        ),
        (
            "qrels/test.tsv",
            "query-id\tcorpus-id\tscore\nq0\td0\thigh\n",
            r"test.tsv: line 2 field 'grade' is not an integer",
        ),
        ("qrels/test.tsv", "q0\td0\n", r"test.tsv: line 1 has 2 fields"),
        # a TREC line that lost its passage id is not read as a BEIR line judging passage '0'
        ("qrels/test.tsv", "q0 0 d0 1\nq1 0 1\n", r"test.tsv: line 2 has 3 fields, expected 4, as the first"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_line_and_field(collection, tmp_path, file, content, message):
    folder = write_beir(tmp_path / "bad", collection)
    (folder / file).write_text(content)
    with pytest.raises(ProbeDataError, match=message) as error:
        stored_probe_set(tmp_path / "store" / "probe_set", "beir", path=str(folder), negatives="bm25")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "store" / "probe_set").exists()


def test_a_line_that_is_not_utf8_and_a_cut_gzip_are_one_line_naming_the_line(collection, tmp_path):
    folder = write_beir(tmp_path / "bad", collection)
    lines = (folder / "corpus.jsonl").read_bytes().splitlines(keepends=True)
    (folder / "corpus.jsonl").write_bytes(
        b"".join(lines[:40]) + b'{"_id": "x", "text": "caf\xe9"}\n' + b"".join(lines[40:])
    )
    with pytest.raises(ProbeDataError, match=r"corpus.jsonl: line 41 is not UTF-8 text \(invalid continuation byte"):
        stored_probe_set(tmp_path / "a" / "probe_set", "beir", path=str(folder), negatives="bm25")
    gz = write_beir(tmp_path / "gz", collection, gzipped=True)
    (gz / "corpus.jsonl.gz").write_bytes((gz / "corpus.jsonl.gz").read_bytes()[:-30])
    with pytest.raises(
        ProbeDataError, match=r"corpus.jsonl.gz: cannot be read after line \d+ \(.*end-of-stream"
    ) as error:
        stored_probe_set(tmp_path / "b" / "probe_set", "beir", path=str(gz), negatives="bm25")
    assert "\n" not in str(error.value)


class UnusedEncoder:
    """A dense mining model that must not be asked for a vector."""

    identity, similarity, device = {"stub": 1}, "dot", torch.device("cpu")

    def encode(self, texts, side):
        raise AssertionError(f"encoded {len(texts)} {side} texts")


@pytest.mark.parametrize("source", ["bm25", "dense"])
def test_a_bad_corpus_line_past_the_first_chunk_is_refused_before_any_tokenizing_or_encoding(
    collection, tmp_path, monkeypatch, source
):
    folder = write_beir(tmp_path / "bad", collection)
    lines = (folder / "corpus.jsonl").read_text().splitlines(keepends=True)
    lines[69] = '{"_id": "d69", "title": ""}\n'
    (folder / "corpus.jsonl").write_text("".join(lines))
    monkeypatch.setattr(mining, "CHUNK", 8)  # line 70 is in the ninth chunk
    monkeypatch.setattr(mining, "_build_index", lambda *args: pytest.fail("the BM25 index was built"))
    with pytest.raises(ProbeDataError, match=r"corpus.jsonl: line 70 has no field 'text'"):
        stored_probe_set(
            tmp_path / "store" / "probe_set", "beir", path=str(folder), negatives=source, miner=UnusedEncoder()
        )
    assert [path.name for path in (tmp_path / "store").rglob("*")] == ["probe_set.lock"]  # nothing half-written


def test_options_are_checked_before_any_reading(tmp_path):
    with pytest.raises(ProbeDataError, match="dense needs a mining model"):
        stored_probe_set(tmp_path / "s", "beir", path=str(tmp_path), negatives="dense")
    with pytest.raises(ProbeDataError, match="dense_model applies to data.negatives dense, not bm25"):
        stored_probe_set(
            tmp_path / "s",
            "beir",
            path=str(tmp_path),
            negatives="bm25",
            collection=CollectionOptions(dense_model="minilm"),
        )
    with pytest.raises(ProbeDataError, match="needs a collection"):
        stored_probe_set(tmp_path / "s", "demo", negatives="bm25")
    with pytest.raises(ValueError, match="negative_ranks"):
        CollectionOptions(negative_ranks=(5, 2)).check()


def test_an_example_with_fewer_negatives_draws_only_those_it_has():
    present = torch.tensor([[True, True, False, False], [True, True, True, True]]).repeat(500, 1)
    columns, labels = draw_passage_orders(len(present), 3, torch.Generator().manual_seed(0), present)
    shown = columns[0::2]
    assert set(shown.unique().tolist()) == {0, 1, 2}  # the positive and the two negatives it has
    assert (columns.gather(1, labels[:, None]) == 0).all()
    plain, plain_labels = draw_passage_orders(len(present), 3, torch.Generator().manual_seed(0))
    assert torch.equal(columns[1::2], plain[1::2]) and torch.equal(labels, plain_labels)
    with pytest.raises(ValueError, match="fewer than 3 negatives"):
        draw_passage_orders(len(present), 4, torch.Generator().manual_seed(0), present)


def test_fit_on_a_beir_folder_with_bm25_negatives(tiny_bert_dir, beir_dir, tmp_path, monkeypatch, capsys):
    """The issue's command on a collection without negatives: probe rows and baselines, the mining in
    the cell identity (another mining setting into the same table is refused)."""
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        f"--data.model={tiny_bert_dir}",
        "--data.source=beir",
        f"--data.path={beir_dir}",
        "--data.negatives=bm25",
        "--data.dataset=toy",
        "--data.num_passages=3",
        "--data.layers=[2]",
        "--data.batch_size=16",
        "--data.val_fraction=0.2",
        "--data.collection.num_negatives=2",
        "--heads=[concat]",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--results.run_dir=run",
    ]
    main(args)
    assert re.search(
        r"(?m)^retrieval: 2 rows \(\d+ test queries, scope corpus, 80 passages\) in [\d.]+ s -> run/retrieval.csv$",
        capsys.readouterr().out,
    )
    with open(tmp_path / "run" / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert {row["probe"] for row in rows} >= {"concat", "similarity_cosine", "shortcut_least_negative"}
    with pytest.raises(ResultConflictError, match="data.collection.negative_ranks"):
        main([*args, "--data.collection.negative_ranks=[1,50]"])
    with open(tmp_path / "run" / "retrieval.csv") as file:
        retrieval = {row["similarity"]: row for row in csv.DictReader(file)}
    assert {row["layer"] for row in retrieval.values()} == {"2"} and set(retrieval) == {"cosine", "dot"}
    expected = oracle_retrieval(tiny_bert_dir, beir_dir, layer=2)
    for similarity, row in retrieval.items():
        assert (row["scope"], row["num_passages"]) == ("corpus", "80")
        for measure, value in expected[similarity].items():
            assert float(row[measure]) == pytest.approx(value, abs=1e-5), (similarity, measure)
    # above the corpus limit each query ranks its pool: its BM25 top 100 (of 80 passages) and its judged
    # passages, so every relevant passage is in the top 100
    data = ProbeDataModule(
        model=str(tiny_bert_dir),
        source="beir",
        path=str(beir_dir),
        negatives="bm25",
        dataset="toy",
        layers=[2],
        collection=CollectionOptions(retrieval_limit=10),
    )
    pooled = layer_retrieval(data, [2])
    assert pooled.scope == "pool" and {values["recall@100"] for values in pooled.measures.values()} == {1.0}
    manifest = json.loads((tmp_path / ".cache/dkacq/toy/probe_set/manifest.json").read_text())
    assert manifest["provenance"]["negatives"]["source"] == "bm25"
    assert np.load(next((tmp_path / ".cache/dkacq/toy/mining").glob("corpus-*/doc_ids.npy"))).size == 80


def test_local_files_with_fewer_negatives_are_used_at_the_ns_they_allow(tmp_path):
    rows = [
        {"question": f"q{i}", "positive_context": f"p{i}", "negative_context_0": f"a{i}", "negative_context_1": f"b{i}"}
        for i in range(3)
    ]
    rows[0]["negative_context_2"] = "c0"
    paths = []
    for split in ("train", "test"):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps({**row, "question": row["question"] + split}) + "\n" for row in rows))
        paths.append(str(path))
    probe_set, _ = stored_probe_set(tmp_path / "s", "local", *paths)
    assert probe_set["test"]["negative_context_2"] == ["c0", None, None]
    assert probe_set["test"]["negative_context_3"] == [None, None, None]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "positive_context": "p"}) + "\n")
    with pytest.raises(ProbeDataError, match="bad.jsonl: record 0 has no field 'negative_context_0'"):
        stored_probe_set(tmp_path / "t", "local", str(tmp_path / "bad.jsonl"), paths[1])


def register_ir_dataset(name: str, folder: Path) -> str:
    """A BEIR folder registered as an ir_datasets id, read by ir_datasets' own BEIR classes (no network)."""
    import ir_datasets
    from ir_datasets.datasets.base import Dataset
    from ir_datasets.datasets.beir import BeirDocs, BeirQrels, BeirQueries, BeirTitleDoc
    from ir_datasets.formats import GenericQuery
    from ir_datasets.util import LocalDownload

    if name not in ir_datasets.registry:
        ir_datasets.registry.register(
            name,
            Dataset(
                BeirDocs(name, LocalDownload(folder / "corpus.jsonl", mkdir=False), BeirTitleDoc),
                BeirQueries(name, LocalDownload(folder / "queries.jsonl", mkdir=False), GenericQuery),
                BeirQrels(LocalDownload(folder / "qrels" / "test.tsv", mkdir=False), {}),
            ),
        )
    return name


def test_beir_trec_and_ir_datasets_read_one_collection_to_one_probe_set(collection, beir_dir, tmp_path):
    trec = write_trec(tmp_path / "trec", collection)
    trec_options = CollectionOptions(corpus_file=trec["corpus"], queries_file=trec["queries"])
    dataset_id = register_ir_dataset("dkacq-test/toy/test", beir_dir)
    sets = [
        stored_probe_set(tmp_path / "beir" / "probe_set", "beir", path=str(beir_dir), negatives="bm25"),
        stored_probe_set(
            tmp_path / "trec" / "probe_set",
            "trec",
            test_file=trec["test_file"],
            negatives="bm25",
            collection=trec_options,
        ),
        stored_probe_set(tmp_path / "ird" / "probe_set", "ir_datasets", dataset_id=dataset_id, negatives="bm25"),
    ]
    (beir_set, beir_print), *others = sets
    for probe_set, print_ in others:
        assert print_ == beir_print
        assert all(probe_set[split].to_dict() == beir_set[split].to_dict() for split in ("train", "test"))


def test_an_ir_datasets_collection_not_fetched_is_one_line_saying_how(tmp_path):
    dataset_id = register_ir_dataset("dkacq-test/absent/test", tmp_path / "never-downloaded")
    with pytest.raises(ProbeDataError, match="not in ir_datasets' cache .* fetch them once with the network") as error:
        stored_probe_set(tmp_path / "s" / "probe_set", "ir_datasets", dataset_id=dataset_id, negatives="bm25")
    assert "\n" not in str(error.value)
    with pytest.raises(ProbeDataError, match="no such data set id"):
        stored_probe_set(tmp_path / "s" / "probe_set", "ir_datasets", dataset_id="dkacq-test/unknown", negatives="bm25")


def test_retrieval_measures_equal_ir_measures_on_a_hand_made_run():
    ir_measures = pytest.importorskip("ir_measures")
    grades = {
        "a": {"d1": 2, "d2": 1, "d3": 0, "d9": 3, "d50": 1},
        "b": {"d4": 1, "d7": 0},
        "c": {"d5": 2, "d6": 1},
    }
    rankings = {
        "a": ["d3", "d2", "x1", "d1", "x2", "x3", "x4", "x5", "x6", "x7", "d9"] + [f"y{i}" for i in range(100)],
        "b": [f"z{i}" for i in range(12)] + ["d4"],
        "c": ["d6", "d5"],
    }
    qrels = [ir_measures.Qrel(q, d, g) for q, docs in grades.items() for d, g in docs.items()]
    run = [ir_measures.ScoredDoc(q, d, 1000.0 - rank) for q, docs in rankings.items() for rank, d in enumerate(docs)]
    for threshold in (1, 2):
        measures = [ir_measures.nDCG @ 10, ir_measures.RR(rel=threshold) @ 10, ir_measures.R(rel=threshold) @ 100]
        oracle = ir_measures.calc_aggregate(measures, qrels, run)
        ours = mean_measures(
            [query_measures(rankings[q], grades[q], threshold) for q in grades if max(grades[q].values()) >= threshold]
        )
        if threshold == 1:  # every query has a passage at the threshold
            assert ours["ndcg@10"] == pytest.approx(oracle[measures[0]])
            assert ours["mrr@10"] == pytest.approx(oracle[measures[1]])
            assert ours["recall@100"] == pytest.approx(oracle[measures[2]])
        else:  # b has none at grade 2: left out here, scored 0 by trec_eval's averages over all queries
            kept = [q for q in grades if max(grades[q].values()) >= threshold]
            per_query = {(r.measure, r.query_id): r.value for r in ir_measures.iter_calc(measures, qrels, run)}
            assert ours["mrr@10"] == pytest.approx(sum(per_query[measures[1], q] for q in kept) / len(kept))
            assert ours["recall@100"] == pytest.approx(sum(per_query[measures[2], q] for q in kept) / len(kept))


def test_chunked_exact_search_keeps_the_true_top_k():
    generator = torch.Generator().manual_seed(0)
    queries, passages = torch.randn(7, 16, generator=generator), torch.randn(530, 16, generator=generator)
    for similarity in ("cosine", "dot"):
        search = TopK(queries, 20, similarity)
        for start in range(0, 530, 64):
            search.add(passages[start : start + 64], torch.arange(start, min(start + 64, 530)))
        if similarity == "cosine":
            full = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(passages, dim=1).T
        else:
            full = queries @ passages.T
        assert search.ranking() == full.topk(20, dim=1).indices.tolist()


def oracle_retrieval(model_dir: Path, folder: Path, layer: int) -> dict[str, dict[str, float]]:
    """Mean-pooled hidden state ``layer`` of the model read with transformers alone, every corpus passage
    ranked for each test query, scored by ir_measures."""
    ir_measures = pytest.importorskip("ir_measures")
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()

    def encode(texts):
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[layer]
        mask = batch["attention_mask"][..., None].float()
        return (hidden * mask).sum(1) / mask.sum(1)

    corpus = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]
    queries = {
        record["_id"]: record["text"] for record in map(json.loads, (folder / "queries.jsonl").read_text().splitlines())
    }
    judged = judged_queries(beir_folder(folder, CollectionOptions()), CollectionOptions())
    test = [query for query in judged.query_ids["test"] if query in judged.positives]
    passages = encode([f"{r['title']} {r['text']}" if r["title"] else r["text"] for r in corpus])
    vectors = encode([queries[query] for query in test])
    qrels = [ir_measures.Qrel(q, d, g) for q in test for d, g in judged.grades[q].items()]
    measures = {"ndcg@10": ir_measures.nDCG @ 10, "mrr@10": ir_measures.RR @ 10, "recall@100": ir_measures.R @ 100}
    found = {}
    for similarity in ("cosine", "dot"):
        if similarity == "cosine":
            scores = torch.nn.functional.normalize(vectors, dim=1) @ torch.nn.functional.normalize(passages, dim=1).T
        else:
            scores = vectors @ passages.T
        run = [
            ir_measures.ScoredDoc(q, r["_id"], float(scores[i, j]))
            for i, q in enumerate(test)
            for j, r in enumerate(corpus)
        ]
        values = ir_measures.calc_aggregate(list(measures.values()), qrels, run)
        found[similarity] = {name: values[measure] for name, measure in measures.items()}
    return found


def test_a_data_file_by_another_path_spelling_is_the_same_cell(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    """``./df/train.jsonl`` and ``df/train.jsonl`` are one setting: the same cells, one stored probe set."""
    monkeypatch.chdir(Path(probe_files[0]).parent.parent)
    folder = Path(probe_files[0]).parent.name

    def cells(prefix: str) -> list[str]:
        options = {
            "data": {
                "model": str(tiny_bert_dir),
                "dataset": "toy",
                "source": "local",
                "train_file": f"{prefix}{folder}/train.jsonl",
                "test_file": f"{prefix}{folder}/test.jsonl",
                "cache_dir": str(tmp_path / "cache"),
                "layers": [1],
            },
            "results": {"run_dir": str(tmp_path / "run")},
        }
        return [cell.id for cell in build(options).plan()]

    assert cells("./") == cells("")
