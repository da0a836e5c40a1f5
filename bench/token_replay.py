"""What the fleet-wide replay check costs a CDS Hooks call: `Verifier._once` for a new `jti`
(one INSERT ... ON CONFLICT ... RETURNING in its own transaction) on SQLite (synchronous=FULL, the
embedded default) and PostgreSQL (the local server, a fresh database), against the per-process
check it replaces (a dict). Also a replayed jti seen by this process (answered from memory) and
one seen only by another node (answered by the database).

    python -m bench.token_replay [--n 500] [--pg postgresql+psycopg://127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from joserfc.jwk import ECKey
from sqlalchemy import text

from broker.db import make_engine, migrate
from broker.security.tokens import TokenInvalid, Verifier
from broker.settings import Settings


def _timed(fn: object, jtis: list[str]) -> list[float]:
    out = []
    for jti in jtis:
        t0 = time.perf_counter()
        with contextlib.suppress(TokenInvalid):
            fn(jti, int(time.time()) + 300)  # type: ignore[operator]
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _row(name: str, ms: list[float]) -> None:
    ms = sorted(ms)
    p95 = ms[int(len(ms) * 0.95) - 1]
    print(f"| {name} | {statistics.median(ms):.3f} | {p95:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--pg", default="postgresql+psycopg://127.0.0.1/test")
    args = ap.parse_args()
    key = ECKey.generate_key("P-256", auto_kid=True)
    print("| check | median ms | p95 ms |\n| --- | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        memory = Verifier(settings=settings, signing_key=key)
        _row("per process only (before)", _timed(memory._once, [secrets.token_hex(8) for _ in range(args.n)]))
        targets = [("SQLite", f"sqlite:///{tmp}/index.sqlite3")]
        admin = make_engine(args.pg, connect_timeout=3)
        name = f"bench_replay_{secrets.token_hex(4)}"
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        targets.append(("PostgreSQL", admin.url.set(database=name).render_as_string(False)))
        try:
            for label, url in targets:
                engine = make_engine(url)
                migrate(engine)
                node_a = Verifier(settings=settings, signing_key=key, engine=engine)
                node_b = Verifier(settings=settings, signing_key=key, engine=engine)
                jtis = [secrets.token_hex(8) for _ in range(args.n)]
                _row(f"{label}: new jti", _timed(node_a._once, jtis))
                _row(f"{label}: replay to the same node", _timed(node_a._once, jtis))
                _row(f"{label}: replay to another node", _timed(node_b._once, jtis))
                engine.dispose()
        finally:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


if __name__ == "__main__":
    main()
