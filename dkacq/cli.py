"""The ``dkacq`` command: ``fit``/``validate``/``test`` probes, ``attribute`` neurons, ``report`` figures.

Each command lives in its own module under :mod:`dkacq.commands`, imported only when it runs.

:func:`main` runs a command and lets its exceptions through (tests and scripts call it); :func:`console`,
the installed ``dkacq`` and ``python -m dkacq``, reports dkacq's own errors in one line instead.
"""

import errno
import importlib
import os
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dkacq.commands import helptext

PROG = "dkacq"
COMMANDS = {
    "fit": "probe",
    "validate": "probe",
    "test": "probe",
    "attribute": "attribute",
    "report": "report",
    "sweep": "sweep",
    "download": "download",
    "compare": "compare",
}
"""Command -> its module under :mod:`dkacq.commands`."""
USAGE = """usage: dkacq {fit,validate,test,attribute,report,sweep,download,compare} [options]
       dkacq --version

  fit        train a linear probe per layer on cached embeddings, test the best epoch, append results.csv
  validate   validate trained probes
  test       test trained probes and record their results
  attribute  integrated-gradients neuron attribution of a preset's MLP neurons
  report     figures and a Markdown summary from results tables and attribution runs
  sweep      a study config's grid of probes and attribution runs, resumable, then its report
  download   fetch the presets' weights and the study's data sets once, so that they run offline
  compare    linear and debiased CKA between two models' cached vectors, per layer pair

Each command takes --help, --config FILE and --print_config. An error that the options or the input
can fix is printed in one line; --debug (anywhere) or DKACQ_DEBUG=1 shows its traceback instead."""

USER_ERRORS = frozenset(
    {
        "dkacq.formats.errors.DkacqError",
        # Until they derive from DkacqError:
        "dkacq.data.examples.ProbeDataError",
        "dkacq.encoders.cache.CacheError",
        "dkacq.encoders.loading.ModelUnavailableError",
        "dkacq.encoders.loading.WeightsMismatchError",
        "dkacq.formats.results.ResultConflictError",
        "dkacq.attribution.module.AttributionConflictError",
        "argparse.ArgumentError",  # options or a config file the parser refused (parsers do not exit on errors)
    }
)
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}
)
"""What the machine refuses (a full disk or quota, a read-only file system, permissions, a file where a
folder belongs): one line naming the path (and, for a full disk, the folder to free)."""
"""Errors the user can fix from their message, by qualified class name (any subclass counts too): named,
not imported, so that a command's modules load only when it runs."""


def package_version() -> str:
    try:
        return version("dkacq")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def main(args: list[str] | None = None) -> None:
    """Run the command that ``args`` (default ``sys.argv[1:]``) names; its exceptions propagate. SIGTERM
    or SIGUSR1 stops it, says what is saved and exits with 128 + the signal (:mod:`dkacq.commands.stopping`)."""
    args = sys.argv[1:] if args is None else list(args)
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        raise SystemExit(0)
    if args[:1] == ["--version"]:
        print(f"{PROG} {package_version()}")
        raise SystemExit(0)
    if not args:
        print(USAGE)
        raise SystemExit(2)
    if args[0] not in COMMANDS:
        kind = "option" if args[0].startswith("-") else "command"
        print(f"{PROG}: unknown {kind} '{args[0]}'\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    if args[1:] in (["-h"], ["--help"]):
        print(helptext.text(args[0], COMMANDS[args[0]]), end="")  # shipped or kept: without torch
        raise SystemExit(0)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from dkacq.commands import stopping  # imports Lightning: not for --help or --version

    with stopping.handling():
        importlib.import_module(f"dkacq.commands.{COMMANDS[args[0]]}").run(args)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is one the user can fix from its message, so that its traceback would only hide it.

    * a :data:`USER_ERRORS` class or a subclass of one;
    * any ``FileNotFoundError``: it names the missing path, wherever it was raised;
    * an ``OSError`` of :data:`ENVIRONMENT_ERRNOS` that names its path (a full disk, a read-only file system);
    * a ``ValueError`` raised by dkacq's own code (the innermost frame of its traceback is a ``dkacq``
      module): the checks of options and inputs. A ``ValueError`` from torch, transformers, numpy or any
      other library keeps its traceback, as it usually means that dkacq handed it something wrong: a bug.
    """
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(error).__mro__}
    if names & USER_ERRORS or isinstance(error, FileNotFoundError):
        return True
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS and error.filename is not None:
        return True
    return isinstance(error, ValueError) and _raised_in_dkacq(error)


def _raised_in_dkacq(error: BaseException) -> bool:
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module == "dkacq" or module.startswith("dkacq.")


def one_line(error: BaseException) -> str:
    """The error's message on one line (``<path>: no such file or directory`` for a missing file)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        path = os.fsdecode(error.filename)
        line = f"{path}: {error.strerror[:1].lower()}{error.strerror[1:]}"
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            folder = Path(path).parent
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            line += f"; free some space in {folder} or write elsewhere"
        return line
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return message or type(error).__name__


def debugging(args: list[str]) -> bool:
    """``--debug`` among the arguments, or ``DKACQ_DEBUG`` set to anything but empty, 0, false, no, off."""
    return "--debug" in args or os.environ.get("DKACQ_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def console(args: list[str] | None = None) -> None:
    """The ``dkacq`` command line: :func:`main`, with dkacq's own errors (:func:`is_user_error`) printed
    as ``dkacq: error: <message>`` on one line of stderr and exit status 2. Other errors raise with their
    traceback; ``--debug`` (removed from the arguments, wherever it stands) or ``DKACQ_DEBUG=1`` shows the
    traceback of every error."""
    args = sys.argv[1:] if args is None else list(args)
    debug = debugging(args)
    args = [arg for arg in args if arg != "--debug"]
    if debug:
        main(args)
        return
    try:
        main(args)
    except BrokenPipeError:  # output piped into a reader that stopped (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except Exception as error:
        if not is_user_error(error):
            raise
        sys.stdout.flush()
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
