"""Imports flow one way: texts -> encoders -> (cache -> probe -> results) and (attribution -> counts) -> report.

``ALLOWED`` is the architecture: which folders of ``dkacq`` each folder may import. The test walks every
import of the package (function-level ones included) and fails on any import against it; a second
test keeps the diagram in docs/design.md equal to the imports the code really has.
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "dkacq"
DESIGN = Path(__file__).parents[1] / "docs" / "design.md"

ALLOWED: dict[str, set[str]] = {
    "formats": set(),
    "data": {"formats"},
    "encoders": {"data", "formats"},
    "datamodules": {"data", "encoders", "formats"},
    "probe": {"data", "encoders", "formats"},
    "attribution": {"data", "encoders", "formats"},
    "compare": {"encoders", "formats"},
    "report": {"encoders", "formats", "probe"},
    "commands": {"attribution", "compare", "data", "datamodules", "encoders", "formats", "probe", "report"},
    "cli": {"commands"},
}
"""Folder -> the folders it may import. ``cli`` stands for the package's top-level modules."""


def folder_of(module: str) -> str:
    """``dkacq.data.examples`` -> ``data``; top-level modules (``dkacq.cli``, ``dkacq.__main__``) -> ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "cli"


def imported_modules(source: str, module: str) -> set[str]:
    """Every ``dkacq`` module that ``source`` (the text of ``module``) imports, at any depth of the code."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            found |= {base} | {
                f"{base}.{alias.name}"
                for alias in node.names
                if (PACKAGE.parent / f"{base}.{alias.name}".replace(".", "/")).exists()
            }
    return {name for name in found if name == "dkacq" or name.startswith("dkacq.")}


def violations(source: str, module: str) -> list[str]:
    """The imports of ``module`` that go against ``ALLOWED``."""
    here = folder_of(module)
    bad = []
    for target in sorted(imported_modules(source, module)):
        there = folder_of(target) if target != "dkacq" else "cli"
        if there != here and there not in ALLOWED[here]:
            bad.append(f"{module} imports {target} ({here} -> {there})")
    return bad


def package_modules() -> dict[str, str]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path.read_text()
    return modules


def edges() -> set[tuple[str, str]]:
    """The folder-to-folder imports the code has."""
    found = set()
    for module, source in package_modules().items():
        for target in imported_modules(source, module):
            here, there = folder_of(module), folder_of(target)
            if here != there:
                found.add((here, there))
    return found


def test_every_folder_is_placed():
    folders = {path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert folders | {"cli"} == set(ALLOWED)


def test_no_import_goes_against_the_flow():
    bad = [line for module, source in package_modules().items() for line in violations(source, module)]
    assert not bad, "\n".join(bad)


def test_the_check_catches_the_old_back_imports():
    """The imports that once ran against the flow are caught."""
    assert violations("from dkacq.datamodules.texts import TextSide", "dkacq.attribution.module")
    assert violations("from dkacq.encoders.cache import open_cache", "dkacq.data.probe_datamodule")
    assert violations("def f():\n    from dkacq.encoders import loading", "dkacq.data.storage")
    assert violations("from ..report import figures", "dkacq.formats.counts")
    assert not violations("from dkacq.data.examples import EXAMPLE_COLUMNS", "dkacq.encoders.extraction")


def test_design_md_draws_the_imports_the_code_has():
    block = re.search(r"```text\n(.*?)```", DESIGN.read_text(), re.S).group(1)
    drawn = set()
    for line in block.splitlines():
        if "->" in line:
            here, targets = (part.strip() for part in line.split("->"))
            drawn |= {(here, there.strip()) for there in targets.split(",") if there.strip()}
    assert drawn == edges()
    assert all(there in ALLOWED[here] for here, there in drawn)
