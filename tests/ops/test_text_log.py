"""The text log format (the default) keeps exception messages out, as the JSON one does: a
message may quote a value read from a data set or a request. What an operator needs stays:
where it happened (the frames) and what (the exception's type), the chain of causes included."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from broker.logfilters import adopt_uvicorn_logging, uvicorn_text_log_config
from tests.ops.conftest import captured_log
from tests.peers import free_port

NAME = "ZEBEDEE^QUENTIN"


class PatientDataError(Exception):
    pass


def _fail_with_a_name() -> None:
    try:
        int(f"{NAME} is not a number")
    except ValueError as exc:
        raise PatientDataError(f"cannot read PatientName {NAME!r}") from exc


@pytest.fixture
def root_stream() -> Iterator[io.StringIO]:
    with captured_log("text") as stream:
        yield stream


def test_the_text_log_keeps_frames_and_types_but_not_the_messages(root_stream: io.StringIO) -> None:
    try:
        _fail_with_a_name()
    except PatientDataError:
        logging.getLogger("scanonce.test").exception("reading an instance failed")
    text = root_stream.getvalue()
    assert "reading an instance failed" in text
    assert "Traceback (most recent call last):" in text
    assert "in _fail_with_a_name" in text  # where
    assert "ValueError (message withheld from the log)" in text  # what, the cause first
    assert "The above exception led to the following one:" in text
    assert f"{__name__}.PatientDataError (message withheld from the log)" in text
    assert "ZEBEDEE" not in text and "QUENTIN" not in text


def test_uvicorns_own_tracebacks_withhold_the_message_too(capsys: pytest.CaptureFixture[str]) -> None:
    """An exception escaping the application is logged by uvicorn ("Exception in ASGI
    application") with its own handler: `scanonce serve` configures that handler too."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            _fail_with_a_name()

    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", log_config=uvicorn_text_log_config()
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 500
    finally:
        server.should_exit = True
        thread.join(10)
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
    err = capsys.readouterr().err
    assert "Exception in ASGI application" in err
    assert "PatientDataError (message withheld from the log)" in err
    assert "ZEBEDEE" not in err and "QUENTIN" not in err


def test_an_operators_own_log_config_under_the_factory_withholds_messages_too() -> None:
    """Under `uvicorn --factory` with a `--log-config` of the operator's own, their handlers and
    format stay, but a traceback still never carries an exception's message."""
    stream = io.StringIO()
    theirs = logging.StreamHandler(stream)
    theirs.setFormatter(logging.Formatter("OPS %(levelname)s %(message)s"))
    root = logging.getLogger()
    loggers = [
        root,
        *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)),
    ]
    saved = {h: list(h.filters) for lg in loggers for h in lg.handlers}
    root.addHandler(theirs)
    try:
        adopt_uvicorn_logging("json")
        try:
            _fail_with_a_name()
        except PatientDataError:
            logging.getLogger("scanonce.test").exception("reading an instance failed")
        text = stream.getvalue()
        assert "OPS ERROR reading an instance failed" in text  # their handler, their format
        assert f"{__name__}.PatientDataError (message withheld from the log)" in text
        assert "ZEBEDEE" not in text and "QUENTIN" not in text
        assert theirs in root.handlers
    finally:
        root.removeHandler(theirs)
        for handler, filters in saved.items():
            handler.filters[:] = filters
