"""Time `identity.service.rebuild_keys` on many synthetic records (not a test).

Loads N persons with `identity_febrl.bulk_load` (current keys), removes the key kinds added in
keys version 2 (what an index written before looks like), then times: the rebuild, a second run
(nothing to write), and the startup check when the keys are current.

    .venv/bin/python bench/identity_rebuild_keys.py --records 200000 [--db postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text
from sqlmodel import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.identity_febrl import bulk_load  # noqa: E402
from broker.db import make_engine, migrate  # noqa: E402
from broker.identity import service as identity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=identity.REBUILD_BATCH)
    ap.add_argument("--db", default="", help="database URL (default: a new SQLite file)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="rekey-")
    url = args.db or f"sqlite:///{tmp}/index.sqlite3"
    engine = make_engine(url)
    migrate(engine)
    t = time.perf_counter()
    bulk_load(engine, args.records)
    load_s = time.perf_counter() - t
    with engine.begin() as conn:
        keys_full = conn.execute(text("SELECT count(*) FROM identity_block")).scalar_one()
        conn.execute(
            text("DELETE FROM identity_block WHERE key LIKE 'di:%' OR key LIKE 'sb:%' OR key LIKE 'st:%'")
        )
        keys_old = conn.execute(text("SELECT count(*) FROM identity_block")).scalar_one()
    out: dict[str, object] = {
        "db": engine.dialect.name,
        "records": args.records,
        "batch": args.batch,
        "bulk_load_s": round(load_s, 1),
        "keys_current": keys_full,
        "keys_old": keys_old,
    }
    with Session(engine) as s:
        first = identity.rebuild_keys(session=s, batch=args.batch)
        second = identity.rebuild_keys(session=s, batch=args.batch)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM identity_block")).scalar_one() == keys_full
    checks = []
    for _ in range(50):
        c = time.perf_counter()
        assert identity.ensure_keys_current(engine=engine) is None
        checks.append((time.perf_counter() - c) * 1000)
    out.update(
        rebuild_s=round(first.seconds, 1),
        rebuild_records_per_s=round(first.records / first.seconds),
        changed=first.changed,
        keys_added=first.keys_added,
        keys_removed=first.keys_removed,
        longest_lock_ms=round(first.longest_lock_seconds * 1000, 1),
        second_run_s=round(second.seconds, 1),
        second_run_changed=second.changed,
        startup_check_ms_median=round(statistics.median(checks), 3),
        load_average_1min=round(os.getloadavg()[0], 1),
    )
    print(json.dumps(out, indent=1))
    engine.dispose()


if __name__ == "__main__":
    main()
