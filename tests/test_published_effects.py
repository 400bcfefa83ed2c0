"""The published code's own behaviours, each an explicit option, against a literal re-implementation of
that code (``knowledge_decentralization/compute_attributions.py`` and
``knowledge_consistency/precompute_embeddings.py`` of ielab/DenseRetriever-Knowledge-Acquisition) on tiny
models. docs/differences.md gives each one's measured effect on all-MiniLM-L6-v2."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertModel,
    DPRConfig,
    DPRQuestionEncoder,
    LlamaModel,
    PreTrainedTokenizerFast,
)

from dkacq.attribution.counting import ActiveNeuronCounts
from dkacq.attribution.ig import neuron_scores
from dkacq.attribution.module import AttributionModule
from dkacq.attribution.targets import find_targets
from dkacq.datamodules.texts import TextDataModule
from dkacq.encoders.presets import EncoderPreset, ModelSource
from dkacq.encoders.text_encoder import TextEncoder

TEXTS = [
    "what is the python list",
    "how does a function return a value from a class method when the key is a string",
    "the first key",
    "who was the first name of the data set",
    "why is it an error",
]
THRESHOLDS = (0.1, 0.2)
STEPS = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


# --------------------------------------------------------------------------- tiny models, perturbed


def _perturb_and_save(model: nn.Module, tokenizer_dir, folder) -> str:
    """Norms and biases moved off their initial values (fresh norms make ``||norm(x)||`` a constant, and
    every CLS or EOS score rounding noise), saved with the tokenizer."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bert_dir(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT with a pooler (as bert-base-uncased has), norms and biases perturbed."""
    torch.manual_seed(1)
    model = BertModel.from_pretrained(tiny_bert_dir, add_pooling_layer=True)
    return _perturb_and_save(model, tiny_bert_dir, tmp_path_factory.mktemp("bert-pooler"))


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir, tmp_path_factory):
    return _perturb_and_save(
        LlamaModel.from_pretrained(tiny_llama_dir), tiny_llama_dir, tmp_path_factory.mktemp("llama")
    )


@pytest.fixture(scope="module")
def dpr_dir(tiny_bert_dir, tmp_path_factory):
    """A tiny DPR question encoder: its ``pooler_output`` is the CLS vector itself."""
    torch.manual_seed(3)
    config = DPRConfig(
        vocab_size=AutoTokenizer.from_pretrained(tiny_bert_dir).vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return _perturb_and_save(DPRQuestionEncoder(config), tiny_bert_dir, tmp_path_factory.mktemp("dpr"))


def preset(folder, pooling: str, **kwargs) -> EncoderPreset:
    source = ModelSource(str(folder))
    settings = dict(query_max_length=16, passage_max_length=32)
    if pooling.startswith("eos"):
        settings.update(
            query_prefix="query: ", passage_prefix="passage: ", attribution_kinds=("gate_proj", "down_proj")
        )
    return EncoderPreset("tiny", "tiny", query=source, passage=source, pooling=pooling, **{**settings, **kwargs})


# --------------------------------------------------------------------------- the published code, literally


def published_tokenizer(folder):
    """``get_tokenizer``: the folder's tokenizer, padding with EOS where it has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def published_preprocess(texts, encoder_type, target="question"):
    """``preprocess_texts`` of compute_attributions.py."""
    if encoder_type.lower() == "eos":
        if target == "positive_context":
            return [f"passage: {text}</s>" for text in texts]
        elif target == "question":
            return [f"query: {text}</s>" for text in texts]
    return texts


def published_layers(model):
    """``get_model_layers`` and the dense list of ``collect_activations``."""
    if hasattr(model, "encoder"):
        layers = model.encoder.layer
    elif hasattr(model, "question_encoder"):
        layers = model.question_encoder.bert_model.encoder.layer
    else:
        layers = model.layers
    dense_list = []
    for layer in layers:
        if hasattr(layer, "mlp"):
            dense_list += [layer.mlp.gate_proj, layer.mlp.down_proj]
        else:
            dense_list += [layer.intermediate.dense, layer.output.dense]
    return dense_list


def published_run(folder, texts, batch_size, encoder_type, target="question", n_steps=STEPS, thresholds=THRESHOLDS):
    """``collect_activations`` with ``compute_batch_layerwise_global_ig_counts``, on a float64 model.

    Returns the per-text neuron IG of every dense layer, and per threshold each text's number of active
    neurons per dense layer (the published code sums these over texts).
    """
    model = AutoModel.from_pretrained(folder, output_hidden_states=False, dtype=torch.float64).eval()
    tokenizer = published_tokenizer(folder)
    texts = published_preprocess(texts, encoder_type, target)
    dense_list = published_layers(model)
    scores, active = [], {threshold: [] for threshold in thresholds}
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=256
        )
        if "token_type_ids" in inputs:
            inputs.pop("token_type_ids")
        inputs = dict(inputs)
        original_params = [(layer, layer.weight.data.clone(), layer.bias.data.clone() if layer.bias is not None else None) for layer in dense_list]  # fmt: skip
        alpha_values = torch.linspace(1e-6, 1.0, steps=n_steps)
        delta_alpha = 1.0 / n_steps
        for ex in range(inputs["input_ids"].shape[0]):
            per_layer_igs = []
            for layer, W_orig, b_orig in original_params:
                accumulator = torch.zeros_like(W_orig)
                for alpha in alpha_values:
                    layer.weight.data = W_orig * alpha
                    if b_orig is not None:
                        layer.bias.data = b_orig * alpha
                    single_inputs = {k: v[ex : ex + 1] for k, v in inputs.items()}
                    with torch.enable_grad():
                        outputs = model(**single_inputs)
                        if hasattr(outputs, "pooler_output") and encoder_type.lower() == "cls":
                            token_rep = outputs.pooler_output
                        else:
                            hidden = outputs.last_hidden_state
                            if encoder_type.lower() == "mean":
                                token_rep = hidden.mean(dim=1)
                            elif encoder_type.lower() == "eos":
                                token_rep = hidden[:, -1, :]
                            else:
                                token_rep = hidden[:, 0, :]
                        out_scalar = token_rep.norm()
                    grad = torch.autograd.grad(out_scalar, layer.weight, retain_graph=True)[0]
                    accumulator += grad * (W_orig * delta_alpha)
                layer.weight.data = W_orig
                if b_orig is not None:
                    layer.bias.data = b_orig
                per_layer_igs.append(accumulator.abs().sum(dim=1))
            global_max = torch.cat(per_layer_igs).max().item() or 1.0
            scores.append([ig.detach() for ig in per_layer_igs])
            for threshold in thresholds:
                active[threshold].append([int((ig / global_max > threshold).sum()) for ig in per_layer_igs])
    return scores, active


def dkacq_run(module: AttributionModule, texts, batch_size):
    """What ``predict_step`` does over the texts in batches of ``batch_size``, in float64."""
    encoder, _ = module.build_encoder(torch.float64)
    targets = find_targets(encoder.transformer, module.kinds)
    metric = ActiveNeuronCounts(targets, module.thresholds, text_capacity=len(texts))
    scores = {target.name: [] for target in targets}
    for start in range(0, len(texts), batch_size):
        batch_texts = texts[start : start + batch_size]
        batch_scores = neuron_scores(encoder, encoder.tokenize(batch_texts), targets, steps=module.hparams.steps)
        metric.update(batch_scores, range(start, start + len(batch_texts)))
        for name, value in batch_scores.items():
            scores[name].append(value)
    return targets, {name: torch.cat(value) for name, value in scores.items()}, metric.compute()


def assert_same_as_published(module, folder, encoder_type, batch_size, texts=TEXTS, tolerance=1e-6):
    """Every neuron score of every text within ``tolerance`` of the largest (the published alphas are a
    float32 linspace), and every per-text, per-module active count and total equal."""
    targets, scores, counts = dkacq_run(module, texts, batch_size)
    published, active = published_run(folder, texts, batch_size, encoder_type)
    for text in range(len(texts)):
        for index, target in enumerate(targets):
            expected = published[text][index]
            assert (scores[target.name][text] - expected).abs().max() <= tolerance * expected.abs().max(), target.name
    for threshold in THRESHOLDS:
        for index, target in enumerate(targets):
            column = [active[threshold][text][index] for text in range(len(texts))]
            assert counts.per_text[target.kind, threshold][:, target.layer].tolist() == column, (target.name, threshold)
            assert int(counts.counts[target.kind, threshold][target.layer].sum()) == sum(column)
    return counts


def module_for(folder, pooling, **kwargs) -> AttributionModule:
    return AttributionModule(
        preset(folder, pooling), steps=STEPS, thresholds=list(THRESHOLDS), max_length=256, **kwargs
    )


# --------------------------------------------------------------------------- (a) the unmasked mean


def test_unmasked_mean_reproduces_the_published_mean(bert_dir):
    """The published mean averages padding too, so a text's numbers depend on its batch of 8 (here 3)."""
    published = assert_same_as_published(module_for(bert_dir, "mean", unmasked_mean=True), bert_dir, "mean", 3)
    _, _, ours = dkacq_run(module_for(bert_dir, "mean"), TEXTS, 3)
    assert any(not torch.equal(ours.per_text[key], published.per_text[key]) for key in ours.per_text)
    # texts alone (batch 1) have no padding: there the published mean is dkacq's
    assert_same_as_published(module_for(bert_dir, "mean"), bert_dir, "mean", 1, texts=TEXTS[:2])


# --------------------------------------------------------------------------- (b) the CLS pooler


def test_cls_pooler_reproduces_the_published_pooler_output(bert_dir):
    module = module_for(bert_dir, "cls", cls_pooler=True)
    assert module.build_encoder()[0].pooler is not None
    published = assert_same_as_published(module, bert_dir, "cls", 3)
    _, _, ours = dkacq_run(module_for(bert_dir, "cls"), TEXTS, 3)
    assert any(not torch.equal(ours.per_text[key], published.per_text[key]) for key in ours.per_text)


def test_dprs_pooler_output_is_its_cls_vector(dpr_dir):
    """For DPR the published ``pooler_output`` is the raw CLS vector: dkacq's default already matches."""
    assert module_for(dpr_dir, "cls", cls_pooler=True).build_encoder()[0].pooler is None
    assert_same_as_published(module_for(dpr_dir, "cls"), dpr_dir, "cls", 3)


def test_cls_pooler_needs_the_pooler_weights(tiny_bert_dir):
    with pytest.raises(ValueError, match="no pooler weights") as error:
        module_for(tiny_bert_dir, "cls", cls_pooler=True).build_encoder()
    assert "\n" not in str(error.value)
    for kwargs, message in ((dict(cls_pooler=True), "pools by mean"), (dict(unmasked_mean=True), "pools by cls")):
        with pytest.raises(ValueError, match=message):
            module_for(tiny_bert_dir, "mean" if "cls_pooler" in kwargs else "cls", **kwargs)


# --------------------------------------------------------------------------- (c) the EOS input


def metaspace_tokenizer(folder) -> str:
    """A sentencepiece-like tokenizer (as Llama's), where a space before ``</s>`` is a token of its own."""
    words = ["[UNK]", "<s>", "</s>", "▁", "▁query:", "▁passage:", "▁the", "▁a", "▁list", "▁python", "▁is", "▁what"]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>").save_pretrained(folder)  # fmt: skip
    return str(folder)


@pytest.mark.parametrize("tokenizer", ["tiny_llama", "metaspace"])
@pytest.mark.parametrize("side", ["query", "passage"])
def test_eos_reference_input_is_the_published_scripts(request, tmp_path, tokenizer, side):
    """Attribution: ``prefix + text + "</s>"``, padded to the batch's longest text with EOS; probing:
    ``prefix + text + " </s>"``, padded to the maximum length. Token for token, mask for mask."""
    folder = request.getfixturevalue("tiny_llama_dir") if tokenizer == "tiny_llama" else metaspace_tokenizer(tmp_path)
    from dkacq.encoders.loading import load_tokenizer

    ours = load_tokenizer(ModelSource(str(folder)))  # dkacq's loader pads with the unknown token
    prefix = f"{side}: "
    texts = ["what is the list", "the a", "python is what the list is"]
    attribution = TextEncoder(nn.Identity(), ours, "eos_reference", prefix, 256, eos_reference_input="attribution")
    published = published_tokenizer(folder)
    expected = published(
        published_preprocess(texts, "eos", "question" if side == "query" else "positive_context"),
        return_tensors="pt", padding=True, truncation=True, max_length=256,
    )  # fmt: skip
    batch = attribution.tokenize(texts)
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert attribution.pads_to_batch and batch["input_ids"][1, -1] == published.eos_token_id
    probing = TextEncoder(nn.Identity(), ours, "eos_reference", prefix, 24)
    expected = published(
        [prefix + text + " </s>" for text in texts], padding="max_length", truncation=True, max_length=24,
        return_tensors="pt",
    )  # fmt: skip
    batch = probing.tokenize(texts)
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    if tokenizer == "metaspace":  # the space before "</s>" is a token here: the two scripts' inputs differ
        space = published.convert_tokens_to_ids("▁")
        assert [row[:-1] + [space, row[-1]] for row in attribution.token_ids(texts)] == probing.token_ids(texts)


def test_eos_reference_reproduces_the_published_attribution(llama_dir):
    """RepLlama's published attribution: the EOS input above, read at the last position of the batch."""
    module = module_for(llama_dir, "eos_reference")
    assert module.published_readings() == {"eos_reference_input": "attribution"}
    assert_same_as_published(module, llama_dir, "eos", 3)


# --------------------------------------------------------------------------- (d) the token limit


def test_an_explicit_max_length_wins(tiny_bert_dir):
    """Given, ``max_length`` is the limit (the published attribution: 256 for every side); not given, the
    preset's limit for the side, at most 256."""
    long_text = " ".join(["python"] * 50)
    given = AttributionModule(preset(tiny_bert_dir, "mean"), max_length=40)
    assert given.max_length == 40 and given.identity(None, "32-true")["max_length"] == 40
    encoder, _ = given.build_encoder()
    expected = published_tokenizer(tiny_bert_dir)([long_text], truncation=True, max_length=40)["input_ids"]
    assert encoder.max_length == 40 and encoder.token_ids([long_text]) == expected
    assert AttributionModule(preset(tiny_bert_dir, "mean")).max_length == 16
    assert AttributionModule(preset(tiny_bert_dir, "mean"), text_side="passage").max_length == 32
    assert (
        AttributionModule(preset(tiny_bert_dir, "mean", passage_max_length=512), text_side="passage").max_length == 256
    )


# --------------------------------------------------------------------------- (e) which texts


def test_max_examples_of_rows_takes_rows_first_as_published(tmp_path):
    questions = ["q1", "q2", "q1", "q3", "q2", "q4", "q5", "q6"]
    lines = [
        json.dumps(
            {"question": q, "positive_context": f"p{i}", **{f"negative_context_{k}": f"n{i}{k}" for k in range(4)}}
        )
        for i, q in enumerate(questions)
    ]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "train.jsonl").write_text("\n".join(line.replace(': "', ': "train ') for line in lines) + "\n")

    def texts(**kwargs):
        data = TextDataModule(
            dataset="dups", source="local", train_file=str(tmp_path / "train.jsonl"),
            test_file=str(tmp_path / "test.jsonl"), cache_dir=str(tmp_path / "cache"), max_examples=5, **kwargs,
        )  # fmt: skip
        data.prepare_data()
        data.setup()
        return data.texts

    published = []  # main() of compute_attributions.py
    for i, example in enumerate({"question": q} for q in questions):
        if i >= 5:
            break
        published.append(example["question"])
    published = list(dict.fromkeys(published))
    assert texts(max_examples_of="rows") == published == ["q1", "q2", "q3"]
    assert texts() == ["q1", "q2", "q3", "q4", "q5"]
    with pytest.raises(ValueError, match="texts or rows"):
        texts(max_examples_of="pairs")


# --------------------------------------------------------------------------- a run with the options


def test_a_run_with_published_readings_records_them(tmp_path, probe_files, bert_dir):
    """Through ``Trainer.predict``: the identity and summary name the readings, and the counts are the
    published code's (float32 here, so the scores agree to float32 rounding only)."""
    from lightning.pytorch import Trainer

    train, test = probe_files
    data = TextDataModule(
        dataset="toy", source="local", train_file=train, test_file=test, cache_dir=str(tmp_path / "cache"),
        max_examples=5, batch_size=3,
    )  # fmt: skip
    module = AttributionModule(
        preset(bert_dir, "mean"), steps=STEPS, thresholds=list(THRESHOLDS), output_dir=str(tmp_path / "out"),
        unmasked_mean=True, max_length=256,
    )  # fmt: skip
    Trainer(logger=False, inference_mode=False, enable_progress_bar=False).predict(module, datamodule=data)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["published_readings"] == {"unmasked_mean": True}
    assert summary["identity"]["published_readings"] == {"unmasked_mean": True}
    assert summary["max_length"] == summary["identity"]["max_length"] == 256
    counts = load_file(tmp_path / "out" / "counts.safetensors")
    _, active = published_run(bert_dir, data.texts, 3, "mean")
    for threshold in THRESHOLDS:
        for kind, index in (("intermediate", 0), ("output", 1)):
            for layer in range(2):
                column = [text[2 * layer + index] for text in active[threshold]]
                assert counts[f"per_text/{kind}@{threshold:g}"][:, layer].tolist() == column
