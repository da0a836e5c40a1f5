"""STOW-RS (PS3.18 10.5): the Store Instances Response (Annex I) and its HTTP status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from broker.dicom import status
from broker.index.schemas import StoreOutcome

_RETRIEVE_URL = "00081190"
_FAILED_SOP_SEQ = "00081198"
_REFERENCED_SOP_SEQ = "00081199"
_REF_SOP_CLASS = "00081150"
_REF_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"


def non_dicom_part(index: int, content_type: str) -> StoreOutcome:
    """A part that does not claim to be application/dicom fails alone (Cxxx, Cannot understand)."""
    return StoreOutcome(
        sop_class_uid="",
        sop_instance_uid="",
        study_uid="",
        series_uid="",
        status="failed",
        failure_reason=status.CANNOT_UNDERSTAND,
        message=f"part {index + 1} has Content-Type {content_type!r}, not application/dicom",
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
