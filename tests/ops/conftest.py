"""Fixtures of the operations tests: a fresh, empty PostgreSQL database (no migration applied), a
production node's settings whose database a test can cut, and the process's log as the broker
configures it, written to a string."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.logfilters import configure_logging
from broker.settings import Settings
from tests.conftest import CuttablePg, s3_storage_url


@pytest.fixture
def empty_pg(pg_admin: Any) -> Iterator[str]:
    name = pg_admin.new_name("ops")
    url = pg_admin.create(name)
    try:
        yield url
    finally:
        pg_admin.drop(name)


@pytest.fixture
def cut_node_settings(cuttable_pg: CuttablePg, tmp_path: Path, moto_server: str, s3_bucket: str) -> Settings:
    """A node on PostgreSQL + S3 whose database goes away at `cuttable_pg.proxy.stop()`; it gives
    up connecting after 2 s, so an outage answers quickly."""
    return Settings(
        data_dir=tmp_path,
        database_url=cuttable_pg.database_url,
        storage_url=s3_storage_url(moto_server, s3_bucket),
        db_connect_timeout_seconds=2,
        mllp_port=0,
    )


@contextlib.contextmanager
def captured_log(fmt: str) -> Iterator[io.StringIO]:
    """The root logger configured as `scanonce serve` configures it (`fmt`: "text" or "json"),
    writing to the string yielded; the test process's own handlers are put back after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        configure_logging("INFO", fmt)
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        yield stream
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
