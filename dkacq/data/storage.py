"""Probe sets stored with ``datasets`` under the cache folder, built once and then reused."""

import hashlib
import json
import os
import shutil
from pathlib import Path

from datasets import DatasetDict, load_from_disk

from dkacq.data.examples import DEMO_FILES, EXAMPLE_COLUMNS, ProbeFormat, load_probe_set


def fingerprint(probe_set: DatasetDict) -> str:
    """A content hash of the examples: caches of different data never pass for each other."""
    digest = hashlib.sha256()
    for name in sorted(probe_set):
        digest.update(name.encode())
        for column in EXAMPLE_COLUMNS:
            for text in probe_set[name][column]:
                digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """A content hash of a source file, so an edited file is never mistaken for the one stored."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _source_files(source: ProbeFormat, train_file: str | None, test_file: str | None) -> list[Path]:
    if source == "demo":
        return [DEMO_FILES["train"], DEMO_FILES["test"]]
    return [Path(path) for path in (train_file, test_file) if path is not None and Path(path).is_file()]


def stored_probe_set(
    folder: Path,
    source: ProbeFormat,
    train_file: str | None = None,
    test_file: str | None = None,
    hub_id: str | None = None,
) -> tuple[DatasetDict, str]:
    """The probe set stored at ``folder`` and its fingerprint.

    It is read from its source and stored when missing, and read and stored again when the source
    (its kind, paths, hub id, or the content of its files) is not the one stored: it is derived data.
    Embedding caches record the fingerprint, so one built from the old examples is then refused.
    """
    request = dict(
        source=source,
        train_file=train_file,
        test_file=test_file,
        hub_id=hub_id,
        file_digests=[file_digest(path) for path in _source_files(source, train_file, test_file)],
    )
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if all(manifest.get(key) == value for key, value in request.items()):
            return load_from_disk(str(folder)), manifest["fingerprint"]
    probe_set = load_probe_set(source, train_file, test_file, hub_id)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    probe_set.save_to_disk(str(staging))
    manifest = request | {
        "fingerprint": fingerprint(probe_set),
        "num_examples": {name: len(split) for name, split in probe_set.items()},
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return probe_set, manifest["fingerprint"]
