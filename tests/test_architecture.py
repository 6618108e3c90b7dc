"""The import rules of docs/ARCHITECTURE.md ("Who may import whom"), read from the source."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dealcl"
FORBIDDEN = {"train": {"methods", "runs", "eval"}, "eval": {"methods", "runs", "train"},
             "prompts": {"methods", "runs", "train", "eval"}, "models": {"methods", "runs", "train", "eval"}}


def _imported_packages(path: Path) -> set[str]:
    """Our top-level subpackages that `path` imports (relative or absolute)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    depth = len(path.relative_to(PACKAGE).parts) - 1  # folders below dealcl/
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb to dealcl/, then the first name is the package
                parts = list(path.relative_to(PACKAGE).parts[:-1])[: max(depth - node.level + 1, 0)]
                target = parts + (node.module.split(".") if node.module else [a.name for a in node.names])
            else:
                target = node.module.split(".")[1:] if node.module and node.module.startswith("dealcl.") else []
            if target:
                found.add(target[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dealcl."):
                    found.add(alias.name.split(".")[1])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_import_no_upper_layer(package):
    offenders = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        bad = (_imported_packages(path) - {package}) & FORBIDDEN[package]
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert not offenders, offenders


def test_the_checker_sees_relative_imports():
    # train/loop.py imports from models and from its own package; a check that saw nothing would pass anything.
    assert {"models", "train"} <= _imported_packages(PACKAGE / "train" / "loop.py")
