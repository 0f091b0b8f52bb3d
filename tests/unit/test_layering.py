"""Imports only go downward: no module imports from a layer above its own.

The layers are the ordered list in docs/ARCHITECTURE.md ("Layers"); ``LAYERS`` below is the
same list, lowest first, and a test checks the two agree. Every module of the package (and
of ``integrations/``, shipped as ``recoverkit.integrations``) is parsed with ``ast``; every
import is checked: absolute and relative, at module level, inside functions and under
``TYPE_CHECKING`` alike (a lazy import is still a dependency). Imports within one layer are
free. The front door (``recoverkit/__init__.py``, lazy re-exports of everything) and the
deprecated ``recoverkit/dist/`` shim are exempt.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "recoverkit"
INTEGRATIONS = REPO / "integrations"

#: lowest first; a module may import from its own layer and the layers before it
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("config", "gcpause", "lazy"),
    ("_fallback_io",),
    ("_fallback",),
    ("_native",),
    ("format",),
    ("storage",),
    ("state",),
    ("distributed",),
    ("staging",),
    ("restore",),
    ("recovery",),
    ("reading",),
    ("checkpointer",),
    ("elastic",),
    ("health",),
    ("session",),
    ("integrations",),
    ("cli",),
)
EXEMPT = {"__init__", "dist"}
#: upward imports known today, each to be removed (the test fails once one is gone, so the
#: list only shrinks): (importing module, imported module) -> why it is still there
KNOWN: dict[tuple[str, str], str] = {}

RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for the package and the integrations it ships."""
    out = {}
    for base, dotted in ((PACKAGE, "recoverkit"), (INTEGRATIONS, "recoverkit.integrations")):
        for path in sorted(base.rglob("*.py")):
            parts = [*dotted.split("."), *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported recoverkit module) for every import in ``path``."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{origin}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else origin))
    return [
        (line, name)
        for line, name in found
        if name == "recoverkit" or name.startswith("recoverkit.")
    ]


def _violations() -> list[tuple[str, int, str]]:
    out = []
    for module, path in MODULES.items():
        unit = _unit(module)
        if unit in EXEMPT:
            continue
        assert unit in RANK, (
            f"{module}: its layer {unit!r} is not in LAYERS (add it where it belongs)"
        )
        for line, target in _imports(module, path):
            to = _unit(target)
            if to == unit or to == "dist":
                continue
            if to == "__init__" or RANK.get(to, len(LAYERS)) > RANK[unit]:
                out.append((module, line, target))
    return out


def test_no_module_imports_from_a_layer_above_its_own():
    found = _violations()
    new = [f"{m}:{line} imports {t}" for m, line, t in found if (m, t) not in KNOWN]
    assert not new, "upward imports (see docs/ARCHITECTURE.md, Layers):\n" + "\n".join(new)
    gone = set(KNOWN) - {(m, t) for m, _, t in found}
    assert not gone, f"no longer imported upward, remove from KNOWN: {sorted(gone)}"


def test_every_import_form_is_seen(tmp_path):
    """The parser resolves relative, absolute, aliased, package and function-level imports."""
    path = tmp_path / "m.py"
    path.write_text(
        "from ...state import codec\n"
        "import recoverkit.reading as r\n"
        "def f():\n"
        "    from ...checkpointer import Checkpointer\n"
        "    from ... import session\n"
        "    from .common import Source\n"
    )
    assert [t for _, t in _imports("recoverkit.restore.export.m", path)] == [
        "recoverkit.state.codec",
        "recoverkit.reading",
        "recoverkit.checkpointer",
        "recoverkit.session",
        "recoverkit.restore.export.common",
    ]


def test_the_layers_match_the_architecture_document():
    """The numbered list of docs/ARCHITECTURE.md's Layers section names the same layers,
    in the same order: each item's names are the backquoted ones before its dash."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^\d+\.\s+(.+?)\s+\u2014", section, re.M)
    documented = [
        tuple(n.removesuffix("/").removesuffix(".py") for n in re.findall(r"`([^`]+)`", item))
        for item in items
    ]
    assert documented == list(LAYERS)


@pytest.mark.parametrize("unit", sorted({_unit(m) for m in MODULES} - EXEMPT))
def test_every_part_of_the_package_has_a_layer(unit):
    assert unit in RANK, unit


def test_the_package_is_parsed():
    assert "recoverkit.storage.local" in MODULES and "recoverkit.integrations.pytorch" in MODULES
    assert os.path.basename(str(MODULES["recoverkit.format"])) == "__init__.py"
