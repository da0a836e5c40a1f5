"""DIMSE client functions for the other domains (federation sync, retrieve on demand, imports).

Every function is keyword-only and blocking, opens one association for its job and releases
it, and returns plain values. A peer that cannot be reached, refuses the association, aborts
or stops answering raises `broker.errors.Unavailable` naming the peer; a peer that answers with
a failure status raises `DimseStatusError` (status and ErrorComment kept).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from pydicom.dataset import Dataset
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

from broker.dicom.uids import is_valid_uid
from broker.dimse.errors import DimseStatusError
from broker.dimse.scp import SpoolingAE
from broker.errors import Unavailable

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
    ae = ae or SpoolingAE(ae_title=calling_ae)
    ae.ae_title = calling_ae
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.dimse_timeout = max(timeout, 60.0)
    ae.requested_contexts = list(contexts)
    try:
        assoc = ae.associate(host, int(port), ae_title=called_ae, **kwargs)
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


def _status(rsp: Dataset | None, *, peer: str, what: str) -> int:
    status = getattr(rsp, "Status", None)
    if status is None:
        raise Unavailable(f"{peer} stopped answering a {what} (timeout or aborted association)")
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
                spooled = event.dataset_path  # received straight to disk (SpoolingAE)
                shutil.copyfile(spooled, path)
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
    with _association(
        host=host, port=port, called_ae=called_ae, calling_ae=calling_ae, contexts=contexts, timeout=timeout,
        ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)],
    ) as assoc:  # fmt: skip
        for rsp, ident in assoc.send_c_get(_identifier(level, keys), sop_class):
            status = _status(rsp, peer=peer, what="C-GET")
            _tally(result, rsp, ident)
            if status not in (0xFF00, 0x0000, 0xB000) and not 0xA700 <= status <= 0xA7FF:
                raise DimseStatusError(
                    peer=peer, operation="C-GET", status=status, comment=str(rsp.get("ErrorComment", ""))
                )
    return result
