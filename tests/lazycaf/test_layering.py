"""The package layering: every import of the project's own code stays within what the
importing package's ``__init__`` docstring allows (its ``May import:`` line).

A package may always import itself. ``lazycaf`` (the top package: ``__version__``) and the
standard library are free for everyone. Imports under ``if TYPE_CHECKING:`` count too: a type
that crosses a layer is a dependency all the same.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

TOPS = ("lazycaf", "fetcher")
_MAY = re.compile(r"^May import: (.+?)\.\s*\Z", re.M | re.S)  # the docstring's last paragraph


def packages() -> dict[str, Path]:
    """Every package below the top packages, by dotted name."""
    out = {}
    for top in TOPS:
        for init in sorted((REPO / top).glob("*/__init__.py")):
            out[f"{top}.{init.parent.name}"] = init
    return out


def allowed(init: Path) -> tuple[str, ...]:
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    m = _MAY.search(doc)
    assert m, f"{init}: the docstring has no 'May import: ...' line"
    if m.group(1) == "nothing of the project":
        return ()
    return tuple(x.strip() for x in m.group(1).replace("\n", " ").split(","))


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import of lazycaf/fetcher code in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from lazycaf.core import framing`` imports lazycaf.core.framing
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(n, m) for n, m in out if m.split(".")[0] in TOPS]


def covered(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(pkg: str, init: Path) -> list[str]:
    ok = (pkg, *allowed(init))
    bad = []
    for path in sorted(init.parent.rglob("*.py")):
        for line, module in project_imports(path):
            if module in ("lazycaf.__version__",) or covered(module, ok):
                continue
            bad.append(f"{pkg}: {path.relative_to(init.parent)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("pkg", sorted(packages()))
def test_imports_follow_the_layering(pkg: str) -> None:
    assert violations(pkg, packages()[pkg]) == []


def test_a_bad_import_is_caught(tmp_path: Path) -> None:
    """The check itself can fail: a core module importing the mount is reported."""
    pkg = tmp_path / "core"
    pkg.mkdir()
    init = pkg / "__init__.py"
    init.write_text('"""Core.\n\nMay import: nothing of the project.\n"""\n')
    (pkg / "bad.py").write_text(
        "import json\nfrom lazycaf.core import digest\nfrom lazycaf.mount.root import run_mount\n"
    )
    assert violations("lazycaf.core", init) == [
        "lazycaf.core: bad.py:3 imports lazycaf.mount.root.run_mount"
    ]


def test_every_package_declares_its_layer() -> None:
    for init in packages().values():
        allowed(init)
    assert set(packages()) >= {"lazycaf.core", "lazycaf.cas", "lazycaf.mount", "fetcher.daemon"}


def test_every_module_is_in_the_design_map() -> None:
    """docs/design.md's module map names every module by its path."""
    design = (REPO / "docs" / "design.md").read_text()
    missing = [
        str(p.relative_to(REPO))
        for top in TOPS
        for p in sorted((REPO / top).rglob("*.py"))
        if p.name not in ("__init__.py", "__main__.py") and f"`{p.relative_to(REPO)}`" not in design
    ]
    assert missing == []
