"""report.md from synthetic inputs: every figure linked, every table number recomputed here."""

import csv
import re

import numpy as np
import pytest
from safetensors.numpy import load_file
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


def test_accuracy_table(built):
    _, _, tables, outcomes, _ = built
    rows = {(r["model"], int(r["N"]), r["probe"]): r for r in tables["Accuracy per probe"]}
    assert len(rows) == len(MODELS) * len(NUM_PASSAGES) * len(PROBES)
    for (model, n, probe), row in rows.items():
        accs = [_acc(outcomes, model, n, probe, layer) for layer in LAYERS]
        best = int(np.argmax(accs))
        assert (row["layers"], row["last layer"], row["last-layer acc"]) == ("3", "2", f"{accs[-1]:.4f}")
        assert row["train / test"] == f"{NUM_TRAIN[n]:,} / {NUM_TEST:,}"
        assert (row["best layer"], row["best acc"]) == (str(best), f"{accs[best]:.4f}")
        if model == BASE:
            assert row["layers ≠ base"] == "base"
            continue
        assert row["layers ≠ base"] == f"{len(flagged_layers(outcomes, model, BASE, n, probe))}/3"
    assert any(r["layers ≠ base"] not in ("base", "0/3") for r in rows.values())


def test_head_table(built):
    _, _, tables, outcomes, _ = built
    rows = tables["Probe heads"]
    assert len(rows) == len(MODELS) * len(NUM_PASSAGES)
    for row in rows:
        model, n = row["model"], int(row["N"])
        assert row["chance"] == f"{1 / n:.4f}"
        for probe in PROBES:
            accs = [_acc(outcomes, model, n, probe, layer) for layer in LAYERS]
            assert row[f"{probe} (last)"] == f"{accs[-1]:.4f}"
            assert row[f"{probe} (best)"] == f"{max(accs):.4f}"


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
    compared = re.findall(r"^### (\S+) against (\S+)$", markdown, flags=re.MULTILINE)
    assert compared == [(TUNED, control_label(TUNED)), (TUNED, BASE)]
