"""The "What changed where" section: its numbers and sentences from hand-made rows."""

import pytest

from dkacq.formats.similarity import Comparison, SimilarityRow, write_comparison
from dkacq.report.similarity_figures import draw_what_changed
from dkacq.report.stats import ProbeResult
from dkacq.report.what_changed import changed_where, summary_sentences


def _comparison(tmp_path) -> Comparison:
    cka = {0: 0.9, 1: 0.7, 2: 0.4, 3: 0.2}
    rows = [
        SimilarityRow(
            "ft", "base", side, a, b, cka[a] if a == b else 0.1, cka[a] - 0.01 if a == b else 0.0, None, 9, "x", "y"
        )
        for side in ("query", "passage")
        for a in range(4)
        for b in range(4)
    ]
    summary = {"model_a": "ft", "model_b": "base", "dataset": "toy", "num_hidden_states": {"a": 4, "b": 4}}
    write_comparison(tmp_path, summary, rows)
    return Comparison.load(tmp_path)


def _probe(model, layer, head, acc, n=5):
    return ProbeResult("toy", model, "mean", n, layer, head, 3, 0.5, acc, None)


def test_sentences_state_where_cka_falls_and_what_the_probe_gains(tmp_path):
    comparison = _comparison(tmp_path)
    assert [row.layer_b for row in comparison.diagonal("query")] == [0, 1, 2, 3]
    rows = [_probe("ft", layer, "query_aware", 0.3 + 0.1 * layer) for layer in range(4)]
    rows += [_probe("base", layer, "query_aware", 0.3) for layer in range(4)]
    rows += [_probe("ft", layer, "concat", 0.9) for layer in range(4)]  # only one model has it: not drawn
    rows += [_probe("ft", 3, "query_aware", 0.95, n=2), _probe("base", 3, "similarity_cosine", 0.5)]
    changed = changed_where(comparison, rows, [])
    assert (changed.head, changed.num_passages) == ("query_aware", 5)
    text = " ".join(summary_sentences(changed))
    assert "on query texts falls below 0.5 at hidden state 2 (0.40); it is 0.20 at the last (debiased 0.19)" in text
    assert "gains +0.30 over base at hidden state 3, the last (0.60 against 0.30)." in text
    rows[2] = _probe("ft", 2, "query_aware", 0.9)  # best before the last
    text = " ".join(summary_sentences(changed_where(comparison, rows, [])))
    assert (
        "gains +0.60 over base at hidden state 2 (0.90 against 0.30) and +0.30 at the last (0.60 against 0.30)." in text
    )
    figure = draw_what_changed(changed)
    cka_axis, probe_axis = figure.axes[:2]
    assert list(cka_axis.lines[0].get_ydata()) == [0.9, 0.7, 0.4, 0.2]
    assert list(probe_axis.lines[0].get_ydata()) == pytest.approx([0.3, 0.4, 0.5, 0.6])
