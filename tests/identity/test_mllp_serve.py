"""`scanonce serve` brings up the HL7 MLLP feed beside HTTP: a real sender (the `hl7` library's
MLLP client) talks to a live server process, and what it sends shows through PDQm and the index."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fhir.resources.bundle import Bundle
from hl7.client import MLLPClient
from sqlmodel import Session, select

from broker.db import make_engine
from broker.index.models import Patient, Study
from tests.dicomweb.data import multipart_body
from tests.peers import _stop, free_port, wait_for_port
from tests.support import auth_headers

from .conftest import write_part10
from .test_mllp import EB, SB, adt, frame, msa, read_ack


@dataclass
class Served:
    url: str
    mllp_port: int
    proc: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def scanonce_serve(tmp_path: Path, backend: Any, **env: str) -> Iterator[Served]:
    http_port, mllp_port = free_port(), free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "serve.log"
    environ = {
        **os.environ,
        "SCANONCE_DATA_DIR": str(tmp_path / "data"),
        "SCANONCE_DATABASE_URL": backend.database_url,
        "SCANONCE_STORAGE_URL": backend.storage_url,
        "SCANONCE_HOST": "127.0.0.1",
        "SCANONCE_PORT": str(http_port),
        "SCANONCE_DIMSE_PORT": "0",
        "SCANONCE_MLLP_PORT": str(mllp_port),
        "SCANONCE_INGEST_PROCESSES": "0",
        **env,
    }
    cmd = [str(Path(sys.executable).with_name("scanonce")), "serve", "--log-level", "info"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=environ, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        wait_for_port(http_port, timeout=60, proc=proc)
        yield Served(f"http://127.0.0.1:{http_port}", mllp_port, proc, log)
    finally:
        _stop(proc)


def _send(port: int, message: str) -> list[str]:
    with MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(30)
        ack = client.send_message(message)
    assert ack.startswith(SB) and ack.endswith(EB), ack
    return msa(ack[1:-2].decode())


def _person(http: httpx.Client, family: str) -> dict[str, Any]:
    r = http.get("/fhir/Patient", params={"family": family})
    assert r.status_code == 200, r.text
    bundle = Bundle.model_validate(r.json())
    assert bundle.total == 1, r.json()
    return r.json()["entry"][0]["resource"]


def _values(person: dict[str, Any]) -> set[str]:
    return {i["value"] for i in person.get("identifier", [])}


def test_serve_runs_the_adt_feed(backend: Any, tmp_path: Path) -> None:
    # Two studies of the default facility (issuer LOCAL): a registered patient and a trauma alias.
    parts = [
        Path(
            write_part10(
                tmp_path / "a.dcm", PatientID="MRN-1", PatientName="REID^RUBY", PatientBirthDate="19300620"
            )
        ).read_bytes(),
        Path(write_part10(tmp_path / "b.dcm", PatientID="TMP9", PatientName="TRAUMA^ALPHA")).read_bytes(),
    ]
    body, content_type = multipart_body(parts)
    with (
        scanonce_serve(tmp_path, backend) as served,
        httpx.Client(base_url=served.url, timeout=60, headers=auth_headers()) as http,
    ):
        r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
        assert r.status_code == 200, r.text

        # A01 registers a new person, found by PDQm.
        assert _send(
            served.mllp_port, adt("A01", "C1", "A1^^^ISSUER-A", "NEUMANN^MICHAELA", "19151111", "F")
        )[1:3] == ["AA", "C1"]
        assert _values(_person(http, "NEUMANN")) == {"A1"}

        # Garbage, a broken frame and a sender gone mid-message: errors, and the listener goes on.
        assert _send(served.mllp_port, "this is not HL7")[1] == "AR"
        with socket.create_connection(("127.0.0.1", served.mllp_port), timeout=30) as sock:
            sock.sendall(b"NO-VT" + EB)
            assert msa(read_ack(sock))[1] == "AR"
        with socket.create_connection(("127.0.0.1", served.mllp_port), timeout=30) as sock:
            sock.sendall(frame(adt("A01", "C9", "C9^^^ISSUER-A", "GONE^GARY"))[:50])

        # A40: the trauma alias is merged into the registered patient; its study follows.
        merge = adt("A40", "C2", "MRN-1^^^LOCAL", extra="MRG|TMP9^^^LOCAL\r")
        assert _send(served.mllp_port, merge)[1:3] == ["AA", "C2"]
        assert _values(_person(http, "REID")) == {"MRN-1", "TMP9"}
        r = http.get("/fhir/Patient", params={"family": "GONE"})
        assert r.json()["total"] == 0

        engine = make_engine(backend.database_url)
        try:
            with Session(engine) as s:
                persons = {
                    study.patient_id: s.get(Patient, study.patient_pk).person_id  # type: ignore[union-attr]
                    for study in s.exec(select(Study)).all()
                }
        finally:
            engine.dispose()
        assert persons["TMP9"] == persons["MRN-1"] is not None

        proc = served.proc
        _stop(proc)
        # uvicorn re-raises SIGTERM once its lifespan (and so the listener) has shut down.
        assert proc.returncode in (0, -15), served.log.read_text()
        assert "Application shutdown complete" in served.log.read_text()
    # The listener went down with the server.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", served.mllp_port), timeout=5)
    logged = served.log.read_text()
    assert f"127.0.0.1:{served.mllp_port}" in logged  # serve says where the feed listens
    feed_lines = [line for line in logged.splitlines() if "scanonce.identity" in line]
    for secret in ("NEUMANN", "MICHAELA", "REID", "TRAUMA", "GONE", "19151111", "MRN-1", "TMP9"):
        assert not [line for line in feed_lines if secret in line]


def _listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (Linux /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def test_serve_listens_for_mllp_unless_disabled(tmp_path: Path) -> None:
    embedded = SimpleNamespace(
        database_url=f"sqlite:///{tmp_path / 'index.sqlite3'}", storage_url=(tmp_path / "objects").as_uri()
    )
    with scanonce_serve(tmp_path / "on", embedded) as served:
        wait_for_port(served.mllp_port, timeout=30)
        assert _listening_ports(served.proc.pid) == {int(served.url.rsplit(":", 1)[1]), served.mllp_port}
    with scanonce_serve(tmp_path / "off", embedded, SCANONCE_MLLP_PORT="0") as served:
        assert httpx.get(f"{served.url}/healthz").text == "ok"
        assert _listening_ports(served.proc.pid) == {int(served.url.rsplit(":", 1)[1])}
        assert "HL7 MLLP" not in served.log.read_text()


def test_serve_applies_the_processing_ids_it_is_set_to(tmp_path: Path) -> None:
    """SCANONCE_MLLP_PROCESSING_IDS reaches the listener `scanonce serve` starts: a staging
    broker set to T applies a test system's training messages and refuses production ones."""
    embedded = SimpleNamespace(
        database_url=f"sqlite:///{tmp_path / 'index.sqlite3'}", storage_url=(tmp_path / "objects").as_uri()
    )
    training = adt("A01", "T1", "T1^^^ISSUER-A", "TRAINING^TINA", "19700101", "F").replace(
        "|P|2.5\r", "|T|2.5\r"
    )
    production = adt("A01", "P1", "P1^^^ISSUER-A", "PRODUCTION^PAUL", "19700101", "M")
    with scanonce_serve(tmp_path, embedded, SCANONCE_MLLP_PROCESSING_IDS="T") as served:
        wait_for_port(served.mllp_port, timeout=30)
        assert _send(served.mllp_port, training)[1:3] == ["AA", "T1"]
        refused = _send(served.mllp_port, production)
        assert refused[1:4] == ["AR", "P1", "MSH-11 processing ID 'P' is not processed here (T)"]
