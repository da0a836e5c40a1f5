"""CPU of the ingest writer alone, in one process (issue 18 item 3).

`index_parsed` with the DIMSE audit hook (joint, as the batcher calls it), objects put to a
store that keeps nothing, on instances parsed beforehand, so only the writer's statements,
commit and Python are measured:

- `cstore`: groups of 4 into a series that exists (a C-STORE group from 4 associations);
- `stow`: batches of 100 small instances, 10 per new study, 3 studies per patient (a STOW-RS
  request of the archive benchmark's small instances): 4 new patients per batch, which the
  writer links to persons (identity's `link_patients`).

    python -m bench.ingest_writer [--pg postgresql+psycopg://postgres@127.0.0.1:5432] [--rounds 5]

Prints the CPU (thread time of the calling thread, plus `getrusage` of the process) per group
or batch, per round; compare runs of two trees by putting one first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

from broker.app import build_state
from broker.audit.service import IngestAuditHook
from broker.index.ingest import index_parsed
from broker.index.parse import _Parsed, parse_instance
from broker.security.schemas import Principal, Role
from broker.settings import Settings
from storage import ObjectInfo
from tests.support import make_ds, write

_NAMES = ["SMITH", "JONES", "NEUMANN", "PAINTER", "GREEN", "REID", "HOWIE", "WEBB", "DIXON", "KOWALSKI"]
P = Principal(who="bench", role=Role.admin, facility="local")
ROOT = "1.2.826.0.1.3680043.8.498."


class _NoStore:
    """Keeps nothing: the writer's CPU without the objects' writes."""

    def put_file(self, key: str, path: str, *, move: bool = False) -> ObjectInfo:
        # The size the writer received, so its check of what was placed passes.
        return ObjectInfo(key=key, size=os.path.getsize(path))

    def delete(self, key: str) -> None:
        pass


def _parsed(folder: Path, items: list[tuple[str, str, str, str, int]]) -> list[_Parsed]:
    out = []
    for sop, study, series, pid, n in items:
        # Patients of their own names and birth dates, as in a real feed: identical demographics
        # would make every new patient a match candidate of every other one.
        h = zlib.crc32(pid.encode())
        name = f"{_NAMES[h % len(_NAMES)]}^{_NAMES[(h >> 8) % len(_NAMES)]}{h % 997}"
        ds = make_ds(sop=sop, study=study, series=series, pid=pid, name=name, instance_number=n)
        ds.PatientBirthDate = f"19{10 + h % 89:02d}{1 + (h >> 4) % 12:02d}{1 + (h >> 9) % 28:02d}"
        p = parse_instance(write(folder, f"{sop}.dcm", ds))
        assert isinstance(p, _Parsed)
        out.append(p)
    return out


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run(database_url: str, *, groups: int, batches: int, rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ingest-writer-"))
    settings = Settings(
        data_dir=tmp,
        database_url=database_url,
        storage_url=(tmp / "o").as_uri(),
        mllp_port=0,
        migrate_on_start=True,
    )
    state = build_state(settings)
    store: Any = _NoStore()
    tag = uuid.uuid4().int % 10**12
    study, series = f"{ROOT}{tag}.1", f"{ROOT}{tag}.1.1"
    first = _parsed(tmp, [(f"{series}.0", study, series, "P0", 0)])
    index_parsed(engine=state.engine, store=store, principal=P, facility_id="local", parsed=first)
    hook = IngestAuditHook(principal=P, interface="dimse", client_address="127.0.0.1")
    joint = hook.joint([hook] * 4)
    for r in range(rounds):
        cs = _parsed(tmp, [(f"{series}.{r}.{n}", study, series, "P0", n) for n in range(groups * 4)])
        st_items = []
        for b in range(batches):
            for n in range(100):
                s = f"{ROOT}{tag}.{r + 2}.{b}.{n // 10}"
                st_items.append((f"{s}.1.{n}", s, f"{s}.1", f"P{r}-{b}-{n // 30}", n))
        stow = _parsed(tmp, st_items)

        def write(items: list[Any], size: int, audit: Any) -> None:
            """The items indexed `size` at a time, each group in its own transaction."""
            for start in range(0, len(items), size):
                index_parsed(
                    engine=state.engine,
                    store=store,
                    principal=P,
                    facility_id="local",
                    parsed=items[start : start + size],
                    consume=True,
                    audit=audit,
                )

        t0, c0 = time.thread_time(), _cpu()
        write(cs[: 4 * groups], 4, joint)
        t1, c1 = time.thread_time(), _cpu()
        write(stow[: 100 * batches], 100, hook)
        t2, c2 = time.thread_time(), _cpu()
        cs_ms, cs_proc = (t1 - t0) / groups * 1e3, (c1 - c0) / groups * 1e3
        st_ms, st_proc = (t2 - t1) / batches * 1e3, (c2 - c1) / batches * 1e3
        print(
            f"round {r}: cstore {cs_ms:.3f} ms/group (process {cs_proc:.3f}); "
            f"stow {st_ms:.2f} ms/batch of 100 (process {st_proc:.2f})",
            flush=True,
        )
        if r:  # the first round warms the caches up
            _ROUNDS.append((cs_ms, st_ms))
    cs_med = statistics.median(x for x, _ in _ROUNDS)
    st_med = statistics.median(y for _, y in _ROUNDS)
    load = os.getloadavg()[0]
    print(f"median: cstore {cs_med:.3f} ms/group of 4, stow {st_med:.2f} ms/batch of 100; load {load:.1f}")
    state.engine.dispose()


_ROUNDS: list[tuple[float, float]] = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", help="PostgreSQL server URL (a fresh database is made on it)")
    ap.add_argument("--groups", type=int, default=400)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4, help="the first is a warm-up, not counted")
    args = ap.parse_args()
    if args.pg:
        import psycopg

        name = f"bench_writer_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.pg.replace("+psycopg", "") + "/postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        try:
            run(f"{args.pg}/{name}", groups=args.groups, batches=args.batches, rounds=args.rounds)
        finally:
            with psycopg.connect(args.pg.replace("+psycopg", "") + "/postgres", autocommit=True) as c:
                c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    else:
        tmp = tempfile.mkdtemp(prefix="ingest-writer-db-")
        run(f"sqlite:///{tmp}/index.sqlite3", groups=args.groups, batches=args.batches, rounds=args.rounds)


if __name__ == "__main__":
    main()
