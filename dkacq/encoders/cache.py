"""The on-disk embedding cache: one safetensors file per hidden state, an index, and a manifest.

Layout of a cache folder::

    manifest.json            what was encoded and how (compared with every request)
    index.safetensors        per split: ``<split>.query`` [E] and ``<split>.passages`` [E, 5] row numbers
    layer_00.safetensors     ``queries`` [num_queries, dim] and ``passages`` [num_passages, dim]
    ...

Each unique text is encoded once; the index maps every example to its rows (passage column 0 is the
positive, 1..4 the negatives). Layer files are written by streaming rows behind a header written
first, so extraction never holds more than one batch in memory, and a probe opens one layer alone.
"""

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

CACHE_FORMAT = 1
STORAGE_DTYPES = {"float32": (torch.float32, "F32"), "float16": (torch.float16, "F16"), "bfloat16": (torch.bfloat16, "BF16")}


class CacheMismatchError(RuntimeError):
    """A cache exists where one was requested, but it was built from something else."""


def layer_file(folder: Path, layer: int) -> Path:
    return folder / f"layer_{layer:02d}.safetensors"


class LayerFileWriter:
    """Streams the rows of one layer into a safetensors file whose header is written first.

    Queries must all be written before passages: the file holds the two tensors back to back.
    """

    def __init__(self, path: Path, num_queries: int, num_passages: int, dim: int, dtype: str):
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
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)

    def append(self, rows: Tensor) -> None:
        rows = rows.detach().to("cpu", self.dtype).contiguous()
        self.file.write(rows.view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        written = self.file.tell()
        self.file.close()
        if written != self.expected_bytes:
            raise RuntimeError(f"{self.file.name}: wrote {written} bytes, expected {self.expected_bytes}")


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

    def index(self, split: str) -> tuple[Tensor, Tensor]:
        """Row numbers of each example's query ``[E]`` and passages ``[E, 5]`` (positive first)."""
        tensors = load_file(self.folder / "index.safetensors")
        return tensors[f"{split}.query"], tensors[f"{split}.passages"]

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """Query and passage vectors of one hidden state, as float32."""
        if not 0 <= layer < self.num_hidden_states:
            raise ValueError(f"{self.folder}: layer {layer} outside 0..{self.num_hidden_states - 1}")
        tensors = load_file(layer_file(self.folder, layer))
        return tensors["queries"].float(), tensors["passages"].float()


def compare_manifest(folder: Path, found: dict, request: dict) -> None:
    """Raise if any requested field differs from what the cache was built with."""
    for key, wanted in request.items():
        if found.get(key) != wanted:
            raise CacheMismatchError(
                f"{folder}: cache was built with {key}={found.get(key)!r} but {key}={wanted!r} was requested; "
                f"delete the folder or choose another cache_dir"
            )


def open_cache(folder: Path, request: dict) -> EmbeddingCache | None:
    """The complete cache at ``folder`` if it matches ``request``; None if there is none."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    compare_manifest(folder, manifest, request)
    return EmbeddingCache(folder, manifest)


def staging_folder(folder: Path) -> Path:
    """A fresh temporary sibling of ``folder``; a leftover from an interrupted build is removed."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, folder: Path, manifest: dict, index: dict[str, Tensor]) -> EmbeddingCache:
    """Write the index and manifest last, then rename the staging folder into place."""
    save_file(index, staging / "index.safetensors")
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return EmbeddingCache(folder, manifest)
