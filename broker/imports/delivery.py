"""Delivering coerced instances to a destination archive and asking it what it holds.

A `Sender` is opened once per import run and keeps its connection across batches: C-STORE goes
through `broker.peers.dimse.StoreSession` (one association for the whole run, each file sent from
disk as it is); STOW-RS is one streamed multipart/related POST per batch on one keep-alive HTTP
connection, the body a generator reading the files in chunks, so a batch is never held in
memory. Both return one `Outcome` per file, in order.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

from broker.errors import Unavailable
from broker.peers import dimse as scu
from broker.peers.archive import Archive
from broker.peers.errors import DimseStatusError
from broker.security import network

_CHUNK = 1 << 20
_T_SOP_UID = "00081155"  # ReferencedSOPInstanceUID
_T_FAILED = "00081198"  # FailedSOPSequence
_T_REFERENCED = "00081199"  # ReferencedSOPSequence
_T_FAILURE_REASON = "00081197"
_T_WARNING_REASON = "00081196"
_TIMEOUT = httpx.Timeout(120.0, connect=5.0)


@dataclass(frozen=True, slots=True)
class Spliced:
    """A coerced instance sent by STOW-RS without being written out first: new bytes and
    [start, end) byte ranges of its source file, in order (`reconcile.Coercer.splice`)."""

    source: str  # path of the stored file
    parts: tuple[bytes | tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(len(p) if isinstance(p, bytes) else p[1] - p[0] for p in self.parts)

    def chunks(self) -> Iterator[bytes]:
        with open(self.source, "rb") as fp:
            for part in self.parts:
                if isinstance(part, bytes):
                    yield part
                    continue
                start, end = part
                fp.seek(start)
                while start < end:
                    chunk = fp.read(min(end - start, _CHUNK))
                    if not chunk:
                        raise OSError(f"{self.source} is shorter than when it was coerced")
                    yield chunk
                    start += len(chunk)


# What is sent: a file's path, or a spliced instance (STOW-RS only).
File = str | Spliced


@dataclass(frozen=True, slots=True)
class Outcome:
    sop_uid: str
    status: str  # sent | warning | failed
    code: int | None = None
    detail: str = ""


def via_of(facility: Archive, wanted: str = "") -> str:
    """How to deliver to `facility`: what was asked if it has that endpoint, else DICOMweb when
    registered (one HTTP stream per batch), else DIMSE."""
    has_web = bool(facility.dicomweb_url)
    has_dimse = bool(facility.ae_title and facility.host and facility.port)
    if wanted == "dicomweb" and has_web or wanted == "dimse" and has_dimse:
        return wanted
    if wanted:
        raise Unavailable(f"facility {facility.id!r} has no {wanted} endpoint registered")
    if has_web:
        return "dicomweb"
    if has_dimse:
        return "dimse"
    raise Unavailable(f"facility {facility.id!r} has no archive endpoint to import into")


def deliver(
    *, facility: Archive, via: str, files: Sequence[tuple[File, str]], calling_ae: str
) -> list[Outcome]:
    """Send (path, sop_uid) files on a connection of their own (see `Sender`)."""
    with Sender(facility=facility, via=via, calling_ae=calling_ae) as sender:
        return sender.send(files)


class Sender:
    """Delivery to one archive over one connection kept across `send` calls (an association, or
    a keep-alive HTTP connection); opened lazily, re-opened after a failure."""

    def __init__(self, *, facility: Archive, via: str, calling_ae: str) -> None:
        self.facility, self.via, self.calling_ae = facility, via, calling_ae
        self._dimse: scu.StoreSession | None = None
        self._http: httpx.Client | None = None

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._dimse is not None:
            self._dimse.close()
        if self._http is not None:
            self._http.close()
        self._dimse = self._http = None

    def send(
        self, files: Sequence[tuple[File, str]], *, written: Callable[[], None] | None = None
    ) -> list[Outcome]:
        """Send (path or spliced instance, sop_uid) files; Unavailable when the archive cannot be
        reached at all (the caller retries the batch with backoff). STOW-RS calls `written` (if
        given) once the request's body is all written, while the archive stores it and before
        its answer is read: the time to do other work without slowing this request's writes."""
        if self.via == "dimse":
            return self._cstore(files)
        if self._http is None:
            self._http = network.guarded_client(timeout=_TIMEOUT)
        try:
            return _stow(self._http, self.facility, files, written)
        except Unavailable:
            self._http.close()  # a connection left half-way through a body is not reused
            self._http = None
            raise

    def _cstore(self, files: Sequence[tuple[File, str]]) -> list[Outcome]:
        facility = self.facility
        assert facility.ae_title and facility.host and facility.port
        paths = [p for p, _ in files if isinstance(p, str)]
        assert len(paths) == len(files), "C-STORE sends files from disk"
        if self._dimse is None:
            self._dimse = scu.StoreSession(
                host=facility.host, port=int(facility.port), called_ae=facility.ae_title,
                calling_ae=self.calling_ae,
            )  # fmt: skip
        try:
            results = self._dimse.send(paths)
        except DimseStatusError as exc:
            raise Unavailable(str(exc)) from exc
        return _outcomes(results)


def _outcomes(results: Sequence[scu.StoreResult]) -> list[Outcome]:
    out = []
    for r in results:
        if r.status == 0x0000:
            out.append(Outcome(r.sop_instance_uid, "sent", r.status, r.comment))
        elif r.ok:
            out.append(Outcome(r.sop_instance_uid, "warning", r.status, r.comment))
        else:
            out.append(Outcome(r.sop_instance_uid, "failed", r.status, r.comment or _refusal(r.status)))
    return out


def _refusal(status: int) -> str:
    """A DIMSE failure status in words (PS3.4 B.2.3 / PS3.7 C), for the instance's outcome."""
    meaning = (STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status) or ("", ""))[1]
    return f"refused by the archive: status 0x{status:04X}" + (f" ({meaning})" if meaning else "")


def _body(files: Sequence[File], boundary: str, written: Callable[[], None] | None = None) -> Iterator[bytes]:
    for file in files:
        lead = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        if isinstance(file, Spliced):
            # The part's head and the spliced instance's header (new bytes, a few KB) in one
            # write: each write is a GIL hand-off, which the import's other threads contend for.
            chunks = file.chunks()
            yield lead + next(chunks, b"")
            yield from chunks
        else:
            yield lead
            with open(file, "rb") as fp:
                while chunk := fp.read(_CHUNK):
                    yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()
    # Asked for the next piece: the last one is written (httpx sends a piece before it asks).
    if written is not None:
        written()


def _stow(
    client: httpx.Client,
    facility: Archive,
    files: Sequence[tuple[File, str]],
    written: Callable[[], None] | None = None,
) -> list[Outcome]:
    assert facility.dicomweb_url
    boundary = uuid.uuid4().hex
    size = sum(p.size if isinstance(p, Spliced) else os.path.getsize(p) for p, _ in files)
    try:
        rsp = client.post(
            f"{facility.dicomweb_url.rstrip('/')}/studies",
            content=_body([p for p, _ in files], boundary, written),
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
                "Content-Length": str(size + _overhead(len(files), boundary)),
            },
        )
    except httpx.HTTPError as exc:
        raise Unavailable(f"facility {facility.id!r} cannot be reached by STOW-RS: {exc}") from exc
    except OSError as exc:  # a file of the batch could not be read while it was sent
        raise Unavailable(f"a file for facility {facility.id!r} could not be read: {exc}") from exc
    if rsp.status_code >= 500 and rsp.status_code != 502:
        raise Unavailable(f"facility {facility.id!r} answered STOW-RS with HTTP {rsp.status_code}")
    try:
        doc: dict[str, Any] = rsp.json() if rsp.content else {}
    except ValueError:
        doc = {}
    if isinstance(doc, list):
        doc = doc[0] if doc else {}
    stored = {_value(i, _T_SOP_UID): i for i in _items(doc, _T_REFERENCED)}
    failed = {_value(i, _T_SOP_UID): i for i in _items(doc, _T_FAILED)}
    out = []
    for _, sop in files:
        if sop in stored:
            warn = _value(stored[sop], _T_WARNING_REASON)
            out.append(Outcome(sop, "warning" if warn else "sent", int(warn) if warn else 0))
        elif sop in failed:
            reason = _value(failed[sop], _T_FAILURE_REASON)
            out.append(
                Outcome(sop, "failed", int(reason) if reason else rsp.status_code, "refused by STOW-RS")
            )
        else:
            out.append(Outcome(sop, "failed", rsp.status_code, f"not acknowledged (HTTP {rsp.status_code})"))
    return out


def _overhead(n: int, boundary: str) -> int:
    part = len(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()) + 2
    return n * part + len(f"--{boundary}--\r\n".encode())


def _items(doc: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list((doc.get(tag) or {}).get("Value") or [])


def _value(item: dict[str, Any], tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else ""


# -- what the destination holds -----------------------------------------------------------------


def study_patients(*, facility: Archive, via: str, study_uid: str, calling_ae: str) -> set[tuple[str, str]]:
    """The (PatientID, IssuerOfPatientID) pairs the destination holds the study UID under
    (several when an archive keeps one study per patient, as Orthanc does)."""
    keys = {"StudyInstanceUID": study_uid, "PatientID": "", "IssuerOfPatientID": ""}
    rows = _query(facility, via, "STUDY", keys, calling_ae, "/studies", {"StudyInstanceUID": study_uid})
    return {(_value(r, "00100020"), _value(r, "00100021")) for r in rows}


def series_counts(*, facility: Archive, via: str, study_uid: str, calling_ae: str) -> dict[str, int] | None:
    """How many instances the destination holds in each series of the study (its
    NumberOfSeriesRelatedInstances, summed over its records of a series UID): a query the
    archive answers from its index, where one listing every instance may make it read each
    file (Orthanc's QIDO-RS does). None when it does not give the count."""
    keys = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "", "NumberOfSeriesRelatedInstances": ""}
    rows = _query(facility, via, "SERIES", keys, calling_ae, f"/studies/{study_uid}/series", {})
    out: dict[str, int] = {}
    for r in rows:
        series, count = _value(r, "0020000E"), _value(r, "00201209")
        if not series or not count.isdigit():
            return None
        out[series] = out.get(series, 0) + int(count)
    return out


def held_instances(*, facility: Archive, via: str, study_uid: str, calling_ae: str) -> set[str]:
    """SOP Instance UIDs the destination holds in the study (post-send verification)."""
    keys = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "", "SOPInstanceUID": ""}
    rows = _query(facility, via, "IMAGE", keys, calling_ae, f"/studies/{study_uid}/instances", {})
    return {v for r in rows if (v := _value(r, "00080018"))}


def _query(
    facility: Archive, via: str, level: str, keys: dict[str, str], calling_ae: str, path: str,
    match: dict[str, str],
) -> list[dict[str, Any]]:  # fmt: skip
    if via == "dimse":
        assert facility.ae_title and facility.host and facility.port
        try:
            return scu.find(
                host=facility.host,
                port=int(facility.port),
                called_ae=facility.ae_title,
                level=level,  # type: ignore[arg-type]
                keys=keys,
                calling_ae=calling_ae,
            )
        except DimseStatusError as exc:
            raise Unavailable(str(exc)) from exc
    assert facility.dicomweb_url
    url = f"{facility.dicomweb_url.rstrip('/')}{path}"
    # All in `params`: httpx replaces a query string written in the URL by `params`.
    params: list[tuple[str, str | int | float | bool | None]] = list(match.items())
    if level == "STUDY":
        params += [("includefield", "00100020"), ("includefield", "00100021")]
    elif level == "SERIES":
        params += [("includefield", "00201209")]
    try:
        with network.guarded_client(timeout=_TIMEOUT) as client:
            rsp = client.get(url, params=params, headers={"Accept": "application/dicom+json"})
    except httpx.HTTPError as exc:
        raise Unavailable(f"facility {facility.id!r} cannot be reached by QIDO-RS: {exc}") from exc
    if rsp.status_code in (204, 404):
        return []
    if rsp.status_code >= 400:
        raise Unavailable(f"facility {facility.id!r} answered QIDO-RS with HTTP {rsp.status_code}")
    data = rsp.json() if rsp.content else []
    return data if isinstance(data, list) else []
