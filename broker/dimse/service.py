"""DIMSE logic without the network: who a calling AE is, where a C-MOVE goes, what a C-FIND
identifier asks, and how ingest outcomes become C-STORE statuses.

The SCP (`broker.dimse.scp`) is a thin layer of pynetdicom handlers over these functions, so the
rules are testable without an association and shared with the SCU where they overlap.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from botocore.exceptions import BotoCoreError, ClientError
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import VR
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from broker.dicom import status as st
from broker.dicom.uids import is_valid_uid
from broker.errors import ScanOnceError, Unavailable
from broker.facilities import service as facilities
from broker.security import network, tls
from storage import ObjectStore, StoreUnavailable

# -- statuses (PS3.4 B.2.3 storage, C.4.1.1.4 find, C.4.2.1.5 move, C.4.3.1.4 get) ----------------

log = logging.getLogger("scanonce.dimse")

SUCCESS = 0x0000
PENDING = 0xFF00
# C-FIND: matches continue, but some optional keys were not supported for matching (ignored).
PENDING_KEYS_UNSUPPORTED = 0xFF01
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000
# Our own sub-code in the 0xC000-0xCFFF "unable to process" range, for failures on our side
# (database or object store down) so a peer's log tells them apart from a bad request.
PROCESSING_FAILURE = 0xC001
MOVE_DESTINATION_UNKNOWN = 0xA801
UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702
SUBOPERATIONS_WITH_FAILURES = 0xB000

# C-STORE failure statuses a peer understands (PS3.4 B.2.3 plus the PS3.7 C.4 general codes that
# PS3.4 lists for C-STORE); a FailureReason outside these is reported as "cannot understand".
_CSTORE_FAILURES = (
    range(0xA700, 0xA800),
    range(0xA900, 0xAA00),
    range(0xC000, 0xD000),
    (0x0117, 0x0122, 0x0124, 0x0210, 0x0211, 0x0212),
)

# PS3.4 C.6.1.1.2 / C.6.2.1.2: levels of each information model, top down.
PATIENT_ROOT_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
STUDY_ROOT_LEVELS = ("STUDY", "SERIES", "IMAGE")
_LEVEL_TO_QUERY: dict[str, Literal["patient", "study", "series", "instance"]] = {
    "PATIENT": "patient",
    "STUDY": "study",
    "SERIES": "series",
    "IMAGE": "instance",
}
# Elements of the identifier that are about the query, not attributes to match or return.
_CONTROL_KEYWORDS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet"})
# TimezoneOffsetFromUTC is no matching key (the index matches dates and times as each study
# recorded them: Timezone query adjustment is not negotiated) but a response says the zone its
# times are in, which is its study's own offset (PS3.4 C.4.1.1.3.2).
_TIMEZONE_OFFSET = 0x00080201
_TIME_VRS = frozenset({"DA", "DT", "TM"})
ERROR_COMMENT_MAX = 64  # ErrorComment is LO
_LOOPBACK = network.networks(network.LOOPBACK)
_RETRIEVE_AE_TITLE = 0x00080054


class IdentifierError(Exception):
    """The identifier cannot be answered; `status` is the DIMSE status to return."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:ERROR_COMMENT_MAX]


def status_dataset(status: int, comment: str | None = None) -> Dataset:
    """A status Dataset for pynetdicom, with an ErrorComment (LO, so at most 64 chars)."""
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:ERROR_COMMENT_MAX]
    return ds


# -- C-STORE ---------------------------------------------------------------------------------


def cstore_status(outcome: Any) -> tuple[int, str | None]:
    """Map an ingest `StoreOutcome` to a C-STORE status and ErrorComment.

    A duplicate (same SOP Instance UID, same bytes) is Success 0x0000: PS3.4 B.2.3 has no
    "already stored" status (0x0111 Duplicate SOP Instance is a PS3.7 N-CREATE status that
    storage SCUs such as dcmtk's storescu and most PACS treat as a failure and retry), and the
    object *is* stored, so re-sending a study after an interrupted transfer must succeed.
    Anything else that failed (including a conflicting copy, kept apart for review) is a
    failure with the index's reason when it is a C-STORE status, else 0xC000.
    """
    if outcome.status in ("stored", "duplicate"):
        return SUCCESS, None
    reason = outcome.failure_reason
    if reason == st.DUPLICATE_SOP_INSTANCE:
        # 0x0111 is not a C-STORE status; say what happened within ErrorComment's 64 chars.
        return st.CANNOT_UNDERSTAND, "conflict: SOP Instance UID stored with other content"
    if reason is None or not any(reason in r for r in _CSTORE_FAILURES):
        reason = st.CANNOT_UNDERSTAND
    return int(reason), outcome.message or "Failed"


class StoreRefused(Exception):
    """A C-STORE failure status decided in the index writer's process, sent back to the receiver
    that holds the association (`broker.dimse.handoff`): it pickles where a driver's or botocore's
    exception may not, and carries the status and comment, never the original message."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(status, comment)
        self.status = status
        self.comment = comment


def store_failure(exc: BaseException) -> tuple[int, str]:
    """The C-STORE status and ErrorComment (PS3.4 B.2.3) for an ingest that raised `exc`, logged
    once where it happened. A dependency down (database, object store, index writer) or a full
    disk is 0xA700, worth a retry later; a refusal of the instance itself 0xC000 with the reason;
    anything unexpected 0xC001. Driver and botocore messages can quote SQL parameters (patient
    data), so only their type is logged."""
    if isinstance(exc, StoreRefused):
        return exc.status, exc.comment  # logged by the writer that decided it
    if isinstance(exc, (Unavailable, StoreUnavailable)):
        log.warning("C-STORE refused, a dependency is unavailable: %s", exc.message)
        return OUT_OF_RESOURCES, "storage temporarily unavailable"
    if isinstance(exc, ScanOnceError):
        return UNABLE_TO_PROCESS, exc.message
    if isinstance(exc, OSError):
        log.error("C-STORE refused, out of resources: %s", exc.strerror)
        return OUT_OF_RESOURCES, "out of resources"
    if isinstance(exc, (SQLAlchemyError, BotoCoreError, ClientError)):
        log.error("C-STORE refused, storage failed: %s", type(exc).__name__)
        return OUT_OF_RESOURCES, "storage temporarily unavailable"
    log.error("C-STORE failed: %s", type(exc).__name__)
    return PROCESSING_FAILURE, "processing failure"


# -- peers: calling AEs and move destinations -------------------------------------------------


@dataclass
class DimsePeers:
    """AE titles known to this node besides the facility registry's.

    `calling` maps a calling AE title to the facility it sends for (accepted from loopback only:
    this table has no networks); `destinations` maps a C-MOVE destination AE title to (host,
    port) (e.g. a workstation that is not a facility; only within the outbound networks). Both
    are consulted after the registry (see `facility_for_calling_ae` / `move_destination`).
    Thread-safe: associations run in their own threads.
    """

    calling: dict[str, str] = field(default_factory=dict)
    destinations: dict[str, tuple[str, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_calling(self, ae_title: str, facility_id: str) -> None:
        with self._lock:
            self.calling[ae_title.strip()] = facility_id

    def add_destination(self, ae_title: str, host: str, port: int) -> None:
        with self._lock:
            self.destinations[ae_title.strip()] = (host, int(port))

    def snapshot(self) -> tuple[dict[str, str], dict[str, tuple[str, int]]]:
        with self._lock:
            return dict(self.calling), dict(self.destinations)


def facility_for_calling_ae(
    *,
    engine: Engine,
    peers: DimsePeers,
    calling_ae: str,
    address: str,
    default_facility: str,
    open_mode: bool,
    certificate: tls.PeerCertificate | None = None,
) -> str | None:
    """The facility a calling AE sends for, calling from peer `address` (with the TLS client
    `certificate` it presented, if any): the facility registry's calling AE titles (each from
    its network, with its bound certificate), then the in-process table (loopback only), then
    (open mode only) the default facility; None means refuse it."""
    calling_ae = calling_ae.strip()
    with Session(engine) as session:
        facility = facilities.facility_for_calling_ae(
            session=session, ae_title=calling_ae, address=address, certificate=certificate
        )
    if facility is not None:
        return facility.id
    found = peers.snapshot()[0].get(calling_ae)
    if found is not None and not network.address_in(address, _LOOPBACK):
        found = None
    if found is None and open_mode:
        found = default_facility
    return found


def move_destination(*, engine: Engine, peers: DimsePeers, ae_title: str) -> tuple[str, int] | None:
    """(host, port) of a C-MOVE destination: a registered facility's archive AE title, else the
    in-process table; None if unknown."""
    ae_title = ae_title.strip()
    if not ae_title:
        return None
    found: tuple[str, int] | None = None
    with Session(engine) as session:
        for facility in facilities.list_facilities(session=session):
            if facility.ae_title == ae_title and facility.host and facility.port:
                found = facility.host, int(facility.port)
                break
    found = found or peers.snapshot()[1].get(ae_title)
    if found is None:
        return None
    # The broker connects there for the caller: only within the outbound networks, to the
    # address checked now (a name that resolves elsewhere is refused as unknown, 0xA801).
    try:
        return network.check_host(*found, network.outbound_networks(), what=ae_title), found[1]
    except ScanOnceError:
        return None


# -- C-FIND / C-MOVE / C-GET identifiers ------------------------------------------------------


@dataclass
class FindRequest:
    level: str  # "PATIENT" | "STUDY" | "SERIES" | "IMAGE"
    query_level: Literal["patient", "study", "series", "instance"]
    filters: dict[str, str]
    # Every requested attribute, in identifier order; then TimezoneOffsetFromUTC, unasked, when
    # a requested one is a date or time (their zone belongs with them).
    return_keys: list[BaseTag]
    study_uid: str | None
    series_uid: str | None
    # Keys with a match value the SCP does not match on (sequence matching): answered FF01.
    unmatched: list[str] = field(default_factory=list)


def _has_match_value(items: Iterable[Dataset]) -> bool:
    """Whether a sequence key asks for sequence matching (PS3.4 C.2.2.2.6): an item holds a
    value. Items of empty keys only name what to return."""
    for item in items:
        for elem in item:
            if elem.keyword == "SpecificCharacterSet":
                continue
            if elem.VR == "SQ" and _has_match_value(elem.value):
                return True
            if elem.VR != "SQ" and not elem.is_empty:
                return True
    return False


def _match_string(elem: DataElement) -> str:
    value = elem.value
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        raise IdentifierError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{elem.keyword} cannot be matched")
    return str(value)


def parse_identifier(identifier: Dataset, *, levels: tuple[str, ...]) -> FindRequest:
    """Turn a C-FIND/C-MOVE/C-GET identifier into a query on the index.

    Raises IdentifierError(0xA900) for a missing or foreign QueryRetrieveLevel, command or
    file-meta tags, or a malformed unique key (data set group lengths are skipped);
    value syntax is left to the index's matching rules (the same as QIDO-RS), whose BadRequest
    the SCP reports as 0xC000.
    Private tags are neither matched nor returned (PS3.4 C.4.1.1.3.1 lets an SCP ignore keys it
    does not support). Sequence keys are return keys only: sequence matching is not supported,
    and a sequence key with a match value is listed in `unmatched` (the SCP answers FF01), as
    is a tag missing from the data dictionary that has a value (neither matched nor returned).
    """
    level_elem = identifier.get("QueryRetrieveLevel")
    level = str(level_elem).strip().upper() if level_elem is not None else ""
    if level not in levels:
        allowed = "/".join(levels)
        raise IdentifierError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"QueryRetrieveLevel must be {allowed}")
    filters: dict[str, str] = {}
    return_keys: list[BaseTag] = []
    unmatched: list[str] = []
    for elem in identifier:
        tag = elem.tag
        if tag.is_private:
            continue
        if tag.element == 0x0000 and tag.group not in (0x0000, 0x0002):
            continue  # a data set's Group Length, retired (PS3.5 7.2) but still sent: no key
        if tag.group in (0x0000, 0x0002):
            raise IdentifierError(
                IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"({tag.group:04X},{tag.element:04X}) is not a key"
            )
        keyword = keyword_for_tag(tag)
        if not keyword:
            # Well formed but not in the dictionary (a newer standard's attribute): an optional
            # key the SCP does not support, as for QIDO-RS. Not returned: its VR is unknown.
            if elem.VR == "SQ" or not elem.is_empty:
                unmatched.append(f"({tag.group:04X},{tag.element:04X})")
            continue
        if keyword in _CONTROL_KEYWORDS:
            continue
        return_keys.append(tag)
        if tag == _TIMEZONE_OFFSET:
            continue  # answered, never matched: see _TIMEZONE_OFFSET
        if elem.VR == "SQ":
            if _has_match_value(elem.value):
                unmatched.append(keyword)
            continue
        if elem.is_empty:
            continue
        value = _match_string(elem).strip()
        if value and value != "*":
            filters[keyword] = value
    if _TIMEZONE_OFFSET not in return_keys and any(dictionary_VR(t) in _TIME_VRS for t in return_keys):
        return_keys.append(BaseTag(_TIMEZONE_OFFSET))
    study_uid = _unique_key(filters, "StudyInstanceUID", single=level in ("SERIES", "IMAGE"))
    series_uid = _unique_key(filters, "SeriesInstanceUID", single=level == "IMAGE")
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if keyword in filters:
            _check_uid_list(keyword, filters[keyword])
    return FindRequest(
        level=level,
        query_level=_LEVEL_TO_QUERY[level],
        filters=filters,
        return_keys=return_keys,
        study_uid=study_uid,
        series_uid=series_uid,
        unmatched=unmatched,
    )


_UNIQUE_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


def require_retrieve_key(request: FindRequest) -> None:
    """C-MOVE/C-GET name what to send by the unique key of the retrieve level (PS3.4
    C.4.2.2.1/C.4.3.2.1), a value or a list of UIDs, never a wildcard: an identifier without it would
    otherwise move every match of the other keys, possibly the whole archive."""
    keyword = _UNIQUE_KEY[request.level]
    value = request.filters.get(keyword, "")
    if not value or "*" in value or "?" in value:
        raise IdentifierError(
            IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is required at {request.level} level"
        )
    if request.level == "PATIENT" and "\\" in value:
        # Lists are for the UID keys of the levels below (list of UID matching); a Patient ID
        # is matched as a single value, and a list would be read as one ID that names no one.
        raise IdentifierError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "PatientID must be a single value")


def _unique_key(filters: dict[str, str], keyword: str, *, single: bool) -> str | None:
    """A unique key of a level above the query level names exactly one entity (PS3.4
    C.4.1.2.2.1): take it out of the filters into the hierarchical position."""
    value = filters.get(keyword)
    if value is None or not single or "\\" in value:
        return None
    _check_uid_list(keyword, value)
    del filters[keyword]
    return value


def _check_uid_list(keyword: str, value: str) -> None:
    # UI keys use single value or list-of-UID matching only (PS3.4 C.2.2.2.2): no wildcards.
    if not all(is_valid_uid(v) for v in value.split("\\")):
        raise IdentifierError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is not a UID list")


RESPONSE_CHARACTER_SET = "ISO_IR 192"  # the index's JSON is Unicode, so answers are UTF-8
_SPECIFIC_CHARACTER_SET = 0x00080005
_QUERY_RETRIEVE_LEVEL = 0x00080052
# VRs whose values are encoded in the Specific Character Set (UTF-8 here; PS3.5 6.1.2.3) ...
_TEXT_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
# ... and those pydicom writes in its default repertoire: plain ASCII takes the fast path.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"})
# Explicit VR: these have a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_VRS = frozenset(str(vr) for vr in VR if len(str(vr)) == 2)  # explicit VRs, not "US or SS"


def _empty_vr(tag: int) -> str:
    return dictionary_VR(tag).split(" or ")[0]  # e.g. "US or SS": any one encodes "empty"


class IdentifierEncoder:
    """Encodes the C-FIND pending identifiers of one request straight from the index's DICOM
    JSON matches, in the presentation context's transfer syntax (Implicit or Explicit VR Little
    Endian, the only ones the Query/Retrieve contexts accept).

    An identifier holds exactly the requested keys (PS3.4 C.4.1.1.3.2) plus SpecificCharacterSet
    (ISO_IR 192) and QueryRetrieveLevel, with the match's values and VRs, empty (dictionary VR)
    where the match has none, and RetrieveAETitle filled in with this node's AE title when empty.
    TimezoneOffsetFromUTC (asked, or added for a date or time key by `parse_identifier`) is the
    match's own and left out where the match has none: PS3.4 forbids it a zero-length value, and
    no offset is known for times a study recorded without one.
    The bytes are those pydicom writes for the Dataset that `Dataset.from_json` of the match
    would give (tests/dimse/test_find_identifiers.py holds that reference), without building a
    Dataset per match: a response costs tens of microseconds instead of ~0.7 ms, which set the
    latency of a query with many matches. Elements outside the plain cases (sequences with
    items, DS, binary VRs, non-ASCII in an ASCII-only VR, an oversized value) go through
    pydicom, one element at a time.
    """

    def __init__(
        self, request: FindRequest, *, implicit_vr: bool, retrieve_ae_title: str | None = None
    ) -> None:
        self.implicit_vr = implicit_vr
        fixed = {
            _SPECIFIC_CHARACTER_SET: {"vr": "CS", "Value": [RESPONSE_CHARACTER_SET]},
            _QUERY_RETRIEVE_LEVEL: {"vr": "CS", "Value": [request.level]},
        }
        # (tag, JSON key, bytes when the match lacks it (None: leave it out), bytes when fixed or
        # None, and whether an empty value in the match is replaced by the former)
        self._keys: list[tuple[int, str, bytes | None, bytes | None, bool]] = []
        for tag in sorted({int(t) for t in request.return_keys} | set(fixed)):
            key = f"{tag:08X}"
            vr = _empty_vr(tag)
            empty: bytes | None = self._element(tag, key, {"vr": vr})
            constant = None
            fill = False
            if tag == _TIMEZONE_OFFSET:
                empty, fill = None, True
            elif tag in fixed:
                constant = self._element(tag, key, fixed[tag])
            elif tag == _RETRIEVE_AE_TITLE and retrieve_ae_title:
                # Where to C-MOVE/C-GET it from: this node, unless the index knows better.
                empty = self._element(tag, key, {"vr": "AE", "Value": [retrieve_ae_title]})
                fill = True
            self._keys.append((tag, key, empty, constant, fill))

    def encode(self, match: Mapping[str, Any]) -> bytes:
        parts: list[bytes] = []
        for tag, key, empty, constant, fill in self._keys:
            if constant is not None:
                parts.append(constant)
                continue
            elem = match.get(key)
            if elem is None or (fill and _is_empty(elem)):
                if empty is not None:
                    parts.append(empty)
            else:
                parts.append(self._element(tag, key, elem))
        return b"".join(parts)

    def _element(self, tag: int, key: str, elem: Mapping[str, Any]) -> bytes:
        """One element (tag, VR, length, value) from its DICOM JSON."""
        vr = elem.get("vr")
        if vr not in _VRS:
            return self._pydicom(key, elem)
        values = elem.get("Value")
        if values is None:
            if "BulkDataURI" in elem or "InlineBinary" in elem:
                return self._pydicom(key, elem)
            value = b""
        elif not isinstance(values, list):
            return self._pydicom(key, elem)
        elif not values:
            value = b""
        else:
            fast = _fast_value(vr, values)
            if fast is None:
                return self._pydicom(key, elem)
            value = fast
        if len(value) > 0xFFFE:
            return self._pydicom(key, elem)
        group, element = tag >> 16, tag & 0xFFFF
        if self.implicit_vr:
            return _IMPLICIT.pack(group, element, len(value)) + value
        if vr in _LONG_VRS:
            return _EXPLICIT_LONG.pack(group, element, vr.encode(), len(value)) + value
        return _EXPLICIT.pack(group, element, vr.encode(), len(value)) + value

    def _pydicom(self, key: str, elem: Mapping[str, Any]) -> bytes:
        found = Dataset.from_json({key: dict(elem)})
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = self.implicit_vr
        write_data_element(fp, found[int(key, 16)], RESPONSE_CHARACTER_SET)
        return fp.getvalue()


_IMPLICIT = struct.Struct("<HHI")
_EXPLICIT = struct.Struct("<HH2sH")
_EXPLICIT_LONG = struct.Struct("<HH2s2xI")


def _is_empty(elem: Mapping[str, Any]) -> bool:
    # As pydicom's DataElement.is_empty after from_json: no value, or one empty value.
    if "BulkDataURI" in elem or "InlineBinary" in elem:
        return False
    values = elem.get("Value")
    return not values or (isinstance(values, list) and len(values) == 1 and values[0] in (None, ""))


def _fast_value(vr: str, values: list[Any]) -> bytes | None:
    """The padded value of a JSON "Value" list for the plain cases, else None (use pydicom)."""
    if vr == "PN":
        names = []
        for v in values:
            if v is None:
                names.append("")
            elif isinstance(v, dict) and (name := _pn(v)) is not None:
                names.append(name)
            else:
                return None
        raw = "\\".join(names).encode("utf-8")
    elif vr in _TEXT_VRS:
        if not all(isinstance(v, str) or v is None for v in values):
            return None
        raw = "\\".join(v or "" for v in values).encode("utf-8")
    elif vr in _ASCII_VRS:
        if not all(isinstance(v, str) or v is None for v in values):
            return None
        text = "\\".join((v or "").strip() if vr == "UI" else (v or "") for v in values)
        if not text.isascii():
            return None
        raw = text.encode("ascii")
        if len(raw) % 2:
            raw += b"\x00" if vr == "UI" else b" "
        return raw
    elif vr == "IS":
        if not all(type(v) is int for v in values):
            return None
        raw = "\\".join(str(v) for v in values).encode("ascii")
    elif vr == "SQ":
        return None  # items are datasets: pydicom writes them
    else:
        return None
    return raw + b" " if len(raw) % 2 else raw


def _pn(value: Mapping[str, Any]) -> str | None:
    """A PN JSON object (PS3.18 F.2.2) as pydicom writes it: the Alphabetic, Ideographic and
    Phonetic component groups joined by "=", without empty groups at the end."""
    groups = [value.get(g, "") for g in _PN_GROUPS]
    if not all(isinstance(g, str) for g in groups):
        return None
    groups = "=".join(groups).split("=")  # as pydicom's PersonName reads it
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


# -- reading stored objects for C-MOVE / C-GET sub-operations ----------------------------------


@contextmanager
def stored_file(store: ObjectStore, key: str, *, spool_dir: str | None) -> Iterator[str]:
    """A local Part 10 file of a stored object for C-MOVE/C-GET to send from: the object's own
    file on a local store, else (S3) a copy streamed into `spool_dir`, removed afterwards.
    Raises ObjectNotFound."""
    path = store.open_local(key)
    if path is not None:
        yield path
        return
    chunks = store.get(key)  # raises before a file is made if the object is missing
    with tempfile.NamedTemporaryFile(dir=spool_dir, prefix="retrieve-", suffix=".dcm", delete=False) as out:
        name = out.name
    try:
        with open(name, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        yield name
    finally:
        os.unlink(name)


def distinct(values: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(values))
