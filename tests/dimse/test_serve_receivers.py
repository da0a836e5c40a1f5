"""`scanonce serve` (a real process) with `SCANONCE_DIMSE_RECEIVERS=1` on the embedded default:
two listeners on the DIMSE port, C-STOREs by dcmtk `storescu` spread over them, and every
instance indexed once and findable by QIDO-RS, whichever process received it.

tests/dimse/test_receivers.py covers the receivers' faults in depth on the parts `serve`
wires together; this one checks that `serve` itself wires them as the README says."""

from __future__ import annotations

import re
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from broker.demo import synth
from tests.identity.test_mllp_serve import scanonce_serve
from tests.peers import dcmtk, free_port
from tests.support import auth_headers

pytestmark = [pytest.mark.slow]

ASSOCIATIONS = 10  # all 10 on the serving process's listener: a 1-in-1,024 event


def _listeners(port: int) -> int:
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _counter(metrics: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_serve_with_a_receiver_process_stores_every_c_store_once(tmp_path: Path) -> None:
    patient = synth.generate_patients(seed=91, count=1)[0]
    datasets = list(synth.generate_study(
        rng_seed=91, patient=patient, modality="CT", n_series=1, n_instances_per_series=2 * ASSOCIATIONS,
        rows=16, cols=16, study_date=date(2023, 3, 9),
    ))  # fmt: skip
    files = synth.write_files(datasets, tmp_path / "study")
    study_uid = datasets[0].StudyInstanceUID
    backend = SimpleNamespace(
        database_url=f"sqlite:///{tmp_path / 'index.db'}", storage_url=f"file://{tmp_path / 'objects'}"
    )
    dimse_port = free_port()
    with (
        scanonce_serve(
            tmp_path / "serve", backend, SCANONCE_DIMSE_PORT=str(dimse_port), SCANONCE_DIMSE_RECEIVERS="1"
        ) as served,
        httpx.Client(base_url=served.url, trust_env=False, timeout=30, headers=auth_headers()) as http,
    ):
        # The receiver imports the broker before it listens: seconds on a loaded machine.
        deadline = time.monotonic() + 120
        while _listeners(dimse_port) < 2:
            assert served.proc.poll() is None, served.log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the receiver process never listened on the DIMSE port"
            time.sleep(0.2)
        # Named apart from the parse workers, whose command line is the same (`spawn`): what
        # bench/archive.py groups the server's CPU by.
        names = [Path(f"/proc/{p}/comm").read_text().strip() for p in _children(served.proc.pid)]
        assert "scanonce-dimse" in names, names
        for n in range(ASSOCIATIONS):  # one association each, two instances
            dcmtk("storescu", "-aet", "MODALITY1", "-aec", "SCANONCE", "127.0.0.1", str(dimse_port),
                  *files[2 * n : 2 * n + 2])  # fmt: skip
        # Re-sending a file (to whichever listener the kernel picks) stores nothing new.
        dcmtk("storescu", "-aet", "MODALITY1", "-aec", "SCANONCE", "127.0.0.1", str(dimse_port), files[0])

        r = http.get(f"/dicom-web/studies/{study_uid}/instances", params={"limit": "1000"})
        assert r.status_code == 200, r.text
        sop_uids = [item["00080018"]["Value"][0] for item in r.json()]
        assert sorted(sop_uids) == sorted(ds.SOPInstanceUID for ds in datasets)
        # Without a shared PROMETHEUS_MULTIPROC_DIR the serving process counts the C-STOREs its
        # own listener received, and (SQLite: one writer) every instance stored, whoever
        # received it: so the receiver took some of the associations.
        metrics = http.get("/metrics").text
        assert _counter(metrics, "scanonce_ingest_instances_total", outcome="stored") == len(datasets)
        sent = len(files) + 1  # C-STORE requests, the re-sent one included
        assert _counter(metrics, "scanonce_requests_total", interface="dimse", method="C-STORE") < sent
    log = served.log.read_text(errors="replace")
    assert "1 receiver processes too" in log
