"""``dkacq fit --help`` (and ``validate``, ``test``, ``attribute``) fast, dkacq's options first.

LightningCLI builds its help from the classes' signatures, which means importing torch, Lightning,
transformers and datasets first: 8 s of CPU (11-14 s on a busy machine) before a line is shown. The help
of these commands is therefore built once, by the live parser, and kept in the user's cache folder
(``$XDG_CACHE_HOME/dkacq/help`` or ``~/.cache/dkacq/help``), named by a digest of dkacq's source files
and the versions of the libraries that write it: any change to either builds it again, so it is never
stale. The first ``--help`` after an install or an upgrade takes the parser's time; the next ones print
the kept text without importing anything else (0.07 s here). Two changes to what the parser prints: the
usage line is short (the parser's lists every option, about 90 lines), and the Lightning trainer's
options come last, after dkacq's own (data, model, results, checkpoint). With any other argument
(``--config``, ``--print_config``, ``--trainer.callbacks.help``) the live parser answers.
"""

import contextlib
import hashlib
import io
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

COMMANDS = {"fit": "probe", "validate": "probe", "test": "probe", "attribute": "attribute"}
WIDTH = 100
LIBRARIES = ("lightning", "jsonargparse", "torch", "transformers")
"""Whose versions can change the help's text (class signatures and docstrings)."""


def folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dkacq" / "help"


def digest() -> str:
    """A digest of dkacq's source files and the versions of :data:`LIBRARIES` (a few ms)."""
    hashed = hashlib.sha256()
    package = Path(__file__).parents[1]
    for path in sorted(package.rglob("*.py")):
        hashed.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    for name in LIBRARIES:
        try:
            hashed.update(f"{name}=={version(name)}".encode())
        except PackageNotFoundError:
            hashed.update(name.encode())
    return hashed.hexdigest()[:16]


def kept_path(command: str) -> Path:
    return folder() / f"{command}-{digest()}.txt"


def kept(command: str) -> str | None:
    """The help of ``command`` kept for these sources and libraries; None when there is none yet."""
    if command not in COMMANDS:
        return None
    try:
        return kept_path(command).read_text(encoding="utf-8")
    except OSError:
        return None


def keep(command: str) -> str:
    """Build the help of ``command`` with the live parser, keep it (when the cache folder can be
    written) and return it."""
    from dkacq.formats.atomic import atomic_write_text

    text = render(command)
    with contextlib.suppress(OSError):  # a read-only home: printed, not kept
        atomic_write_text(kept_path(command), text)
    return text


def reordered(text: str, command: str) -> str:
    """The live help with a one-line usage and the blocks of the trainer's options moved to the end."""
    blocks = text.strip("\n").split("\n\n")
    usage = f"usage: dkacq {command} [-c CONFIG] [--print_config[=flags]] [options]"
    trainer = [block for block in blocks[1:] if _first_option(block).startswith("--trainer")]
    others = [block for block in blocks[1:] if block not in trainer]
    return "\n\n".join([usage, *others, *trainer]) + "\n"


def _first_option(block: str) -> str:
    """The first option of a block of the help (the line after its title), or ''."""
    lines = block.split("\n")
    return lines[1].strip() if len(lines) > 1 else ""


def render(command: str) -> str:
    """The help the live parser prints for ``command``, reordered (imports the command's modules)."""
    from importlib import import_module

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
            import_module(f"dkacq.commands.{COMMANDS[command]}").run([command, "--help"])
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return reordered(printed.getvalue(), command)
