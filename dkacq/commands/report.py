"""``dkacq report``: the study's figures and a Markdown summary from results tables and attribution runs."""

from pathlib import Path
from typing import Literal

from jsonargparse import auto_cli

from dkacq.report.summary import write_report


def _paths(value: Path | list[Path] | None) -> list[Path]:
    """One path or a list of them, as a list."""
    if value is None:
        return []
    return [Path(value)] if isinstance(value, (str, Path)) else [Path(path) for path in value]


def report(
    results: Path | list[Path] | None = None,
    attributions: Path | list[Path] | None = None,
    out_dir: Path = Path("runs/report"),
    base_models: dict[str, str] | None = None,
    published_overlay: bool = True,
    format: Literal["png", "pdf", "svg"] = "png",
    comparisons: Path | list[Path] | None = None,
) -> Path:
    """Write the figures and ``report.md`` into ``out_dir``; print the report's path.

    Args:
        results: a ``results.csv`` of a ``dkacq fit`` run, or a list of them (``--results=[a.csv,b.csv]``).
        attributions: the output folder of a ``dkacq attribute`` run, or a list of them.
        out_dir: where figures and report.md go.
        base_models: pooling -> the model every model of that pooling group is tested against with
            McNemar's test (default: bert-base-uncased for cls and mean, llama for eos).
        published_overlay: draw the study's published curves beside yours.
        format: file format of every figure: png, or pdf or svg for vector figures (papers).
        comparisons: the output folder of a ``dkacq compare`` run, or a list of them: the section "What
            changed where" for each pair.
    """
    path = write_report(
        _paths(results), _paths(attributions), out_dir, base_models, published_overlay, format, _paths(comparisons)
    )
    print(path)
    return path


def run(args: list[str]) -> None:
    auto_cli(report, args=args[1:], prog="dkacq report", exit_on_error=False)
