"""What the fleet-wide replay check costs a CDS Hooks call: `Verifier._once` for a new `jti`
(one INSERT ... ON CONFLICT ... RETURNING in its own transaction) on SQLite (synchronous=FULL, the
embedded default) and PostgreSQL (the local server, a fresh database; its commit does not wait
for the WAL flush, and the same statement with a durable commit is measured beside it), against
the per-process check it replaces (a dict). Also a replayed jti seen by this process (answered
from memory) and one seen only by another node (answered by the database). The variants are
interleaved, one call each in turn, so that a machine's changing load hits them alike.

    python -m bench.token_replay [--n 500] [--pg postgresql+psycopg://127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from joserfc.jwk import ECKey
from sqlalchemy import text

from broker.db import make_engine, migrate
from broker.security.service import claim_token_id
from broker.security.tokens import TokenInvalid, Verifier
from broker.settings import Settings


def _ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    with contextlib.suppress(TokenInvalid):
        fn()
    return (time.perf_counter() - t0) * 1000


def _row(name: str, ms: list[float]) -> None:
    ms = sorted(ms)
    p95 = ms[int(len(ms) * 0.95) - 1]
    print(f"| {name} | {statistics.median(ms):.3f} | {p95:.3f} |")


def _measure(label: str, url: str, settings: Settings, key: ECKey, n: int) -> None:
    engine = make_engine(url)
    migrate(engine)
    memory = Verifier(settings=settings, signing_key=key)
    node_a = Verifier(settings=settings, signing_key=key, engine=engine)
    node_b = Verifier(settings=settings, signing_key=key, engine=engine)
    rows: dict[str, list[float]] = {}
    exp = int(time.time()) + 300
    for _ in range(n):
        jti = secrets.token_hex(8)
        timed: dict[str, Callable[[], object]] = {
            "per process only (before)": lambda: memory._once(secrets.token_hex(8), exp),
            "new jti": partial(node_a._once, jti, exp),
            "replay to the same node": partial(node_a._once, jti, exp),
            "replay to another node": partial(node_b._once, jti, exp),
        }
        if engine.dialect.name == "postgresql":
            timed["new jti, durable commit"] = partial(
                claim_token_id, engine=engine, key=secrets.token_hex(16), expires_at=exp, wait_for_flush=True
            )
        for name, fn in timed.items():
            rows.setdefault(name, []).append(_ms(fn))
    for name, ms in rows.items():
        _row(f"{label}: {name}", ms)
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--pg", default="postgresql+psycopg://127.0.0.1/test")
    args = ap.parse_args()
    key = ECKey.generate_key("P-256", auto_kid=True)
    print("| check | median ms | p95 ms |\n| --- | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        _measure("SQLite", f"sqlite:///{tmp}/index.sqlite3", settings, key, args.n)
        admin = make_engine(args.pg, connect_timeout=3)
        name = f"bench_replay_{secrets.token_hex(4)}"
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            _measure(
                "PostgreSQL", admin.url.set(database=name).render_as_string(False), settings, key, args.n
            )
        finally:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


if __name__ == "__main__":
    main()
