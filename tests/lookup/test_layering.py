"""broker.lookup's engine modules are pure logic: of the broker they may import only errors, settings
and dicom (the package docstring says so), so they can be used from any layer."""

from __future__ import annotations

import ast
from pathlib import Path

import broker.lookup

ALLOWED = ("broker.errors", "broker.settings", "broker.dicom", "broker.lookup")
PURE = ("relevance.py", "vocabulary.py", "schemas.py", "dose.py")


def test_lookup_imports_only_what_its_docstring_allows() -> None:
    package = Path(broker.lookup.__file__).parent
    offenders = []
    for path in (package / name for name in PURE):
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
