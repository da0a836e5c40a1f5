"""`scanonce verify` throughput, side by side with its floor: `sha256sum` (coreutils) over the same
object files, in one run. verify reads every object back and hashes it, plus one index query and
one store listing; the ratio says what the rest costs.

    .venv/bin/python -m bench.verify --instances 1000 --size 512 --runs 3

SQLite + local folder (the embedded default) in a temporary directory; the objects are 512x512
CT slices (512 KiB) by default. Medians of `--runs`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.synthdata import bulk_instances
from broker.app import build_state
from broker.index import verify as integrity
from broker.index.service import ingest_files
from broker.security.schemas import Principal, Role
from broker.settings import Settings


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each CT slice")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        root = Path(tmp)
        state = build_state(Settings(data_dir=root / "broker", mllp_port=0))
        admin = Principal(who="bench", role=Role.admin, facility="local")
        files = root / "in"
        files.mkdir()
        paths = []
        for i, data in enumerate(
            bulk_instances(
                seed=7,
                n_studies=1,
                series_per_study=1,
                instances_per_series=args.instances,
                rows=args.size,
                cols=args.size,
            )  # fmt: skip
        ):
            path = files / f"{i}.dcm"
            path.write_bytes(data)
            paths.append(str(path))
        for start in range(0, len(paths), 100):
            outcomes = ingest_files(
                engine=state.engine, store=state.store, principal=admin, facility_id="local",
                paths=paths[start : start + 100],
            )  # fmt: skip
            assert all(o.status == "stored" for o in outcomes)
        objects = sorted(str(p) for p in (root / "broker" / "objects").rglob("*.dcm"))
        total_bytes = sum(Path(p).stat().st_size for p in objects)
        verify_s, floor_s = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            report = integrity.verify(engine=state.engine, store=state.store, min_age=0)
            verify_s.append(time.perf_counter() - t)
            assert report.clean and report.checked == args.instances
            t = time.perf_counter()
            subprocess.run(["sha256sum", *objects], check=True, stdout=subprocess.DEVNULL)
            floor_s.append(time.perf_counter() - t)
        state.engine.dispose()
    v, f = statistics.median(verify_s), statistics.median(floor_s)
    mb = total_bytes / 1e6
    print(f"{args.instances} instances, {mb:.0f} MB, SQLite + local folder, median of {args.runs}")
    print("| what | seconds | instances/s | MB/s |")
    print("| --- | --- | --- | --- |")
    print(f"| scanonce verify | {v:.2f} | {args.instances / v:.0f} | {mb / v:.0f} |")
    print(f"| sha256sum (floor, one process) | {f:.2f} | {args.instances / f:.0f} | {mb / f:.0f} |")
    print(f"ratio verify / sha256sum: {v / f:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
