"""Appending to the audit trail, the group-commit writer, verifying the chain, and searching it.

The chain: row N stores `prev_hash` (row N-1's hash, 64 zeros for row 1) and `hash`, the SHA-256
of a canonical serialisation of all its other columns (sorted-key JSON, UTF-8). Editing a row
breaks its hash; deleting, inserting or reordering rows breaks a sequence number or a link; the
one-row head (last sequence, last hash) catches rows removed from or added at the end. Someone
able to rewrite the whole chain and the head can recompute it: `scanonce audit head` prints the
head so it can be written down elsewhere, and `verify --expect-head SEQ:HASH` checks against it.

Every append first locks the head row (an UPDATE of it: a row lock on PostgreSQL, the write lock
on SQLite), so appenders in any thread or process take turns and the chain never forks. When the
head is still where this process last moved it, that UPDATE also checks and moves it (the rows
are chained onto the expected head first); when it is not, nothing moved and the append locks
and reads the head as usual.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import socket
import threading
import unicodedata
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

import orjson
from sqlalchemy import and_, bindparam, func, literal, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from broker.audit.models import AuditChainHead, AuditEvent
from broker.audit.schemas import AuditRecord, VerifyOut
from broker.db import Prepared, core_table
from broker.dicom.uids import is_valid_uid
from broker.errors import BadRequest, Unavailable
from broker.security.schemas import Principal

log = logging.getLogger("scanonce.audit")

GENESIS = "0" * 64
_EVENT = core_table(AuditEvent)
_HEAD = core_table(AuditChainHead)
# Column widths (the migration's), for cutting values before they are hashed.
_WIDTHS = {c.name: getattr(c.type, "length", None) for c in _EVENT.columns}
_TEXT_FIELDS = [f for f in AuditRecord.__dataclass_fields__ if f != "resolve_study"]
_FIELD_WIDTHS = [(name, _WIDTHS.get(name)) for name in _TEXT_FIELDS]
NODE = socket.gethostname()[:128]
# Every append's three statements, built once and run through the driver (`Prepared`): each
# ingest group appends, and SQLAlchemy's execution of them cost more CPU than the database's work.
_LOCK_HEAD = Prepared(
    update(_HEAD).where(_HEAD.c.id == 1).values(seq=_HEAD.c.seq).returning(_HEAD.c.seq, _HEAD.c.hash)
)
_EVENT_COLUMNS = [c.name for c in _EVENT.columns]
_INSERT_EVENTS = Prepared(_EVENT.insert().inline(), column_keys=_EVENT_COLUMNS)
_MOVE_HEAD = Prepared(
    update(_HEAD).where(_HEAD.c.id == 1).values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)
# Moves the head only if it is still where this process last left it: an append that guessed
# right locks, checks and moves the head in one statement (two in all, not three).
_MOVE_HEAD_FROM = Prepared(
    update(_HEAD)
    .where(_HEAD.c.id == 1, _HEAD.c.seq == bindparam("old_seq"), _HEAD.c.hash == bindparam("old_hash"))
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)


class _Guess:
    """Where this process last left a database's chain head, and how many appends to make
    without guessing after a wrong guess (another process or thread appended since)."""

    __slots__ = ("head", "pause")

    def __init__(self) -> None:
        self.head: tuple[int, str] | None = None
        self.pause = 0


_GUESSES: weakref.WeakKeyDictionary[Engine, _Guess] = weakref.WeakKeyDictionary()
_GUESSES_LOCK = threading.Lock()
# After a wrong guess (a failed UPDATE: one statement more than locking first), appends lock
# first this many times: under steady contention (DIMSE receiver processes on PostgreSQL each
# appending) guessing costs at most one statement in nine.
_PAUSE = 8


def sanitise(value: object, limit: int | None) -> str:
    """A stored string: control and format characters (newlines, escapes, bidi overrides) become
    U+FFFD, so that nothing stored can forge a line or a field when printed, then cut to the
    column's width. Done before hashing, so the stored value is the hashed one."""
    text = "" if value is None else str(value)
    if text.isprintable():
        # Nothing printable is Cc, Cf or Cs: the common case, without a look at each character.
        return text[:limit] if limit else text
    out = "".join("\ufffd" if unicodedata.category(ch) in ("Cc", "Cf", "Cs") else ch for ch in text)
    return out[:limit] if limit else out


def canonical(row: dict[str, Any]) -> bytes:
    """The bytes a row's hash covers: every column but `hash`, as sorted-key JSON."""
    return orjson.dumps({k: v for k, v in row.items() if k != "hash"}, option=orjson.OPT_SORT_KEYS)


def row_hash(row: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(row)).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class StudyPatients(Protocol):
    """Which patient (ID, issuer) each study belongs to; the index implements it (a layer above),
    the app wires it in. For events that name only a study (a WADO-RS read)."""

    def __call__(self, *, session: Session, study_uids: Sequence[str]) -> dict[str, tuple[str, str]]: ...


_resolver: StudyPatients | None = None


def set_study_resolver(resolver: StudyPatients | None) -> None:
    global _resolver
    _resolver = resolver


class EmergencyMarker(Protocol):
    """Marks, in place, the events of accesses made under a break-the-glass grant (adds the
    purpose of use `BTG`); consent implements it (a layer above), the app wires it in."""

    def __call__(self, *, session: Session, records: Sequence[AuditRecord]) -> None: ...


_marker: EmergencyMarker | None = None
BREAK_THE_GLASS = "BTG"  # HL7 v3 ActReason (PurposeOfUse): break the glass


def set_emergency_marker(marker: EmergencyMarker | None) -> None:
    global _marker
    _marker = marker


def _resolve(session: Session, records: Sequence[AuditRecord]) -> None:
    # Only well-formed UIDs name a study; anything else (a NUL byte, which PostgreSQL cannot
    # even compare) must not turn a request's 404 into a failed audit write and a 503.
    wanted = sorted(
        {
            r.study_uid
            for r in records
            if r.study_uid and not r.patient_id and r.resolve_study and is_valid_uid(r.study_uid)
        }
    )
    if not wanted or _resolver is None:
        return
    found = _resolver(session=session, study_uids=wanted)
    for r in records:
        if r.study_uid in found and not r.patient_id:
            r.patient_id, r.patient_issuer = found[r.study_uid]


def append(*, session: Session, records: Sequence[AuditRecord]) -> list[int]:
    """Append events in the caller's transaction (committed with it, rolled back with it);
    returns their sequence numbers."""
    if not records:
        return []
    _resolve(session, records)
    if _marker is not None:
        # After resolving: the marker asks whose records the event names.
        _marker(session=session, records=records)
    conn = session.connection()
    with _GUESSES_LOCK:
        guess = _GUESSES.get(conn.engine)
        if guess is None:
            guess = _GUESSES[conn.engine] = _Guess()
    texts = [[sanitise(getattr(record, name), width) for name, width in _FIELD_WIDTHS] for record in records]
    recorded = _now()
    head = guess.head
    if head is not None and guess.pause == 0:
        # The head is most likely where this process left it (the ingest writer appends once per
        # group): chain the rows onto that, then move the head only if it is still there. That
        # UPDATE locks the head as the locking read below does; on PostgreSQL one waiting for
        # another appender's commit re-checks the moved head and matches nothing.
        rows = _chained(head, recorded, texts)
        moved = {
            "old_seq": head[0],
            "old_hash": head[1],
            "new_seq": rows[-1]["seq"],
            "new_hash": rows[-1]["hash"],
        }
        if _MOVE_HEAD_FROM.run(conn, [moved]) == 1:
            _INSERT_EVENTS.run(conn, rows)
            guess.head = (rows[-1]["seq"], rows[-1]["hash"])
            return [r["seq"] for r in rows]
        guess.pause = _PAUSE
    elif guess.pause:
        guess.pause -= 1
    # Lock the head first and read it in the same statement: the next appender waits here until
    # this transaction ends (UPDATE ... RETURNING: PostgreSQL, SQLite >= 3.35).
    ((seq, prev),) = _LOCK_HEAD.all(conn)
    rows = _chained((int(seq), str(prev)), recorded, texts)
    _INSERT_EVENTS.run(conn, rows)
    _MOVE_HEAD.run(conn, [{"new_seq": rows[-1]["seq"], "new_hash": rows[-1]["hash"]}])
    # If this transaction rolls back, the next guess is wrong, and found so by its UPDATE.
    guess.head = (rows[-1]["seq"], rows[-1]["hash"])
    return [r["seq"] for r in rows]


def _chained(head: tuple[int, str], recorded: str, texts: list[list[str]]) -> list[dict[str, Any]]:
    """The rows of `texts` (each record's sanitised fields) chained onto `head`."""
    seq, prev = head
    rows: list[dict[str, Any]] = []
    for values in texts:
        seq += 1
        row: dict[str, Any] = {"seq": seq, "recorded": recorded, "prev_hash": prev}
        row.update(zip(_TEXT_FIELDS, values, strict=True))
        row["hash"] = prev = row_hash(row)
        rows.append(row)
    return rows


def record_now(*, engine: Engine, records: Sequence[AuditRecord]) -> list[int]:
    """Append in a transaction of its own and commit (blocking)."""
    with Session(engine) as session:
        seqs = append(session=session, records=records)
        session.commit()
    return seqs


# ------------------------------------------------------------------------- group commit


@dataclass(eq=False)
class _Pending:
    records: Sequence[AuditRecord]
    done: Callable[[BaseException | None], None]


class AuditWriter:
    """One writer thread per database: appends whatever is waiting in one transaction (one head
    lock, one commit), then tells each caller. A caller's response waits for its commit; many
    concurrent requests share one commit."""

    def __init__(self, engine: Engine, *, max_group: int = 256) -> None:
        self.engine = engine
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, records: Sequence[AuditRecord], done: Callable[[BaseException | None], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="scanonce-audit-writer", daemon=True)
                self._thread.start()
        self._queue.put(_Pending(records, done))

    def record(self, records: Sequence[AuditRecord], *, timeout: float = 60.0) -> None:
        """Blocking: returns once committed; raises Unavailable if it could not be."""
        event = threading.Event()
        box: list[BaseException | None] = []

        def done(exc: BaseException | None) -> None:
            box.append(exc)
            event.set()

        self.submit(records, done)
        if not event.wait(timeout):
            raise Unavailable("the audit trail could not be written in time")
        if box[0] is not None:
            raise Unavailable("the audit trail could not be written") from box[0]

    async def record_async(self, records: Sequence[AuditRecord], *, timeout: float = 60.0) -> None:
        """From the event loop: resumes once committed; raises Unavailable if it could not be."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BaseException | None] = loop.create_future()

        def done(exc: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, future, exc)

        self.submit(records, done)
        try:
            exc = await asyncio.wait_for(future, timeout)
        except TimeoutError as late:
            raise Unavailable("the audit trail could not be written in time") from late
        if exc is not None:
            raise Unavailable("the audit trail could not be written") from exc

    def _run(self) -> None:
        while True:
            group = [self._queue.get()]
            while len(group) < self._max_group:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(group)

    def _write(self, group: list[_Pending]) -> None:
        try:
            record_now(engine=self.engine, records=[r for p in group for r in p.records])
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            if len(group) > 1:
                for pending in group:  # one bad event must not fail the others
                    self._write([pending])
                return
            # Only the type: a database error's text can carry the parameters (patient data).
            log.error("audit event not recorded: %s", type(exc).__name__)
            group[0].done(exc)
            return
        for pending in group:
            pending.done(None)


def _settle(future: asyncio.Future[BaseException | None], exc: BaseException | None) -> None:
    if not future.done():
        future.set_result(exc)


_WRITERS: dict[int, AuditWriter] = {}
_WRITERS_LOCK = threading.Lock()


def writer_for(engine: Engine) -> AuditWriter:
    """The process's writer for this database (one thread each)."""
    with _WRITERS_LOCK:
        writer = _WRITERS.get(id(engine))
        if writer is None or writer.engine is not engine:
            writer = _WRITERS[id(engine)] = AuditWriter(engine)
        return writer


# ------------------------------------------------------------------------- ingest hook


@dataclass(slots=True)
class IngestAuditHook:
    """Records a store (STOW-RS, C-STORE) in the ingest's own transaction: one event per study
    and outcome. Called by ingest with what it is about to commit (`index.ingest.IngestAudit`)."""

    principal: Principal
    interface: str
    client_address: str = ""
    subtype: str = "store"
    ran: bool = False  # set once it has appended (in a transaction that then committed or not)

    def __call__(self, *, session: Session, stored: Sequence[tuple[str, str, str, str]]) -> None:
        """`stored`: (study UID, patient ID, issuer, status) per instance."""
        _append_store_records(session, self.records(stored))
        self.ran = True

    def records(self, stored: Sequence[tuple[str, str, str, str]]) -> list[AuditRecord]:
        """The events of one call: one per study and outcome."""
        counts: dict[tuple[str, str, str, str], int] = {}
        for item in stored:
            counts[item] = counts.get(item, 0) + 1
        return [
            AuditRecord(
                action="C",
                subtype=self.subtype,
                outcome="0" if status in ("stored", "duplicate") else "4",
                outcome_desc=f"{n} instance(s) {status}",
                patient_id=pid,
                patient_issuer=issuer,
                study_uid=study,
                source_node=NODE,
                source_interface=self.interface,
                client_address=self.client_address,
                entity=f"study {study}",
                resolve_study=False,
            ).by(self.principal)
            for (study, pid, issuer, status), n in counts.items()
        ]

    def joint(self, hooks: Sequence[IngestAuditHook | None]) -> Callable[..., None]:
        """One hook for a group of stores committed together (a group of C-STOREs from several
        associations): each instance gets the events its own hook would record, and all of them
        are appended in one go (one lock of the chain's head per group, not one per instance).
        `stored` is then one item per hook, in order."""

        def audit(*, session: Session, stored: Sequence[tuple[str, str, str, str]]) -> None:
            records: list[AuditRecord] = []
            for hook, one in zip(hooks, stored, strict=True):
                if hook is not None:
                    records += hook.records([one])
            _append_store_records(session, records)
            for hook in hooks:
                if hook is not None:
                    hook.ran = True

        return audit


def _append_store_records(session: Session, records: Sequence[AuditRecord]) -> None:
    try:
        append(session=session, records=records)
    except SQLAlchemyError as exc:
        # The whole store rolls back with it (503 / C-STORE out of resources: retry later).
        log.error("store not recorded in the audit trail: %s", type(exc).__name__)
        raise Unavailable("the store could not be audited; nothing was stored") from exc


# ------------------------------------------------------------------------- verify


def head(*, engine: Engine) -> tuple[int, str]:
    with engine.connect() as conn:
        row = conn.execute(select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1)).first()
    if row is None:
        return -1, ""
    return int(row.seq), str(row.hash)


def verify(*, engine: Engine, expect_head: tuple[int, str] | None = None) -> VerifyOut:
    """Walk the chain from row 1; name the first row that breaks it and why."""
    head_seq, head_hash = head(engine=engine)

    def broken(seq: int, problem: str, checked: int) -> VerifyOut:
        return VerifyOut(
            ok=False, checked=checked, head_seq=head_seq, head_hash=head_hash, broken_seq=seq, problem=problem
        )

    if head_seq < 0:
        return broken(0, "the chain head row is missing (deleted)", 0)
    expected, prev, checked = 1, GENESIS, 0
    anchor_ok = expect_head is None or expect_head[0] == 0
    with engine.connect() as conn:
        rows = conn.execution_options(yield_per=2000).execute(select(_EVENT).order_by(_EVENT.c.seq))
        for mapping in rows.mappings():
            row = dict(mapping)
            seq = int(row["seq"])
            if seq != expected:
                return broken(
                    expected, f"row {expected} is missing (deleted); the next row is {seq}", checked
                )
            if row_hash(row) != row["hash"]:
                return broken(seq, "its contents do not match its hash (edited or forged)", checked)
            if row["prev_hash"] != prev:
                return broken(
                    seq,
                    "it does not link to the row before it (reordered, inserted or a row replaced)",
                    checked,
                )
            if expect_head is not None and seq == expect_head[0]:
                if row["hash"] != expect_head[1]:
                    return broken(
                        seq, "its hash differs from the anchored head (the chain was rewritten)", checked
                    )
                anchor_ok = True
            prev, expected, checked = row["hash"], expected + 1, checked + 1
    last = expected - 1
    if last < head_seq:
        return broken(last + 1, f"rows {last + 1}..{head_seq} are missing (deleted from the end)", checked)
    if last > head_seq:
        return broken(
            head_seq + 1,
            f"rows {head_seq + 1}..{last} are beyond the head (appended outside the broker)",
            checked,
        )
    if prev != head_hash:
        return broken(last, "the last row's hash differs from the chain head (rewritten)", checked)
    if not anchor_ok:
        assert expect_head is not None
        return broken(
            expect_head[0], "the anchored head's row is not in the chain (the chain was cut)", checked
        )
    return VerifyOut(ok=True, checked=checked, head_seq=head_seq, head_hash=head_hash)


# ------------------------------------------------------------------------- search


@dataclass(frozen=True, slots=True)
class AuditQuery:
    patient: str | None = None  # Patient ID, or issuer|ID
    agent: str | None = None
    dates: tuple[str, ...] = ()  # FHIR date params: ge2026-01-01, le2026-12-31T10:00:00Z, 2026-05-01
    action: str | None = None
    subtype: str | None = None
    study: str | None = None
    purpose: str | None = None  # one purpose-of-use code: BTG lists break-the-glass accesses


def _instant(text: str) -> tuple[str, str]:
    """A FHIR date or dateTime as the [start, end) of what it names, in `recorded`'s format."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            end = start + timedelta(days=1)
        else:
            start = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if start.tzinfo is None:
                start = start.replace(tzinfo=UTC)
            start = start.astimezone(UTC)
            end = start + timedelta(microseconds=1)
    except ValueError as exc:
        raise BadRequest("date must be YYYY-MM-DD or an ISO 8601 date-time") from exc
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    return start.strftime(fmt), end.strftime(fmt)


def _conditions(q: AuditQuery) -> list[Any]:
    c = _EVENT.c
    where: list[Any] = []
    if q.patient:
        issuer, bar, pid = q.patient.rpartition("|")
        where.append(c.patient_id == pid)
        if bar and issuer:
            where.append(c.patient_issuer == issuer)
    if q.agent:
        where.append(c.agent_who == q.agent)
    if q.action:
        if q.action not in ("C", "R", "U", "D", "E"):
            raise BadRequest("action must be one of C, R, U, D, E")
        where.append(c.action == q.action)
    if q.subtype:
        where.append(c.subtype == q.subtype)
    if q.purpose:
        # purpose_of_use holds space-separated codes ("TREAT BTG"): match one whole code.
        where.append((literal(" ") + c.purpose_of_use + literal(" ")).like(f"% {q.purpose.strip()} %"))
    if q.study:
        where.append(c.study_uid == q.study)
    for raw in q.dates:
        prefix, value = (raw[:2], raw[2:]) if raw[:2] in ("ge", "le", "gt", "lt", "eq") else ("eq", raw)
        start, end = _instant(value)
        if prefix == "ge":
            where.append(c.recorded >= start)
        elif prefix == "gt":
            where.append(c.recorded >= end)
        elif prefix == "le":
            where.append(c.recorded < end)
        elif prefix == "lt":
            where.append(c.recorded < start)
        else:
            where.append(and_(c.recorded >= start, c.recorded < end))
    return where


def search(
    *, session: Session, query: AuditQuery, limit: int = 100, offset: int = 0
) -> tuple[int, list[dict[str, Any]]]:
    """Matching events, newest first, and how many match in all."""
    where = _conditions(query)
    total = session.execute(select(func.count()).select_from(_EVENT).where(*where)).scalar_one()
    stmt = select(_EVENT).where(*where).order_by(_EVENT.c.seq.desc()).limit(limit).offset(offset)
    return int(total), [dict(m) for m in session.execute(stmt).mappings()]


def rows_between(*, engine: Engine, first: int = 1, limit: int = 100) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        stmt = select(_EVENT).where(_EVENT.c.seq >= first).order_by(_EVENT.c.seq).limit(limit)
        return [dict(m) for m in conn.execute(stmt).mappings()]


# ------------------------------------------------------------------------- FHIR shape

_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_EVENT_TYPES = {
    "query": ("110112", "Query"),
    "read": ("110110", "Patient Record"),
    "retrieve": ("110103", "DICOM Instances Accessed"),
    "store": ("110104", "DICOM Instances Transferred"),
    "import": ("110107", "Import"),
    "create": ("110110", "Patient Record"),
    "update": ("110110", "Patient Record"),
    "link": ("110110", "Patient Record"),
    "unlink": ("110110", "Patient Record"),
    "consent": ("110110", "Patient Record"),
    "break-the-glass": ("110113", "Security Alert"),
    "sign-in-failure": ("110114", "User Authentication"),
    "audit-read": ("110101", "Audit Log Used"),
}
SUBTYPE_SYSTEM = "urn:scanonce:audit-event-subtype"


def to_fhir(row: dict[str, Any]) -> dict[str, Any]:
    """One row as a FHIR R4 AuditEvent, shaped as IHE BALP asks (agent, source, patient entity)."""
    code, display = _EVENT_TYPES.get(row["subtype"], ("110100", "Application Activity"))
    agent: dict[str, Any] = {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                    "code": "humanuser" if row["agent_via"] in ("bearer", "session") else "dataprocessor",
                }
            ]
        },
        "who": {"display": row["agent_who"] or "unknown"},
        "requestor": True,
    }
    if row["agent_issuer"]:
        agent["who"]["identifier"] = {"system": row["agent_issuer"], "value": row["agent_who"]}
    if row["agent_role"]:
        agent["role"] = [{"text": row["agent_role"]}]
    if row["agent_facility"]:
        agent["location"] = {"display": row["agent_facility"]}
    if row["client_address"]:
        agent["network"] = {"address": row["client_address"], "type": "2"}
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(row["seq"]),
        "type": {"system": _DCM, "code": code, "display": display},
        "subtype": [{"system": SUBTYPE_SYSTEM, "code": row["subtype"]}],
        "action": row["action"],
        "recorded": row["recorded"],
        "outcome": row["outcome"],
        "agent": [agent],
        "source": {
            "site": row["source_interface"] or "broker",
            "observer": {"display": row["source_node"] or NODE},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                    "display": "Application Server",
                }
            ],
        },
        "entity": [],
    }
    if row["outcome_desc"]:
        event["outcomeDesc"] = row["outcome_desc"]
    if row["purpose_of_use"]:
        # One CodeableConcept per code: the caller's stated purpose, then BTG for a read made
        # under a break-the-glass grant.
        purpose = [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": code}]}
            for code in row["purpose_of_use"].split()
        ]
        event["purposeOfEvent"] = purpose
        agent["purposeOfUse"] = purpose
    if row["patient_id"]:
        ident: dict[str, str] = {"value": row["patient_id"]}
        if row["patient_issuer"]:
            ident["system"] = row["patient_issuer"]
        event["entity"].append(
            {
                "what": {"identifier": ident},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
            }
        )
    if row["study_uid"]:
        event["entity"].append(
            {
                "what": {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{row['study_uid']}"}},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "3"},
            }
        )
    if row["entity"]:
        event["entity"].append(
            {
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24"},
                "description": row["entity"],
            }
        )
    if not event["entity"]:
        del event["entity"]
    return event


def searchset(
    *,
    base: str,
    total: int,
    rows: Iterable[dict[str, Any]],
    self_url: str,
    outcomes: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The searchset Bundle of AuditEvents: `self_url` the search as processed (FHIR search),
    `outcomes` entries after the matches (what a lenient search ignored)."""
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"{base}/AuditEvent/{r['seq']}", "resource": to_fhir(r), "search": {"mode": "match"}}
        for r in rows
    ]
    entries.extend(outcomes)
    out: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": [{"relation": "self", "url": self_url}],
    }
    if entries:  # FHIR JSON has no empty arrays
        out["entry"] = entries
    return out
