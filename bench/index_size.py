"""What takes the room in the SQLite index (not a test): SQLite's dbstat per table and index.

Loads `--instances` generated small CT instances (bench.synthdata, the archive benchmark's data)
into a fresh embedded broker in this process, through ingest in batches of 100 (what STOW-RS
does), then prints bytes per instance for each table and index, largest first, and the whole
file. `--db FILE` reports on an existing index instead (e.g. a benchmark's kept data folder).

    .venv/bin/python -m bench.index_size --instances 10000
    .venv/bin/python -m bench.index_size --db /tmp/work/scanonce/scanonce.db --instances 6400
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def dbstat(db: Path) -> list[tuple[str, int, int]]:
    """(table or index, bytes on pages, payload bytes), largest first."""
    # Read-write: a read-only connection cannot checkpoint a WAL the server left behind (SQLite
    # answers "disk I/O error"), and pages still in the WAL are not in the file's size.
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows = con.execute(
            "SELECT name, SUM(pgsize), SUM(payload) FROM dbstat GROUP BY name ORDER BY 2 DESC"
        ).fetchall()
    finally:
        con.close()
    return [(str(n), int(b), int(p)) for n, b, p in rows]


def load(data_dir: Path, n: int, seed: int) -> Path:
    from bench.synthdata import bulk_instances
    from broker.app import build_state
    from broker.index import service
    from broker.security.schemas import Principal, Role
    from broker.settings import Settings

    state = build_state(Settings(data_dir=data_dir))
    principal = Principal(who="bench", role=Role.admin, facility="local")
    spool = data_dir / "bench-spool"
    spool.mkdir()
    batch: list[str] = []
    started = time.perf_counter()

    def flush() -> None:
        service.ingest_files(
            engine=state.engine, store=state.store, principal=principal, facility_id="local", paths=batch
        )
        batch.clear()

    studies = max(1, n // 10)
    generated = bulk_instances(seed=seed, n_studies=studies, series_per_study=2, instances_per_series=5)
    for i, data in enumerate(generated):
        path = spool / f"{i}.dcm"
        path.write_bytes(data)
        batch.append(str(path))
        if len(batch) == 100:
            flush()
    if batch:
        flush()
    print(f"loaded {n} instances in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    url = state.engine.url.database
    state.engine.dispose()
    return Path(str(url))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--db", type=Path, help="report on this SQLite index instead of loading one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        db = args.db or load(Path(tmp), args.instances, args.seed)
        rows = dbstat(db)
        total = sum(b for _n, b, _p in rows)
        n = args.instances
        print("| table or index | bytes/instance | payload bytes/instance | share |")
        print("| --- | ---: | ---: | ---: |")
        for name, size, payload in rows:
            if size * 1000 < total:
                continue
            print(f"| {name} | {size / n:,.0f} | {payload / n:,.0f} | {size / total:.0%} |")
        print(f"| **all pages** ({db.stat().st_size:,} bytes file) | **{total / n:,.0f}** | | |")


if __name__ == "__main__":
    main()
