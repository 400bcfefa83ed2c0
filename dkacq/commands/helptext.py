"""``dkacq <command> --help`` fast (no torch imported), with dkacq's options first.

Every command builds its help from the classes' and functions' signatures, which means importing torch,
Lightning, transformers and datasets first: 8 s of CPU (11-14 s on a busy machine) before a line is
shown. So the help is printed from text, in this order:

1. **Shipped** with dkacq (``dkacq/commands/help/<command>.txt``), written by the live parser and
   recorded with the versions of Python and of :data:`LIBRARIES` it was written with
   (``help/made_with.json``): printed when the installed versions are those, which are the pinned ones
   (``constraints.txt``), so an install prints the help at once, the first time too.
   ``tests/test_help.py`` keeps the texts equal to the live parser's output (``python
   scripts/write_help.py`` writes them again): a change to an option or its docstring is not
   committed without its help.
2. **Kept** in the user's cache folder (``$XDG_CACHE_HOME/dkacq/help`` or ``~/.cache/dkacq/help``),
   named by a digest of dkacq's source files and those versions: with other versions, the first
   ``--help`` builds it with the live parser (the parser's time), and later ones print it from there.

For the Lightning commands (fit, validate, test, attribute) two changes to what the parser prints: the
usage line is short (the parser's lists every option, about 90 lines), and the trainer's options come
last, after dkacq's own (data, model, results, checkpoint). With any other argument (``--config``,
``--print_config``, ``--trainer.callbacks.help``) the live parser answers.
"""

import contextlib
import hashlib
import io
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

WIDTH = 100
LIBRARIES = ("lightning", "jsonargparse", "torch", "transformers")
"""Whose versions can change the help's text (class signatures and docstrings), with Python's (argparse)."""
SHIPPED = Path(__file__).with_name("help")
MADE_WITH = SHIPPED / "made_with.json"


def made_with() -> dict[str, str]:
    """The installed versions of Python (major.minor) and of :data:`LIBRARIES` (absent: ``none``), without
    a build's local label."""
    versions = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for name in LIBRARIES:
        try:
            versions[name] = version(name).split("+")[0]  # the build (+cpu, +cu128) changes no signature
        except PackageNotFoundError:
            versions[name] = "none"
    return versions


def text(command: str, module: str) -> str:
    """The help of ``command`` (whose parser :mod:`dkacq.commands`'s ``module`` builds): shipped, kept,
    or built now by the live parser and kept."""
    return shipped(command) or kept(command) or keep(command, module)


def shipped(command: str) -> str | None:
    """The help shipped with dkacq, if it was written with the installed versions."""
    try:
        if json.loads(MADE_WITH.read_text()) != made_with():
            return None
        return (SHIPPED / f"{command}.txt").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None


def write_shipped(texts: dict[str, str]) -> None:
    """Ship these help texts (command -> :func:`render`'s text), written with the installed versions."""
    from dkacq.formats.atomic import atomic_write_text

    for command, written in texts.items():
        atomic_write_text(SHIPPED / f"{command}.txt", written)
    atomic_write_text(MADE_WITH, json.dumps(made_with(), indent=1) + "\n")


def folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dkacq" / "help"


def digest() -> str:
    """A digest of dkacq's source files and :func:`made_with` (a few ms)."""
    hashed = hashlib.sha256()
    package = Path(__file__).parents[1]
    for path in sorted(package.rglob("*.py")):
        hashed.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    hashed.update(json.dumps(made_with(), sort_keys=True).encode())
    return hashed.hexdigest()[:16]


def kept_path(command: str) -> Path:
    return folder() / f"{command}-{digest()}.txt"


def kept(command: str) -> str | None:
    """The help of ``command`` kept for these sources and versions; None when there is none yet."""
    try:
        return kept_path(command).read_text(encoding="utf-8")
    except OSError:
        return None


def keep(command: str, module: str) -> str:
    """Build the help of ``command`` with the live parser, keep it (when the cache folder can be
    written) and return it."""
    from dkacq.formats.atomic import atomic_write_text

    built = render(command, module)
    with contextlib.suppress(OSError):  # a read-only home: printed, not kept
        atomic_write_text(kept_path(command), built)
    return built


def reordered(text: str, command: str) -> str:
    """A Lightning command's live help with a one-line usage and the blocks of the trainer's options
    moved to the end; any other command's as it is."""
    blocks = text.strip("\n").split("\n\n")
    trainer = [block for block in blocks[1:] if _first_option(block).startswith("--trainer")]
    if not trainer:
        return text
    usage = f"usage: dkacq {command} [-c CONFIG] [--print_config[=flags]] [options]"
    others = [block for block in blocks[1:] if block not in trainer]
    return "\n\n".join([usage, *others, *trainer]) + "\n"


def _first_option(block: str) -> str:
    """The first option of a block of the help (the line after its title), or ''."""
    lines = block.split("\n")
    return lines[1].strip() if len(lines) > 1 else ""


def render(command: str, module: str) -> str:
    """The help the live parser prints for ``command``, reordered (imports the command's module).

    Its lists of an option's known subclasses (``--trainer.callbacks``, loggers, profilers) name the
    classes imported so far: a process that runs one command prints that command's."""
    from importlib import import_module

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
            import_module(f"dkacq.commands.{module}").run([command, "--help"])
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return reordered(printed.getvalue(), command)
