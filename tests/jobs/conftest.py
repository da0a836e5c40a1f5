"""Fixtures shared by the jobs tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

from broker.app import build_state
from broker.settings import Settings


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    state = build_state(settings)
    try:
        yield state.engine
    finally:
        state.engine.dispose()
