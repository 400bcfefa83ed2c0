"""The on-disk embedding cache: one safetensors file per hidden state, an index, and a manifest.

Layout of a cache folder::

    manifest.json            what was encoded and how (compared with every request), every file's size and
                             sha256, and how fast it was built on what
    index.safetensors        per split: ``<split>.query`` [E] and ``<split>.passages`` [E, 5] row numbers
    layer_00.safetensors     ``queries`` [num_queries, dim] and ``passages`` [num_passages, dim]
    ...

Each unique text is encoded once; the index maps every example to its rows (passage column 0 is the
positive, 1..4 the negatives). A layer file's header is written first and the file is given its full
size (:func:`prepare_layer_file`); rows are then written at their final offsets (:class:`LayerRows`,
positional writes), in any order and from any number of processes, so extraction never holds more than
one batch in memory, and a probe opens one layer alone.

A build happens in a staging folder beside the cache, ``.<name>.<digest>.partial``, named by a digest
of what is built (:func:`resumable_staging`), so an interrupted build of the same request finds it
again and a build of another request never does. Beside the layer files it holds ``build.json`` (what
the partial files are: request, layout, texts) and ``progress/``: ``done.json`` and one
``rank_NNNNN.json`` per process, each mapping a batch number to the CRC-32 of the bytes written for it
in every layer file (:func:`write_rank_progress`, :func:`merge_progress`). When every batch is done, each
layer file is read back once (:func:`read_back`): its sha256 for the manifest, and every batch's CRC
against what was written, which catches a write that reached the disk otherwise.

The manifest's ``files`` maps each file name to ``{"bytes": size, "sha256": hex digest}``. Sizes are
checked on every open (a stat each) and again before a file is loaded. With ``verify`` (the default of
``data.verify_cache``), each file's sha256 is also checked the first time a process reads it
(:func:`verify_file`, remembered per file for the process): one sequential read of the file, which
also brings it into the page cache the load then reads from. ``benchmarks/cache_verify.py`` measures
what that adds to reading a layer.
"""

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from dkacq.formats.atomic import atomic_write, atomic_write_text, default_mode

CACHE_FORMAT = 1
"""Part of every cache request (and so of every probe cell's identity): raised when the files' layout
changes. A change of the numbers of one setting is recorded in that setting's request instead, so
that other settings' caches and results stay valid (``REFERENCE_PADDING`` in
:mod:`dkacq.encoders.text_encoder`)."""
STORAGE_DTYPES = {
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
}
INDEX_FILE = "index.safetensors"
MANIFEST_FILE = "manifest.json"
BUILD_FILE = "build.json"
PROGRESS_DIR = "progress"
DONE_FILE = "done.json"
_CHUNK = 1 << 23
log = logging.getLogger("dkacq")


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


@dataclass(frozen=True)
class LayerLayout:
    """Where everything is in a layer file: its header, then ``queries`` and ``passages`` back to back."""

    num_queries: int
    num_passages: int
    dim: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.dtype][0]

    @property
    def row_bytes(self) -> int:
        return self.dim * self.torch_dtype.itemsize

    @cached_property
    def header(self) -> bytes:
        """The header as written: its length (8 bytes, little endian), then its JSON padded to 8 bytes."""
        code, query_bytes = STORAGE_DTYPES[self.dtype][1], self.num_queries * self.row_bytes
        header = {
            "queries": {"dtype": code, "shape": [self.num_queries, self.dim], "data_offsets": [0, query_bytes]},
            "passages": {
                "dtype": code,
                "shape": [self.num_passages, self.dim],
                "data_offsets": [query_bytes, query_bytes + self.num_passages * self.row_bytes],
            },
        }
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        return struct.pack("<Q", len(encoded)) + encoded

    @property
    def file_bytes(self) -> int:
        return len(self.header) + (self.num_queries + self.num_passages) * self.row_bytes

    def offset(self, side: int, row: int) -> int:
        """Where row ``row`` of the queries (side 0) or passages (side 1) starts in the file."""
        return len(self.header) + (row + (self.num_queries if side else 0)) * self.row_bytes


class LayerFileWriter:
    """Streams the rows of one layer into a safetensors file whose header is written first.

    Queries must all be written before passages: the file holds the two tensors back to back. Everything
    written is hashed on the way, so the checksum costs no second pass over the data. (Extraction writes
    rows at their offsets with :class:`LayerRows` instead, from any number of processes.)
    """

    def __init__(self, path: Path, num_queries: int, num_passages: int, dim: int, dtype: str):
        self.path = path
        layout = LayerLayout(num_queries, num_passages, dim, dtype)
        self.dtype = layout.torch_dtype
        self.expected_bytes = layout.file_bytes
        self.digest = hashlib.sha256()
        self.file = open(path, "wb")
        self._write(layout.header)

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


def prepare_layer_file(path: Path, layout: LayerLayout) -> None:
    """Create ``path`` with its header and its full size (the rows, not yet written, read as zeros)."""
    with open(path, "wb") as file:
        file.write(layout.header)
        file.truncate(layout.file_bytes)


def layer_file_problem(path: Path, layout: LayerLayout) -> str | None:
    """What keeps a partial layer file from being written on (a size or header not of ``layout``), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            header = file.read(len(layout.header))
    except FileNotFoundError:
        return f"{path.name} is missing"
    if size != layout.file_bytes:
        return f"{path.name} has {size:,} bytes, expected {layout.file_bytes:,}"
    if header != layout.header:
        return f"{path.name} has another header"
    return None


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than it is given)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class LayerRows:
    """Writes rows of one layer file at their final offsets, so processes writing other rows never interleave."""

    def __init__(self, path: Path, layout: LayerLayout):
        self.path, self.layout = path, layout
        self.fd = os.open(path, os.O_RDWR)

    def write(self, side: int, row: int, rows: Tensor) -> int:
        """Write ``rows`` (already of the storage dtype, on the CPU) from row ``row`` of the queries (side
        0) or passages (side 1); the CRC-32 of the bytes sent."""
        data = rows.contiguous().view(torch.uint8).numpy()
        _pwrite_all(self.fd, data, self.layout.offset(side, row))
        return zlib.crc32(data)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class ReadBack:
    """A layer file as read back: its manifest record, whether its header is as written, and the
    numbers (positions in the ``segments`` given) of the row ranges whose CRC-32 differs."""

    record: dict
    header_ok: bool
    bad: list[int] = field(default_factory=list)


def read_back(path: Path, layout: LayerLayout, segments: list[tuple[int, int, int]]) -> ReadBack:
    """Read ``path`` once: its size and sha256, its header, and the CRC-32 of each ``(start, stop, crc)``
    byte range (in file order, covering the rows after the header) against ``crc``."""
    digest, size, bad = hashlib.sha256(), 0, []
    with open(path, "rb") as file:
        header = file.read(len(layout.header))
        digest.update(header)
        size += len(header)
        for number, (start, stop, expected) in enumerate(segments):
            if start != size:
                raise ValueError(f"{path}: row range {number} starts at {start}, after {size} bytes")
            crc, remaining = 0, stop - start
            while remaining and (chunk := file.read(min(remaining, _CHUNK))):
                digest.update(chunk)
                crc = zlib.crc32(chunk, crc)
                remaining -= len(chunk)
                size += len(chunk)
            if remaining or crc != expected:
                bad.append(number)
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return ReadBack({"bytes": size, "sha256": digest.hexdigest()}, header == layout.header, bad)


def check_size(folder: Path, name: str, record: dict) -> None:
    """Raise unless ``folder/name`` exists with its recorded size (a truncated or replaced file)."""
    path = folder / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise damaged(folder, path, "missing") from None
    if size != record["bytes"]:
        raise damaged(folder, path, f"{size:,} bytes, expected {record['bytes']:,}")


_VERIFIED: set[tuple] = set()
"""The files whose sha256 this process has checked (or written and read back), by path, size, mtime
and inode: a file replaced since is checked again."""


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino


def verify_file(folder: Path, name: str, record: dict) -> None:
    """Raise unless ``folder/name`` has the sha256 its manifest records; once per file and process."""
    path = folder / name
    key = _file_key(path)
    if key in _VERIFIED:
        return
    if file_record(path)["sha256"] != record["sha256"]:
        raise damaged(folder, path, f"checksum differs from {MANIFEST_FILE}")
    _VERIFIED.add(key)


@dataclass
class EmbeddingCache:
    """An opened cache folder; tensors are read on demand, one layer at a time, each file's checksum
    checked the first time this process reads it (unless ``verify`` is false)."""

    folder: Path
    manifest: dict
    verify: bool = True

    @property
    def num_hidden_states(self) -> int:
        return self.manifest["num_hidden_states"]

    @property
    def hidden_size(self) -> int:
        return self.manifest["hidden_size"]

    def check(self, layers: Iterable[int]) -> None:
        """Check the index's and these layers' files now, as their first read would: a command checks the
        files its cells will read before the first cell, so that a damaged one stops it in one line before
        any probe is fitted rather than halfway. The sha256 is not computed again when a cell reads the
        file; a cache larger than the page cache is read once more for it."""
        for path in [self.folder / INDEX_FILE, *map(self._layer_file, sorted(set(layers)))]:
            self._check(path)

    def _check(self, path: Path) -> None:
        record = self.manifest["files"][path.name]
        check_size(self.folder, path.name, record)
        if self.verify:
            verify_file(self.folder, path.name, record)

    def _load(self, path: Path) -> dict[str, Tensor]:
        """The file's tensors; its size is checked first, as it may have changed since the cache was opened."""
        self._check(path)
        try:
            return load_file(path)
        except SafetensorError as error:
            raise damaged(self.folder, path, f"unreadable ({error})") from None

    def index(self, split: str) -> tuple[Tensor, Tensor]:
        """Row numbers of each example's query ``[E]`` and passages ``[E, 5]`` (positive first)."""
        tensors = self._load(self.folder / INDEX_FILE)
        return tensors[f"{split}.query"], tensors[f"{split}.passages"]

    def splits(self) -> list[str]:
        """The splits whose examples the index maps to rows (``test``, ``train``), sorted."""
        return sorted({key.rsplit(".", 1)[0] for key in self._load(self.folder / INDEX_FILE)})

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """Query and passage vectors of one hidden state, as float32."""
        tensors = self._load(self._layer_file(layer))
        return tensors["queries"].float(), tensors["passages"].float()

    def _layer_file(self, layer: int) -> Path:
        if not 0 <= layer < self.num_hidden_states:
            raise ValueError(f"{self.folder}: layer {layer} outside 0..{self.num_hidden_states - 1}")
        return layer_file(self.folder, layer)


def compare_manifest(folder: Path, found: dict, request: dict) -> None:
    """Raise if any requested field differs from what the cache was built with."""
    for key, wanted in request.items():
        if found.get(key) != wanted:
            raise CacheMismatchError(
                f"{folder}: cache was built with {key}={found.get(key)!r} but {key}={wanted!r} was requested; "
                "delete the folder or choose another cache_dir"
                + (" (or, for other data, another data.dataset name)" if key == "data_fingerprint" else "")
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


def check_files(folder: Path, manifest: dict) -> None:
    """Raise unless every file of the cache is recorded and has its recorded size."""
    files = manifest["files"]
    names = [INDEX_FILE] + [layer_file(folder, layer).name for layer in range(manifest.get("num_hidden_states", 0))]
    for name in names:
        if name not in files:
            raise damaged(folder, folder / name, f"not recorded in {MANIFEST_FILE}")
    for name in names:
        check_size(folder, name, files[name])


def open_cache(folder: Path, request: dict, verify: bool = True) -> EmbeddingCache | None:
    """The complete cache at ``folder`` if it matches ``request``; None if there is none.

    Every file's size is checked now (a stat each); with ``verify`` each file's sha256 is checked when
    it is first read (:func:`verify_file`).
    """
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    compare_manifest(folder, manifest, request)
    check_files(folder, manifest)
    return EmbeddingCache(folder, manifest, verify)


def staging_folder(folder: Path) -> Path:
    """A new empty folder beside ``folder``, unique to this build, so concurrent builds never share one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    os.chmod(staging, default_mode(directory=True))  # mkdtemp gives 0700; the cache gets the user's umask
    return staging


def build_digest(key: Mapping) -> str:
    """A short digest of what a build makes (request, batch size, precision, storage dtype)."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resumable_staging(folder: Path, digest: str) -> Path:
    """The staging folder of a build of ``digest`` into ``folder``: the same for every attempt at that
    build (so one resumes another), another for every other request. Not created here."""
    return folder.parent / f".{folder.name}.{digest}.partial"


def read_json(path: Path):
    """The JSON value in ``path``; None when it is missing or unreadable."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def rank_progress_file(staging: Path, rank: int) -> Path:
    return staging / PROGRESS_DIR / f"rank_{rank:05d}.json"


def write_rank_progress(staging: Path, rank: int, batches: Mapping[int, list[int]]) -> None:
    """Record (atomically) the batches this process has written in this attempt: number -> CRC-32 per layer."""
    text = json.dumps({"batches": {str(number): crcs for number, crcs in batches.items()}}, separators=(",", ":"))
    atomic_write_text(rank_progress_file(staging, rank), text)


def read_progress(staging: Path, num_batches: int, num_layers: int) -> dict[int, list[int]]:
    """Every batch recorded as written, in ``done.json`` or any process's file, with its CRCs. A file
    that cannot be read is left out (with a warning): its batches are encoded again, which is safe."""
    done: dict[int, list[int]] = {}
    folder = staging / PROGRESS_DIR
    for path in [folder / DONE_FILE, *sorted(folder.glob("rank_*.json"))]:
        if not path.exists():
            continue
        found = read_json(path)
        batches = found.get("batches") if isinstance(found, dict) else None
        if not isinstance(batches, dict):
            log.warning("%s: unreadable progress record; its batches are encoded again", path)
            continue
        for number, crcs in batches.items():
            if number.isdigit() and int(number) < num_batches and isinstance(crcs, list) and len(crcs) == num_layers:
                done[int(number)] = crcs
    return done


def merge_progress(staging: Path, num_batches: int, num_layers: int, drop: Iterable[int] = ()) -> dict[int, list[int]]:
    """Gather every record into ``done.json`` (less the batches in ``drop``, to be encoded again) and
    remove the processes' files; only while no process writes."""
    done = read_progress(staging, num_batches, num_layers)
    for number in drop:
        done.pop(number, None)
    folder = staging / PROGRESS_DIR
    folder.mkdir(exist_ok=True)
    text = json.dumps({"batches": {str(number): done[number] for number in sorted(done)}}, separators=(",", ":"))
    atomic_write_text(folder / DONE_FILE, text)
    for path in folder.glob("rank_*.json"):
        path.unlink(missing_ok=True)
    return done


def publish(
    staging: Path,
    folder: Path,
    manifest: dict,
    index: dict[str, Tensor],
    written: Mapping[str, dict] | None = None,
    *,
    layer_records: Mapping[str, dict] | None = None,
    remove: Iterable[str] = (),
) -> EmbeddingCache:
    """Record every file in the manifest, written last, then move the staging folder into place.

    Each layer file is read back once and must match ``written``, what its ``LayerFileWriter`` sent
    (caught here: a write that reached the disk otherwise); None records the files as they are, for
    callers that wrote them some other way (benchmarks/cache_memory.py). ``layer_records``: the records
    of the layer files as the caller has just read them back (:func:`read_back`), not read again.
    ``remove``: names in ``staging`` that are not part of the cache (a build's progress), removed just
    before the move. An existing ``folder`` is renamed aside and removed only after the new one is in place.
    """
    files = {}
    for layer in range(manifest["num_hidden_states"]):
        path = layer_file(staging, layer)
        if layer_records is not None:
            files[path.name] = dict(layer_records[path.name])
            continue
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
    for name in remove:
        path = staging / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    aside = staging.with_name(staging.name.removesuffix(".partial") + ".old")
    shutil.rmtree(aside, ignore_errors=True)  # left by a move that was interrupted
    if folder.exists():
        os.replace(folder, aside)
    os.replace(staging, folder)
    shutil.rmtree(aside, ignore_errors=True)
    _VERIFIED.update(_file_key(folder / name) for name in files)  # read back just now
    return EmbeddingCache(folder, manifest)
