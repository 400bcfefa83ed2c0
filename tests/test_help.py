"""``dkacq <command> --help``: shipped with dkacq as the live parser writes it (dkacq's options first) and
printed without importing torch, the first time too; with other library versions built once by the live
parser and kept in the user's cache, and built again when dkacq or its libraries change."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dkacq.cli import COMMANDS, main
from dkacq.commands import helptext

LIGHTNING_COMMANDS = ("fit", "validate", "test", "attribute")
CONSTRAINTS = Path(__file__).parents[1] / "constraints.txt"
REWRITE = "python scripts/write_help.py"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "dkacq" / "help"


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


def _shipped(command: str) -> str:
    return (helptext.SHIPPED / f"{command}.txt").read_text()


def test_the_shipped_help_is_written_with_the_pinned_versions_and_is_the_live_parsers():
    pinned = dict(re.findall(r"^([\w-]+)==([^\s;]+)", CONSTRAINTS.read_text(), re.MULTILINE))
    recorded = json.loads(helptext.MADE_WITH.read_text())
    assert {name: recorded[name] for name in helptext.LIBRARIES} == {
        name: pinned[name] for name in helptext.LIBRARIES
    }, f"the shipped help was written with other versions than constraints.txt pins: run {REWRITE}"
    if helptext.made_with() != recorded:
        pytest.skip(f"the installed versions are not the pinned ones: {helptext.made_with()}")
    stale = [
        command
        for command, module in COMMANDS.items()
        if _but_subclasses(helptext.render(command, module)) != _but_subclasses(_shipped(command))
    ]
    assert not stale, f"the shipped help of {', '.join(stale)} is not the live parser's: run {REWRITE}"


def _but_subclasses(text: str) -> str:
    """The help without its lists of known subclasses, which name the classes this process has imported
    (the tests' callbacks too); ``scripts/write_help.py`` writes them as a new ``dkacq`` process has them."""
    return re.sub(r"known\s+subclasses:[^)]*\)", "known subclasses: ...)", text)  # wrapped anywhere


@pytest.mark.parametrize("command", LIGHTNING_COMMANDS)
def test_help_leads_with_dkacqs_options(command, cache, capsys):
    printed = _help(command, capsys)
    blocks = printed.split("\n\n")
    assert blocks[0] == f"usage: dkacq {command} [-c CONFIG] [--print_config[=flags]] [options]"
    trainer = [i for i, block in enumerate(blocks) if "--trainer." in block]
    ours = [i for i, block in enumerate(blocks) if "--data." in block or "--model." in block]
    assert trainer and ours and max(ours) < min(trainer), "dkacq's options lead, the trainer's come last"
    assert printed == _shipped(command) and not cache.exists()


def test_the_first_help_of_every_command_is_fast_without_torch(tmp_path):
    """A new install: an empty cache folder, nothing imported."""
    code = (
        "import sys\nfrom dkacq.cli import main\n"
        f"for command in {list(COMMANDS)!r}:\n"
        "    try:\n        main([command, '--help'])\n    except SystemExit as exit:\n        assert exit.code == 0\n"
        "print(sorted({'torch', 'lightning', 'transformers', 'datasets', 'jsonargparse'} & set(sys.modules)))"
    )
    environment = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=environment)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(map(_shipped, COMMANDS)) + "[]\n"
    assert seconds < 2, seconds
    assert not list(tmp_path.iterdir())


def test_with_other_versions_the_help_is_built_once_kept_and_rebuilt_when_dkacq_changes(
    cache, capsys, monkeypatch, tmp_path
):
    made_with = tmp_path / "made_with.json"
    made_with.write_text(json.dumps(helptext.made_with() | {"lightning": "0.0.1"}))
    monkeypatch.setattr(helptext, "MADE_WITH", made_with)
    printed = _help("fit", capsys)
    assert _but_subclasses(printed) == _but_subclasses(_shipped("fit"))  # the installed versions are the pinned ones
    (kept,) = cache.iterdir()
    assert kept.name == f"fit-{helptext.digest()}.txt" and kept.read_text() == printed
    render = helptext.render
    monkeypatch.setattr(helptext, "render", lambda *args: pytest.fail("the kept help was not used"))
    assert _help("fit", capsys) == printed
    monkeypatch.setattr(helptext, "render", render)
    monkeypatch.setattr(helptext, "digest", lambda: "changed")
    assert helptext.kept("fit") is None
    assert _help("fit", capsys) == printed
    assert (cache / "fit-changed.txt").read_text() == printed
