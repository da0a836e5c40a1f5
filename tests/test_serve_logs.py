"""`scanonce serve` keeps patient data out of its log: the HTTP access log shows paths, not the
query strings that carry names, birth dates and identifiers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx

from tests.identity.test_mllp_serve import scanonce_serve
from tests.support import auth_headers


def test_access_log_has_paths_but_no_query_strings(tmp_path: Path) -> None:
    backend = SimpleNamespace(
        database_url=f"sqlite:///{tmp_path / 'index.db'}", storage_url=f"file://{tmp_path / 'objects'}"
    )
    secrets = {"PatientName": "ZYLBERSZTEJN^QUENTIN", "PatientBirthDate": "19730412"}
    pix = {"sourceIdentifier": "urn:oid:1.2.3|MRN-4711"}
    with (
        scanonce_serve(tmp_path / "serve", backend, SCANONCE_MLLP_PORT="0") as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=30, headers=auth_headers()) as http,
    ):
        assert http.get("/dicom-web/studies", params=secrets).status_code == 204  # nothing stored
        pdq = {"family": "ZYLBERSZTEJN", "birthdate": "1973-04-12"}
        assert http.get("/fhir/Patient", params=pdq).status_code == 200  # a searchset Bundle, empty
        # IHE ITI-83: an assigning authority the manager does not know is a 400.
        assert http.get("/fhir/Patient/$ihe-pix", params=pix).status_code == 400
    log = served.log.read_text(errors="replace")
    assert "GET /dicom-web/studies?\u2026" in log  # the requests were logged, without their queries
    for secret in ("ZYLBERSZTEJN", "QUENTIN", "19730412", "1973-04-12", "MRN-4711"):
        assert secret not in log
