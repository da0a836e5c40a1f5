"""Time the lookup page in a real browser (not a test): from submit to the answer on screen.

Starts `scanonce serve` over an index (the demo data, or `--studies N` bulk-loaded as
bench/lookup.py does), opens `/` in Debian's headless Chromium (Playwright) and runs `--lookups`
lookups of random patients for "CT abdomen pelvis" (ED) after 5 warm-up lookups, two ways:

- htmx (what a browser with JavaScript does): `performance.now()` at the form's submit to the
  first animation frame after htmx settled the answer into the page;
- a plain form GET (no JavaScript): the navigation's `domContentLoadedEventEnd` (its clock starts
  at the submit), the answer's HTML parsed with its stylesheet.

It also reports the page's own assets (HTML of an answer, stylesheet, htmx) gzip-compressed.

    .venv/bin/python bench/lookup_page.py                  # the demo data
    .venv/bin/python bench/lookup_page.py --studies 1000000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from playwright.sync_api import sync_playwright
from sqlmodel import Session, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lookup import load as bulk_load  # noqa: E402
from broker.app import build_state  # noqa: E402
from broker.db import make_engine, migrate  # noqa: E402
from broker.demo.service import load_demo  # noqa: E402
from broker.index.models import Patient  # noqa: E402
from broker.settings import Settings  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
EXAM = "CT abdomen pelvis"
AS_OF = "2026-06-30"  # the demo's "today" (broker/demo/synth.py REFERENCE_DATE)

SUBMIT_TO_SCREEN = """([facility, mrn]) => new Promise(resolve => {
  document.getElementById('facility').value = facility;
  document.getElementById('mrn').value = mrn;
  const t0 = performance.now();
  document.body.addEventListener('htmx:afterSettle', () =>
    requestAnimationFrame(() => resolve([performance.now() - t0,
      document.querySelectorAll('#answer h2').length])), {once: true});
  document.querySelector('form.lookup').requestSubmit();
})"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _patients(database_url: str, limit: int = 5000) -> list[tuple[str, str]]:
    engine = make_engine(database_url)
    with Session(engine) as session:
        rows = session.exec(select(Patient.facility_id, Patient.patient_id).limit(limit)).all()
    engine.dispose()
    return [(f, p) for f, p in rows if f and p]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[max(0, int(len(ordered) * q + 0.5) - 1)], 1)


def _sizes(base: str, query: str) -> dict[str, int]:
    sizes = {}
    with httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
        for name, path in (
            ("answer_html", f"/?{query}"),
            ("css", "/static/scanonce.css"),
            ("htmx", "/static/htmx.min.js"),
        ):
            body = http.get(path).content
            sizes[name] = len(gzip.compress(body, 9))
    sizes["total"] = sum(sizes.values())
    return sizes


def _wait_for_jobs(base: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
        while time.monotonic() < deadline:
            jobs = http.get("/api/jobs").json()
            if not any(j["status"] in ("queued", "running") for j in jobs):
                return
            time.sleep(1)
    raise SystemExit("startup jobs still running")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=0, help="bulk-load this many studies instead of the demo")
    ap.add_argument("--lookups", type=int, default=50)
    ap.add_argument(
        "--dir", type=Path, help="keep the index here; with --studies, an index already there is reused"
    )
    args = ap.parse_args()
    tmp = args.dir or Path(tempfile.mkdtemp(prefix="lookup-page-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    database_url = f"sqlite:///{tmp / 'index.sqlite3'}"
    storage_url = (tmp / "objects").as_uri()
    t = time.perf_counter()
    if args.studies:
        if not (tmp / "index.sqlite3").exists():
            engine = make_engine(database_url)
            migrate(engine)
            bulk_load(engine, args.studies)
            engine.dispose()
        persons = max(1, int(args.studies * 0.3))  # as bench/lookup.py's load makes them
        rng = random.Random(7)
        patients = [("A", f"A{rng.randint(1, persons)}") for _ in range(args.lookups + 5)]
    else:
        state = build_state(
            Settings(data_dir=tmp, database_url=database_url, storage_url=storage_url, migrate_on_start=True)
        )
        load_demo(engine=state.engine, store=state.store)
        state.engine.dispose()
        everyone = _patients(database_url)
        rng = random.Random(7)
        patients = [rng.choice(everyone) for _ in range(args.lookups + 5)]
    load_s = time.perf_counter() - t

    port = _free_port()
    env = {
        **os.environ,
        "SCANONCE_DATA_DIR": str(tmp),
        "SCANONCE_DATABASE_URL": database_url,
        "SCANONCE_STORAGE_URL": storage_url,
        "SCANONCE_HOST": "127.0.0.1",
        "SCANONCE_PORT": str(port),
        "SCANONCE_DIMSE_PORT": "0",
        "SCANONCE_MLLP_PORT": "0",
    }
    scanonce = str(Path(sys.executable).with_name("scanonce"))
    with open(tmp / "serve.log", "wb") as log:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen([scanonce, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz", trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"the broker did not start: see {tmp / 'serve.log'}")
            time.sleep(0.2)
        _wait_for_jobs(base)  # startup jobs (facts, identity keys, training) would share the CPU
        result: dict[str, Any] = {
            "index": f"{args.studies} studies (bulk)" if args.studies else "demo",
            "load_s": round(load_s, 1),
        }
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base}/?{urlencode({'exam': EXAM, 'setting': 'ed', 'now': AS_OF})}")
            page.wait_for_function("typeof htmx !== 'undefined'")
            htmx_ms, answered = [], 0
            for i, (facility, mrn) in enumerate(patients):
                ms, headings = page.evaluate(SUBMIT_TO_SCREEN, [facility, mrn])
                if i >= 5:
                    htmx_ms.append(ms)
                    answered += headings > 0
            plain_ms = []
            for i, (facility, mrn) in enumerate(patients):
                query = urlencode(
                    {"facility": facility, "mrn": mrn, "exam": EXAM, "setting": "ed", "now": AS_OF}
                )
                page.goto(f"{base}/?{query}", wait_until="domcontentloaded")
                nav = page.evaluate("performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
                if i >= 5:
                    plain_ms.append(nav)
            browser.close()
        facility, mrn = patients[0]
        query = urlencode({"facility": facility, "mrn": mrn, "exam": EXAM, "setting": "ed", "now": AS_OF})
        result |= {
            "lookups": len(htmx_ms),
            "answered": answered,
            "htmx_p50_ms": _pct(htmx_ms, 0.5),
            "htmx_p95_ms": _pct(htmx_ms, 0.95),
            "htmx_max_ms": round(max(htmx_ms), 1),
            "plain_p50_ms": _pct(plain_ms, 0.5),
            "plain_p95_ms": _pct(plain_ms, 0.95),
            "plain_max_ms": round(max(plain_ms), 1),
            "assets_gzip_bytes": _sizes(base, query),
        }
        print(json.dumps(result))
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
