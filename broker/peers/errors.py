"""Errors of the clients of facility archives."""

from __future__ import annotations

from broker.errors import ScanOnceError


class DimseStatusError(ScanOnceError):
    """A DICOM peer answered with a failure status (it was reachable: see Unavailable for that)."""

    status_code = 502
    title = "DICOM peer failure"

    def __init__(self, *, peer: str, operation: str, status: int, comment: str = "") -> None:
        detail = f": {comment}" if comment else ""
        super().__init__(f"{peer} failed a {operation} with status 0x{status:04X}{detail}")
        self.peer = peer
        self.operation = operation
        self.status = status
        self.comment = comment
