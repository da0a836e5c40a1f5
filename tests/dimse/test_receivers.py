"""Several DIMSE receiver processes on one port (settings.dimse_receivers), on both backends.

One node per backend for the module: the serving process's SCP and two receiver processes
(spawned, as `scanonce serve` does). On PostgreSQL + S3 (a database cloned from the migrated
template, a bucket on the moto server) each receiver writes the index itself; on the embedded
default (SQLite + local folder) the receivers hand their parsed instances to the serving
process's one writer (`broker.dimse.handoff`). The kernel spreads connections over the three
listeners by a hash of their addresses, so each test opens many associations and checks,
through the guards' shared counts, that the receivers served some of them.

Slow by nature: each node's setup spawns two receiver processes, each importing the broker
(~6-20 s on a loaded 2-core machine), and the kill test waits for a replacement to start the
same way; the other tests reuse that node.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from broker.app import build_receiver_state, build_state
from broker.audit import service as audit_service
from broker.audit.models import AuditEvent
from broker.demo import synth
from broker.deps import AppState
from broker.dimse.guards import SharedCounts
from broker.dimse.handoff import RemoteWriter, WriterServer
from broker.dimse.receivers import ReceiverSupervisor
from broker.dimse.scp import ScpHandle, index_batcher, start_scp, stop_scp
from broker.errors import BadRequest
from broker.index.models import Instance
from broker.index.service import IngestBatcher
from broker.settings import Settings
from tests.conftest import PgAdmin, s3_storage_url
from tests.peers import dcmtk
from tests.support import indexed_instance_keys

pytestmark = [pytest.mark.slow]

RECEIVERS = 2
CAP = 12  # connections per address, for the node (above the 9 parallel associations below)


@dataclass
class Cluster:
    state: AppState
    scp: ScpHandle
    supervisor: ReceiverSupervisor
    shared: SharedCounts
    writer: WriterServer | None  # SQLite: the serving process's writer the receivers feed

    @property
    def port(self) -> int:
        return self.scp.port

    def served_by_receivers(self) -> int:
        return sum(self.shared.served(row) for row in range(1, RECEIVERS + 1))


@pytest.fixture(scope="module", params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    backend: dict[str, Any] = {}
    pg_admin: PgAdmin | None = None
    if request.param == "postgres":
        pg_admin = request.getfixturevalue("pg_admin")
        name = pg_admin.new_name("rcv")
        url = pg_admin.create(name, template=request.getfixturevalue("_pg_template"))
        moto_server = request.getfixturevalue("moto_server")
        backend = {"database_url": url, "storage_url": s3_storage_url(moto_server, f"rcv-{os.getpid()}")}
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("receivers"),
        host="127.0.0.1",
        dimse_port=0,
        mllp_port=0,
        dimse_receivers=RECEIVERS,
        dimse_max_connections_per_address=CAP,
        **backend,
    )
    state = build_state(settings)
    shared = SharedCounts(rows=RECEIVERS + 1)
    scp = start_scp(state=state, port=0, shared=shared, row=0)
    # On SQLite, as `scanonce serve` does: the receivers commit through this process's writer.
    writer = None if pg_admin else WriterServer(state=state, batcher=lambda: index_batcher(scp)).start()
    supervisor = ReceiverSupervisor(
        settings=settings, host="127.0.0.1", port=scp.port, count=RECEIVERS, shared=shared,
        build=build_receiver_state, writer=writer.address if writer else None,
    ).start()  # fmt: skip
    try:
        # Spawning imports the broker in each receiver: seconds, more on a loaded machine.
        assert supervisor.wait_listening(120), "the receiver processes did not start listening"
        yield Cluster(state=state, scp=scp, supervisor=supervisor, shared=shared, writer=writer)
    finally:
        supervisor.stop()
        if writer is not None:
            writer.close()
        stop_scp(scp)
        state.engine.dispose()
        if pg_admin is not None:
            pg_admin.drop(name)


def _study(folder: Path, seed: int, instances: int) -> list[Path]:
    patient = synth.generate_patients(seed=seed, count=1)[0]
    datasets = synth.generate_study(
        rng_seed=seed, patient=patient, modality="CT", n_series=1, n_instances_per_series=instances,
        rows=16, cols=16, study_date=date(2022, 1, 1 + seed % 27),
    )  # fmt: skip
    return synth.write_files(datasets, folder)


def _indexed(state: AppState, sop_uids: set[str]) -> list[tuple[str, str, str]]:
    with Session(state.engine) as session:
        rows = session.exec(
            select(Instance.sop_uid, Instance.object_key, Instance.sha256).where(
                col(Instance.sop_uid).in_(sop_uids)
            )
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def _assert_stored(state: AppState, paths: list[Path]) -> None:
    """Every file indexed exactly once, its object in the store whole (its hash as indexed)."""
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    rows = _indexed(state, set(by_uid))
    assert sorted(r[0] for r in rows) == sorted(by_uid)
    for sop_uid, key, sha in rows:
        data = b"".join(state.store.get(key))
        assert hashlib.sha256(data).hexdigest() == sha
        stored, sent = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(by_uid[sop_uid])
        assert stored.SOPInstanceUID == sop_uid and stored.PixelData == sent.PixelData


def test_parallel_storescu_senders_every_instance_indexed_once(cluster: Cluster, tmp_path: Path) -> None:
    # Four senders at once, each a study of its own, each sent by two associations (the second
    # a re-send of the same files: duplicates, acknowledged, not stored twice).
    studies = [_study(tmp_path / f"s{n}", seed=40 + n, instances=12) for n in range(4)]
    served_before = cluster.served_by_receivers()
    handed_before = cluster.writer.handled if cluster.writer else 0
    where = ["-aec", cluster.state.settings.ae_title, "127.0.0.1", str(cluster.port)]

    def send(paths: list[Path]) -> None:
        for _ in range(2):
            dcmtk("storescu", "-aet", "PACS1", *where, *paths)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(send, studies))
    for paths in studies:
        _assert_stored(cluster.state, paths)
    # 8 associations over 3 listeners: all 8 on the serving process is a 1-in-6,561 event.
    assert cluster.served_by_receivers() > served_before
    if cluster.writer is not None:  # SQLite: what the receivers received, they handed over
        assert cluster.writer.handled > handed_before
    # Who stored each study, from where, whichever process received it (on SQLite: recorded by
    # the serving process's writer, in the transaction of the rows).
    with Session(cluster.state.engine) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.subtype == "store")).all()
    for paths in studies:
        study = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
        mine = [e for e in events if e.study_uid == study]
        assert {(e.agent_who, e.source_interface, e.client_address) for e in mine} == {
            ("ae:PACS1", "dimse", "127.0.0.1")
        }
        assert {e.outcome_desc for e in mine} >= {"1 instance(s) stored", "1 instance(s) duplicate"}


def _store(port: int, aet: str, path: Path) -> int:
    ae = AE(ae_title="PACS2")
    ds = pydicom.dcmread(path)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        return -1
    try:
        status = assoc.send_c_store(ds)
        return int(status.get("Status", -1))
    finally:
        assoc.release()


def test_the_same_instance_stored_at_once_by_several_processes_one_copy_all_succeed(
    cluster: Cluster, tmp_path: Path
) -> None:
    (path,) = _study(tmp_path, seed=77, instances=1)
    served = [cluster.shared.served(row) for row in range(RECEIVERS + 1)]
    barrier = threading.Barrier(9)

    def store(_n: int) -> int:
        barrier.wait()
        return _store(cluster.port, cluster.state.settings.ae_title, path)

    with ThreadPoolExecutor(max_workers=9) as pool:
        statuses = list(pool.map(store, range(9)))
    assert statuses == [0x0000] * 9
    _assert_stored(cluster.state, [path])
    # One row and its object, whichever process committed (every copy had the same content key).
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    (key,) = indexed_instance_keys(cluster.state.engine, sop_uid=uid)
    assert cluster.state.store.head(key).size > 0
    # Served by at least two processes (all nine on one of three: 1 in 2,187).
    grew = [cluster.shared.served(row) > served[row] for row in range(RECEIVERS + 1)]
    assert sum(grew) >= 2


def test_a_receiver_killed_mid_run_is_restarted_and_loses_nothing_acknowledged(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Senders behave as a PACS does: a store not acknowledged (the association dropped) is
    sent again on a new association. One receiver is SIGKILLed while it holds a connection."""
    files = [_study(tmp_path / f"k{n}", seed=60 + n, instances=15) for n in range(4)]
    acknowledged: set[Path] = set()
    lock = threading.Lock()
    aet = cluster.state.settings.ae_title

    def sender(paths: list[Path]) -> None:
        todo = list(paths)
        attempts = 0
        while todo and attempts < 50:
            attempts += 1
            ae = AE(ae_title="PACS3")
            for p in todo[:5]:
                ds0 = pydicom.dcmread(p, stop_before_pixels=True)
                ae.add_requested_context(ds0.SOPClassUID, ds0.file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", cluster.port, ae_title=aet)
            if not assoc.is_established:
                continue
            for p in todo[:5]:
                try:
                    status: Any = assoc.send_c_store(pydicom.dcmread(p)) if assoc.is_established else None
                except RuntimeError:  # the association died between the check and the send
                    status = None
                if status is not None and status.get("Status") == 0:  # none: aborted
                    with lock:
                        acknowledged.add(p)
            if assoc.is_established:
                assoc.release()
            todo = [p for p in todo if p not in acknowledged]

    old = cluster.supervisor.pids()
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(sender, paths) for paths in files]
        # The victim: the first receiver seen holding a connection.
        victim = None
        while victim is None and not all(f.done() for f in futures):
            victim = next((r for r in old if cluster.shared.open_on(r) > 0), None)
            if victim is None:
                threading.Event().wait(0.005)  # polls the shared counts; no fixed sleep
        if victim is not None:
            os.kill(old[victim], signal.SIGKILL)
        for f in futures:
            f.result()
    assert victim is not None, "no receiver held a connection during the run"
    # Restarted: a new process in its row, listening on the port. The senders may finish before
    # the supervisor has seen the death: until then its row still names the dead process, whose
    # shared "listening" mark would satisfy wait_listening at once.
    deadline = time.monotonic() + 120
    while cluster.supervisor.pids().get(victim) in (None, old[victim]):
        assert time.monotonic() < deadline, "the killed receiver was not replaced"
        time.sleep(0.05)
    assert cluster.supervisor.wait_listening(120)
    everything = [p for paths in files for p in paths]
    assert acknowledged == set(everything)
    # Every object hashes as indexed: this test found stray NUL bytes written into spool files
    # through a closed pipe's reused descriptor (broker.dicom.reactor._Pipe).
    _assert_stored(cluster.state, everything)
    # And it keeps serving.
    (extra,) = _study(tmp_path / "after", seed=99, instances=1)
    assert _store(cluster.port, aet, extra) == 0x0000
    # Every process appended its stores to the one audit chain (taking turns on its head row),
    # the killed one included: unbroken.
    verified = audit_service.verify(engine=cluster.state.engine)
    assert verified.ok, verified.problem


def test_the_per_address_cap_holds_for_all_processes_together(cluster: Cluster) -> None:
    """CAP connections from one address, spread by the kernel over the three processes, fill
    the node's cap: the next ones are closed at once, whichever process accepts them."""
    shared = cluster.shared
    held = [socket.create_connection(("127.0.0.1", cluster.port)) for _ in range(CAP)]
    extra: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while shared.at_address("127.0.0.1") < CAP and time.monotonic() < deadline:
            threading.Event().wait(0.01)  # polls the shared counts until all are admitted
        assert shared.at_address("127.0.0.1") == CAP
        assert sum(1 for row in range(RECEIVERS + 1) if shared.open_on(row) > 0) >= 2
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", cluster.port))
            extra.append(s)
            s.settimeout(10)
            with contextlib.suppress(ConnectionResetError):  # closed, before any A-ASSOCIATE
                assert s.recv(1) == b""
        assert shared.at_address("127.0.0.1") == CAP
    finally:
        for s in held + extra:
            s.close()
    deadline = time.monotonic() + 30
    while shared.at_address("127.0.0.1") and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert shared.at_address("127.0.0.1") == 0


def test_a_receiver_flags_reads_made_under_break_the_glass_as_the_serving_process_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver serves C-FIND and C-MOVE too (the kernel picks the listener): their audit
    events must be marked BTG under a grant there as well, so it wires the consent marker in."""
    settings = Settings(data_dir=tmp_path, mllp_port=0)
    build_state(settings).engine.dispose()  # what the serving process does first: migrate
    monkeypatch.setattr(audit_service, "_marker", None)
    state = build_receiver_state(settings)
    try:
        assert audit_service._marker is not None
    finally:
        state.engine.dispose()


def test_a_receiver_whose_writer_is_gone_refuses_with_a700_and_acknowledges_nothing(tmp_path: Path) -> None:
    """On SQLite, a receiver's C-STOREs commit in the serving process: with that writer gone
    (the serving process killed), a C-STORE fails with 0xA700, so the SCU keeps it and retries,
    and nothing of it is left behind. Both ends run in this process here (no spawn needed)."""
    settings = Settings(data_dir=tmp_path / "data", mllp_port=0)
    state = build_state(settings)
    batcher = IngestBatcher()
    writer = WriterServer(state=state, batcher=lambda: batcher).start()
    receiver = start_scp(state=state, host="127.0.0.1", port=0, ingest=RemoteWriter(writer.address))
    first, second = _study(tmp_path / "s", seed=81, instances=2)
    try:
        assert _store(receiver.port, settings.ae_title, first) == 0x0000
        _assert_stored(state, [first])
        writer.close()  # the receiver's pooled connection breaks, and nothing listens any more
        assert _store(receiver.port, settings.ae_title, second) == 0xA700
        uid = pydicom.dcmread(second, stop_before_pixels=True).SOPInstanceUID
        assert _indexed(state, {uid}) == []
        assert list((settings.data_dir / "spool").glob("*.dcm")) == []
    finally:
        stop_scp(receiver)
        batcher.close()
        state.engine.dispose()


class _FailingBatcher(IngestBatcher):
    """The writer's commit meets `fault` (a fault injected at the one place a real one strikes)."""

    def __init__(self, fault: Exception) -> None:
        super().__init__()
        self.fault = fault

    def ingest_parsed(self, **_: Any) -> Any:
        raise self.fault


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        # A driver's error quotes the statement's parameters: patient data, and it may not pickle.
        (
            OperationalError(
                "INSERT INTO instance ...", {"name": "DOE^SECRETNAME"}, Exception("disk I/O error")
            ),
            0xA700,
        ),
        (BadRequest("SOP Instance UID is not a valid UID"), 0xC000),
        (KeyError("SECRETNAME"), 0xC001),
    ],
)
def test_a_failure_in_the_writer_reaches_the_receivers_scu_as_the_status_the_server_would_send(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: Exception, status: int
) -> None:
    """A C-STORE committed through the serving process's writer gets the status the serving
    process gives its own C-STOREs for the same failure, and no log line quotes the driver's
    parameters."""
    settings = Settings(data_dir=tmp_path / "data", mllp_port=0)
    state = build_state(settings)
    batcher = _FailingBatcher(fault)
    writer = WriterServer(state=state, batcher=lambda: batcher).start()
    receiver = start_scp(state=state, host="127.0.0.1", port=0, ingest=RemoteWriter(writer.address))
    (path,) = _study(tmp_path / "s", seed=82, instances=1)
    try:
        assert _store(receiver.port, settings.ae_title, path) == status
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert _indexed(state, {uid}) == []
        assert "SECRETNAME" not in caplog.text
    finally:
        stop_scp(receiver)
        writer.close()
        batcher.close()
        state.engine.dispose()
