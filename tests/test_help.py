"""``dkacq <command> --help``: built once by the live parser, dkacq's options first, then printed from the
user's cache without importing torch, and built again when dkacq or its libraries change."""

import os
import subprocess
import sys
import time

import pytest

from dkacq.cli import main
from dkacq.commands import helptext


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "dkacq" / "help"


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(helptext.COMMANDS))
def test_help_leads_with_dkacqs_options_and_is_kept(command, cache, capsys):
    printed = _help(command, capsys)
    blocks = printed.split("\n\n")
    assert blocks[0] == f"usage: dkacq {command} [-c CONFIG] [--print_config[=flags]] [options]"
    trainer = [i for i, block in enumerate(blocks) if "--trainer." in block]
    ours = [i for i, block in enumerate(blocks) if "--data." in block or "--model." in block]
    assert trainer and ours and max(ours) < min(trainer), "dkacq's options lead, the trainer's come last"
    (kept,) = cache.iterdir()
    assert kept.name == f"{command}-{helptext.digest()}.txt" and kept.read_text() == printed


def test_kept_help_is_printed_fast_without_torch_and_rebuilt_when_dkacq_changes(cache, capsys, monkeypatch):
    printed = _help("fit", capsys)
    code = (
        "import sys\nfrom dkacq.cli import main\ntry:\n    main(['fit', '--help'])\nexcept SystemExit as exit:\n"
        "    assert exit.code == 0\nprint(sorted({'torch', 'lightning', 'transformers', 'datasets'} & set(sys.modules)))"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout == printed + "[]\n"
    assert seconds < 2, seconds
    monkeypatch.setattr(helptext, "digest", lambda: "changed")
    assert helptext.kept("fit") is None
    assert _help("fit", capsys) == printed
    assert (cache / "fit-changed.txt").read_text() == printed
