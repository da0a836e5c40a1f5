"""The 1 -> 3 node curve: mixed load through HAProxy on 1, 2 and 3 `scanonce serve` nodes.

Each run starts its own cluster (tests/cluster/harness.py: a fresh PostgreSQL database, moto's S3
server behind the pass-through relay, the nodes as subprocesses, HAProxy with /readyz checks),
seeds one study per patient, then runs `--clients` threads cycling through STOW-RS (one new
instance per request), C-STORE (one association per instance), QIDO-RS, WADO-RS (a series) and
prior lookups for `--seconds`. It prints, per node count and operation: operations per second,
median and p95 latency, and errors; the CPU the whole machine spent (all processes: the clients
share the same cores); and the time a killed node takes from exec to /readyz 200.

    python -m bench.cluster --seconds 20 --clients 6 --nodes 1 2 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault(
    "SCANONCE_AUTH_SIGNING_KEY_FILE",
    str(Path(tempfile.mkdtemp(prefix="scanonce-bench-key-")) / "signing-key.json"),
)

from tests.cluster.harness import Cluster  # noqa: E402 - after the signing key is chosen
from tests.cluster.load import OPS, Load, percentile  # noqa: E402


def _cpu_busy() -> tuple[float, float]:
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def run(nodes: int, *, seconds: float, clients: int, restarts: int) -> dict[str, object]:
    cluster = Cluster(nodes_wanted=nodes, workers_wanted=0).start()
    try:
        load = Load(cluster, clients=clients)
        load.seed_studies()
        busy0, total0 = _cpu_busy()
        start = time.monotonic()
        load.start()
        time.sleep(seconds)
        load.stop()
        elapsed = time.monotonic() - start
        busy1, total1 = _cpu_busy()
        rows = {}
        for op in OPS:
            lat = load.ledger.latencies[op]
            outcomes = load.ledger.outcomes[op]
            errors = sum(n for s, n in outcomes.items() if s not in ("200", "0x0000"))
            rows[op] = {
                "per_s": len(lat) / elapsed,
                "p50_ms": statistics.median(lat) * 1000 if lat else float("nan"),
                "p95_ms": percentile(lat, 0.95) * 1000,
                "errors": errors,
            }
        restart_s = []
        for _ in range(restarts):
            cluster.kill_node(0)
            restart_s.append(cluster.restart_node(0))
        return {
            "nodes": nodes,
            "ops": rows,
            "cpu": (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1),
            "restart_s": statistics.median(restart_s) if restart_s else float("nan"),
            "first_start_s": max(cluster.first_start_seconds),
        }
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--restarts", type=int, default=3)
    args = parser.parse_args()
    results = [run(n, seconds=args.seconds, clients=args.clients, restarts=args.restarts) for n in args.nodes]
    print(
        f"\n{args.clients} clients, {args.seconds:.0f} s per run, {os.cpu_count()} cores (clients included)\n"
    )
    print("| nodes | operation | ops/s | p50 ms | p95 ms | errors |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        for op, row in r["ops"].items():  # type: ignore[attr-defined]
            print(
                f"| {r['nodes']} | {op} | {row['per_s']:.1f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} "
                f"| {row['errors']} |"
            )
    print("\n| nodes | all ops/s | cores busy (of 2) | node restart to ready, s (median) | cold start, s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        total = sum(row["per_s"] for row in r["ops"].values())  # type: ignore[attr-defined]
        print(
            f"| {r['nodes']} | {total:.1f} | {r['cpu']:.2f} | {r['restart_s']:.2f} "
            f"| {r['first_start_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
