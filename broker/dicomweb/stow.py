"""STOW-RS (PS3.18 10.5): what a request stores, the Store Instances Response (Annex I) and its
HTTP status.

A request carries Part 10 instances (application/dicom) or DICOM JSON metadata with bulk data
parts (application/dicom+json); the latter become Part 10 files here, so both take the same
path through ingest and get the same outcomes and failure reasons."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import orjson
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy.engine import Engine

from broker.dicom import status
from broker.dicom.uids import is_valid_uid
from broker.dicomweb.multipart import Part, ReceivedParts, parse_media_type
from broker.index import service as index_service
from broker.index.schemas import StoreOutcome
from broker.security.schemas import Principal
from storage import ObjectStore

_RETRIEVE_URL = "00081190"
_FAILED_SOP_SEQ = "00081198"
_REFERENCED_SOP_SEQ = "00081199"
_REF_SOP_CLASS = "00081150"
_REF_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"


def non_dicom_part(index: int, content_type: str) -> StoreOutcome:
    """A part that does not claim to be application/dicom fails alone (Cxxx, Cannot understand)."""
    return StoreOutcome.failed(
        status.CANNOT_UNDERSTAND, f"part {index + 1} has Content-Type {content_type!r}, not application/dicom"
    )


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def store_response(
    outcomes: Sequence[StoreOutcome], *, base: str, url_study: str | None
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, Store Instances Response as DICOM JSON).

    PS3.18 Table 10.5.3-1: 200 when every instance was stored, 202 when some were and others
    failed, 409 when none could be stored. A duplicate (same UID, same bytes) counts as stored.
    """
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    studies: set[str] = set()
    for o in outcomes:
        if o.ok:
            studies.add(o.study_uid)
            referenced.append(
                {
                    _REF_SOP_CLASS: _ui(o.sop_class_uid),
                    _REF_SOP_INSTANCE: _ui(o.sop_instance_uid),
                    _RETRIEVE_URL: {
                        "vr": "UR",
                        "Value": [
                            f"{base}/studies/{o.study_uid}/series/{o.series_uid}/instances/{o.sop_instance_uid}"
                        ],
                    },
                }
            )
        else:
            failed.append(
                {
                    _REF_SOP_CLASS: _ui(o.sop_class_uid),
                    _REF_SOP_INSTANCE: _ui(o.sop_instance_uid),
                    _FAILURE_REASON: {"vr": "US", "Value": [o.failure_reason or status.PROCESSING_FAILURE]},
                }
            )
    body: dict[str, Any] = {}
    study = url_study or (next(iter(studies)) if len(studies) == 1 else None)
    if study and referenced:
        body[_RETRIEVE_URL] = {"vr": "UR", "Value": [f"{base}/studies/{study}"]}
    if failed:
        body[_FAILED_SOP_SEQ] = {"vr": "SQ", "Value": failed}
    if referenced:
        body[_REFERENCED_SOP_SEQ] = {"vr": "SQ", "Value": referenced}
    if not failed:
        code = 200
    elif referenced:
        code = 202
    else:
        code = 409
    return code, body


# ------------------------------------------------------------ DICOM JSON metadata + bulk data

DICOM_JSON = "application/dicom+json"
_PART10 = ("", "application/dicom")
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_UID_TAGS = (
    ("sop_class_uid", "00080016", "SOPClassUID"),
    ("sop_instance_uid", "00080018", "SOPInstanceUID"),
    ("study_uid", "0020000D", "StudyInstanceUID"),
    ("series_uid", "0020000E", "SeriesInstanceUID"),
)


class _MissingBulk(Exception):
    pass


def _json_uids(item: dict[str, Any]) -> dict[str, str]:
    """The four UIDs as the JSON gives them (valid ones only), for the response."""
    out = {}
    for name, tag, _keyword in _UID_TAGS:
        element = item.get(tag)
        values = element.get("Value") if isinstance(element, dict) else None
        value = values[0] if isinstance(values, list) and values else ""
        out[name] = value if isinstance(value, str) and is_valid_uid(value) else ""
    return out


def items_of(
    parts: Sequence[Part], *, declared: str, received: ReceivedParts, tmp_dir: str
) -> list[str | StoreOutcome]:
    """What a request stores, one item per instance in request order: the path of a Part 10
    file to ingest, or the failure of something that cannot be one. Blocking: call from a thread."""
    if declared == DICOM_JSON or any(p.content_type == DICOM_JSON for p in parts):
        return _with_metadata(parts, received=received, tmp_dir=tmp_dir)
    return [
        p.path if p.content_type in _PART10 else non_dicom_part(i, p.content_type)
        for i, p in enumerate(parts)
    ]


def store_items(
    items: Sequence[str | StoreOutcome],
    *,
    engine: Engine,
    store: ObjectStore,
    principal: Principal,
    facility_id: str,
    expected_study_uid: str | None,
    audit: index_service.IngestAudit | None = None,
) -> list[StoreOutcome]:
    """Ingest the items that are files (all in one batch); one outcome per item, in order.
    `audit` records the store in the ingest's own transaction."""
    outcomes: dict[int, StoreOutcome] = {i: x for i, x in enumerate(items) if isinstance(x, StoreOutcome)}
    paths = [(i, x) for i, x in enumerate(items) if isinstance(x, str)]
    if paths:
        stored = index_service.ingest_files(
            engine=engine,
            store=store,
            principal=principal,
            facility_id=facility_id,
            paths=[path for _, path in paths],
            expected_study_uid=expected_study_uid,
            consume=True,
            audit=audit,
        )
        for (i, _), outcome in zip(paths, stored, strict=True):
            outcomes[i] = outcome
    return [outcomes[i] for i in range(len(items))]


def _with_metadata(
    parts: Sequence[Part], *, received: ReceivedParts, tmp_dir: str
) -> list[str | StoreOutcome]:
    """What a request with DICOM JSON metadata stores, in request order: a Part 10 file to ingest
    (an application/dicom part as it came, or one made from a dataset of the metadata), or the
    failure of a dataset that cannot be made into one. Other parts are bulk data, addressed by
    their Content-Location from the metadata's BulkDataURI (PS3.18 10.5.1.2); a part no dataset
    refers to is not stored. Files made here are listed in `received.derived` for cleanup.
    Blocking (reads and writes files): call from a thread."""
    bulk = {p.location: p for p in parts if p.location and p.content_type not in (DICOM_JSON, *_PART10)}
    out: list[str | StoreOutcome] = []
    for index, part in enumerate(parts):
        if part.content_type in _PART10:
            out.append(part.path)
        elif part.content_type == DICOM_JSON:
            out.extend(_json_part(index, part, bulk, received=received, tmp_dir=tmp_dir))
    return out


def _json_part(
    index: int, part: Part, bulk: dict[str, Part], *, received: ReceivedParts, tmp_dir: str
) -> list[str | StoreOutcome]:
    try:
        with open(part.path, "rb") as f:
            doc = orjson.loads(f.read())
    except orjson.JSONDecodeError:
        return [StoreOutcome.failed(status.CANNOT_UNDERSTAND, f"part {index + 1} is not valid JSON")]
    if not isinstance(doc, list) or not all(isinstance(item, dict) for item in doc):
        return [
            StoreOutcome.failed(
                status.CANNOT_UNDERSTAND,
                f"part {index + 1} is not a DICOM JSON array of datasets (PS3.18 F.2)",
            )
        ]
    return [_dataset_file(n, item, bulk, received=received, tmp_dir=tmp_dir) for n, item in enumerate(doc)]


def _dataset_file(
    n: int, item: dict[str, Any], bulk: dict[str, Part], *, received: ReceivedParts, tmp_dir: str
) -> str | StoreOutcome:
    """One dataset of the metadata as a Part 10 file, or why it cannot be one."""
    uids = _json_uids(item)
    used: dict[str, Part] = {}

    def read_bulk(tag: str, _vr: str, uri: str) -> bytes:
        found = bulk.get(uri)
        if found is None:
            raise _MissingBulk(uri)
        used[tag.upper()] = found
        with open(found.path, "rb") as f:
            return f.read()

    # File meta is the server's to write (below), whatever the client put in group 0002.
    content = {k: v for k, v in item.items() if not k.startswith("0002")}
    try:
        ds = Dataset.from_json(content, bulk_data_uri_handler=read_bulk)
    except _MissingBulk as exc:
        where = str(exc)[:120]
        return StoreOutcome.failed(
            status.CANNOT_UNDERSTAND, f"dataset {n + 1}: bulk data {where!r} is not in the request", **uids
        )
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed JSON
        return StoreOutcome.failed(
            status.CANNOT_UNDERSTAND, f"dataset {n + 1} is not valid DICOM JSON: {type(exc).__name__}", **uids
        )
    for _name, _tag, keyword in _UID_TAGS:
        value = str(ds.get(keyword, "") or "")
        if not is_valid_uid(value):
            what = "missing" if not value else "not a valid UID"
            return StoreOutcome.failed(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"dataset {n + 1}: {keyword} is {what}", **uids
            )
    ts = _transfer_syntax(ds, used.get("7FE00010"))
    if isinstance(ts, StoreOutcome):
        return StoreOutcome.failed(
            ts.failure_reason or status.CANNOT_UNDERSTAND, f"dataset {n + 1}: {ts.message}", **uids
        )
    # The JSON is Unicode whatever it says (PS3.18 F.2): written as UTF-8.
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    fd, path = tempfile.mkstemp(prefix="stow-", suffix=".dcm", dir=tmp_dir)
    os.close(fd)
    received.derived.append(path)
    try:
        ds.save_as(path, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001
        return StoreOutcome.failed(
            status.CANNOT_UNDERSTAND, f"dataset {n + 1} cannot be encoded: {type(exc).__name__}", **uids
        )
    return path


def _transfer_syntax(ds: Dataset, pixels: Part | None) -> UID | StoreOutcome:
    """The Transfer Syntax the pixel data's bulk part implies (PS3.18 8.7.3.5): octet-stream is
    native (Explicit VR Little Endian unless its transfer-syntax parameter says Implicit); a
    compressed media type needs its transfer-syntax parameter and one frame, and is encapsulated."""
    if pixels is None or not pixels.header:
        return ExplicitVRLittleEndian
    media = parse_media_type(pixels.header)
    declared = media.params.get("transfer-syntax", "").strip()
    if media.type == "application/octet-stream":
        ts = UID(declared) if declared else ExplicitVRLittleEndian
        if ts not in _NATIVE:
            return StoreOutcome.failed(
                status.TRANSFER_SYNTAX_NOT_SUPPORTED,
                f"octet-stream pixel data with transfer-syntax {declared[:64]!r}: only little endian native",
            )
        return ts
    ts = UID(declared)
    if not declared or not is_valid_uid(declared) or not ts.is_compressed:
        return StoreOutcome.failed(
            status.TRANSFER_SYNTAX_NOT_SUPPORTED,
            f"{media.type} pixel data needs the transfer-syntax parameter of a compressed transfer syntax",
        )
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return StoreOutcome.failed(
            status.TRANSFER_SYNTAX_NOT_SUPPORTED,
            "compressed multi-frame pixel data as one bulk part is not supported",
        )
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    return ts
