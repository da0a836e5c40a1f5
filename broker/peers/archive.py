"""Talking to a facility's archive: QIDO-RS / WADO-RS over HTTP (httpx), C-FIND / C-GET over
DIMSE (pynetdicom). Index sync and retrieve on demand use these and nothing else.

Every network failure becomes `broker.errors.Unavailable` naming the facility, so one archive
being down is reported as such and never looks like a broker bug.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import httpx
import multipart as mp
import orjson
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from broker.errors import BadRequest, NotFound, Unavailable
from broker.security import network
from broker.security.tls import tls_kwargs

log = logging.getLogger("scanonce.peers")


class Archive(Protocol):
    """Where a facility's archive answers; `broker.facilities.models.Facility` is one."""

    @property
    def id(self) -> str: ...
    @property
    def dicomweb_url(self) -> str | None: ...
    @property
    def ae_title(self) -> str | None: ...
    @property
    def host(self) -> str | None: ...
    @property
    def port(self) -> int | None: ...


UID_BATCH = 50  # studies per series query (a UID list keeps round trips few)
PARALLEL_QUERIES = 4  # QIDO-RS queries in flight to one archive
LISTING_TIMEOUT = 600.0
TIMEOUT = httpx.Timeout(LISTING_TIMEOUT, connect=5.0)

# QIDO-RS asks with one includefield parameter per key: PS3.18 allows a comma-separated list
# too, but Orthanc's DICOMweb plugin (1.x) reads such a list as one unknown name and quietly
# leaves out every key that is not in its default answer (IssuerOfPatientID among them).
_STUDY_FIELDS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
    "PatientSex", "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)  # fmt: skip
_SERIES_FIELDS = (
    "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
    "BodyPartExamined", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "NumberOfSeriesRelatedInstances",
)  # fmt: skip
# Study and patient keys asked for at SERIES level too, so one series listing describes its study.
_UPPER_FIELDS = tuple(f for f in _STUDY_FIELDS if not f.startswith(("NumberOf", "ModalitiesIn")))
# By C-FIND, only keys an archive keeps in its database: one it must open each file for (Orthanc:
# anything outside its "main DICOM tags", such as the PPS start date) halves its answer rate.
_CFIND_SERIES_FIELDS = tuple(f for f in _SERIES_FIELDS if not f.startswith("PerformedProcedureStep"))
# IssuerOfPatientID is such a key too (Orthanc 1.10: a re-sync's STUDY listing by C-FIND went from
# ~950 to ~350 studies/s with it), but it qualifies the Patient ID, so it cannot be left out. The
# STUDY listing, which is all an unchanged re-sync asks, goes without; the SERIES queries, which
# a sync makes only for new or changed studies (and the first sync's whole-archive listing), ask
# for it, and sync takes it from there. By QIDO-RS it costs nothing measurable: both levels ask.
_CFIND_STUDY_FIELDS = tuple(f for f in _STUDY_FIELDS if f != "IssuerOfPatientID")
_T_STUDY_UID = "0020000D"
_T_SERIES_UID = "0020000E"


@dataclass(slots=True)
class RemoteStudy:
    uid: str
    attrs: dict[str, Any]  # DICOM JSON (PS3.18 F.2), study level
    num_series: int
    num_instances: int


@dataclass(slots=True)
class RemoteSeries:
    uid: str
    study_uid: str
    attrs: dict[str, Any]
    num_instances: int


def _first(attrs: dict[str, Any], tag: str) -> Any:
    values = (attrs.get(tag) or {}).get("Value") or [None]
    return values[0]


def _count(attrs: dict[str, Any], tag: str) -> int:
    try:
        return int(_first(attrs, tag) or 0)
    except (TypeError, ValueError):
        return 0


def _study(attrs: dict[str, Any]) -> RemoteStudy | None:
    uid = _first(attrs, _T_STUDY_UID)
    if not uid:
        return None
    return RemoteStudy(
        uid=str(uid),
        attrs=attrs,
        num_series=_count(attrs, "00201206"),
        num_instances=_count(attrs, "00201208"),
    )


def _series(attrs: dict[str, Any]) -> RemoteSeries | None:
    uid, study_uid = _first(attrs, _T_SERIES_UID), _first(attrs, _T_STUDY_UID)
    if not uid or not study_uid:
        return None
    return RemoteSeries(
        uid=str(uid), study_uid=str(study_uid), attrs=attrs, num_instances=_count(attrs, "00201209")
    )


def _is_match_list(data: Any) -> TypeGuard[list[dict[str, Any]]]:
    """A PS3.18 F.2 answer: a list of objects whose attributes are objects with a list Value."""
    return isinstance(data, list) and all(
        isinstance(row, dict)
        and all(isinstance(attr, dict) and isinstance(attr.get("Value", []), list) for attr in row.values())
        for row in data
    )


# The keys each level's match must carry (PS3.4 C.4.1.2.2.1: an SCP returns the unique keys of
# the level and those above it in a Study Root answer).
_UNIQUE = {"STUDY": (_T_STUDY_UID,), "SERIES": (_T_STUDY_UID, _T_SERIES_UID)}


def _named(row: dict[str, Any], level: str, facility: Archive, via: str) -> dict[str, Any]:
    """`row`, which names its study (and series): a match without them is no match a sync can
    use, and skipping it would read an answer of such rows as "no studies there" and drop every
    study of the facility from the index."""
    if not all(_first(row, tag) for tag in _UNIQUE[level]):
        raise Unavailable(
            f"facility {facility.id!r} answered a {via} {level.lower()} query with a match "
            "that has no unique key (StudyInstanceUID, SeriesInstanceUID)"
        )
    return row


class Source(Protocol):
    """A facility archive, as index sync sees it."""

    def studies(self, study_uids: Sequence[str] | None = None) -> list[RemoteStudy]:
        """Every study at the facility (or those of `study_uids` that exist there)."""
        ...

    def series(self, study_uids: Sequence[str] | None = None) -> list[RemoteSeries]:
        """The series of the given studies, or every series at the facility (None)."""
        ...

    # True when one whole-archive SERIES listing is the cheaper way to describe a new archive
    # than a STUDY listing followed by SERIES queries for every study.
    prefers_series_listing: bool

    def close(self) -> None: ...


def studies_from_series(series: Sequence[RemoteSeries]) -> list[RemoteStudy]:
    """Studies as seen through their series: a series answer carries its study's attributes
    (QIDO-RS and C-FIND both return the upper levels' keys), and the counts are sums."""
    by_study: dict[str, RemoteStudy] = {}
    for se in series:
        study = by_study.get(se.study_uid)
        if study is None:
            by_study[se.study_uid] = study = RemoteStudy(
                uid=se.study_uid, attrs=se.attrs, num_series=0, num_instances=0
            )
        study.num_series += 1
        study.num_instances += se.num_instances
    return list(by_study.values())


def open_source(facility: Archive, *, calling_ae: str = "SCANONCE") -> Source:
    if facility.dicomweb_url:
        return QidoSource(facility)
    if facility.ae_title and facility.host and facility.port:
        return CFindSource(facility, calling_ae=calling_ae)
    raise BadRequest(f"facility {facility.id!r} has neither a DICOMweb URL nor a DIMSE endpoint")


# -- DICOMweb ---------------------------------------------------------------------------------


def _unavailable(facility: Archive, exc: Exception) -> Unavailable:
    where = facility.dicomweb_url or f"{facility.ae_title}@{facility.host}:{facility.port}"
    return Unavailable(
        f"facility {facility.id!r} is unavailable ({where}): {type(exc).__name__}: {exc}"[:500]
    )


class QidoSource:
    # Measured on Orthanc: a UID-list query costs a scan of the archive's index, so one
    # whole-archive listing beats per-batch queries once most studies are new.
    prefers_series_listing = True

    def __init__(self, facility: Archive, *, page: int = 5000) -> None:
        assert facility.dicomweb_url
        self.facility = facility
        self.page = page
        self.client = network.guarded_client(base_url=facility.dicomweb_url.rstrip("/"), timeout=TIMEOUT)

    def _get(self, path: str, params: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
        """One QIDO-RS answer, and whether the archive says it left matches out."""
        try:
            r = self.client.get(path, params=params, headers={"Accept": "application/dicom+json"})
        except httpx.HTTPError as exc:
            raise _unavailable(self.facility, exc) from exc
        if r.status_code == 204:
            return [], False
        if r.status_code >= 500:
            raise Unavailable(f"facility {self.facility.id!r} answered {r.status_code} to a QIDO-RS query")
        if r.status_code >= 400:
            raise BadRequest(f"facility {self.facility.id!r} refused a QIDO-RS query ({r.status_code})")
        try:
            data = orjson.loads(r.content)
        except orjson.JSONDecodeError:
            data = None
        if not _is_match_list(data):
            # Not read as "no matches": a sync would then drop every study of the facility.
            # The body is not quoted (it may be anything, patient data included).
            kind = r.headers.get("content-type", "no content type").split(";")[0][:64]
            raise Unavailable(
                f"facility {self.facility.id!r} answered a QIDO-RS query with {r.status_code} "
                f"but not a DICOM JSON match list ({kind})"
            )
        # PS3.18 8.3.4.4: a cut answer carries Warning: 299 ... "There are additional results".
        more = "additional results" in r.headers.get("warning", "").lower()
        return data, more

    def _all(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        # One unpaged query first: paging is not stable on every archive (Orthanc's offsets can
        # repeat one match and skip another), so offsets are used only when the archive cuts
        # its answer itself.
        rows, more = self._get(path, params)
        while more and rows:
            page, more = self._get(path, {**params, "offset": len(rows), "limit": self.page})
            if not page:
                break
            rows.extend(page)
        level = "STUDY" if path == "/studies" else "SERIES"
        return [_named(row, level, self.facility, "QIDO-RS") for row in rows]

    def studies(self, study_uids: Sequence[str] | None = None) -> list[RemoteStudy]:
        params: dict[str, Any] = {"includefield": list(_STUDY_FIELDS)}
        if study_uids is None:
            return [s for s in map(_study, self._all("/studies", params)) if s is not None]
        out: list[RemoteStudy] = []
        for i in range(0, len(study_uids), UID_BATCH):
            # A UID list (PS3.18 8.3.4.1) asks about a batch of studies in one round trip.
            rows = self._all(
                "/studies", {**params, "StudyInstanceUID": ",".join(study_uids[i : i + UID_BATCH])}
            )
            out.extend(s for s in map(_study, rows) if s is not None)
        return out

    def series(self, study_uids: Sequence[str] | None = None) -> list[RemoteSeries]:
        params: dict[str, Any] = {"includefield": list(_UPPER_FIELDS + _SERIES_FIELDS)}
        if study_uids is None:
            return [s for s in map(_series, self._all("/series", params)) if s is not None]
        batches = [study_uids[i : i + UID_BATCH] for i in range(0, len(study_uids), UID_BATCH)]

        def ask(batch: Sequence[str]) -> list[dict[str, Any]]:
            return self._all("/series", {**params, "StudyInstanceUID": ",".join(batch)})

        # A few queries in flight: an archive answers each one on its own thread.
        with ThreadPoolExecutor(PARALLEL_QUERIES) as pool:
            return [s for rows in pool.map(ask, batches) for s in map(_series, rows) if s is not None]

    def close(self) -> None:
        self.client.close()


def wado_retrieve_study(*, facility: Archive, study_uid: str, into: str) -> list[str]:
    """WADO-RS retrieve of a whole study, streamed part by part into files under `into`."""
    assert facility.dicomweb_url
    url = f"{facility.dicomweb_url.rstrip('/')}/studies/{study_uid}"
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    paths: list[str] = []
    try:
        with (
            network.guarded_client(timeout=TIMEOUT) as client,
            client.stream("GET", url, headers={"Accept": accept}) as r,
        ):
            if r.status_code == 404:
                raise NotFound(f"study not found at facility {facility.id!r}")
            if r.status_code >= 400:
                raise Unavailable(f"facility {facility.id!r} answered {r.status_code} to a WADO-RS retrieve")
            boundary = _boundary(r.headers.get("content-type", ""), facility)
            parser = _RelatedParser(boundary, max_header_count=64)
            current = None
            try:
                for chunk in r.iter_bytes(1 << 20):
                    for event in parser.parse(chunk):
                        if isinstance(event, mp.MultipartSegment):
                            current = open(os.path.join(into, f"{len(paths):06d}.dcm"), "wb")  # noqa: SIM115
                            paths.append(current.name)
                        elif event is None:
                            if current is not None:
                                current.close()
                            current = None
                        elif current is not None:
                            current.write(event)
                for _ in parser.parse(b""):
                    pass
            finally:
                if current is not None:
                    current.close()
    except httpx.HTTPError as exc:
        raise _unavailable(facility, exc) from exc
    except mp.ParserError as exc:
        raise Unavailable(f"facility {facility.id!r} sent a broken multipart body: {exc}") from exc
    return paths


class _RelatedParser(mp.PushMultipartParser):
    """multipart/related parts have no Content-Disposition (the parser's form-data rule)."""

    def _create_segment(self, headerlist: list[tuple[str, str]]) -> mp.MultipartSegment:
        return mp.MultipartSegment(headerlist)


def _boundary(content_type: str, facility: Archive) -> str:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            return value.strip().strip('"')
    kind = content_type.split(";")[0][:64] or "no content type"
    raise Unavailable(f"facility {facility.id!r} answered a WADO-RS retrieve but not multipart ({kind})")


# -- DIMSE ------------------------------------------------------------------------------------


def _dimse_identifier(level: str, fields: Sequence[str], **values: str) -> Any:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in fields:
        setattr(ds, keyword, values.get(keyword, ""))
    return ds


def _json_of(identifier: Any) -> dict[str, Any]:
    """DICOM JSON of a C-FIND answer, without the elements whose value does not convert (an IS
    of 'abcd'): one sloppy attribute of one study must not stop the facility's whole sync, and
    a QIDO-RS value that is not a number is read as absent too. Not pydicom's
    `suppress_invalid_tags`, which logs the offending value (it may be a name or a date)."""
    out: dict[str, Any] = {}
    for key in tuple(identifier.keys()):  # the tags: iterating the Dataset converts each value
        try:
            out[f"{key:08X}"] = identifier[key].to_json_dict(
                bulk_data_element_handler=None, bulk_data_threshold=1 << 30
            )
        except (ValueError, TypeError, OverflowError):
            continue
    return out


class CFindSource:
    """C-FIND at STUDY level, then SERIES level for the studies that changed (Study Root).

    One association for the whole sync (broker.peers.dimse opens one per call, which costs more
    than the query when a sync asks hundreds of them)."""

    prefers_series_listing = True

    def __init__(self, facility: Archive, *, calling_ae: str = "SCANONCE") -> None:
        self.facility = facility
        self.calling_ae = calling_ae
        self._assoc: Any = None

    def _association(self) -> Any:
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        ae = AE(ae_title=self.calling_ae)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        # An archive answers a whole-archive C-FIND only once it has gathered every match, and
        # QIDO-RS likewise: minutes for a large archive on a busy host, not a sign it is down.
        ae.acse_timeout = 10
        ae.network_timeout = ae.dimse_timeout = LISTING_TIMEOUT
        try:
            port = int(self.facility.port or 0)
            address = network.check_host(
                self.facility.host or "",
                port,
                network.outbound_networks(),
                what=f"facility {self.facility.id!r}",
            )
            assoc = ae.associate(
                address,
                port,
                ae_title=self.facility.ae_title or "",
                **tls_kwargs(hostname=self.facility.host),
            )
        except OSError as exc:
            raise _unavailable(self.facility, exc) from exc
        if not assoc.is_established:
            raise Unavailable(
                f"facility {self.facility.id!r} refused or did not answer an association "
                f"({self.facility.ae_title}@{self.facility.host}:{self.facility.port})"
            )
        self._assoc = assoc
        return assoc

    def _find(self, identifier: Any) -> Iterator[dict[str, Any]]:
        assoc = self._association()
        level = str(identifier.QueryRetrieveLevel)
        for status, ds in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                self.close()
                raise Unavailable(
                    f"facility {self.facility.id!r} aborted or stopped answering a C-FIND "
                    f"(is {self.calling_ae} a known AE there?)"
                )
            if code in (0xFF00, 0xFF01):
                if ds is not None:
                    yield _named(_json_of(ds), level, self.facility, "C-FIND")
            elif code != 0x0000:
                raise Unavailable(f"facility {self.facility.id!r} failed a C-FIND (status 0x{code:04X})")

    def studies(self, study_uids: Sequence[str] | None = None) -> list[RemoteStudy]:
        if study_uids is None:
            return [
                s
                for s in map(_study, self._find(_dimse_identifier("STUDY", _CFIND_STUDY_FIELDS)))
                if s is not None
            ]
        out: list[RemoteStudy] = []
        for i in range(0, len(study_uids), UID_BATCH):
            # List of UID matching (PS3.4 C.2.2.2.2): one C-FIND for a batch of studies.
            ident = _dimse_identifier(
                "STUDY", _CFIND_STUDY_FIELDS, StudyInstanceUID="\\".join(study_uids[i : i + UID_BATCH])
            )
            out.extend(s for s in map(_study, self._find(ident)) if s is not None)
        return out

    def series(self, study_uids: Sequence[str] | None = None) -> list[RemoteSeries]:
        fields = _UPPER_FIELDS + _CFIND_SERIES_FIELDS
        if study_uids is None:
            return [s for s in map(_series, self._find(_dimse_identifier("SERIES", fields))) if s is not None]
        out: list[RemoteSeries] = []
        for i in range(0, len(study_uids), UID_BATCH):
            ident = _dimse_identifier(
                "SERIES", fields, StudyInstanceUID="\\".join(study_uids[i : i + UID_BATCH])
            )
            out.extend(s for s in map(_series, self._find(ident)) if s is not None)
        return out

    def close(self) -> None:
        if self._assoc is not None:
            try:
                self._assoc.release()
            except Exception:  # noqa: BLE001 - the peer may already be gone
                self._assoc.abort()
            self._assoc = None
