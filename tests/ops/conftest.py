"""Fixtures of the operations tests: a fresh, empty PostgreSQL database (no migration applied)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def empty_pg(pg_admin: Any) -> Iterator[str]:
    name = pg_admin.new_name("ops")
    url = pg_admin.create(name)
    try:
        yield url
    finally:
        pg_admin.drop(name)
