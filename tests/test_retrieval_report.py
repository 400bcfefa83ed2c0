"""``dkacq report`` draws the per-layer retrieval rows (``retrieval.csv``) beside the probe rows."""

import pytest
from test_figures import write_table

from dkacq.formats.errors import DkacqError
from dkacq.formats.retrieval import RETRIEVAL_FILE, check_retrieval, retrieval_row, upsert_retrieval
from dkacq.report.retrieval_figures import draw_retrieval_curves, read_retrieval_results
from dkacq.report.summary import write_report

# (model, pooling, similarity) -> (nDCG@10, MRR@10, R@100) at layers 0, 1, 2
WRITTEN = {
    ("minilm", "mean", "cosine"): [(0.10, 0.08, 0.50), (0.30, 0.25, 0.70), (0.20, 0.18, 0.65)],
    ("minilm", "mean", "dot"): [(0.05, 0.04, 0.40), (0.12, 0.11, 0.55), (0.22, 0.21, 0.66)],
    ("contriever", "mean", "cosine"): [(0.15, 0.11, 0.52), (0.35, 0.31, 0.80), (0.45, 0.40, 0.90)],
}


def write_retrieval(folder, scope="corpus", written=WRITTEN):
    rows = []
    for (model, pooling, similarity), values in written.items():
        for layer, (ndcg, mrr, recall) in enumerate(values):
            key = {"dataset": "scifact", "model": model, "pooling": pooling, "layer": layer, "similarity": similarity}
            measures = {"ndcg@10": ndcg, "mrr@10": mrr, "recall@100": recall}
            counts = {"scope": scope, "num_queries": 300, "num_passages": 5183, "seconds": "1.0"}
            rows.append(retrieval_row(key, {**key, "scope": scope}, counts | measures))
    upsert_retrieval(folder / RETRIEVAL_FILE, rows)


def test_each_curve_is_drawn_at_its_layers_with_its_similarity_and_scope(tmp_path):
    write_retrieval(tmp_path)
    rows = read_retrieval_results([tmp_path / RETRIEVAL_FILE, tmp_path / RETRIEVAL_FILE])  # a table twice: once
    figure = draw_retrieval_curves(rows, "scifact")
    ndcg, recall = figure.axes[:2]
    assert (ndcg.get_ylabel(), recall.get_ylabel()) == ("nDCG@10", "Recall@100")
    for ax, column in ((ndcg, 0), (recall, 2)):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {" ".join(key) for key in WRITTEN}
        for key, values in WRITTEN.items():
            line = lines[" ".join(key)]
            assert list(line.get_xdata()) == [0, 1, 2]
            assert list(line.get_ydata()) == pytest.approx([value[column] for value in values])
        assert lines["minilm mean cosine"].get_linestyle() != lines["minilm mean dot"].get_linestyle()
        assert lines["minilm mean cosine"].get_color() == lines["minilm mean dot"].get_color()
        assert lines["minilm mean cosine"].get_color() != lines["contriever mean cosine"].get_color()
    assert "over the whole corpus (300 test queries, corpus of 5,183 passages)" in figure.get_suptitle()

    pool = tmp_path / "pool"
    pool.mkdir()
    write_retrieval(pool, "pool", {("minilm", "mean", "cosine"): WRITTEN["minilm", "mean", "cosine"]})
    figure = draw_retrieval_curves(read_retrieval_results([pool / RETRIEVAL_FILE]), "scifact")
    assert "re-ranking each test query's BM25 top 100" in figure.get_suptitle()
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["minilm mean cosine (pool)"]
    with pytest.raises(ValueError, match="more than one retrieval row for scifact minilm mean 0 cosine"):
        read_retrieval_results([tmp_path / RETRIEVAL_FILE, pool / RETRIEVAL_FILE])
    (tmp_path / "bad.csv").write_text("dataset,model\nscifact,minilm\n")
    with pytest.raises(DkacqError, match="not a dkacq retrieval table"):
        read_retrieval_results([tmp_path / "bad.csv"])
    # dkacq fit's check before any work refuses it too (it used to fail on a missing cell_id after the probes)
    row = retrieval_row({"dataset": "scifact", "model": "minilm", "pooling": "mean", "layer": 0}, {"a": 1}, {})
    with pytest.raises(DkacqError, match="bad.csv: not a dkacq retrieval table"):
        check_retrieval(tmp_path / "bad.csv", [row | {"similarity": "cosine"}])
    assert (tmp_path / "bad.csv").read_text() == "dataset,model\nscifact,minilm\n"


def test_report_tables_the_best_and_last_layer_of_each_curve(tmp_path):
    run = tmp_path / "run"
    results = write_table(run, [{"model": "minilm", "layer": 1, "test_acc": 0.5, "pooling": "mean"}])
    write_retrieval(run)
    text = write_report([results], [], tmp_path / "report", published_overlay=False).read_text()
    section = text[text.index("## Each layer as a retriever") :]
    assert "### scifact: over the whole corpus (300 test queries, corpus of 5,183 passages)" in section
    assert "![retrieval measures per layer, scifact](retrieval_scifact.png)" in section
    assert (tmp_path / "report" / "retrieval_scifact.png").is_file()
    assert "| minilm | mean | cosine | corpus | 1 | 0.300 | 0.250 | 0.700 | 2 | 0.200 | 0.180 | 0.650 |" in section
    assert "| minilm | mean | dot | corpus | 2 | 0.220 | 0.210 | 0.660 | 2 | 0.220 | 0.210 | 0.660 |" in section
    assert "| contriever | mean | cosine | corpus | 2 | 0.450 | 0.400 | 0.900 | 2 | 0.450 | 0.400 | 0.900 |" in section
