"""Index sync speed: studies indexed per second from a local Orthanc, by QIDO-RS and by C-FIND.

    .venv/bin/python -m bench.federation_sync --studies 10000 [--series 1] [--database-url URL]

Starts one Orthanc (Debian package, DICOMweb plugin) on free loopback ports, loads it with
synthetic studies derived from pydicom's CT_small.dcm (new UIDs, ~3 studies per patient), then
times, each into a fresh index: a first sync by QIDO-RS, a re-sync with nothing changed, and a
first sync by C-FIND. Nothing is mocked: the broker's own code against a real archive.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
from sqlmodel import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.app import build_state  # noqa: E402
from broker.facilities import service as facilities  # noqa: E402
from broker.federation import service  # noqa: E402
from broker.settings import Settings  # noqa: E402
from tests.peers import orthanc  # noqa: E402
from tests.support import ADMIN

CT = Path(pydicom.__path__[0]) / "data" / "test_files" / "CT_small.dcm"
ROOT = "1.2.826.0.1.3680043.8.498.77"


def _instances(n_studies: int, n_series: int) -> list[bytes]:
    base = pydicom.dcmread(CT)
    out = []
    for i in range(n_studies):
        for j in range(n_series):
            ds = base.copy()
            ds.StudyInstanceUID = f"{ROOT}.{i}"
            ds.SeriesInstanceUID = f"{ROOT}.{i}.{j + 1}"
            ds.SOPInstanceUID = f"{ROOT}.{i}.{j + 1}.1"
            ds.PatientID = f"BENCH{i // 3:06d}"
            ds.PatientName = f"Bench^Patient{i // 3}"
            ds.StudyDate = f"20{10 + i % 15:02d}{1 + i % 12:02d}{1 + i % 28:02d}"
            ds.AccessionNumber = f"A{i:08d}"
            buf = io.BytesIO()
            ds.save_as(buf)
            out.append(buf.getvalue())
    return out


def _sync(settings: Settings, facility: dict[str, object]) -> tuple[float, float, int]:
    state = build_state(settings)
    with Session(state.engine) as session:
        facilities.add_facility(session=session, principal=ADMIN, **facility)  # type: ignore[arg-type]
    fid = str(facility["facility_id"])
    first = service.sync_facility(engine=state.engine, store=state.store, facility_id=fid)
    again = service.sync_facility(engine=state.engine, store=state.store, facility_id=fid)
    state.engine.dispose()
    return first.seconds, again.seconds, first.studies_seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--series", type=int, default=1)
    ap.add_argument("--database-url", default=None, help="default: a fresh SQLite file per run")
    args = ap.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp,
        orthanc(Path(tmp) / "orthanc", modalities={"broker": ["SCANONCE", "127.0.0.1", 104]}) as peer,
    ):
        t = time.perf_counter()
        data = _instances(args.studies, args.series)
        with httpx.Client(timeout=60, trust_env=False) as client, ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda b: client.post(f"{peer.url}/instances", content=b).raise_for_status(), data))
        held = len(httpx.get(f"{peer.url}/studies", timeout=60, trust_env=False).json())
        print(f"Orthanc loaded with {held} studies x {args.series} series in {time.perf_counter() - t:.0f}s")
        rows = []
        facilities_to_sync: tuple[tuple[str, dict[str, object]], ...] = (
            ("QIDO-RS", {"facility_id": "web", "issuer": "WEB", "dicomweb_url": peer.dicomweb_url}),
            (
                "C-FIND",
                {
                    "facility_id": "dimse",
                    "issuer": "DIMSE",
                    "ae_title": peer.aet,
                    "host": peer.host,
                    "port": peer.dicom_port,
                },
            ),
        )
        for name, facility in facilities_to_sync:
            run_dir = Path(tmp) / name.replace("-", "")
            settings = Settings(data_dir=run_dir, database_url=args.database_url, migrate_on_start=True)
            first, again, seen = _sync(settings, facility)
            rows.append((name, seen, first, again))
        print("| sync by | studies | first sync (s) | studies/s | re-sync, nothing changed (s) | studies/s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, seen, first, again in rows:
            print(
                f"| {name} | {seen} | {first:.1f} | {seen / first:.0f} | {again:.1f} | {seen / again:.0f} |"
            )


if __name__ == "__main__":
    main()
