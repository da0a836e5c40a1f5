"""What an operator's Prometheus and log collector see: /metrics (who may read it, request rate,
latency and errors per interface, ingest counts and bytes, the job queue), the X-Request-ID of
every response, JSON log lines carrying it and no patient data, and a database that went away
answered with 503 and Retry-After."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from broker.app import build_state, create_app
from broker.dimse.scp import start_scp, stop_scp
from broker.jobs import service as jobs
from broker.settings import Settings
from tests.conftest import CuttablePg
from tests.dicomweb.data import multipart_body
from tests.ops.conftest import captured_log
from tests.support import TEST_FILES, auth_headers, make_ds, to_bytes

PATIENT_NAME = "ZEBEDEE^QUENTIN"
ROOT = Path(__file__).resolve().parents[2]


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics", headers=auth_headers("auditor"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _stow(client: TestClient, n: int) -> int:
    study = generate_uid()
    parts = [
        to_bytes(
            make_ds(sop=generate_uid(), study=study, series=generate_uid(), name=PATIENT_NAME, pid="OBS1")
        )
        for _ in range(n)
    ]
    body, content_type = multipart_body(parts)
    r = client.post(
        "/dicom-web/studies", content=body, headers={**auth_headers(), "Content-Type": content_type}
    )
    assert r.status_code == 200, r.text
    return sum(len(p) for p in parts)


def test_metrics_count_requests_ingest_and_the_queue(settings: Settings) -> None:
    client = TestClient(create_app(settings))
    # Only who may read metrics: an auditor or an admin (Prometheus scrapes with such a token).
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth_headers("clinician")).status_code == 403
    before = _samples(client)

    sent = _stow(client, 3)
    assert client.get("/dicom-web/studies", headers=auth_headers()).status_code == 200
    assert client.get("/fhir/ImagingStudy", headers=auth_headers()).status_code in (200, 400)
    assert client.get("/api/jobs", headers=auth_headers("clinician")).status_code == 403
    engine = client.app.state.scanonce.engine  # type: ignore[attr-defined]
    jobs.enqueue(engine=engine, kind="test-metrics", key="a")
    jobs.enqueue(engine=engine, kind="test-metrics", key="b")
    after = _samples(client)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("scanonce_requests_total", interface="dicomweb", method="POST", status="200") == 1
    assert delta("scanonce_requests_total", interface="dicomweb", method="GET", status="200") == 1
    assert delta("scanonce_requests_total", interface="api", method="GET", status="403") == 1
    assert delta("scanonce_request_duration_seconds_count", interface="dicomweb") == 2
    assert delta("scanonce_ingest_instances_total", outcome="stored") == 3
    assert delta("scanonce_ingest_bytes_total") >= sent - 3 * 1024  # the stored objects' sizes
    assert delta("scanonce_ingest_bytes_total") <= sent
    assert _value(after, "scanonce_jobs", kind="test-metrics", status="queued") == 2
    assert _value(after, "scanonce_job_oldest_queued_age_seconds", kind="test-metrics") >= 0
    assert ("scanonce_job_oldest_queued_age_seconds", (("kind", "test-metrics"),)) in after
    # Labels are bounded: no path, no UID, no patient.
    assert not any(PATIENT_NAME in str(k) or "1.2.826" in str(k) for k in after)


def test_every_response_carries_a_request_id(tmp_path: Path) -> None:
    client = TestClient(create_app(Settings(data_dir=tmp_path, mllp_port=0)))
    kept = client.get("/healthz", headers={"X-Request-ID": "lb-7f3a.42"})
    assert kept.headers["X-Request-ID"] == "lb-7f3a.42"
    made = client.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-ID"])
    assert made.headers["X-Request-ID"] != client.get("/healthz").headers["X-Request-ID"]
    # A header that is not an id (spaces, too long) is replaced, never echoed into logs.
    odd = client.get("/healthz", headers={"X-Request-ID": "DOE JOHN 1970"})
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["X-Request-ID"])
    # Refused requests too (the middleware is outside the auth guard).
    refused = client.get("/api/jobs", headers={"X-Request-ID": "refused-1"})
    assert (refused.status_code, refused.headers["X-Request-ID"]) == (401, "refused-1")


def test_json_logs_carry_the_request_id_and_no_patient_data(tmp_path: Path) -> None:
    with captured_log("json") as stream:
        client = TestClient(create_app(Settings(data_dir=tmp_path, mllp_port=0)))
        study = generate_uid()
        body, content_type = multipart_body(
            [to_bytes(make_ds(sop=generate_uid(), study=study, series=generate_uid(), name=PATIENT_NAME))]
        )
        r = client.post(
            "/dicom-web/studies",
            content=body,
            headers={**auth_headers(), "Content-Type": content_type, "X-Request-ID": "stow-req-1"},
        )
        assert r.status_code == 200
    import json

    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    assert lines, "nothing was logged"
    assert {"time", "level", "logger", "message", "request_id"} <= set(lines[0])
    ingest = [line for line in lines if line["message"].startswith("ingest by")]
    assert ingest and ingest[0]["request_id"] == "stow-req-1"
    text = stream.getvalue()
    assert "ZEBEDEE" not in text and "QUENTIN" not in text


@pytest.mark.postgres
def test_a_database_gone_away_is_503_with_retry_after(
    cuttable_pg: CuttablePg, cut_node_settings: Settings
) -> None:
    app = create_app(cut_node_settings)
    client = TestClient(app)
    assert client.get("/api/jobs", headers=auth_headers()).status_code == 200
    before = _value(_samples(client), "scanonce_database_errors_total")
    cuttable_pg.proxy.stop()
    r = client.get("/api/jobs", headers=auth_headers())
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "5" and r.headers["X-Request-ID"]
    assert r.json()["detail"] == "the database is unreachable; try again shortly"
    cuttable_pg.proxy.start()
    assert _value(_samples(client), "scanonce_database_errors_total") > before
    assert client.get("/api/jobs", headers=auth_headers()).status_code == 200
    app.state.scanonce.engine.dispose()


def test_dimse_operations_are_counted(tmp_path: Path) -> None:
    """A real storescu (dcmtk) stores through the SCP: counted as interface dimse, C-STORE."""
    settings = Settings(data_dir=tmp_path, host="127.0.0.1", dimse_port=0, mllp_port=0)
    state = build_state(settings)
    client = TestClient(create_app(settings, state=state))
    scp = start_scp(state=state, port=0)
    try:
        before = _samples(client)
        done = subprocess.run(
            [
                "storescu",
                "-aec",
                settings.ae_title,
                "127.0.0.1",
                str(scp.port),
                str(TEST_FILES / "CT_small.dcm"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        subprocess.run(
            ["echoscu", "-aec", settings.ae_title, "127.0.0.1", str(scp.port)], check=True, timeout=60
        )
        after = _samples(client)
    finally:
        stop_scp(scp)
        state.engine.dispose()

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("scanonce_requests_total", interface="dimse", method="C-STORE", status="0x0000") == 1
    assert delta("scanonce_requests_total", interface="dimse", method="C-ECHO", status="0x0000") == 1
    assert delta("scanonce_ingest_instances_total", outcome="stored") == 1


def test_metrics_of_several_processes_are_summed(tmp_path: Path) -> None:
    """`uvicorn --workers N` (several processes of one node) with PROMETHEUS_MULTIPROC_DIR: /metrics
    of any of them reports all of them."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    count = (
        "from broker import metrics\n"
        "metrics.REQUESTS.labels('fhir', 'GET', '200').inc(3)\n"
        "metrics.observe_ingest(stored=2, duplicate=0, failed=0, stored_bytes=100)\n"
    )
    for _ in range(2):
        subprocess.run([sys.executable, "-c", count], env=env, check=True, cwd=ROOT, timeout=120)
    render = "from broker import metrics\nimport sys\nsys.stdout.write(metrics.render()[0].decode())\n"
    out = subprocess.run(
        [sys.executable, "-c", render],
        env=env,
        check=True,
        cwd=ROOT,
        timeout=120,
        capture_output=True,
        text=True,
    ).stdout
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(out)
        for s in family.samples
    }
    assert (
        found[("scanonce_requests_total", (("interface", "fhir"), ("method", "GET"), ("status", "200")))] == 6
    )
    assert found[("scanonce_ingest_instances_total", (("outcome", "stored"),))] == 4
    assert found[("scanonce_ingest_bytes_total", ())] == 200
