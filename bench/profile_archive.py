"""Profile one benchmark phase of ScanOnce with py-spy and print where the time goes.

    .venv/bin/python -m bench.profile_archive stow-small      # STOW-RS of small instances
    .venv/bin/python -m bench.profile_archive stow-ct         # STOW-RS of 512x512 CT
    .venv/bin/python -m bench.profile_archive qido            # the QIDO-RS query mix
    .venv/bin/python -m bench.profile_archive retrieve        # WADO-RS study retrieve
    .venv/bin/python -m bench.profile_archive metadata        # WADO-RS study metadata
    .venv/bin/python -m bench.profile_archive cstore          # C-STORE by 4 parallel storescu
    .venv/bin/python -m bench.profile_archive cstore --pg postgresql+psycopg://postgres@127.0.0.1:5432

A fresh `scanonce serve` (embedded default) is loaded with the data the phase needs, then
py-spy samples the server while the phase runs, and the top functions are printed by
inclusive ("total") and exclusive ("self") share of the samples of busy threads (idle threads
are not sampled). The raw stacks are kept (--out) for a flame graph: py-spy's "raw" format is
the collapsed-stack format that speedscope and flamegraph.pl read.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.archive import (  # noqa: E402
    Server,
    build_query_mix,
    instances,
    retrieve,
    run_scanonce,
    stow_batches,
    study_facts,
    timed_get,
)
from tests.peers import free_port  # noqa: E402

PY_SPY = shutil.which("py-spy") or str(
    next(
        (
            p
            for p in (REPO / ".venv" / "bin" / "py-spy", Path(sys.executable).parent / "py-spy")
            if p.exists()
        ),
        REPO / ".venv" / "bin" / "py-spy",
    )
)


def _small(seed: int, n_studies: int) -> list[bytes]:
    return list(instances(seed=seed, n_studies=n_studies, series_per_study=2, instances_per_series=5))


def _ct(seed: int, n: int) -> list[bytes]:
    return list(instances(seed=seed, n_studies=1, series_per_study=4, instances_per_series=n // 4, rows=512))


def _batches(items: list[bytes], size: int) -> list[list[bytes]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def prepare(phase: str, server: Server, threads: int, *, dimse_port: int = 0) -> Callable[[], str]:
    """Load what the phase needs; return the phase (a callable that reports what it did)."""
    if phase == "stow-small":
        data = _small(7, 600)
        stow_batches(server, _batches(_small(8, 100), 100), threads)  # warm-up: imports, caches

        def go() -> str:
            r = stow_batches(server, _batches(data, 100), threads)
            return f"{r.instances} instances, {r.per_s:.0f}/s, server CPU {r.server_cpu_s:.1f} s"

        return go
    if phase == "cstore":
        # C-STORE of small CT instances by 4 parallel dcmtk storescu (bench/dimse.py's phase 1).
        from bench.dimse import Dimse, storescu_parallel, write_folder

        target = Dimse(server, "SCANONCE", dimse_port)
        folder = Path(tempfile.mkdtemp(prefix="scanonce-profile-cstore-"))
        storescu_parallel(target, write_folder(folder / "warm", _small(13, 10), 4), 100)
        data = _small(14, 200)
        dirs = write_folder(folder / "run", data, 4)

        def go() -> str:
            try:
                r = storescu_parallel(target, dirs, len(data))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            cpu = 1e3 * r["server_cpu_s"] / len(data)
            return f"{len(data)} instances, {r['per_s']:.0f}/s, server CPU {cpu:.2f} ms per instance"

        return go
    if phase == "stow-ct":
        data = _ct(9, 400)
        stow_batches(server, _batches(_ct(10, 20), 10), threads)

        def go() -> str:
            r = stow_batches(server, _batches(data, 10), threads)
            rate = f"{r.per_s:.0f}/s, {r.mb_s:.0f} MB/s"
            return f"{r.instances} instances, {rate}, server CPU {r.server_cpu_s:.1f} s"

        return go
    if phase == "qido":
        small = _small(11, 1000)
        stow_batches(server, _batches(small, 100), threads)
        facts = [study_facts(small[i]) for i in range(0, len(small), 10)]
        mix = build_query_mix(facts, 40, 1)

        def go() -> str:
            t0 = time.perf_counter()
            for _ in range(3):
                for _kind, params in mix:
                    timed_get(f"{server.base}/studies", params=params)
            return f"{3 * len(mix)} queries in {time.perf_counter() - t0:.1f} s"

        return go
    if phase in ("retrieve", "metadata"):
        ct = _ct(12, 400)
        uid = study_facts(ct[0]).study_uid
        stow_batches(server, _batches(ct, 10), threads)

        def go() -> str:
            t0 = time.perf_counter()
            n = 0
            for _ in range(8 if phase == "retrieve" else 30):
                if phase == "retrieve":
                    n += retrieve(server, uid)[1]
                else:
                    timed_get(f"{server.base}/studies/{uid}/metadata")
            dt = time.perf_counter() - t0
            return f"{phase}: {dt:.1f} s" + (f", {n / dt / 2**20:.0f} MB/s" if n else "")

        return go
    raise SystemExit(f"unknown phase {phase!r}")


def summarize(raw: Path, top: int) -> str:
    """Top functions by inclusive and exclusive share, from py-spy's collapsed stacks; then the
    hottest source lines (self time)."""
    total = 0
    incl: collections.Counter[str] = collections.Counter()
    excl: collections.Counter[str] = collections.Counter()
    lines_self: collections.Counter[str] = collections.Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue  # a source line py-spy could not quote cleanly
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        excl[_function(frames[-1])] += count
        lines_self[_short(frames[-1])] += count
        for f in {_function(f) for f in frames}:
            incl[f] += count
    if not total:
        return "no samples"
    out = [
        f"{total} samples of busy threads (all threads summed)",
        "",
        "| total % | self % | function (file) |",
        "| ---: | ---: | --- |",
    ]
    shown = 0
    for name, n in incl.most_common():
        if shown >= top:
            break
        if name.split(" ")[0] in _PLUMBING:
            continue
        shown += 1
        out.append(f"| {100 * n / total:.1f} | {100 * excl[name] / total:.1f} | {name} |")
    out += ["", "Hottest lines (self time):", "", "| self % | line |", "| ---: | --- |"]
    for name, n in lines_self.most_common(top):
        out.append(f"| {100 * n / total:.1f} | {name} |")
    return "\n".join(out)


_PLUMBING = {
    "<module>",
    "Thread._bootstrap",
    "Thread._bootstrap_inner",
    "Thread.run",
    "_worker",
    "WorkerThread.run",
    "main",
}


def _short(frame: str) -> str:
    # py-spy frames look like "func (/abs/path/module.py:123)"; keep the path from site-packages
    # or the repo on, so the table stays readable.
    for marker in ("site-packages/", str(REPO) + "/", "lib/python3.11/"):
        if marker in frame:
            head, _, tail = frame.partition("(")
            return f"{head.strip()} ({tail.split(marker, 1)[-1]}"
    return frame


def _function(frame: str) -> str:
    """The frame without its line number: samples of one function add up."""
    short = _short(frame)
    head, sep, tail = short.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else short


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["stow-small", "stow-ct", "qido", "retrieve", "metadata", "cstore"])
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gil", action="store_true", help="only samples of the thread holding the GIL")
    ap.add_argument("--idle", action="store_true", help="also samples of idle (waiting) threads")
    ap.add_argument("--out", type=Path, help="keep py-spy's raw collapsed stacks here")
    ap.add_argument(
        "--pg", help="index on this PostgreSQL server (postgresql+psycopg://user@host:port), a fresh database"
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scanonce-profile-"))
    raw = args.out or work / "stacks.txt"
    try:
        dimse_port = free_port()
        env = {"SCANONCE_DIMSE_PORT": str(dimse_port)}
        if args.pg:
            from bench.dimse import _pg_database

            env["SCANONCE_DATABASE_URL"] = _pg_database(args.pg, "profile")
            env["SCANONCE_MIGRATE_ON_START"] = "true"
        with run_scanonce(work, env_extra=env) as server:
            go = prepare(args.phase, server, args.threads, dimse_port=dimse_port)
            spy = subprocess.Popen(
                [
                    PY_SPY,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--subprocesses",
                    "--nonblocking",
                    *(["--gil"] if args.gil else []),
                    *(["--idle"] if args.idle else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(1.0)  # let py-spy attach before the phase starts
            what = go()
            spy.send_signal(signal.SIGINT)
            _out, err = spy.communicate(timeout=60)
            if spy.returncode not in (0, -signal.SIGINT) and not raw.exists():
                print(err.decode(errors="replace"), file=sys.stderr)
                return 1
        print(f"## {args.phase}: {what}\n")
        print(summarize(raw, args.top))
    finally:
        if args.out is None:
            raw.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
