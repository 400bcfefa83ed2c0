"""Files that readers never see half-written, created with the user's umask, and locks between processes.

Every on-disk format of dkacq writes through :func:`atomic_write`: the content goes to a temporary file
with a unique name beside the target (so two processes never share one), is flushed to disk, given the
permissions a plain ``open`` would give (``tempfile`` and safetensors create files 0600), and renamed
over the target. :func:`file_lock` serialises read-modify-write updates and builds of shared folders.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open`` (0o666) or ``mkdir`` (0o777) gives under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary)`` with a fresh path beside ``path``, then rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(temporary, default_mode())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def file_lock(path: str | os.PathLike) -> FileLock:
    """An inter-process lock guarding ``path`` (a file or folder), held in ``<path>.lock``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(path.name + ".lock")))
