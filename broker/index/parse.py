"""Parsing one received instance: read once, validate, derive its DICOM JSON.

Kept apart from the index (no database imports) so it can run in worker processes: parsing is
pure Python and holds the GIL, and a broker on N cores parses N instances at once.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError

from broker.dicom import status
from broker.dicom.attributes import is_series_level, is_study_level
from broker.dicom.bounds import bound_dataset
from broker.dicom.json_model import BULK_THRESHOLD, instance_json, lean_instance_json
from broker.dicom.lean import FIRST_READ, WHOLE_READ, Lean, NeedMore, read_lean
from broker.dicom.received import Received
from broker.dicom.uids import is_valid_uid
from broker.index.instance_facts import InstanceFacts, instance_facts
from broker.index.packing import pack_metadata
from broker.index.schemas import StoreOutcome

_ROW_TAGS = frozenset({"00200013", "00280010", "00280011", "00280008", "00080060"})


_ROW_KEYS: dict[str, bool] = {}


def _for_rows(key: str) -> bool:
    """Whether the index rows (not only the metadata) need this attribute; remembered per tag,
    as every instance asks about the same few dozen."""
    known = _ROW_KEYS.get(key)
    if known is None:
        known = key in _ROW_TAGS or is_study_level(key) or is_series_level(key)
        if len(_ROW_KEYS) < 4096:  # private and odd tags must not grow it without bound
            _ROW_KEYS[key] = known
    return known


@dataclass
class _Parsed:
    path: str
    sha256: str
    size: int
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    attrs: dict[str, Any]
    # The DICOM JSON as its index row stores it (`packing.pack_metadata`), packed where it is
    # parsed: a parse worker, not the serving process, pays the deflate (~30 µs of a small
    # instance), and the result it sends back is ~2 KB smaller.
    metadata_packed: bytes
    facts: InstanceFacts | None = None

    def outcome(self, st: str, reason: int | None = None, message: str = "") -> StoreOutcome:
        return StoreOutcome(
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_uid,
            study_uid=self.study_uid,
            series_uid=self.series_uid,
            status=st,  # type: ignore[arg-type]
            failure_reason=reason,
            message=message,
        )


def _sha256(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def parse_instance(
    source: str | Received,
    *,
    expected_study_uid: str | None = None,
    expected_sop: tuple[str, str] | None = None,
) -> _Parsed | StoreOutcome:
    """Read one Part 10 file once; a StoreOutcome (failed) explains why it cannot be stored.

    `source` is a path, or a `Received` file whose hash is known already (and whose bytes, if
    kept, are parsed from memory). `expected_sop` is the (SOP Class UID, SOP Instance UID) a
    C-STORE request names: a data set that says otherwise is refused (0xA900), checked on this
    same parse rather than by reading the file's head a second time."""
    if isinstance(source, Received):
        path, known = source.path, source
    else:
        path, known = source, None
    fp: BinaryIO
    try:
        in_hand = known.data if known is not None else None
        fp = io.BytesIO(in_hand) if in_hand is not None else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        return StoreOutcome.failed(status.CANNOT_UNDERSTAND, f"cannot read the file: {type(exc).__name__}")
    with fp:
        try:
            lean = _read_lean(fp, in_hand, known)
            done = _parse_lean(lean, path, known, expected_study_uid, expected_sop) if lean else None
        except Exception:  # noqa: BLE001 - whatever the lean path trips on, pydicom decides
            done = None
        if done is not None:
            return done
        fp.seek(0)
        return _parse(fp, path, known, expected_study_uid, expected_sop)


_UID_TAGS = (
    ("sop_class_uid", 0x00080016),
    ("sop_instance_uid", 0x00080018),
    ("study_uid", 0x0020000D),
    ("series_uid", 0x0020000E),
)


def _read_lean(fp: BinaryIO, in_hand: bytes | None, known: Received | None) -> Lean | None:
    """The file through the lean reader (`dicom.lean`): its first 64 KiB, all of it if the walk
    needs more. None when it is not the common case."""
    if in_hand is not None:
        return read_lean(in_hand, len(in_hand))
    size = known.size if known is not None else os.fstat(fp.fileno()).st_size
    buf = fp.read(min(size, FIRST_READ))
    try:
        return read_lean(buf, size)
    except NeedMore:
        if size > WHOLE_READ:
            # A large file whose header or encapsulated frames run past the first read: pydicom
            # streams through it (seeking past deferred values) instead of holding it whole.
            return None
        fp.seek(0)
        buf = fp.read()
        return read_lean(buf, len(buf)) if len(buf) == size else None


def _parse_lean(
    lean: Lean,
    path: str,
    known: Received | None,
    expected_study_uid: str | None,
    expected_sop: tuple[str, str] | None,
) -> _Parsed | StoreOutcome | None:
    """What `_parse` makes of the same file, from the lean reader's elements; None hands the
    file to `_parse` (its four UIDs must be valid, so every refusal reads as pydicom reads it)."""
    buf = lean.buf
    found: dict[int, tuple[str, int, int]] = {}
    for tag, vr, start, length in lean.elements:
        if tag > 0x0020000E:
            break
        found[tag] = (vr, start, length)
    uids: dict[str, str] = {}
    for name, tag in _UID_TAGS:
        element = found.get(tag)
        if element is None or element[0] != "UI":
            return None
        _vr, start, length = element
        uid = buf[start : start + length].decode("ascii").rstrip("\0 ")
        if not is_valid_uid(uid):
            return None
        uids[name] = uid
    if expected_sop is not None:
        for found_uid, wanted, keyword in (
            (uids["sop_class_uid"], expected_sop[0], "SOPClassUID"),
            (uids["sop_instance_uid"], expected_sop[1], "SOPInstanceUID"),
        ):
            if found_uid != wanted.strip():
                return StoreOutcome.failed(
                    status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} differs from the request's"
                )
    if expected_study_uid is not None and uids["study_uid"] != expected_study_uid:
        return StoreOutcome.failed(
            status.STUDY_UID_MISMATCH,
            "StudyInstanceUID of the instance differs from the study in the request URL",
            **uids,
        )
    attrs = lean_instance_json(
        lean,
        bulk_prefix=f"studies/{uids['study_uid']}/series/{uids['series_uid']}/instances/{uids['sop_instance_uid']}",
    )
    return _parsed(path, known, uids, lean.transfer_syntax_uid, attrs)


def _parse(
    fp: BinaryIO,
    path: str,
    known: Received | None,
    expected_study_uid: str | None,
    expected_sop: tuple[str, str] | None,
) -> _Parsed | StoreOutcome:
    try:
        ds = dcmread(fp, defer_size=BULK_THRESHOLD)
    except InvalidDicomError:
        return StoreOutcome.failed(
            status.CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no DICM preamble/prefix)"
        )
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        return StoreOutcome.failed(status.CANNOT_UNDERSTAND, f"cannot parse DICOM: {type(exc).__name__}")
    if expected_sop is not None:
        mismatch = _against_request(ds, expected_sop)
        if mismatch is not None:
            return mismatch
    file_size = known.size if known is not None else os.fstat(fp.fileno()).st_size
    truncated = _truncated(ds, fp, file_size)
    uids = {
        "sop_class_uid": str(ds.get("SOPClassUID", "") or ""),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "") or ""),
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
    }
    for name, keyword in (
        ("sop_class_uid", "SOPClassUID"),
        ("sop_instance_uid", "SOPInstanceUID"),
        ("study_uid", "StudyInstanceUID"),
        ("series_uid", "SeriesInstanceUID"),
    ):
        if not is_valid_uid(uids[name]):
            shown = {k: (v if is_valid_uid(v) else "") for k, v in uids.items()}
            what = "missing" if not uids[name] else "not a valid UID"
            return StoreOutcome.failed(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is {what}", **shown
            )
    if expected_study_uid is not None and uids["study_uid"] != expected_study_uid:
        return StoreOutcome.failed(
            status.STUDY_UID_MISMATCH,
            "StudyInstanceUID of the instance differs from the study in the request URL",
            **uids,
        )
    file_meta = getattr(ds, "file_meta", None)
    ts = str(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else ""
    if not is_valid_uid(ts):
        return StoreOutcome.failed(
            status.CANNOT_UNDERSTAND, "file meta has no valid TransferSyntaxUID", **uids
        )
    try:
        attrs = instance_json(
            ds,
            bulk_prefix=(
                f"studies/{uids['study_uid']}/series/{uids['series_uid']}/instances/{uids['sop_instance_uid']}"
            ),
        )
    except Exception as exc:  # noqa: BLE001
        return StoreOutcome.failed(
            status.CANNOT_UNDERSTAND, f"cannot read attributes: {type(exc).__name__}", **uids
        )
    if truncated:
        return StoreOutcome.failed(
            status.CANNOT_UNDERSTAND, "the file ends before its last attribute does (truncated)", **uids
        )
    return _parsed(path, known, uids, ts, attrs)


def _parsed(
    path: str, known: Received | None, uids: dict[str, str], ts: str, attrs: dict[str, Any]
) -> _Parsed:
    sha, size = (known.sha256, known.size) if known is not None else _sha256(path)
    return _Parsed(
        path=path,
        sha256=sha,
        size=size,
        sop_class_uid=uids["sop_class_uid"],
        sop_uid=uids["sop_instance_uid"],
        study_uid=uids["study_uid"],
        series_uid=uids["series_uid"],
        transfer_syntax_uid=ts,
        # Keep only what the index rows need; the full attributes live on as packed JSON bytes,
        # so a large batch holds kilobytes per instance, not a tree of Python objects.
        # Bounded by VR (dicom.bounds): the index never holds more than a VR allows; the
        # object and its WADO-RS metadata keep the whole values.
        attrs=bound_dataset({k: v for k, v in attrs.items() if _for_rows(k)}),
        metadata_packed=pack_metadata(orjson.dumps(attrs)),
        # What the prior lookup needs of this instance (slice, contrast, dose), read once here.
        facts=instance_facts(attrs),
    )


_NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})


def _short_native_pixels(ds: Any, value: Any) -> bool:
    try:
        if str(ds.file_meta.TransferSyntaxUID) not in _NATIVE or not isinstance(value, bytes | bytearray):
            return False
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
        samples = int(ds.SamplesPerPixel)
        if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
            samples = 2  # chroma subsampled: two samples per pixel on average
        expected = (int(ds.Rows) * int(ds.Columns) * samples * frames * bits + 7) // 8
    except (AttributeError, TypeError, ValueError):
        return False
    return len(value) < expected


def _against_request(ds: Any, expected_sop: tuple[str, str]) -> StoreOutcome | None:
    """A C-STORE's data set must be the instance its command names (PS3.4 B.2.3: 0xA900)."""
    try:
        found_class = str(ds.get("SOPClassUID", "") or "").strip()
        found_instance = str(ds.get("SOPInstanceUID", "") or "").strip()
    except Exception as exc:  # noqa: BLE001 - a malformed element
        return StoreOutcome.failed(status.CANNOT_UNDERSTAND, f"cannot parse DICOM: {type(exc).__name__}")
    if not found_class and not found_instance:
        return StoreOutcome.failed(status.CANNOT_UNDERSTAND, "data set cannot be parsed (no SOP UIDs)")
    for found, wanted, keyword in (
        (found_class, expected_sop[0], "SOPClassUID"),
        (found_instance, expected_sop[1], "SOPInstanceUID"),
    ):
        if found != wanted.strip():
            return StoreOutcome.failed(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} differs from the request's"
            )
    return None


def _truncated(ds: Any, fp: BinaryIO, size: int) -> bool:
    """Whether the file was cut short. pydicom stops quietly at a truncated element (keeping
    what bytes there were), and a deferred value is never read at ingest, so compare where the
    dataset ends with the file. Must run before anything converts the dataset's elements."""
    keys = list(ds.keys())
    if not keys:
        return True
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.1.99":
        # Deflated: offsets count inflated bytes, and zlib itself fails on a cut stream.
        return False
    last = ds.get_item(keys[-1], keep_deferred=True)
    if not isinstance(last, RawDataElement):
        # Read eagerly (undefined length, or a value pydicom had to read short): for native
        # pixel data the expected size is known; for anything else trust the parser.
        return last.tag == 0x7FE00010 and _short_native_pixels(ds, last.value)
    if last.length == 0xFFFFFFFF:
        return False
    if last.value is not None:
        if len(last.value) < last.length:
            return True
        end = last.value_tell + len(last.value)
    else:
        end = last.value_tell + last.length
    if end > size:
        return True
    # Bytes after the dataset that are not zero padding are an element pydicom could not read
    # (usually none: this reads nothing).
    if end < size:
        fp.seek(end)
        while chunk := fp.read(1 << 16):
            if chunk.strip(b"\x00"):
                return True
    return False


def worker_pid(_n: int) -> int:
    return os.getpid()


@contextmanager
def without_main_script() -> Iterator[None]:
    """Start spawned processes without re-running the main script in them. `spawn` imports the
    parent's `__main__` by path in every child, and for `scanonce serve` that is the console
    script, which imports the whole broker (~90 MB a worker) before the worker unpickles its
    first task, which needs only this module."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path
