"""The on-disk embedding cache: one safetensors file per hidden state, an index, and a manifest.

Layout of a cache folder::

    manifest.json            what was encoded and how (compared with every request), and every file's size and sha256
    index.safetensors        per split: ``<split>.query`` [E] and ``<split>.passages`` [E, 5] row numbers
    layer_00.safetensors     ``queries`` [num_queries, dim] and ``passages`` [num_passages, dim]
    ...

Each unique text is encoded once; the index maps every example to its rows (passage column 0 is the
positive, 1..4 the negatives). Layer files are written by streaming rows behind a header written
first, so extraction never holds more than one batch in memory, and a probe opens one layer alone.

The manifest's ``files`` maps each file name to ``{"bytes": size, "sha256": hex digest}``. Sizes are
checked on every open (a stat each) and again before a file is loaded; checksums on ``verify=True``.
"""

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from dkacq.formats.atomic import atomic_write, atomic_write_text, default_mode

CACHE_FORMAT = 1
STORAGE_DTYPES = {
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
}
INDEX_FILE = "index.safetensors"
MANIFEST_FILE = "manifest.json"


class CacheError(RuntimeError):
    """The cache folder at a requested path cannot be used as it is."""


class CacheMismatchError(CacheError):
    """A cache exists where one was requested, but it was built from something else."""


class CacheDamagedError(CacheError):
    """A cache file is missing, unreadable or differs from what its manifest recorded."""


def damaged(folder: Path, path: Path, problem: str) -> CacheDamagedError:
    """The one-line error for a bad file: which file, what is wrong, what to do."""
    problem = " ".join(problem.split())
    return CacheDamagedError(f"{path}: {problem}; delete {folder} to rebuild it")


def layer_file(folder: Path, layer: int) -> Path:
    return folder / f"layer_{layer:02d}.safetensors"


def file_record(path: Path) -> dict:
    """Size and sha256 of a file as read back from disk, in the manifest's form."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 23):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


class LayerFileWriter:
    """Streams the rows of one layer into a safetensors file whose header is written first.

    Queries must all be written before passages: the file holds the two tensors back to back. Everything
    written is hashed on the way, so the checksum costs no second pass over the data.
    """

    def __init__(self, path: Path, num_queries: int, num_passages: int, dim: int, dtype: str):
        self.path = path
        self.dtype, code = STORAGE_DTYPES[dtype]
        row_bytes = dim * self.dtype.itemsize
        query_bytes = num_queries * row_bytes
        header = {
            "queries": {"dtype": code, "shape": [num_queries, dim], "data_offsets": [0, query_bytes]},
            "passages": {
                "dtype": code,
                "shape": [num_passages, dim],
                "data_offsets": [query_bytes, query_bytes + num_passages * row_bytes],
            },
        }
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.expected_bytes = 8 + len(encoded) + (num_queries + num_passages) * row_bytes
        self.digest = hashlib.sha256()
        self.file = open(path, "wb")
        self._write(struct.pack("<Q", len(encoded)) + encoded)

    def _write(self, data) -> None:
        self.file.write(data)
        self.digest.update(data)

    def append(self, rows: Tensor) -> None:
        self._write(rows.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy())

    def close(self) -> dict:
        """Close the file; its size and the sha256 of what was sent to it, in the manifest's form."""
        written = self.file.tell()
        self.file.close()
        if written != self.expected_bytes:
            raise RuntimeError(f"{self.path}: wrote {written} bytes, expected {self.expected_bytes}")
        return {"bytes": written, "sha256": self.digest.hexdigest()}


def check_size(folder: Path, name: str, record: dict) -> None:
    """Raise unless ``folder/name`` exists with its recorded size (a truncated or replaced file)."""
    path = folder / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise damaged(folder, path, "missing") from None
    if size != record["bytes"]:
        raise damaged(folder, path, f"{size:,} bytes, expected {record['bytes']:,}")


@dataclass
class EmbeddingCache:
    """An opened cache folder; tensors are read on demand, one layer at a time."""

    folder: Path
    manifest: dict

    @property
    def num_hidden_states(self) -> int:
        return self.manifest["num_hidden_states"]

    @property
    def hidden_size(self) -> int:
        return self.manifest["hidden_size"]

    def _load(self, path: Path) -> dict[str, Tensor]:
        """The file's tensors; its size is checked first, as it may have changed since the cache was opened."""
        check_size(self.folder, path.name, self.manifest["files"][path.name])
        try:
            return load_file(path)
        except SafetensorError as error:
            raise damaged(self.folder, path, f"unreadable ({error})") from None

    def index(self, split: str) -> tuple[Tensor, Tensor]:
        """Row numbers of each example's query ``[E]`` and passages ``[E, 5]`` (positive first)."""
        tensors = self._load(self.folder / INDEX_FILE)
        return tensors[f"{split}.query"], tensors[f"{split}.passages"]

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """Query and passage vectors of one hidden state, as float32."""
        if not 0 <= layer < self.num_hidden_states:
            raise ValueError(f"{self.folder}: layer {layer} outside 0..{self.num_hidden_states - 1}")
        tensors = self._load(layer_file(self.folder, layer))
        return tensors["queries"].float(), tensors["passages"].float()


def compare_manifest(folder: Path, found: dict, request: dict) -> None:
    """Raise if any requested field differs from what the cache was built with."""
    for key, wanted in request.items():
        if found.get(key) != wanted:
            raise CacheMismatchError(
                f"{folder}: cache was built with {key}={found.get(key)!r} but {key}={wanted!r} was requested; "
                f"delete the folder or choose another cache_dir"
            )


def read_manifest(folder: Path) -> dict | None:
    """The manifest of ``folder``; None if there is none. One without file records (an older dkacq's)
    is damaged rather than mismatched: it cannot be checked, so it is rebuilt rather than kept."""
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise damaged(folder, path, f"not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise damaged(folder, path, f"holds a JSON {type(manifest).__name__}, not an object")
    if not isinstance(manifest.get("files"), dict):
        raise damaged(
            folder,
            path,
            "records no file sizes or checksums (written by an older dkacq), so the cache cannot be checked",
        )
    return manifest


def check_files(folder: Path, manifest: dict, verify: bool) -> None:
    """Raise unless every file of the cache is recorded and has its recorded size (and checksum, to ``verify``)."""
    files = manifest["files"]
    names = [INDEX_FILE] + [layer_file(folder, layer).name for layer in range(manifest.get("num_hidden_states", 0))]
    for name in names:
        if name not in files:
            raise damaged(folder, folder / name, f"not recorded in {MANIFEST_FILE}")
    for name in names:
        check_size(folder, name, files[name])
    if verify:
        for name in names:
            if file_record(folder / name)["sha256"] != files[name]["sha256"]:
                raise damaged(folder, folder / name, f"checksum differs from {MANIFEST_FILE}")


def open_cache(folder: Path, request: dict, verify: bool = False) -> EmbeddingCache | None:
    """The complete cache at ``folder`` if it matches ``request``; None if there is none.

    Every file's size is checked (cheap); ``verify`` also re-reads every file to compare its sha256.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    compare_manifest(folder, manifest, request)
    check_files(folder, manifest, verify)
    return EmbeddingCache(folder, manifest)


def staging_folder(folder: Path) -> Path:
    """A new empty folder beside ``folder``, unique to this build, so concurrent builds never share one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    os.chmod(staging, default_mode(directory=True))  # mkdtemp gives 0700; the cache gets the user's umask
    return staging


def publish(
    staging: Path, folder: Path, manifest: dict, index: dict[str, Tensor], written: Mapping[str, dict] | None = None
) -> EmbeddingCache:
    """Record every file in the manifest, written last, then move the staging folder into place.

    Each layer file is read back once and must match ``written``, what its ``LayerFileWriter`` sent
    (caught here: a write that reached the disk otherwise); None records the files as they are, for
    callers that wrote them some other way (benchmarks/cache_memory.py).
    An existing ``folder`` is renamed aside and removed only after the new one is in place.
    """
    files = {}
    for layer in range(manifest["num_hidden_states"]):
        path = layer_file(staging, layer)
        files[path.name] = file_record(path)
        if written is not None and files[path.name] != written[path.name]:
            raise CacheDamagedError(
                f"{path}: read back {files[path.name]['bytes']:,} bytes that differ from what was written; "
                f"check the disk and build again"
            )
    atomic_write(staging / INDEX_FILE, lambda temporary: save_file(index, temporary))
    files[INDEX_FILE] = file_record(staging / INDEX_FILE)
    manifest = dict(manifest, files=files)
    atomic_write_text(staging / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    aside = staging.with_name(staging.name.removesuffix(".partial") + ".old")
    if folder.exists():
        os.replace(folder, aside)
    os.replace(staging, folder)
    shutil.rmtree(aside, ignore_errors=True)
    return EmbeddingCache(folder, manifest)
