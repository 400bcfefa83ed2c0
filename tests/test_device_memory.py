"""``--data.extraction_batch_size auto``: the extraction memory model by hand, and a cache built with it."""

import json
import math

import torch
from test_cache_integrity import REQUEST, _probe_set

from dkacq.encoders import memory
from dkacq.encoders.extraction import build_cache
from dkacq.encoders.loading import load_encoders, model_config


def test_the_extraction_model_by_hand(tiny_bert_preset):
    """The tiny BERT: 2 layers, hidden 32, intermediate 64, 2 heads; float32, 10 tokens."""
    config = model_config(tiny_bert_preset.query)
    per_token = 4 * (3 * 32 + 4 * 32 + 2 * 64 + 2 * 2 * 10)
    assert memory.extraction_bytes_per_text_token(config, 4, 10) == per_token == 1568
    per_text = 10 * per_token
    assert memory.extraction_batch_size(config, 4, 10, 100 * per_text, most=1024) == 64
    assert memory.extraction_batch_size(config, 4, 10, 100 * per_text, most=16) == 16
    assert memory.extraction_batch_size(config, 4, 10, 128 * per_text, most=1024) == 128
    assert memory.extraction_batch_size(config, 4, 10, per_text - 1, most=1024) == 1
    assert memory.running_dtype("bf16-true") == torch.bfloat16 and memory.running_dtype("bf16-mixed") == torch.float32


def test_an_auto_batch_size_builds_the_cache_of_that_fixed_size(tmp_path, tiny_bert_preset, monkeypatch):
    query_encoder, passage_encoder = load_encoders(tiny_bert_preset)
    probe_set = _probe_set()
    texts = [text for split in probe_set.values() for column in split.column_names for text in split[column]]
    tokens = max(len(ids) for ids in query_encoder.token_ids(texts))
    weights = sum(parameter.numel() for parameter in query_encoder.transformer.parameters()) * 4
    per_text = tokens * 4 * (3 * 32 + 4 * 32 + 2 * 64 + 2 * 2 * tokens)
    # room for 5 texts beside the weights, after the 15% margin: the power of two below is 4
    monkeypatch.setattr(memory, "total_bytes", lambda device: weights + math.ceil(5.5 * per_text / 0.85))
    auto = build_cache(tmp_path / "auto", REQUEST, query_encoder, passage_encoder, probe_set, batch_size="auto",
                       precision="32-true", accelerator="cpu")  # fmt: skip
    fixed = build_cache(tmp_path / "fixed", REQUEST, query_encoder, passage_encoder, probe_set, batch_size=4,
                        precision="32-true", accelerator="cpu")  # fmt: skip
    assert json.loads((auto.folder / "manifest.json").read_text())["batch_size"] == 4
    for file in sorted(fixed.folder.glob("layer_*.safetensors")):
        assert (auto.folder / file.name).read_bytes() == file.read_bytes(), file.name
