"""``dkacq sweep``: a study config's grid of probes and attribution runs, resumable, then its report.

Each probe setting runs ``dkacq fit``'s cells once per N with every head and layer, all into one results
table; a cell with a row of the same identity there is skipped, so a stopped sweep run again runs each
remaining cell once and none twice. An embedding cache belongs to a setting (not to N or a head), so it
is built once, and the settings that share a cache (a setting's N values) are fitted together, layer by
layer: each layer file is read once for every N and head (:func:`dkacq.commands.probe.fit_settings`).
An attribution run is done when its folder holds counts of the same identity.
"""

import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from jsonargparse import auto_cli

from dkacq.commands import attribute, output, probe
from dkacq.commands.compare import CACHE_OPTIONS, compare, setting
from dkacq.commands.report import report
from dkacq.datamodules.texts import TextDataModule
from dkacq.encoders.model_files import AutoEncoder
from dkacq.formats.results import check_one_setting_per_cell
from dkacq.probe.baselines import baseline_cells
from dkacq.probe.heads import HEADS, Head

TEXT_DATA_OPTIONS = set(inspect.signature(TextDataModule).parameters)
"""The shared ``data`` options an attribution run takes (probe-only ones such as N are left out)."""


@dataclass
class ProbeGrid:
    """Probe cells: every setting x every N x every head x every layer."""

    config: str = "configs/probe.yaml"
    """The base ``dkacq fit`` config; settings override its ``data`` options."""
    settings: list[dict] = field(default_factory=lambda: [{"encoder": "minilm"}])
    """One dict of ``data`` options per setting, e.g. ``{encoder: minilm, random_init: true}``."""
    num_passages: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    heads: list[Head] = field(default_factory=lambda: list(HEADS))
    options: dict = field(default_factory=dict)
    """Further ``dkacq fit`` options for every cell, as config, e.g. ``{trainer: {max_epochs: 30}}``."""


@dataclass
class AttributionRun:
    """One ``dkacq attribute`` run."""

    model: str
    """A preset name, or ``<preset>-random`` (``-random-seed<k>``) for its random-init control; or ``auto``
    with ``options: {model: {auto: {model: ID_OR_FOLDER, ...}}}``: a model read from its own files."""
    name: str
    """Its output folder's name under ``<run_dir>/attribution``."""
    options: dict = field(default_factory=dict)
    """Further ``dkacq attribute`` options, as config, e.g. ``{data: {text_side: passage}}``."""
    backbone: str | None = None
    """``auto`` only: the pre-trained model (hub id or folder) it was fine-tuned from, attributed too
    (into ``<name>-backbone``), read with the model's settings and labelled ``<backbone>@<label>``."""


@dataclass
class ComparisonRun:
    """One ``dkacq compare`` run: two models' cached vectors of the study's data, layer by layer."""

    a: str | dict
    """The fine-tuned model: a preset name, or ``data`` options (``{encoder: minilm, pooling: cls}``)."""
    b: str | dict
    """Its backbone or random-init control (``minilm-random``), the same way."""
    name: str
    """Its output folder's name under ``<run_dir>/compare``."""
    options: dict = field(default_factory=dict)
    """Further ``dkacq compare`` options (``layer_pairs``, ``sides``, ``device``, ...)."""


def merged(base: dict, *overrides: dict) -> dict:
    """``base`` with each override's keys set, nested mappings merged key by key."""
    result = dict(base)
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merged(result[key], value)
            else:
                result[key] = value
    return result


def probe_configs(run_dir: Path, data: dict, probes: ProbeGrid | None) -> list[dict]:
    """One ``dkacq fit`` config per setting and N, all writing into ``<run_dir>/probe``."""
    if probes is None:
        return []
    base = yaml.safe_load(Path(probes.config).read_text()) or {}
    return [
        merged(
            base,
            {"data": data},
            {"data": setting | {"num_passages": num_passages}},
            {"heads": list(probes.heads), "results": {"run_dir": str(run_dir / "probe"), "skip_finished": True}},
            probes.options,
        )
        for setting in probes.settings
        for num_passages in probes.num_passages
    ]


def probe_data(probes: ProbeGrid | None) -> dict:
    """The ``data`` options of the probe grid (its base config's, then its ``options``') that are not a
    model's: with the study's ``data``, what makes ``dkacq compare`` open the caches the probes built."""
    if probes is None:
        return {}
    base = yaml.safe_load(Path(probes.config).read_text()) or {}
    options = merged(base.get("data") or {}, probes.options.get("data") or {})
    return {key: value for key, value in options.items() if key not in CACHE_OPTIONS}


def attribution_configs(run_dir: Path, data: dict, attributions: list[AttributionRun]) -> list[dict]:
    """One ``dkacq attribute`` config per run: its preset's settings, the shared data, its options."""
    data = {key: value for key, value in data.items() if key in TEXT_DATA_OPTIONS}
    configs = []
    for run in attributions:
        base = {} if run.model == "auto" else {"model": attribute.preset_config(run.model)}
        config = merged(
            base, {"data": data, "model": {"output_dir": str(run_dir / "attribution" / run.name)}}, run.options
        )
        configs.append(config)
        if run.backbone:
            auto = config.get("model", {}).get("auto")
            if run.model != "auto" or not auto:
                raise ValueError(f"attribution run {run.name}: backbone needs model auto with options.model.auto")
            backbone = asdict(AutoEncoder(**auto).backbone_encoder(run.backbone))
            folder = str(run_dir / "attribution" / f"{run.name}-backbone")
            configs.append(merged(config, {"model": {"auto": backbone, "output_dir": folder}}))
    return configs


def study_clis(
    run_dir: Path, data: dict | None, probes: ProbeGrid | None, attributions: list[AttributionRun] | None
) -> tuple[list[probe.ProbeCLI], list[attribute.AttributionCLI]]:
    """Every probe setting and attribution run of a study, parsed and instantiated (nothing loaded or run)."""
    probe_clis = [
        setting for config in probe_configs(run_dir, data or {}, probes) for setting in probe.build(config).settings()
    ]
    attribution_clis = [
        attribute.build(config) for config in attribution_configs(run_dir, data or {}, attributions or [])
    ]
    return probe_clis, attribution_clis


def sharing_a_cache(clis: list[probe.ProbeCLI]) -> list[list[probe.ProbeCLI]]:
    """The probe settings grouped by the embedding cache they read (a setting's N values), in the order
    of each group's first setting."""
    groups: dict[Path, list[probe.ProbeCLI]] = {}
    for cli in clis:
        groups.setdefault(cli.datamodule.embeddings_folder.resolve(), []).append(cli)
    return list(groups.values())


def sweep(
    run_dir: Path = Path("runs/study"),
    data: dict | None = None,
    probes: ProbeGrid | None = None,
    attributions: list[AttributionRun] | None = None,
    base_models: dict[str, str] | None = None,
    published_overlay: bool = True,
    comparisons: list[ComparisonRun] | None = None,
) -> Path:
    """Check every probe cell and attribution run, run those not done yet, then write the report.

    Every config is parsed and instantiated with the commands' own classes, and every cell checked,
    before anything runs: options, layers against each model's config, two settings that would share a
    row of the results table, and the table and attribution folders for results of other settings
    (each refused in one line).

    Args:
        run_dir: the study's folder: ``probe/results.csv``, ``attribution/<name>/``, ``report/``.
        data: ``data`` options of every probe and attribution run (dataset, source, files, hub id).
        probes: the probe grid; none when not given.
        attributions: the attribution runs.
        base_models: pooling -> base model for the report's significance tests.
        published_overlay: draw the study's published curves beside yours.
        comparisons: pairs of models compared layer by layer (``dkacq compare``, on the probes' caches,
            with the probes' ``data`` options), after the probes; the report's "What changed where".
    """
    probe_clis, attribution_clis = study_clis(run_dir, data, probes, attributions)
    check_one_setting_per_cell([cell for cli in probe_clis for cell in cli.plan() + baseline_cells(cli.datamodule)])
    pending = [cli for cli in attribution_clis if not cli.finished()]
    for cli in pending:
        cli.check_memory()
    for run in comparisons or []:
        setting(run.a), setting(run.b)
    output.checked()

    for clis in sharing_a_cache(probe_clis):
        probe.fit_settings(clis)
    for cli in pending:
        cli.run_attribution()
    shared = merged(probe_data(probes), data or {})
    comparison_dirs = [
        compare(run.a, run.b, **merged({"data": shared, "out_dir": run_dir / "compare" / run.name}, run.options))
        for run in comparisons or []
    ]
    results = run_dir / "probe" / "results.csv"
    attribution_dirs = [Path(cli.model.hparams.output_dir) for cli in attribution_clis]  # backbones' included
    return report(
        [results] if results.exists() else [],
        attribution_dirs,
        run_dir / "report",
        base_models,
        published_overlay,
        comparisons=comparison_dirs,
    )


def run(args: list[str]) -> None:
    auto_cli(sweep, args=args[1:], prog="dkacq sweep", exit_on_error=False)
