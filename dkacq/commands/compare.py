"""``dkacq compare``: linear and debiased CKA between two models' cached vectors of the same texts, per
layer pair and side, written as rows (:mod:`dkacq.formats.similarity`) and drawn as a heatmap and a
diagonal curve. The embedding caches are those ``dkacq fit`` builds (built here when missing)."""

import time
from pathlib import Path
from typing import Literal

from jsonargparse import auto_cli

from dkacq.commands import output
from dkacq.compare.caches import SIDES, LayerPairs, Side, cache_similarity
from dkacq.datamodules.probe import ProbeDataModule
from dkacq.encoders.presets import split_control_label
from dkacq.formats.atomic import file_lock
from dkacq.formats.identity import digest, plain
from dkacq.formats.provenance import package_versions
from dkacq.formats.similarity import Comparison, finished, write_comparison
from dkacq.report.similarity_figures import figure_paths, plot_comparison

CACHE_OPTIONS = ("encoder", "model", "random_init", "init_seed", "pooling", "cache_name", "extraction_precision")
"""The ``data`` options that choose one model's cache; the rest (data set, files, ``max_examples``,
``cache_dir``, ...) are shared by the two models."""


def setting(model: str | dict) -> dict:
    """A model given as a preset name (``minilm``, ``minilm-random``, ``minilm-random-seed3``) or as
    ``data`` options of ``dkacq fit`` (``{encoder: minilm, pooling: cls}``), as ``data`` options."""
    if isinstance(model, dict):
        unknown = set(model) - set(CACHE_OPTIONS)
        if unknown:
            raise ValueError(f"unknown model options {sorted(unknown)}; a model takes {', '.join(CACHE_OPTIONS)}")
        return dict(model)
    control = split_control_label(model)
    return {"encoder": control[0], "random_init": True, "init_seed": control[1]} if control else {"encoder": model}


def data_module(model: str | dict, data: dict | None) -> ProbeDataModule:
    shared = dict(data or {})
    for key in ("num_passages", "layers"):
        shared.pop(key, None)  # probe options: no part of a cache
    return ProbeDataModule(**(shared | setting(model)))


def compare(
    a: dict | str = "minilm",
    b: dict | str = "minilm-random",
    data: dict | None = None,
    out_dir: Path | None = None,
    sides: list[Side] | None = None,
    splits: list[Literal["train", "test"]] | None = None,
    layer_pairs: LayerPairs = "all",
    device: str = "cpu",
    format: Literal["png", "pdf", "svg"] = "png",
) -> Path:
    """Compare two models layer by layer on the same texts; print the output folder.

    Args:
        a: the first model (e.g. the fine-tuned one): a preset name, ``<preset>-random`` for its
            random-init control, or ``data`` options of ``dkacq fit`` (``{encoder: minilm, pooling: cls}``).
        b: the second model (e.g. its backbone or control), the same way.
        data: ``data`` options of both caches, as for ``dkacq fit`` (dataset, source, files,
            max_examples, cache_dir, ...).
        out_dir: output folder; default ``runs/compare/<dataset>-<a>-vs-<b>``.
        sides: ``query`` and/or ``passage`` texts (default both).
        splits: the probe set's splits whose distinct texts are compared (default all).
        layer_pairs: ``all`` (every layer of a against every layer of b) or ``diagonal`` (each layer of
            a against b's layer at the same relative depth: the same layer for models of equal depth).
        device: where the float64 d x d products are accumulated (``cpu``, ``cuda``).
        format: png, pdf or svg figures.
    """
    modules = data_module(a, data), data_module(b, data)
    requests = [module.cache_request() for module in modules]
    labels = tuple(module.preset.label for module in modules)
    dataset = modules[0].hparams.dataset
    folder = Path(out_dir or Path("runs/compare") / f"{dataset}-{modules[0].preset.name}-vs-{modules[1].preset.name}")
    sides = list(dict.fromkeys(sides or SIDES))
    identity = plain(
        {
            "a": requests[0],
            "b": requests[1],
            "sides": sides,
            "splits": sorted(splits) if splits else "all",
            "layer_pairs": layer_pairs,
        }
    )
    figures = figure_paths(folder, format)
    with file_lock(folder):
        if finished(folder, identity):
            output.say(f"{folder} holds this comparison already")
        else:
            output.checked()
            for module in modules:
                module.prepare_data()
            caches = [module.open() for module in modules]
            started = time.perf_counter()
            rows, measured = cache_similarity(
                *caches,
                labels,
                (digest(requests[0]), digest(requests[1])),
                sides,
                splits,
                layer_pairs,
                device,
                progress=output.say,
            )
            summary = {
                "model_a": labels[0],
                "model_b": labels[1],
                "dataset": dataset,
                "caches": {"a": str(caches[0].folder), "b": str(caches[1].folder)},
                "num_hidden_states": {"a": caches[0].num_hidden_states, "b": caches[1].num_hidden_states},
                "hidden_size": {"a": caches[0].hidden_size, "b": caches[1].hidden_size},
                "num_texts": measured["num_texts"],
                "splits": measured["splits"],
                "seconds": measured["seconds"],
                "wall_seconds": time.perf_counter() - started,
                "device": device,
                "versions": package_versions(),
                "identity": identity,
            }
            write_comparison(folder, summary, rows)
            for path in figures:
                path.unlink(missing_ok=True)
        if not all(path.exists() for path in figures):
            plot_comparison(Comparison.load(folder), folder, format)
    print(folder)
    return folder


def run(args: list[str]) -> None:
    output.quiet(new_command=True)
    auto_cli(compare, args=args[1:], prog="dkacq compare", exit_on_error=False)
