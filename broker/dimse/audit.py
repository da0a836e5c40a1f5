"""The DIMSE handlers' audit events: C-FIND (query), C-MOVE and C-GET (retrieve) recorded, and
committed, before the first answer goes out; C-STORE recorded in the ingest's own transaction.
The calling AE title is the agent (its principal), the peer address the network access point."""

from __future__ import annotations

from typing import Any

from pynetdicom import evt

from broker.audit import service as audit
from broker.audit.schemas import AuditRecord
from broker.audit.service import IngestAuditHook
from broker.deps import AppState
from broker.security.schemas import Principal

_COMMANDS = {
    "C-FIND": ("E", "query"),
    "C-MOVE": ("R", "retrieve"),
    "C-GET": ("R", "retrieve"),
    "C-STORE": ("C", "store"),  # only refusals: a store's event is written with its rows
}


def _address(event: evt.Event) -> str:
    try:
        return str(event.assoc.requestor.address or "")
    except AttributeError:
        return ""


def _keys(identifier: Any) -> tuple[str, str, str, str]:
    """(Patient ID, issuer, Study Instance UID, the identifier's non-empty keys as sent)."""
    pid = issuer = study = ""
    parts: list[str] = []
    try:
        for elem in identifier:
            if elem.VR == "SQ" or elem.value in (None, ""):
                continue
            value = str(elem.value)
            parts.append(f"{elem.keyword or elem.tag}={value}")
            if elem.keyword == "PatientID":
                pid = value
            elif elem.keyword == "IssuerOfPatientID":
                issuer = value
            elif elem.keyword == "StudyInstanceUID" and "\\" not in value:
                study = value
    except Exception:  # noqa: BLE001 - an undecodable identifier: the handler refuses it anyway
        parts.append("(identifier not decodable)")
    return pid, issuer, study, " ".join(parts)


def record(
    state: AppState, event: evt.Event, principal: Principal, command: str, *, refused: bool = False
) -> None:
    """Record a query, retrieve (or, `refused`, any refused C-STORE/FIND/MOVE/GET) and wait for
    its commit; raises Unavailable if it cannot be."""
    if not state.settings.audit_enabled or command not in _COMMANDS:
        return
    action, subtype = _COMMANDS[command]
    identifier: Any
    try:
        identifier = event.identifier
    except Exception:  # noqa: BLE001 - recorded without its keys
        identifier = ()
    pid, issuer, study, keys = _keys(identifier)
    entry = AuditRecord(
        action=action,
        subtype=subtype,
        outcome="4" if refused else "0",
        outcome_desc=f"{command} refused (not authorized)" if refused else f"{command} requested",
        patient_id=pid,
        patient_issuer=issuer,
        study_uid=study,
        source_node=audit.NODE,
        source_interface="dimse",
        client_address=_address(event),
        entity=f"{command} {keys}",
    ).by(principal)
    audit.writer_for(state.engine).record([entry])


def store_hook(state: AppState, event: evt.Event, principal: Principal) -> IngestAuditHook | None:
    """C-STORE: the event written with the instance's rows."""
    if not state.settings.audit_enabled:
        return None
    return IngestAuditHook(principal=principal, interface="dimse", client_address=_address(event))
