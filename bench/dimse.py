"""DIMSE benchmark: ScanOnce's SCP vs Orthanc's, side by side, in one run.

Both servers run as real processes on loopback, each with its own fresh data folder (the same
launchers as bench/archive.py: `scanonce serve` on the embedded default, and Orthanc from the
Debian packages with TcpNoDelay on and StorageCompression off), and receive exactly the same
generated instances (`bench.synthdata.bulk_instances`). Each phase runs against Orthanc
and then against ScanOnce before the next phase starts.

    .venv/bin/python -m bench.dimse --quick                        # ~2-3 minutes
    .venv/bin/python -m bench.dimse --out bench/results/dimse.md   # full: 100k-instance index

Phases (full sizes; --quick shrinks them):
  1. C-STORE ingest: one folder of 4,000 small CT instances (16x16) sent by dcmtk's `storescu`
     (the real dcmtk binary, not pynetdicom's look-alike script in the venv), 4 storescu
     processes in parallel, each one association over a quarter of the files, as a PACS
     forwarding a worklist would; environment TCP_NODELAY=1 (dcmtk then disables Nagle);
  2. index build to 100,000 instances (10,000 studies) by STOW-RS, 4 client threads, batches
     of 100 (the fast bulk path; the C-STORE instances count towards the index);
  3. C-FIND at STUDY level (Study Root), pynetdicom SCU, one association per server reused for
     every query: a fixed mix of PatientID, AccessionNumber, StudyInstanceUID, PatientName
     wildcard ("Family^G*") and StudyDate range (30 days) queries, p50/p95 of the time from
     sending the request to the final status (all matches received).

Receiver processes (settings.dimse_receivers):

    .venv/bin/python -m bench.dimse --quick --store-only --store-runs 3 --receivers 0,1,2
    .venv/bin/python -m bench.dimse --receivers 0,1,2 --pg postgresql+psycopg://postgres@127.0.0.1:5432

runs phase 1 only, against Orthanc, the floor and one ScanOnce per value of N (each with
`SCANONCE_DIMSE_RECEIVERS=N` on the embedded default, or with --pg on a fresh PostgreSQL
database, and a local object folder), all up for the whole run, `--store-runs` rounds with the
order reversed every other round, with the server CPU counted over each whole process tree
(receivers included).

    .venv/bin/python -m bench.dimse --quick --store-only --store-runs 5 \
        --variant main:PYTHONPATH=/path/to/main-worktree --variant branch \
        --variant syncfs:SCANONCE_STORAGE_SYNC=syncfs

does the same with one ScanOnce (no receivers) per `--variant LABEL[:NAME=VALUE,...]`, each with
its own environment: A/B of a setting, or of main's code against a branch's, in the same rounds
against the same floor. Both modes print, beside the ratio of medians, the median of each
round's own ScanOnce / floor ratio (same folder, same minute): steadier on a shared machine.

    .venv/bin/python -m bench.dimse --quick --store-runs 5 --per-association 60 --parallel 2

sends each instance in an association of its own (a `storescu` per file, as a modality that
opens an association per image does), 60 per round: association set-up and release per
instance, side by side. It combines with --receivers and --variant.

Index sync speed is measured by bench/federation_sync.py (results in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.archive import (  # noqa: E402
    EXITED,
    OTHER,
    SERVING,
    SPLIT_ORDER,
    CpuMeter,
    Server,
    StudyFacts,
    bearer,
    build_query_mix,
    instances,
    log,
    median,
    pct,
    run_scanonce,
    stop_process,
    stow_batches,
    study_facts,
)
from tests.peers import LOOPBACK, PeerError, _dcmtk_exe, free_port, orthanc  # noqa: E402

CLIENT_AET = "BENCHPACS"

FIND_KINDS = (
    "PatientID",
    "AccessionNumber",
    "StudyInstanceUID",
    "PatientName wildcard",
    "StudyDate range (30 d)",
)
# QIDO-RS parameter -> DICOM keyword for the C-FIND identifier.
_KEYWORDS = {
    "PatientID": "PatientID",
    "AccessionNumber": "AccessionNumber",
    "StudyInstanceUID": "StudyInstanceUID",
    "PatientName": "PatientName",
    "StudyDate": "StudyDate",
}
# Return keys a viewer's study list asks for.
_RETURN_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyInstanceUID",
    "StudyDescription",
    "ModalitiesInStudy",
)


@dataclass(frozen=True)
class Plan:
    store_instances: int  # the C-STORE folder
    index_instances: int  # total in the index before C-FIND (C-STORE ones included)
    tranche_instances: int
    series_per_study: int
    instances_per_series: int
    stow_batch: int
    find_repeats: int  # per query kind

    @property
    def instances_per_study(self) -> int:
        return self.series_per_study * self.instances_per_series


FULL = Plan(
    store_instances=4000,
    index_instances=100_000,
    tranche_instances=12_000,
    series_per_study=2,
    instances_per_series=5,
    stow_batch=100,
    find_repeats=40,
)
QUICK = Plan(
    store_instances=1000,
    index_instances=5000,
    tranche_instances=4000,
    series_per_study=2,
    instances_per_series=5,
    stow_batch=100,
    find_repeats=10,
)


@dataclass
class Side:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    store: dict[str, Any] = field(default_factory=dict)
    store_runs: list[dict[str, Any]] = field(default_factory=list)
    load: list[dict[str, float]] = field(default_factory=list)
    load_s: float = 0.0
    find: dict[str, list[float]] = field(default_factory=dict)
    find_counts: dict[str, int] = field(default_factory=dict)
    find_errors: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


@dataclass
class Dimse:
    server: Server
    aet: str
    port: int


@contextlib.contextmanager
def run_orthanc_dimse(work: Path, *, nodelay: bool = True) -> Iterator[Dimse]:
    """Orthanc as bench/archive.py runs it (tests.peers.orthanc: TcpNoDelay on, StorageCompression
    off), with the benchmark's client registered as a modality: Orthanc 1.10 answers C-FIND only
    from known modalities unless DicomAlwaysAllowFind is set, and a PACS is a known modality."""
    import httpx

    # Orthanc's DIMSE is dcmtk's, which (as built by Debian) leaves Nagle's algorithm on unless
    # TCP_NODELAY=1 is in its environment: every C-FIND then waits ~40 ms for a delayed ACK.
    # ScanOnce's SCP sets TCP_NODELAY on its sockets, so Orthanc gets the same.
    saved = os.environ.get("TCP_NODELAY")
    os.environ["TCP_NODELAY"] = "1" if nodelay else "0"
    try:
        stack = contextlib.ExitStack()
        peer = stack.enter_context(
            orthanc(work / "orthanc", aet="BENCH", modalities={"pacs": [CLIENT_AET, LOOPBACK, 104]})
        )
    finally:
        if saved is None:
            del os.environ["TCP_NODELAY"]
        else:
            os.environ["TCP_NODELAY"] = saved
    with stack:
        system = httpx.get(f"{peer.url}/system", timeout=10, trust_env=False).json()
        cfg = peer.config
        settings = {
            "version": f"Orthanc {system.get('Version')}",
            "index": "SQLite (built-in), storage: local folder",
            "StorageCompression": cfg["StorageCompression"],
            "TcpNoDelay (HTTP)": cfg["TcpNoDelay"],
            "environment TCP_NODELAY (dcmtk, DIMSE)": "1" if nodelay else "0 (Nagle on)",
            "DicomAet": peer.aet,
            "DicomModalities": f"{CLIENT_AET} registered",
            "DicomAlwaysAllowStore": cfg["DicomAlwaysAllowStore"],
            "DicomCheckCalledAet": cfg["DicomCheckCalledAet"],
            "DicomThreadsCount": "4 (default)",
            "StorageAccessOnFind": "Always (default)",
            "LimitFindResults": "0 (default, unlimited)",
            "OverwriteInstances": "false (default)",
        }
        server = Server("Orthanc", peer.dicomweb_url, peer.pid, peer.storage_dir.parent, settings)
        yield Dimse(server, peer.aet, peer.dicom_port)


# -- the pynetdicom floor -------------------------------------------------------------------

FLOOR = "pynetdicom floor"
FLOOR_AET = "FLOOR"


def serve_floor(port: int) -> None:
    """A pynetdicom SCP that does nothing: every C-STORE is answered Success without its data
    set being decoded, written or stored. What pynetdicom itself costs per instance (PDU
    decoding, command sets, the response, event dispatch, its threads) on this machine: the
    rate no pynetdicom-based SCP can beat, measured beside Orthanc and ScanOnce in one run.

    Set up as ScanOnce's SCP is (broker.dimse.scp.start_scp): the same event-driven reactors
    (broker.dicom.reactor, no 1 ms polling naps), TCP_NODELAY on each socket, a 256 KiB maximum
    PDU, every storage SOP class in every transfer syntax. Unlike ScanOnce the data set is kept
    in memory as received (pynetdicom's default), not spooled to a file."""
    import signal

    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from broker.dicom import reactor

    reactor.install()
    ae = AE(ae_title=FLOOR_AET)
    ae.maximum_pdu_size = 256 * 1024
    ae.maximum_associations = 64
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 120
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cast(str, cx.abstract_syntax), AllTransferSyntaxes)

    def no_delay(event: Any) -> None:
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    handlers: list[Any] = [(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_CONN_OPEN, no_delay)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = ae.start_server((LOOPBACK, port), block=False, evt_handlers=handlers)
    assert server is not None
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.shutdown()


@contextlib.contextmanager
def run_floor(work: Path) -> Iterator[Dimse]:
    """The floor SCP (`serve_floor`) as its own process, like the two servers."""
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "floor.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.dimse", "--serve-floor", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while _listeners(port) < 1:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise PeerError(f"the floor SCP did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        settings = {
            "what": "pynetdicom AE whose C-STORE handler returns 0x0000 without touching the data set",
            "pynetdicom": _version("pynetdicom"),
            "reactors": "broker.dicom.reactor (as ScanOnce)",
            "TCP_NODELAY": "on",
            "maximum PDU": "256 KiB (as ScanOnce)",
            "data set": "kept in memory as received (pynetdicom default), never decoded",
        }
        yield Dimse(Server(FLOOR, "", proc.pid, work, settings), FLOOR_AET, port)
    finally:
        stop_process(proc)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


# -- C-STORE by storescu ---------------------------------------------------------------------


def store_round(plan: Plan, seed: int, rnd: int) -> list[bytes]:
    """Round `rnd`'s C-STORE folder: new studies each round, so no round stores a duplicate."""
    return list(
        instances(
            seed=seed * 1000 + 500 + rnd,
            n_studies=plan.store_instances // plan.instances_per_study,
            series_per_study=plan.series_per_study,
            instances_per_series=plan.instances_per_series,
        )
    )


def write_folder(folder: Path, data: Sequence[bytes], parts: int) -> list[Path]:
    """The instances as Part 10 files, split into `parts` subfolders (one per storescu)."""
    dirs = [folder / f"part{i}" for i in range(parts)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    for i, blob in enumerate(data):
        (dirs[i % parts] / f"{i:07d}.dcm").write_bytes(blob)
    return dirs


def storescu_parallel(target: Dimse, dirs: Sequence[Path], n: int) -> dict[str, Any]:
    exe = _dcmtk_exe("storescu")
    if exe is None:
        raise PeerError("dcmtk's storescu is not installed (apt-get install dcmtk)")
    env = {**os.environ, "TCP_NODELAY": "1"}
    cmds = [
        # +sd: scan the folder; -nh: no header checks we do not need; --aetitle: a PACS's AE.
        [exe, "-aet", CLIENT_AET, "-aec", target.aet, "+sd", "-nh", LOOPBACK, str(target.port), str(d)]
        for d in dirs
    ]
    # Every target starts with nothing dirty in the page cache, outside its timing: the only
    # target that fsyncs (ScanOnce; Orthanc and the floor do not) would otherwise start its
    # journal commits with the folder just generated, and what the targets before it stored
    # unsynced, still to be written back.
    os.sync()
    with CpuMeter(target.server.pid) as cpu:
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            for c in cmds
        ]
        outputs = [p.communicate(timeout=1800)[0].decode(errors="replace") for p in procs]
        dt = time.perf_counter() - t0
    failed = sum(1 for p in procs if p.returncode != 0)
    if failed:
        bad = next(o for p, o in zip(procs, outputs, strict=True) if p.returncode != 0)
        log(f"storescu -> {target.server.name}: {failed} processes failed:\n{bad[-2000:]}")
    return _store_result(n, dt, cpu, failed)


def _store_result(n: int, seconds: float, cpu: CpuMeter, failed: int) -> dict[str, Any]:
    return {
        "instances": n,
        "seconds": seconds,
        "per_s": n / seconds,
        "server_cpu_s": cpu.seconds,
        # by process (bench.archive.CpuMeter): the serving process, DIMSE receivers, ...
        "server_cpu_split": cpu.split,
        "failed_processes": failed,
    }


def storescu_each(target: Dimse, dirs: Sequence[Path], n: int) -> dict[str, Any]:
    """As `storescu_parallel`, with one association per instance: a `storescu` process per file
    (as a modality that opens an association per image, or a forwarder per instance), the
    folders' files sent one after another, the folders side by side. What this measures besides
    the C-STORE is each association's set-up and release (~120 presentation contexts proposed
    by storescu); the clients' process starts cost the same for every target."""
    exe = _dcmtk_exe("storescu")
    if exe is None:
        raise PeerError("dcmtk's storescu is not installed (apt-get install dcmtk)")
    env = {**os.environ, "TCP_NODELAY": "1"}
    failures: list[str] = []

    def send(folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            done = subprocess.run(
                [exe, "-aet", CLIENT_AET, "-aec", target.aet, "-nh", LOOPBACK, str(target.port), str(path)],
                env=env,
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=120,
            )
            if done.returncode != 0:
                failures.append((done.stdout + done.stderr).decode(errors="replace"))

    os.sync()  # as in storescu_parallel
    with CpuMeter(target.server.pid) as cpu:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=send, args=(d,)) for d in dirs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
    if failures:
        log(f"storescu -> {target.server.name}: {len(failures)} associations failed:\n{failures[0][-2000:]}")
    return _store_result(n, dt, cpu, len(failures))


def _listeners(port: int) -> int:
    """Sockets listening on TCP `port` (all processes): N receivers + the serving process once
    they are all up."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def _pg_database(server: str, name: str) -> str:
    """A fresh database dimse_bench_<name> on the PostgreSQL server at `server`."""
    import psycopg

    plain = server.replace("postgresql+psycopg://", "postgresql://").rstrip("/")
    with psycopg.connect(plain + "/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS dimse_bench_{name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE dimse_bench_{name}")
    return f"{server.rstrip('/')}/dimse_bench_{name}"


def run_receivers(
    plan: Plan,
    *,
    receivers: Sequence[int],
    pg: str | None,
    parallel: int,
    work: Path,
    seed: int,
    store_runs: int = 1,
    variants: Sequence[tuple[str, dict[str, str]]] = (),
    per_association: int = 0,
) -> dict[str, Any]:
    """Phase 1 (C-STORE) only: Orthanc, the floor, then ScanOnce with each N receivers, on
    PostgreSQL (`pg`) or the embedded default (SQLite + local folder). All targets stay up for
    the whole run; each of `store_runs` rounds sends a fresh folder to every target in turn, the
    order reversed every other round (A/B alternated on a shared machine); medians per target."""
    t_start = time.perf_counter()
    load = [os.getloadavg()[0]]
    runs: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        targets: dict[str, Dimse] = {
            "Orthanc": stack.enter_context(run_orthanc_dimse(work / "orthanc")),
            FLOOR: stack.enter_context(run_floor(work / "floor")),
        }
        listening: dict[str, tuple[int, int]] = {}
        # Each N receivers, then each variant (a label and its own environment, no receivers):
        # A/B within one run's rounds, e.g. a setting, or main's code first on PYTHONPATH.
        setups: list[tuple[str, str, int, dict[str, str]]] = [(f"N={n}", f"n{n}", n, {}) for n in receivers]
        setups += [(label, f"v{i}", 0, extra) for i, (label, extra) in enumerate(variants)]
        for label, tag, n, extra in setups:
            dimse_port = free_port()
            env = {"SCANONCE_DIMSE_PORT": str(dimse_port), "SCANONCE_DIMSE_RECEIVERS": str(n), **extra}
            if pg:
                env |= {
                    "SCANONCE_DATABASE_URL": _pg_database(pg, tag),
                    "SCANONCE_MIGRATE_ON_START": "true",
                }
            so = stack.enter_context(run_scanonce(work / f"scanonce-{tag}", env_extra=env))
            deadline = time.monotonic() + 120
            while _listeners(dimse_port) < n + 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            targets[f"ScanOnce {label}"] = Dimse(so, "SCANONCE", dimse_port)
            listening[f"ScanOnce {label}"] = (dimse_port, n)
        for rnd in range(store_runs):
            store = store_round(plan, seed, rnd)
            if per_association:
                store = store[:per_association]
            shutil.rmtree(work / "store", ignore_errors=True)
            dirs = write_folder(work / "store", store, parallel)
            order = list(targets.items())
            for name, target in order if rnd % 2 == 0 else reversed(order):
                send = storescu_each if per_association else storescu_parallel
                sr: dict[str, Any] = dict(send(target, dirs, len(store)))
                sr["loadavg_1m"] = os.getloadavg()[0]
                if name in listening:
                    sr["listeners"] = _listeners(listening[name][0])
                runs.setdefault(name, []).append(sr)
                cpu = 1e3 * sr["server_cpu_s"] / sr["instances"]
                took = f"{sr['seconds']:.1f} s, {cpu:.2f} ms CPU/inst"
                log(f"C-STORE {name} round {rnd + 1}: {sr['per_s']:.0f} inst/s ({took})")
        sides: dict[str, dict[str, Any]] = {}
        for name, rs in runs.items():
            side: dict[str, Any] = dict(summarize_store(rs))
            side["server_cpu_s"] = side["cpu_ms"] * side["instances"] / 1e3
            side["loadavg_1m"] = median([r["loadavg_1m"] for r in rs])
            side["runs"] = rs
            if "listeners" in rs[-1]:
                side["listeners"] = rs[-1]["listeners"]
            if name != FLOOR:
                side["held"] = instances_held(targets[name].server)
            sides[name] = side
    load.append(os.getloadavg()[0])
    return {
        "mode": "receivers",
        "backend": "PostgreSQL + local folder" if pg else "SQLite + local folder (embedded default)",
        "plan": asdict(plan),
        "parallel": parallel,
        "seed": seed,
        "store_runs": store_runs,
        "per_association": per_association,
        "total_s": time.perf_counter() - t_start,
        "loadavg_1m": load,
        "sides": sides,
    }


def render_receivers(data: dict[str, Any]) -> str:
    oc = data["sides"]["Orthanc"]
    each = data.get("per_association", 0)
    how = (
        f"C-STORE with one association per instance (a dcmtk storescu per file, {data['parallel']} at a "
        f"time), {each:,} small CT instances"
        if each
        else f"C-STORE by {data['parallel']} parallel dcmtk storescu, "
        f"{data['plan']['store_instances']:,} small CT instances"
    )
    out = [
        f"{how}, median of {data.get('store_runs', 1)} round(s); "
        f"ScanOnce on {data.get('backend', 'PostgreSQL + local folder')}, N receiver processes "
        "beside the serving process:",
        "",
        "| target | inst/s | / Orthanc | / floor | server CPU ms per instance (process tree) | "
        "… of which, ms | held | listeners | 1-min load (median) |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    floor = data["sides"].get(FLOOR)
    for name, side in data["sides"].items():
        cpu = 1e3 * side["server_cpu_s"] / side["instances"]
        ratio = side["per_s"] / oc["per_s"]
        vs_floor = f"{_fmt(side['per_s'] / floor['per_s'], 2)}×" if floor else "n/a"
        held = f"{side['held']:,}" if "held" in side else "(not stored)"
        cpu = side.get("cpu_ms", cpu)
        out.append(
            f"| {name} | {_fmt(side['per_s'], 0)} | {_fmt(ratio, 2)}× | {vs_floor} | {_fmt(cpu, 2)} | "
            f"{split_text(side.get('cpu_split_ms'))} | {held} | {side.get('listeners', '')} | "
            f"{side['loadavg_1m']:.1f} |"
        )
    if floor:
        per_round = [
            f"{name} {_fmt(round_ratio(side['runs'], floor['runs']), 2)}×"
            for name, side in data["sides"].items()
            if name.startswith("ScanOnce") and len(side.get("runs", [])) == len(floor.get("runs", []))
        ]
        if per_round:
            out += ["", "/ floor, median of the rounds' own ratios: " + ", ".join(per_round) + "."]
    load = " / ".join(f"{x:.1f}" for x in data["loadavg_1m"])
    out += [
        "",
        f"Seed {data['seed']}; total {data['total_s']:.0f} s; {platform.node()} ({os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}), loopback only; 1-min load average at start / end: {load}.",
    ]
    return "\n".join(out) + "\n"


def instances_held(server: Server) -> int:
    """Instances the server reports over its studies (QIDO-RS NumberOfStudyRelatedInstances):
    checks that every C-STORE really landed. Only right while the index holds < 1,000 studies."""
    import httpx

    r = httpx.get(
        f"{server.base}/studies?includefield=00201208&limit=1000",
        headers={"Accept": "application/dicom+json"},
        timeout=120,
        trust_env=False,
        auth=bearer,
    )
    r.raise_for_status()
    return sum(int(s.get("00201208", {}).get("Value", [0])[0]) for s in (r.json() if r.content else []))


# -- C-FIND ------------------------------------------------------------------------------------


def find_identifier(params: dict[str, str]) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for kw in _RETURN_KEYS:
        setattr(ds, kw, "")
    for k, v in params.items():
        setattr(ds, _KEYWORDS[k], v)
    return ds


def _no_delay(event: Any) -> None:
    """TCP_NODELAY on the SCU's socket, as storescu gets from TCP_NODELAY=1: without it each
    request waits for the peer's delayed ACK (~40 ms on loopback), on both servers alike."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextlib.contextmanager
def association(target: Dimse) -> Iterator[Any]:
    from pynetdicom import AE, _config, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    # pynetdicom's SCU pretty-prints every response identifier for its debug log, logged or
    # not: ~0.15 ms of client CPU per match, which would be timed as the server's.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    ae = AE(ae_title=CLIENT_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate(
        LOOPBACK, target.port, ae_title=target.aet, evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)]
    )
    if not assoc.is_established:
        raise PeerError(f"{target.server.name}: association for C-FIND refused or aborted")
    try:
        yield assoc
    finally:
        assoc.release()


def timed_find(assoc: Any, params: dict[str, str]) -> tuple[float, int, str]:
    """Seconds from request to final status, matches, and the final status as text."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    ident = find_identifier(params)
    matches = 0
    final = "none"
    t0 = time.perf_counter()
    for status, _identifier in assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind):
        code = getattr(status, "Status", None)
        if code in (0xFF00, 0xFF01):
            matches += 1
        else:
            final = "0x0000" if code == 0 else (f"0x{code:04X}" if code is not None else "no status")
    return time.perf_counter() - t0, matches, final


# -- the run ------------------------------------------------------------------------------------


def run(
    plan: Plan,
    *,
    threads: int,
    parallel: int,
    work: Path,
    seed: int,
    orthanc_nodelay: bool = True,
    store_runs: int = 1,
    store_only: bool = False,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    sides: dict[str, Side] = {}
    with contextlib.ExitStack() as stack:
        targets: list[Dimse] = []
        oc_target = stack.enter_context(run_orthanc_dimse(work, nodelay=orthanc_nodelay))
        targets.append(oc_target)
        dimse_port = free_port()
        so = stack.enter_context(run_scanonce(work, env_extra={"SCANONCE_DIMSE_PORT": str(dimse_port)}))
        so.settings.update(
            {
                "AE title": "SCANONCE (default)",
                "dimse_open_mode": "on (default: accepts unknown calling AEs)",
                "DIMSE port": "SCANONCE_DIMSE_PORT (free loopback port)",
            }
        )
        targets.append(Dimse(so, "SCANONCE", dimse_port))
        floor_target = stack.enter_context(run_floor(work / "floor"))
        for t in (*targets, floor_target):
            sides[t.server.name] = Side(t.server.name, settings=t.server.settings)
            log(f"{t.server.name} up: DICOM {t.aet}@{LOOPBACK}:{t.port} (pid {t.server.pid})")

        facts: list[StudyFacts] = []
        per_study = plan.instances_per_study
        stored = 0

        # 1. C-STORE by storescu, the same folder into each server and the floor, `store_runs`
        # times (a fresh folder each round, so nothing is a duplicate), alternating targets.
        store_targets = [oc_target, floor_target, targets[1]]
        for rnd in range(store_runs):
            store = store_round(plan, seed, rnd)
            facts += [study_facts(store[i]) for i in range(0, len(store), per_study)]
            stored += len(store)
            dirs = write_folder(work / "store", store, parallel)
            # The order reversed every other round, as in run_receivers: with a fixed order
            # ScanOnce always ran right after the floor and never first, one more way the two
            # modes differed.
            for t in store_targets if rnd % 2 == 0 else reversed(store_targets):
                sr = storescu_parallel(t, dirs, len(store))
                sr["loadavg_1m"] = os.getloadavg()[0]
                side = sides[t.server.name]
                side.store_runs.append(sr)
                if sr["failed_processes"]:
                    side.failures.append(f"C-STORE: {sr['failed_processes']} storescu failed")
                cpu = 1e3 * sr["server_cpu_s"] / sr["instances"]
                log(
                    f"C-STORE {t.server.name}: {sr['per_s']:.0f} inst/s "
                    f"({sr['seconds']:.1f} s, {cpu:.2f} ms CPU/inst)"
                )
            shutil.rmtree(work / "store", ignore_errors=True)
            del store
        for t in store_targets:
            side = sides[t.server.name]
            side.store = summarize_store(side.store_runs)
            if t is floor_target:
                continue
            held = instances_held(t.server)
            side.store["held"] = held
            if held != stored:
                side.failures.append(f"C-STORE: holds {held} of {stored} instances")
        if store_only:
            return _result(plan, threads, parallel, seed, stored, facts, t_start, load_start, sides)

        # 2. index build by STOW-RS
        remaining = plan.index_instances - stored
        t_idx = 0
        while remaining > 0:
            n = min(plan.tranche_instances, remaining)
            insts = list(
                instances(
                    seed=seed * 1000 + t_idx,
                    n_studies=max(1, n // per_study),
                    series_per_study=plan.series_per_study,
                    instances_per_series=plan.instances_per_series,
                )
            )
            facts += [study_facts(insts[i]) for i in range(0, len(insts), per_study)]
            batches = [insts[i : i + plan.stow_batch] for i in range(0, len(insts), plan.stow_batch)]
            for t in targets:
                r = stow_batches(t.server, batches, threads)
                side = sides[t.server.name]
                side.load.append({"instances": r.instances, "seconds": r.seconds, "per_s": r.per_s})
                side.load_s += r.seconds
                if r.failed:
                    side.failures.append(f"index build: {r.failed} instances failed")
                log(f"load {t_idx + 1} {t.server.name}: {r.instances} in {r.seconds:.0f} s ({r.per_s:.0f}/s)")
            remaining -= len(insts)
            t_idx += 1
            del insts, batches
        total_instances = plan.index_instances - remaining

        # 3. C-FIND
        mix = [(k, p) for k, p in build_query_mix(facts, plan.find_repeats, seed) if k in FIND_KINDS]
        for t in targets:
            side = sides[t.server.name]
            with association(t) as assoc:
                for _ in range(3):  # warm the association and caches equally
                    timed_find(assoc, {"PatientID": facts[0].patient_id})
                for kind, params in mix:
                    dt, matches, final = timed_find(assoc, params)
                    side.find.setdefault(kind, []).append(dt)
                    side.find_counts[kind] = side.find_counts.get(kind, 0) + matches
                    if final != "0x0000":
                        side.find_errors[kind] = final
            allv = [v for vs in side.find.values() for v in vs]
            log(f"C-FIND {t.server.name}: p50 {median(allv) * 1e3:.1f} ms, p95 {pct(allv, 95) * 1e3:.1f} ms")
    return _result(plan, threads, parallel, seed, total_instances, facts, t_start, load_start, sides)


def _result(
    plan: Plan,
    threads: int,
    parallel: int,
    seed: int,
    total_instances: int,
    facts: list[StudyFacts],
    t_start: float,
    load_start: float,
    sides: dict[str, Side],
) -> dict[str, Any]:
    return {
        "plan": asdict(plan),
        "threads": threads,
        "parallel": parallel,
        "seed": seed,
        "index_instances": total_instances,
        "index_studies": len(facts),
        "total_s": time.perf_counter() - t_start,
        "loadavg_1m": [load_start, os.getloadavg()[0]],
        "sides": {k: asdict(v) for k, v in sides.items()},
    }


def round_ratio(runs: list[dict[str, float]], base: list[dict[str, float]]) -> float:
    """Median over the rounds of this target's rate over `base`'s in the same round (the same
    folder, minutes apart at most): steadier on a shared machine than a ratio of two medians
    taken from different rounds."""
    return median([r["per_s"] / b["per_s"] for r, b in zip(runs, base, strict=True)])


def summarize_store(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds: rate, server CPU per instance (ms) and its split by process,
    seconds."""
    summary: dict[str, Any] = {
        "instances": runs[0]["instances"],
        "rounds": len(runs),
        "per_s": median([r["per_s"] for r in runs]),
        "cpu_ms": median([1e3 * r["server_cpu_s"] / r["instances"] for r in runs]),
        "seconds": median([r["seconds"] for r in runs]),
        "failed_processes": sum(r["failed_processes"] for r in runs),
    }
    split = median_split(runs)
    if split is not None:
        summary["cpu_split_ms"] = split
    return summary


def median_split(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    """The server CPU split, ms per instance, of the median round (of the two middle rounds'
    mean for an even count): its parts add up to the median `cpu_ms`, where medians taken part
    by part would not. None for rounds saved without a split."""
    if not runs or any("server_cpu_split" not in r for r in runs):
        return None
    ordered = sorted(runs, key=lambda r: r["server_cpu_s"] / r["instances"])
    middle = ordered[(len(ordered) - 1) // 2 : len(ordered) // 2 + 1]
    split: dict[str, float] = {}
    for r in middle:
        for kind, seconds in r["server_cpu_split"].items():
            split[kind] = split.get(kind, 0.0) + 1e3 * seconds / r["instances"] / len(middle)
    return split


def split_text(parts: dict[str, float] | None, digits: int = 2) -> str:
    """A server CPU split as a table cell: "1.95 serving process + 0.71 DIMSE receivers", a
    child kind shown even at 0 (it was running), other and exited children only when not 0;
    "(one process)" for a server without children (Orthanc, the floor); "n/a" if not measured."""
    if parts is None:
        return "n/a"
    if not any(v for k, v in parts.items() if k != SERVING) and set(parts) <= {SERVING, EXITED}:
        return "(one process)"
    return " + ".join(
        f"{parts[k]:,.{digits}f} {k}"
        for k in SPLIT_ORDER
        if k in parts and (k not in (OTHER, EXITED) or parts[k])
    )


# -- report ---------------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 1) -> str:
    if v is None or v != v:
        return "n/a"
    return f"{v:,.{digits}f}"


def render_store(data: dict[str, Any]) -> list[str]:
    """The C-STORE table: Orthanc, the pynetdicom floor and ScanOnce, medians over the rounds."""
    plan = data["plan"]
    sides = data["sides"]
    oc, so = sides["Orthanc"], sides["ScanOnce"]
    floor = sides.get(FLOOR)
    rounds = int(so["store"].get("rounds", 1))
    out = [
        f"C-STORE by {data['parallel']} parallel dcmtk storescu (one association each), "
        f"{plan['store_instances']:,} small CT instances per round, {rounds} round(s), a fresh folder "
        "each round, sent to each target in turn; medians over the rounds; server CPU over the whole "
        "process tree:",
        "",
        "| target | inst/s | server CPU ms per instance | … of which, ms | / Orthanc | / floor | held "
        "| 1-min load per round |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for side in (oc, floor, so):
        if side is None:
            continue
        st = side["store"]
        cpu = st["cpu_ms"] if "cpu_ms" in st else 1e3 * st["server_cpu_s"] / st["instances"]
        vs_floor = _fmt(st["per_s"] / floor["store"]["per_s"], 2) + "×" if floor else "n/a"
        loads = ", ".join(f"{r['loadavg_1m']:.1f}" for r in side.get("store_runs", []) if "loadavg_1m" in r)
        held = f"{st['held']:,}" if "held" in st else "(not stored)"
        split = split_text(st.get("cpu_split_ms"))
        out.append(
            f"| {side['name']} | {_fmt(st['per_s'], 0)} | {_fmt(cpu, 2)} | {split} | "
            f"{_fmt(st['per_s'] / oc['store']['per_s'], 2)}× | {vs_floor} | {held} | {loads} |"
        )
    ratio_oc = so["store"]["per_s"] / oc["store"]["per_s"]
    out += [
        "",
        f"Targets: ScanOnce ≥ 1× Orthanc: {_fmt(ratio_oc, 2)}×, {'met' if ratio_oc >= 1 else '**not met**'}",
    ]
    if floor:
        ratio_fl = so["store"]["per_s"] / floor["store"]["per_s"]
        floor_oc = floor["store"]["per_s"] / oc["store"]["per_s"]
        if floor_oc < 1:
            met = "met" if ratio_fl >= 0.8 else "**not met**"
            out[-1] += (
                f"; the floor is below Orthanc ({_fmt(floor_oc, 2)}×), so the target is ScanOnce ≥ 0.8× "
                f"the floor: {_fmt(ratio_fl, 2)}×, {met}."
            )
        else:
            out[-1] += (
                f"; the floor is at or above Orthanc ({_fmt(floor_oc, 2)}×) in this run, so 1× Orthanc "
                f"stands (ScanOnce / floor: {_fmt(ratio_fl, 2)}×, target 0.8× where the floor is below)."
            )
    if floor and so.get("store_runs") and len(so["store_runs"]) == len(floor.get("store_runs", [])):
        out.append(
            "ScanOnce / floor, median of the rounds' own ratios: "
            f"{_fmt(round_ratio(so['store_runs'], floor['store_runs']), 2)}×."
        )
    return out


def render(data: dict[str, Any]) -> str:
    plan = data["plan"]
    so = data["sides"]["ScanOnce"]
    oc = data["sides"]["Orthanc"]
    floor = data["sides"].get(FLOOR)

    def all_find(side: dict[str, Any]) -> list[float]:
        return [v for vs in side["find"].values() for v in vs]

    def load_rate(side: dict[str, Any]) -> float:
        n = sum(x["instances"] for x in side["load"])
        return n / side["load_s"] if side["load_s"] else float("nan")

    out = render_store(data)
    if oc["find"]:
        rows: list[tuple[str, float, float, str, bool]] = [
            (
                f"Index load by STOW-RS to {data['index_instances']:,} instances, s",
                so["load_s"],
                oc["load_s"],
                "",
                False,
            ),
            ("… STOW-RS rate over the load, inst/s", load_rate(so), load_rate(oc), "", True),
            (
                f"C-FIND STUDY query mix p50, ms ({data['index_studies']:,} studies)",
                median(all_find(so)) * 1e3,
                median(all_find(oc)) * 1e3,
                "",
                False,
            ),
            (
                "C-FIND STUDY query mix p95, ms",
                pct(all_find(so), 95) * 1e3,
                pct(all_find(oc), 95) * 1e3,
                "≤ 0.5×",
                False,
            ),
        ]
        out += [
            "",
            "| metric | ScanOnce | Orthanc | ScanOnce / Orthanc | target | met |",
            "| --- | ---: | ---: | ---: | --- | --- |",
        ]
        for metric, a, b, target, higher in rows:
            ratio = a / b if b else float("nan")
            met = ""
            if target and ratio == ratio:
                bound = float(target[1:].strip().rstrip("×"))
                met = "yes" if (ratio >= bound if higher else ratio <= bound) else "**no**"
            out.append(f"| {metric} | {_fmt(a)} | {_fmt(b)} | {_fmt(ratio, 2)}× | {target} | {met} |")
        out += [
            "",
            "C-FIND per query kind (STUDY level, one association, p50 / p95 ms, total matches over "
            "the repeats):",
            "",
            "| query | ScanOnce p50 | ScanOnce p95 | Orthanc p50 | Orthanc p95 | matches SO / Orthanc |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for kind in oc["find"]:

            def q(side: dict[str, Any], p: float, k: str = kind) -> str:
                if k in side["find_errors"]:
                    return f"status {side['find_errors'][k]}"
                return _fmt(pct(side["find"][k], p) * 1e3)

            counts = f"{so['find_counts'].get(kind, 'n/a')} / {oc['find_counts'].get(kind, 'n/a')}"
            out.append(f"| {kind} | {q(so, 50)} | {q(so, 95)} | {q(oc, 50)} | {q(oc, 95)} | {counts} |")
    load = " / ".join(f"{x:.1f}" for x in data["loadavg_1m"])
    out += [
        "",
        f"Run: C-STORE by dcmtk storescu ({data['parallel']} processes in parallel, one association each, "
        "environment TCP_NODELAY=1); "
        + (
            f"index load by STOW-RS, {data['threads']} client threads, batches of "
            f"{plan['stow_batch']}; C-FIND by a pynetdicom SCU (Study Root, TCP_NODELAY), "
            f"{plan['find_repeats']} queries per kind; "
            if oc["find"]
            else "C-STORE only (--store-only); "
        )
        + f"{plan['series_per_study'] * plan['instances_per_series']} instances per study; "
        f"seed {data['seed']}; total {data['total_s']:.0f} s; "
        f"{platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()}), loopback only; "
        f"1-min load average at start / end: {load}.",
    ]
    if oc["find"]:
        out.append(
            "Index sync speed (bench/federation_sync.py, not re-run here; 10,000 studies in one Orthanc, "
            "2026-11-25): first sync 400 studies/s by QIDO-RS, 772 studies/s by C-FIND (target ≥ 200)."
        )
    for side in (so, oc, floor):
        if side is None:
            continue
        out += [
            "",
            f"{side['name']} settings: " + "; ".join(f"{k}: {v}" for k, v in side["settings"].items()),
        ]
        if side["failures"]:
            out.append(f"{side['name']} failures: " + "; ".join(side["failures"]))
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5,000-instance index (under 3 minutes)")
    ap.add_argument("--out", type=Path, help="write the Markdown table here (and the raw numbers as .json)")
    ap.add_argument("--threads", type=int, default=4, help="client threads for the STOW-RS load")
    ap.add_argument("--parallel", type=int, default=4, help="parallel storescu processes (default 4)")
    ap.add_argument("--store-instances", type=int, help="override the C-STORE folder size")
    ap.add_argument("--index-instances", type=int, help="override the index size")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--orthanc-nagle",
        action="store_true",
        help="leave Orthanc's DIMSE sockets as Debian's dcmtk does by default (Nagle on)",
    )
    ap.add_argument(
        "--receivers",
        help="C-STORE only, ScanOnce with these numbers of DIMSE receiver processes (comma-separated, "
        "e.g. 0,1,2), on the embedded default or, with --pg, on PostgreSQL; --store-runs rounds",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL[:NAME=VALUE,...]",
        help="C-STORE only, like --receivers: one more ScanOnce target with these environment "
        "variables (e.g. syncfs:SCANONCE_STORAGE_SYNC=syncfs, or main:PYTHONPATH=/path/to/main), "
        "in the same rounds as the others; repeatable",
    )
    ap.add_argument(
        "--pg", help="PostgreSQL server for --receivers (postgresql+psycopg://user@host:port); default SQLite"
    )
    ap.add_argument(
        "--store-runs",
        type=int,
        default=1,
        help="C-STORE rounds (a fresh folder each, all targets in turn); the table shows medians",
    )
    ap.add_argument("--store-only", action="store_true", help="C-STORE phase only (no index load, no C-FIND)")
    ap.add_argument(
        "--per-association",
        type=int,
        default=0,
        metavar="N",
        help="C-STORE only, like --variant: N instances per round, each in an association of its own "
        "(a storescu per file, --parallel at a time): what association set-up costs",
    )
    ap.add_argument("--render", type=Path, help="only print the table of a saved .json run")
    ap.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_floor is not None:
        serve_floor(args.serve_floor)
        return 0
    if args.render:
        saved = json.loads(args.render.read_text())
        print(render_receivers(saved) if saved.get("mode") == "receivers" else render(saved))
        return 0
    plan = QUICK if args.quick else FULL
    if args.store_instances:
        plan = replace(plan, store_instances=args.store_instances)
    if args.index_instances:
        plan = replace(plan, index_instances=args.index_instances)
    work = Path(tempfile.mkdtemp(prefix="scanonce-bench-dimse-"))
    if args.receivers is not None or args.variant or args.per_association:
        variants = []
        for spec in args.variant:
            label, _, assigns = spec.partition(":")
            variants.append((label, dict(a.split("=", 1) for a in assigns.split(",") if a)))
        try:
            data = run_receivers(
                plan,
                receivers=[int(n) for n in args.receivers.split(",")] if args.receivers else [],
                variants=variants,
                pg=args.pg,
                parallel=args.parallel,
                work=work,
                seed=args.seed,
                store_runs=max(1, args.store_runs),
                per_association=max(0, args.per_association),
            )
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
            table = render_receivers(data)
            print(table, flush=True)
            if args.out:
                args.out.write_text(table)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    try:
        data = run(
            plan,
            threads=args.threads,
            parallel=args.parallel,
            work=work,
            seed=args.seed,
            orthanc_nodelay=not args.orthanc_nagle,
            store_runs=max(1, args.store_runs),
            store_only=args.store_only,
        )
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        table = render(data)
        print(table, flush=True)
        if args.out:
            args.out.write_text(table)
    finally:
        log(f"removing {work}")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
