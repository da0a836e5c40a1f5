"""CDS Hooks' own error: the service could not get the FHIR data it needs (spec: 412)."""

from __future__ import annotations

from broker.errors import ScanOnceError


class PreconditionFailed(ScanOnceError):
    status_code = 412
    title = "Precondition failed"
