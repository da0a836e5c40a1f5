"""DIMSE client functions for the other domains (federation sync, retrieve on demand, imports):
`echo`, `find`, `move`, `get` and `store`.

Every function is keyword-only and blocking, opens one association for its job and releases
it, and returns plain values. A peer that cannot be reached, refuses the association, aborts
or stops answering raises `broker.errors.Unavailable` naming the peer; a peer that answers with
a failure status raises `DimseStatusError` (status and ErrorComment kept). `StoreSession` is
`store` for a caller sending many batches: one association kept open across them.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from broker.dicom import reactor
from broker.dicom.network import SpoolingAE, chunked_send
from broker.dicom.uids import is_valid_uid
from broker.errors import BadRequest, Unavailable
from broker.peers.errors import DimseStatusError
from broker.security import network
from broker.security.tls import tls_kwargs

Model = Literal["study", "patient"]
Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
_FIND = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
}
_MOVE = {
    "study": StudyRootQueryRetrieveInformationModelMove,
    "patient": PatientRootQueryRetrieveInformationModelMove,
}
_GET = {
    "study": StudyRootQueryRetrieveInformationModelGet,
    "patient": PatientRootQueryRetrieveInformationModelGet,
}
_MAX_STORAGE_CONTEXTS = 120  # 128 presentation contexts at most, one is the C-GET model
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_STORE_OK = (0x0000, 0xB000, 0xB006, 0xB007)  # success and the PS3.4 B.2.3 warnings


@dataclass(frozen=True, slots=True)
class StoreResult:
    """The outcome of one C-STORE: the peer's status and ErrorComment, if any."""

    path: str
    sop_instance_uid: str
    status: int
    comment: str = ""

    @property
    def ok(self) -> bool:
        return self.status in _STORE_OK


@dataclass
class RetrieveResult:
    """What a C-MOVE or C-GET did: sub-operation counts, the SOP Instance UIDs the peer
    reported as failed, and (C-GET) the Part 10 files written."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_sop_uids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def _peer(called_ae: str, host: str, port: int) -> str:
    return f"DICOM peer {called_ae}@{host}:{port}"


@contextmanager
def _association(
    *,
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    contexts: Sequence[Any],
    timeout: float,
    ae: Any = None,
    **kwargs: Any,
) -> Iterator[Any]:
    reactor.install()
    ae = ae or SpoolingAE(ae_title=calling_ae)
    ae.ae_title = calling_ae
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.dimse_timeout = max(timeout, 60.0)
    ae.requested_contexts = list(contexts)
    kwargs["evt_handlers"] = [*kwargs.get("evt_handlers", ()), (evt.EVT_CONN_OPEN, _no_delay)]
    # Only to the administrator's outbound networks, on the address checked (DNS rebinding).
    address = network.check_host(
        host, int(port), network.outbound_networks(), what=_peer(called_ae, host, port)
    )
    kwargs.update(tls_kwargs(hostname=host))
    try:
        assoc = ae.associate(address, int(port), ae_title=called_ae, **kwargs)
    except OSError as exc:
        raise Unavailable(f"{_peer(called_ae, host, port)} cannot be reached: {exc.strerror or exc}") from exc
    if assoc.is_rejected:
        raise Unavailable(f"{_peer(called_ae, host, port)} rejected the association (is {calling_ae} known?)")
    if not assoc.is_established:
        raise Unavailable(f"{_peer(called_ae, host, port)} is down or did not answer")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _no_delay(event: evt.Event) -> None:
    """Send each PDU at once: Nagle's algorithm holds a request written in pieces until the
    peer's delayed ACK, tens of milliseconds per exchange (the same as the SCP does)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _status(rsp: Dataset | None, *, peer: str, what: str) -> int:
    status = getattr(rsp, "Status", None)
    if status is None:
        raise Unavailable(
            f"{peer} stopped answering a {what}: timeout, or it aborted the association "
            "(some archives, e.g. Orthanc, abort requests from AE titles they do not know)"
        )
    return int(status)


def _identifier(level: Level, keys: Mapping[str, str | None]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        if keyword != "QueryRetrieveLevel":
            setattr(ds, keyword, value if value is not None else "")
    return ds


def echo(
    *, host: str, port: int, called_ae: str, calling_ae: str = "SCANONCE", timeout: float = 10.0
) -> None:
    """C-ECHO the peer; returns if it answers Success."""
    peer = _peer(called_ae, host, port)
    with _association(
        host=host, port=port, called_ae=called_ae, calling_ae=calling_ae,
        contexts=[build_context(Verification)], timeout=timeout,
    ) as assoc:  # fmt: skip
        status = _status(assoc.send_c_echo(), peer=peer, what="C-ECHO")
    if status != 0x0000:
        raise DimseStatusError(peer=peer, operation="C-ECHO", status=status)


def find(
    *,
    host: str,
    port: int,
    called_ae: str,
    level: Level,
    keys: Mapping[str, str | None],
    model: Model = "study",
    calling_ae: str = "SCANONCE",
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    """C-FIND; `keys` maps DICOM keywords to match values (empty or None: return the attribute).

    Returns each match as a DICOM JSON object (PS3.18 F.2), the shape the index and QIDO-RS use.
    """
    peer = _peer(called_ae, host, port)
    sop_class = _FIND[model]
    out: list[dict[str, Any]] = []
    with _association(
        host=host, port=port, called_ae=called_ae, calling_ae=calling_ae,
        contexts=[build_context(sop_class)], timeout=timeout,
    ) as assoc:  # fmt: skip
        for rsp, identifier in assoc.send_c_find(_identifier(level, keys), sop_class):
            status = _status(rsp, peer=peer, what="C-FIND")
            if status in (0xFF00, 0xFF01):
                if identifier is not None:
                    out.append(identifier.to_json_dict(1 << 30, 1 << 30))
            elif status != 0x0000:
                raise DimseStatusError(
                    peer=peer, operation="C-FIND", status=status, comment=str(rsp.get("ErrorComment", ""))
                )
    return out


def _retrieve_keys(
    study_uid: str | None,
    series_uid: str | None,
    sop_uids: Sequence[str],
    patient_id: str | None,
) -> dict[str, str | None]:
    keys: dict[str, str | None] = {}
    if patient_id is not None:
        keys["PatientID"] = patient_id
    if study_uid is not None:
        keys["StudyInstanceUID"] = study_uid
    if series_uid is not None:
        keys["SeriesInstanceUID"] = series_uid
    if sop_uids:
        keys["SOPInstanceUID"] = "\\".join(sop_uids)
    return keys


def _tally(result: RetrieveResult, rsp: Dataset, identifier: Dataset | None) -> None:
    for attr, name in (
        ("completed", "NumberOfCompletedSuboperations"),
        ("failed", "NumberOfFailedSuboperations"),
        ("warning", "NumberOfWarningSuboperations"),
    ):
        if name in rsp and rsp[name].value is not None:
            setattr(result, attr, int(rsp[name].value))
    if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
        value = identifier.FailedSOPInstanceUIDList
        result.failed_sop_uids = [
            str(v) for v in (value if isinstance(value, list | tuple) else [value]) if v
        ]


def move(
    *,
    host: str,
    port: int,
    called_ae: str,
    destination_ae: str,
    level: Level = "STUDY",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uids: Sequence[str] = (),
    patient_id: str | None = None,
    model: Model = "study",
    calling_ae: str = "SCANONCE",
    timeout: float = 30.0,
) -> RetrieveResult:
    """C-MOVE what the keys name to `destination_ae` (an AE the peer knows, e.g. this broker's
    own SCP). Returns the sub-operation counts; a final failure status raises DimseStatusError
    (0xA801: the peer does not know the destination)."""
    peer = _peer(called_ae, host, port)
    sop_class = _MOVE[model]
    result = RetrieveResult()
    identifier = _identifier(level, _retrieve_keys(study_uid, series_uid, sop_uids, patient_id))
    with _association(
        host=host, port=port, called_ae=called_ae, calling_ae=calling_ae,
        contexts=[build_context(sop_class)], timeout=timeout,
    ) as assoc:  # fmt: skip
        for rsp, ident in assoc.send_c_move(identifier, destination_ae, sop_class):
            status = _status(rsp, peer=peer, what="C-MOVE")
            _tally(result, rsp, ident)
            if status not in (0xFF00, 0x0000, 0xB000) and not 0xA700 <= status <= 0xA7FF:
                raise DimseStatusError(
                    peer=peer, operation="C-MOVE", status=status, comment=str(rsp.get("ErrorComment", ""))
                )
    return result


def get(
    *,
    host: str,
    port: int,
    called_ae: str,
    into: str | os.PathLike[str],
    level: Level = "STUDY",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uids: Sequence[str] = (),
    patient_id: str | None = None,
    sop_classes: Sequence[str] | None = None,
    model: Model = "study",
    calling_ae: str = "SCANONCE",
    timeout: float = 30.0,
) -> RetrieveResult:
    """C-GET what the keys name; each instance is written, as received, to a Part 10 file under
    `into` (`result.paths`). A C-GET association must propose a storage context (SCP role) for
    every SOP class the peer will send: pass `sop_classes`, or they are learnt by an IMAGE-level
    C-FIND first."""
    peer = _peer(called_ae, host, port)
    sop_class = _GET[model]
    keys = _retrieve_keys(study_uid, series_uid, sop_uids, patient_id)
    if sop_classes is None:
        image_keys = dict(keys) | {"SeriesInstanceUID": keys.get("SeriesInstanceUID"), "SOPClassUID": None}
        image_keys.setdefault("SOPInstanceUID", None)
        found = find(
            host=host, port=port, called_ae=called_ae, level="IMAGE", keys=image_keys, model=model,
            calling_ae=calling_ae, timeout=timeout,
        )  # fmt: skip
        sop_classes = sorted(
            {str(m["00080016"]["Value"][0]) for m in found if m.get("00080016", {}).get("Value")}
        )
    classes = list(dict.fromkeys(sop_classes))[:_MAX_STORAGE_CONTEXTS]
    out = Path(into)
    out.mkdir(parents=True, exist_ok=True)
    result = RetrieveResult()

    def on_store(event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        # The name comes from the peer: only a valid UID may become part of a path.
        name = sop_uid if is_valid_uid(sop_uid) else f"instance-{len(result.paths):06d}"
        path = out / f"{name}.dcm"
        try:
            try:
                # Received straight into a temp file in `into` (SpoolingAE): a rename, no copy.
                # pynetdicom's later unlink of the temp name is best effort and finds nothing.
                os.replace(event.dataset_path, path)
            except AttributeError:
                path.write_bytes(event.encoded_dataset())  # preamble, file meta, data set as sent
        except OSError:
            return 0xA700  # out of resources: could not write it
        result.paths.append(str(path))
        return 0x0000

    contexts = [build_context(sop_class)] + [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in classes]
    roles = [build_role(uid, scp_role=True) for uid in classes]
    if not classes:
        return result
    ae = SpoolingAE(ae_title=calling_ae)
    ae.spool_dir = str(out)
    with _association(
        host=host, port=port, called_ae=called_ae, calling_ae=calling_ae, contexts=contexts, timeout=timeout,
        ae=ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)],
    ) as assoc:  # fmt: skip
        for rsp, ident in assoc.send_c_get(_identifier(level, keys), sop_class):
            status = _status(rsp, peer=peer, what="C-GET")
            _tally(result, rsp, ident)
            if status not in (0xFF00, 0x0000, 0xB000) and not 0xA700 <= status <= 0xA7FF:
                raise DimseStatusError(
                    peer=peer, operation="C-GET", status=status, comment=str(rsp.get("ErrorComment", ""))
                )
    return result


def store(
    *,
    host: str,
    port: int,
    called_ae: str,
    paths: Sequence[str | os.PathLike[str]],
    calling_ae: str = "SCANONCE",
    timeout: float = 30.0,
) -> list[StoreResult]:
    """C-STORE Part 10 files, one result per file in order.

    Each file is offered in its own transfer syntax and sent from disk as it is (not decoded, not
    held in memory); if the peer accepts only uncompressed syntaxes for its SOP class, it is
    decoded and sent uncompressed (decompressed first if need be). Files are grouped so that
    no association proposes more than 128 presentation contexts.
    """
    with StoreSession(
        host=host, port=port, called_ae=called_ae, calling_ae=calling_ae, timeout=timeout
    ) as session:  # fmt: skip
        return session.send(paths)


class StoreSession:
    """C-STORE over one association kept open across `send` calls, as `store` does for one call.

    For a sender of many batches (an import): opening an association costs a connection, a
    negotiation of up to 128 presentation contexts and pynetdicom's threads, as much as several
    C-STOREs on loopback. It is opened again only when a batch needs a presentation context not
    proposed (then proposing those of before too, while they fit in 128), or after the peer
    dropped it (idle timeout, abort); a `send` that fails leaves it closed, so the caller's retry
    starts afresh.
    """

    def __init__(
        self, *, host: str, port: int, called_ae: str, calling_ae: str = "SCANONCE", timeout: float = 30.0
    ) -> None:
        self._where = {"host": host, "port": port, "called_ae": called_ae, "calling_ae": calling_ae,
                       "timeout": timeout}  # fmt: skip
        self.peer = _peer(called_ae, host, port)
        self._stack: contextlib.ExitStack | None = None
        self._assoc: Any = None
        self._proposed: dict[tuple[str, tuple[str, ...]], Any] = {}
        self.associations = 0  # opened so far (the benchmark and tests read it)

    def __enter__(self) -> StoreSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        stack, self._stack, self._assoc = self._stack, None, None
        if stack is not None:
            stack.close()

    def send(self, paths: Sequence[str | os.PathLike[str]]) -> list[StoreResult]:
        files = [_describe(p) for p in paths]
        results: dict[int, StoreResult] = {}
        try:
            for batch in _context_batches(files):
                assoc = self._ready(_store_contexts([files[i] for i in batch]))
                for i in batch:
                    results[i] = _store_one(assoc, files[i], peer=self.peer)
        except BaseException:
            self.close()
            raise
        return [results[i] for i in range(len(files))]

    def _ready(self, contexts: list[Any]) -> Any:
        wanted = {_context_key(c): c for c in contexts}
        if self._assoc is not None and self._assoc.is_established and wanted.keys() <= self._proposed.keys():
            return self._assoc
        self.close()
        union = {**self._proposed, **wanted}
        self._proposed = union if len(union) <= 128 else wanted
        stack = contextlib.ExitStack()
        self._assoc = stack.enter_context(
            _association(contexts=list(self._proposed.values()), **self._where)  # type: ignore[arg-type]
        )
        self._stack = stack
        self.associations += 1
        return self._assoc


def _context_key(cx: Any) -> tuple[str, tuple[str, ...]]:
    return str(cx.abstract_syntax), tuple(str(t) for t in cx.transfer_syntax)


def _describe(p: str | os.PathLike[str]) -> tuple[str, str, str, UID, bool]:
    """(path, SOP class, SOP instance, transfer syntax, sent as stored?) from the file's head."""
    try:
        with open(p, "rb") as fp:
            head = read_partial(fp, stop_when=_past_sop_instance_uid)
        meta = head.file_meta
        sop_class, sop_uid = str(head.get("SOPClassUID", "")), str(head.get("SOPInstanceUID", ""))
        ts = UID(str(meta.TransferSyntaxUID))
    except Exception as exc:
        raise BadRequest(f"not a DICOM Part 10 file with file meta: {os.fspath(p)}") from exc
    # The command's UIDs come from the file meta when a file is sent as it is: only if they
    # are the data set's own (some files disagree) may it be sent that way.
    as_is = (meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID")) == (
        sop_class,
        sop_uid,
    )
    return os.fspath(p), sop_class, sop_uid, ts, as_is


def _past_sop_instance_uid(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return tag > 0x00080018


def _store_contexts(files: Sequence[tuple[str, str, str, UID, bool]]) -> list[Any]:
    contexts = [build_context(c, [ts]) for c, ts in dict.fromkeys((f[1], f[3]) for f in files)]
    contexts += [build_context(c, list(_UNCOMPRESSED)) for c in dict.fromkeys(f[1] for f in files)]
    return contexts


def _context_batches(files: Sequence[tuple[str, str, str, UID, bool]]) -> list[list[int]]:
    batches: list[list[int]] = []
    current: list[int] = []
    for i, f in enumerate(files):
        trial = [files[j] for j in current] + [f]
        if current and len(_store_contexts(trial)) > 128:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _store_one(assoc: Any, file: tuple[str, str, str, UID, bool], *, peer: str) -> StoreResult:
    path, sop_class, sop_uid, ts, as_is = file
    exact = as_is and any(
        cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts for cx in assoc.accepted_contexts
    )
    try:
        if exact:
            with chunked_send():
                rsp = assoc.send_c_store(path)
        else:
            dataset = dcmread(path)
            if ts.is_compressed:
                dataset.decompress()
            rsp = assoc.send_c_store(dataset)
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        # No acceptable context, or no pixel data handler to decompress it: this file fails.
        return StoreResult(path=path, sop_instance_uid=sop_uid, status=0xC000, comment=str(exc)[:200])
    status = _status(rsp, peer=peer, what="C-STORE")
    return StoreResult(
        path=path, sop_instance_uid=sop_uid, status=status, comment=str(rsp.get("ErrorComment", ""))
    )
