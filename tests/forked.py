"""``dkacq`` in a process of its own at almost no start cost: a fork of the test process.

A real ``dkacq`` process spends about 8 s of CPU importing torch, Lightning and transformers before its
first line; the test process has them imported already. :func:`run` forks it (as a DataLoader forks its
workers), and the child runs the ``dkacq`` console entry (:func:`dkacq.cli.console`) with its stdout and
stderr in files, so each case is a separate process with real signal delivery (the parent can signal it
mid-run, when its output says where it is), a real exit status and a real stderr, neither a terminal
(what a scheduler's log file sees). The child ends with ``os._exit``: none of pytest's teardown runs
there. It starts with the state of the test process, monkeypatches included (a test slows a batch that
way), and runs on the CPU with one torch thread. ``tests/test_output.py`` runs the installed ``dkacq``
script itself, once.
"""

import importlib
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dkacq.cli import COMMANDS, console

STARTING = ("Seed set to", "[rank: 0] Seed set to", "GPU available:", "SLURM auto-requeueing enabled")
STARTING += ("Initializing distributed:", "-" * 100, "distributed_backend=", "All distributed processes registered")
"""Lightning's lines when a command's work starts (under SLURM, and on several ranks, each trainer)."""


def _starting(lines: list[str]) -> bool:
    """Whether every line is one of :data:`STARTING` (or the empty line that ends the distributed block)."""
    return all(line == "" or line.startswith(STARTING) for line in lines)


@dataclass
class Finished:
    """How a forked ``dkacq`` ended: its exit status (``-N`` when signal N killed it), stdout and stderr."""

    code: int
    stdout: str
    stderr: str

    def succeeded(self) -> str:
        """Its stdout, for a command that ended with status 0 and printed nothing on stderr but the lines
        a command shows when its work starts."""
        assert self.code == 0 and _starting(self.stderr.splitlines()), self.stderr
        return self.stdout

    def stopped(self, signum: int) -> str:
        """The line of a command stopped by ``signum``: exit status 128 + ``signum``, no traceback, stderr's
        last line (before it, only the device and seed lines a command shows when its work starts)."""
        *before, last = self.stderr.splitlines() or [""]
        assert self.code == 128 + signum and "Traceback" not in self.stderr, (self.code, self.stderr)
        assert _starting(before), self.stderr
        return last

    def error(self, started: bool = False) -> str:
        """The message of a refusal: exit status 2 and stderr exactly one ``dkacq: error: <message>`` line
        (after the lines of a command whose work had ``started``)."""
        *before, line = self.stderr.splitlines() or [""]
        assert self.code == 2 and line.startswith("dkacq: error: "), (self.code, self.stderr)
        assert _starting(before) if started else not before, self.stderr
        return line.removeprefix("dkacq: error: ")


def run(
    args: list[str],
    cwd: Path | str | None = None,
    env: dict[str, str | None] | None = None,
    when: Callable[[str], bool] | None = None,
    signum: int = signal.SIGTERM,
    before: Callable[[], None] | None = None,
    entry: Callable[[list[str]], None] = console,
    timeout: float = 120,
    group: bool = False,
) -> Finished:
    """Run ``dkacq ARGS`` in a forked process, in ``cwd`` with ``env`` added to its environment (a None value
    removes the variable); when ``when(stdout so far)`` first holds, send it ``signum`` (with ``group``, to
    its process group: it and the ranks it starts, as a scheduler signals every process of a job).
    ``before`` runs in the child first (to hide a package); ``entry`` is what the installed script calls."""
    for command in [arg for arg in args if arg in COMMANDS][:1]:  # imported here once, not in every child
        importlib.import_module(f"dkacq.commands.{COMMANDS[command]}")
        importlib.import_module("dkacq.commands.stopping")
    out, err = (Path(tempfile.mkstemp(prefix="dkacq-", suffix=suffix)[1]) for suffix in (".out", ".err"))
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        stream.flush()
    pid = os.fork()
    if pid == 0:
        if group:
            os.setpgrp()
        _child(args, cwd, env or {}, out, err, before, entry)
    try:
        deadline, signalled, status = time.monotonic() + timeout, when is None, None
        while status is None:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(code)
            elif time.monotonic() > deadline:
                raise AssertionError(f"dkacq {' '.join(args)} ran over {timeout} s; stderr: {_read(err)}")
            elif not signalled and when(_read(out)):
                (os.killpg if group else os.kill)(pid, signum)
                signalled = True
            else:
                time.sleep(0.02)
        assert signalled, f"not signalled: the child ended first; stdout: {_read(out)}; stderr: {_read(err)}"
        return Finished(status, _read(out), _read(err))
    finally:
        if status is None:
            (os.killpg if group else os.kill)(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _logging_as_in_a_new_process(captured_stdout) -> None:
    """Loggers as a ``dkacq`` process has them: without pytest's handlers on the root logger, whose presence
    made Lightning's packages propagate to it when imported (in a new process they print with handlers of
    their own), and with every handler that was bound to pytest's capture writing to fds 1 or 2."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    for name in ("lightning.pytorch", "lightning.fabric"):  # what they do on import when the root has no handler
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler())
            logger.propagate = False
    for logger in [root, *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler and handler.stream not in (sys.stdout, sys.stderr):
                handler.stream = sys.stdout if handler.stream is captured_stdout else sys.stderr  # not flushed: closed


def _child(args, cwd, env, out: Path, err: Path, before, entry) -> None:
    """The forked process: never returns (``os._exit``), whatever happens."""
    code = 1
    multiprocessing.process._children.clear()  # the test process's, not this one's (as multiprocessing does)
    try:
        captured_stdout = sys.stdout
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # the interpreter's own, on fds 1 and 2
        _logging_as_in_a_new_process(captured_stdout)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        torch.set_num_threads(1)  # as a DataLoader worker: the parent's thread pool is not the child's
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if "datasets" in sys.modules:  # read at its import, which dkacq.cli.main precedes with this setting
            sys.modules["datasets"].disable_progress_bars()
        if cwd is not None:
            os.chdir(cwd)
        if before is not None:
            before()
        entry(list(args))
        code = 0
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            for child in multiprocessing.active_children():  # as the interpreter's exit: ranks a spawning
                if child.daemon:  # strategy started finish, daemons (DataLoader workers) are ended
                    child.terminate()
            for child in multiprocessing.active_children():
                child.join()
        finally:
            os._exit(code)
