"""Attribution of the retrieval objective (relevance, margin) against a literal loop, Captum and completeness."""

import json

import pytest
import torch
from captum.attr import IntegratedGradients
from lightning.pytorch import Trainer
from test_ig import TEXTS, assert_relatively_close, encoder_for, padded_batch, scaled_parameters
from torch.func import functional_call
from torch.nn import functional

from dkacq.attribution.ig import alphas_and_weights, neuron_scores, path_attributions
from dkacq.attribution.module import AttributionModule
from dkacq.attribution.objectives import Partners, check_objective, objective_function
from dkacq.attribution.targets import find_targets
from dkacq.datamodules.texts import TextDataModule
from dkacq.encoders.loading import load_encoders

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def partners_for(encoder) -> Partners:
    generator = torch.Generator().manual_seed(5)
    size = encoder.hidden_size
    return Partners(
        torch.randn(len(TEXTS), size, generator=generator, dtype=torch.float64),
        torch.randn(len(TEXTS), 4, size, generator=generator, dtype=torch.float64),
    )


def literal_f(encoder, batch, parameters, objective, similarity, partners, rows) -> torch.Tensor:
    """F per text written out: the pooled final vector against the fixed vectors of the texts ``rows``."""
    output = functional_call(encoder.transformer, parameters, kwargs=batch)
    v = encoder.pool(output.last_hidden_state, batch["attention_mask"])
    u, negatives = partners.positive[rows], partners.negatives[rows]
    if similarity == "cosine":
        score = functional.cosine_similarity(v, u, dim=-1)
        negative_scores = functional.cosine_similarity(v.unsqueeze(1), negatives, dim=-1)
    else:
        score, negative_scores = (v * u).sum(-1), (v.unsqueeze(1) * negatives).sum(-1)
    return score - negative_scores.mean(-1) if objective == "margin" else score


@pytest.mark.parametrize("family, objective, similarity", [("bert", "relevance", "dot"), ("llama", "margin", "cosine")])
def test_batched_equals_the_naive_loop_and_captum(request, family, objective, similarity):
    encoder = encoder_for(request.getfixturevalue(f"tiny_{family}_preset"))
    partners = partners_for(encoder)
    function = objective_function(objective, similarity, partners)
    targets = find_targets(encoder.transformer)
    batch = padded_batch(encoder, TEXTS, "left")
    scores = neuron_scores(encoder, batch, targets, rule="reference", steps=6, objective=function)
    alphas, weights = alphas_and_weights("reference", 6)
    for target in targets[1:2]:
        expected = []
        for row, text in enumerate(TEXTS):  # one text at a time, one alpha at a time
            single = encoder.tokenize([text])
            total = torch.zeros_like(target.module.weight)
            for alpha, weight in zip(alphas.tolist(), weights.tolist()):
                parameters = scaled_parameters(target, alpha)
                scaled = parameters[f"{target.name}.weight"].requires_grad_()
                f = literal_f(encoder, single, parameters, objective, similarity, partners, [row])
                total += weight * torch.autograd.grad(f.sum(), scaled)[0]
            expected.append((target.module.weight * total).abs().sum(-1))
        assert_relatively_close(scores[target.name], torch.stack(expected), 1e-9)
    one = encoder.tokenize(TEXTS[1:2])
    moved = Partners(partners.positive[1:2], partners.negatives[1:2])
    attributions = dict(
        path_attributions(
            encoder, one, targets[:2], "riemann_right", 8, objective=objective_function(objective, similarity, moved)
        )
    )
    for target in targets[:2]:
        names = [f"{target.name}.{key}" for key, _ in target.module.named_parameters()]

        def f_of(*stacked, names=names):
            return torch.cat(
                [
                    literal_f(encoder, one, dict(zip(names, step)), objective, similarity, moved, [0])
                    for step in zip(*stacked)
                ]
            )

        inputs = tuple(value.unsqueeze(0) for _, value in target.module.named_parameters())
        captum = IntegratedGradients(f_of).attribute(
            inputs, baselines=tuple(torch.zeros_like(x) for x in inputs), method="riemann_right", n_steps=8
        )
        assert_relatively_close(attributions[target].weight, captum[0], 1e-7)


@pytest.mark.parametrize("objective", ["relevance", "margin"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_attributions_are_complete(request, family, objective):
    """Summed signed attributions of W and b = F(W, b) - F(0, 0), to the right Riemann sum's error at
    m = 300: at most 1% of the module's largest difference over the texts (measured: 0.1% at most; a
    text whose difference nearly cancels along the path has a larger error relative to its own)."""
    encoder = encoder_for(request.getfixturevalue(f"tiny_{family}_preset"))
    partners = partners_for(encoder)
    batch = encoder.tokenize(TEXTS)
    rows = list(range(len(TEXTS)))
    full = literal_f(encoder, batch, {}, objective, "cosine", partners, rows)
    function = objective_function(objective, "cosine", partners)
    for target, attribution in path_attributions(
        encoder, batch, find_targets(encoder.transformer), "riemann_right", 300, objective=function
    ):
        difference = full - literal_f(
            encoder, batch, scaled_parameters(target, 0.0), objective, "cosine", partners, rows
        )
        total = attribution.weight.sum(dim=(1, 2))
        if attribution.bias is not None:
            total = total + attribution.bias.sum(dim=1)
        assert torch.all((total - difference).abs() <= 0.01 * difference.abs().max()), (target.name, total, difference)


def test_bad_objectives_are_one_line():
    with pytest.raises(ValueError, match="passages"):
        check_objective("margin", "passage")
    with pytest.raises(ValueError, match="unknown attribution target 'loss'"):
        check_objective("loss", "query")
    with pytest.raises(ValueError, match="fixed vectors"):
        objective_function("margin", "dot", Partners(torch.zeros(1, 2)))


def test_a_relevance_run_scores_each_query_against_its_positive(tmp_path, probe_files, tiny_bert_preset):
    """End to end: the fixed vectors are those of each query's first positive passage (read from the
    file), the target is in the run's identity and folder name, and passage texts refuse margin."""
    train, test = probe_files
    data = TextDataModule(
        dataset="toy",
        source="local",
        train_file=train,
        test_file=test,
        cache_dir=str(tmp_path / "cache"),
        max_examples=3,
        batch_size=3,
    )
    module = AttributionModule(tiny_bert_preset, steps=2, target="relevance", thresholds=[0.1])
    trainer = Trainer(logger=False, inference_mode=False, enable_progress_bar=False)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(tmp_path)
    try:
        trainer.predict(module, datamodule=data, return_predictions=False)
    finally:
        monkeypatch.undo()
    folder = tmp_path / "runs" / "attribution" / "toy-tiny-bert-query-relevance"
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["target"], summary["similarity"]) == ("relevance", "dot")
    assert summary["identity"]["objective"] == {"target": "relevance", "similarity": "dot"}
    first_positive = {}
    for line in open(test):
        record = json.loads(line)
        first_positive.setdefault(record["question"], record["positive_context"])
    encoder, _ = load_encoders(tiny_bert_preset)
    expected = encoder(**encoder.tokenize([first_positive[text] for text in data.texts]))[-1]
    torch.testing.assert_close(module.partners(data.texts).positive, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="margin target attributes query texts"):
        AttributionModule(tiny_bert_preset, text_side="passage", target="margin")
