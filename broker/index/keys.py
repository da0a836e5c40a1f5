"""The index's layout of object keys in the store, built only from validated DICOM UIDs."""

from __future__ import annotations

from broker.dicom.uids import require_uid


def _require_sha256(sha256: str) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return sha256


def instance_key(study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> str:
    """Content-addressed under the instance: two different objects claiming one SOP Instance
    UID can never overwrite each other, even when they race."""
    return "/".join(
        (
            "studies",
            require_uid(study_uid, "StudyInstanceUID"),
            "series",
            require_uid(series_uid, "SeriesInstanceUID"),
            "instances",
            require_uid(sop_uid, "SOPInstanceUID"),
            _require_sha256(sha256) + ".dcm",
        )
    )


def conflict_key(sop_uid: str, sha256: str) -> str:
    return f"conflicts/{require_uid(sop_uid, 'SOPInstanceUID')}/{_require_sha256(sha256)}.dcm"
