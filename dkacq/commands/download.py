"""``dkacq download``: the presets' weights and the study's data sets, fetched once so the study runs offline.

Everything lands where the other commands read it: hub models and data sets in the standard Hugging Face
caches (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_DATASETS_CACHE``), where ``from_pretrained`` and
``datasets.load_dataset`` find them with ``HF_HUB_OFFLINE=1``; DPR's Natural Questions files in
``--data_dir``. Every download resumes where a stopped one left off: the hub and ``datasets`` keep their
incomplete files, and the DPR files are fetched with HTTP ranges into ``<name>.partial``, renamed only
once their size is the one the server announced.

Of a hub model only the files loading reads are fetched: config and tokenizer files and the weights, as
safetensors where the repository has them, else as ``.bin`` (Llama-2 ships both: 13 GB, not 27).
"""

from __future__ import annotations

import fnmatch
import http.client
import importlib
import importlib.util
import json
import os
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from datasets import config as datasets_config
from datasets import load_dataset
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from jsonargparse import auto_cli
from tqdm.auto import tqdm

from dkacq.data.collection import IrDatasetsCollection
from dkacq.data.examples import MSMARCO_CONFIG, MSMARCO_HUB_ID, MSMARCO_SPLITS, PUBLISHED_SPLITS, ProbeDataError
from dkacq.encoders.loading import ModelUnavailableError, hub_offline, resolve_model_path
from dkacq.encoders.presets import PRESETS, ModelSource, split_control_label
from dkacq.formats.atomic import human_bytes
from dkacq.formats.errors import DkacqError

DATA_NAMES = ("nq-dpr", "msmarco", "published-nq", "published-msmarco")
IR_DATASETS = "ir_datasets:"
"""``--data ir_datasets:<id>``: a collection fetched by ir_datasets into its own cache."""

DPR_URL = "https://dl.fbaipublicfiles.com/dpr/data/retriever/"
NQ_DPR_FILES = {"train": "biencoder-nq-adv-hn-train.json.gz", "test": "biencoder-nq-dev.json.gz"}
"""DPR's Natural Questions retriever files, by the probe split they give (read gzipped as they are)."""
PUBLISHED_NQ = "wshuai190/nq-hard-negative-dpr-sampled-seed-42-sample-4"
PUBLISHED_MSMARCO = "wshuai190/msmarco-v1.1-hard-negative-seed-42-sample-4"


@dataclass(frozen=True)
class HubData:
    """A data set the readers load from the hub: its id, config, splits (probe split -> hub split) and
    the ``--data`` options that read it."""

    hub_id: str
    config: str | None
    splits: dict[str, str]
    options: str


HUB_DATA: dict[str, HubData] = {
    "msmarco": HubData(MSMARCO_HUB_ID, MSMARCO_CONFIG, MSMARCO_SPLITS, "--data.dataset msmarco --data.source msmarco"),
    "published-nq": HubData(
        PUBLISHED_NQ, None, PUBLISHED_SPLITS, f"--data.dataset nq --data.source published --data.hub_id {PUBLISHED_NQ}"
    ),
    "published-msmarco": HubData(
        PUBLISHED_MSMARCO,
        None,
        PUBLISHED_SPLITS,
        f"--data.dataset msmarco --data.source published --data.hub_id {PUBLISHED_MSMARCO}",
    ),
}

LOADING_FILES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template*",
)
"""Top-level files that loading a model, its tokenizer or a peft adapter reads, besides the weights."""
SAFETENSORS_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
BIN_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin")

_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DataUnavailableError(DkacqError, RuntimeError):
    """A data set that can be neither downloaded nor found in the cache. The message is one line."""


@dataclass(frozen=True)
class HubRepo:
    """One hub repository to fetch, at a revision (None: the default branch, as loading asks for it)."""

    repo_id: str
    revision: str | None = None
    gguf_file: str | None = None
    role: str = "model"
    """``model`` or ``adapter`` (a peft LoRA adapter, merged into its base when loaded)."""

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision or 'main'}"


@dataclass(frozen=True)
class Fetched:
    """One line of the summary: what, where it is, its size on disk (None: unknown)."""

    kind: str
    name: str
    where: str
    size: int | None
    note: str = ""


# --------------------------------------------------------------------------------------------- models


def preset_names(names: list[str]) -> list[str]:
    """Preset names as given, ``all`` as every preset, a random-init control (``bert-cls-random``) as the
    preset it controls (its config and tokenizer come from there). An unknown name is a one-line error."""
    resolved = []
    for name in names:
        if name == "all":
            resolved += list(PRESETS)
            continue
        control = split_control_label(name)
        trained = name if name in PRESETS or control is None else control[0]
        if trained not in PRESETS:
            raise ValueError(f"unknown preset '{name}'; choose any of {', '.join(PRESETS)}, or all")
        resolved.append(trained)
    return list(dict.fromkeys(resolved))


def model_sources(names: list[str]) -> tuple[list[HubRepo], list[tuple[str, ModelSource]]]:
    """The hub repositories of the presets (query and passage sides, adapters, each once) and their
    ``package:`` or local-folder sources as (preset, source)."""
    repos: dict[HubRepo, None] = {}
    local: dict[ModelSource, str] = {}
    for name in preset_names(names):
        preset = PRESETS[name]
        for source in (preset.query, preset.passage):
            if source.model.startswith("package:") or os.path.exists(source.model):
                local.setdefault(source, name)
            else:
                repos[HubRepo(source.model, source.revision, source.gguf_file)] = None
            if source.lora_adapter and not os.path.exists(source.lora_adapter):
                repos[HubRepo(source.lora_adapter, role="adapter")] = None
    return list(repos), [(name, source) for source, name in local.items()]


def loading_patterns(files: list[str], gguf_file: str | None = None) -> list[str]:
    """``allow_patterns`` for a repository of ``files``: what loading reads, and one copy of the weights:
    the GGUF file if named, else safetensors where there are any, else the PyTorch ``.bin`` files."""
    if gguf_file:
        if gguf_file not in files:
            raise ModelUnavailableError(f"the repository has no file '{gguf_file}' (gguf_file)")
        return [*LOADING_FILES, gguf_file]
    for weights in (SAFETENSORS_WEIGHTS, BIN_WEIGHTS):
        if any(fnmatch.fnmatch(file, weights[0]) or fnmatch.fnmatch(file, weights[2]) for file in files):
            return [*LOADING_FILES, *weights]
    raise ModelUnavailableError(
        "the repository has no PyTorch weights (no .safetensors and no pytorch_model/adapter_model .bin)"
    )


def fetch_hub_repo(repo: HubRepo, progress: bool = True) -> Fetched:
    """``repo``'s loading files in the Hugging Face cache, at its revision (recorded there, so that loading
    finds it offline). When the hub cannot be reached, a complete copy already in the cache will do."""
    try:
        info = HfApi().model_info(repo.repo_id, revision=repo.revision)
        patterns = loading_patterns([sibling.rfilename for sibling in info.siblings or []], repo.gguf_file)
        folder = snapshot_download(
            repo.repo_id, revision=repo.revision, allow_patterns=patterns, tqdm_class=tqdm if progress else None
        )
    except ModelUnavailableError as error:
        raise ModelUnavailableError(f"cannot download '{repo}': {error}") from None
    except Exception as error:
        if not isinstance(error, (OSError, ValueError)) and not _transport_error(error):
            raise  # not the hub's answer nor a failure to reach it: a bug, with its traceback
        folder = _cached_snapshot(repo) if _unreachable(error) else None
        if folder is None:
            raise _hub_failure(repo, error) from error
        return Fetched(repo.role, str(repo), folder, _folder_size(folder), "cached; hub not reached, not checked")
    return Fetched(repo.role, str(repo), folder, _folder_size(folder))


def package_status(preset: str, source: ModelSource) -> Fetched:
    """A ``package:`` source (shipped by a Python package) or a local folder: nothing to download."""
    if not source.model.startswith("package:"):
        return Fetched("folder", f"{source.model} ({preset})", source.model, _folder_size(source.model), "local")
    module = source.model.removeprefix("package:")
    try:
        folder = resolve_model_path(source.model)
    except ModelUnavailableError as error:  # its message ends with the line that installs it
        return Fetched("package", f"{module} ({preset})", "-", None, f"MISSING: {error}")
    note = "installed with pip"
    if source.gguf_file and importlib.util.find_spec("gguf") is None:
        note += "; MISSING the Python package 'gguf' that reads its GGUF file: pip install gguf"
    return Fetched("package", f"{module} ({preset})", folder, _folder_size(folder), note)


def _transport_error(error: BaseException) -> bool:
    """An HTTP client's own error (a refused connection, a timeout), which need not be an ``OSError``."""
    return type(error).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the hub could not be asked (offline mode, no connection, a server error),
    rather than the hub's answer (not found, gated, unauthorised) or a bad repository id."""
    if isinstance(error, HfHubHTTPError) and getattr(error, "response", None) is not None:
        return error.response.status_code >= 500
    return isinstance(error, OSError) or _transport_error(error)


def _cached_snapshot(repo: HubRepo) -> str | None:
    """The cached snapshot of ``repo`` at its revision if it holds a config and every weight file."""
    try:
        folder = snapshot_download(repo.repo_id, revision=repo.revision, local_files_only=True)
    except Exception:  # not in the cache, in any way
        return None
    return folder if _complete(Path(folder), repo.gguf_file) else None


def _complete(folder: Path, gguf_file: str | None) -> bool:
    """A snapshot that loading can use: its config, and its weights (all shards an index names)."""
    if gguf_file:
        return (folder / gguf_file).is_file()
    if not ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()):
        return False
    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / index).is_file():
            shards = set(json.loads((folder / index).read_text()).get("weight_map", {}).values())
            return all((folder / shard).is_file() for shard in shards)
        if (folder / single).is_file():
            return True
    return any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin"))


def _hub_failure(repo: HubRepo, error: BaseException) -> ModelUnavailableError:
    """One line: what could not be downloaded, why, and what to do."""
    url = f"https://huggingface.co/{repo.repo_id}"
    if isinstance(error, GatedRepoError):
        why = (
            f"it is gated: accept its licence at {url} with your account, then log in with `hf auth login` "
            "(or set HF_TOKEN) and run again"
        )
    elif isinstance(error, RevisionNotFoundError):
        why = f"the hub has no revision '{repo.revision}' of it; fix the preset's revision"
    elif isinstance(error, RepositoryNotFoundError):
        why = "the hub has no such repository, or it is private: log in with `hf auth login` (or set HF_TOKEN)"
    elif not _unreachable(error):
        why = f"the hub refused ({_one_line(error)})"
    else:
        cache = hub_constants.HF_HUB_CACHE
        if hub_offline():
            why = (
                f"HF_HUB_OFFLINE=1 is set and the Hugging Face cache ({cache}) does not hold it complete; "
                "unset HF_HUB_OFFLINE and run dkacq download with the network, or point HF_HOME at a cache "
                "that holds it"
            )
        else:
            why = (
                f"the hub could not be reached ({_one_line(error)}) and the Hugging Face cache ({cache}) does not "
                "hold it complete; connect to the network and run again (files already fetched are kept), or "
                "point HF_HOME at a cache that holds it"
            )
    return ModelUnavailableError(f"cannot download '{repo}': {why}")


# ----------------------------------------------------------------------------------------------- data


def fetch_url(url: str, destination: str | os.PathLike, progress: bool = True, timeout: float = 60.0) -> Path:
    """``url`` as the file ``destination``, resumably: bytes go to ``<destination>.partial``, which a
    later call continues with an HTTP range request, and which is renamed only once its size is the one
    announced (``Content-Length``, or the total of ``Content-Range``). An existing ``destination`` is
    complete (it was checked when renamed) and is not fetched again.
    """
    destination = Path(destination)
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    start = partial.stat().st_size if partial.is_file() else 0
    headers = {"User-Agent": "dkacq-download", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    kept = f" ({start} bytes kept in {partial}, resumed next time)" if start else ""
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:  # nothing after `start`: the partial file is complete, or too long
            total = _range_total(error.headers.get("Content-Range"))
            if total == start:
                partial.replace(destination)
                return destination
            partial.unlink()
            raise DataUnavailableError(
                f"cannot download {url}: {partial.name} was longer than the file ({start} bytes against "
                f"{total if total is not None else 'unknown'}) and is removed; run again to download it afresh"
            ) from None
        raise DataUnavailableError(f"cannot download {url}: HTTP {error.code} {error.reason}{kept}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        raise DataUnavailableError(
            f"cannot download {url} ({_one_line(reason)}): connect to the network and run again{kept}"
        ) from error
    with response:
        if response.status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != start:
                raise DataUnavailableError(
                    f"cannot resume {url}: the server sent bytes from {first}, not {start}{kept}"
                )
            mode = "ab"
        else:  # the whole file: no range asked, or the server ignores ranges
            start, total, mode = 0, None, "wb"
        length = response.headers.get("Content-Length")
        expected = start + int(length) if length is not None else total
        received = start
        try:
            with (
                open(partial, mode) as out,
                tqdm(
                    total=expected,
                    initial=start,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=destination.name,
                    disable=not progress,
                ) as bar,
            ):
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (OSError, ValueError, EOFError, http.client.HTTPException) as error:  # dropped, timed out
            raise DataUnavailableError(
                f"download of {url} stopped after {received} bytes ({_one_line(error)}); run again to resume "
                f"from {partial}"
            ) from error
    size = partial.stat().st_size
    if expected is not None and size != expected:
        if size > expected:
            partial.unlink()
        what = f"kept in {partial}; run again to resume" if size < expected else "removed; run again"
        raise DataUnavailableError(
            f"{destination.name}: {size} bytes received but the server announced {expected} "
            f"(Content-Length); refused, {what}"
        )
    partial.replace(destination)
    return destination


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes FIRST-LAST/TOTAL`` header."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match is None:
        return None, None
    return int(match[1]), None if match[3] == "*" else int(match[3])


def _range_total(header: str | None) -> int | None:
    """The total size of a 416 answer's ``Content-Range: bytes */TOTAL``."""
    match = re.fullmatch(r"bytes \*/(\d+)", (header or "").strip())
    return int(match[1]) if match else None


def fetch_nq_dpr(data_dir: Path, progress: bool = True) -> list[Fetched]:
    """DPR's NQ train (adversarial hard negatives) and dev files in ``data_dir``."""
    fetched = []
    for split, name in NQ_DPR_FILES.items():
        path = fetch_url(DPR_URL + name, Path(data_dir) / name, progress)
        fetched.append(Fetched("data", f"nq-dpr {split}", str(path), path.stat().st_size))
    return fetched


def nq_dpr_options(data_dir: Path) -> str:
    """The ``dkacq fit``/``attribute`` options that read the DPR files in ``data_dir``."""
    train, test = (Path(data_dir) / NQ_DPR_FILES[split] for split in ("train", "test"))
    return f"--data.dataset nq --data.source dpr --data.train_file {train} --data.test_file {test}"


def fetch_hub_data(name: str) -> list[Fetched]:
    """Each split of ``HUB_DATA[name]`` that the readers load, loaded as they load it, so that it is in
    the ``datasets`` cache."""
    data = HUB_DATA[name]
    fetched = []
    for hub_split in data.splits.values():
        try:
            dataset = load_dataset(data.hub_id, data.config, split=hub_split)
        except Exception as error:
            remedy = (
                "unset HF_HUB_OFFLINE and run dkacq download with the network"
                if hub_offline()
                else "connect to the network and run again (files already fetched are kept)"
            )
            raise DataUnavailableError(
                f"cannot download {data.hub_id} (split {hub_split!r}): {_one_line(error)}; {remedy}, or point "
                "HF_HOME at a cache that holds it"
            ) from error
        files = [Path(entry["filename"]) for entry in getattr(dataset, "cache_files", None) or []]
        where = str(files[0].parent) if files else str(datasets_config.HF_DATASETS_CACHE)
        size = sum(file.stat().st_size for file in files if file.is_file()) if files else None
        config = f" {data.config}" if data.config else ""
        fetched.append(Fetched("data", f"{data.hub_id}{config} [{hub_split}]", where, size))
    return fetched


def data_names(names: list[str]) -> list[str]:
    """The data names as given, checked before anything is fetched: one of :data:`DATA_NAMES` or
    ``ir_datasets:<id>``."""
    for name in names:
        if name not in DATA_NAMES and not (name.startswith(IR_DATASETS) and name.removeprefix(IR_DATASETS)):
            raise ValueError(f"unknown data '{name}'; choose any of {', '.join(DATA_NAMES)}, or ir_datasets:<id>")
    return list(dict.fromkeys(names))


def fetch_ir_dataset(dataset_id: str) -> list[Fetched]:
    """The docs, queries and qrels of an ir_datasets id, fetched by ir_datasets itself into its cache
    (``IR_DATASETS_HOME``), where ``--data.source ir_datasets`` reads them."""
    try:
        IrDatasetsCollection(dataset_id, "test").fetch()
    except ProbeDataError as error:
        raise DataUnavailableError(str(error)) from error
    import ir_datasets

    home = Path(ir_datasets.util.home_path())
    parts = dataset_id.split("/")
    where = next(
        (home.joinpath(*parts[:n]) for n in range(len(parts), 0, -1) if home.joinpath(*parts[:n]).is_dir()), home
    )
    return [Fetched("data", f"ir_datasets {dataset_id}", str(where), _folder_size(where) if where.is_dir() else None)]


# ------------------------------------------------------------------------------------------ the command


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Progress bars of ``huggingface_hub`` and ``datasets`` on (or off) while inside, whatever
    ``HF_HUB_DISABLE_PROGRESS_BARS`` / ``HF_DATASETS_DISABLE_PROGRESS_BARS`` say (``dkacq`` sets both for
    its other commands). Both libraries let these variables override ``enable_progress_bars()``, and read
    them once when imported, so the value they read is set aside here and restored afterwards."""
    modules = [
        (importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS"),
        (importlib.import_module("datasets.utils.tqdm"), "HF_DATASETS_DISABLE_PROGRESS_BARS"),
    ]
    saved = []
    for module, variable in modules:
        was_disabled = module.are_progress_bars_disabled()
        saved.append((module, variable, getattr(module, variable, None), was_disabled))
        if hasattr(module, variable):
            setattr(module, variable, None)
        with warnings.catch_warnings():  # a library that reads the variable elsewhere says it cannot
            warnings.simplefilter("ignore")
            (module.enable_progress_bars if enabled else module.disable_progress_bars)()
    try:
        yield
    finally:
        for module, variable, value, was_disabled in saved:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (module.disable_progress_bars if was_disabled else module.enable_progress_bars)()
            if hasattr(module, variable):
                setattr(module, variable, value)


def download(
    models: list[str] | str | None = None,
    data: list[str] | str | None = None,
    data_dir: Path = Path("data/nq"),
    progress: bool = True,
) -> list[Fetched]:
    """Fetch preset weights and data sets so that the study runs offline; print where each is and its size.

    Hub models go to the Hugging Face cache (where ``from_pretrained`` looks), hub data sets to the
    ``datasets`` cache, DPR's NQ files to ``data_dir``. Every download resumes a stopped one. An item
    that cannot be fetched is one line at the end (after the summary of the rest).

    Args:
        models: preset names (query and passage encoders, LoRA adapters and their bases), or all.
            Presets whose weights come with a Python package (minilm, smollm-gguf) are checked, not
            downloaded.
        data: nq-dpr (DPR's NQ retriever files), msmarco (microsoft/ms_marco v1.1), published-nq or
            published-msmarco (the authors' probe sets), or ir_datasets:<id> (a collection's docs, queries
            and qrels fetched by ir_datasets into its own cache, e.g. ir_datasets:beir/scifact/test).
        data_dir: where the nq-dpr files go.
        progress: show progress bars (also when HF_HUB_DISABLE_PROGRESS_BARS is set).
    """
    models = [models] if isinstance(models, str) else list(models or [])
    data = data_names([data] if isinstance(data, str) else list(data or []))
    if not models and not data:
        raise ValueError("nothing to download: give --models (preset names, or all) and/or --data")
    repos, local = model_sources(models) if models else ([], [])  # unknown names fail before any download
    fetched: list[Fetched] = []
    failures: list[tuple[str, Exception]] = []
    usage: list[str] = []
    with progress_bars(progress):
        for repo in repos:
            _attempt(str(repo), fetched, failures, fetch_hub_repo, repo, progress)
        fetched += [package_status(preset, source) for preset, source in local]
        for name in data:
            if name == "nq-dpr":
                if _attempt(name, fetched, failures, fetch_nq_dpr, data_dir, progress):
                    usage.append(f"nq-dpr: {nq_dpr_options(data_dir)}")
            elif name.startswith(IR_DATASETS):
                dataset_id = name.removeprefix(IR_DATASETS)
                if _attempt(name, fetched, failures, fetch_ir_dataset, dataset_id):
                    usage.append(
                        f"{name}: --data.source ir_datasets --data.dataset_id {dataset_id} --data.negatives bm25"
                    )
            elif _attempt(name, fetched, failures, fetch_hub_data, name):
                usage.append(f"{name}: {HUB_DATA[name].options}")
    print_summary(fetched, failures, usage)
    if len(failures) == 1:
        raise failures[0][1]
    if failures:
        error = failures[0][1]
        more = ", ".join(name for name, _ in failures[1:])
        raise type(error)(f"{error} (also missing: {more}; see above)") from error
    return fetched


def _attempt(name: str, fetched: list[Fetched], failures: list[tuple[str, Exception]], fetch, *args) -> bool:
    """``fetch(*args)``'s item(s) added to ``fetched``, or its model or data error recorded in ``failures``."""
    try:
        items = fetch(*args)
    except (ModelUnavailableError, DataUnavailableError) as error:
        failures.append((name, error))
        return False
    fetched += items if isinstance(items, list) else [items]
    return True


def print_summary(fetched: list[Fetched], failures: list[tuple[str, Exception]], usage: list[str]) -> None:
    """Each item, its size and where it is; what could not be fetched; the data options to use."""
    rows = [(item.kind, item.name, _human(item.size), item.where, item.note) for item in fetched]
    rows += [("missing", name, "-", "-", str(error)) for name, error in failures]
    if rows:
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        print("dkacq download:")
        for kind, name, size, where, note in rows:
            line = f"  {kind:<{widths[0]}}  {name:<{widths[1]}}  {size:>{widths[2]}}  {where}"
            print(line + (f"  ({note})" if note else ""))
    if usage:
        print("use the data with:")
        for line in usage:
            print(f"  {line}")


def _folder_size(folder: str | os.PathLike) -> int:
    """Bytes of the files under ``folder``, links followed (a hub snapshot links to its blobs)."""
    folder = Path(folder)
    if folder.is_file():
        return folder.stat().st_size
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _human(size: int | None) -> str:
    return "?" if size is None else human_bytes(size)


def _one_line(error: object) -> str:
    """An error's innermost cause, in one short line."""
    while isinstance(error, BaseException) and error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    if isinstance(error, BaseException):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def lists_joined(args: list[str], options: tuple[str, ...] = ("--models", "--data")) -> list[str]:
    """``--models a b c`` as ``--models=[a, b, c]``: jsonargparse takes a list as one value."""
    joined, i = [], 0
    while i < len(args):
        option = args[i]
        i += 1
        if option not in options:
            joined.append(option)
            continue
        values = []
        while i < len(args) and not args[i].startswith("-"):
            values.append(args[i])
            i += 1
        joined += [f"{option}=[{', '.join(values)}]"] if len(values) > 1 else [option, *values]
    return joined


def run(args: list[str]) -> None:
    auto_cli(download, args=lists_joined(args[1:]), prog="dkacq download", exit_on_error=False)
