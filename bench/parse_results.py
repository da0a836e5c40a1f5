"""What the serving process pays to receive the parse workers' results (issue 18).

A batch of 100 small instances (the archive benchmark's 16x16 CT, bench.synthdata) written to
files, handed to the parse worker pool as `ingest_files` does, and received back; the serving
process's CPU (`time.process_time`: all its threads, the workers' not included) per instance,
median of many rounds:

- `receive`: submitting the batch and receiving its results (pipe reads, unpickling);
- `unpickle`: `pickle.loads` of the batch's results alone, in this process;
- `rows`: what the writer then makes of one result (`ingest._instance_row`);
- and, for scale, the CPU of one parse (what a worker pays per instance).

    python -m bench.parse_results [--rounds 40] [--batch 100]

Compare two trees by running it with PYTHONPATH=<tree> (it runs on main at 2c790bb too).
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.synthdata import bulk_instances
from broker.dicom.json_model import int_value
from broker.dicom.received import Received
from broker.index import ingest
from broker.index.packing import pack_metadata
from broker.index.parse import parse_instance


def _row(p: Any) -> Any:
    """One result's index row; on trees before `_instance_row` (main at 2c790bb), what that
    loop did per result: four integers read and the JSON packed."""
    row = getattr(ingest, "_instance_row", None)
    if row is not None:
        return row(p, series_pk=1, study_pk=1, facility_id="local", now=None)
    a = p.attrs
    return [int_value(a, tag) for tag in ("00200013", "00280010", "00280011", "00280008")], pack_metadata(
        p.metadata
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths: list[str | Received] = []
        for n, data in enumerate(
            bulk_instances(seed=7, n_studies=args.batch // 10, series_per_study=2, instances_per_series=5)
        ):
            path = Path(tmp) / f"{n}.dcm"
            path.write_bytes(data)
            paths.append(str(path))
        ingest.configure_parsing(processes=1)
        ingest.start_parsing()
        try:
            receive = []
            for _ in range(args.rounds):
                t0 = time.process_time()
                results = ingest._parse_started(paths, None)()
                receive.append((time.process_time() - t0) / len(paths) * 1e6)
            assert not any(isinstance(r, ingest.StoreOutcome) for r in results)
        finally:
            ingest.stop_parsing()
        parse = []
        for _ in range(max(3, args.rounds // 4)):
            t0 = time.process_time()
            parsed = [parse_instance(p) for p in paths]
            parse.append((time.process_time() - t0) / len(paths) * 1e6)
        blob = pickle.dumps(parsed, protocol=pickle.HIGHEST_PROTOCOL)
        unpickle = []
        rows = []
        for _ in range(args.rounds):
            t0 = time.process_time()
            pickle.loads(blob)
            unpickle.append((time.process_time() - t0) / len(paths) * 1e6)
            t0 = time.process_time()
            for p in parsed:
                _row(p)
            rows.append((time.process_time() - t0) / len(paths) * 1e6)
    print(f"batch {len(paths)}, {args.rounds} rounds; serving-process CPU per instance (µs), median:")
    print(f"  (a worker's parse, for scale:      {statistics.median(parse):7.1f})")
    print(f"  receive (submit, pipe, unpickle): {statistics.median(receive):7.1f}")
    print(
        f"  unpickle alone ({len(blob) / len(paths):.0f} B pickled each): {statistics.median(unpickle):7.1f}"
    )
    print(f"  index row of one result:           {statistics.median(rows):7.1f}")


if __name__ == "__main__":
    main()
