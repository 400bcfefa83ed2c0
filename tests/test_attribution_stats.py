"""Intervals over texts and paired tests of attribution runs, against naive loops and scipy itself."""

import numpy as np
import pytest
import torch
from scipy.stats import binom, wilcoxon

from dkacq.formats.counts import AttributionRun, PerTextCounts, write_counts, write_summary
from dkacq.report.attribution_stats import (
    PUBLISHED_CLAIMS,
    bootstrap_interval,
    check_claims,
    claim_table,
    comparable_pairs,
    compare_runs,
    module_share_table,
    module_shares,
    neuron_percentage_intervals,
    paired_test,
    share_change_table,
    side_share,
)

WIDTHS = {"intermediate": 12, "output": 4}
LAYERS = 3


def naive_bootstrap(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """One resample at a time: draw n rows with replacement, average them."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = []
    for _ in range(resamples):
        rows = rng.integers(0, n, size=n)
        means.append(np.mean([values[row] for row in rows], axis=0))
    return np.array(means)


def test_bootstrap_interval_equals_a_naive_resampling_loop():
    values = np.random.default_rng(1).gamma(2.0, size=(23, 4))
    mean, low, high = bootstrap_interval(values, confidence=0.9, resamples=300, seed=7)
    naive = naive_bootstrap(values, 300, seed=7)
    np.testing.assert_allclose(mean, values.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(low, np.percentile(naive, 5, axis=0), rtol=1e-12)
    np.testing.assert_allclose(high, np.percentile(naive, 95, axis=0), rtol=1e-12)
    assert (low < mean).all() and (mean < high).all()


def test_neuron_intervals_equal_resampling_its_texts():
    """A neuron active in k of n texts: resampling its per-text 0/1 activity gives the binomial quantiles."""
    n, k = 40, 12
    activity = np.array([1.0] * k + [0.0] * (n - k))
    naive = naive_bootstrap(activity, 4000, seed=3) * 100
    low, high = neuron_percentage_intervals(np.array([k, 0, n]), n, confidence=0.9)
    one_text = 100 / n
    assert abs(low[0] - np.quantile(naive, 0.05, method="inverted_cdf")) <= one_text
    assert abs(high[0] - np.quantile(naive, 0.95, method="inverted_cdf")) <= one_text
    assert low[0] == binom.ppf(0.05, n, k / n) / n * 100
    assert (low[1], high[1], low[2], high[2]) == (0, 0, 100, 100)


def test_paired_test_is_scipys_wilcoxon():
    a = np.array([12.0, 15.5, 9.0, 20.0, 11.0, 14.0, 18.5, 10.0])
    b = np.array([10.0, 15.0, 9.5, 16.0, 8.0, 13.0, 12.5, 10.25])
    assert paired_test(a, b) == wilcoxon(a, b).pvalue
    with_ties = np.array([3.0, 3.0, 5.0, 1.0, 2.0, 4.0])
    assert paired_test(with_ties, with_ties[::-1]) == wilcoxon(with_ties, with_ties[::-1]).pvalue
    assert paired_test(a, a) == 1.0
    with pytest.raises(ValueError):
        paired_test(a, b[:3])


def make_run(folder, model, tables, keys, pooling="cls", thresholds=(0.1, 0.2), dataset="nq", widths=WIDTHS):
    """A run folder with per-text tables (``(kind, threshold)`` -> ``[texts, layers]``); per-neuron counts
    spread the same totals over the neurons."""
    write_summary(
        folder,
        {
            "model": model,
            "pooling": pooling,
            "dataset": dataset,
            "split": "test",
            "text_side": "query",
            "thresholds": list(thresholds),
            "kinds": {
                kind: {"side": "intermediate" if kind in ("intermediate", "gate_proj") else "output",
                       "num_layers": LAYERS, "num_neurons": width}
                for kind, width in widths.items()
            },
        },
    )  # fmt: skip
    counts = {}
    for (kind, threshold), table in tables.items():
        totals = torch.as_tensor(table).sum(dim=0)
        count = torch.zeros(LAYERS, widths[kind], dtype=torch.int64)
        for layer in range(LAYERS):
            count[layer] = totals[layer] // widths[kind]
            count[layer, : totals[layer] % widths[kind]] += 1
        counts[kind, threshold] = count
    tables = {key: torch.as_tensor(table, dtype=torch.int32) for key, table in tables.items()}
    write_counts(folder, counts, len(keys), PerTextCounts(list(keys), tables))
    return AttributionRun.load(folder)


def random_tables(seed, num_texts, scale=1.0, thresholds=(0.1, 0.2), widths=WIDTHS):
    rng = np.random.default_rng(seed)
    return {
        (kind, threshold): np.minimum(
            rng.binomial(width, min(0.9, scale * 0.3 / (1 + 5 * threshold)), size=(num_texts, LAYERS)), width
        )
        for kind, width in widths.items()
        for threshold in thresholds
    }


def test_module_shares_against_a_naive_loop(tmp_path):
    keys = [f"t{i}" for i in range(30)]
    tables = random_tables(0, 30)
    run = make_run(tmp_path / "run", "bert-base-uncased", tables, keys)
    rows = module_shares(run, threshold=0.2, resamples=200, seed=4)
    assert len(rows) == len(WIDTHS) * (LAYERS + 1)
    for kind, width in WIDTHS.items():
        table = tables[kind, 0.2]
        per_text = [[table[text, layer] / width * 100 for layer in range(LAYERS)] for text in range(30)]
        per_text = [row + [sum(table[text]) / (LAYERS * width) * 100] for text, row in enumerate(per_text)]
        naive = naive_bootstrap(np.array(per_text), 200, seed=4)
        for row in (row for row in rows if row.kind == kind):
            column = LAYERS if row.layer is None else row.layer
            assert row.threshold == 0.2 and row.num_texts == 30
            assert row.share == pytest.approx(np.mean([text[column] for text in per_text]), rel=1e-12)
            assert row.low == pytest.approx(np.percentile(naive[:, column], 2.5), rel=1e-12)
            assert row.high == pytest.approx(np.percentile(naive[:, column], 97.5), rel=1e-12)
    # the per-text tables sum to the per-neuron counts
    for kind in WIDTHS:
        assert (run.per_text_at(kind, 0.1).sum(axis=0) == run.counts_at(kind, 0.1).sum(axis=1)).all()


def test_compare_runs_pairs_texts_by_key(tmp_path):
    """The base run counted the texts in another order and one more: rows are paired by text key; the
    change's interval is a naive paired resampling loop, the p-values are scipy's on the hand-made shares."""
    keys = [f"t{i}" for i in range(25)]
    tuned_tables = random_tables(1, 25, scale=1.4)
    base_tables = random_tables(2, 26)
    order = list(reversed(keys)) + ["extra"]
    tuned = make_run(tmp_path / "tuned", "dpr-question", tuned_tables, keys)
    base = make_run(tmp_path / "base", "bert-base-uncased", base_tables, order)
    rows = compare_runs(tuned, base, threshold=0.1, resamples=150, seed=9)
    assert {row.kind for row in rows} == set(WIDTHS) and all(row.num_texts == 25 for row in rows)
    for kind, width in WIDTHS.items():
        mine = tuned_tables[kind, 0.1] / width * 100
        theirs = base_tables[kind, 0.1][[order.index(key) for key in keys]] / width * 100
        both = np.stack([mine, theirs], axis=1)  # [texts, 2, layers]
        naive = naive_bootstrap(both, 150, seed=9)
        for row in (row for row in rows if row.kind == kind and row.layer is not None):
            a, b = mine[:, row.layer], theirs[:, row.layer]
            assert row.share == pytest.approx(a.mean()) and row.base_share == pytest.approx(b.mean())
            assert row.p_value == wilcoxon(a, b).pvalue
            assert row.significant == (row.p_value < 0.05 / LAYERS)
            change = naive[:, 0, row.layer] - naive[:, 1, row.layer]
            assert row.change_low == pytest.approx(np.percentile(change, 2.5), rel=1e-9)
            assert row.change_high == pytest.approx(np.percentile(change, 97.5), rel=1e-9)
            relative = (naive[:, 0, row.layer] / naive[:, 1, row.layer] - 1) * 100
            assert row.relative_change == pytest.approx((a.mean() / b.mean() - 1) * 100)
            assert row.relative_low == pytest.approx(np.percentile(relative, 2.5), rel=1e-9)
    assert comparable_pairs([tuned, base]) == [(0, 1)]
    header, table = share_change_table([tuned, base], resamples=50)
    assert len(header) == len(table[0]) and len(table) == len(rows)


def shifted_tables(tables, factor):
    """The tables with every intermediate count scaled by ``factor`` (per text, rounded)."""
    return {
        key: np.minimum(np.rint(table * (factor if key[0] == "intermediate" else 1)), WIDTHS[key[0]]).astype(int)
        for key, table in tables.items()
    }


def test_published_claims_become_rows_with_intervals(tmp_path):
    keys = [f"t{i}" for i in range(60)]
    bert = random_tables(3, 60, scale=0.5)
    runs = [
        make_run(tmp_path / "bert", "bert-base-uncased", bert, keys),
        make_run(tmp_path / "dpr", "dpr-question", shifted_tables(bert, 1.36), keys),
        make_run(tmp_path / "bert-mean", "bert-base-uncased", bert, keys, pooling="mean"),
        make_run(tmp_path / "contriever", "contriever", shifted_tables(bert, 1.5), keys, pooling="mean"),
    ]
    rows = check_claims(runs, resamples=300)
    assert [(row.claim.model, row.threshold) for row in rows] == [
        ("dpr-question", 0.1),
        ("dpr-question", 0.2),
        ("contriever", 0.1),
        ("contriever", 0.2),
    ]
    dpr, contriever = rows[0], rows[2]
    assert dpr.claim is PUBLISHED_CLAIMS[0] and dpr.verdict == "holds"
    assert dpr.relative_low < dpr.relative_change < dpr.relative_high
    expected = side_share(runs[1], "intermediate", 0.1).mean() / side_share(runs[0], "intermediate", 0.1).mean() - 1
    assert dpr.relative_change == pytest.approx(expected * 100)
    assert (
        dpr.p_value
        == wilcoxon(side_share(runs[1], "intermediate", 0.1), side_share(runs[0], "intermediate", 0.1)).pvalue
    )
    assert contriever.verdict == "opposite" and contriever.relative_low > 0
    header, table = claim_table(runs, resamples=50)
    assert len(table) == 4 and len(header) == len(table[0]) and table[0][8] == "+32 to +41"
    assert check_claims(runs[:1] + runs[2:3]) == [], "no row without the claim's model"


def test_runs_without_per_text_counts_give_no_rows(tmp_path):
    summary = {
        "model": "bert-base-uncased", "pooling": "cls", "dataset": "nq", "split": "test", "text_side": "query",
        "thresholds": [0.1], "kinds": {"output": {"side": "output", "num_layers": 1, "num_neurons": 2}},
    }  # fmt: skip
    write_summary(tmp_path, summary)
    write_counts(tmp_path, {("output", 0.1): torch.tensor([[1, 0]])}, 2)
    run = AttributionRun.load(tmp_path)
    assert module_shares(run) == [] and module_share_table([run])[1] == []
    assert comparable_pairs([run, run]) == []
