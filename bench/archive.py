"""Archive benchmark: ScanOnce vs Orthanc over DICOMweb, side by side, in one run.

Both servers run as real processes on loopback, each with its own fresh data folder, and
receive exactly the same generated instances (`bench.synthdata.bulk_instances`). Every
phase runs against Orthanc and then against ScanOnce before the next phase starts, so both
see the same machine state. The result is a Markdown table of ScanOnce / Orthanc ratios.

    .venv/bin/python -m bench.archive --quick                 # ~2-3 minutes, small sizes
    .venv/bin/python -m bench.archive --out bench/results/archive.md   # full: 100k-instance index, 1 GB study

Phases (sizes are the full mode's; --quick shrinks them):
  1. index build: 100,000 small CT instances (16x16) = 10,000 studies in tranches of 10,000,
     STOW-RS in multipart batches by N client threads; rate of the first and the last tranche;
  2. a 1,000-instance 512x512 CT study by STOW-RS (batches of 10 instances);
  3. QIDO-RS: a fixed mix of study-level queries (PatientID, AccessionNumber, StudyInstanceUID,
     PatientName wildcard, StudyDate range, ModalitiesInStudy + StudyDate), one client, p50/p95;
     a page of 100 studies at offset 0 and at offset 3,000; the unpaged study list;
  4. study metadata (WADO-RS) of the 1,000-instance study;
  5. study retrieve (WADO-RS multipart, transfer-syntax=* i.e. as stored), MB/s;
  6. one 1 GB study (2,000 CT slices) in ONE streamed STOW-RS request while the server's
     resident memory is sampled (VmHWM reset via /proc/<pid>/clear_refs, and VmRSS polled).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.peers import LOOPBACK, PeerError, free_port, orthanc  # noqa: E402

MiB = 1024 * 1024


# -- sizes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    index_instances: int  # small instances in the index
    tranche_instances: int  # instances per tranche (rate is measured per tranche)
    series_per_study: int
    instances_per_series: int
    small_batch: int  # instances per STOW request (small)
    ct_instances: int  # the metadata/retrieve study (512x512)
    ct_batch: int
    big_instances: int  # the one-request study whose RSS is sampled
    qido_repeats: int  # per query kind
    deep_offset: int
    metadata_repeats: int
    retrieve_repeats: int

    @property
    def instances_per_study(self) -> int:
        return self.series_per_study * self.instances_per_series


FULL = Plan(
    index_instances=100_000,
    tranche_instances=10_000,
    series_per_study=2,
    instances_per_series=5,
    small_batch=100,
    ct_instances=1000,
    ct_batch=10,
    big_instances=2000,  # 2,000 x 525,814 bytes = 1.05 GB
    qido_repeats=40,
    deep_offset=3000,
    metadata_repeats=5,
    retrieve_repeats=3,
)
QUICK = Plan(
    index_instances=6000,
    tranche_instances=2000,
    series_per_study=2,
    instances_per_series=5,
    small_batch=100,
    ct_instances=200,
    ct_batch=10,
    big_instances=200,  # ~105 MB
    qido_repeats=10,
    deep_offset=300,
    metadata_repeats=3,
    retrieve_repeats=2,
)


# -- data -----------------------------------------------------------------------------------


def instances(
    *, seed: int, n_studies: int, series_per_study: int, instances_per_series: int, rows: int = 16
) -> Iterator[bytes]:
    """The benchmark's instances: bench.synthdata's fast deterministic generator (CT template with
    identifiers patched in place; three studies per patient; dates 2016-2026)."""
    from bench.synthdata import bulk_instances

    return bulk_instances(
        seed=seed,
        n_studies=n_studies,
        series_per_study=series_per_study,
        instances_per_series=instances_per_series,
        rows=rows,
        cols=rows,
    )


@dataclass
class StudyFacts:
    """What the query mix needs to know about one generated study."""

    study_uid: str
    patient_id: str
    accession: str
    name: str
    date: str


def study_facts(first_instance: bytes) -> StudyFacts:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(first_instance), stop_before_pixels=True)
    return StudyFacts(
        study_uid=str(ds.StudyInstanceUID),
        patient_id=str(ds.PatientID),
        accession=str(ds.AccessionNumber),
        name=str(ds.PatientName),
        date=str(ds.StudyDate),
    )


def multipart_body(parts: Sequence[bytes], boundary: str) -> bytes:
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    chunks: list[bytes] = []
    for p in parts:
        chunks += [head, p, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


def stow_content_type(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


# -- process measurements (Linux /proc, no extra dependency) --------------------------------


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (a server may fork workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def _status_kb(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(pid: int) -> float:
    return sum(_status_kb(p, "VmRSS") for p in proc_tree(pid)) / 1024


# A server's CPU is counted over its process tree, and split by process: the serving process
# itself, and its children grouped by the name they give themselves (/proc/<pid>/comm: `spawn`
# starts parse workers and DIMSE receivers with the same command line; broker.index.parse_worker).
SERVING = "serving process"
CHILD_KINDS = {"scanonce-parse": "parse workers", "scanonce-dimse": "DIMSE receivers"}
OTHER = "other children"  # multiprocessing's resource tracker, anything unnamed
EXITED = "exited children"  # ended (and reaped) during the phase: its kind is gone with it
SPLIT_ORDER = (SERVING, *CHILD_KINDS.values(), OTHER, EXITED)


@dataclass(frozen=True)
class ProcCpu:
    """One process's CPU seconds from /proc/<pid>/stat: its own (utime + stime, every thread),
    and its reaped children's (cutime + cstime: a child's whole CPU lands there once its parent
    has waited for it)."""

    ppid: int
    kind: str
    own: float
    reaped: float


# (pid, start time in ticks): a pid reused by a new process during a phase is another process.
ProcKey = tuple[int, int]


@dataclass(frozen=True)
class CpuSnapshot:
    root: ProcKey
    procs: dict[ProcKey, ProcCpu]

    @property
    def total(self) -> float:
        return sum(p.own + p.reaped for p in self.procs.values())


def _read_stat(pid: int, tick: int) -> tuple[ProcKey, ProcCpu] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        # fields[0] is the state (field 3 of proc(5)): ppid 4, utime, stime, cutime, cstime
        # 14-17, starttime 22.
        own = (int(fields[11]) + int(fields[12])) / tick
        reaped = (int(fields[13]) + int(fields[14])) / tick
        key = (pid, int(fields[19]))
        return key, ProcCpu(int(fields[1]), CHILD_KINDS.get(comm, OTHER), own, reaped)
    except (OSError, IndexError, ValueError):
        return None


def cpu_snapshot(pid: int) -> CpuSnapshot:
    """The CPU of `pid` and of every descendant now. The root is read before and after its
    descendants, again if a child was reaped meanwhile: else that child could count twice (read
    alive, then in the root's reaped time) or not at all."""
    tick = os.sysconf("SC_CLK_TCK")
    for _ in range(5):
        first = _read_stat(pid, tick)
        if first is None:
            break
        procs = dict(filter(None, (_read_stat(p, tick) for p in proc_tree(pid)[1:])))
        last = _read_stat(pid, tick)
        if last is not None and last[1].reaped == first[1].reaped:
            procs[last[0]] = last[1]
            return CpuSnapshot(last[0], procs)
    if first is None:
        return CpuSnapshot((pid, 0), {})
    return CpuSnapshot(first[0], {first[0]: first[1], **procs})


def cpu_split(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds spent between two snapshots of one tree, by process kind (SPLIT_ORDER). The
    parts add up to `after.total - before.total` exactly. A process that ended in between is
    counted through its parent's reaped time (less what it had used before `before`): under
    that parent's kind, or as EXITED when the parent is the serving process."""
    reaped = {
        k: p.reaped - (before.procs[k].reaped if k in before.procs else 0.0) for k, p in after.procs.items()
    }
    by_pid = {k[0]: k for k in before.procs}
    for k, p in before.procs.items():
        if k in after.procs:
            continue
        # Its nearest ancestor alive at the end: whose reaped time holds its whole CPU.
        parent = by_pid.get(p.ppid)
        while parent is not None and parent not in after.procs:
            parent = by_pid.get(before.procs[parent].ppid)
        holder = parent if parent is not None else after.root
        if holder in reaped:
            reaped[holder] -= p.own + p.reaped
    split: dict[str, float] = {SERVING: 0.0}
    for k, p in after.procs.items():
        own = p.own - (before.procs[k].own if k in before.procs else 0.0)
        if k == after.root:
            split[SERVING] += own
            split[EXITED] = split.get(EXITED, 0.0) + reaped[k]
        else:
            split[p.kind] = split.get(p.kind, 0.0) + own + reaped[k]
    return {kind: split[kind] for kind in SPLIT_ORDER if kind in split}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid`'s process tree so far, children that have ended and
    been reaped included (a difference of two readings is the CPU spent in between)."""
    return cpu_snapshot(pid).total


class CpuMeter:
    """CPU of a server's process tree over a `with` block: `seconds` in all (what the benchmark
    compares), `split` by process kind (adds up to `seconds`)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seconds = 0.0
        self.split: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._before = cpu_snapshot(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        after = cpu_snapshot(self.pid)
        self.seconds = after.total - self._before.total
        self.split = cpu_split(self._before, after)


class PeakRss:
    """Peak resident memory of a process tree over a `with` block: VmHWM reset through
    clear_refs at entry (Linux >= 4.0) and VmRSS sampled every 20 ms as a cross-check."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sampled_mb = 0.0
        self.anon_mb = 0.0
        self.file_mb = 0.0
        self.hwm_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        for p in proc_tree(self.pid):
            with contextlib.suppress(OSError):
                Path(f"/proc/{p}/clear_refs").write_text("5")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = proc_tree(self.pid)
            anon = sum(_status_kb(p, "RssAnon") for p in pids) / 1024
            file = sum(_status_kb(p, "RssFile") + _status_kb(p, "RssShmem") for p in pids) / 1024
            if anon + file > self.sampled_mb:
                # File-backed pages (SQLite's mmap of the index, shared libraries) are page cache
                # the kernel can drop; anonymous pages are the process's own heap.
                self.sampled_mb, self.anon_mb, self.file_mb = anon + file, anon, file
            self._stop.wait(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.hwm_mb = sum(_status_kb(p, "VmHWM") for p in proc_tree(self.pid)) / 1024

    @property
    def peak_mb(self) -> float:
        return max(self.sampled_mb, self.hwm_mb)


def du_mb(path: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total / MiB


# -- servers --------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    base: str  # DICOMweb root, no trailing slash
    pid: int
    data_dir: Path
    settings: dict[str, Any]
    # What it keeps (index + objects) in MB when that is not all under data_dir (PostgreSQL + S3).
    stored_mb: Callable[[], float] | None = None


@dataclass
class ScanOnceBackend:
    """Where ScanOnce keeps its index and objects: the embedded default, or PostgreSQL + S3."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    stored_mb: Callable[[], float] | None = None


EMBEDDED = ScanOnceBackend("SQLite (WAL) under the data dir, storage: local folder (embedded default)")


@contextlib.contextmanager
def postgres_s3(pg_url: str, work: Path) -> Iterator[ScanOnceBackend]:
    """A fresh PostgreSQL database on `pg_url`'s server and a bucket on a moto S3 server started
    here (its own process, on loopback): the production parts, on this machine. Neither server's
    CPU or memory is counted as ScanOnce's, as Orthanc's SQLite file is counted as Orthanc's."""
    import boto3
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    name = f"bench_archive_{secrets.token_hex(4)}"
    conninfo = psycopg.conninfo.make_conninfo(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        dbname="postgres",
    )
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    port = free_port()
    moto = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "moto_server"), "-H", LOOPBACK, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://{LOOPBACK}:{port}"
    credentials = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    s3 = boto3.session.Session(
        aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
    ).client("s3", endpoint_url=endpoint)

    def stored_mb() -> float:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            row = admin.execute("SELECT pg_database_size(%s)", (name,)).fetchone()
        objects = sum(
            o["Size"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench")
            for o in page.get("Contents", ())
        )
        return ((row[0] if row else 0) + objects) / 1e6

    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(endpoint, timeout=2)
                break
            if time.monotonic() > deadline or moto.poll() is not None:
                raise PeerError("the moto S3 server did not start")
            time.sleep(0.2)
        yield ScanOnceBackend(
            f"PostgreSQL {url.host}:{url.port} (database {name}), storage: S3 (moto server, loopback)",
            env={
                "SCANONCE_DATABASE_URL": url.set(database=name).render_as_string(hide_password=False),
                "SCANONCE_STORAGE_URL": (
                    f"s3://bench?endpoint_url={quote(endpoint, safe='')}&create_bucket=true"
                ),
                "SCANONCE_MIGRATE_ON_START": "true",
                **credentials,
            },
            stored_mb=stored_mb,
        )
    finally:
        stop_process(moto)  # holding a GB of objects in memory, moto can take longer than 15 s
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def run_orthanc(work: Path) -> Iterator[Server]:
    with orthanc(work / "orthanc", aet="BENCH") as peer:
        system = httpx.get(f"{peer.url}/system", timeout=10).json()
        plugin = httpx.get(f"{peer.url}/plugins/dicom-web", timeout=10).json()
        cfg = peer.config
        settings = {
            "version": f"Orthanc {system.get('Version')} + DICOMweb plugin {plugin.get('Version')}",
            "index": "SQLite (built-in), storage: local folder",
            "StorageCompression": cfg["StorageCompression"],
            "KeepAlive": cfg["KeepAlive"],
            "TcpNoDelay": cfg["TcpNoDelay"],
            "HttpCompressionEnabled": cfg["HttpCompressionEnabled"],
            "HttpThreadsCount": "50 (default)",
            "StorageAccessOnFind": "Always (default)",
            "DicomWeb.StudiesMetadata/SeriesMetadata": "Full (default)",
            "OverwriteInstances": "false (default)",
        }
        yield Server("Orthanc", peer.dicomweb_url, peer.pid, peer.storage_dir.parent, settings)


def _scanonce_command(port: int, data_dir: Path) -> list[str]:
    # The checkout's own venv, else the `scanonce` of the Python running the benchmark: a
    # worktree without a venv (PYTHONPATH=worktree, as --variant does) still runs `scanonce
    # serve`, with its DIMSE listener, not the bare app factory without one.
    exe = REPO / ".venv" / "bin" / "scanonce"
    if not exe.exists():
        exe = Path(sys.executable).parent / "scanonce"
    if exe.exists():
        probe = subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            cmd = [str(exe), "serve"]
            help_text = probe.stdout
            if "--host" in help_text:
                cmd += ["--host", LOOPBACK]
            if "--port" in help_text:
                cmd += ["--port", str(port)]
            if "--data-dir" in help_text:
                cmd += ["--data-dir", str(data_dir)]
            if "--log-level" in help_text:
                # No per-request access log: Orthanc does not log each request either.
                cmd += ["--log-level", "warning"]
            return cmd
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "broker.app:create_app",
        "--factory",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]


@contextlib.contextmanager
def run_scanonce(
    work: Path, *, env_extra: dict[str, str] | None = None, backend: ScanOnceBackend = EMBEDDED
) -> Iterator[Server]:
    data_dir = work / "scanonce"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "SCANONCE_DATA_DIR": str(data_dir),
        "SCANONCE_HOST": LOOPBACK,
        "SCANONCE_PORT": str(port),
        "SCANONCE_DIMSE_PORT": str(free_port()),
        "SCANONCE_MLLP_PORT": "0",  # the HL7 feed is not measured here; 2575 may be taken
        # Embedded default (SQLite + local folder under the data dir) unless the backend says.
        "SCANONCE_DATABASE_URL": "",
        "SCANONCE_STORAGE_URL": "",
        **backend.env,
        **(env_extra or {}),
    }
    for k in ("SCANONCE_DATABASE_URL", "SCANONCE_STORAGE_URL"):
        if not env[k]:
            del env[k]
    cmd = _scanonce_command(port, data_dir)
    log_path = work / "scanonce.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise PeerError(f"ScanOnce exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise PeerError(f"ScanOnce did not answer /healthz:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        _TOKENS[url] = _admin_token(data_dir)
        settings = {
            "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
            "index": backend.name,
        }
        yield Server("ScanOnce", f"{url}/dicom-web", proc.pid, data_dir, settings, backend.stored_mb)
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not ended within 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- client ---------------------------------------------------------------------------------


JSON_ACCEPT = {"Accept": "application/dicom+json"}
_local = threading.local()
# ScanOnce's base URL -> a bearer token its embedded issuer accepts (authentication is on, as
# deployed: the token check is part of what is measured). Orthanc runs without authentication.
_TOKENS: dict[str, str] = {}


def _admin_token(data_dir: Path) -> str:
    """An admin's bearer token signed with the server's own key (data_dir/auth-signing-key.json,
    as `scanonce token create` would mint it)."""
    sys.path.insert(0, str(REPO))
    from broker.security.tokens import load_or_create_signing_key, mint
    from broker.settings import Settings

    settings = Settings(data_dir=data_dir)
    key = load_or_create_signing_key(settings.resolved_signing_key_file())
    return mint(key=key, settings=settings, subject="bench", role="admin", facility=None, expires_in=86_400)


def bearer(request: httpx.Request) -> httpx.Request:
    """httpx auth: the token of the ScanOnce server a request goes to, if any."""
    origin = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
    token = _TOKENS.get(origin)
    if token is not None:
        request.headers["Authorization"] = f"Bearer {token}"
    return request


def _client() -> httpx.Client:
    c = getattr(_local, "client", None)
    if c is None:
        c = httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0), trust_env=False, auth=bearer)
        _local.client = c
    return c


@dataclass
class StowResult:
    instances: int
    dicom_bytes: int
    seconds: float
    failed: int
    server_cpu_s: float
    # server_cpu_s by process kind (CpuMeter.split): the serving process, its workers, ...
    server_cpu_split: dict[str, float] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_s(self) -> float:
        return self.dicom_bytes / MiB / self.seconds


def _count_failed(resp: httpx.Response, sent: int) -> int:
    if resp.status_code not in (200, 202):
        return sent
    try:
        body = resp.json()
    except ValueError:
        return 0
    failed = body.get("00081198", {}).get("Value", []) if isinstance(body, dict) else []
    return len(failed)


def stow_batches(server: Server, batches: Sequence[Sequence[bytes]], threads: int) -> StowResult:
    """POST each batch as one multipart request, `threads` requests in flight."""
    boundary = "bench" + secrets.token_hex(8)
    bodies = [(multipart_body(b, boundary), len(b), sum(map(len, b))) for b in batches]
    headers = {"Content-Type": stow_content_type(boundary), **JSON_ACCEPT}

    def post(item: tuple[bytes, int, int]) -> int:
        body, n, _ = item
        r = _client().post(f"{server.base}/studies", content=body, headers=headers)
        return _count_failed(r, n)

    with CpuMeter(server.pid) as cpu:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            failed = sum(pool.map(post, bodies))
        dt = time.perf_counter() - t0
    return StowResult(
        instances=sum(n for _, n, _ in bodies),
        dicom_bytes=sum(s for _, _, s in bodies),
        seconds=dt,
        failed=failed,
        server_cpu_s=cpu.seconds,
        server_cpu_split=cpu.split,
    )


def stow_streamed(server: Server, make: Callable[[], Iterable[bytes]], n: int, each: int) -> StowResult:
    """One STOW-RS request whose body is generated while it is sent (never whole in memory
    on the client side either); every instance is `each` bytes so Content-Length is known."""
    boundary = "bench" + secrets.token_hex(8)
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"--{boundary}--\r\n".encode()
    length = n * (len(head) + each + 2) + len(tail)

    def body() -> Iterator[bytes]:
        count = 0
        for inst in make():
            if len(inst) != each:
                raise RuntimeError("instances of the streamed study must all have the same size")
            count += 1
            yield head + inst + b"\r\n"
        assert count == n
        yield tail

    headers = {"Content-Type": stow_content_type(boundary), "Content-Length": str(length), **JSON_ACCEPT}
    with CpuMeter(server.pid) as cpu:
        t0 = time.perf_counter()
        r = _client().post(f"{server.base}/studies", content=body(), headers=headers)
        dt = time.perf_counter() - t0
    return StowResult(n, n * each, dt, _count_failed(r, n), cpu.seconds, cpu.split)


def query_string(params: dict[str, str]) -> str:
    """QIDO-RS query string with the matching characters left literal (`*`, `?`, `^`, `,`, `-`).

    Orthanc 1.10's DICOMweb plugin 1.7 does not percent-decode QIDO values (`PatientName=B%2A`
    matches nothing where `B*` matches), while httpx encodes `*` and `^`; sending them literal
    (as the standard's examples do) asks both servers the same question."""
    return "&".join(f"{k}={quote(v, safe='*?^,-.')}" for k, v in params.items())


def timed_get(
    url: str, *, params: Any = None, headers: dict[str, str] | None = None
) -> tuple[float, int, Any]:
    """Seconds for the whole response (headers and body), status, and the parsed JSON."""
    if params:
        url = f"{url}?{query_string(params)}"
    t0 = time.perf_counter()
    try:
        r = _client().get(url, headers=headers or JSON_ACCEPT)
    except httpx.RemoteProtocolError:
        # A keep-alive connection the server closed just as it was reused (both servers close
        # idle ones): say so and ask again once, as a browser would for a GET.
        log(f"{url.split('?')[0]}: connection closed under a reused request; asking again")
        t0 = time.perf_counter()
        r = _client().get(url, headers=headers or JSON_ACCEPT)
    body = r.content
    dt = time.perf_counter() - t0
    data: Any = None
    if r.status_code == 200 and body:
        with contextlib.suppress(ValueError):
            data = json.loads(body)
    return dt, r.status_code, data


def retrieve(server: Server, study_uid: str) -> tuple[float, int, str]:
    headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    t0 = time.perf_counter()
    n = 0
    with _client().stream("GET", f"{server.base}/studies/{study_uid}", headers=headers) as r:
        ctype = r.headers.get("content-type", "")
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{server.name} retrieve: HTTP {r.status_code} {r.text[:300]}")
        for chunk in r.iter_raw(MiB):
            n += len(chunk)
    return time.perf_counter() - t0, n, ctype


# -- stats ----------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the run --------------------------------------------------------------------------------


@dataclass
class SideResults:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    tranches: list[dict[str, Any]] = field(default_factory=list)
    index_build_s: float = 0.0
    ct: dict[str, Any] = field(default_factory=dict)
    qido: dict[str, list[float]] = field(default_factory=dict)
    qido_counts: dict[str, int] = field(default_factory=dict)
    qido_errors: dict[str, str] = field(default_factory=dict)
    metadata_s: list[float] = field(default_factory=list)
    metadata_items: int = 0
    retrieve: list[dict[str, Any]] = field(default_factory=list)
    big: dict[str, Any] = field(default_factory=dict)
    disk_mb: float = 0.0
    idle_rss_mb: float = 0.0
    failures: list[str] = field(default_factory=list)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_query_mix(facts: list[StudyFacts], repeats: int, seed: int) -> list[tuple[str, dict[str, str]]]:
    """The fixed query mix: `repeats` queries of each kind over values picked (deterministically)
    from the generated studies, so each query really matches something."""
    import random
    from datetime import date, timedelta

    rng = random.Random(seed)
    picks = [facts[rng.randrange(len(facts))] for _ in range(repeats)]

    def day(s: str, delta: int) -> str:
        d = date(int(s[:4]), int(s[4:6]), int(s[6:8])) + timedelta(days=delta)
        return d.strftime("%Y%m%d")

    mix: list[tuple[str, dict[str, str]]] = []
    for f in picks:
        mix.append(("PatientID", {"PatientID": f.patient_id}))
    for f in picks[::-1]:
        mix.append(("AccessionNumber", {"AccessionNumber": f.accession}))
    for f in picks:
        mix.append(("StudyInstanceUID", {"StudyInstanceUID": f.study_uid}))
    # Letters only: Orthanc cannot match a percent-encoded value (space, apostrophe, accents).
    ascii_names = [f for f in facts if f.name.replace("^", "").isalpha() and f.name.isascii()]
    name_picks = [ascii_names[rng.randrange(len(ascii_names))] for _ in range(repeats)]
    for f in name_picks:
        # "Family^G*": the family name and the first letter of the given name, a typical
        # "type the start of the name" search that matches a handful of patients.
        family, _, given = f.name.partition("^")
        mix.append(("PatientName wildcard", {"PatientName": f"{family}^{given[:1]}*"}))
    for f in picks:
        mix.append(("StudyDate range (30 d)", {"StudyDate": f"{f.date}-{day(f.date, 29)}"}))
    for f in picks:
        mix.append(
            (
                "ModalitiesInStudy + 7 d",
                {"ModalitiesInStudy": "CT", "StudyDate": f"{f.date}-{day(f.date, 6)}"},
            )
        )
    return mix


def run(
    plan: Plan,
    *,
    threads: int,
    work: Path,
    seed: int,
    sides: Sequence[str],
    pg: str | None = None,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    results: dict[str, SideResults] = {}
    with contextlib.ExitStack() as stack:
        servers: list[Server] = []
        if "orthanc" in sides:
            servers.append(stack.enter_context(run_orthanc(work)))
        if "scanonce" in sides:
            backend = stack.enter_context(postgres_s3(pg, work)) if pg else EMBEDDED
            servers.append(stack.enter_context(run_scanonce(work, backend=backend)))
        for s in servers:
            results[s.name] = SideResults(s.name, settings=s.settings)
            results[s.name].idle_rss_mb = rss_mb(s.pid)
            log(f"{s.name} up: {s.base} (pid {s.pid})")

        # 1. index build, tranche by tranche
        per_study = plan.instances_per_study
        studies_per_tranche = plan.tranche_instances // per_study
        n_tranches = plan.index_instances // plan.tranche_instances
        facts: list[StudyFacts] = []
        for t in range(n_tranches):
            insts = list(
                instances(
                    seed=seed * 1000 + t,
                    n_studies=studies_per_tranche,
                    series_per_study=plan.series_per_study,
                    instances_per_series=plan.instances_per_series,
                )
            )
            facts += [study_facts(insts[i]) for i in range(0, len(insts), per_study)]
            batches = [insts[i : i + plan.small_batch] for i in range(0, len(insts), plan.small_batch)]
            for s in servers:
                r = stow_batches(s, batches, threads)
                res = results[s.name]
                res.tranches.append(
                    {
                        "instances": r.instances,
                        "per_s": r.per_s,
                        "mb_s": r.mb_s,
                        "seconds": r.seconds,
                        "failed": r.failed,
                        "server_cpu_s": r.server_cpu_s,
                        "server_cpu_split": r.server_cpu_split,
                    }
                )
                res.index_build_s += r.seconds
                if r.failed:
                    res.failures.append(f"tranche {t}: {r.failed} instances failed")
                log(f"tranche {t + 1}/{n_tranches} {s.name}: {r.per_s:.0f} inst/s ({r.failed} failed)")

        # 2. the 512x512 CT study
        ct_series = 4 if plan.ct_instances >= 4 else 1
        ct = list(
            instances(
                seed=seed * 1000 + 900,
                n_studies=1,
                series_per_study=ct_series,
                instances_per_series=plan.ct_instances // ct_series,
                rows=512,
            )
        )
        ct_uid = study_facts(ct[0]).study_uid
        ct_batches = [ct[i : i + plan.ct_batch] for i in range(0, len(ct), plan.ct_batch)]
        for s in servers:
            r = stow_batches(s, ct_batches, threads)
            results[s.name].ct = {
                "instances": r.instances,
                "per_s": r.per_s,
                "mb_s": r.mb_s,
                "seconds": r.seconds,
                "failed": r.failed,
                "server_cpu_s": r.server_cpu_s,
                "server_cpu_split": r.server_cpu_split,
            }
            if r.failed:
                results[s.name].failures.append(f"CT study: {r.failed} instances failed")
            log(f"CT 512x512 {s.name}: {r.per_s:.0f} inst/s, {r.mb_s:.1f} MB/s")
        ct_bytes = sum(map(len, ct))
        del ct, ct_batches

        # 3. QIDO-RS
        mix = build_query_mix(facts, plan.qido_repeats, seed)
        paged = [
            ("page 100 @ offset 0", {"limit": "100", "offset": "0"}),
            (f"page 100 @ offset {plan.deep_offset}", {"limit": "100", "offset": str(plan.deep_offset)}),
            ("unpaged study list", {}),
        ]
        for s in servers:
            res = results[s.name]
            for _ in range(2):  # warm the connection and caches equally
                timed_get(f"{s.base}/studies", params={"PatientID": facts[0].patient_id})
            for kind, params in mix:
                dt, status, data = timed_get(f"{s.base}/studies", params=params)
                res.qido.setdefault(kind, []).append(dt)
                res.qido_counts[kind] = res.qido_counts.get(kind, 0) + (
                    len(data) if isinstance(data, list) else 0
                )
                if status not in (200, 204):
                    res.qido_errors[kind] = f"HTTP {status}"
            reps = max(3, plan.qido_repeats // 4)
            for kind, params in paged:
                for _ in range(reps):
                    dt, status, data = timed_get(f"{s.base}/studies", params=params)
                    res.qido.setdefault(kind, []).append(dt)
                    res.qido_counts[kind] = len(data) if isinstance(data, list) else 0
                    if status not in (200, 204):
                        res.qido_errors[kind] = f"HTTP {status}"
            mix_all = [v for k in dict.fromkeys(k for k, _ in mix) for v in res.qido[k]]
            log(f"QIDO {s.name}: mix p50 {median(mix_all) * 1e3:.1f} ms, p95 {pct(mix_all, 95) * 1e3:.1f} ms")

        # 4. metadata of the CT study
        for s in servers:
            res = results[s.name]
            for _ in range(plan.metadata_repeats):
                dt, status, data = timed_get(f"{s.base}/studies/{ct_uid}/metadata")
                if status != 200:
                    res.failures.append(f"metadata: HTTP {status}")
                    break
                res.metadata_s.append(dt)
                res.metadata_items = len(data) if isinstance(data, list) else 0
            log(
                f"metadata {s.name}: median {median(res.metadata_s) * 1e3:.0f} ms, {res.metadata_items} items"
            )

        # 5. retrieve of the CT study
        for s in servers:
            res = results[s.name]
            try:
                for _ in range(plan.retrieve_repeats):
                    with CpuMeter(s.pid) as cpu:
                        dt, n, ctype = retrieve(s, ct_uid)
                    res.retrieve.append(
                        {
                            "seconds": dt,
                            "bytes": n,
                            "mb_s": n / MiB / dt,
                            "server_cpu_s": cpu.seconds,
                            "server_cpu_split": cpu.split,
                        }
                    )
                    res.settings.setdefault("retrieve content-type", ctype.split("; boundary")[0])
                log(f"retrieve {s.name}: {median([x['mb_s'] for x in res.retrieve]):.0f} MB/s")
            except (RuntimeError, httpx.HTTPError) as exc:
                res.failures.append(f"retrieve: {exc}")

        # 6. the big study in one streamed request, memory sampled
        big_series = 4
        per_series = plan.big_instances // big_series

        def big() -> Iterator[bytes]:
            return instances(
                seed=seed * 1000 + 901,
                n_studies=1,
                series_per_study=big_series,
                instances_per_series=per_series,
                rows=512,
            )

        each = len(next(iter(big())))
        for s in servers:
            res = results[s.name]
            try:
                rss_before = rss_mb(s.pid)
                with PeakRss(s.pid) as peak:
                    r = stow_streamed(s, big, big_series * per_series, each)
                res.big = {
                    "instances": r.instances,
                    "mb": r.dicom_bytes / MiB,
                    "seconds": r.seconds,
                    "mb_s": r.mb_s,
                    "failed": r.failed,
                    "peak_rss_mb": peak.peak_mb,
                    "rss_before_mb": rss_before,
                    "peak_anon_mb": peak.anon_mb,
                    "peak_file_mb": peak.file_mb,
                    "hwm_mb": peak.hwm_mb,
                    "sampled_mb": peak.sampled_mb,
                    "server_cpu_s": r.server_cpu_s,
                    "server_cpu_split": r.server_cpu_split,
                }
                if r.failed:
                    res.failures.append(f"big study: {r.failed} instances failed")
                log(f"big study {s.name}: {r.mb_s:.0f} MB/s, peak RSS {peak.peak_mb:.0f} MB")
            except httpx.HTTPError as exc:
                res.failures.append(f"big study: {exc!r}")
            res.disk_mb = s.stored_mb() if s.stored_mb else du_mb(s.data_dir)
        _ = ct_bytes
    return {
        "plan": asdict(plan),
        "threads": threads,
        "seed": seed,
        "total_s": time.perf_counter() - t_start,
        # Other work on the machine skews rates and latencies (not the CPU-per-unit rows).
        "loadavg_1m": [load_start, os.getloadavg()[0]],
        "sides": {k: asdict(v) for k, v in results.items()},
    }


# -- report ---------------------------------------------------------------------------------


def _fmt(v: float | None, unit: str = "", digits: int = 1) -> str:
    if v is None or v != v:  # NaN
        return "n/a"
    return f"{v:,.{digits}f}{unit}"


def _split(side: dict[str, Any] | None) -> str:
    big = (side or {}).get("big") or {}
    if "peak_anon_mb" not in big:
        return "n/a"
    return f"{big['peak_anon_mb']:,.0f} + {big['peak_file_mb']:,.0f}"


def _load(data: dict[str, Any]) -> str:
    load = data.get("loadavg_1m")
    return " / ".join(f"{x:.1f}" for x in load) if load else "n/a"


def _counts(so: dict[str, Any] | None, oc: dict[str, Any] | None, kind: str) -> str:
    """'ScanOnce / Orthanc' result counts: a server that cuts the unpaged list at its default
    limit (as PS3.18 allows, with a Warning) does less work than one that returns everything."""
    return " / ".join(str(s["qido_counts"].get(kind, "n/a")) if s else "n/a" for s in (so, oc))


def cpu_parts(measures: Sequence[dict[str, Any]], scale: float) -> dict[str, float] | None:
    """The measurements' server CPU split (`server_cpu_split`) summed and multiplied by `scale`
    (e.g. 1e3 / instances for ms per instance); None if one has none (a run saved before the
    split was measured)."""
    if not measures or any("server_cpu_split" not in m for m in measures):
        return None
    total: dict[str, float] = {}
    for m in measures:
        for kind, seconds in m["server_cpu_split"].items():
            total[kind] = total.get(kind, 0.0) + seconds * scale
    return total


def split_cells(
    so: dict[str, float] | None, oc: dict[str, float] | None, digits: int = 2
) -> tuple[str, str, str] | None:
    """(which parts, ScanOnce's values, Orthanc's) for a row beside a server CPU row, e.g.
    ("serving process / parse workers", "1.10 / 0.41", "1.02 (one process)"). Parts that are
    zero and need not be there (other children, exited children) are left out, a child kind that
    ran is shown even at 0; a server without children shows its total and "(one process)". None
    if neither has a split."""
    if so is None and oc is None:
        return None
    optional = (OTHER, EXITED)
    kinds = [k for k in SPLIT_ORDER if k in (so or oc or {}) and (k not in optional or (so or oc or {})[k])]
    kinds = kinds or [SERVING]

    def cell(parts: dict[str, float] | None) -> str:
        if parts is None:
            return "n/a"
        if set(parts) <= {SERVING, EXITED} and not parts.get(EXITED):
            return f"{sum(parts.values()):,.{digits}f} (one process)"
        return " / ".join(f"{parts.get(k, 0.0):,.{digits}f}" for k in kinds)

    return " / ".join(kinds), cell(so), cell(oc)


def render(data: dict[str, Any]) -> str:
    plan = data["plan"]
    sides = data["sides"]
    so = sides.get("ScanOnce")
    oc = sides.get("Orthanc")
    rows: list[tuple[str, float | str | None, float | str | None, str, str, bool]] = []
    # (metric, ScanOnce, Orthanc, unit, target, higher_is_better); a text cell is shown as it is

    def split_row(
        unit: str, parts: Callable[[dict[str, Any]], dict[str, float] | None]
    ) -> list[tuple[str, float | str | None, float | str | None, str, str, bool]]:
        """The row under a server CPU row: that CPU by process (none for a saved run without)."""

        def of(side: dict[str, Any] | None) -> dict[str, float] | None:
            if not side:
                return None
            try:
                return parts(side)
            except (KeyError, IndexError, ZeroDivisionError):
                return None

        cells = split_cells(of(so), of(oc))
        if cells is None:
            return []
        kinds, so_text, oc_text = cells
        return [(f"… of which {kinds}, {unit}", so_text, oc_text, "", "", False)]

    def tr(side: dict[str, Any] | None, i: int, key: str) -> float | None:
        if not side or not side["tranches"]:
            return None
        return side["tranches"][i][key]

    def get(side: dict[str, Any] | None, f: Callable[[dict[str, Any]], float]) -> float | None:
        if not side:
            return None
        try:
            return f(side)
        except (KeyError, IndexError, ValueError, ZeroDivisionError, statistics.StatisticsError):
            return None

    mix_kinds = [k for k in (oc or so or {}).get("qido", {}) if not k.startswith(("page", "unpaged"))]

    def mix_values(side: dict[str, Any]) -> list[float]:
        return [v for k in mix_kinds for v in side["qido"].get(k, [])]

    rows += [
        (
            "STOW-RS small (16x16 CT), empty index, inst/s",
            tr(so, 0, "per_s"),
            tr(oc, 0, "per_s"),
            "",
            "≥ 1.5×",
            True,
        ),
        (
            "STOW-RS small, median over all tranches, inst/s",
            get(so, lambda s: median([t["per_s"] for t in s["tranches"]])),
            get(oc, lambda s: median([t["per_s"] for t in s["tranches"]])),
            "",
            "≥ 1.5×",
            True,
        ),
        ("STOW-RS small, empty index, MB/s", tr(so, 0, "mb_s"), tr(oc, 0, "mb_s"), "", "", True),
        (
            f"STOW-RS small, last tranche (index at {plan['index_instances']:,}), inst/s",
            tr(so, -1, "per_s"),
            tr(oc, -1, "per_s"),
            "",
            "",
            True,
        ),
        (
            "STOW-RS small, last / first tranche rate",
            get(so, lambda s: s["tranches"][-1]["per_s"] / s["tranches"][0]["per_s"]),
            get(oc, lambda s: s["tranches"][-1]["per_s"] / s["tranches"][0]["per_s"]),
            "",
            "(≈1 = no slowdown)",
            True,
        ),
        (
            "Server CPU per small instance stored, ms (load-independent)",
            get(
                so,
                lambda s: (
                    1e3
                    * sum(t["server_cpu_s"] for t in s["tranches"])
                    / sum(t["instances"] for t in s["tranches"])
                ),
            ),
            get(
                oc,
                lambda s: (
                    1e3
                    * sum(t["server_cpu_s"] for t in s["tranches"])
                    / sum(t["instances"] for t in s["tranches"])
                ),
            ),
            "",
            "",
            False,
        ),
        *split_row(
            "ms",
            lambda s: cpu_parts(s["tranches"], 1e3 / sum(t["instances"] for t in s["tranches"])),
        ),
        (
            f"Index build, {plan['index_instances']:,} instances, s",
            get(so, lambda s: s["index_build_s"]),
            get(oc, lambda s: s["index_build_s"]),
            "",
            "",
            False,
        ),
        (
            "STOW-RS 512x512 CT, inst/s",
            get(so, lambda s: s["ct"]["per_s"]),
            get(oc, lambda s: s["ct"]["per_s"]),
            "",
            "≥ 1.2×",
            True,
        ),
        (
            "STOW-RS 512x512 CT, MB/s",
            get(so, lambda s: s["ct"]["mb_s"]),
            get(oc, lambda s: s["ct"]["mb_s"]),
            "",
            "",
            True,
        ),
        (
            "Server CPU per CT instance stored, ms",
            get(so, lambda s: 1e3 * s["ct"]["server_cpu_s"] / s["ct"]["instances"]),
            get(oc, lambda s: 1e3 * s["ct"]["server_cpu_s"] / s["ct"]["instances"]),
            "",
            "",
            False,
        ),
        *split_row("ms", lambda s: cpu_parts([s["ct"]], 1e3 / s["ct"]["instances"])),
        (
            "QIDO-RS query mix p50, ms",
            get(so, lambda s: median(mix_values(s)) * 1000),
            get(oc, lambda s: median(mix_values(s)) * 1000),
            "",
            "",
            False,
        ),
        (
            "QIDO-RS query mix p95, ms",
            get(so, lambda s: pct(mix_values(s), 95) * 1000),
            get(oc, lambda s: pct(mix_values(s), 95) * 1000),
            "",
            "≤ 0.5×",
            False,
        ),
    ]

    def qido_p50(side: dict[str, Any] | None, kind: str) -> float | None:
        return get(side, lambda s: median(s["qido"][kind]) * 1000)

    for kind in [k for k in (oc or so or {}).get("qido", {}) if k.startswith(("page", "unpaged"))]:
        rows.append(
            (
                f"QIDO-RS {kind} p50, ms (studies returned: {_counts(so, oc, kind)})",
                qido_p50(so, kind),
                qido_p50(oc, kind),
                "",
                "",
                False,
            )
        )
    rows += [
        (
            f"Study metadata, {plan['ct_instances']:,} instances, median ms",
            get(so, lambda s: median(s["metadata_s"]) * 1000),
            get(oc, lambda s: median(s["metadata_s"]) * 1000),
            "",
            "≤ 0.1×",
            False,
        ),
        (
            "Study retrieve (WADO-RS multipart, as stored), MB/s",
            get(so, lambda s: median([x["mb_s"] for x in s["retrieve"]])),
            get(oc, lambda s: median([x["mb_s"] for x in s["retrieve"]])),
            "",
            "≥ 1×",
            True,
        ),
        (
            "Server CPU per GB retrieved, s",
            get(
                so,
                lambda s: (
                    sum(x["server_cpu_s"] for x in s["retrieve"])
                    / sum(x["bytes"] for x in s["retrieve"])
                    * 1e9
                ),
            ),
            get(
                oc,
                lambda s: (
                    sum(x["server_cpu_s"] for x in s["retrieve"])
                    / sum(x["bytes"] for x in s["retrieve"])
                    * 1e9
                ),
            ),
            "",
            "",
            False,
        ),
        *split_row("s", lambda s: cpu_parts(s["retrieve"], 1e9 / sum(x["bytes"] for x in s["retrieve"]))),
        (
            f"One-request STOW-RS of a {plan['big_instances'] * 525814 / 1e9:.2f} GB study, MB/s",
            get(so, lambda s: s["big"]["mb_s"]),
            get(oc, lambda s: s["big"]["mb_s"]),
            "",
            "",
            True,
        ),
        (
            "Server RSS just before that request, MB",
            get(so, lambda s: s["big"]["rss_before_mb"]),
            get(oc, lambda s: s["big"]["rss_before_mb"]),
            "",
            "",
            False,
        ),
        (
            "Peak server RSS during that request, MB",
            get(so, lambda s: s["big"]["peak_rss_mb"]),
            get(oc, lambda s: s["big"]["peak_rss_mb"]),
            "",
            "ScanOnce ≤ 300 MB",
            False,
        ),
        (
            "… of which anonymous (heap) / file-backed (mmap, libraries), MB",
            None,
            None,
            f"{_split(so)} / {_split(oc)}",
            "",
            False,
        ),
        (
            "Disk used after the run, MB",
            get(so, lambda s: s["disk_mb"]),
            get(oc, lambda s: s["disk_mb"]),
            "",
            "",
            False,
        ),
    ]

    out = []
    out.append("| metric | ScanOnce | Orthanc | ScanOnce / Orthanc | target | met |")
    out.append("| --- | ---: | ---: | ---: | --- | --- |")
    for metric, a, b, note, target, _higher in rows:
        if isinstance(a, str) or isinstance(b, str):
            out.append(f"| {metric} | {a or 'n/a'} | {b or 'n/a'} |  | {target} |  |")
            continue
        if a is None and b is None and note:
            so_text, _, oc_text = note.partition(" / ")
            out.append(f"| {metric} | {so_text} | {oc_text} |  | {target} |  |")
            continue
        ratio = a / b if a is not None and b not in (None, 0) and a == a and b == b else None
        met = ""
        if ratio is not None and target.startswith(("≥", "≤")) and "×" in target:
            bound = float(target[1:].strip().rstrip("×"))
            met = "yes" if (ratio >= bound if target.startswith("≥") else ratio <= bound) else "**no**"
        elif target.startswith("ScanOnce ≤") and a is not None:
            met = "yes" if a <= 300 else "**no**"
        out.append(f"| {metric} | {_fmt(a)} | {_fmt(b)} | {_fmt(ratio, '×', 2)} | {target} | {met} |")

    out.append("")
    out.append(
        "QIDO-RS per query kind (study level, one client, p50 / p95 ms, total matches over the repeats):"
    )
    out.append("")
    out.append("| query | ScanOnce p50 | ScanOnce p95 | Orthanc p50 | Orthanc p95 | matches SO / Orthanc |")
    out.append("| --- | ---: | ---: | ---: | ---: | --- |")
    for kind in (oc or so or {}).get("qido", {}):

        def q(side: dict[str, Any] | None, p: float, k: str = kind) -> str:
            if not side or k not in side["qido"]:
                return "n/a"
            if k in side["qido_errors"]:
                return side["qido_errors"][k]
            return _fmt(pct(side["qido"][k], p) * 1000)

        counts = _counts(so, oc, kind)
        out.append(f"| {kind} | {q(so, 50)} | {q(so, 95)} | {q(oc, 50)} | {q(oc, 95)} | {counts} |")

    out.append("")
    out.append(
        f"Run: {data['threads']} client threads for STOW-RS (batches of {plan['small_batch']} small / "
        f"{plan['ct_batch']} CT instances per request), one client for queries and retrieves; "
        f"{plan['series_per_study'] * plan['instances_per_series']} instances per small study "
        f"({plan['series_per_study']} series); "
        f"seed {data['seed']}; total {data['total_s']:.0f} s; {platform.node()} "
        f"({os.cpu_count()} CPUs, Python {platform.python_version()}), loopback only; "
        f"1-min load average at start / end: {_load(data)}."
    )
    for side in (so, oc):
        if side:
            out.append("")
            out.append(
                f"{side['name']} settings: " + "; ".join(f"{k}: {v}" for k, v in side["settings"].items())
            )
            if side["failures"]:
                out.append(f"{side['name']} failures: " + "; ".join(side["failures"]))
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    ap.add_argument("--out", type=Path, help="write the Markdown table here (and the raw numbers as .json)")
    ap.add_argument("--threads", type=int, default=4, help="client threads for STOW-RS (default 4)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=["orthanc", "scanonce"], help="run one side (to develop the harness)")
    ap.add_argument("--index-instances", type=int, help="override the index size")
    ap.add_argument("--work-dir", type=Path, help="where both servers keep their data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--render", type=Path, help="only print the table of a saved .json run")
    ap.add_argument(
        "--pg",
        metavar="URL",
        help="run ScanOnce on PostgreSQL + S3 instead of the embedded default: a fresh database on this"
        " server (e.g. postgresql+psycopg://postgres@127.0.0.1:5432) and a moto S3 server started here",
    )
    args = ap.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0

    plan = QUICK if args.quick else FULL
    if args.index_instances:
        from dataclasses import replace

        plan = replace(plan, index_instances=args.index_instances)
    sides = [args.only] if args.only else ["orthanc", "scanonce"]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="scanonce-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = run(plan, threads=args.threads, work=work, seed=args.seed, sides=sides, pg=args.pg)
        table = render(data)
        print(table, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table)
            args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    finally:
        if not args.keep and not args.work_dir:
            log(f"removing {work}")
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
