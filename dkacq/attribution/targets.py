"""Which linear modules of a transformer hold the neurons that attribution scores.

A neuron is one output unit of a target module: one row of its weight (with its bias entry). The
study scores the feed-forward modules of every layer: BERT-family ``intermediate.dense`` and
``output.dense`` (not the attention's ``attention.output.dense``), Llama ``mlp.gate_proj`` and
``mlp.down_proj`` (``up_proj`` on request; the reference leaves it out).
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
    layers: str
    kinds: dict[str, tuple[str, Side]]
    """kind -> (module path inside one layer, side)."""
    default_kinds: tuple[str, ...]
    final_norm: str | None

    def matches(self, transformer: nn.Module) -> bool:
        try:
            first_layer = transformer.get_submodule(self.layers)[0]
            first_layer.get_submodule(self.kinds[self.default_kinds[0]][0])
        except (AttributeError, IndexError, TypeError):
            return False
        return True

    def layer_stack(self, transformer: nn.Module) -> nn.ModuleList:
        return transformer.get_submodule(self.layers)

    def final_module(self, transformer: nn.Module) -> nn.Module:
        return transformer.get_submodule(self.final_norm) if self.final_norm else nn.Identity()


BERT_FAMILY = ArchitectureFamily(
    name="bert",
    layers="encoder.layer",
    kinds={"intermediate": ("intermediate.dense", "intermediate"), "output": ("output.dense", "output")},
    default_kinds=("intermediate", "output"),
    final_norm=None,
)
LLAMA_FAMILY = ArchitectureFamily(
    name="llama",
    layers="layers",
    kinds={
        "gate_proj": ("mlp.gate_proj", "intermediate"),
        "up_proj": ("mlp.up_proj", "intermediate"),
        "down_proj": ("mlp.down_proj", "output"),
    },
    default_kinds=("gate_proj", "down_proj"),
    final_norm="norm",
)
FAMILIES = (BERT_FAMILY, LLAMA_FAMILY)


def architecture_family(transformer: nn.Module) -> ArchitectureFamily:
    """The family of a bare transformer (BertModel, DPR's inner BERT, LlamaModel, ...)."""
    for family in FAMILIES:
        if family.matches(transformer):
            return family
    raise ValueError(
        f"no attribution targets known for {type(transformer).__name__}; supported families: "
        f"{', '.join(family.name for family in FAMILIES)}"
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

    ``kinds`` defaults to the study's: ``("intermediate", "output")`` for the BERT family,
    ``("gate_proj", "down_proj")`` for Llama.
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
