"""report.md from synthetic inputs: every figure linked, every table number recomputed here."""

import csv
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from scipy.stats import binomtest
from test_figures import (
    FORMATS,
    LAYERS,
    MODELS,
    NUM_PASSAGES,
    NUM_TEST,
    NUM_TRAIN,
    PROBES,
    assert_figure_file,
    flagged_layers,
    shipped_curve,
    write_attribution_run,
    write_results,
)

from dkacq.cli import main
from dkacq.encoders.presets import (
    BACKBONES,
    POOLING_BASES,
    PRESETS,
    STUDY_ORDER,
    base_model_for,
    control_label,
    model_sort_key,
    split_control_label,
)
from dkacq.formats.results import RESULT_COLUMNS, accuracy_values, write_predictions
from dkacq.probe.baselines import SHORTCUT
from dkacq.report.summary import write_report

BASE, TUNED = MODELS


def parse_tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Heading -> the rows of the table under it (the report has at most one per heading)."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, header = None, None
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if header is None:
            header, tables[heading] = cells, []
        elif set(line) != set("|-"):
            assert len(cells) == len(header), line
            tables[heading].append(dict(zip(header, cells)))
    return tables


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    results_csv, outcomes = write_results(root / "probe")
    runs = [write_attribution_run(root / "tuned", TUNED, seed=1), write_attribution_run(root / "base", BASE, seed=2)]
    report = write_report([results_csv], runs, root / "out")
    return report, report.read_text(), parse_tables(report.read_text()), outcomes, runs


def expected_figures(figure_format: str) -> set[str]:
    run_slugs = [f"{model}-cls-nq-test-query" for model in (TUNED, BASE)]
    return {
        f"probe_nq_cls.{figure_format}",
        f"active_fraction_vs_threshold.{figure_format}",
        *(f"attribution_{slug}_t{t}.{figure_format}" for slug in run_slugs for t in ("0.1", "0.2")),
        *(f"compare_{run_slugs[0]}_vs_{run_slugs[1]}_t{t}.{figure_format}" for t in ("0.1", "0.2")),
    }


def test_every_figure_exists_and_is_linked(built):
    report, markdown, *_ = built
    out = report.parent
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    expected = expected_figures("png")
    assert set(links) == expected == {p.name for p in out.glob("*.png")}
    for name in expected:
        assert_figure_file(out / name, "png")
    assert "[published_differences.csv](published_differences.csv)" in markdown
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp") == []


@pytest.mark.parametrize("figure_format", [f for f in FORMATS if f != "png"])
def test_report_in_vector_formats(tmp_path, figure_format):
    results_csv, _ = write_results(tmp_path / "probe")
    runs = [
        write_attribution_run(tmp_path / "tuned", TUNED, seed=1),
        write_attribution_run(tmp_path / "base", BASE, seed=2),
    ]
    report = write_report([results_csv], runs, tmp_path / "out", figure_format=figure_format)
    markdown = report.read_text()
    links = re.findall(r"\]\(([^)]+\.(?:png|pdf|svg))\)", markdown)
    expected = expected_figures(figure_format)
    assert sorted(links) == sorted(expected)
    assert {p.name for p in report.parent.iterdir() if p.suffix in (".png", ".pdf", ".svg")} == expected
    for name in expected:
        assert_figure_file(report.parent / name, figure_format)
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert set(embedded) == (set() if figure_format == "pdf" else expected)
    with pytest.raises(ValueError, match="unknown figure format 'jpg'"):
        write_report([results_csv], [], tmp_path / "jpg", figure_format="jpg")


def _acc(outcomes, model, n, probe, layer) -> float:
    return float(outcomes[(model, n, probe, layer)].mean())


def _ci(outcomes, model, n, probe, layer) -> str:
    """The Wilson 95% interval by scipy, as the report prints it."""
    correct = outcomes[(model, n, probe, layer)]
    ci = binomtest(int(correct.sum()), len(correct)).proportion_ci(method="wilson")
    return f"[{ci.low:.4f}, {ci.high:.4f}]"


def test_accuracy_table(built):
    _, _, tables, outcomes, _ = built
    rows = {(r["model"], int(r["N"]), r["probe"]): r for r in tables["Accuracy per probe"]}
    assert len(rows) == len(MODELS) * len(NUM_PASSAGES) * len(PROBES)
    for (model, n, probe), row in rows.items():
        accs = [_acc(outcomes, model, n, probe, layer) for layer in LAYERS]
        best = int(np.argmax(accs))
        assert (row["layers"], row["last layer"], row["last-layer acc"]) == ("3", "2", f"{accs[-1]:.4f}")
        assert row["last-layer 95% CI"] == _ci(outcomes, model, n, probe, 2)
        assert row["train / test"] == f"{NUM_TRAIN[n]:,} / {NUM_TEST:,}"
        assert (row["best layer"], row["best acc"]) == (str(best), f"{accs[best]:.4f}")
        assert row["best 95% CI"] == _ci(outcomes, model, n, probe, best)
        if model == BASE:
            assert row["layers ≠ base"] == "base"
            continue
        assert row["layers ≠ base"] == f"{len(flagged_layers(outcomes, model, BASE, n, probe))}/3"
    assert any(r["layers ≠ base"] not in ("base", "0/3") for r in rows.values())


def test_head_table(built):
    _, _, tables, outcomes, _ = built
    rows = tables["Probe heads and baselines"]
    assert len(rows) == len(MODELS) * len(NUM_PASSAGES)
    for row in rows:
        model, n = row["model"], int(row["N"])
        assert row["chance"] == f"{1 / n:.4f}"
        assert [key for key in row if key.endswith("(last)")] == [f"{probe} (last)" for probe in PROBES]
        for probe in PROBES:
            accs = [_acc(outcomes, model, n, probe, layer) for layer in LAYERS]
            best = int(np.argmax(accs))
            assert row[f"{probe} (last)"] == f"{accs[-1]:.4f} {_ci(outcomes, model, n, probe, 2)}"
            assert row[f"{probe} (best)"] == f"{max(accs):.4f} {_ci(outcomes, model, n, probe, best)}"


def test_published_differences(built):
    report, _, tables, outcomes, _ = built
    published = {
        (m, n, layer): acc for m in MODELS for n in NUM_PASSAGES for layer, acc, _ in shipped_curve("nq", "cls", m, n)
    }
    rows = tables["Differences from the published accuracies"]
    assert len(rows) == len(MODELS) * len(NUM_PASSAGES)
    for row in rows:
        model, n = row["model"], int(row["N"])
        differences = [_acc(outcomes, model, n, "concat", layer) - published[(model, n, layer)] for layer in LAYERS]
        assert (row["layers compared"], row["last layer"]) == ("3", "2")
        assert row["ours"] == f"{_acc(outcomes, model, n, 'concat', 2):.4f}"
        assert row["published"] == f"{published[(model, n, 2)]:.4f}"
        assert row["difference"] == f"{differences[-1]:+.4f}"
        assert row["mean difference"] == f"{np.mean(differences):+.4f}"
        assert row["largest abs. difference"] == f"{max(map(abs, differences)):.4f}"
    with (report.parent / "published_differences.csv").open(newline="") as handle:
        cells = list(csv.DictReader(handle))
    assert len(cells) == len(MODELS) * len(NUM_PASSAGES) * len(LAYERS)
    for cell in cells:
        key = (cell["model"], int(cell["num_passages"]), int(cell["layer"]))
        assert float(cell["published"]) == pytest.approx(published[key], abs=5e-5)


def test_attribution_table(built):
    _, _, tables, _, runs = built
    rows = tables["Neuron attribution"]
    assert len(rows) == 4
    for row in rows:
        run = runs[0] if row["model"] == TUNED else runs[1]
        counts = load_file(str(run / "counts.safetensors"))
        assert row["texts"] == "50"
        for side in ("intermediate", "output"):
            matrix = counts[f"{side}@{row['threshold']}"]
            total = sum(int(v) for v in matrix.ravel())
            assert row[f"{side} active %"] == f"{total / (matrix.size * 50) * 100:.2f}"


def test_base_model_override_and_no_overlay(tmp_path):
    results_csv, _ = write_results(tmp_path / "probe", seed=3)
    report = write_report([results_csv], [], tmp_path / "out", base_models={"cls": TUNED}, published_overlay=False)
    tables = parse_tables(report.read_text())
    marks = {r["model"]: r["layers ≠ base"] for r in tables["Accuracy per probe"]}
    assert marks[TUNED] == "base" and re.fullmatch(r"\d/3", marks[BASE])
    assert "Neuron attribution" not in tables
    assert_figure_file(tmp_path / "out" / "probe_nq_cls.png", "png")


def test_report_without_inputs_is_refused(tmp_path, capsys):
    with pytest.raises(
        ValueError,
        match=r"^nothing to report: give results tables \(--results\) or attribution run "
        r"folders \(--attributions\)$",
    ):
        write_report([], [], tmp_path / "empty")
    with pytest.raises(ValueError, match="^nothing to report") as error:
        main(["report", f"--out_dir={tmp_path / 'empty'}"])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "empty").exists()


def test_report_usage_names_the_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["report", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dkacq report ") and "--format {png,pdf,svg}" in out


def _inputs_line(report) -> str:
    return next(line for line in report.read_text().splitlines() if line.startswith("Inputs: "))


def test_report_takes_a_bare_path_or_a_list(tmp_path, capsys):
    results_csv, _ = write_results(tmp_path / "probe")
    runs = [
        write_attribution_run(tmp_path / "tuned", TUNED, seed=1),
        write_attribution_run(tmp_path / "base", BASE, seed=2),
    ]
    main(
        [
            "report",
            "--results",
            str(results_csv),
            "--attributions",
            str(runs[0]),
            f"--out_dir={tmp_path / 'bare'}",
            "--format",
            "svg",
        ]
    )
    report = tmp_path / "bare" / "report.md"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(report)
    assert _inputs_line(report) == f"Inputs: `{results_csv}`, `{runs[0]}`"
    assert "![probe accuracy, nq, cls](probe_nq_cls.svg)" in report.read_text()
    assert_figure_file(tmp_path / "bare" / "probe_nq_cls.svg", "svg")

    main(
        [
            "report",
            f"--results=[{results_csv}]",
            f"--attributions=[{runs[0]}, {runs[1]}]",
            f"--out_dir={tmp_path / 'list'}",
        ]
    )
    report = tmp_path / "list" / "report.md"
    assert _inputs_line(report) == f"Inputs: `{results_csv}`, `{runs[0]}`, `{runs[1]}`"
    assert f"### {TUNED} against {BASE}" in report.read_text()
    assert (tmp_path / "list" / "probe_nq_cls.png").is_file()


def test_model_facts_beside_the_presets():
    labels = {preset.label for preset in PRESETS.values()}
    assert STUDY_ORDER == (
        "bert-base-uncased",
        "dpr-question",
        "dpr-context",
        "dpr-paired",
        "contriever",
        "llama",
        "repllama",
        "minilm",
        "smollm",
        "smollm-instruct-q4_1",
    )
    assert set(BACKBONES) | set(BACKBONES.values()) | set(POOLING_BASES.values()) <= labels
    assert [base_model_for(p) for p in ("cls", "mean", "eos", "eos_reference", "other")] == [
        "bert-base-uncased",
        "bert-base-uncased",
        "llama",
        "llama",
        None,
    ]
    assert base_model_for("mean", {"mean": "minilm-random"}) == "minilm-random"
    for seed, label in [(0, "minilm-random"), (3, "minilm-random-seed3")]:
        assert control_label("minilm", seed) == label == PRESETS["minilm"].randomized(seed).label
        assert split_control_label(label) == ("minilm", seed)
    assert split_control_label("minilm") is None and split_control_label("randomized") is None
    shuffled = ["zeta", "minilm-random-seed2", "dpr-question", "minilm", "alpha", "minilm-random", "bert-base-uncased"]
    assert sorted(shuffled, key=model_sort_key) == [
        "bert-base-uncased",
        "dpr-question",
        "minilm",
        "minilm-random",
        "minilm-random-seed2",
        "alpha",
        "zeta",
    ]


def test_runs_compared_with_backbone_and_control(tmp_path):
    runs = [
        write_attribution_run(tmp_path / "tuned", TUNED, seed=1),
        write_attribution_run(tmp_path / "control", control_label(TUNED), seed=2),
        write_attribution_run(tmp_path / "base", BASE, seed=3),
    ]
    markdown = write_report([], runs, tmp_path / "out").read_text()
    compared = re.findall(r"^### (\S+) against (\S+) \((.+)\)$", markdown, flags=re.MULTILINE)
    assert compared == [
        (TUNED, control_label(TUNED), "trained vs its random-init control"),
        (TUNED, BASE, "fine-tuned vs its backbone"),
    ]


FIXED, STOPPED = "30 epochs", "early stopping on val/loss min, patience 10, at most 300 epochs"


def _write_mode_table(folder, mode: str, outcomes: dict) -> None:
    """A results table of one fitting mode: minilm and its control at N = 5, layers 0 and 1, concat and
    query_aware (fitted), similarity_cosine and the shortcut (untrained, the same cells in every mode)."""
    folder.mkdir(parents=True)
    rows = []
    for (model, probe, layer), correct in outcomes.items():
        trained = probe in ("concat", "query_aware")
        name = f"predictions/{model}-{probe}-{layer}.safetensors"
        labels = torch.zeros(len(correct), dtype=torch.int64)
        flags = torch.tensor(correct, dtype=torch.uint8)
        write_predictions(folder / name, {"correct": flags, "label": labels, "prediction": 1 - flags}, {})
        rows.append(
            {
                "dataset": "demo",
                "model": model,
                "pooling": "mean",
                "num_passages": 5,
                "layer": layer,
                "probe": probe,
                "best_epoch": (29 if layer == 1 else 3) if trained else "",
                "val_acc": 0.4 if trained else "",
                **accuracy_values(np.array(correct)),
                "num_train": 1671,
                "num_test": len(correct),
                "max_epochs": (30 if mode == FIXED else 300) if trained else "",
                "epochs_run": (30 if mode == FIXED else 57) if trained else "",
                "optimizer_steps": (210 if mode == FIXED else 399) if trained else "",
                "best_is_last": int(layer == 1 and mode == FIXED) if trained else "",
                "fit_seconds": 2.5 if trained else "",
                "early_stopping": "val/loss min, patience 10" if trained and mode == STOPPED else "",
                "cell_id": f"{mode}-{model}-{probe}-{layer}" if trained else f"{model}-{probe}-{layer}",
                "predictions": name,
            }
        )
    with (folder / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def test_two_fitting_modes_are_reported_and_compared(tmp_path):
    rng = np.random.default_rng(0)

    def outcomes(rate: float) -> list[int]:
        return (rng.random(200) < rate).astype(int).tolist()

    shared = {
        **{(m, "similarity_cosine", layer): outcomes(0.25) for m in ("minilm", "minilm-random") for layer in (0, 1)},
        **{(m, SHORTCUT, -1): [1] * 60 + [0] * 140 for m in ("minilm", "minilm-random")},
    }
    rates = {
        FIXED: {"minilm": (0.25, 0.6), "minilm-random": (0.25, 0.27)},  # (concat, query_aware) at layer 1
        STOPPED: {"minilm": (0.3, 0.32), "minilm-random": (0.26, 0.27)},
    }
    tables = {}
    for number, mode in enumerate((FIXED, STOPPED)):
        written = dict(shared)
        for model, (concat, query_aware) in rates[mode].items():
            for layer in (0, 1):
                written[(model, "concat", layer)] = outcomes(concat)
                written[(model, "query_aware", layer)] = outcomes(query_aware if layer == 1 else 0.25)
        if mode == STOPPED:  # converged, minilm's query_aware probe is no better than its concat probe
            written[("minilm", "query_aware", 1)] = list(written[("minilm", "concat", 1)])
        _write_mode_table(tmp_path / f"mode{number}", mode, written)
        tables[mode] = written
    report = write_report(
        [tmp_path / "mode0" / "results.csv", tmp_path / "mode1" / "results.csv"],
        [],
        tmp_path / "out",
        base_models={"mean": "minilm-random"},
        published_overlay=False,
    )
    markdown = report.read_text()
    parsed = parse_tables(markdown)
    for mode in (FIXED, STOPPED):
        assert f"## Linear probes: {mode}" in markdown
        rows = parsed[f"Accuracy per probe ({mode})"]
        assert {(r["model"], r["probe"]) for r in rows} == {
            (m, p) for m in ("minilm", "minilm-random") for p in ("concat", "query_aware", "similarity_cosine")
        }
        for row in rows:
            correct = tables[mode][(row["model"], row["probe"], 1)]
            assert row["last-layer acc"] == f"{np.mean(correct):.4f}"
        figure = f"probe_demo_mean_{re.sub(r'[^A-Za-z0-9._-]+', '-', mode).strip('-')}.png"
        assert f"]({figure})" in markdown and (tmp_path / "out" / figure).is_file()
    # the cells whose best epoch was the last: layer 1 of every fitted probe of the fixed mode
    last = parsed[f"Cells whose best epoch was the last ({FIXED})"]
    assert sorted((r["model"], r["probe"], r["layer"]) for r in last) == sorted(
        (m, p, "1") for m in ("minilm", "minilm-random") for p in ("concat", "query_aware")
    )
    assert "0 of 8 fitted probes were best at the last epoch" in markdown
    # the shortcut, once per data set and N, for both settings that share it
    (shortcut,) = parsed["Query-blind shortcut (shortcut_least_negative)"]
    wilson = binomtest(60, 200).proportion_ci(method="wilson")
    assert (shortcut["shortcut acc"], shortcut["95% CI"]) == ("0.3000", f"[{wilson.low:.4f}, {wilson.high:.4f}]")
    assert shortcut["settings"] == "minilm (mean), minilm-random (mean)" and shortcut["chance"] == "0.2000"
    # the modes compared: the verdicts recomputed with scipy's binomial test
    (summary_rows,) = [parsed["Fitting modes compared"]]
    assert [(r["mode"], r["fitted probes"], r["best = last"]) for r in summary_rows] == [
        (FIXED, "8", "4/8"),
        (STOPPED, "8", "0/8"),
    ]
    comparisons = {r["model"]: r for r in parsed["Head against concat at the last layer, per mode"]}
    assert set(comparisons) == {"minilm", "minilm-random"}
    for model, row in comparisons.items():
        verdicts = []
        for mode in (FIXED, STOPPED):
            head, concat = (np.array(tables[mode][(model, probe, 1)], bool) for probe in ("query_aware", "concat"))
            only_head, only_concat = int(np.sum(head & ~concat)), int(np.sum(~head & concat))
            discordant = only_head + only_concat
            p_value = binomtest(min(only_head, only_concat), discordant).pvalue if discordant else 1.0
            assert row[f"p ({mode})"] == f"{p_value:.3g}"
            assert row[f"acc ({mode})"] == f"{head.mean():.4f} vs {concat.mean():.4f}"
            verdict = "no significant difference" if p_value >= 0.05 else "query_aware better"
            assert row[f"verdict ({mode})"] == verdict
            verdicts.append(verdict)
        assert row["changes"] == ("no" if verdicts[0] == verdicts[1] else "**yes**")
    assert comparisons["minilm"]["changes"] == "**yes**" and comparisons["minilm-random"]["changes"] == "no"
    assert "The conclusions change in 1 of 2 comparisons: minilm N=5 query_aware vs concat at layer 1." in markdown
