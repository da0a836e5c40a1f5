"""broker.lookup is pure logic: of the broker it may import only errors, settings and dicom (its
package docstring says so), so the index and the routes can call it without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import broker.lookup

ALLOWED = ("broker.errors", "broker.settings", "broker.dicom", "broker.lookup")


def test_lookup_imports_only_what_its_docstring_allows() -> None:
    package = Path(broker.lookup.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [
                (path.name, n) for n in names if n.startswith("broker") and not n.startswith(ALLOWED)
            ]
    assert offenders == []
    doc = broker.lookup.__doc__ or ""
    assert "broker.errors, broker.settings, broker.dicom" in doc
