"""What "acknowledged means durable" costs: SQLite with synchronous=FULL vs NORMAL, in one run.

Two broker nodes run side by side in this process, each on its own fresh SQLite file and local
object folder; they differ only in the SQLite `synchronous` pragma. Each round sends fresh
instances to one node and then the other (alternating which goes first), over real loopback
connections:

- STOW-RS: one HTTP client, requests of `--per-request` instances (one transaction each);
- C-STORE: dcmtk's storescu, one association (the SCP groups C-STOREs into shared commits).

First the bare cost: the median latency of a small committed transaction under each setting.
The table gives the median instances/s over the rounds and FULL / NORMAL, also as the median
of each round's own ratio (both settings measured back to back, steadier on a shared machine).

    .venv/bin/python -m bench.durability            # ~1 minute
    .venv/bin/python -m bench.durability --rounds 7 --instances 400
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.dicomweb.data import multipart_body  # noqa: E402
from tests.peers import LOOPBACK, _dcmtk_exe, free_port, wait_for_port  # noqa: E402

MODES: tuple[Literal["FULL", "NORMAL"], ...] = ("NORMAL", "FULL")


class _Node:
    """A broker node in this process: HTTP (uvicorn in a thread) and the DIMSE SCP."""

    def __init__(self, work: Path, synchronous: Literal["FULL", "NORMAL"]) -> None:
        import uvicorn

        from broker.app import create_app
        from broker.db import make_engine, migrate
        from broker.deps import AppState
        from broker.dimse.scp import start_scp
        from broker.facilities import service as facilities_service
        from broker.settings import Settings
        from storage import open_store

        self.settings = Settings(
            data_dir=work,
            host=LOOPBACK,
            port=free_port(),
            dimse_port=0,
            mllp_port=0,
            ingest_processes=0,
            auth_enabled=False,  # loopback only: measures durability, not authentication
        )
        engine = make_engine(self.settings.resolved_database_url(), sqlite_synchronous=synchronous)
        migrate(engine)
        facilities_service.ensure_default_facility(engine=engine, settings=self.settings)
        self.state = AppState(
            settings=self.settings, engine=engine, store=open_store(self.settings.resolved_storage_url())
        )
        self.scp = start_scp(state=self.state, port=0)
        config = uvicorn.Config(
            create_app(state=self.state), host=LOOPBACK, port=self.settings.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        wait_for_port(self.settings.port)
        self.url = f"http://{LOOPBACK}:{self.settings.port}"

    def close(self) -> None:
        from broker.dimse.scp import stop_scp

        self.server.should_exit = True
        self._thread.join(10)
        stop_scp(self.scp)
        self.state.engine.dispose()


def _instances(seed: int, n: int) -> list[bytes]:
    from bench.synthdata import bulk_instances

    per_series = 50
    return list(
        bulk_instances(
            seed=seed, n_studies=max(1, n // per_series), series_per_study=1, instances_per_series=per_series
        )
    )[:n]


def stow(node: _Node, data: Sequence[bytes], per_request: int) -> float:
    with httpx.Client(base_url=node.url, timeout=120, trust_env=False) as http:
        bodies = [multipart_body(list(data[i : i + per_request])) for i in range(0, len(data), per_request)]
        started = time.perf_counter()
        for body, ctype in bodies:
            r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
            if r.status_code != 200:
                raise RuntimeError(f"STOW-RS answered {r.status_code}: {r.text[:300]}")
        return len(data) / (time.perf_counter() - started)


def cstore(node: _Node, data: Sequence[bytes], folder: Path) -> float:
    exe = _dcmtk_exe("storescu")
    if exe is None:
        raise RuntimeError("dcmtk's storescu is not installed (apt-get install dcmtk)")
    folder.mkdir(parents=True)
    for i, blob in enumerate(data):
        (folder / f"{i:06d}.dcm").write_bytes(blob)
    cmd = [
        exe,
        "-aet",
        "BENCH",
        "-aec",
        node.settings.ae_title,
        "+sd",
        "-nh",
        LOOPBACK,
        str(node.scp.port),
        str(folder),
    ]
    started = time.perf_counter()
    # dcmtk sets TCP_NODELAY only when asked: otherwise each C-STORE waits for a delayed ACK.
    env = {**os.environ, "TCP_NODELAY": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stdout[-1000:]}{done.stderr[-1000:]}")
    return len(data) / elapsed


def commit_latency(work: Path, synchronous: Literal["FULL", "NORMAL"], commits: int) -> float:
    """Median seconds of one small committed transaction on the index's engine: the cost the
    setting adds to every STOW-RS request and C-STORE batch, free of the rest of ingest."""
    from sqlalchemy import text

    from broker.db import make_engine

    engine = make_engine(
        f"sqlite:///{work / f'commits-{synchronous.lower()}.sqlite3'}", sqlite_synchronous=synchronous
    )
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)"))
        times = []
        for n in range(commits):
            started = time.perf_counter()
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": f"row {n}"})
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        engine.dispose()


def _filesystem(path: Path) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=10).stdout
        fields = out.splitlines()[1].split()
        return f"{fields[1]} ({fields[0]})"
    return "unknown"


@contextlib.contextmanager
def _nodes(work: Path) -> Iterator[dict[str, _Node]]:
    nodes: dict[str, _Node] = {}
    try:
        for mode in MODES:
            nodes[mode] = _Node(work / mode.lower(), mode)
        yield nodes
    finally:
        for node in nodes.values():
            node.close()


def run(*, rounds: int, instances: int, per_request: int, work: Path) -> dict[str, Any]:
    rates: dict[tuple[str, str], list[float]] = {(p, m): [] for p in ("STOW-RS", "C-STORE") for m in MODES}
    for n in range(rounds):
        for mode in MODES if n % 2 == 0 else MODES[::-1]:
            rates.setdefault(("commit", mode), []).append(commit_latency(work, mode, 100))
    with _nodes(work) as nodes:
        seed = 1000
        for n in range(rounds):
            order = MODES if n % 2 == 0 else MODES[::-1]
            for mode in order:
                seed += 1
                rates[("STOW-RS", mode)].append(stow(nodes[mode], _instances(seed, instances), per_request))
                seed += 1
                folder = work / f"cstore-{seed}"
                rates[("C-STORE", mode)].append(cstore(nodes[mode], _instances(seed, instances), folder))
            print(f"round {n + 1}/{rounds} done", file=sys.stderr)
    return {f"{p} {m}": v for (p, m), v in rates.items()}


def render(result: dict[str, list[float]], *, rounds: int, instances: int, per_request: int, fs: str) -> str:
    lines = [
        f"SQLite synchronous=FULL vs NORMAL: median of {rounds} rounds, {instances} fresh 16x16 CT instances "
        f"per round and protocol; STOW-RS {per_request} instances per request, C-STORE one storescu "
        f"association; filesystem {fs}; {os.cpu_count()} cores.",
        "",
        "| protocol | NORMAL inst/s (min-max) | FULL inst/s (min-max) | FULL / NORMAL | same, per round |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    normal_ms = statistics.median(result["commit NORMAL"]) * 1000
    full_ms = statistics.median(result["commit FULL"]) * 1000
    lines.insert(
        1,
        f"\nOne small committed transaction: NORMAL {normal_ms:.2f} ms, FULL {full_ms:.2f} ms "
        f"(median of {rounds} x 100 commits).",
    )
    for protocol in ("STOW-RS", "C-STORE"):
        normal, full = result[f"{protocol} NORMAL"], result[f"{protocol} FULL"]
        ratio = statistics.median(full) / statistics.median(normal)
        # Each round measures both settings back to back: on a shared machine whose load drifts,
        # the median of the rounds' own ratios is the steadier figure.
        paired = statistics.median(f / n for f, n in zip(full, normal, strict=True))
        lines.append(f"| {protocol} | {cell(normal)} | {cell(full)} | {ratio:.2f} | {paired:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instances", type=int, default=200, help="instances per round and protocol")
    parser.add_argument("--per-request", type=int, default=5, help="instances per STOW-RS request")
    parser.add_argument(
        "--work", type=Path, default=None, help="where the nodes keep their data (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scanonce-durability-", dir=args.work) as tmp:
        work = Path(tmp)
        result = run(rounds=args.rounds, instances=args.instances, per_request=args.per_request, work=work)
        print(
            render(
                result,
                rounds=args.rounds,
                instances=args.instances,
                per_request=args.per_request,
                fs=_filesystem(work),
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
