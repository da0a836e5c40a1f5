"""Reconciliation of an outside instance to the destination's identifiers (IHE IRWF.b).

Pure DICOM work, no database: the plan (decided once per study by the service) is applied to
each instance. Every value changed is kept in OriginalAttributesSequence (PS3.3 C.12.1) with the
reason COERCE, and the outside Patient ID is kept in OtherPatientIDsSequence with its issuer.
"""

from __future__ import annotations

import functools
import hashlib
import io
import operator
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

from broker.imports import splice

MODIFYING_SYSTEM = "SCANONCE"
PATIENT_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex")
STUDY_ID_POLICIES = ("keep", "empty", "from-accession")
# The institution attributes a destination may set (top level: the study's own, as its PACS shows them).
INSTITUTION_KEYWORDS = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName")
# UIDs renamed with the study when the destination already holds another object under them:
# the keywords that name this study's own objects, wherever they appear (references included).
_RENAMED = frozenset({
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ReferencedSOPInstanceUID",
    "MediaStorageSOPInstanceUID", "ReferencedSeriesInstanceUID",
})  # fmt: skip
# A frame of reference is the study's own too: renamed whatever its value, consistently.
_FRAME_OF_REFERENCE = frozenset({
    "FrameOfReferenceUID", "ReferencedFrameOfReferenceUID", "RelatedFrameOfReferenceUID",
})  # fmt: skip


def new_uid(*, destination: str, uid: str) -> str:
    """The renamed UID: derived from the old one and the destination (UUID-derived 2.25 root,
    PS3.5 B.2), so a second import of the same study gives the same UIDs and never duplicates."""
    digest = hashlib.sha256(f"scanonce-import\0{destination}\0{uid}".encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def new_accession(*, destination: str, study_uid: str) -> str:
    """A local accession number (SH, 16 characters), stable for the same study and destination."""
    return "SO" + hashlib.sha256(f"{destination}\0{study_uid}".encode()).hexdigest()[:14].upper()


@dataclass(slots=True)
class Plan:
    """What every instance of the study becomes: decided once, stored with the import."""

    destination: str  # facility id
    source_issuer: str
    source_patient_id: str
    patient: dict[str, str]  # PATIENT_KEYWORDS -> the destination's values
    accession_policy: str
    accession: str | None  # the new value; None: keep the source's
    rename_uids: bool
    study_uid: str  # as delivered
    # Per the destination's import configuration; the defaults keep what came (and let a plan
    # stored before these existed be applied unchanged by a resumed job).
    study_id_policy: str = "keep"  # keep | empty | from-accession
    institution: dict[str, str] = field(default_factory=dict)  # keyword -> value to set
    known_uids: list[str] = field(
        default_factory=list
    )  # source study/series/SOP UIDs (renamed when clashing)

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "source_issuer": self.source_issuer,
            "source_patient_id": self.source_patient_id,
            "patient": self.patient,
            "accession_policy": self.accession_policy,
            "accession": self.accession,
            "rename_uids": self.rename_uids,
            "study_uid": self.study_uid,
            "study_id_policy": self.study_id_policy,
            "institution": self.institution,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], known_uids: list[str]) -> Plan:
        return cls(known_uids=known_uids, **data)


def _renamer(plan: Plan) -> Any:
    known = set(plan.known_uids)

    def rename(keyword: str, value: str) -> str:
        if keyword in _FRAME_OF_REFERENCE or (keyword in _RENAMED and value in known):
            return new_uid(destination=plan.destination, uid=value)
        return value

    return rename


def _rename_uids(ds: Dataset, rename: Any) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _rename_uids(item, rename)
        elif elem.VR == "UI" and elem.keyword in _RENAMED | _FRAME_OF_REFERENCE and elem.value:
            if elem.VM > 1:
                elem.value = [rename(elem.keyword, str(v)) for v in elem.value]
            else:
                elem.value = rename(elem.keyword, str(elem.value))


UTF8 = "ISO_IR 192"


def _encodable(ds: Dataset, values: dict[str, Any]) -> bool:
    """Whether every character of `values` has a code in the data set's character set(s)."""
    text = "".join(v for v in values.values() if isinstance(v, str) and not v.isascii())
    if not text:
        return True
    charset = ds.get("SpecificCharacterSet") or ""
    names = [charset] if isinstance(charset, str) else list(charset)
    codecs = convert_encodings(names)
    for ch in set(text):
        for codec in codecs:
            try:
                ch.encode(codec)
                break
            except (UnicodeEncodeError, LookupError):
                continue
        else:
            return False
    return True


def apply(ds: Dataset, plan: Plan, *, now: datetime | None = None) -> list[tuple[str, str, str]]:
    """Coerce `ds` in place; returns the diff [(keyword, before, after)] of top-level attributes."""
    target: dict[str, Any] = dict(plan.patient)
    if plan.accession is not None:
        target["AccessionNumber"] = plan.accession
    if plan.study_id_policy == "empty":
        target["StudyID"] = ""
    elif plan.study_id_policy == "from-accession":
        # The accession as delivered (after the accession policy); StudyID is SH, 16 characters.
        accession = plan.accession if plan.accession is not None else str(ds.get("AccessionNumber", ""))
        target["StudyID"] = accession[:16]
    target.update({k: v for k, v in plan.institution.items() if k in INSTITUTION_KEYWORDS})
    diff: list[tuple[str, str, str]] = []
    old = Dataset()
    for keyword, value in target.items():
        before = ds.get(keyword)
        before_s = "" if before is None else str(before)
        if before_s == value and (before is not None or value == ""):
            continue
        if before is not None:
            setattr(old, keyword, before)
        elif keyword not in ("IssuerOfPatientID",):
            setattr(old, keyword, "")
        diff.append((keyword, before_s, value))
    if "IssuerOfPatientIDQualifiersSequence" in ds:
        # The qualifiers described the outside issuer: kept in the original values, not carried over.
        old.IssuerOfPatientIDQualifiersSequence = ds.IssuerOfPatientIDQualifiersSequence
        del ds.IssuerOfPatientIDQualifiersSequence
        diff.append(("IssuerOfPatientIDQualifiersSequence", "(outside issuer)", ""))
    if (
        plan.accession_policy == "keep"
        and ds.get("AccessionNumber")
        and "IssuerOfAccessionNumberSequence" not in ds
    ):
        issuer = Dataset()
        issuer.LocalNamespaceEntityID = plan.source_issuer[:16]
        ds.IssuerOfAccessionNumberSequence = DicomSequence([issuer])
        diff.append(("IssuerOfAccessionNumberSequence", "", plan.source_issuer))
    if plan.rename_uids:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if keyword in ds:
                setattr(old, keyword, ds.get(keyword))
        before_uids = {
            k: str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        }
        rename = _renamer(plan)
        _rename_uids(ds, rename)
        if hasattr(ds, "file_meta"):
            _rename_uids(ds.file_meta, rename)
        diff += [(k, v, str(ds.get(k, ""))) for k, v in before_uids.items() if v != str(ds.get(k, ""))]
    if diff and not _encodable(ds, target):
        # A value the file's character set cannot hold (the destination's name in Han or
        # Cyrillic, the file in Latin-1): pydicom would write '?' for each such character.
        # Every text value is read in the file's character set and the file written in UTF-8.
        before_charset = ds.get("SpecificCharacterSet")
        ds.decode()
        ds.SpecificCharacterSet = UTF8
        diff.append(("SpecificCharacterSet", "" if before_charset is None else str(before_charset), UTF8))
    for keyword, value in target.items():
        if value == "" and keyword == "IssuerOfPatientID" and keyword in ds:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    if not diff:
        return diff
    other = Dataset()
    other.PatientID = plan.source_patient_id
    other.IssuerOfPatientID = plan.source_issuer
    other.TypeOfPatientID = "TEXT"
    others = list(ds.get("OtherPatientIDsSequence", []))
    if not any(
        o.get("PatientID") == other.PatientID and o.get("IssuerOfPatientID") == other.IssuerOfPatientID
        for o in others
    ):
        ds.OtherPatientIDsSequence = DicomSequence([*others, other])
    item = Dataset()
    item.AttributeModificationDateTime = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S.%f+0000")
    item.ModifyingSystem = MODIFYING_SYSTEM
    item.SourceOfPreviousValues = plan.source_issuer[:64]
    item.ReasonForTheAttributeModification = "COERCE"
    item.ModifiedAttributesSequence = DicomSequence([old])
    ds.OriginalAttributesSequence = DicomSequence([*ds.get("OriginalAttributesSequence", []), item])
    return diff


def coerce_file(src: BinaryIO, dst: BinaryIO, plan: Plan) -> None:
    """Write the Part 10 file `src` (seekable, at its start) coerced per `plan` to `dst` (see
    `Coercer`, which an import keeps for all its files)."""
    Coercer(plan).coerce_file(src, dst)


# The top-level attributes `apply` reads or changes when it renames no UID (keep in step with it:
# an attribute it touched outside these would not reach the spliced file; the tests compare the
# spliced file with pydicom's full re-encode).
_SPLICED = frozenset(
    tag_for_keyword(k) or 0
    for k in (*PATIENT_KEYWORDS, "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence",
              "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID", *INSTITUTION_KEYWORDS,
              "OriginalAttributesSequence")
)  # fmt: skip
_CHARSET, _SOP_CLASS, _SOP_INSTANCE = 0x00080005, 0x00080016, 0x00080018
_PIXELS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # where pydicom's stop_before_pixels stops
# File meta elements pydicom's writer adds when absent (PS3.10 7.1 and its own ImplementationVersionName).
_META_REQUIRED = (0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013)
_MEMO = 64  # distinct headers remembered per import (a study's instances mostly share one)
Part = bytes | tuple[int, int]  # new bytes, or the source's bytes [start, end)


class Coercer:
    """Coerces the files of one import per its plan: each file the one a full parse, `apply` and
    re-encode by pydicom would give.

    Without renamed UIDs (which reach into sequences anywhere), only the top-level elements
    `apply` reads or changes are parsed, coerced and re-encoded; every other element, Pixel Data
    and all after it, is the source's own bytes spliced around them (`splice`: pydicom writes an
    element it has not decoded back as it read it, so the bytes are the same). What those few
    elements become depends only on what they were, and the instances of a study mostly carry
    the same: the result is remembered, so most files cost a walk of their element headers and
    a copy (one AttributeModificationDateTime for them all, the time of the first). The file
    meta is the source's own when pydicom's writer would not change it.

    Otherwise, or for a file the splice does not follow, the header (everything before Pixel
    Data) is parsed, coerced and re-encoded and the rest copied on; a file whose header cannot
    be re-encoded exactly as the rest is stored (deflated, big endian, or a data set not
    encoded as its transfer syntax says) is parsed and written whole.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._memo: dict[tuple[bool, bytes], list[tuple[int, bytes]]] = {}

    def splice(self, src: BinaryIO) -> list[Part] | None:
        """The coerced file as new bytes and [start, end) ranges of `src`, in order, without
        writing it (STOW-RS sends it so); None when the splice does not apply (renamed UIDs, or
        a file it does not follow: `coerce_file` takes pydicom's path for those)."""
        if self.plan.rename_uids:
            return None
        try:
            head, parts, tail = self._spliced(src)
            size = src.seek(0, 2)
        except Exception:  # noqa: BLE001 - whatever the splice cannot do, pydicom's path does (or says why)
            return None
        return _joined([head, *parts, *([(tail, size)] if tail < size else [])])

    def coerce_file(self, src: BinaryIO, dst: BinaryIO) -> None:
        plan = self.plan
        parts = self.splice(src)
        if parts is not None:
            for part in parts:
                if isinstance(part, bytes):
                    dst.write(part)
                else:
                    _copy(src, dst, *part)
            return
        src.seek(0)
        ds = dcmread(src, stop_before_pixels=True)
        tail = src.tell()
        meta = getattr(ds, "file_meta", None)
        ts = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
        if not (
            ts.is_transfer_syntax
            and not ts.is_deflated
            and ts.is_little_endian
            and ds.original_encoding == (ts.is_implicit_VR, True)
        ):
            src.seek(0)
            ds = dcmread(src)
            apply(ds, plan)
            ds.save_as(dst, enforce_file_format=True)
            return
        apply(ds, plan)
        ds.save_as(dst, enforce_file_format=True)
        src.seek(tail)
        shutil.copyfileobj(src, dst, 1 << 20)

    def _spliced(self, src: BinaryIO) -> tuple[bytes, list[Part], int]:
        """The coerced file as (preamble and file meta, the data set up to Pixel Data as new bytes
        and ranges of the source, where the source's remainder starts). Raises on what it cannot
        do."""
        size = src.seek(0, 2)
        win = splice.Window(src, size)
        head = win.read(0, 132)
        if len(head) < 132 or head[128:] != b"DICM":
            raise splice.Unsupported("no Part 10 preamble")
        metas, start = splice.walk(win, start=132, implicit=False, stop=lambda t: t >> 16 != 2)
        meta_raw = win.read(132, start)
        # The transfer syntax from its element's bytes (no data set parsed for it per file).
        ts = _transfer_syntax(
            next(
                (meta_raw[e.start - 132 + e.header : e.end - 132] for e in metas if e.tag == 0x00020010), b""
            )
        )
        if not (
            metas
            and ts.is_transfer_syntax
            and not ts.is_deflated
            and ts.is_little_endian
            and splice.looks_explicit(win.read(start, start + 6)) != ts.is_implicit_VR
        ):
            raise splice.Unsupported("an encoding the splice does not keep")
        implicit = ts.is_implicit_VR
        elements, tail = splice.walk(win, start=start, implicit=implicit, stop=_PIXELS.__contains__)
        values: dict[int, bytes] = {}
        chosen = b""
        for e in elements:
            if e.tag in _SPLICED or e.tag in (_CHARSET, _SOP_CLASS, _SOP_INSTANCE):
                raw = win.read(e.start, e.end)
                values[e.tag] = raw[e.header :]
                if e.tag not in (_SOP_CLASS, _SOP_INSTANCE):
                    chosen += raw
        new = self._memo.get((implicit, chosen))
        if new is None:
            new = self._encode(chosen, implicit)
            if len(self._memo) >= _MEMO:
                self._memo.clear()
            self._memo[(implicit, chosen)] = new
        parts: list[tuple[int, Part]] = list(new)
        parts += [
            (e.tag, (e.start, e.end))
            for e in elements
            # pydicom's writer drops a retired group length (PS3.5 7.2)
            if e.tag not in _SPLICED and not (e.tag & 0xFFFF == 0 and e.tag >> 16 > 6)
        ]
        parts.sort(key=operator.itemgetter(0))
        # The source's bytes still in memory from the walk are taken as they are (most headers
        # fit in its first block), so the header goes out as one piece, not a read per range;
        # adjacent pieces are joined.
        ranges = _joined([p for _, p in parts])
        merged = [win.read(*p) if isinstance(p, tuple) and win.holds(*p) else p for p in ranges]
        sop = (_uid(values.get(_SOP_CLASS)), _uid(values.get(_SOP_INSTANCE)))
        return head + _file_meta(meta_raw, metas, sop), merged, tail

    def _encode(self, chosen: bytes, implicit: bool) -> list[tuple[int, bytes]]:
        """The `_SPLICED` elements (and SpecificCharacterSet) encoded in `chosen`, coerced and
        re-encoded by pydicom: [(tag, its bytes)], an element `apply` removed left out."""
        ds = read_dataset(io.BytesIO(chosen), implicit, True)
        charset = ds.get("SpecificCharacterSet")
        apply(ds, self.plan)
        if ds.get("SpecificCharacterSet") != charset:
            # Written in UTF-8 now: the source's other text elements, spliced as they are, would
            # be read in the wrong character set. The whole header is re-encoded instead.
            raise splice.Unsupported("the character set changes")
        out = DicomBytesIO()
        out.is_implicit_VR, out.is_little_endian = implicit, True
        write_dataset(out, ds)
        data = out.getvalue()
        found = splice.walk(
            splice.Window(io.BytesIO(data), len(data)), start=0, implicit=implicit, stop=lambda t: False
        )[0]
        return [(e.tag, data[e.start : e.end]) for e in found if e.tag in _SPLICED]


def _joined(parts: list[Part]) -> list[Part]:
    """`parts` with adjacent new bytes joined, and adjacent ranges of the source."""
    out: list[Part] = []
    for part in parts:
        last = out[-1] if out else None
        if isinstance(part, tuple) and isinstance(last, tuple) and last[1] == part[0]:
            out[-1] = (last[0], part[1])
        elif isinstance(part, bytes) and isinstance(last, bytes):
            out[-1] = last + part
        else:
            out.append(part)
    return out


@functools.lru_cache(maxsize=16)
def _transfer_syntax(raw: bytes) -> UID:
    """The transfer syntax UID whose (0002,0010) value is `raw` (a study's files share one)."""
    return UID(_uid(raw))


def _uid(raw: bytes | None) -> str:
    return raw.rstrip(b"\0 ").decode("ascii") if raw else ""


def _file_meta(raw: bytes, elements: list[splice.Element], sop: tuple[str, str]) -> bytes:
    """The file meta as `save_as(enforce_file_format=True)` writes it: the source's own bytes
    when that would write them unchanged (every element it would add present, a correct group
    length, the UIDs it re-encodes in their canonical form, the Media Storage UIDs those of the
    data set), else written by pydicom (0002,0002/3 taken from the data set as it does)."""
    base = 132
    values = {e.tag: raw[e.start - base + e.header : e.end - base] for e in elements}
    canonical = all(
        (v := values.get(t)) and v == _pad_uid(_uid(v))
        for t in (0x00020002, 0x00020003, 0x00020010, 0x00020012)
    )
    if (
        canonical
        and all(values.get(t) for t in _META_REQUIRED)
        and elements[0].tag == 0x00020000
        and values[0x00020000] == (elements[-1].end - elements[0].end).to_bytes(4, "little")
        and (_uid(values[0x00020002]), _uid(values[0x00020003])) == sop
    ):
        return raw
    meta = FileMetaDataset(read_dataset(io.BytesIO(raw), False, True))
    for keyword, value in zip(("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"), sop, strict=True):
        if meta.get(keyword) is None or (value and value != meta.get(keyword)):
            setattr(meta, keyword, value or None)
    out = DicomBytesIO()
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue()


def _pad_uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def _copy(src: BinaryIO, dst: BinaryIO, start: int, end: int) -> None:
    src.seek(start)
    while start < end:
        chunk = src.read(min(end - start, 1 << 20))
        if not chunk:
            raise OSError("the source file changed while it was copied")
        dst.write(chunk)
        start += len(chunk)
