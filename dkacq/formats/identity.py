"""The identity of a result: every option and input that can change its numbers, and its digest.

A cell's identity is a nested dict of plain JSON values. Its digest names the cell's files and is
stored with every row, so that "finished" means "finished with these settings" and two results
of different settings never pass for each other.
"""

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def canonical(identity: Mapping[str, Any]) -> str:
    """The identity as JSON with sorted keys, paths and other objects as strings."""
    return json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)


def plain(identity: Mapping[str, Any]) -> dict:
    """The identity as it reads back from JSON (tuples as lists, paths as strings), for comparisons."""
    return json.loads(canonical(identity))


def digest(identity: Mapping[str, Any], length: int = 12) -> str:
    return hashlib.sha256(canonical(identity).encode()).hexdigest()[:length]


def without(config: Mapping[str, Any], keys: Iterable[str]) -> dict:
    """A deep copy of ``config`` (nested mappings) without the dotted ``keys``."""
    tree = plain(config)
    for key in keys:
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return tree


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        items: dict[str, Any] = {}
        for key, value in tree.items():
            items |= _flatten(value, f"{prefix}{key}.")
        return items or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 3) -> str:
    """The first ``limit`` differing dotted keys as ``key old -> new``, for one-line messages. Values are
    compared as the digest sees them (JSON): ``1``, ``1.0`` and ``true`` differ."""
    flat_old, flat_new = _flatten(plain(old)), _flatten(plain(new))
    keys = sorted(flat_old.keys() | flat_new.keys())
    changed = [key for key in keys if json.dumps(flat_old.get(key)) != json.dumps(flat_new.get(key))]
    shown = [f"{key} {json.dumps(flat_old.get(key))} -> {json.dumps(flat_new.get(key))}" for key in changed[:limit]]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(shown) + more


def recorded_change(path: Path, identity: Mapping[str, Any]) -> str | None:
    """None when there is no ``path`` or the JSON object in it records ``identity`` under ``"identity"``;
    else, in one line, what differs (a run folder's summary holding another run's settings)."""
    if not Path(path).exists():
        return None
    try:
        found = json.loads(Path(path).read_text()).get("identity")
    except (ValueError, AttributeError):
        found = None
    if found == identity:
        return None
    return differences(found, identity) if isinstance(found, Mapping) else "no identity recorded"
