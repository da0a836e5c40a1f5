"""Start-to-ready: a restarted `scanonce serve` node, and Orthanc, side by side in one run.

Issue 17's target: "a node restart is ready in <= 5 s". For each side this measures, five times
(median reported), the seconds from exec of the server process to its first 200 on the
readiness URL (ScanOnce: /readyz, which needs the database and the object store; Orthanc:
/system), polling every 20 ms. Every start is a *restart*: the data directory, database and
bucket already exist and the schema is current (a first start, which migrates, is run once
before and not counted).

Sides:
- ScanOnce on SQLite + a local directory (the embedded default), HTTP + DIMSE listeners.
- ScanOnce on PostgreSQL (the local server, a fresh database) + S3 (moto's server process).
- `--before REF`: the same two, from the source tree of git REF (`git archive`, same venv), so
  that before/after sit in the same run under the same load.
- Orthanc (Debian package) with its own temp config: SQLite index, file storage, HTTP + DICOM
  listeners, DICOMweb plugin loaded, loopback only, authentication off (tests/peers.orthanc_config).

Python writes its .pyc files (PYTHONDONTWRITEBYTECODE is removed for the servers), as on an
installed node; the first, uncounted start writes them. Both ScanOnce sides run with
authentication on (a signing key file) and the server default of one parse worker process per
core but one (`SCANONCE_INGEST_PROCESSES` unset).

    python -m bench.startup [--runs 5] [--before main]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from tests.peers import ORTHANC_BIN, free_port, orthanc_config

PG_DSN = os.environ.get("SCANONCE_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
ROOT = Path(__file__).resolve().parent.parent


def _start(argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        # Own process group: stopped by its own id only.
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


def _time_to_ready(
    argv: list[str], env: dict[str, str], url: str, log: Path, cwd: Path, timeout: float = 120
) -> float:
    """Seconds from exec to the first 200 on `url`; the process is stopped afterwards."""
    start = time.monotonic()
    proc = _start(argv, env, log, cwd)
    try:
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited ({proc.returncode}); see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return time.monotonic() - start
                if time.monotonic() - start > timeout:
                    raise TimeoutError(f"not ready within {timeout:.0f} s; see {log}")
                time.sleep(0.02)
    finally:
        _stop(proc)


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    name = f"scanonce_test_{os.getpid()}_{secrets.token_hex(3)}_startup"
    with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def _moto(work: Path) -> Iterator[str]:
    port = free_port()
    proc = _start(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        {**os.environ, **AWS_ENV},
        work / "moto.log",
        work,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        _stop(proc)


def _s3(url: str) -> Any:
    import boto3

    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("s3", endpoint_url=url)


def _source(ref: str, work: Path) -> Path:
    """The source tree of git `ref`, extracted (no worktree: the repository is left alone)."""
    dest = work / f"src-{ref.replace('/', '_')}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


@dataclass
class Side:
    label: str
    argv: list[str]
    env: dict[str, str]
    url: str
    log: Path
    cwd: Path
    first_start_s: float = 0.0
    restarts_s: list[float] = field(default_factory=list)

    def start_to_ready(self) -> float:
        return _time_to_ready(self.argv, self.env, self.url, self.log, self.cwd)


def scanonce_side(
    label: str, src: Path, work: Path, *, database_url: str | None, storage_url: str | None
) -> Side:
    data = work / label.replace(" ", "_").replace("/", "_").replace("+", "_")
    data.mkdir()
    # PYTHONDONTWRITEBYTECODE (set in some shells) would recompile every module at every start,
    # which no installed node does (pip writes the .pyc files): the first, uncounted start writes them.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SCANONCE_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(AWS_ENV)
    env.update(
        {
            "PYTHONPATH": str(src),
            "SCANONCE_AUTH_SIGNING_KEY_FILE": str(work / "signing-key.json"),
            "SCANONCE_SYNC_INTERVAL_SECONDS": "0",
        }
    )
    if database_url:
        env["SCANONCE_DATABASE_URL"] = database_url
    if storage_url:
        env["SCANONCE_STORAGE_URL"] = storage_url
    http, dimse = free_port(), free_port()
    argv = [
        sys.executable, "-c", "from broker.cli import app; app()", "serve", "--data-dir", str(data / "node"),
        "--host", "127.0.0.1", "--port", str(http), "--dimse-port", str(dimse), "--mllp-port", "0",
        "--log-level", "warning",
    ]  # fmt: skip
    if database_url:  # a shared database is migrated by `scanonce db upgrade`, before any node
        subprocess.run(
            [sys.executable, "-c", "from broker.cli import app; app()", "db", "upgrade"],
            env={**env, "SCANONCE_DATA_DIR": str(data / "migrate")},
            cwd=src,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return Side(label, argv, env, f"http://127.0.0.1:{http}/readyz", data / "serve.log", src)


def orthanc_side(work: Path) -> Side:
    base = work / "orthanc"
    base.mkdir()
    http, dicom = free_port(), free_port()
    cfg = orthanc_config(base, http_port=http, dicom_port=dicom)
    for key in ("StorageDirectory", "IndexDirectory"):
        Path(cfg[key]).mkdir(parents=True, exist_ok=True)
    config = base / "orthanc.json"
    config.write_text(json.dumps(cfg, indent=2))
    argv = [ORTHANC_BIN, str(config)]
    version = ""
    with contextlib.suppress(Exception):
        out = subprocess.run([ORTHANC_BIN, "--version"], capture_output=True, text=True).stdout
        version = out.split("\n")[0].strip()
    label = f"Orthanc ({version or 'Debian package'})"
    return Side(label, argv, dict(os.environ), f"http://127.0.0.1:{http}/system", base / "orthanc.log", base)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="restarts per side (the median is reported)")
    parser.add_argument("--before", help="also measure the source tree of this git ref (e.g. main)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="scanonce-startup-") as tmp:
        work = Path(tmp)
        trees = [("after", ROOT)]
        if args.before:
            trees.insert(0, (f"before ({args.before})", _source(args.before, work)))
        with _postgres() as pg_url, _moto(work) as moto_url:
            sides = [orthanc_side(work)]
            for n, (tag, src) in enumerate(trees):
                sides.append(
                    scanonce_side(
                        f"ScanOnce SQLite+local {tag}", src, work, database_url=None, storage_url=None
                    )
                )
                # Created here, as an operator does once: a node's start only checks it.
                _s3(moto_url).create_bucket(Bucket=f"startup-{n}")
                storage = f"s3://startup-{n}?endpoint_url={moto_url}"
                sides.append(
                    scanonce_side(
                        f"ScanOnce PostgreSQL+S3 {tag}", src, work, database_url=pg_url, storage_url=storage
                    )
                )
            for side in sides:  # the first start migrates (SQLite) and writes the .pyc files
                side.first_start_s = side.start_to_ready()
            # Interleaved rounds: a change in the machine's load falls on every side alike.
            for _ in range(args.runs):
                for side in sides:
                    side.restarts_s.append(side.start_to_ready())
    load_end = os.getloadavg()
    orthanc = statistics.median(sides[0].restarts_s)
    print(f"load average (1/5/15 min) at start {load_start}, at end {load_end}; cores: {os.cpu_count()}")
    print("| side | first start s | restarts s | median s | / Orthanc |")
    print("|---|---|---|---|---|")
    results = []
    for side in sides:
        median = statistics.median(side.restarts_s)
        restarts = ", ".join(f"{t:.2f}" for t in side.restarts_s)
        print(
            f"| {side.label} | {side.first_start_s:.2f} | {restarts} | {median:.2f} "
            f"| {median / orthanc:.1f}x |"
        )
        results.append(
            {"side": side.label, "first_start_s": side.first_start_s, "restarts_s": side.restarts_s}
        )
    if args.json:
        args.json.write_text(json.dumps({"load": [load_start, load_end], "results": results}, indent=2))


if __name__ == "__main__":
    main()
