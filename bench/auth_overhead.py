"""What authentication and authorization add to a QIDO-RS and a prior lookup (not a test).

One demo data set, two brokers over it in this process (auth on, auth off), each served by
uvicorn on its own loopback port. The caller with auth on is a clinician of the patient's
facility acting for treatment (the embedded issuer's default), so both brokers return the same
records (checked): the difference is the work of authorization alone, not of a smaller answer.
Requests alternate between the brokers one by one (which goes first alternates too), so the
machine's noise hits both alike. Each round times `--requests` keep-alive requests per endpoint
per broker and takes each broker's p50 and p95; the report gives, per endpoint, the median over
rounds of each, the median over rounds of each round's difference (on - off: the figure least
disturbed by load drifting between rounds) and the ratio, with the 1-minute load average at start
and end. A p95 of n requests is their n/20-th slowest: 1000 a round puts 50 requests above it,
so one scheduler hiccup does not move it by a millisecond. Orthanc is not involved: the
comparison is the broker with and without authorization.

Three in-process parts that HTTP noise on a loaded machine cannot hide: the guard's own work
(`--guard-only`), and the consent work of a QIDO-RS search and of the lookup
(`--consent-only`: the clinician against an administrator, whom consent does not limit).

    .venv/bin/python bench/auth_overhead.py [--rounds 5] [--requests 1000] [--json]
        [--guard-only | --consent-only]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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
ENDPOINTS = {"qido": QIDO, "lookup": LOOKUP}


def _serve(settings: Settings) -> tuple[str, uvicorn.Server]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def _p50_p95(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), statistics.quantiles(values, n=20)[-1]


def _answer_size(body: Any) -> int:
    """How many records an answer holds (QIDO-RS: matches; lookup: priors)."""
    if isinstance(body, list):
        return len(body)
    return sum(len(v) for v in body.values() if isinstance(v, list))


def _same_answers(clients: dict[str, httpx.Client]) -> dict[str, int]:
    """Both brokers must answer with the same records, or the difference would measure a smaller
    answer rather than authorization."""
    sizes = {}
    for what, (path, params) in ENDPOINTS.items():
        got = {}
        for name, client in clients.items():
            r = client.get(path, params=params)
            assert r.status_code == 200, (name, what, r.status_code, r.text[:200])
            got[name] = _answer_size(r.json())
        assert got["on"] == got["off"] and got["on"] > 0, (what, got)
        sizes[what] = got["on"]
    return sizes


def _round(clients: dict[str, httpx.Client], n: int) -> dict[str, dict[str, list[float]]]:
    """n requests per endpoint per broker, alternating broker by broker; times in ms."""
    times: dict[str, dict[str, list[float]]] = {what: {k: [] for k in clients} for what in ENDPOINTS}
    names = list(clients)
    for what, (path, params) in ENDPOINTS.items():
        for i in range(n):
            for name in names if i % 2 == 0 else reversed(names):
                start = time.perf_counter()
                r = clients[name].get(path, params=params)
                times[what][name].append((time.perf_counter() - start) * 1000)
                if r.status_code != 200:
                    raise AssertionError((name, what, r.status_code, r.text[:200]))
    return times


def _interleaved(calls: dict[str, Callable[[], Any]], n: int, warmup: int = 50) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(n + warmup):
        for name in names if i % 2 == 0 else reversed(names):
            call = calls[name]
            start = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def consent_only(state: Any, n: int = 1000) -> dict[str, float]:
    """The consent work of a QIDO-RS search (`_visible_search`) and of the lookup (its consent
    step alone, `filter_studies` on the records it reads, and all of `_person_studies`),
    in-process, for the bench's clinician against an administrator (whom consent does not
    limit), interleaved call by call: the authorization part of each request that HTTP noise on
    a loaded machine hides. Median and p95 of n calls each, ms."""
    from sqlmodel import Session

    from broker.consent import service as consent
    from broker.dicomweb import qido
    from broker.dicomweb.routes import _visible_search
    from broker.lookup.service import _person_studies
    from broker.security.schemas import Principal, Role

    callers = {
        "clinician": Principal(who="bench", role=Role.clinician, facility="kids", purpose_of_use="TREAT"),
        "admin": Principal(who="bench-admin", role=Role.admin, facility="local"),
    }

    def search(session: Session, principal: Principal) -> Any:
        query = qido.parse_query(
            "PatientID=K346295&includefield=all",
            level="study",
            default_limit=100,
            max_limit=1000,
            study_uid=None,
            series_uid=None,
            facility_id=None,
            retrieve_base="http://127.0.0.1/dicom-web",
        ).query
        return _visible_search(session, query=query, principal=principal)

    def lookup(session: Session, principal: Principal) -> Any:
        return _person_studies(session, "CHILDRENS", "K346295", principal)

    def lookup_filter(session: Session, principal: Principal) -> Any:
        # The lookup's consent step alone, on the records it reads (its named record is the
        # caller's own facility's: no question asked for it).
        return consent.filter_studies(session=session, principal=principal, studies=studies)

    out: dict[str, float] = {}
    with Session(state.engine) as session:
        studies = [s for s, _link, _detail in _person_studies(session, "CHILDRENS", "K346295", None).studies]
        parts = (
            ("qido_search", search),
            ("lookup_consent_filter", lookup_filter),
            ("lookup_person_studies", lookup),
        )
        for what, fn in parts:
            calls: dict[str, Callable[[], Any]] = {
                k: functools.partial(fn, session, p) for k, p in callers.items()
            }
            times = _interleaved(calls, n)
            for name, values in times.items():
                mid, high = _p50_p95(values)
                out[f"{what}_ms_median_{name}"] = round(mid, 3)
                out[f"{what}_ms_p95_{name}"] = round(high, 3)
            out[f"{what}_added_ms_median"] = round(
                out[f"{what}_ms_median_clinician"] - out[f"{what}_ms_median_admin"], 3
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
            coro = guard(scope, nothing, no_send)  # type: ignore[arg-type]
            with contextlib.suppress(StopIteration):  # it never awaits anything that suspends
                coro.send(None)
            times.append((time.perf_counter() - loop_start) * 1e6)
        result[f"guard_us_median_auth_{name}"] = round(statistics.median(times), 1)
        result[f"guard_us_p95_auth_{name}"] = round(statistics.quantiles(times, n=20)[-1], 1)
    return result


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def http_rounds(clients: dict[str, httpx.Client], rounds: int, requests: int) -> dict[str, Any]:
    """Per endpoint: each broker's p50 and p95 per round, and their medians over rounds."""
    per: dict[str, dict[str, dict[str, list[float]]]] = {
        what: {q: {"on": [], "off": []} for q in ("p50", "p95")} for what in ENDPOINTS
    }
    for _ in range(rounds):
        times = _round(clients, requests)
        for what, by_name in times.items():
            for name, values in by_name.items():
                mid, high = _p50_p95(values)
                per[what]["p50"][name].append(mid)
                per[what]["p95"][name].append(high)
    out: dict[str, Any] = {}
    for what, by_q in per.items():
        out[what] = {}
        for q, by_name in by_q.items():
            on, off = by_name["on"], by_name["off"]
            diffs = [a - b for a, b in zip(on, off, strict=True)]
            out[what][q] = {
                "auth_off_ms": round(statistics.median(off), 3),
                "auth_on_ms": round(statistics.median(on), 3),
                "added_ms": round(statistics.median(diffs), 3),
                "ratio": round(statistics.median(a / b for a, b in zip(on, off, strict=True)), 3),
                "added_ms_rounds": [round(d, 3) for d in diffs],
            }
    return out


def table(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per endpoint and percentile, then the in-process parts."""
    lines = [
        f"auth on vs off, {report['rounds']} rounds x {report['requests_per_round']} requests per endpoint "
        f"per broker, alternating request by request; medians over rounds; load average (1 min) "
        f"{report['load_average_start']} at start, {report['load_average_end']} at end",
        "",
        "| request | percentile | auth off | auth on | added (median of rounds) | ratio on/off "
        "| added, each round |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"qido": "QIDO-RS /studies?PatientID", "lookup": "lookup /api/priors"}
    for what, by_q in report["http"].items():
        for q, row in by_q.items():
            rounds = ", ".join(f"{d:+.2f}" for d in row["added_ms_rounds"])
            lines.append(
                f"| {names[what]} | {q} | {row['auth_off_ms']:.2f} ms | {row['auth_on_ms']:.2f} ms "
                f"| **{row['added_ms']:+.2f} ms** | {row['ratio']:.3f} | {rounds} |"
            )
    parts = report.get("in_process", {})
    if parts:
        lines += ["", "| in-process part | median | p95 |", "| --- | --- | --- |"]
        g = parts["guard"]
        lines.append(
            f"| the guard (token + policy), auth on / off | {g['guard_us_median_auth_on']} / "
            f"{g['guard_us_median_auth_off']} µs "
            f"| {g['guard_us_p95_auth_on']} / {g['guard_us_p95_auth_off']} µs |"
        )
        c = parts["consent"]
        for what, label in (
            ("qido_search", "QIDO-RS search"),
            ("lookup_consent_filter", "lookup's consent step"),
            ("lookup_person_studies", "lookup's records"),
        ):
            lines.append(
                f"| {label}, clinician / admin | {c[f'{what}_ms_median_clinician']:.3f} / "
                f"{c[f'{what}_ms_median_admin']:.3f} ms (added {c[f'{what}_added_ms_median']:+.3f}) "
                f"| {c[f'{what}_ms_p95_clinician']:.3f} / {c[f'{what}_ms_p95_admin']:.3f} ms |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=1000, help="per endpoint, per broker, per round")
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="the raw report as JSON instead of the table")
    ap.add_argument("--guard-only", action="store_true", help="only the guard's own cost (seconds)")
    ap.add_argument(
        "--consent-only", action="store_true", help="only the consent work, in-process (a minute)"
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
        start = _load()
        only = consent_only(state)
        print(json.dumps({"load_average_start": start, "load_average_end": _load(), **only}, indent=2))
        return
    # Audit is measured by bench/audit.py; here both brokers record alike (default: neither), so
    # the difference is authentication + authorization (roles, facility scope, consent) alone.
    on = Settings(data_dir=data, auth_enabled=True, audit_enabled=args.audit)
    off = on.model_copy(update={"auth_enabled": False})
    state = build_state(on)
    load_demo(engine=state.engine, store=state.store, patients=args.patients)
    key = load_or_create_signing_key(on.resolved_signing_key_file())
    # A clinician of the patient's facility; the embedded issuer's clinical tokens carry the
    # purpose of use TREAT, so consent is evaluated in full for other facilities' records.
    token = mint(key=key, settings=on, subject="bench", role="clinician", facility="kids")
    urls = {"on": _serve(on)[0], "off": _serve(off)[0]}
    clients = {
        "on": httpx.Client(
            base_url=urls["on"], headers={"Authorization": f"Bearer {token}"}, trust_env=False
        ),
        "off": httpx.Client(base_url=urls["off"], trust_env=False),
    }
    sizes = _same_answers(clients)
    _round(clients, 50)  # warm-up: compiled statements, caches, connections
    report: dict[str, Any] = {
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "records_per_answer": sizes,
        "audit": args.audit,
        "index": f"SQLite (WAL), demo data set of {args.patients} patients",
        "cpus": os.cpu_count(),
        "load_average_start": _load(),
    }
    report["http"] = http_rounds(clients, args.rounds, args.requests)
    report["in_process"] = {"guard": guard_only(on, token), "consent": consent_only(state)}
    report["load_average_end"] = _load()
    print(json.dumps(report, indent=2) if args.json else table(report))


if __name__ == "__main__":
    main()
