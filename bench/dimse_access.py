"""What the DIMSE access rules cost per association, side by side with Orthanc, in one run.

Each target gets the same workload: N associations in a row from a pynetdicom SCU, each
association + one C-ECHO + release, timed from the connect to the release's end (the cost a
PACS pays per association: AE title and network checked against the registry, the policy asked
for the C-ECHO). Targets, all on loopback, each with its own fresh data folder:

- ScanOnce, open mode (any calling AE: the loopback development default);
- ScanOnce, closed: the calling AE registered to a facility with its network (the allow-list);
- ScanOnce, closed and DICOM TLS with client certificates (mutual TLS; certificates made here);
- Orthanc (Debian package, tests.peers.orthanc: TcpNoDelay on), calling AE registered as a
  modality, DicomCheckCalledAet as configured there.

    .venv/bin/python -m bench.dimse_access [--n 300]

Prints medians and p95 in milliseconds, and each target's ratio to Orthanc's median.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # noqa: E402
from sqlmodel import Session  # noqa: E402

from broker.app import build_state  # noqa: E402
from broker.dimse.scp import start_scp, stop_scp  # noqa: E402
from broker.facilities import service as facilities  # noqa: E402
from broker.security.service import system_principal  # noqa: E402
from broker.settings import Settings  # noqa: E402
from tests.peers import LOOPBACK, orthanc  # noqa: E402
from tests.pki import make_pki  # noqa: E402

CLIENT_AET = "BENCHSCU"


@contextlib.contextmanager
def scanonce(work: Path, *, open_mode: bool, tls: dict[str, Path] | None = None) -> Iterator[tuple[str, int]]:
    extra: dict[str, Any] = {}
    if tls:
        extra = {
            "dimse_tls_cert_file": tls["server_crt"],
            "dimse_tls_key_file": tls["server_key"],
            "dimse_tls_ca_file": tls["ca"],
        }
    settings = Settings(data_dir=work, host=LOOPBACK, dimse_port=0, dimse_open_mode=open_mode, **extra)
    state = build_state(settings)
    if not open_mode:
        with Session(state.engine) as session:
            facilities.add_facility(
                session=session,
                principal=system_principal(who="bench", facility="local"),
                facility_id="benchpacs",
                issuer="BENCHPACS",
                calling_ae_titles=[(CLIENT_AET, "127.0.0.0/8")],
            )
    scp = start_scp(state=state, port=0)
    try:
        yield settings.ae_title, scp.port
    finally:
        stop_scp(scp)
        state.engine.dispose()


def timed_echoes(aet: str, port: int, n: int, *, tls: dict[str, Path] | None = None) -> list[float]:
    ae = AE(ae_title=CLIENT_AET)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    kwargs: dict[str, Any] = {}
    if tls:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls["ca"]))
        context.load_cert_chain(str(tls["client_crt"]), str(tls["client_key"]))
        kwargs["tls_args"] = (context, LOOPBACK)
    times: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        assoc = ae.associate(LOOPBACK, port, ae_title=aet, **kwargs)
        if not assoc.is_established:
            raise RuntimeError(f"association to {aet}:{port} refused")
        status = assoc.send_c_echo()
        assoc.release()
        times.append(time.perf_counter() - start)
        if status.Status != 0:
            raise RuntimeError(f"C-ECHO status {status.Status:#06x}")
    return times


def _row(name: str, times: Sequence[float], reference: float | None) -> str:
    ms = sorted(t * 1000 for t in times)
    p50 = statistics.median(ms)
    p95 = ms[int(0.95 * (len(ms) - 1))]
    ratio = f"{p50 / reference:.2f}" if reference else "1.00"
    return f"| {name} | {len(ms)} | {p50:.2f} | {p95:.2f} | {ratio} |"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="associations per target")
    args = parser.parse_args(argv)
    os.environ.setdefault("TCP_NODELAY", "1")  # Orthanc's dcmtk: no Nagle, as ScanOnce's SCP
    results: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="scanonce-bench-access-") as tmp:
        work = Path(tmp)
        certs_dir = work / "pki"
        certs_dir.mkdir()
        certs = make_pki(certs_dir, {"server": (True, True), "client": (True, False)})
        with orthanc(work / "orthanc", aet="BENCH", modalities={"pacs": [CLIENT_AET, LOOPBACK, 104]}) as peer:
            timed_echoes(peer.aet, peer.dicom_port, 5)  # warm-up
            results.append(("Orthanc (modality registered)", timed_echoes(peer.aet, peer.dicom_port, args.n)))
        runs: list[tuple[str, Callable[[], Any], dict[str, Path] | None]] = [
            ("ScanOnce open mode", lambda: scanonce(work / "open", open_mode=True), None),
            ("ScanOnce AE + network allow-list", lambda: scanonce(work / "closed", open_mode=False), None),
            (
                "ScanOnce allow-list + mutual TLS",
                lambda: scanonce(work / "tls", open_mode=False, tls=certs),
                certs,
            ),
        ]
        for name, start, tls in runs:
            with start() as (aet, port):
                timed_echoes(aet, port, 5, tls=tls)
                results.append((name, timed_echoes(aet, port, args.n, tls=tls)))
    reference = statistics.median(t * 1000 for t in results[0][1])
    print(f"associate + C-ECHO + release, {args.n} in a row per target, loopback, {os.cpu_count()} cores")
    print("| target | n | median ms | p95 ms | median / Orthanc |")
    print("| --- | --- | --- | --- | --- |")
    for name, times in results:
        print(_row(name, times, reference if name != results[0][0] else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
