"""Prometheus metrics, the request id, and the middleware that records both for every HTTP request.

What is measured (all names start with `scanonce_`; docs/production.md lists them):

- requests, their latency (a histogram) and server-side errors per interface: `dicomweb`,
  `dimse`, `fhir`, `cds`, `lookup`, `mllp`, `api`, `pages`, `ops` (health checks and /metrics);
- instances ingested and their bytes, per outcome;
- object store and database failures;
- avoided repeat exams and the dose they spared (`scanonce_repeats_avoided_total`, counted by
  broker/lookup/metrics.py);
- the job queue's depth and the age of its oldest queued job, read from the database at scrape
  time (a collector the jobs domain provides), so every node reports the same shared queue.

Labels are bounded sets (interface, method, status code): never a path, a UID or a user.

Several processes (`uvicorn --workers N` of one node) share one /metrics when
PROMETHEUS_MULTIPROC_DIR names a directory they all write (prometheus-client's multiprocess
mode); without it, the process's own registry is served.

The lowest layer: imports nothing from the broker, so every domain may count what it does.
"""

from __future__ import annotations

import contextvars
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

INTERFACES = ("dicomweb", "dimse", "fhir", "cds", "lookup", "mllp", "api", "pages", "ops")

REQUESTS = Counter(
    "scanonce_requests_total",
    "Requests handled, by interface, method (HTTP method or DIMSE/HL7 operation) and status",
    ["interface", "method", "status"],
)
LATENCY = Histogram(
    "scanonce_request_duration_seconds",
    "Time from request to the last byte of the response, by interface",
    ["interface"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
ERRORS = Counter(
    "scanonce_request_errors_total",
    "Requests that failed on the broker's side (HTTP 5xx, a DIMSE/HL7 processing failure, or an "
    "unhandled exception), by interface",
    ["interface"],
)
INGEST_INSTANCES = Counter(
    "scanonce_ingest_instances_total",
    "Instances received for storage, by outcome (stored, duplicate, failed)",
    ["outcome"],
)
INGEST_BYTES = Counter("scanonce_ingest_bytes_total", "Bytes of newly stored instances")
STORAGE_ERRORS = Counter(
    "scanonce_storage_errors_total", "Object store failures (unreachable, a failed read or write)"
)
DB_ERRORS = Counter(
    "scanonce_database_errors_total", "Database failures seen by requests (refused, lost, timed out)"
)
DEPENDENCY_UP = Gauge(
    "scanonce_dependency_up",
    "1 if the node's last readiness check reached the dependency (database, object_store), else 0",
    ["dependency"],
    # Several processes of one node: the worst of the live ones.
    multiprocess_mode="livemin",
)

# -- the request id ---------------------------------------------------------------------------

REQUEST_ID_HEADER = "X-Request-ID"
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("scanonce_request_id", default="")
# An incoming id is kept if it looks like one (a balancer's or a client's); anything else is
# replaced, so a header cannot smuggle text (or patient data) into the logs.
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_request_id(incoming: str | None = None) -> str:
    if incoming and _VALID_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex


# -- which interface a path belongs to --------------------------------------------------------


def interface_of(path: str) -> str:
    if path.startswith("/dicom-web") or (path.startswith("/facilities/") and "/dicom-web" in path):
        return "dicomweb"
    if path.startswith("/fhir"):
        return "fhir"
    if path.startswith("/cds-services"):
        return "cds"
    if path.startswith(("/api/priors", "/api/metrics/avoided")):
        return "lookup"
    if path.startswith("/api"):
        return "api"
    if path in ("/metrics", "/healthz", "/readyz"):
        return "ops"
    return "pages"


# -- the ASGI middleware ----------------------------------------------------------------------

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]


class ObservabilityMiddleware:
    """The outermost middleware: gives each HTTP request an id (kept from `X-Request-ID` when the
    caller or the balancer sent a sane one, else new), makes it visible to every log line of the
    request and returns it in the response, and records the request in the metrics (also the
    requests that inner middlewares, such as the auth guard, refuse)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        rid = new_request_id(incoming)
        token = request_id.set(rid)
        interface = interface_of(scope.get("path", ""))
        method = scope.get("method", "GET")
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = 500
            raise
        finally:
            REQUESTS.labels(interface, method, str(status)).inc()
            LATENCY.labels(interface).observe(time.perf_counter() - start)
            if status >= 500:
                ERRORS.labels(interface).inc()
            request_id.reset(token)


# -- DIMSE and HL7 operations ------------------------------------------------------------------


def _dimse_failed(status: Any) -> bool:
    """A processing failure or out of resources (the broker's side), not a refusal of bad input."""
    code = getattr(status, "Status", status)
    if not isinstance(code, int):
        return False
    return code == 0x0110 or 0xA700 <= code <= 0xA7FF or 0xC000 <= code <= 0xCFFF


def observe_dimse(operation: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a pynetdicom event handler: count and time it as interface `dimse`, method `operation`
    (C-STORE, C-FIND, ...). A generator handler (C-FIND, C-MOVE, C-GET) is timed to its end."""

    def record(start: float, last: Any, failed: bool) -> None:
        code = getattr(last, "Status", last)
        label = f"0x{code:04X}" if isinstance(code, int) else ("error" if failed else "done")
        REQUESTS.labels("dimse", operation, label).inc()
        LATENCY.labels("dimse").observe(time.perf_counter() - start)
        if failed or _dimse_failed(last):
            ERRORS.labels("dimse").inc()

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            result = handler(*args, **kwargs)
        except BaseException:
            record(start, None, True)
            raise
        if isinstance(result, Iterator):
            return _observe_iter(result, start, record)
        record(start, result, False)
        return result

    return wrapped


def _observe_iter(
    items: Iterator[Any], start: float, record: Callable[[float, Any, bool], None]
) -> Iterator[Any]:
    last: Any = None
    failed = False
    try:
        for item in items:
            # (status, identifier) pairs for C-FIND; a status alone, or a count, for C-MOVE/C-GET.
            last = item[0] if isinstance(item, tuple) else item
            yield item
    except BaseException:
        failed = True
        raise
    finally:
        record(start, last, failed)


def observe_mllp(message_type: str, ack_code: str, seconds: float) -> None:
    """One HL7 v2 message applied: `ack_code` AA, AE or AR (AE: the broker's side failed)."""
    REQUESTS.labels("mllp", message_type[:16] or "unknown", ack_code).inc()
    LATENCY.labels("mllp").observe(seconds)
    if ack_code == "AE":
        ERRORS.labels("mllp").inc()


def observe_ingest(*, stored: int, duplicate: int, failed: int, stored_bytes: int) -> None:
    for outcome, n in (("stored", stored), ("duplicate", duplicate), ("failed", failed)):
        if n:
            INGEST_INSTANCES.labels(outcome).inc(n)
    if stored_bytes:
        INGEST_BYTES.inc(stored_bytes)


# -- exposition -------------------------------------------------------------------------------


def render(extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """The /metrics body and its content type: this process's metrics (or, in multiprocess mode,
    all processes' sharing PROMETHEUS_MULTIPROC_DIR) and then the `extra` collectors' (read at
    scrape time, such as the job queue's depth)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        body = _generate_latest(registry)
    else:
        body = _generate_latest(REGISTRY)
    collectors = list(extra)
    if collectors:
        extra_registry = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            extra_registry.register(collector)
        body += _generate_latest(extra_registry)
    return body, CONTENT_TYPE_LATEST
