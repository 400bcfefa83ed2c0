"""Probe sets stored with ``datasets`` under the cache folder, built once and then reused.

Several processes may ask for one probe set at once (data-parallel ranks, sweeps): it is built by one
of them under a lock, in a folder of its own, and swapped into place complete with its manifest, so a
folder whose manifest matches the request always holds the whole probe set.
"""

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Literal

from datasets import DatasetDict, load_from_disk

from dkacq.data.collection import COLLECTION_FORMATS, CollectionOptions, open_collection, read_collection_set
from dkacq.data.examples import DEMO_FILES, EXAMPLE_COLUMNS, ProbeDataError, ProbeSetRead, file_digest, read_probe_set
from dkacq.data.mining import NegativeSource, VectorEncoder, check_source
from dkacq.formats.atomic import atomic_write_text, file_lock, replace_folder, staging_folder
from dkacq.formats.identity import canonical

STORE_FORMAT = 2  # raised when the manifest records more, so older stores are rebuilt
ProbeSource = Literal["demo", "dpr", "msmarco", "published", "local", "beir", "trec", "ir_datasets"]
"""Where a probe set comes from: a reader of ``examples.py`` or a collection of ``collection.py``."""
_MISSING = b"\xff\0"  # an absent negative: never the UTF-8 of a text
_log = logging.getLogger("dkacq")


def fingerprint(probe_set: DatasetDict, provenance: dict | None = None) -> str:
    """A content hash of the examples (and of how their negatives were mined, for a collection: method,
    parameters, library version and corpus digest): caches of different data never pass for each other."""
    digest = hashlib.sha256()
    for name in sorted(probe_set):
        digest.update(name.encode())
        for column in EXAMPLE_COLUMNS:
            for text in probe_set[name][column]:
                digest.update(_MISSING if text is None else text.encode() + b"\0")
    if provenance is not None:
        digest.update(canonical(provenance).encode())
    return digest.hexdigest()[:16]


def _source_files(source: ProbeSource, train_file: str | None, test_file: str | None) -> list[Path]:
    if source == "demo":
        return [DEMO_FILES["train"], DEMO_FILES["test"]]
    return [Path(path) for path in (train_file, test_file) if path is not None and Path(path).is_file()]


def check_dataset_name(dataset: str, source: str) -> None:
    """A data set's name keys its probe set, its caches and its results rows: the shipped demo set's name
    given to other data would store that data under ``demo`` and label its results ``demo``."""
    if source != "demo" and dataset == "demo":
        raise ProbeDataError(
            f"data.source={source} needs its own data.dataset name (e.g. nq or msmarco): the name keys its "
            "stored probe set, caches and results, and 'demo' belongs to the shipped demo set"
        )


def stored_probe_set(
    folder: Path,
    source: ProbeSource,
    train_file: str | None = None,
    test_file: str | None = None,
    hub_id: str | None = None,
    path: str | None = None,
    dataset_id: str | None = None,
    negatives: NegativeSource = "file",
    collection: CollectionOptions | None = None,
    miner: VectorEncoder | None = None,
) -> tuple[DatasetDict, str]:
    """The probe set stored at ``folder`` and its fingerprint.

    It is read from its source and stored when missing, and read and stored again when the source
    (its kind, hub id or data set id, the content of its files, how negatives are mined) is not the one
    stored: it is derived data. Files are identified by their content, not by how their path is
    spelled, so ``df/train.json`` and ``./df/train.json`` find the same stored set. Embedding caches
    record the fingerprint, so one built from the old examples is then refused. The manifest also
    records the records dropped per split and reason and the questions in both splits, which are
    warned about when the set is built, and, for a collection, how its negatives were mined
    (``provenance``, which is part of the fingerprint). Mining state lives in ``<folder>/../mining``.
    ``miner``: the dense mining model (``negatives="dense"``), whose identity joins the request.
    """
    folder = Path(folder)
    if source in COLLECTION_FORMATS:
        check_source(negatives)
        collection = collection or CollectionOptions()
        collection.check()
        if negatives != "dense" and collection.dense_model is not None:
            raise ProbeDataError(
                f"data.collection.dense_model applies to data.negatives dense, not {negatives}: drop one"
            )
        if negatives == "dense" and miner is None:
            raise ProbeDataError("data.negatives=dense needs a mining model (data.collection.dense_model)")
        opened = open_collection(source, collection, path, dataset_id, train_file, test_file)
        request = dict(
            store_format=STORE_FORMAT,
            source=source,
            collection=opened.request(),
            negatives=negatives,
            options=collection.identity(),
        )
        if miner is not None and negatives == "dense":
            request["dense"] = miner.identity

        def read() -> tuple[ProbeSetRead, dict | None]:
            return read_collection_set(opened, negatives, collection, folder.parent / "mining", miner)

        sources = {"path": path, "dataset_id": dataset_id, "train_file": train_file, "test_file": test_file}
    else:
        if negatives != "file":
            raise ProbeDataError(
                f"data.negatives={negatives} needs a collection (data.source beir, trec or ir_datasets); "
                f"data.source={source} brings its own negatives (data.negatives=file)"
            )
        request = dict(
            store_format=STORE_FORMAT,
            source=source,
            hub_id=hub_id,
            file_digests=[file_digest(path) for path in _source_files(source, train_file, test_file)],
        )

        def read() -> tuple[ProbeSetRead, dict | None]:
            return read_probe_set(source, train_file, test_file, hub_id), None

        sources = {"train_file": train_file, "test_file": test_file}
    manifest = _matching_manifest(folder, request, warn=False)
    if manifest is None:
        with file_lock(folder):
            manifest = _matching_manifest(folder, request, warn=True)
            if manifest is None:
                return _build(folder, request, read, sources)
    return load_from_disk(str(folder)), manifest["fingerprint"]


def _matching_manifest(folder: Path, request: dict, warn: bool) -> dict | None:
    """The stored manifest if it answers ``request``. One that is not a JSON object is taken as absent
    (the set is rebuilt); ``warn`` says so once, from the check that decides on the rebuild."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        if warn:
            _log.warning("%s: not valid JSON (%s); the probe set is rebuilt", path, error)
        return None
    if not isinstance(manifest, dict):
        if warn:
            _log.warning("%s: not valid JSON (not an object); the probe set is rebuilt", path)
        return None
    return manifest if all(manifest.get(key) == value for key, value in request.items()) else None


def _build(folder: Path, request: dict, reader, sources: dict) -> tuple[DatasetDict, str]:
    """Read the probe set and swap it into ``folder`` with its manifest; the caller holds the lock.
    ``sources`` (the paths as given) are recorded for the reader of the manifest, not matched."""
    read, provenance = reader()
    manifest = request | {
        "sources": sources,
        "fingerprint": fingerprint(read.probe_set, provenance),
        "provenance": provenance,
        "num_examples": {name: len(split) for name, split in read.probe_set.items()},
        "dropped": read.dropped,
        "overlapping_questions": read.overlapping_questions,
    }
    prefix = f".{folder.name}."
    for stale in folder.parent.glob(f"{prefix}*.partial"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = staging_folder(folder)
    try:
        read.probe_set.save_to_disk(str(staging))
        atomic_write_text(staging / "manifest.json", json.dumps(manifest, indent=2))
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return read.probe_set, manifest["fingerprint"]
