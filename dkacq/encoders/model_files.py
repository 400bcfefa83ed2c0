"""An encoder read as its authors run it: what a model's own sentence-transformers files say, with
options that give or override each setting, and where every setting came from.

Read: ``modules.json`` (a Transformer at the folder's root, then Pooling, then optionally Normalize; any
other module changes the vector after pooling and is refused), the pooling module's ``config.json``
(cls, mean, max, mean_sqrt_len_tokens, weightedmean, lasttoken; with or without the legacy
``pooling_mode_*`` keys), ``sentence_bert_config.json`` (``max_seq_length``, ``do_lower_case``, the
per-task ``query_length`` and ``document_length``), and ``config_sentence_transformers.json`` (the
``query`` prompt, the ``document``/``passage``/``corpus`` prompt, ``default_prompt_name``), with the
precedence sentence-transformers' own ``encode_query`` and ``encode_document`` give them. Without a
``max_seq_length`` the limit is the tokenizer's ``model_max_length`` capped at the model's
``max_position_embeddings``, as sentence-transformers loads it.

Every setting of the resulting :class:`~dkacq.encoders.presets.EncoderPreset` carries its origin
(``file:<path> <field>``, ``option`` or ``default``) in ``origins``, which the embedding cache's request
and so every cell's identity record: a changed ``1_Pooling/config.json`` is a new cell.
"""

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError

from dkacq.encoders.loading import resolve_model_path, unreachable_error
from dkacq.encoders.pooling import POOLINGS, Pooling
from dkacq.encoders.presets import EncoderPreset, ModelSource, backbone_label, readable_label
from dkacq.formats.errors import DkacqError
from dkacq.formats.identity import digest

ST_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "*/config.json",
    "config.json",
    "tokenizer_config.json",
)
"""The files read here (a hub model's are fetched alone, never its weights)."""

ST_POOLING = {
    "cls": "cls",
    "mean": "mean",
    "max": "max",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean": "weightedmean",
    "lasttoken": "lasttoken",
}
"""sentence-transformers' pooling mode -> dkacq's pooling."""
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_PASSAGE_PROMPTS = ("document", "passage", "corpus")
"""The prompt names ``encode_document`` tries, in its order."""
_FINE_TRANSFORMER = {"transformer_task": "feature-extraction", "module_output_name": "token_embeddings"}
"""sentence_bert_config.json values that read the last hidden state as dkacq does."""
SETTINGS = ("pooling", "query_prefix", "passage_prefix", "normalize", "query_max_length", "passage_max_length")
"""The settings a model's files give and options override."""


class ModelFilesError(DkacqError, ValueError):
    """A model whose files do not say how to encode with it, or say something dkacq cannot honour."""


def check_label(label: str) -> str:
    """A label as results and file names use it: refused when it has a path separator or is blank."""
    if not label.strip() or any(character in label for character in "/\\\0") or label.strip() != label:
        raise ModelFilesError(f"label {label!r} cannot name a model in results and file names (no /, \\ or blanks)")
    return label


def _files_folder(model: str, revision: str | None) -> Path:
    """The folder holding ``model``'s configuration files: a local folder or package as is, a hub
    model's files (:data:`ST_FILES` only) fetched into the Hugging Face cache."""
    if model.startswith("package:") or os.path.exists(model):
        return Path(resolve_model_path(model))
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=list(ST_FILES)))
    except (OSError, HFValidationError) as error:
        raise unreachable_error(model, error) from error


def _read_json(folder: Path, name: str) -> Any:
    path = folder / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelFilesError(f"{path}: not readable JSON ({error})") from error


@dataclass(frozen=True)
class FileSettings:
    """The settings one model's files give: setting -> (value, origin); absent ones are not given."""

    found: dict[str, tuple[Any, str]]
    lowercase: bool = False
    has_modules: bool = False


def read_file_settings(model: str, revision: str | None = None) -> FileSettings:
    """What ``model``'s sentence-transformers files say, each setting with the file and field it came from.

    Raises :class:`ModelFilesError` (one line, naming the file and field) for a module or setting that
    changes the vector in a way dkacq does not reproduce.
    """
    folder = _files_folder(model, revision)
    found: dict[str, tuple[Any, str]] = {}
    modules = _read_json(folder, "modules.json")
    lowercase = False
    if modules is not None:
        found |= _modules_settings(folder, modules)
        sbert = _read_json(folder, "sentence_bert_config.json") or {}
        lowercase = _transformer_settings(folder, sbert, found)
        found |= _prompt_settings(folder)
    _limit_from_tokenizer(folder, found)
    return FileSettings(found, lowercase, modules is not None)


def similarity_of(model: str, revision: str | None = None) -> str:
    """How the model's authors rank with it: ``similarity_fn_name`` of its
    ``config_sentence_transformers.json``, else cosine for a sentence-transformers model (the library's
    default), else dot product (a model without those files: DPR, Contriever and their kin are trained
    with it). A similarity other than cosine or dot is refused in one line."""
    folder = _files_folder(model, revision)
    name = "config_sentence_transformers.json"
    if _read_json(folder, "modules.json") is None:
        return "dot"
    given = (_read_json(folder, name) or {}).get("similarity_fn_name")
    if given is None:
        return "cosine"
    if given not in ("cosine", "dot"):
        raise ModelFilesError(
            f"{folder / name}: similarity_fn_name {given!r} is not one dkacq ranks by; give data.collection.dense_similarity cosine or dot"
        )
    return given


def _modules_settings(folder: Path, modules: Any) -> dict[str, tuple[Any, str]]:
    where = folder / "modules.json"
    if not isinstance(modules, list) or not all(isinstance(module, dict) for module in modules):
        raise ModelFilesError(f"{where}: expected a list of modules")
    kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
    if not kinds or kinds[0] != "Transformer":
        raise ModelFilesError(f"{where}: the first module is {kinds[0] if kinds else 'missing'}, not a Transformer")
    if modules[0].get("path", "") not in ("", "."):
        raise ModelFilesError(
            f"{where}: the Transformer sits in the subfolder {modules[0]['path']!r}; give that subfolder as the model "
            "and the pooling option"
        )
    for module, kind in zip(modules[1:], kinds[1:]):
        if kind not in ("Pooling", "Normalize"):
            raise ModelFilesError(
                f"{where}: module {module.get('name', '?')} ({module.get('type')}) changes the vector after pooling, "
                "which dkacq does not reproduce (it reads Transformer, Pooling and Normalize modules only)"
            )
    if kinds[1:] not in (["Pooling"], ["Pooling", "Normalize"]):
        raise ModelFilesError(
            f"{where}: expected Transformer, Pooling and optionally Normalize, got {', '.join(kinds)}"
        )
    pooling_path = f"{modules[1].get('path') or '1_Pooling'}/config.json"
    settings = {"pooling": (_pooling(folder, pooling_path), f"file:{pooling_path} pooling_mode")}
    settings["normalize"] = (len(kinds) == 3, "file:modules.json Normalize")
    return settings


def _pooling(folder: Path, name: str) -> Pooling:
    config = _read_json(folder, name)
    where = folder / name
    if not isinstance(config, dict):
        raise ModelFilesError(f"{where}: missing or not a mapping; the Pooling module needs it")
    if config.get("include_prompt") is False:
        raise ModelFilesError(
            f"{where}: include_prompt false (the prompt's tokens left out of pooling) is not reproduced by dkacq"
        )
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1:
        raise ModelFilesError(f"{where}: pooling_mode {modes} concatenates poolings; dkacq reads one")
    if modes[0] not in ST_POOLING:
        raise ModelFilesError(f"{where}: unknown pooling_mode {modes[0]!r}; dkacq reads {', '.join(ST_POOLING)}")
    return ST_POOLING[modes[0]]


def _transformer_settings(folder: Path, sbert: Any, found: dict) -> bool:
    """The token limits of sentence_bert_config.json into ``found``; returns its ``do_lower_case``."""
    where = folder / "sentence_bert_config.json"
    if not isinstance(sbert, dict):
        raise ModelFilesError(f"{where}: not a mapping")
    for key, fine in _FINE_TRANSFORMER.items():
        if sbert.get(key, fine) != fine:
            raise ModelFilesError(f"{where}: {key} {sbert[key]!r} is not read by dkacq (it reads {fine!r})")
    modality = sbert.get("modality_config")
    if modality not in (None, {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}):
        raise ModelFilesError(f"{where}: modality_config {modality} is not the text model's last hidden state")
    for key in ("processing_kwargs", "query_expansion"):
        if sbert.get(key):
            raise ModelFilesError(f"{where}: {key} is not reproduced by dkacq")
    limit = sbert.get("max_seq_length")
    if limit is not None:
        found["query_max_length"] = found["passage_max_length"] = (
            int(limit),
            "file:sentence_bert_config.json max_seq_length",
        )
    for key, setting in (("query_length", "query_max_length"), ("document_length", "passage_max_length")):
        if sbert.get(key) is not None:
            found[setting] = (int(sbert[key]), f"file:sentence_bert_config.json {key}")
    return bool(sbert.get("do_lower_case", False))


def _prompt_settings(folder: Path) -> dict[str, tuple[Any, str]]:
    name = "config_sentence_transformers.json"
    config = _read_json(folder, name) or {}
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict):
        raise ModelFilesError(f"{folder / name}: prompts is not a mapping")
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ModelFilesError(f"{folder / name}: default_prompt_name {default!r} is not one of its prompts")
    settings = {}
    for setting, candidates in (("query_prefix", ("query",)), ("passage_prefix", _PASSAGE_PROMPTS)):
        prompt = next((candidate for candidate in candidates if candidate in prompts), default)
        if prompt is not None:
            field = "default_prompt_name" if prompt == default and prompt not in candidates else f"prompts.{prompt}"
            settings[setting] = (str(prompts[prompt]), f"file:{name} {field}")
        else:
            settings[setting] = ("", f"file:{name} (no prompt)")
    return settings


def _limit_from_tokenizer(folder: Path, found: dict) -> None:
    """Token limits not given by sentence_bert_config.json: the tokenizer's ``model_max_length`` capped at
    the model's ``max_position_embeddings``, as sentence-transformers loads them."""
    if "query_max_length" in found and "passage_max_length" in found:
        return
    limits = []
    tokenizer = _read_json(folder, "tokenizer_config.json") or {}
    config = _read_json(folder, "config.json") or {}
    if isinstance(tokenizer.get("model_max_length"), int) and tokenizer["model_max_length"] < 10**7:
        limits.append((tokenizer["model_max_length"], "file:tokenizer_config.json model_max_length"))
    if isinstance(config.get("max_position_embeddings"), int) and config["max_position_embeddings"] > 0:
        limits.append((config["max_position_embeddings"], "file:config.json max_position_embeddings"))
    if limits:
        limit = min(limits)
        for setting in ("query_max_length", "passage_max_length"):
            found.setdefault(setting, limit)


@dataclass(frozen=True)
class AutoEncoder:
    """An encoder read from a model's own files (``--data.encoder auto``), each setting overridable.

    ``model`` (hub id or folder) encodes queries and, unless ``passage_model`` is given (a two-tower
    retriever), passages; ``lora_adapter`` is merged into ``model`` (RepLlama style). Settings come from
    the files of ``settings_from`` (default: ``model``), so that a backbone can be read as the model
    fine-tuned from it is (:meth:`backbone_encoder`).
    """

    model: str
    passage_model: str | None = None
    lora_adapter: str | None = None
    revision: str | None = None
    settings_from: str | None = None
    label: str | None = None
    pooling: Pooling | None = None
    query_prefix: str | None = None
    passage_prefix: str | None = None
    normalize: bool | None = None
    query_max_length: int | None = None
    passage_max_length: int | None = None
    random_init: bool = False
    """Fresh weights of the same architecture (the untrained control), labelled ``<label>-random``."""
    init_seed: int = 0

    def preset(self) -> EncoderPreset:
        """The settings resolved: options first, then the files, then defaults; refused in one line when
        nothing says how the model pools."""
        source = self.settings_from or self.model
        files = read_file_settings(source, self.revision if source == self.model else None)
        values, origins = {}, {}
        for setting in SETTINGS:
            option = getattr(self, setting)
            if option is not None:
                values[setting], origins[setting] = option, "option"
            elif setting in files.found:
                values[setting], origins[setting] = files.found[setting]
        if "pooling" not in values:
            raise ModelFilesError(
                f"model '{source}' has no sentence-transformers files (modules.json, 1_Pooling/config.json) that "
                f"say how it pools: give the pooling option ({', '.join(p for p in POOLINGS if p != 'eos_reference')}) "
                "and, where its authors use them, query_prefix, passage_prefix, normalize and the max lengths"
            )
        for setting, default in (("query_prefix", ""), ("passage_prefix", ""), ("normalize", False)):
            if setting not in values:
                values[setting], origins[setting] = default, "default"
        for setting in ("query_max_length", "passage_max_length"):
            if setting not in values:
                raise ModelFilesError(
                    f"model '{source}' gives no token limit (sentence_bert_config.json, tokenizer_config.json or "
                    f"config.json): give the {setting} option"
                )
            if int(values[setting]) < 2:
                raise ModelFilesError(
                    f"{setting} {values[setting]} of model '{source}' ({origins[setting]}) is below 2"
                )
        if files.lowercase:
            origins["lowercase"] = "file:sentence_bert_config.json do_lower_case"
        if self.settings_from:
            origins = {setting: f"{origin} of {self.settings_from}" for setting, origin in origins.items()}
        label = check_label(self.label or self.default_label())
        query = ModelSource(self.model, self.revision, lora_adapter=self.lora_adapter)
        passage = ModelSource(self.passage_model, self.revision) if self.passage_model else query
        preset = EncoderPreset(
            name="auto",
            label=label,
            query=query,
            passage=passage,
            lowercase=files.lowercase,
            origins=tuple(sorted(origins.items())),
            attribution_kinds=(),  # the architecture family's own (dkacq.attribution.targets)
            **values,
        )
        # the cache folder's name: the model and everything read, not the label (which is only shown)
        read = {
            "sources": [vars(query), vars(passage)],
            "settings": values,
            "origins": origins,
            "lower": files.lowercase,
        }
        preset = replace(preset, name=f"auto@{self.default_label()}-{digest(read, 8)}")
        return preset.randomized(self.init_seed) if self.random_init else preset

    def default_label(self) -> str:
        """The adapter's name for a LoRA model, ``query+passage`` names for two towers, else the model's."""
        if self.lora_adapter:
            return readable_label(self.lora_adapter)
        if self.passage_model:
            return f"{readable_label(self.model)}+{readable_label(self.passage_model)}"
        return readable_label(self.model)

    def backbone_encoder(self, backbone: str) -> "AutoEncoder":
        """``backbone`` read with this model's settings (its files and the options given), labelled
        ``<backbone>@<this model's label>``: what fine-tuning changed is the difference between the two."""
        label = backbone_label(backbone, check_label(self.label or self.default_label()))
        return replace(
            self,
            model=backbone,
            passage_model=None,
            lora_adapter=None,
            revision=None,
            settings_from=self.settings_from or self.model,
            label=label,
            random_init=False,
        )
