"""HL7 v2 ADT identity feed (IHE ITI-8): A01/A04/A08 register or update, A40 merges.

`handle_message` takes one decoded message and returns how to answer it: the outcome, AA when
applied, AE when the content is wrong (no assigning authority, impossible birth date, unknown
merge identifiers), AR when the message cannot be processed at all (unparseable, unsupported
type); and the acknowledgements to send. Nothing is applied unless the whole message is.

Which acknowledgements are sent is the sender's choice (HL7 v2.5 2.9): with MSH-15 and MSH-16
both empty, original mode, one ACK carrying the outcome; otherwise enhanced mode, an accept
acknowledgement (CA, CE, CR) when MSH-15's condition holds, then an application acknowledgement
(AA, AE, AR) when MSH-16's does, possibly neither.
"""

from __future__ import annotations

import logging
import re
import traceback
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import hl7
from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.errors import BadRequest, Conflict, NotFound, ScanOnceError
from broker.facilities import service as facilities
from broker.identity import matching, service
from broker.identity.schemas import Identifier
from broker.security.schemas import Principal, Role
from broker.security.service import authorize

log = logging.getLogger("scanonce.identity.adt")

SUPPORTED = ("A01", "A04", "A08", "A40")
_MAX_REPS = 20


# HL7 table 0357 (message error condition codes): ERR-3 of a negative ACK.
SEGMENT_SEQUENCE = "100"
REQUIRED_FIELD = "101"
DATA_TYPE = "102"
TABLE_VALUE = "103"
UNSUPPORTED_TYPE = "200"
UNSUPPORTED_EVENT = "201"
UNKNOWN_KEY = "204"
RECORD_LOCKED = "206"
INTERNAL = "207"
_ERROR_NAMES = {
    SEGMENT_SEQUENCE: "Segment sequence error",
    REQUIRED_FIELD: "Required field missing",
    DATA_TYPE: "Data type error",
    TABLE_VALUE: "Table value not found",
    UNSUPPORTED_TYPE: "Unsupported message type",
    UNSUPPORTED_EVENT: "Unsupported event code",
    UNKNOWN_KEY: "Unknown key identifier",
    RECORD_LOCKED: "Application record locked",
    INTERNAL: "Application internal error",
}


class MessageError(BadRequest):
    """Wrong message content, with the table 0357 code its ACK's ERR-3 carries."""

    def __init__(self, message: str, *, hl7_code: str) -> None:
        super().__init__(message)
        self.hl7_code = hl7_code


def _hl7_code(exc: ScanOnceError) -> str:
    if isinstance(exc, MessageError):
        return exc.hl7_code
    if isinstance(exc, NotFound):
        return UNKNOWN_KEY  # a merge naming an identifier the index does not hold
    if isinstance(exc, Conflict):
        return RECORD_LOCKED  # a move that lost its race: sending again succeeds
    if isinstance(exc, BadRequest):
        return DATA_TYPE  # a value the index cannot take (an identifier over 128 characters)
    return INTERNAL


@dataclass(frozen=True, slots=True)
class Ack:
    code: str  # AA | AE | AR; in enhanced mode also the accept acknowledgement's CA | CE | CR
    text: str
    message: str  # the ACK message, HL7 ER7 with \r segment separators


@dataclass(frozen=True, slots=True)
class Reply:
    """How one message is answered. `code` is its outcome as original mode says it (AA, AE, AR:
    what metrics count, whatever is sent); `acks` the acknowledgements to send, in order: one in
    original mode, none to two in enhanced mode."""

    code: str
    acks: tuple[Ack, ...]


def original(ack: Ack) -> Reply:
    """The reply of one original-mode ACK: for what is too broken to say which mode it asks for."""
    return Reply(code=ack.code, acks=(ack,))


# HL7 table 0155: when an acknowledgement is sent. Read from MSH-15 (accept) and MSH-16
# (application); enhanced mode takes an empty one as NE (see `handle_message`).
_CONDITIONS = ("AL", "NE", "ER", "SU")


def _wanted(condition: str, *, success: bool) -> bool:
    return condition == "AL" or condition == ("SU" if success else "ER")


def _get(msg: Any, path: str) -> str:
    try:
        return str(msg[path] or "").strip()
    except (KeyError, IndexError, ValueError, AttributeError):
        return ""


# The delimiter escapes (HL7 v2.5 2.7.4), left for the hl7 library to resolve once parsed.
_DELIMITER_ESCAPES = frozenset("FSTRE")
# Highlighting (2.7.3) and formatting (2.7.6): a space at most in a name or an address.
_FORMATTING = re.compile(r"[HN]|\.(br|fi|nf|sk|ce|(sp|in|ti)[+-]?\d*)")
_HEX = re.compile(r"X((?:[0-9A-Fa-f]{2})+)")


# MSH-18 (HL7 table 0211) -> Python codec, for the character sets a sender may declare whose
# header is still ASCII (so MSH-18 can be read before the message is decoded).
_CODECS = {"ASCII": "ascii", "UNICODE UTF-8": "utf-8", "GB 18030-2000": "gb18030", "KS X 1001": "euc_kr"}
_CODECS |= {"BIG-5": "big5", "ISO IR87": "iso2022_jp", "ISO IR159": "iso2022_jp_2", "ISO IR6": "ascii"}
_CODECS |= {f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16)}


def declared_codec(header: str) -> str:
    """The codec MSH-18 of this MSH segment names ("" when none, or one we do not know)."""
    fields = header.split("\r", 1)[0].split(header[3]) if len(header) > 3 else []
    declared = fields[17] if len(fields) > 17 else ""
    # A repeated MSH-18 names the default set first; a component names it first too.
    return _CODECS.get(declared.split("~")[0].split("^")[0].strip().upper(), "")


def decode_text(data: bytes, codec: str) -> str:
    """Bytes of a message (or of a \\X..\\ escape) as text, `codec` being what MSH-18 declares.

    A single-byte declaration (ASCII, ISO 8859) comes after UTF-8: senders often declare 8859/1
    and send UTF-8, and valid multi-byte UTF-8 is next to impossible in real 8859 text (Ã then a
    symbol). A multi-byte one (GB 18030, Big5, ...) comes first: its pairs can be valid UTF-8.
    Latin-1, HL7 v2's traditional default, takes whatever is left."""
    single_byte = codec in ("", "ascii") or codec.startswith("iso8859-")
    order = ("utf-8", codec) if single_byte else (codec, "utf-8")
    for name in order:
        if not name:
            continue
        try:
            return data.decode(name)
        except (UnicodeDecodeError, LookupError):
            continue
    return data.decode("latin-1")


def _decode_escapes(raw: str) -> str:
    """Resolve what the `hl7` library would get wrong or log before it parses the message.

    The library reads \\X..\\ bytes one per character (Latin-1), so a UTF-8 MÜLLER came out as
    MÃ¼LLER; for an escape it does not know (an empty one, a character-set switch, bad hex)
    it logs the whole field, a patient's name or address; highlighting became "_". Hex bytes are
    decoded here (`decode_text`: MSH-18's character set or UTF-8) and written back as text,
    highlighting dropped, formatting made a space, anything else dropped (as the library drops
    it, but silently). Escapes never span a delimiter, so this works on the raw text, from MSH-3
    on (MSH-2 holds the escape character itself)."""
    if not raw.startswith("MSH") or len(raw) < 8:
        return raw
    sep = raw[3]
    end = raw.find(sep, 4)
    encoding = raw[4:end] if end > 0 else ""
    if len(encoding) < 3:
        return raw
    comp, rep_, esc = encoding[0], encoding[1], encoding[2]
    sub = encoding[3] if len(encoding) > 3 else ""
    names = {sep: "F", comp: "S", rep_: "R", esc: "E"} | ({sub: "T"} if sub else {})
    stops = "".join(re.escape(c) for c in (sep, comp, rep_, esc, sub, "\r") if c)
    pattern = re.compile(f"{re.escape(esc)}([^{stops}]*){re.escape(esc)}")
    codec = declared_codec(raw)

    def resolve(m: re.Match[str]) -> str:
        value = m.group(1)
        if value in _DELIMITER_ESCAPES:
            return m.group(0)
        if _FORMATTING.fullmatch(value):
            return "" if value in ("H", "N") else " "
        if hexed := _HEX.fullmatch(value):
            text = decode_text(bytes.fromhex(hexed.group(1)), codec)
            # Delimiters the bytes spell stay data: escaped again, for the library to resolve.
            return "".join(f"{esc}{names[c]}{esc}" if c in names else (c if c >= " " else " ") for c in text)
        return ""

    head = end + 1
    return raw[:head] + pattern.sub(resolve, raw[head:])


def _issuer_for(msg: Any, cx_path: str, known: dict[str, str]) -> str:
    """CX.4 assigning authority (namespace or universal id), else the sending facility's issuer."""
    for sub in (1, 2):
        value = _get(msg, f"{cx_path}.C4.S{sub}")
        if value:
            return known.get(value, value)
    return known.get(_get(msg, "MSH.F4.R1.C1"), "")


def _identifiers(msg: Any, seg: str, field: int, known: dict[str, str]) -> list[Identifier]:
    out: list[Identifier] = []
    for rep in range(1, _MAX_REPS + 1):
        path = f"{seg}.F{field}.R{rep}"
        value = _get(msg, f"{path}.C1")
        if not value:
            continue  # an empty repetition (or none): later ones may still hold identifiers
        issuer = _issuer_for(msg, path, known)
        if any(c < " " or c == "\x7f" for c in issuer + value):
            # No HL7 ST value holds one; PostgreSQL would refuse a NUL where SQLite kept it.
            raise MessageError(
                f"{seg}-{field} identifier must not contain control characters", hl7_code=DATA_TYPE
            )
        if not issuer:
            raise MessageError(
                f"{seg}-{field} identifier has no assigning authority and the sending facility is unknown",
                hl7_code=REQUIRED_FIELD,
            )
        out.append(Identifier(issuer=issuer, value=value))
    return out


# HL7 table 4000 (name representation code, XPN.8): I ideographic and P phonetic names are the
# record's other names, as a PatientName's Ideographic and Phonetic groups are, and are stored
# in the representation a FHIR read shows them in (ISO 21090 IDE, SYL).
_OTHER_REPRESENTATIONS = {"I": matching.IDEOGRAPHIC, "P": matching.PHONETIC}


def _names(msg: Any) -> tuple[str, tuple[matching.OtherName, ...] | None]:
    """The PID-5 repetition that is the record's name (the first whose XPN.8 is A or empty; else
    the first, as a PatientName with no Alphabetic group is read from its others), and the I
    and P repetitions, normalised; None when there are none, so that a feed that never sends
    them keeps what a DICOM header supplied. A repetition with a code not in table 4000, or an
    I/P one without family and given, is neither."""
    # Only repetitions that are there: a missing one reads as an empty code, which is "A or empty".
    reps = [p for p in (f"PID.F5.R{rep}" for rep in range(1, _MAX_REPS + 1)) if _get(msg, p)] or ["PID.F5.R1"]
    codes = [_get(msg, f"{path}.C8").upper() for path in reps]
    name = next((path for path, code in zip(reps, codes, strict=True) if code in ("", "A")), reps[0])
    others: list[matching.OtherName] = []
    for path, code in zip(reps, codes, strict=True):
        if code not in _OTHER_REPRESENTATIONS:
            continue
        family = matching.normalize_name_part(_get(msg, f"{path}.C1.S1") or _get(msg, f"{path}.C1"))
        given = matching.normalize_name_part(_get(msg, f"{path}.C2"))
        matching.add_other_name(others, matching.OtherName(family, given, _OTHER_REPRESENTATIONS[code]))
    return name, tuple(others) or None


def _demographics(msg: Any, name: str) -> matching.Demographics:
    raw_dob = _get(msg, "PID.F7.R1.C1")[:8]
    if len(raw_dob) in (4, 6) and raw_dob.isdigit():
        # Precision to the year or month (HL7 DT): real if its first day is; matched as unknown,
        # since a guessed day would count as a disagreement with the true one.
        if not matching.normalize_date(f"{raw_dob[:4]}{raw_dob[4:6] or '01'}01"):
            raise MessageError("PID-7 birth date is not a real past date", hl7_code=DATA_TYPE)
        raw_dob = ""
    dob = matching.normalize_date(raw_dob)
    if raw_dob and not dob:
        raise MessageError("PID-7 birth date is not a real past date", hl7_code=DATA_TYPE)
    address = " ".join(
        _get(msg, f"PID.F11.R1.C{c}") for c in (1, 2, 3, 4, 5) if _get(msg, f"PID.F11.R1.C{c}")
    )
    phone = _get(msg, "PID.F13.R1.C1") or _get(msg, "PID.F13.R1.C12")
    return matching.demographics(
        family=_get(msg, f"{name}.C1.S1") or _get(msg, f"{name}.C1"),
        given=_get(msg, f"{name}.C2"),
        middle=_get(msg, f"{name}.C3"),
        birth_date=dob,
        sex=_get(msg, "PID.F8"),
        address=address,
        phone=phone,
    )


def _known_issuers(session: Session) -> dict[str, str]:
    """Facility ids and issuers -> issuer, so MSH-4 or CX.4 may name either."""
    known: dict[str, str] = {}
    for fid, issuer in facilities.issuers(session=session).items():
        known[fid] = issuer
        known[issuer] = issuer
    return known


def feed_principal(*, facility: str) -> Principal:
    """Who an HL7 v2 feed acts as: recorded as "hl7" with the links it makes, for the facility
    whose registration system sends it."""
    return Principal(who="hl7", role=Role.facility, facility=facility)


# The ACK is written with the standard delimiters whatever the sender used (MSH-1/MSH-2 say
# which), so every value copied into it is escaped against those.
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def _escape(value: str) -> str:
    for char, escape in _ESCAPES:
        value = value.replace(char, escape)
    # Control characters (a segment separator, MLLP's <VT>/<FS>) would break the ACK's framing.
    return "".join(c if c >= " " else " " for c in value)


def _build_ack(
    code: str, text: str, msg: Any = None, error: str = "", *, location: str = "", enhanced: bool = False
) -> Ack:
    """The ACK for `msg` (None: too broken to read): built by hand, because the `hl7` library's
    `create_ack` fails on a header that stops early or has no trigger event, and copies the
    sender's delimiters and values unescaped. A negative ACK carries ERR with `error` (table
    0357; 207 if not given), `location` (ERL, as `MSH^1^15`) when one field is to blame,
    severity E and the text again in ERR-8. An `enhanced` mode ACK says in MSH-15/16 that it
    wants no acknowledgement back (an acknowledgement is never acknowledged)."""

    def hd(field: int) -> str:
        parts = [_escape(_get(msg, f"MSH.F{field}.R1.C{c}")) for c in (1, 2, 3)] if msg is not None else []
        return "^".join(parts).rstrip("^")

    control_id = _escape(_get(msg, "MSH.F10")) if msg is not None else ""
    event = _escape(_get(msg, "MSH.F9.R1.C2")) if msg is not None else ""
    processing = (_escape(_get(msg, "MSH.F11.R1.C1")) if msg is not None else "") or "P"
    version = (_escape(_get(msg, "MSH.F12.R1.C1")) if msg is not None else "") or "2.5"
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    msh = [
        "MSH", "^~\\&", "SCANONCE", hd(6), hd(3), hd(4), stamp, "",
        f"ACK^{event}^ACK" if event else "ACK", f"ACK{uuid.uuid4().hex[:16].upper()}", processing, version,
    ]  # fmt: skip
    charset = _get(msg, "MSH.F18.R1.C1").strip() if msg is not None else ""
    tail = ["", "", "NE", "NE"] if enhanced else []  # MSH-13 .. MSH-16
    if _CODECS.get(charset.upper()):
        # MSH-18: the ACK is written in the set the message declared (broker.identity.mllp).
        tail = (tail or ["", "", "", ""]) + ["", _escape(charset)]
    msh += tail
    segments = ["|".join(msh), "|".join(["MSA", code, control_id, _escape(text)]).rstrip("|")]
    if code not in ("AA", "CA"):
        error = error or INTERNAL
        name = _ERROR_NAMES[error]
        # ERR-1 is where v2.3/2.4 receivers look (error code and location, the code in its
        # fourth component); ERR-3 and ERR-4 are v2.5's. Both, whatever version the sender speaks.
        eld = f"{location or '^^'}^{error}&{name}&HL70357"
        segments.append(f"ERR|{eld}|{location}|{error}^{name}^HL70357|E||||{_escape(text)}")
    return Ack(code=code, text=text, message="\r".join(segments) + "\r")


def nak(code: str, text: str, error: str = INTERNAL) -> Ack:
    """An ACK for messages (or MLLP blocks) too broken to build one from."""
    return _build_ack(code, text, error=error)


def _ack(msg: Any, code: str, text: str = "", error: str = "", *, enhanced: bool = False) -> Ack:
    return _build_ack(code, text, msg, error, enhanced=enhanced)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What became of one readable message. `code`, `text`, `error`: as original mode says it.
    `accept`: the accept acknowledgement enhanced mode sends for it (HL7 table 0008): CA when it
    was taken (applied, or refused by the application for its content: the same message sent
    again would be refused again), CR when what its header says is refused (message type or
    event), CE when it was not taken for another reason: a block holding several messages, or a
    failure on our side before anything was stored (sent again, alone or later, it may be)."""

    code: str
    text: str = ""
    error: str = ""
    accept: str = "CA"


_CONDITION_FIELDS = {15: "accept acknowledgment type", 16: "application acknowledgment type"}


def handle_message(*, engine: Engine, raw: str, principal: Principal) -> Reply:
    """Apply one ADT message; return how to answer it (never raises for bad input)."""
    authorize(principal, action="identity.feed", facility=principal.facility)
    try:
        # Segments end with CR; LF or CR LF (files, test tools) are read alike.
        text = raw.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x0b\x1c")
        msg = hl7.parse(_decode_escapes(text))
        msg.segment("MSH")
    except Exception:  # noqa: BLE001 - anything the parser chokes on is an unparseable message
        # Its MSH-15/16 cannot be read either: original mode is all that is left.
        return original(nak("AR", "message could not be parsed as HL7 v2", SEGMENT_SEQUENCE))
    accept_when, application_when = _get(msg, "MSH.F15"), _get(msg, "MSH.F16")
    if not (accept_when or application_when):
        outcome = _apply(engine=engine, msg=msg, principal=principal)
        return original(_ack(msg, outcome.code, outcome.text, outcome.error))
    for field, value in ((15, accept_when), (16, application_when)):
        if value and value not in _CONDITIONS:
            # Which acknowledgements the sender wants is unknown, so it gets the one that says so.
            name = _CONDITION_FIELDS[field]
            why = f"MSH-{field} {name} '{value[:20]}' is not AL, NE, ER or SU (HL7 table 0155)"
            cr = _build_ack("CR", why, msg, TABLE_VALUE, location=f"MSH^1^{field}", enhanced=True)
            return Reply(code="AR", acks=(cr,))
    outcome = _apply(engine=engine, msg=msg, principal=principal)
    acks = []
    # Both are sent once the message is applied: the broker has no store to accept into first, so
    # a CA sent earlier would promise what a failure to apply could break. An empty condition is NE:
    # a frame the sender did not ask for would be read as the answer to its next message.
    taken = outcome.accept == "CA"
    if _wanted(accept_when or "NE", success=taken):
        # A CA says only that the message was taken; what became of it is the application ack's.
        reason = ("", "") if taken else (outcome.text, outcome.error)
        acks.append(_ack(msg, outcome.accept, *reason, enhanced=True))
    if _wanted(application_when or "NE", success=outcome.code == "AA"):
        acks.append(_ack(msg, outcome.code, outcome.text, outcome.error, enhanced=True))
    return Reply(code=outcome.code, acks=tuple(acks))


def _apply(*, engine: Engine, msg: Any, principal: Principal) -> _Outcome:
    control_id = _get(msg, "MSH.F10")
    if len(msg.segments("MSH")) > 1:
        # One ACK cannot acknowledge two messages: the sender would take AA for both.
        several = "an MLLP block carries one message; this one holds several"
        return _Outcome("AR", several, SEGMENT_SEQUENCE, accept="CE")
    msg_type, event = _get(msg, "MSH.F9.R1.C1"), _get(msg, "MSH.F9.R1.C2")
    if msg_type != "ADT" or event not in SUPPORTED:
        error = UNSUPPORTED_TYPE if msg_type != "ADT" else UNSUPPORTED_EVENT
        return _Outcome("AR", f"unsupported message type {msg_type}^{event}"[:80], error, accept="CR")
    try:
        msg.segment("PID")
    except KeyError:
        return _Outcome("AE", "PID segment missing", SEGMENT_SEQUENCE)
    try:
        with Session(engine, expire_on_commit=False) as session:
            known = _known_issuers(session)
            ids = _identifiers(msg, "PID", 3, known)
            if not ids:
                raise MessageError("PID-3 carries no patient identifier", hl7_code=REQUIRED_FIELD)
            if event == "A40":
                prior = _identifiers(msg, "MRG", 1, known)
                if not prior:
                    raise MessageError("A40 needs MRG-1 (prior patient identifier)", hl7_code=REQUIRED_FIELD)
                service.merge(
                    session=session,
                    principal=principal,
                    survivor=ids[0],
                    merged=prior[0],
                    why=f"ADT^A40 {''.join(c if c >= ' ' else ' ' for c in control_id)}",
                )
            else:
                name, other_names = _names(msg)
                service.upsert_record(
                    session=session,
                    identifier=ids[0],
                    demographics=_demographics(msg, name),
                    identifiers=ids[1:],
                    source="hl7",
                    principal=principal,
                    other_names=other_names,
                )
                session.commit()
    except ScanOnceError as exc:
        return _Outcome("AE", exc.message[:200], _hl7_code(exc))
    except Exception as exc:
        # Not the exception's text: a database error quotes the row (a patient's identifiers).
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        # The control id is the sender's text: bounded, and repr() so no escape reaches a terminal.
        log.error(
            "ADT message %r failed: %s at %s:%s",
            control_id[:64],
            type(exc).__name__,
            frame.filename,
            frame.lineno,
        )
        return _Outcome("AE", "internal error while applying the message", INTERNAL, accept="CE")
    return _Outcome("AA")
