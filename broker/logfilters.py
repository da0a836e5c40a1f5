"""Log filters that keep patient data out of the server's logs.

uvicorn's access log writes each request line with its query string, and query strings carry
patient data: `/dicom-web/studies?PatientName=...`, `/fhir/Patient?family=...&birthdate=...`,
`$ihe-pix?sourceIdentifier=...`. The path stays (it is what an operator needs to see); the query
is replaced by `?…`.
"""

from __future__ import annotations

import logging

_REDACTED = "?\u2026"


class RedactQueryStrings(logging.Filter):
    """For uvicorn.access records: args are (client, method, path with query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            path = args[2].split("?", 1)[0] + _REDACTED
            record.args = (*args[:2], path, *args[3:])
        return True


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger (idempotent)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQueryStrings) for f in access.filters):
        access.addFilter(RedactQueryStrings())
