"""What the audit trail costs: STOW-RS throughput and QIDO-RS p95 with auditing on and off (not
a test).

Two brokers in this process, identical but for `audit_enabled`, each with its own SQLite index
and object folder under one temp dir, each served by uvicorn on its own loopback port;
authentication is off on both (bench/auth_overhead.py measures that part), parsing in-process
on both. Both work in small alternating slices so the machine's noise hits both alike. Each
round: STOW-RS of `--instances` fresh small CT instances (16x16) in requests of `--batch`, from
`--threads` client threads, in slices of `--slice` alternating between the brokers (inst/s), then
`--requests` sequential QIDO-RS study queries by PatientID alternating request by request
(p95). The report gives the median over rounds of each, and the ratios (target: STOW-RS
throughput within 5%).

    .venv/bin/python bench/audit.py [--rounds 7] [--instances 400] [--batch 10] [--threads 2]
        [--pg postgresql+psycopg://postgres@127.0.0.1:5432]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.app import create_app  # noqa: E402
from broker.settings import Settings  # noqa: E402
from tests.support import make_ds, to_bytes  # noqa: E402


def _serve(settings: Settings) -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _instances(n: int, patient: str) -> list[bytes]:
    """n instances in studies of 10, fresh UIDs (every round stores new objects)."""
    out = []
    study = series = ""
    for i in range(n):
        if i % 10 == 0:
            study, series = generate_uid(), generate_uid()
        out.append(
            to_bytes(make_ds(sop=generate_uid(), study=study, series=series, pid=patient, instance_number=i))
        )
    return out


def _body(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = f"b-{secrets.token_hex(8)}"
    chunks = []
    for data in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _stow_seconds(url: str, bodies: list[tuple[bytes, str]], threads: int) -> float:
    def send(item: tuple[bytes, str]) -> None:
        with httpx.Client(base_url=url, trust_env=False, timeout=120) as client:
            r = client.post(
                "/dicom-web/studies",
                content=item[0],
                headers={"Content-Type": item[1], "Accept": "application/dicom+json"},
            )
            assert r.status_code == 200, (r.status_code, r.text[:300])

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, bodies))
    return time.perf_counter() - start


def _qido_ms(client: httpx.Client, patient: str) -> float:
    start = time.perf_counter()
    r = client.get("/dicom-web/studies", params={"PatientID": patient})
    assert r.status_code == 200, (r.status_code, r.text[:200])
    return (time.perf_counter() - start) * 1000


def _database(server: str, name: str) -> str:
    """A fresh database audit_bench_<name> on the PostgreSQL server at `server`."""
    import psycopg

    plain = server.replace("postgresql+psycopg://", "postgresql://").rstrip("/")
    with psycopg.connect(plain + "/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS audit_bench_{name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE audit_bench_{name}")
    return f"{server.rstrip('/')}/audit_bench_{name}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--instances", type=int, default=400)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--slice", type=int, default=40, help="instances per alternating slice")
    ap.add_argument(
        "--pg",
        metavar="URL",
        help="index on PostgreSQL instead: a server URL (postgresql+psycopg://user@host:port); "
        "databases audit_bench_on / audit_bench_off are (re)created there",
    )
    args = ap.parse_args()
    os.environ["SCANONCE_INGEST_PROCESSES"] = "0"
    root = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    common: dict[str, Any] = {"auth_enabled": False, "ingest_processes": 0, "mllp_port": 0}
    databases = {name: _database(args.pg, name) if args.pg else None for name in ("on", "off")}
    settings = {
        name: Settings(
            data_dir=root / name, audit_enabled=name == "on", database_url=databases[name], **common
        )
        for name in ("on", "off")
    }
    urls = {name: _serve(s) for name, s in settings.items()}
    clients = {name: httpx.Client(base_url=url, trust_env=False) for name, url in urls.items()}
    rate: dict[str, list[float]] = {"on": [], "off": []}
    p95: dict[str, list[float]] = {"on": [], "off": []}
    median: dict[str, list[float]] = {"on": [], "off": []}
    for name in urls:  # warm-up: first requests, and a patient with studies to query
        warm = _instances(40, "BENCH-Q")
        _stow_seconds(urls[name], [_body(warm[i : i + 10]) for i in range(0, 40, 10)], 1)
        for _ in range(20):
            _qido_ms(clients[name], "BENCH-Q")
    # The machine's load drifts (2 cores, other jobs): both brokers work in small alternating
    # slices (order flipped each time), so that drift hits both alike.
    for r in range(args.rounds):
        seconds = {"on": 0.0, "off": 0.0}
        n = 0
        for k in range(0, args.instances, args.slice):
            order = ("on", "off") if (k // args.slice) % 2 == 0 else ("off", "on")
            for name in order:
                parts = _instances(args.slice, f"BENCH-{r}")
                bodies = [_body(parts[i : i + args.batch]) for i in range(0, len(parts), args.batch)]
                seconds[name] += _stow_seconds(urls[name], bodies, args.threads)
            n += args.slice
        for name in seconds:
            rate[name].append(n / seconds[name])
        times: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(args.requests):
            for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                times[name].append(_qido_ms(clients[name], "BENCH-Q"))
        for name in times:
            p95[name].append(statistics.quantiles(times[name], n=20)[-1])
            median[name].append(statistics.median(times[name]))
    stow_on, stow_off = statistics.median(rate["on"]), statistics.median(rate["off"])
    q_on, q_off = statistics.median(p95["on"]), statistics.median(p95["off"])
    report: dict[str, Any] = {
        "settings": {
            "rounds": args.rounds,
            "instances_per_round": args.instances,
            "instances_per_request": args.batch,
            "client_threads": args.threads,
            "qido_requests_per_round": args.requests,
            "instances_per_slice": args.slice,
            "index": ("PostgreSQL" if args.pg else "SQLite (WAL, synchronous=FULL)")
            + ", local object folder, auth off, parsing in-process",
            "cpus": os.cpu_count(),
        },
        "stow": {
            "inst_per_s_audit_on": round(stow_on, 1),
            "inst_per_s_audit_off": round(stow_off, 1),
            "overhead_pct": round((1 - stow_on / stow_off) * 100, 2),
            # Each round's two rates were measured in the same interleaved slices: their ratio
            # is the figure least disturbed by the machine's load drifting between rounds.
            "overhead_pct_median_of_round_ratios": round(
                (1 - statistics.median(a / b for a, b in zip(rate["on"], rate["off"], strict=True))) * 100, 2
            ),
            "rounds_on": [round(x, 1) for x in rate["on"]],
            "rounds_off": [round(x, 1) for x in rate["off"]],
        },
        "qido": {
            "p95_ms_audit_on": round(q_on, 3),
            "p95_ms_audit_off": round(q_off, 3),
            "added_ms": round(q_on - q_off, 3),
            "median_ms_audit_on": round(statistics.median(median["on"]), 3),
            "median_ms_audit_off": round(statistics.median(median["off"]), 3),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
