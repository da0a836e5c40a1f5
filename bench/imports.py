"""Import benchmark: ScanOnce's import (coerce + deliver) vs sending the same files unchanged, to
the same Orthanc, side by side in one run.

    .venv/bin/python -m bench.imports --instances 200 --runs 3

For each run Orthanc is emptied first. Compared:
  - C-STORE: `scanonce import --via dimse` vs dcmtk `storescu` sending the outside study's files
    (as stored in the broker) to the same Orthanc;
  - STOW-RS: `scanonce import --via dicomweb` vs the same files POSTed unchanged to Orthanc's own
    STOW-RS in multipart batches of the same size (16), as many requests at once as the import
    sends (`service.SENDERS`, each on its keep-alive connection), i.e. Orthanc's own STOW ingest
    rate at that concurrency.
storescu sends one file at a time on one association, as it does; the import sends
`service.SENDERS` batches at once (`--senders 1` measures it one at a time too).
The import does strictly more (reads from storage, coerces, writes, then verifies by C-FIND /
QIDO-RS): the ratio says what that costs.

`--coerced-peer` (STOW-RS) adds a third side in the same runs: the plain client sending the
import's own output (the coerced instances, read back from Orthanc after a first import), to tell
what the coerced content costs the archive from what the import's own work costs.

Memory (`--memory-gb 1`): a study of that size is generated from a fixed seed (noise pixel data,
so no two slices are alike), ingested, then imported by C-STORE and by STOW-RS while a sampler
reads the resident set size of this process and its children (Orthanc, the peer, left out) from
/proc every 50 ms; the same for a study an eighth the size. Flat: the peak does not grow with it.

    .venv/bin/python -m bench.imports --memory-gb 1 --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from pydicom.uid import generate_uid
from sqlmodel import Session

from bench.archive import cpu_seconds
from broker.app import build_state
from broker.db import session_scope
from broker.deps import AppState
from broker.facilities import service as facilities
from broker.identity import matching
from broker.identity import service as identity
from broker.identity.schemas import Identifier
from broker.imports import delivery, service
from broker.index import service as index
from broker.settings import Settings
from tests.peers import dcmtk, orthanc
from tests.support import ADMIN, make_ds, write


def _study(tmp: Path, n: int, size: int) -> list[str]:
    study, series = generate_uid(), generate_uid()
    pixels = bytes(range(256)) * (size * size * 2 // 256)
    paths = []
    for i in range(n):
        ds = make_ds(sop=generate_uid(), study=study, series=series, pid="P1", issuer="OUTHOSP",
                     name="BENCH^PATIENT", instance_number=i + 1)  # fmt: skip
        ds.Rows = ds.Columns = size
        ds.PixelData = pixels
        paths.append(write(tmp, f"{i}.dcm", ds))
    return paths


def _noise_study(tmp: Path, n: int, size: int, seed: int) -> list[str]:
    """n slices of seeded noise (12 bits in 16): deterministic, and no two slices alike."""
    import numpy as np

    rng = np.random.default_rng(seed)
    study, series = generate_uid(prefix=None), generate_uid(prefix=None)
    paths = []
    for i in range(n):
        ds = make_ds(sop=generate_uid(prefix=None), study=study, series=series, pid="P1", issuer="OUTHOSP",
                     name="BENCH^PATIENT", instance_number=i + 1)  # fmt: skip
        ds.Rows = ds.Columns = size
        ds.PixelData = rng.integers(0, 4096, size * size, dtype=np.uint16).tobytes()
        paths.append(write(tmp, f"{i}.dcm", ds))
    return paths


def _tree_rss_mb(root: int, exclude: set[int]) -> float:
    """Resident set size of `root` and its descendants (less `exclude` and theirs), from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(fields[21]) * page
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        if pid in exclude:
            continue
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total / 1e6


class _Sampler:
    """Peak RSS of this process tree while a block runs (sampled every 50 ms)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.peak, self._stop = exclude, 0.0, threading.Event()

    def __enter__(self) -> _Sampler:
        self.peak = _tree_rss_mb(os.getpid(), self.exclude)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _tree_rss_mb(os.getpid(), self.exclude))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss_mb(os.getpid(), self.exclude))


def memory(args: argparse.Namespace) -> None:
    """Peak RSS of the importing process tree for a study of `--memory-gb` and one an eighth of it."""
    per = args.size * args.size * 2
    big = int(args.memory_gb * 1e9 // per)
    with tempfile.TemporaryDirectory(prefix="bench-imports-mem-") as tmpdir:
        tmp = Path(tmpdir)
        st = build_state(Settings(data_dir=tmp / "broker", mllp_port=0, ingest_processes=0))
        with orthanc(
            tmp / "pacs", aet="MYPACS", modalities={"scanonce": ["SCANONCE", "127.0.0.1", 104]}
        ) as pacs:
            exclude = {int(p) for p in _orthanc_pids(pacs)}
            with Session(st.engine) as session:
                facilities.add_facility(session=session, principal=ADMIN, facility_id="mine", issuer="MYPACS",
                                        dicomweb_url=pacs.dicomweb_url, ae_title=pacs.aet, host=pacs.host,
                                        port=pacs.dicom_port)  # fmt: skip
                facilities.add_facility(
                    session=session, principal=ADMIN, facility_id="outside", issuer="OUTHOSP"
                )
            _register_patient(st)
            what = f"{args.size}x{args.size} 16-bit noise slices, seed {args.seed}"
            print(f"peak RSS of the importing process tree (this process and its children, Orthanc "
                  f"left out); {what}", flush=True)  # fmt: skip
            print("| study | delivery | import time | peak RSS during the import |", flush=True)
            print("| --- | --- | --- | --- |", flush=True)
            for k, n in enumerate((max(1, big // 8), big)):
                src = tmp / f"src{k}"
                src.mkdir()
                paths = _noise_study(src, n, args.size, args.seed + k)
                gb = sum(Path(p).stat().st_size for p in paths) / 1e9
                for i in range(0, n, 256):  # ingest in slices: the ingest is not what is measured
                    index.ingest_files(engine=st.engine, store=st.store, principal=ADMIN,
                                       facility_id="outside", paths=paths[i : i + 256])  # fmt: skip
                study_uid = _uid_of(paths[0])
                for p in paths:
                    os.unlink(p)  # the broker's storage holds the study now
                for via in ("dimse", "dicomweb"):
                    _clear(pacs.url)
                    with _Sampler(exclude) as sampler:
                        t = time.perf_counter()
                        row, job = service.start_claimed(
                            engine=st.engine,
                            principal=ADMIN,
                            study_uid=study_uid,
                            facility_id="mine",
                            via=via,
                        )
                        final = service.run_claimed(
                            engine=st.engine, store=st.store, import_id=row.id or 0, job=job
                        )
                        dt = time.perf_counter() - t
                    assert final.status == "done" and _count(pacs.url) == n, final.message
                    name = "C-STORE" if via == "dimse" else "STOW-RS"
                    print(f"| {n} instances, {gb:.2f} GB | {name} | {dt:.0f} s ({n / dt:.1f} inst/s) | "
                          f"{sampler.peak:.0f} MB |", flush=True)  # fmt: skip
            print(f"ru_maxrss of this process over the whole run (ingest included): {_maxrss_mb():.0f} MB")


def _orthanc_pids(pacs: object) -> list[int]:
    proc = getattr(pacs, "process", None) or getattr(pacs, "proc", None)
    return [proc.pid] if proc is not None else []


def _clear(url: str) -> None:
    for sid in httpx.get(f"{url}/studies", timeout=30, trust_env=False).json():
        httpx.delete(f"{url}/studies/{sid}", timeout=60, trust_env=False)


def _count(url: str) -> int:
    return len(httpx.get(f"{url}/instances", timeout=30, trust_env=False).json())


def _cpu() -> float:
    """CPU seconds (user + system) of this process's tree so far, children that ended and were
    reaped included (a parse worker, a `storescu` the import ran): what the import costs on a
    shared machine, less noisy than its wall time. The destination's own is `_pids_cpu`'s."""
    return cpu_seconds(os.getpid()) - _pids_cpu(_destination_pids)


# The destination PACS's processes, when they are this process's children (Orthanc started by
# the benchmark): counted as the destination's, not the import's.
_destination_pids: list[int] = []


def _pids_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) of these processes so far, from /proc: what the destination
    spends on what it is sent (a coerced instance carries more for it to store than the source)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _seed_outside(st: AppState, paths: list[str]) -> None:
    """The outside study indexed under facility "outside", and the destination's registered
    patient (MYPACS M1) known to carry the outside ID (OUTHOSP P1)."""
    index.ingest_files(engine=st.engine, store=st.store, principal=ADMIN, facility_id="outside", paths=paths)
    _register_patient(st)


def _register_patient(st: AppState) -> None:
    """The destination's registered patient (MYPACS M1), known to carry the outside ID (OUTHOSP P1)."""
    with session_scope(st.engine) as session:
        identity.upsert_record(
            session=session, identifier=Identifier("MYPACS", "M1"),
            demographics=matching.Demographics(family="BENCH", given="PAT", birth_date="19800101"),
            identifiers=[Identifier("OUTHOSP", "P1")], facility_id="mine", source="hl7",
        )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--size", type=int, default=512, help="rows = columns of each CT slice (16-bit)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="instances per association / STOW-RS request")
    ap.add_argument("--senders", type=int, default=0, help="batches in flight at once (connections)")
    ap.add_argument("--memory-gb", type=float, default=0, help="measure peak RSS for a study this big")
    ap.add_argument("--seed", type=int, default=7, help="seed of the --memory-gb study's pixel data")
    ap.add_argument("--via", choices=("both", "dimse", "dicomweb"), default="both", help="deliveries to run")
    ap.add_argument("--coerced-peer", action="store_true",
                    help="STOW-RS: also time the plain client sending the import's output")  # fmt: skip
    args = ap.parse_args()
    if args.batch:
        service.BATCH = args.batch
    if args.senders:
        service.SENDERS = args.senders
    if args.memory_gb:
        memory(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-imports-") as tmpdir:
        tmp = Path(tmpdir)
        st = build_state(Settings(data_dir=tmp / "broker", mllp_port=0))
        with orthanc(
            tmp / "pacs", aet="MYPACS", modalities={"scanonce": ["SCANONCE", "127.0.0.1", 104]}
        ) as pacs:
            with Session(st.engine) as session:
                facilities.add_facility(session=session, principal=ADMIN, facility_id="mine", issuer="MYPACS",
                                        dicomweb_url=pacs.dicomweb_url, ae_title=pacs.aet, host=pacs.host,
                                        port=pacs.dicom_port)  # fmt: skip
                facilities.add_facility(
                    session=session, principal=ADMIN, facility_id="outside", issuer="OUTHOSP"
                )
            (tmp / "src").mkdir()
            paths = _study(tmp / "src", args.instances, args.size)
            mb = sum(Path(p).stat().st_size for p in paths) / 1e6
            _seed_outside(st, paths)
            with Session(st.engine) as session:
                study_uid = index.find_instances(session=session, study_uid=_uid_of(paths[0]))[0].study_uid

            cpu: dict[str, list[float]] = {}
            dest: dict[str, list[float]] = {}
            pacs_pids = _orthanc_pids(pacs)
            _destination_pids[:] = pacs_pids

            def imp(via: str) -> float:
                _clear(pacs.url)
                c, o = _cpu(), _pids_cpu(pacs_pids)
                t = time.perf_counter()
                row, job = service.start_claimed(engine=st.engine, principal=ADMIN, study_uid=study_uid,
                                             facility_id="mine", via=via)  # fmt: skip
                final = service.run_claimed(engine=st.engine, store=st.store, import_id=row.id or 0, job=job)
                dt = time.perf_counter() - t
                cpu.setdefault(f"import {via}", []).append(_cpu() - c)
                dest.setdefault(f"import {via}", []).append(_pids_cpu(pacs_pids) - o)
                assert final.status == "done" and _count(pacs.url) == args.instances, final.message
                return dt

            def storescu() -> float:
                _clear(pacs.url)
                t = time.perf_counter()
                dcmtk("storescu", "-aec", pacs.aet, "-aet", "SCANONCE", pacs.host, str(pacs.dicom_port),
                      *paths, timeout=600)  # fmt: skip
                dt = time.perf_counter() - t
                assert _count(pacs.url) == args.instances
                return dt

            def stow(files: list[str] = paths, label: str = "peer dicomweb") -> float:
                _clear(pacs.url)
                c, o = _cpu(), _pids_cpu(pacs_pids)
                t = time.perf_counter()
                # The files as they are, in requests of the import's size, on as many keep-alive
                # connections at once as the import uses: no coercion, no reading from
                # storage, no bookkeeping.
                batches = [files[i : i + service.BATCH] for i in range(0, len(files), service.BATCH)]
                senders = [delivery.Sender(facility=_web(pacs), via="dicomweb", calling_ae="X")
                           for _ in range(service.SENDERS)]  # fmt: skip

                def send(k: int) -> None:
                    for batch in batches[k :: service.SENDERS]:
                        outs = senders[k].send([(p, sops[p]) for p in batch])
                        assert all(o.status == "sent" for o in outs)

                with ThreadPoolExecutor(service.SENDERS) as pool:
                    list(pool.map(send, range(service.SENDERS)))
                for sender in senders:
                    sender.close()
                dt = time.perf_counter() - t
                cpu.setdefault(label, []).append(_cpu() - c)
                dest.setdefault(label, []).append(_pids_cpu(pacs_pids) - o)
                assert _count(pacs.url) == args.instances
                return dt

            sops = {p: _uid_of(p, sop=True) for p in paths}
            coerced: list[str] = []
            if args.coerced_peer and args.via != "dimse":
                imp("dicomweb")  # also a warm-up; its output is the third side's files
                coerced = _download(pacs.url, tmp / "coerced")
                sops.update((p, _uid_of(p, sop=True)) for p in coerced)

            rows = []
            load = [os.getloadavg()[0]]
            for name, ours, theirs in (("C-STORE", lambda: imp("dimse"), storescu),
                                       ("STOW-RS", lambda: imp("dicomweb"), stow)):  # fmt: skip
                if args.via != "both" and args.via != ("dimse" if name == "C-STORE" else "dicomweb"):
                    continue
                third = coerced if name == "STOW-RS" else []
                a: list[float] = []
                b: list[float] = []
                c3: list[float] = []
                sides: list[tuple[list[float], Callable[[], float]]] = [(a, ours), (b, theirs)]
                if third:
                    sides.append((c3, functools.partial(stow, third, "peer dicomweb, coerced files")))
                for k in range(args.runs):
                    # With three sides the order flips every run: they share each minute's load.
                    for times, side in sides if k % 2 == 0 or not third else sides[::-1]:
                        times.append(side())
                ma, mb_ = statistics.median(a), statistics.median(b)
                rows.append((name, args.instances / ma, args.instances / mb_, mb_ / ma))
                print(f"{name}, each run (s): import {', '.join(f'{x:.2f}' for x in a)}; "
                      f"peer {', '.join(f'{x:.2f}' for x in b)}", flush=True)  # fmt: skip
                if c3:
                    mc = statistics.median(c3)
                    rows.append((f"{name}, coerced files", args.instances / ma, args.instances / mc, mc / ma))
                    print(f"{name}, coerced files by the plain client, each run (s): "
                          f"{', '.join(f'{x:.2f}' for x in c3)}; the coerced files' rate / the "
                          f"originals' {mb_ / mc:.3f}", flush=True)  # fmt: skip
                load.append(os.getloadavg()[0])
            version = httpx.get(f"{pacs.url}/system", trust_env=False).json()["Version"]
            print(f"study: {args.instances} instances, {mb:.0f} MB ({args.size}x{args.size} 16-bit); "
                  f"median of {args.runs} runs; batches of {service.BATCH}, {service.SENDERS} at once; "
                  f"Orthanc {version}")  # fmt: skip
            print("| delivery | import (inst/s) | peer (inst/s) | ratio |")
            print("| --- | --- | --- | --- |")
            for name, x, y, r in rows:
                peer = {"C-STORE": "dcmtk storescu", "STOW-RS": "same files to Orthanc's STOW-RS"}.get(
                    name, "the import's coerced output to Orthanc's STOW-RS"
                )
                print(f"| {name} | {x:.1f} | {y:.1f} ({peer}) | {r:.2f} |")
            print("CPU of this process and its children (user + system, s, median per run): " + ", ".join(
                f"{k} {statistics.median(v):.3f}" for k, v in cpu.items()))  # fmt: skip
            if pacs_pids:
                print("CPU of Orthanc while it received them (s, median per run): " + ", ".join(
                    f"{k} {statistics.median(v):.3f}" for k, v in dest.items()))  # fmt: skip
            print(f"peak RSS of this process after all runs: {_maxrss_mb():.0f} MB")
            print("1-minute load average (2 cores) at the start and after each delivery: "
                  + ", ".join(f"{x:.1f}" for x in load))  # fmt: skip


def _download(url: str, folder: Path) -> list[str]:
    """Every instance Orthanc holds, as stored, into `folder`."""
    folder.mkdir()
    paths = []
    with httpx.Client(trust_env=False) as http:
        for i, iid in enumerate(http.get(f"{url}/instances").json()):
            path = folder / f"{i}.dcm"
            path.write_bytes(http.get(f"{url}/instances/{iid}/file").content)
            paths.append(str(path))
    return paths


def _uid_of(path: str, *, sop: bool = False) -> str:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.SOPInstanceUID if sop else ds.StudyInstanceUID)


class _web:
    def __init__(self, pacs: object) -> None:
        self.id = "bench"
        self.dicomweb_url = pacs.dicomweb_url  # type: ignore[attr-defined]
        self.ae_title = self.host = None
        self.port = None


if __name__ == "__main__":
    main()
