"""Time CDS Hooks `order-select` calls over HTTP, as an EHR makes them, on a bulk-loaded index
(not a test).

The index is filled by bench/lookup.py's loader (persons at 0.3 per study, each at facility A and
half of them at B too, every study a CT with its dose SR). The broker runs under uvicorn on a free
loopback port; each call is one POST /cds-services/scanonce-prior-imaging for a random person, the
Patient prefetched with its facility-A identifier, one draft ServiceRequest (CPT 74177, "CT ABD/PEL
W CONTRAST"), ED encounter. A call with a relevant prior also records its card (one commit).

    .venv/bin/python bench/cds.py --studies 5000 [--calls 300] [--db postgresql+psycopg://...] [--orthanc]

With --orthanc, the same run also times the nearest thing a clinician has today: a QIDO-RS
`studies?PatientID=` query to one facility's archive, on an Orthanc (started here, its settings
printed: TCP_NODELAY on, StorageCompression off) holding as many studies (bench.synthdata's
instances, one per study, three studies per patient, stored by STOW-RS). A clinician asks each
facility so, then reads the list and judges relevance and dose themselves; the CDS call asks every
facility at once and judges.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlmodel import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lookup import load  # noqa: E402
from broker.app import create_app  # noqa: E402
from broker.db import make_engine, migrate  # noqa: E402
from broker.lookup import service as lookup  # noqa: E402
from broker.security.schemas import Principal, Role  # noqa: E402
from broker.settings import Settings  # noqa: E402

SERVICE = "/cds-services/scanonce-prior-imaging"


def _body(pid: int) -> dict[str, Any]:
    order = {
        "resourceType": "ServiceRequest",
        "id": "sr1",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/ehr"},
        "code": {
            "coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "74177"}],
            "text": "CT ABD/PEL W CONTRAST",
        },
    }
    return {
        "hook": "order-select",
        "hookInstance": str(uuid.uuid4()),
        "context": {
            "userId": "Practitioner/bench",
            "patientId": "ehr",
            "selections": ["ServiceRequest/sr1"],
            "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]},
        },
        "prefetch": {
            "patient": {
                "resourceType": "Patient",
                "id": "ehr",
                "identifier": [{"system": "urn:scanonce:issuer:A", "value": f"A{pid}"}],
            },
            "encounter": {"resourceType": "Encounter", "status": "in-progress", "class": {"code": "EMER"}},
        },
    }


def _serve(settings: Settings) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(settings.model_copy(update={"base_url": f"http://127.0.0.1:{port}"}))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}", server, thread


def orthanc_side(*, studies: int, queries: int, work: Path) -> dict[str, Any]:
    """p50 / p95 of QIDO-RS PatientID queries on an Orthanc holding `studies` studies."""
    from bench.archive import instances, pct, run_orthanc, stow_batches, study_facts, timed_get

    data = list(instances(seed=13, n_studies=studies, series_per_study=1, instances_per_series=1))
    patients = sorted({study_facts(d).patient_id for d in data})
    with run_orthanc(work) as server:
        stored = stow_batches(server, [data[i : i + 200] for i in range(0, len(data), 200)], threads=2)
        rng = random.Random(11)
        times, found = [], []
        for i in range(queries + 20):
            dt, status, body = timed_get(f"{server.base}/studies", params={"PatientID": rng.choice(patients)})
            assert status == 200, status
            if i >= 20:
                times.append(dt * 1000)
                found.append(len(body or []))
        return {
            "orthanc": server.settings["version"],
            "tcp_nodelay": server.settings["TcpNoDelay"],
            "storage_compression": server.settings["StorageCompression"],
            "orthanc_studies": studies,
            "stored_failed": stored.failed,
            "qido_patientid_per_facility_p50_ms": round(pct(times, 50), 2),
            "qido_patientid_per_facility_p95_ms": round(pct(times, 95), 2),
            "studies_per_answer_mean": round(statistics.mean(found), 2),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=5_000)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--db", default="", help="database URL (default: a new SQLite file)")
    ap.add_argument("--orthanc", action="store_true", help="also time PatientID QIDO-RS on Orthanc")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cds-bench-"))
    url = args.db or f"sqlite:///{tmp}/index.sqlite3"
    engine = make_engine(url)
    migrate(engine)
    t = time.perf_counter()
    persons = load(engine, args.studies)
    load_s = time.perf_counter() - t
    # The lookup alone, in process, for the same persons: what the CDS call adds is HTTP, the
    # hook's parsing, the patient's identifiers, the card and its record.
    lookup_ms = []
    with Session(engine) as session:
        pick = random.Random(7)
        for i in range(args.calls + 20):
            c = time.perf_counter()
            lookup.find_priors(
                session=session,
                principal=Principal(who="bench", role=Role.admin, facility="A"),
                identifier=f"A|A{pick.randint(1, persons)}",
                exam="CT ABD/PEL W CONTRAST",
                code="74177",
                code_system="CPT",
                setting="ed",
            )
            if i >= 20:
                lookup_ms.append((time.perf_counter() - c) * 1000)
            session.rollback()
    lookup_ms.sort()
    engine.dispose()
    origin, server, thread = _serve(
        Settings(data_dir=tmp, database_url=url, mllp_port=0, migrate_on_start=True)
    )
    rng = random.Random(7)
    times: list[float] = []
    cards: list[int] = []
    warnings = 0
    try:
        with httpx.Client(base_url=origin, timeout=30, trust_env=False) as http:
            for i in range(args.calls + 20):
                body = _body(rng.randint(1, persons))
                c = time.perf_counter()
                r = http.post(SERVICE, json=body)
                elapsed = (time.perf_counter() - c) * 1000
                r.raise_for_status()
                if i >= 20:  # the first calls load the vocabulary and warm the caches
                    times.append(elapsed)
                    got = r.json()["cards"]
                    cards.append(len(got))
                    warnings += sum(1 for card in got if card["indicator"] == "warning")
    finally:
        server.should_exit = True
        thread.join(10)
    times.sort()
    peer = orthanc_side(studies=args.studies, queries=args.calls, work=tmp) if args.orthanc else {}
    print(
        json.dumps(
            {
                **peer,
                "db": "postgresql" if url.startswith("postgresql") else "sqlite",
                "studies": args.studies,
                "persons": persons,
                "load_s": round(load_s, 1),
                "calls": len(times),
                "cards_per_call_mean": round(statistics.mean(cards), 2),
                "warning_cards": warnings,
                "p50_ms": round(times[len(times) // 2], 2),
                "p95_ms": round(times[int(len(times) * 0.95) - 1], 2),
                "max_ms": round(times[-1], 2),
                "lookup_alone_p50_ms": round(lookup_ms[len(lookup_ms) // 2], 2),
                "lookup_alone_p95_ms": round(lookup_ms[int(len(lookup_ms) * 0.95) - 1], 2),
                # Other work on the machine: the percentiles move with it (2 cores here).
                "load_average_1m": round(os.getloadavg()[0], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
