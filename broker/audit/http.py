"""The audit middleware: records every HTTP access to patient data, and every refused sign-in
(401), as an audit event committed BEFORE the response starts. If the event cannot be recorded
the caller gets 503 and none of the answer: no access goes unrecorded.

It is added after the guard (broker.security.http.AuthGuard), so it runs outside it: it sees
requests the guard refuses, and the principal the guard put on the request state. A route that
records in its own transaction (STOW-RS: the event commits with the stored rows) sets
`request.state.audit_recorded`, and no second event is written.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.audit import service
from broker.audit.schemas import AuditRecord
from broker.audit.service import AuditWriter

# Never audited, not even looked at: open by the standards, no patient data (health checks, static
# assets, discovery documents). Other paths without patient data (metrics, the viewer's assets,
# FHIR metadata, CDS Hooks discovery, sign-in pages) pass `classify` as None: only a 401 on them
# is recorded, as a sign-in failure.
_EXEMPT_FIRST = {"healthz", "readyz", "static", ".well-known", "favicon.ico"}
_BODY_LIMIT = 64 * 1024
_PATIENT_KEYS = ("PatientID", "00100020")
_ISSUER_KEYS = ("IssuerOfPatientID", "00100021")
_STUDY_KEYS = ("StudyInstanceUID", "0020000D")
_FHIR_PATIENT_KEYS = (
    "patient",
    "subject",
    "identifier",
    "patient.identifier",
    "sourceIdentifier",
    "subject:identifier",
)


@dataclass(slots=True)
class Kind:
    """What a request is, for the audit trail."""

    action: str
    subtype: str
    interface: str
    study_uid: str = ""
    patient_id: str = ""
    patient_issuer: str = ""
    capture_body: bool = False


def _first(params: list[tuple[str, str]], keys: tuple[str, ...]) -> str:
    for key, value in params:
        if key in keys and value:
            return value
    return ""


def _system_value(text: str) -> tuple[str, str]:
    system, bar, value = text.rpartition("|")
    return (system, value) if bar else ("", text)


def classify(method: str, path: str, query: str) -> Kind | None:
    """The event a request makes, or None when it touches no patient data."""
    seg = [s for s in path.split("/") if s]
    params = parse_qsl(query, keep_blank_values=False)
    if not seg:
        # The lookup page: a patient only when it is asked about one.
        return Kind("E", "query", "web", patient_id=_first(params, ("mrn",))) if params else None
    first = seg[0]
    if first == "facilities" and len(seg) >= 3 and seg[2] == "dicom-web":
        return _dicomweb(method, seg[3:], params)
    if first == "dicom-web":
        return _dicomweb(method, seg[1:], params)
    if first == "fhir" and len(seg) >= 2:
        return _fhir(method, seg[1:], params)
    if first == "cds-services":
        if method != "POST" or seg[-1] == "feedback":
            return None
        return Kind("E", "query", "cds", capture_body=True)
    if first == "api" and len(seg) >= 2:
        return _api(method, seg[1:], params)
    if first == "record" and method == "GET":
        return Kind("E", "query", "web", patient_id=_first(params, ("mrn",)))
    if first == "avoided" and method == "POST":
        return Kind("C", "create", "web")
    if first == "imports":
        return Kind("C", "import", "web") if method == "POST" else Kind("R", "read", "web")
    if first == "admin" and len(seg) >= 2 and seg[1] == "review":
        return Kind("U", "link", "web") if method == "POST" else Kind("R", "read", "web")
    if "consent" in (s.lower() for s in seg):
        return Kind("U" if method != "GET" else "R", "consent", "api")
    if any(s in ("break-the-glass", "break-glass", "btg") for s in seg):
        return Kind("E", "break-the-glass", "api")
    return None


def _dicomweb(method: str, rest: list[str], params: list[tuple[str, str]]) -> Kind:
    study = rest[1] if len(rest) >= 2 and rest[0] == "studies" else _first(params, _STUDY_KEYS)
    kind = Kind("R", "retrieve", "dicomweb", study_uid=study)
    if method == "POST":
        kind.action, kind.subtype = "C", "store"
    elif rest and rest[-1] in ("studies", "series", "instances"):
        kind.action, kind.subtype = "E", "query"
        kind.patient_id = _first(params, _PATIENT_KEYS)
        kind.patient_issuer = _first(params, _ISSUER_KEYS)
    return kind


def _fhir(method: str, rest: list[str], params: list[tuple[str, str]]) -> Kind | None:
    resource = rest[0]
    if resource == "metadata":
        return None
    if resource == "AuditEvent":
        return Kind("E", "audit-read", "fhir", patient_id=_system_value(_first(params, ("patient",)))[1])
    if resource == "Consent":
        return Kind("R" if method == "GET" else "U", "consent", "fhir")
    kind = Kind("E", "query", "fhir")
    if method == "POST":
        kind.action, kind.subtype = "C", "create"
    elif method in ("PUT", "PATCH"):
        kind.action, kind.subtype = "U", "update"
    elif len(rest) >= 2 and not rest[1].startswith("$"):
        kind.action, kind.subtype = "R", "read"
        if resource == "ImagingStudy":
            kind.study_uid = rest[1].removeprefix("urn:oid:")
        else:
            kind.patient_id = f"{resource}/{rest[1]}"
    issuer, pid = _system_value(_first(params, _FHIR_PATIENT_KEYS))
    if pid and not kind.patient_id:
        kind.patient_id, kind.patient_issuer = pid, issuer
    return kind


def _api(method: str, rest: list[str], params: list[tuple[str, str]]) -> Kind | None:
    area = rest[0]
    if area == "priors":
        if len(rest) > 1 and rest[1] == "exams":
            return None
        if method == "POST":
            return Kind("C", "create", "api")
        issuer, pid = _system_value(_first(params, ("identifier",)))
        return Kind(
            "E",
            "query",
            "api",
            patient_id=pid or _first(params, ("mrn",)),
            patient_issuer=issuer or _first(params, ("facility",)),
        )
    if area == "identity":
        if method == "POST" and len(rest) >= 2 and rest[1] in ("link", "unlink"):
            return Kind("U", rest[1], "api", capture_body=True)
        if len(rest) >= 2 and rest[1] in ("review", "records"):
            return (
                Kind("U", "link", "api", capture_body=True) if method == "POST" else Kind("R", "read", "api")
            )
        return None
    if area == "imports":
        if method == "POST":
            return Kind("C" if len(rest) == 1 else "U", "import", "api", capture_body=len(rest) == 1)
        return Kind("R", "read", "api")
    if area == "audit":
        return Kind("E", "audit-read", "api")
    if area in ("consent", "consents"):
        return Kind("R" if method == "GET" else "U", "consent", "api")
    if area in ("break-the-glass", "break-glass", "btg"):
        return Kind("E", "break-the-glass", "api", capture_body=True)
    return None


def _outcome(status: int) -> str:
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


def _from_body(kind: Kind, body: bytes, record: AuditRecord) -> None:
    """What a small JSON body says about the patient (CDS Hooks context) or the records linked."""
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return
    if not isinstance(doc, dict):
        return
    if kind.interface == "cds":
        context = doc.get("context")
        if isinstance(context, dict) and isinstance(context.get("patientId"), str):
            record.patient_id = context["patientId"]
            record.patient_issuer = str(doc.get("fhirServer") or "")
        return
    # Link, unlink, review decisions, imports: the identifiers they name, as sent.
    record.entity = (record.entity + " " + body.decode("utf-8", "replace"))[:2048]
    for key in ("study_uid", "study"):
        if isinstance(doc.get(key), str) and not record.study_uid:
            record.study_uid = doc[key]


class AuditMiddleware:
    """Plain ASGI (no buffering of bodies): holds the response start until its event commits."""

    def __init__(self, app: ASGIApp, *, writer: AuditWriter | None) -> None:
        self.app = app
        self.writer = writer  # None: auditing switched off

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.writer is None or scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        first = path.split("/", 2)[1] if path.count("/") else ""
        if first in _EXEMPT_FIRST:
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        query = scope.get("query_string", b"").decode("latin-1")
        kind = classify(method, path, query)
        state: dict[str, Any] = scope.setdefault("state", {})
        writer = self.writer
        body = bytearray()

        async def receive_tee() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(body) < _BODY_LIMIT:
                body.extend(message.get("body", b"")[: _BODY_LIMIT - len(body)])
            return message

        started = False
        blocked = False

        async def send_audited(message: Message) -> None:
            nonlocal started, blocked
            if blocked:
                return
            if message["type"] == "http.response.start":
                started = True
                record = self._record(kind, scope, state, message["status"], bytes(body), path, query)
                if record is not None:
                    try:
                        await writer.record_async([record])
                    except Exception:  # noqa: BLE001 - refused whatever the cause
                        blocked = True
                        await _unavailable(send)
                        return
            await send(message)

        try:
            await self.app(
                scope, receive_tee if kind is not None and kind.capture_body else receive, send_audited
            )
        except Exception:
            if not started:
                # The app failed before answering (the server answers 500): still recorded.
                record = self._record(kind, scope, state, 500, bytes(body), path, query)
                if record is not None:
                    # The original error is what is raised.
                    with contextlib.suppress(Exception):
                        await writer.record_async([record])
            raise

    def _record(
        self,
        kind: Kind | None,
        scope: Scope,
        state: dict[str, Any],
        status: int,
        body: bytes,
        path: str,
        query: str,
    ) -> AuditRecord | None:
        if status == 401:
            kind = Kind("E", "sign-in-failure", _interface(path))
        elif kind is None or state.get("audit_recorded"):
            return None
        elif "principal" not in state and status < 400:
            return None  # a browser sent to the sign-in page: nothing was accessed
        client = scope.get("client")
        record = AuditRecord(
            action=kind.action,
            subtype=kind.subtype,
            outcome=_outcome(status),
            outcome_desc=f"HTTP {status}",
            patient_id=kind.patient_id,
            patient_issuer=kind.patient_issuer,
            study_uid=kind.study_uid,
            source_node=service.NODE,
            source_interface=kind.interface,
            client_address=str(client[0]) if client else "",
            entity=f"{scope['method']} {path}" + (f"?{query}" if query else ""),
        ).by(state.get("principal"))
        if kind.capture_body and body:
            _from_body(kind, body, record)
        return record


def _interface(path: str) -> str:
    first = path.strip("/").split("/", 1)[0]
    return {
        "dicom-web": "dicomweb",
        "facilities": "dicomweb",
        "fhir": "fhir",
        "cds-services": "cds",
        "api": "api",
    }.get(first, "web")


async def _unavailable(send: Send) -> None:
    body = orjson.dumps(
        {"error": "Service unavailable", "detail": "the access could not be audited; try again"}
    )
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"5"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
