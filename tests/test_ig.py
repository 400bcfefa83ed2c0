"""Batched integrated gradients against the literal published loop, Captum and completeness."""

from dataclasses import replace

import pytest
import torch
from captum.attr import IntegratedGradients
from conftest import SPECIALS, WORDS, _save_tokenizer
from torch.func import functional_call

from dkacq.attribution.ig import alphas_and_weights, neuron_scores, path_attributions
from dkacq.attribution.targets import architecture_family, find_targets
from dkacq.encoders.loading import load_encoders
from dkacq.encoders.presets import EncoderPreset, ModelSource
from dkacq.encoders.text_encoder import TextEncoder

TEXTS = [
    "what is the python list",
    "how does a function return a value from a class method",
    "the first key",
]


def _configs(vocab: int) -> dict:
    """Tiny configs of every family that attribution supports beyond the conftest BERT and Llama."""
    from transformers import (
        DistilBertConfig,
        ElectraConfig,
        GemmaConfig,
        MistralConfig,
        ModernBertConfig,
        MPNetConfig,
        NomicBertConfig,
        Qwen2Config,
        RobertaConfig,
        T5Config,
    )

    small = dict(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
    decoder = small | dict(
        num_key_value_heads=1, bos_token_id=SPECIALS.index("<s>"), eos_token_id=SPECIALS.index("</s>")
    )
    t5 = dict(vocab_size=vocab, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2, pad_token_id=0)
    return {
        "roberta": RobertaConfig(**small, max_position_embeddings=80, pad_token_id=0),
        "electra": ElectraConfig(**small, embedding_size=8, max_position_embeddings=80),
        "mpnet": MPNetConfig(**small, max_position_embeddings=80, pad_token_id=0),
        "modernbert": ModernBertConfig(
            **small,
            global_attn_every_n_layers=2,
            local_attention=4,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            cls_token_id=2,
            sep_token_id=3,
        ),
        "nomic_bert": NomicBertConfig(**small),
        "t5": T5Config(**t5),
        "t5_gated": T5Config(**t5, feed_forward_proj="gated-gelu"),
        "distilbert": DistilBertConfig(vocab_size=vocab, dim=16, n_layers=2, n_heads=2, hidden_dim=24),
        "qwen2": Qwen2Config(**decoder),
        "mistral": MistralConfig(**decoder),
        "gemma": GemmaConfig(**decoder, head_dim=8),
    }


DECODERS = ("qwen2", "mistral", "gemma")


@pytest.fixture(scope="module")
def family_presets(tmp_path_factory) -> dict:
    """Each family's tiny model, built from its config and saved with a tokenizer, as a preset (made on first use)."""
    from transformers import AutoModel

    made = {}

    def make(family: str) -> EncoderPreset:
        if family not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            torch.manual_seed(0)
            config = _configs(len(SPECIALS) + len(WORDS))[family]
            model = AutoModel.from_config(config)
            model.save_pretrained(folder)  # T5's whole model: the loader builds its encoder alone
            _save_tokenizer(folder, "llama" if family in DECODERS else "bert")
            source = ModelSource(str(folder))
            pooling = "eos" if family in DECODERS else "mean"
            made[family] = EncoderPreset(family, family, source, source, pooling, attribution_kinds=())
        return made[family]

    return make


def preset_of(request, family: str) -> EncoderPreset:
    if family in ("bert", "llama"):
        return request.getfixturevalue(f"tiny_{family}_preset")
    return request.getfixturevalue("family_presets")(family)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def encoder_for(preset, pooling: str | None = None) -> TextEncoder:
    """The tiny model in float64, its norms and biases moved away from their initial values.

    Fresh norms (weight 1, bias 0) make ``||norm(x)||`` a constant, so with CLS or EOS pooling F would
    not depend on any module and every score would be rounding noise; fresh biases are 0, which would
    leave the bias attributions untested. The seed and scale give a model on which the right Riemann
    sum converges well (see the completeness test).
    """
    if pooling is not None:
        preset = replace(preset, pooling=pooling)
    encoder, _ = load_encoders(preset, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in encoder.transformer.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.add_(0.5 * noise)
    return encoder


def padded_batch(encoder: TextEncoder, texts: list[str], side: str) -> dict[str, torch.Tensor]:
    """Token ids padded on ``side`` by hand (the shared tokenizer's padding side stays untouched)."""
    rows = encoder.token_ids(texts)
    length = max(len(row) for row in rows)
    pad_id = encoder.tokenizer.pad_token_id
    input_ids, attention_mask = [], []
    for row in rows:
        padding = [pad_id] * (length - len(row))
        real, empty = [1] * len(row), [0] * len(padding)
        input_ids.append(row + padding if side == "right" else padding + row)
        attention_mask.append(real + empty if side == "right" else empty + real)
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask)}


def scaled_parameters(target, alpha: float, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """The target's weight and bias (Llama's modules have none) multiplied by ``alpha``, by full name."""
    return {
        f"{target.name}.{key}": (alpha * value).requires_grad_(requires_grad)
        for key, value in target.module.named_parameters()
    }


def pooled_norm(encoder: TextEncoder, batch: dict, parameters: dict[str, torch.Tensor]) -> torch.Tensor:
    """F per text with some parameters replaced: the L2 norm of the unnormalised pooled last hidden state."""
    output = functional_call(encoder.transformer, parameters, kwargs=batch)
    return encoder.pool(output.last_hidden_state, batch["attention_mask"]).norm(dim=-1)


def naive_scores(
    encoder: TextEncoder, texts: list[str], targets: list, rule: str, steps: int
) -> dict[str, torch.Tensor]:
    """The published algorithm literally: per text (batch 1, tokenized alone), per target, per alpha: W' = alpha W,
    b' = alpha b, forward, gradient of F with respect to W', accumulate; A = W * sum; s_i = sum_j |A_ij|."""
    alphas, weights = alphas_and_weights(rule, steps)
    scores = {}
    for target in targets:
        weight = target.module.weight
        per_text = []
        for text in texts:
            batch = encoder.tokenize([text])
            gradient_sum = torch.zeros_like(weight)
            for alpha, step_weight in zip(alphas.tolist(), weights.tolist()):
                parameters = scaled_parameters(target, alpha)
                scaled_weight = parameters[f"{target.name}.weight"].requires_grad_()
                f = pooled_norm(encoder, batch, parameters)
                (gradient,) = torch.autograd.grad(f.sum(), scaled_weight)
                gradient_sum += step_weight * gradient
            per_text.append((weight * gradient_sum).abs().sum(dim=-1))
        scores[target.name] = torch.stack(per_text)
    return scores


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Largest difference relative to the largest magnitude: scores of one module span orders of magnitude."""
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0
    assert (actual - expected).abs().max() / scale <= tolerance


FAMILIES = ["roberta", "electra", "mpnet", "modernbert", "nomic_bert", "t5", "t5_gated", "distilbert", *DECODERS]
"""The families beyond the study's BERT and Llama, each checked on a tiny model built from its config."""


@pytest.mark.parametrize(
    "family, pooling, side, rule, steps",
    [
        *(
            (family, pooling, side, rule, 20)
            for family, pooling, side in [
                ("bert", "mean", "right"),
                ("bert", "mean", "left"),
                ("bert", "cls", "right"),
                ("llama", "eos", "right"),
                ("llama", "eos", "left"),
                ("llama", "eos_reference", "max_length"),
            ]
            for rule in ["reference", "riemann_right"]
        ),
        *((family, None, "left" if family in DECODERS else "right", "reference", 3) for family in FAMILIES),
    ],
)
def test_batched_scores_equal_the_published_loop(request, family, pooling, side, rule, steps):
    """A padded batch against the loop over texts tokenized alone, for every kind of module of the family
    (Llama's ``up_proj`` too). ``eos_reference`` pads to the maximum length and pools at the last
    position, padding for all these texts: the padding's contribution is part of the published scores."""
    encoder = encoder_for(preset_of(request, family), pooling)
    batch = encoder.tokenize(TEXTS) if side == "max_length" else padded_batch(encoder, TEXTS, side)
    assert batch["attention_mask"].min() == 0
    assert architecture_family(encoder.transformer).name == {"roberta": "bert", "electra": "bert", "mpnet": "bert"}.get(
        family, {"qwen2": "llama", "mistral": "llama", "gemma": "llama"}.get(family, family)
    )
    targets = find_targets(encoder.transformer, list(architecture_family(encoder.transformer).kinds))
    scores = neuron_scores(encoder, batch, targets, rule=rule, steps=steps)
    expected = naive_scores(encoder, TEXTS, targets, rule, steps=steps)
    assert list(scores) == [target.name for target in targets]
    for name, value in expected.items():
        assert scores[name].dtype == torch.float64
        assert_relatively_close(scores[name], value, 1e-9)


@pytest.mark.parametrize("replicas_per_pass", [1, 2, 7, 100])
def test_splitting_the_replicas_into_passes_changes_nothing(tiny_llama_preset, replicas_per_pass):
    """1 and 2: a text's steps over several passes; 7: one text per pass; 100: all texts in one pass."""
    encoder = encoder_for(tiny_llama_preset)
    batch = padded_batch(encoder, TEXTS, "left")
    targets = find_targets(encoder.transformer, ["gate_proj", "up_proj", "down_proj"])
    whole = neuron_scores(encoder, batch, targets, steps=5)
    split = neuron_scores(encoder, batch, targets, steps=5, replicas_per_pass=replicas_per_pass)
    for name in whole:
        assert_relatively_close(split[name], whole[name], 1e-12)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("replicas_per_pass", [None, 12])
def test_a_texts_scores_do_not_depend_on_its_batch(request, family, side, replicas_per_pass):
    """Alone or padded among others (on either side, one text per pass or all three in one), a text
    gets the same scores: passes re-collate their own texts."""
    encoder = encoder_for(request.getfixturevalue(f"tiny_{family}_preset"))
    targets = find_targets(encoder.transformer)
    alone = [neuron_scores(encoder, encoder.tokenize([text]), targets, steps=4) for text in TEXTS]
    batch = padded_batch(encoder, TEXTS, side)
    together = neuron_scores(encoder, batch, targets, steps=4, replicas_per_pass=replicas_per_pass)
    for row, scores in enumerate(alone):
        for name, value in scores.items():
            assert_relatively_close(together[name][row : row + 1], value, 1e-9)


@pytest.mark.parametrize("family", ["bert", "llama", *FAMILIES])
def test_attributions_equal_captum_riemann_right(request, family):
    encoder = encoder_for(preset_of(request, family))
    batch = encoder.tokenize(TEXTS[1:2])
    targets = find_targets(encoder.transformer)
    steps = 16 if family in ("bert", "llama") else 4  # the other families: fewer steps, the same identity
    attributions = dict(path_attributions(encoder, batch, targets, rule="riemann_right", steps=steps))
    for target in targets:
        names = [f"{target.name}.{key}" for key, _ in target.module.named_parameters()]

        def f_of_parameters(*stacked: torch.Tensor, names=names) -> torch.Tensor:
            """Captum's steps ``[k, ...]`` for each parameter -> F at each step ``[k]``."""
            return torch.cat([pooled_norm(encoder, batch, dict(zip(names, step))) for step in zip(*stacked)])

        inputs = tuple(value.unsqueeze(0) for _, value in target.module.named_parameters())
        expected = IntegratedGradients(f_of_parameters).attribute(
            inputs, baselines=tuple(torch.zeros_like(x) for x in inputs), method="riemann_right", n_steps=steps
        )
        actual = [attributions[target].weight, attributions[target].bias][: len(expected)]
        assert (target.module.bias is None) == (attributions[target].bias is None)
        for value, captum_value in zip(actual, expected):
            assert_relatively_close(value, captum_value, 1e-7)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_weight_and_bias_attributions_are_complete(request, family):
    """Summed signed attributions of W and b = F(W, b) - F(0, 0) for a fine right Riemann sum.

    The sum's error is about (g(1) - g(0)) / 2m for g(alpha) = dF/dalpha; relative to F(W, b) - F(0, 0)
    it is large where a module's effect nearly cancels along the path: over seeds 0-5 of the tiny
    models' perturbation the worst module ranged from 0.05% to 10% at m = 300, falling as 1/m
    (checked at m = 1200). The fixture's seed is well conditioned: worst module 0.2%.
    """
    encoder = encoder_for(request.getfixturevalue(f"tiny_{family}_preset"))
    batch = encoder.tokenize(TEXTS)
    targets = find_targets(encoder.transformer)
    f_full = pooled_norm(encoder, batch, {})
    for target, attribution in path_attributions(encoder, batch, targets, rule="riemann_right", steps=300):
        difference = f_full - pooled_norm(encoder, batch, scaled_parameters(target, 0.0))
        total = attribution.weight.sum(dim=(1, 2))
        if attribution.bias is not None:
            total = total + attribution.bias.sum(dim=1)
        assert torch.all((total - difference).abs() <= 0.01 * difference.abs()), (target.name, total, difference)


def test_alphas_and_weights():
    alphas, weights = alphas_and_weights("reference", 20)
    assert (
        alphas[0] == 1e-6 and alphas[-1] == 1 and torch.allclose(weights, torch.full((20,), 0.05, dtype=torch.float64))
    )
    alphas, weights = alphas_and_weights("riemann_right", 4)
    assert alphas.tolist() == [0.25, 0.5, 0.75, 1.0] and weights.tolist() == [0.25] * 4


def one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_below_one_are_refused(steps):
    with pytest.raises(ValueError) as error:
        alphas_and_weights("reference", steps)
    assert str(steps) in one_line_error(error)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError) as error:
        alphas_and_weights("trapezoid", 20)
    assert "trapezoid" in one_line_error(error) and "riemann_right" in one_line_error(error)


def test_unknown_kind_is_refused(tiny_bert_preset):
    encoder = encoder_for(tiny_bert_preset)
    with pytest.raises(ValueError) as error:
        find_targets(encoder.transformer, ["intermediate", "gate_proj"])
    message = one_line_error(error)
    assert "gate_proj" in message and "intermediate" in message and "output" in message


def test_targets_of_each_family(tiny_bert_preset, tiny_llama_preset):
    bert = find_targets(encoder_for(tiny_bert_preset).transformer)
    assert [(t.name, t.kind, t.side, t.layer, t.num_neurons) for t in bert] == [
        ("encoder.layer.0.intermediate.dense", "intermediate", "intermediate", 0, 64),
        ("encoder.layer.0.output.dense", "output", "output", 0, 32),
        ("encoder.layer.1.intermediate.dense", "intermediate", "intermediate", 1, 64),
        ("encoder.layer.1.output.dense", "output", "output", 1, 32),
    ]
    llama = find_targets(encoder_for(tiny_llama_preset).transformer, ["gate_proj", "up_proj", "down_proj"])
    assert [(t.kind, t.side, t.layer) for t in llama[:3]] == [
        ("gate_proj", "intermediate", 0),
        ("up_proj", "intermediate", 0),
        ("down_proj", "output", 0),
    ]
    assert [t.kind for t in find_targets(encoder_for(tiny_llama_preset).transformer)] == ["gate_proj", "down_proj"] * 2


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError) as error:
        find_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert "Sequential" in one_line_error(error)
