"""The house style is checked like behaviour: ruff (lint and format) and mypy stay clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.parametrize(
    "args", [("ruff", "check", "."), ("ruff", "format", "--check", ".")], ids=["lint", "format"]
)
def test_ruff_is_clean(args: tuple[str, ...]) -> None:
    done = _run(*args)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean() -> None:
    # No paths: pyproject.toml's `files` (the broker, storage, benches, tests and scripts), so a
    # bench that drifted from the code it drives fails here, not when someone next runs it.
    done = _run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr


def test_layers_contract_holds() -> None:
    """The import-linter contract in pyproject.toml: each package imports only from the layers
    below it (docs/architecture.md), with no exceptions listed."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_layers_contract_lists_no_exceptions() -> None:
    """An `ignore_imports` entry would let one import through the layers unseen."""
    text = (ROOT / "pyproject.toml").read_text()
    contract = text[text.index("[tool.importlinter]") :]
    assert "ignore_imports" not in contract


def test_storage_imports_nothing_from_broker() -> None:
    """The object store is a layer below the broker: its modules never name `broker`."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "storage").rglob("*.py")
        if any(
            line.lstrip().startswith(("from broker", "import broker"))
            for line in path.read_text().splitlines()
        )
    ]
    assert offenders == []
