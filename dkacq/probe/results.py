"""ProbeResults: one row of ``results.csv`` and one per-example outcome file per tested probe."""

import csv
import os
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from safetensors.torch import save_file

RESULT_COLUMNS = (
    "dataset", "model", "pooling", "num_passages", "layer", "probe", "best_epoch", "val_acc", "test_acc",
    "preset", "random_init", "standardize", "num_train", "num_val", "num_test", "predictions",
)
CELL_KEY = ("dataset", "model", "pooling", "num_passages", "layer", "probe")
"""Columns that identify a probe: a second result for the same cell replaces the first."""


def probe_cell(data, probe: LightningModule) -> dict:
    """The cell a probe fills: the ``CELL_KEY`` columns of its row."""
    return dict(
        dataset=data.hparams.dataset,
        model=data.preset.label,
        pooling=data.preset.pooling,
        num_passages=data.hparams.num_passages,
        layer=data.layer,
        probe=probe.hparams.head,
    )


def cell_name(dataset: str, model: str, pooling: str, num_passages: int, layer: int, probe: str) -> str:
    return f"{dataset}-{model}-{pooling}-N{num_passages}-{probe}-layer{layer:02d}"


def _key(row: dict) -> tuple[str, ...]:
    return tuple(str(row[column]) for column in CELL_KEY)


def read_results(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def write_atomically(path: Path, write) -> None:
    """Call ``write(temporary_path)``, then rename over ``path``: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.partial")
    write(temporary)
    os.replace(temporary, path)


def upsert_result(path: Path, row: dict) -> None:
    """Add ``row`` to the results table at ``path``, replacing an earlier row of the same cell."""
    new = {column: row.get(column, "") for column in RESULT_COLUMNS}
    rows = read_results(path)
    same_cell = [i for i, old in enumerate(rows) if _key(old) == _key(row)]
    if same_cell:
        rows[same_cell[0]] = new
    else:
        rows.append(new)

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=RESULT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)


class ProbeResults(Callback):
    """After each test of a probe, record its accuracy row and its per-example outcomes."""

    def __init__(self, run_dir: str = "runs/probe", skip_finished: bool = False):
        """
        Args:
            run_dir: the run's output folder: ``results.csv``, ``predictions/`` and TensorBoard logs.
            skip_finished: leave out cells that already have a row in ``results.csv`` (to resume an
                interrupted run); otherwise a cell fitted again replaces its row.
        """
        self.run_dir = Path(run_dir)
        self.skip_finished = skip_finished

    def finished(self, cell: dict) -> bool:
        return any(_key(row) == _key(cell) for row in read_results(self.results_path))

    @property
    def results_path(self) -> Path:
        return self.run_dir / "results.csv"

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        data, outcomes = trainer.datamodule, pl_module.test_outcomes
        cell = probe_cell(data, pl_module)
        correct = (outcomes["prediction"] == outcomes["label"]).to(torch.uint8)
        predictions = Path("predictions") / f"{cell_name(**cell)}.safetensors"
        (self.run_dir / "predictions").mkdir(parents=True, exist_ok=True)
        write_atomically(
            self.run_dir / predictions,
            lambda temporary: save_file({"correct": correct, **outcomes}, str(temporary)),
        )
        sizes = data.split_sizes()
        upsert_result(
            self.results_path,
            dict(
                cell,
                best_epoch=pl_module.checkpoint_epoch if pl_module.checkpoint_epoch is not None else "",
                val_acc=f"{pl_module.checkpoint_val_acc:.5f}" if pl_module.checkpoint_val_acc is not None else "",
                test_acc=f"{correct.float().mean().item():.5f}",
                preset=data.preset.name,
                random_init=int(data.preset.random_init),
                standardize=int(data.hparams.standardize),
                num_train=sizes["train"],
                num_val=sizes["val"],
                num_test=sizes["test"],
                predictions=predictions.as_posix(),
            ),
        )
