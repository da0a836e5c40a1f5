"""One error hierarchy for the whole broker.

Services raise these; `broker.app` maps each to an HTTP response in one place, and the DIMSE
handlers map them to DIMSE statuses. The message is shown to the caller, so it must never
carry patient data.
"""

from __future__ import annotations


class ScanOnceError(Exception):
    status_code: int = 500
    title: str = "Internal error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.title)
        self.message = message or self.title


class BadRequest(ScanOnceError):
    status_code = 400
    title = "Bad request"


class Forbidden(ScanOnceError):
    status_code = 403
    title = "Forbidden"


class NotFound(ScanOnceError):
    status_code = 404
    title = "Not found"


class NotAcceptable(ScanOnceError):
    status_code = 406
    title = "Not acceptable"


class Conflict(ScanOnceError):
    status_code = 409
    title = "Conflict"


class PayloadTooLarge(ScanOnceError):
    status_code = 413
    title = "Payload too large"


class UnsupportedMediaType(ScanOnceError):
    status_code = 415
    title = "Unsupported media type"


class Unavailable(ScanOnceError):
    """A dependency (a facility's archive, the object store) cannot be reached."""

    status_code = 503
    title = "Service unavailable"


class InvalidSetting(BadRequest):
    """A SCANONCE_* setting (or the command-line option over it) holds a value the broker cannot
    use: what the operator must fix before anything starts."""

    title = "Invalid setting"


class RefusedToServe(InvalidSetting):
    """Settings that are each valid but together would expose patient data if served (authentication
    off beyond loopback, DIMSE open mode beyond loopback): refused before anything starts."""

    title = "Refusing to serve"


class InvalidUID(BadRequest):
    title = "Invalid DICOM UID"


class IntegrityError(ScanOnceError):
    """Something downloaded is not what was pinned (its checksum or its layout differs)."""

    status_code = 502
    title = "Integrity check failed"
