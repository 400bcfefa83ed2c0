"""Nothing the user wrote is lost: a results table that is not dkacq's, is cut short or cannot be written is
refused in one line before any work and left as it was; a user's own columns survive every write."""

import csv

import pytest
import torch
from forked import run

from dkacq.formats.atomic import check_writable
from dkacq.formats.errors import DkacqError
from dkacq.formats.results import (
    CONVERGENCE_COLUMNS,
    RESULT_COLUMNS,
    ProbeCell,
    ResultConflictError,
    ResultsTableError,
    check_cells,
    read_table,
    upsert_result,
    write_predictions,
)


def _cell(layer: int = 0, lr: float = 0.05) -> ProbeCell:
    return ProbeCell("toy", "m", "mean", 3, layer, "concat", {"model": {"learning_rate": lr}, "layer": layer})


def _row(cell: ProbeCell, **values) -> dict:
    return (
        {column: "" for column in RESULT_COLUMNS}
        | {
            "dataset": cell.dataset,
            "model": cell.model,
            "pooling": cell.pooling,
            "num_passages": str(cell.num_passages),
            "layer": str(cell.layer),
            "probe": cell.probe,
            "test_acc": "0.5",
            "cell_id": cell.id,
        }
        | values
    )


def _write(path, header, rows, delimiter=",", end="\r\n"):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file, delimiter=delimiter, lineterminator=end)
        writer.writerow(header)
        writer.writerows([row.get(column, "") for column in header] for row in rows)


def test_a_users_columns_are_kept_where_they_are_with_their_values(tmp_path):
    path = tmp_path / "results.csv"
    header = ["notes", *RESULT_COLUMNS, "reviewed"]
    _write(path, header, [_row(_cell(0)) | {"notes": "odd, check", "reviewed": "yes"}])
    upsert_result(path, _cell(1), {"test_acc": "0.4"})
    upsert_result(path, _cell(0), {"test_acc": "0.6"})
    found_header, rows = read_table(path)
    assert found_header == header
    by_layer = {row["layer"]: row for row in rows}
    assert (by_layer["1"]["notes"], by_layer["1"]["reviewed"], by_layer["1"]["test_acc"]) == ("", "", "0.4")
    assert (by_layer["0"]["notes"], by_layer["0"]["reviewed"], by_layer["0"]["test_acc"]) == (
        "odd, check",
        "yes",
        "0.6",
    )


def test_an_older_table_gains_the_columns_it_lacks_and_keeps_its_rows(tmp_path):
    path = tmp_path / "results.csv"
    older = [column for column in RESULT_COLUMNS if column not in ("test_acc_low", "test_acc_high", "fit_seconds")]
    _write(path, older, [_row(_cell(0))])
    upsert_result(path, _cell(1), {"test_acc": "0.4", "fit_seconds": "1.5"})
    header, rows = read_table(path)
    assert header == older + ["test_acc_low", "test_acc_high", "fit_seconds"]
    assert [(row["layer"], row["fit_seconds"]) for row in rows] == [("0", ""), ("1", "1.5")]


@pytest.mark.parametrize(
    "content, message",
    [
        ("dataset;model;pooling;num_passages;layer;probe;test_acc;cell_id\r\ntoy;m;mean;3;0;concat;0.5;x\r\n", "';'"),
        ("name,score\r\na,1\r\n", "no dataset, model, pooling"),
        ("dataset,model,pooling,num_passages,layer,probe,test_acc,cell_id\r\ntoy,m,mean,3,0,concat,0.5,ab", "line 2"),
        ('dataset,model,pooling,num_passages,layer,probe,test_acc,cell_id\r\ntoy,m,mean,3,0,concat,0.5,"ab', "cut"),
        ("dataset,model,pooling,num_passages,layer,probe,test_acc,cell_id\r\ntoy,m,mean,3,0\r\n", "line 2 has 5"),
    ],
    ids=["semicolons", "foreign", "cut-no-newline", "cut-in-quote", "short-row"],
)
def test_a_table_dkacq_cannot_read_is_refused_in_one_line_and_left_as_it_was(content, message, tmp_path):
    path = tmp_path / "results.csv"
    path.write_bytes(content.encode())
    for attempt in (lambda: read_table(path), lambda: upsert_result(path, _cell(), {"test_acc": "0.5"})):
        with pytest.raises(ResultsTableError, match=message) as error:
            attempt()
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    assert path.read_bytes() == content.encode()


def test_a_read_only_table_and_a_file_in_place_of_a_folder_are_refused(tmp_path):
    path = tmp_path / "results.csv"
    _write(path, RESULT_COLUMNS, [_row(_cell())])
    path.chmod(0o444)
    with pytest.raises(DkacqError, match=r"read-only \(mode 444\)"):
        check_writable(path)
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(DkacqError, match="a file, where dkacq needs a folder"):
        check_writable(tmp_path / "run" / "results.csv")
    check_writable(tmp_path / "new" / "deeper" / "results.csv")  # folders yet to be made: fine
    assert not (tmp_path / "new").exists()


def test_a_conflict_says_what_differs_even_when_only_the_type_of_a_value_does(tmp_path):
    path = tmp_path / "results.csv"
    old = ProbeCell("toy", "m", "mean", 3, 0, "concat", {"model": {"learning_rate": 1}, "layer": 0})
    new = ProbeCell("toy", "m", "mean", 3, 0, "concat", {"model": {"learning_rate": 1.0}, "layer": 0})
    predictions = tmp_path / "predictions" / "old.safetensors"
    outcomes = {name: torch.zeros(2, dtype=torch.long) for name in ("label", "prediction", "correct")}
    write_predictions(predictions, outcomes, old.identity)
    older = [column for column in RESULT_COLUMNS if column not in CONVERGENCE_COLUMNS]
    _write(path, older, [_row(old, predictions="predictions/old.safetensors")])
    with pytest.raises(
        ResultConflictError, match=r"model\.learning_rate 1 -> 1\.0; the table, an older dkacq's, lacks"
    ):
        check_cells(path, [new])
    predictions.unlink()
    with pytest.raises(ResultConflictError, match="its outcome file records no identity"):
        check_cells(path, [new])


def test_fit_refuses_a_semicolon_or_read_only_table_before_any_work(tiny_bert_dir, probe_files, tmp_path, monkeypatch):
    monkeypatch.setattr("dkacq.encoders.loading.load_encoders", lambda *a, **k: pytest.fail("a model was loaded"))
    folder = tmp_path / "run"
    folder.mkdir()
    table = "dataset;model;pooling;num_passages;layer;probe;test_acc;cell_id\r\ntoy;m;mean;3;0;concat;0.5;x\r\n"
    (folder / "results.csv").write_bytes(table.encode())
    train, test = probe_files
    args = ["fit", "--data.encoder=bert-mean", f"--data.model={tiny_bert_dir}", "--data.dataset=toy"]
    args += ["--data.source=local", f"--data.train_file={train}", f"--data.test_file={test}"]
    args += [f"--data.cache_dir={tmp_path / 'cache'}", f"--results.run_dir={folder}"]
    assert run(args, tmp_path).error() == (
        f"{folder / 'results.csv'}: not a dkacq results table (its fields are separated by ';', "
        "dkacq's by ','); give dkacq another results.run_dir, or save it as dkacq wrote it"
    )
    assert (folder / "results.csv").read_bytes() == table.encode()
    assert sorted(path.name for path in folder.iterdir()) == ["results.csv"]
    assert not (tmp_path / "cache").exists()

    table = table.replace(";", ",").encode()  # dkacq's, but read-only
    (folder / "results.csv").write_bytes(table)
    (folder / "results.csv").chmod(0o444)
    assert run(args, tmp_path).error() == (
        f"{folder / 'results.csv'}: read-only (mode 444); make it writable (chmod u+w) or choose another place"
    )
    assert (folder / "results.csv").read_bytes() == table and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (",".join(RESULT_COLUMNS) + "\r\n", "no rows, only a header; nothing to report from it"),
        ("dataset;model;pooling;num_passages;layer;probe;test_acc\r\nnq;m;cls;2;0;concat;0.5\r\n", "separated by ';'"),
        (
            "dataset,model,pooling,num_passages,layer,probe,test_acc\r\nnq,m,cls,2,0,concat,0.5\r\nnq,m,cls,2,1,con",
            "cut",
        ),
    ],
    ids=["header-only", "semicolons", "cut-in-last-field"],
)
def test_report_refuses_a_table_it_cannot_report_in_one_line(content, message, tmp_path):
    path = tmp_path / "results.csv"
    path.write_bytes(content.encode())
    line = run(["report", f"--results={path}", f"--out_dir={tmp_path / 'report'}"], tmp_path).error()
    assert line.startswith(f"{path}: ") and message in line
    assert not (tmp_path / "report").exists()


def test_report_says_once_which_outcome_files_are_missing(tmp_path, caplog):
    from dkacq.report.stats import read_results

    path = tmp_path / "results.csv"
    rows = [_row(_cell(layer), predictions=f"predictions/{layer}.safetensors") for layer in range(3)]
    _write(path, RESULT_COLUMNS, rows)
    (tmp_path / "predictions").mkdir()
    outcomes = {name: torch.zeros(2, dtype=torch.long) for name in ("label", "prediction", "correct")}
    write_predictions(tmp_path / "predictions/1.safetensors", outcomes, _cell(1).identity)
    with caplog.at_level("WARNING", logger="dkacq"):
        assert len(read_results([path])) == 3
    (warning,) = caplog.messages
    assert warning == (
        f"{path}: 2 of 3 rows name outcome files that are missing (predictions/0.safetensors, ...); "
        "their McNemar tests are left out"
    )
