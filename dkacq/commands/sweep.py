"""``dkacq sweep``: a study config's grid of probes and attribution runs, resumable, then its report.

Each probe setting runs ``dkacq fit`` once per N with every head and layer, all into one results
table; a cell with a row of the same identity there is skipped, so a stopped sweep run again runs each
remaining cell once and none twice. An embedding cache belongs to a setting (not to N or a head), so it
is built once. An attribution run is done when its folder holds counts of the same identity.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse import auto_cli

from dkacq.commands import probe
from dkacq.commands.report import report


@dataclass
class ProbeGrid:
    """Probe cells: every setting x every N x every head x every layer."""

    config: str = "configs/probe.yaml"
    """The base ``dkacq fit`` config; settings override its ``data`` options."""
    settings: list[dict] = field(default_factory=lambda: [{"encoder": "minilm"}])
    """One dict of ``data`` options per setting, e.g. ``{encoder: minilm, random_init: true}``."""
    num_passages: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    heads: list[str] = field(default_factory=lambda: ["concat", "passage_only", "query_aware"])
    options: list[str] = field(default_factory=list)
    """Further ``dkacq fit`` arguments for every cell, e.g. ``--trainer.max_epochs=30``."""


@dataclass
class AttributionRun:
    """One ``dkacq attribute`` run."""

    model: str
    """A preset name, or ``<preset>-random`` for its random-init control."""
    name: str
    """Its output folder's name under ``<run_dir>/attribution``."""
    options: list[str] = field(default_factory=list)
    """Further ``dkacq attribute`` arguments, e.g. ``--data.text_side=passage``."""


def _option(key: str, value) -> str:
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def sweep(
    run_dir: Path = Path("runs/study"),
    data: dict | None = None,
    probes: ProbeGrid | None = None,
    attributions: list[AttributionRun] | None = None,
    base_models: dict[str, str] | None = None,
    published_overlay: bool = True,
) -> Path:
    """Check every probe cell and attribution run, run those not done yet, then write the report.

    Every cell is checked before any runs: options, layers against each model's config, and the
    results table and attribution folders for results of other settings (refused in one line).

    Args:
        run_dir: the study's folder: ``probe/results.csv``, ``attribution/<name>/``, ``report/``.
        data: ``data`` options of every probe and attribution run (dataset, source, files, hub id).
        probes: the probe grid; none when not given.
        attributions: the attribution runs.
        base_models: pooling -> base model for the report's significance tests.
        published_overlay: draw the study's published curves beside yours.
    """
    from dkacq.commands import attribute

    probe_dir = run_dir / "probe"
    shared = [_option(f"data.{key}", value) for key, value in (data or {}).items()]
    probe_args = [
        [
            "--config", probes.config,
            *shared,
            *(_option(f"data.{key}", value) for key, value in setting.items()),
            _option("data.num_passages", num_passages),
            _option("heads", probes.heads),
            _option("results.run_dir", str(probe_dir)),
            "--results.skip_finished=true",
            *probes.options,
        ]
        for setting in (probes.settings if probes else [])
        for num_passages in probes.num_passages
    ]
    attribution_args = [
        ["--model", run.model, *shared, _option("model.output_dir", str(run_dir / "attribution" / run.name)), *run.options]
        for run in attributions or []
    ]
    for args in probe_args:
        probe.run(args, run=False).plan()
    pending = []
    for args in attribution_args:
        cli = attribute.run(args, run=False)
        cli.datamodule.prepare_data()
        cli.datamodule.setup("predict")
        identity = cli.model.identity(cli.datamodule, str(cli.trainer.precision))
        if not cli.model.finished(cli.model.output_path_for(cli.datamodule), identity):
            pending.append(args)

    for args in probe_args:
        probe.run(["fit", *args])
    for args in pending:
        attribute.run(["attribute", *args])
    attribution_dirs = [run_dir / "attribution" / run.name for run in attributions or []]
    results = [probe_dir / "results.csv"] if (probe_dir / "results.csv").exists() else []
    return report(results, attribution_dirs, run_dir / "report", base_models, published_overlay)


def run(args: list[str]) -> None:
    auto_cli(sweep, args=args[1:])
