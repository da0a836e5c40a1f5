"""What authentication and authorization add to a QIDO-RS and a prior lookup (not a test).

One demo data set, two brokers over it in this process (auth on, auth off), each served by
uvicorn on its own loopback port; rounds alternate between them so that the machine's noise hits
both alike. Each round times `--requests` keep-alive requests per endpoint and takes their p95
(and p50); the report is the median over rounds of each, and the difference (the target: <= 1 ms
at p95), with the load average. Two in-process parts that HTTP noise on a loaded machine cannot
hide: the guard's own work (`--guard-only`) and the lookup's consent work (`--consent-only`: a
clinician of another facility against an administrator, whom consent does not limit).

    .venv/bin/python bench/auth_overhead.py [--rounds 7] [--requests 200] [--guard-only | --consent-only]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.app import build_state, create_app  # noqa: E402
from broker.demo.service import load_demo  # noqa: E402
from broker.security.tokens import load_or_create_signing_key, mint  # noqa: E402
from broker.settings import Settings  # noqa: E402

QIDO = ("/dicom-web/studies", {"PatientID": "K346295", "includefield": "all"})
LOOKUP = (
    "/api/priors",
    {"facility": "kids", "mrn": "K346295", "exam": "CT abdomen pelvis", "setting": "ed", "now": "2026-06-25"},
)


def _serve(settings: Settings) -> tuple[str, uvicorn.Server]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def _times(client: httpx.Client, path: str, params: dict[str, str], n: int) -> tuple[float, float]:
    """(p50, p95) of n requests, ms."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        r = client.get(path, params=params)
        times.append((time.perf_counter() - start) * 1000)
        assert r.status_code == 200, (r.status_code, r.text[:200])
    return statistics.median(times), statistics.quantiles(times, n=20)[-1]


def consent_only(state: Any, n: int = 500) -> dict[str, float]:
    """The lookup's own consent work (the caller's rule, the named record, the studies' filter),
    timed in-process around `_person_studies` for a clinician of another facility against an
    administrator (whom consent does not limit): the authorization part of a lookup that HTTP
    noise on a loaded machine hides. Median and p95 of n calls, ms."""
    from sqlmodel import Session

    from broker.lookup.service import _person_studies
    from broker.security.schemas import Principal, Role

    callers = {
        "clinician": Principal(who="bench", role=Role.clinician, facility="stmarys", purpose_of_use="TREAT"),
        "admin": Principal(who="bench-admin", role=Role.admin, facility="local"),
    }
    out: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in callers}
    with Session(state.engine) as session:
        for i in range(n + 50):
            # Interleaved, so that the machine's load changes hit both callers alike.
            for name, principal in callers.items():
                start = time.perf_counter()
                _person_studies(session, "CHILDRENS", "K346295", principal)
                if i >= 50:  # warm-up
                    times[name].append((time.perf_counter() - start) * 1000)
    for name, values in times.items():
        out[f"person_studies_ms_median_{name}"] = round(statistics.median(values), 3)
        out[f"person_studies_ms_p95_{name}"] = round(statistics.quantiles(values, n=20)[-1], 3)
    out["added_ms_median"] = round(
        out["person_studies_ms_median_clinician"] - out["person_studies_ms_median_admin"], 3
    )
    return out


def guard_only(settings: Settings, token: str, n: int = 5000) -> dict[str, float]:
    """The guard's own work per request (token verification + the policy decision), timed around
    the middleware over an app that does nothing: the part of the difference the noise of a
    loaded machine cannot hide. Median of n calls, microseconds."""
    from broker.security.http import AuthGuard
    from broker.security.tokens import Verifier

    async def nothing(scope: Any, receive: Any, send: Any) -> None:
        return None

    async def no_send(message: Any) -> None:
        return None

    key = load_or_create_signing_key(settings.resolved_signing_key_file())
    result = {}
    for name, enabled in (("on", True), ("off", False)):
        s = settings.model_copy(update={"auth_enabled": enabled})
        guard = AuthGuard(nothing, settings=s, verifier=Verifier(settings=s, signing_key=key))
        headers = [(b"authorization", f"Bearer {token}".encode())] if enabled else []
        times = []
        for _ in range(n):
            scope = {"type": "http", "method": "GET", "path": QIDO[0], "headers": headers}
            loop_start = time.perf_counter()
            coro = guard(scope, nothing, no_send)
            with contextlib.suppress(StopIteration):  # it never awaits anything that suspends
                coro.send(None)
            times.append((time.perf_counter() - loop_start) * 1e6)
        result[f"guard_us_median_auth_{name}"] = round(statistics.median(times), 1)
        result[f"guard_us_p95_auth_{name}"] = round(statistics.quantiles(times, n=20)[-1], 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--guard-only", action="store_true", help="only the guard's own cost (seconds)")
    ap.add_argument(
        "--consent-only", action="store_true", help="only the lookup's consent work, in-process (a minute)"
    )
    ap.add_argument(
        "--audit", action="store_true", help="audit on in both brokers (default off: authorization alone)"
    )
    args = ap.parse_args()
    if args.guard_only:
        settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="bench-auth-")))
        key = load_or_create_signing_key(settings.resolved_signing_key_file())
        token = mint(key=key, settings=settings, subject="bench", role="clinician", facility="kids")
        print(json.dumps(guard_only(settings, token), indent=2))
        return
    data = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    os.environ["SCANONCE_INGEST_PROCESSES"] = "0"
    if args.consent_only:
        state = build_state(Settings(data_dir=data, auth_enabled=True, audit_enabled=False))
        load_demo(engine=state.engine, store=state.store, patients=args.patients)
        only = {"load_average": [round(x, 2) for x in os.getloadavg()], **consent_only(state)}
        print(json.dumps(only, indent=2))
        return
    # Audit is measured by bench/audit.py; here both brokers record alike (default: neither), so
    # the difference is authentication + authorization (roles, facility scope, consent) alone.
    on = Settings(data_dir=data, auth_enabled=True, audit_enabled=args.audit)
    off = on.model_copy(update={"auth_enabled": False})
    state = build_state(on)
    load_demo(engine=state.engine, store=state.store, patients=args.patients)
    key = load_or_create_signing_key(on.resolved_signing_key_file())
    token = mint(key=key, settings=on, subject="bench", role="clinician", facility="kids")
    urls = {"on": _serve(on)[0], "off": _serve(off)[0]}
    clients = {
        "on": httpx.Client(
            base_url=urls["on"], headers={"Authorization": f"Bearer {token}"}, trust_env=False
        ),
        "off": httpx.Client(base_url=urls["off"], trust_env=False),
    }
    p50: dict[str, dict[str, list[float]]] = {k: {"qido": [], "lookup": []} for k in clients}
    p95: dict[str, dict[str, list[float]]] = {k: {"qido": [], "lookup": []} for k in clients}
    for name in clients:  # warm-up
        _times(clients[name], *QIDO, 20)
        _times(clients[name], *LOOKUP, 20)
    for _ in range(args.rounds):
        for name, client in clients.items():
            for what, (path, params) in (("qido", QIDO), ("lookup", LOOKUP)):
                mid, high = _times(client, path, params, args.requests)
                p50[name][what].append(mid)
                p95[name][what].append(high)
    report: dict[str, Any] = {
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    for what in ("qido", "lookup"):
        with_auth = statistics.median(p95["on"][what])
        without = statistics.median(p95["off"][what])
        mid_on, mid_off = statistics.median(p50["on"][what]), statistics.median(p50["off"][what])
        report[what] = {
            "p95_ms_auth_on": round(with_auth, 3),
            "p95_ms_auth_off": round(without, 3),
            "added_ms": round(with_auth - without, 3),
            "p50_ms_auth_on": round(mid_on, 3),
            "p50_ms_auth_off": round(mid_off, 3),
            "added_ms_p50": round(mid_on - mid_off, 3),
        }
    report["guard_only"] = guard_only(on, token)
    report["lookup_consent_only"] = consent_only(state)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
