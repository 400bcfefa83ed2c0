"""Files that readers never see half-written, created with the user's umask, and locks between processes.

Every on-disk format of dkacq writes through :func:`atomic_write`: the content goes to a temporary file
with a unique name beside the target (so two processes never share one), is flushed to disk, given the
permissions a plain ``open`` would give (``tempfile`` and safetensors create files 0600), and renamed
over the target. :func:`file_lock` serialises read-modify-write updates and builds of shared folders.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from dkacq.formats.errors import DkacqError


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


def check_folder(folder: str | os.PathLike, purpose: str) -> Path:
    """The nearest of ``folder`` and its parents that exists, refused in one line when it is not a folder
    (a file where ``purpose``, the option or file that names it, needs a folder)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise DkacqError(f"{folder}: a file, where dkacq needs a folder for {purpose}")
    return folder


def human_bytes(size: float) -> str:
    """``812 B``, ``3.4 KB``, ``1.2 GB`` (powers of 1000): a size as a person reads it, small ones too."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def check_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse, before writing, ``needed`` bytes of ``what`` into ``folder`` when its file system has less free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DkacqError(
            f"{folder}: {what} needs {human_bytes(needed)} more, but {human_bytes(free)} are free there; "
            "free some space or choose another folder"
        )


def check_writable(path: str | os.PathLike) -> None:
    """Refuse, in one line and before any work, a ``path`` that a write through :func:`atomic_write`
    would fail on or should not replace: a file without write permission (mode 444 is the user's way of
    saying "keep this", which a rename would not respect), an immutable one, or a folder (the file's,
    or the nearest one that exists) where no file can be created (permissions, a read-only file system).
    A file is created and removed in the folder to find out, as the write itself would."""
    path = Path(path)
    if path.is_dir():
        raise DkacqError(f"{path}: a folder, where dkacq writes a file; remove it or choose another place")
    if path.exists() and (not path.stat().st_mode & 0o222 or not os.access(path, os.W_OK)):
        mode = f"{path.stat().st_mode & 0o777:o}"
        raise DkacqError(f"{path}: read-only (mode {mode}); make it writable (chmod u+w) or choose another place")
    folder = check_folder(path.parent, str(path))
    try:
        handle, name = tempfile.mkstemp(dir=folder, prefix=".dkacq-write-check.")
    except OSError as error:
        raise DkacqError(f"{folder}: cannot write there ({error.strerror}); {path} needs it") from None
    os.close(handle)
    os.unlink(name)


def file_lock(path: str | os.PathLike) -> FileLock:
    """An inter-process lock guarding ``path`` (a file or folder), held in ``<path>.lock``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(path.name + ".lock")))


def staging_folder(folder: str | os.PathLike) -> Path:
    """A new empty folder beside ``folder``, unique to its caller, to build a folder's content in; given
    the user's umask (``mkdtemp`` makes it 0700). :func:`replace_folder` then puts it in place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    os.chmod(staging, default_mode(directory=True))
    return staging


def replace_folder(staging: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Put a complete staging folder where ``folder`` is: an existing one is renamed aside first and
    removed after, so a reader finds the old folder or the new one, never a mix of the two."""
    staging, folder = Path(staging), Path(folder)
    aside = staging.with_name(staging.name.removesuffix(".partial") + ".old")
    if folder.exists():
        os.replace(folder, aside)
    os.replace(staging, folder)
    shutil.rmtree(aside, ignore_errors=True)
    return folder
