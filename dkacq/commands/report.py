"""``dkacq report``: the study's figures and a Markdown summary from results tables and attribution runs."""

from pathlib import Path

from jsonargparse import auto_cli

from dkacq.report.summary import write_report


def report(
    results: list[Path] | None = None,
    attributions: list[Path] | None = None,
    out_dir: Path = Path("runs/report"),
    base_models: dict[str, str] | None = None,
    published_overlay: bool = True,
) -> Path:
    """Write the figures and ``report.md`` into ``out_dir``; print the report's path.

    Args:
        results: ``results.csv`` files of ``dkacq fit`` runs.
        attributions: output folders of ``dkacq attribute`` runs.
        out_dir: where figures and report.md go.
        base_models: pooling -> the model every model of that pooling group is tested against with
            McNemar's test (default: bert-base-uncased for cls and mean, llama for eos).
        published_overlay: draw the study's published curves beside yours.
    """
    path = write_report(list(results or []), list(attributions or []), out_dir, base_models, published_overlay)
    print(path)
    return path


def run(args: list[str]) -> None:
    auto_cli(report, args=args[1:])
