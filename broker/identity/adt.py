"""HL7 v2 ADT identity feed (IHE ITI-8): A01/A04/A08 register or update, A40 merges.

`handle_message` takes one decoded message and returns how to answer it: the outcome, AA when
applied, AE when the content is wrong (no assigning authority, impossible birth date, unknown
merge identifiers), AR when the message cannot be processed at all (unparseable; a message type,
version (MSH-12) or processing ID (MSH-11) this receiver does not take, as HL7 v2.5 2.9.2 has a
receiver check before it accepts a message); and the acknowledgements to send. Nothing is
applied unless the whole message is.

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
from collections.abc import Callable, Collection
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

# MSH-11.1, HL7 table 0103: P production, T training, D debugging. A receiver applies only a
# processing ID appropriate to it (v2.5 2.9.2); a broker is production unless
# SCANONCE_MLLP_PROCESSING_IDS says otherwise, so a test system's T messages never change its
# index. MSH-11.2, the processing mode (table 0207: archive, restore, initial load, current), is
# not read: each is applied alike.
DEFAULT_PROCESSING_IDS = ("P",)
# MSH-12.1: HL7 v2.1 and later (table 0104: 2.1, 2.2, 2.3, 2.3.1 ... 2.5.1 ... 2.8.2, 2.9), the
# field layout read here; later v2 versions only add at the end of segments and components
# (v2's backward compatibility rules), so a 2.x not yet released is read alike. Not 2.0 (1988,
# before the layout settled), not v3 or anything else.
_VERSION = re.compile(r"2\.[1-9][0-9]*(\.[0-9]+)?")


# HL7 table 0357 (message error condition codes): ERR-3 of a negative ACK.
SEGMENT_SEQUENCE = "100"
REQUIRED_FIELD = "101"
DATA_TYPE = "102"
TABLE_VALUE = "103"
UNSUPPORTED_TYPE = "200"
UNSUPPORTED_EVENT = "201"
UNSUPPORTED_PROCESSING_ID = "202"
UNSUPPORTED_VERSION = "203"
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
    UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    UNSUPPORTED_VERSION: "Unsupported version id",
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


# MSA-3 (text message, ST) is 80 characters long in HL7 v2.5; a receiver may cut or refuse more.
_MSA_TEXT_LENGTH = 80


def _bounded(text: str, limit: int = _MSA_TEXT_LENGTH) -> str:
    """`text` escaped for the ACK in at most `limit` characters, escape sequences counted (so it
    fits whichever way a receiver counts). A longer one is cut between characters, never inside
    an escape sequence, at the last space when that keeps more than half of it, and ends in
    "..." (ASCII: it survives any MSH-18 character set)."""
    escaped = [_escape(c) for c in text]
    if sum(map(len, escaped)) <= limit:
        return "".join(escaped)
    budget, kept, used = limit - 3, 0, 0
    while used + len(escaped[kept]) <= budget:
        used += len(escaped[kept])
        kept += 1
    space = text.rfind(" ", 0, kept + 1)  # text[kept] a space: cutting there ends a word
    if space > budget // 2:
        kept = space
    return "".join(escaped[:kept]).rstrip() + "..."


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
    # MSA-3 bounded (`_bounded`); ERR-8 (250 long) says it whole.
    segments = ["|".join(msh), "|".join(["MSA", code, control_id, _bounded(text)]).rstrip("|")]
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


def _ack(msg: Any, outcome: _Outcome, code: str, *, enhanced: bool) -> Ack:
    """The acknowledgement `code` of `outcome`: why in MSA-3 and ERR unless it is a success."""
    reason = ("", "", "") if code in ("AA", "CA") else (outcome.text, outcome.error, outcome.location)
    text, error, location = reason
    return _build_ack(code, text, msg, error, location=location, enhanced=enhanced)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What became of one readable message. `code`, `text`, `error`, `location` (ERL, the field
    to blame): as original mode says it. `accept`: the accept acknowledgement enhanced mode sends
    for it (HL7 table 0008): CA when it was taken (applied, or refused by the application for its
    content: the same message sent again would be refused again), CR when what its header says
    is refused (message type or event, version, processing ID; a message that cannot be
    parsed), CE when it was not taken for another reason: a block holding several messages or
    not framed as MLLP, or a failure on our side before anything was stored (sent again, alone,
    framed or later, it may be)."""

    code: str
    text: str = ""
    error: str = ""
    accept: str = "CA"
    location: str = ""


_CONDITION_FIELDS = {15: "accept acknowledgment type", 16: "application acknowledgment type"}


def _answer(msg: Any, outcome_of: Callable[[], _Outcome]) -> Reply:
    """Work out `msg`'s outcome (`outcome_of`, run only if the message asks for answers we can
    give) and answer it in the mode its MSH-15/16 ask for."""
    # Table 0155 codes are upper case; senders that write "al" or " AL" mean AL (receivers take
    # them so), so they are matched trimmed (`_get`) and in any case.
    accept_when, application_when = _get(msg, "MSH.F15").upper(), _get(msg, "MSH.F16").upper()
    if not (accept_when or application_when):
        outcome = outcome_of()
        return original(_ack(msg, outcome, outcome.code, enhanced=False))
    for field, value in ((15, accept_when), (16, application_when)):
        if value and value not in _CONDITIONS:
            # Which acknowledgements the sender wants is unknown, so it gets the one that says so.
            name = _CONDITION_FIELDS[field]
            said = _get(msg, f"MSH.F{field}")[:20]
            why = f"MSH-{field} {name} '{said}' is not AL, NE, ER or SU (HL7 table 0155)"
            cr = _build_ack("CR", why, msg, TABLE_VALUE, location=f"MSH^1^{field}", enhanced=True)
            return Reply(code="AR", acks=(cr,))
    outcome = outcome_of()
    acks = []
    # Both are sent once the message is applied: the broker has no store to accept into first, so
    # a CA sent earlier would promise what a failure to apply could break. An empty condition is NE:
    # a frame the sender did not ask for would be read as the answer to its next message.
    # A CA says only that the message was taken; what became of it is the application ack's.
    if _wanted(accept_when or "NE", success=outcome.accept == "CA"):
        acks.append(_ack(msg, outcome, outcome.accept, enhanced=True))
    if _wanted(application_when or "NE", success=outcome.code == "AA"):
        acks.append(_ack(msg, outcome, outcome.code, enhanced=True))
    return Reply(code=outcome.code, acks=tuple(acks))


def _segments(raw: str) -> str:
    """Segments end with CR; LF or CR LF (files, test tools) are read alike. MLLP framing left
    in (a <VT>, an <FS>) is not part of the message."""
    return raw.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x0b\x1c")


def _header(raw: str) -> Any:
    """The first segment of `raw` parsed alone if it is an MSH segment, else None: what a
    message the parser refuses (or a block the listener refuses) still says about itself."""
    first = _segments(raw).split("\r", 1)[0]
    try:
        header = hl7.parse(_decode_escapes(first))
        header.segment("MSH")
    except Exception:  # noqa: BLE001 - anything the parser chokes on is an unreadable header
        return None
    return header


def refuse(raw: str, code: str, text: str, error: str, *, accept: str) -> Reply:
    """The answer to what cannot be handled as a message (`code` AR or AE, `accept` CR or CE as
    `_Outcome` says, `error` from table 0357): `raw` is the decoded block, or what was read of it.

    When its MSH segment can be read, the answer is in the mode its MSH-15/16 ask for, with its
    control id: a sender in enhanced mode reads an original-mode ACK it did not ask for as the
    answer to its next message. When it cannot, there are no MSH-15/16 to read, and empty
    MSH-15/16 are original mode (HL7 v2.5 2.9.2): one ACK with no control id, what an
    original-mode sender waits for and an enhanced-mode one can at least log. Nothing is applied."""
    header = _header(raw)
    if header is None:
        return original(nak(code, text, error))
    return _answer(header, lambda: _Outcome(code, text, error, accept=accept))


def handle_message(
    *,
    engine: Engine,
    raw: str,
    principal: Principal,
    processing_ids: Collection[str] = DEFAULT_PROCESSING_IDS,
) -> Reply:
    """Apply one ADT message; return how to answer it (never raises for bad input). A message
    whose MSH-11 is not in `processing_ids` (table 0103) is refused, not applied."""
    authorize(principal, action="identity.feed", facility=principal.facility)
    text = _segments(raw)
    try:
        msg = hl7.parse(_decode_escapes(text))
        msg.segment("MSH")
    except Exception:  # noqa: BLE001 - anything the parser chokes on is an unparseable message
        # Its MSH segment alone may still be readable (an empty line between two segments is
        # enough to make the parser give up): then it is answered in the mode it asks for.
        return refuse(text, "AR", "message could not be parsed as HL7 v2", SEGMENT_SEQUENCE, accept="CR")
    return _answer(
        msg, lambda: _apply(engine=engine, msg=msg, principal=principal, processing_ids=processing_ids)
    )


def _refused_header(msg: Any, processing_ids: Collection[str]) -> _Outcome | None:
    """What HL7 v2.5 2.9.2 has a receiver check before it accepts a message, in its order: the
    message type (MSH-9), the version (MSH-12), the processing ID (MSH-11). A failure is a
    reject: AR, CR in enhanced mode (2.9.3). None: all taken."""
    msg_type, event = _get(msg, "MSH.F9.R1.C1"), _get(msg, "MSH.F9.R1.C2")
    if msg_type != "ADT" or event not in SUPPORTED:
        error = UNSUPPORTED_TYPE if msg_type != "ADT" else UNSUPPORTED_EVENT
        return _Outcome("AR", f"unsupported message type {msg_type}^{event}"[:80], error, accept="CR")
    version = _get(msg, "MSH.F12.R1.C1")
    if not _VERSION.fullmatch(version):
        # Empty: a required field missing (every v2 version requires it), else one we do not read.
        why = (
            f"MSH-12 version ID '{version[:20]}' is not HL7 v2.1 or later"
            if version
            else "MSH-12 version ID is empty"
        )
        error = UNSUPPORTED_VERSION if version else REQUIRED_FIELD
        return _Outcome("AR", why, error, accept="CR", location="MSH^1^12")
    processing = _get(msg, "MSH.F11.R1.C1")
    if processing.upper() not in processing_ids:  # "p" is P, as "al" is AL
        taken = ", ".join(sorted(processing_ids))
        said = processing[:20]
        why = (
            f"MSH-11 processing ID '{said}' is not processed here ({taken})"
            if said
            else "MSH-11 processing ID is empty"
        )
        error = UNSUPPORTED_PROCESSING_ID if said else REQUIRED_FIELD
        return _Outcome("AR", why, error, accept="CR", location="MSH^1^11")
    return None


def _apply(*, engine: Engine, msg: Any, principal: Principal, processing_ids: Collection[str]) -> _Outcome:
    control_id = _get(msg, "MSH.F10")
    if len(msg.segments("MSH")) > 1:
        # One ACK cannot acknowledge two messages: the sender would take AA for both.
        several = "an MLLP block carries one message; this one holds several"
        return _Outcome("AR", several, SEGMENT_SEQUENCE, accept="CE")
    if refused := _refused_header(msg, processing_ids):
        return refused
    event = _get(msg, "MSH.F9.R1.C2")
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
