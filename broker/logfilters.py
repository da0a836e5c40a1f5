"""Log filters that keep patient data out of the server's logs.

uvicorn's access log writes each request line with its query string, and query strings carry
patient data: `/dicom-web/studies?PatientName=...`, `/fhir/Patient?family=...&birthdate=...`,
`$ihe-pix?sourceIdentifier=...`. The path stays (it is what an operator needs to see); the query
is replaced by `?…`.

`configure_logging` sets the process's format: plain text or one JSON object per line
(SCANONCE_LOG_FORMAT=json), each line with the id of the request it belongs to.
"""

from __future__ import annotations

import copy
import json
import logging
import traceback
from datetime import UTC, datetime
from typing import Any

import uvicorn.config
import uvicorn.logging

from broker.metrics import request_id

_REDACTED = "?\u2026"


class RedactQueryStrings(logging.Filter):
    """For uvicorn.access records: args are (client, method, path with query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            path = args[2].split("?", 1)[0] + _REDACTED
            record.args = (*args[:2], path, *args[3:])
        return True


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger (idempotent)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQueryStrings) for f in access.filters):
        access.addFilter(RedactQueryStrings())


# -- structured logs --------------------------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """Puts the id of the HTTP request being served (or "") on every record as `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id; for an exception its
    type and stack frames (file, line, function) but not its message, which may quote a value read
    from a data set. The messages themselves are the broker's own, written never to name a patient."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "") or request_id.get(),
            "process": record.process,
            "thread": record.threadName,
        }
        if record.exc_info and record.exc_info[0] is not None:
            data["exc_type"] = record.exc_info[0].__name__
            data["stack"] = [
                f"{frame.filename}:{frame.lineno} {frame.name}"
                for frame in traceback.extract_tb(record.exc_info[2])
            ]
        return json.dumps(data, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def withheld_traceback(exc: BaseException | None) -> str:
    """A traceback as Python prints it (the chain of causes included), each exception's message
    replaced by its type: a message may quote a value read from a data set or a request (a
    patient's name in a pydicom value error, an identifier in a parse error), which the text log
    must not carry any more than the JSON one. The frames say where it happened; the type says
    what."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = (
            exc.__cause__
            if exc.__cause__ is not None
            else None
            if exc.__suppress_context__
            else exc.__context__
        )
    lines: list[str] = []
    for n, item in enumerate(reversed(chain)):
        if n:
            lines.append("\nThe above exception led to the following one:\n\n")
        if item.__traceback__ is not None:
            lines.append("Traceback (most recent call last):\n")
            lines.extend(traceback.format_list(traceback.extract_tb(item.__traceback__)))
        kind = type(item)
        name = (
            kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        )
        lines.append(f"{name} (message withheld from the log)\n")
    return "".join(lines).rstrip("\n")


class WithholdExceptionMessages(logging.Filter):
    """For handlers whose formatter is not ours (an operator's `--log-config`): the record's
    traceback text set beforehand as `withheld_traceback` prints it, which any formatter then
    prints instead of its own (logging.Formatter uses `exc_text` when it is set)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = withheld_traceback(record.exc_info[1])
        return True


class _WithholdMessages(logging.Formatter):
    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return withheld_traceback(ei[1])


class TextFormatter(_WithholdMessages):
    """The text format: `TEXT_FORMAT`, exceptions as `withheld_traceback` prints them."""


class UvicornTextFormatter(_WithholdMessages, uvicorn.logging.DefaultFormatter):
    """uvicorn's own lines in the text format ("INFO:     ..."), with its exception tracebacks
    ("Exception in ASGI application") withheld as ours are."""


def uvicorn_text_log_config() -> dict[str, Any]:
    """uvicorn's logging configuration for the text format: its own layout, our tracebacks."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["default"]["()"] = f"{__name__}.UvicornTextFormatter"
    return config


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """The process's log handler (stderr): `json` (SCANONCE_LOG_FORMAT=json) or plain text, both
    with the request id. Replaces earlier handlers of the root logger, so calling it twice is fine."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(logging.WARNING)
    redact_access_log()


def _uvicorn_defaults_in_place() -> bool:
    """Whether logging is as uvicorn's own configuration (`LOGGING_CONFIG`, or `serve`'s copy of
    it) leaves it: no root handler, and on uvicorn's loggers only its handlers "default" and
    "access". Anything else is an operator's `--log-config`."""
    if logging.getLogger().handlers:
        return False
    own = {"uvicorn": {"default"}, "uvicorn.error": set(), "uvicorn.access": {"access"}}
    return all(h.name in names for name, names in own.items() for h in logging.getLogger(name).handlers)


def adopt_uvicorn_logging(fmt: str = "text") -> None:
    """The process's logging under `uvicorn --factory broker.app:app_from_env`, where uvicorn
    configured its own loggers before the app existed and `scanonce serve`'s set-up never ran:
    the broker's own lines went to Python's last-resort handler (warnings only, exception
    messages and all), and the access log kept query strings (`?PatientID=...`). Here: the root
    handler as `serve` installs it, at the level uvicorn was given (--log-level), the query
    strings redacted, and uvicorn's lines in the same format: JSON through the root handler, or
    uvicorn's own text layout with its tracebacks withheld. An access log switched off
    (--no-access-log: no handler) stays off. A logging configuration of the operator's own
    (`--log-config`) is kept as it is, but for what no log may carry: the access log's query
    strings and exception messages (each of its handlers prints tracebacks withheld)."""
    if not _uvicorn_defaults_in_place():
        redact_access_log()
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for handler in {h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers}:
            if not any(isinstance(f, WithholdExceptionMessages) for f in handler.filters):
                handler.addFilter(WithholdExceptionMessages())
        logging.getLogger("scanonce").info("logging as the --log-config given to uvicorn says")
        return
    level = logging.getLevelName(logging.getLogger("uvicorn.error").getEffectiveLevel())
    configure_logging(level, fmt)
    for name in ("uvicorn", "uvicorn.access"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if fmt == "json":
                logger.removeHandler(handler)
                logger.propagate = True
            elif isinstance(handler.formatter, uvicorn.logging.DefaultFormatter) and not isinstance(
                handler.formatter, UvicornTextFormatter
            ):
                handler.setFormatter(
                    UvicornTextFormatter(handler.formatter._fmt, use_colors=handler.formatter.use_colors)
                )
