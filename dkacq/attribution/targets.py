"""Which linear modules of a transformer hold the neurons that attribution scores.

A neuron is one output unit of a target module: one row of its weight (with its bias entry). The
study scores the feed-forward modules of every layer: BERT-family ``intermediate.dense`` and
``output.dense`` (not the attention's ``attention.output.dense``), Llama ``mlp.gate_proj`` and
``mlp.down_proj`` (``up_proj`` on request; the reference leaves it out). The other families follow the
same rule, the wide side and the projection back: ModernBERT's fused ``Wi`` (its output units are the
GLU's input half and gate half, ``2 x intermediate_size`` neurons) and ``Wo``; T5 encoders' ``wi`` and
``wo`` (gated: ``wi_0``, the gate, and ``wo``; ``wi_1`` on request); NomicBERT's and DistilBERT's MLPs.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

Side = Literal["intermediate", "output"]
"""Which of the study's two figures a module belongs to: the wide hidden side of the feed-forward
block (BERT intermediate, Llama gate/up) or its projection back to the model width (BERT output,
Llama down)."""


@dataclass(frozen=True)
class ArchitectureFamily:
    """Where a family's layers and feed-forward modules live, as module paths.

    ``final_norm`` is the module applied to the last layer's output to give ``last_hidden_state``
    (Llama's RMSNorm); ``None`` where the last layer's output is the last hidden state (BERT).
    """

    name: str
    architectures: str
    """The model classes it covers, for messages."""
    layers: str
    kinds: dict[str, tuple[str, Side]]
    """kind -> (module path inside one layer, side)."""
    default_kinds: tuple[str, ...]
    final_norm: str | None

    def matches(self, transformer: nn.Module) -> bool:
        try:
            first_layer = transformer.get_submodule(self.layers)[0]
            for kind in self.default_kinds:
                first_layer.get_submodule(self.kinds[kind][0])
            self.final_module(transformer)
        except (AttributeError, IndexError, TypeError):
            return False
        return True

    def layer_stack(self, transformer: nn.Module) -> nn.ModuleList:
        return transformer.get_submodule(self.layers)

    def final_module(self, transformer: nn.Module) -> nn.Module:
        return transformer.get_submodule(self.final_norm) if self.final_norm else nn.Identity()


BERT_FAMILY = ArchitectureFamily(
    name="bert",
    architectures="BERT, RoBERTa, XLM-R, ELECTRA, MPNet",
    layers="encoder.layer",
    kinds={"intermediate": ("intermediate.dense", "intermediate"), "output": ("output.dense", "output")},
    default_kinds=("intermediate", "output"),
    final_norm=None,
)
_GATED = {
    "gate_proj": ("mlp.gate_proj", "intermediate"),
    "up_proj": ("mlp.up_proj", "intermediate"),
    "down_proj": ("mlp.down_proj", "output"),
}
LLAMA_FAMILY = ArchitectureFamily(
    name="llama",
    architectures="Llama, Mistral, Qwen2, Gemma",
    layers="layers",
    kinds=_GATED,
    default_kinds=("gate_proj", "down_proj"),
    final_norm="norm",
)
NOMIC_FAMILY = ArchitectureFamily(
    name="nomic_bert",
    architectures="NomicBERT",
    layers="layers",
    kinds=_GATED,
    default_kinds=("gate_proj", "down_proj"),
    final_norm=None,
)
MODERNBERT_FAMILY = ArchitectureFamily(
    name="modernbert",
    architectures="ModernBERT",
    layers="layers",
    kinds={"Wi": ("mlp.Wi", "intermediate"), "Wo": ("mlp.Wo", "output")},
    default_kinds=("Wi", "Wo"),
    final_norm="final_norm",
)
T5_FAMILY = ArchitectureFamily(
    name="t5",
    architectures="T5 and GTR encoders",
    layers="encoder.block",
    kinds={"wi": ("layer.1.DenseReluDense.wi", "intermediate"), "wo": ("layer.1.DenseReluDense.wo", "output")},
    default_kinds=("wi", "wo"),
    final_norm="encoder.final_layer_norm",
)
T5_GATED_FAMILY = ArchitectureFamily(
    name="t5_gated",
    architectures="T5 v1.1, Flan-T5 and Sentence-T5 encoders (gated feed-forward)",
    layers="encoder.block",
    kinds={
        "wi_0": ("layer.1.DenseReluDense.wi_0", "intermediate"),
        "wi_1": ("layer.1.DenseReluDense.wi_1", "intermediate"),
        "wo": ("layer.1.DenseReluDense.wo", "output"),
    },
    default_kinds=("wi_0", "wo"),
    final_norm="encoder.final_layer_norm",
)
DISTILBERT_FAMILY = ArchitectureFamily(
    name="distilbert",
    architectures="DistilBERT",
    layers="transformer.layer",
    kinds={"lin1": ("ffn.lin1", "intermediate"), "lin2": ("ffn.lin2", "output")},
    default_kinds=("lin1", "lin2"),
    final_norm=None,
)
FAMILIES = (
    BERT_FAMILY,
    LLAMA_FAMILY,
    NOMIC_FAMILY,
    MODERNBERT_FAMILY,
    T5_FAMILY,
    T5_GATED_FAMILY,
    DISTILBERT_FAMILY,
)


def architecture_family(transformer: nn.Module) -> ArchitectureFamily:
    """The family of a bare transformer (BertModel, DPR's inner BERT, LlamaModel, ...)."""
    for family in FAMILIES:
        if family.matches(transformer):
            return family
    raise ValueError(
        f"no attribution targets known for {type(transformer).__name__}; supported: "
        + "; ".join(f"{family.name} ({family.architectures})" for family in FAMILIES)
    )


@dataclass(frozen=True)
class Target:
    """One module whose output units are scored."""

    name: str
    """Module path inside the transformer, e.g. ``encoder.layer.3.intermediate.dense``."""
    kind: str
    side: Side
    layer: int
    module: nn.Linear

    @property
    def num_neurons(self) -> int:
        return self.module.out_features


def find_targets(transformer: nn.Module, kinds: Sequence[str] | None = None) -> list[Target]:
    """The target modules of every layer, ordered by layer and then by ``kinds``.

    ``kinds`` defaults to the family's: the study's ``("intermediate", "output")`` for the BERT family and
    ``("gate_proj", "down_proj")`` for Llama, the wide side and the projection back for the others.
    """
    family = architecture_family(transformer)
    kinds = tuple(family.default_kinds if kinds is None else kinds)
    for kind in kinds:
        if kind not in family.kinds:
            raise ValueError(
                f"unknown target kind '{kind}' for the {family.name} family; choose from {', '.join(family.kinds)}"
            )
    targets = []
    for layer, block in enumerate(family.layer_stack(transformer)):
        for kind in kinds:
            path, side = family.kinds[kind]
            name = f"{family.layers}.{layer}.{path}"
            targets.append(Target(name, kind, side, layer, block.get_submodule(path)))
    return targets
