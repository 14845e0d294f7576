"""docs/faults.md stays true: it names every test of this suite, and the counts it quotes
that are data here (hostile cases, fuzz seed and mutations) are this suite's."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO
from tests.faults import hostile, test_fuzz_manifest

PAGE = REPO / "docs" / "faults.md"


def _tests(module: Path) -> list[str]:
    tree = ast.parse(module.read_text())
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    ]


def test_the_page_names_every_fault_test() -> None:
    page = PAGE.read_text()
    here = Path(__file__).resolve().parent
    missing = [
        f"{module.name}::{name}"
        for module in sorted(here.glob("test_*.py"))
        if module.name != Path(__file__).name
        for name in _tests(module)
        if f"`{name}`" not in page
    ]
    assert missing == []


def test_the_page_quotes_the_suites_own_counts(tmp_path: Path) -> None:
    page = PAGE.read_text()
    rejected = len(hostile.rejected_cases(tmp_path))
    accepted = len(hostile.accepted_cases(tmp_path))
    assert f"{rejected + accepted} manifests through 4 doors" in page
    assert f"({rejected} refused by the decoder, {accepted} that decode and lie)" in page
    mutations, seed = test_fuzz_manifest.MUTATIONS, test_fuzz_manifest.SEED
    assert f"{mutations} mutations of a valid manifest, seed {seed}" in page
    assert f"{mutations} mutations (bit flips" in page
