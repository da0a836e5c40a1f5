"""Proof on this machine (issue 17, item 6): three `scanonce serve` nodes as real processes on one
PostgreSQL database and one S3 bucket (moto's server behind a fault relay), HAProxy in front with
health checks on /readyz, concurrent clients doing STOW-RS, C-STORE, QIDO-RS, WADO-RS and prior
lookups through it, and a fault while they run: a node killed with SIGKILL, every database
connection cut, the object store refusing, then stalling.

After each fault: every acknowledged instance is retrieved byte-identical through the balancer,
every instance the index shows is whole in the bucket, and no client saw a 5xx other than the
503 that says "try again" while the fault lasted.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.cluster.harness import Cluster
from tests.cluster.load import Ledger, Load, Verdict, check_cluster
from tests.support import auth_headers

pytestmark = [pytest.mark.postgres, pytest.mark.cluster, pytest.mark.timeout(240)]

# Seconds of load around each fault: enough for every operation to run several times on each
# node (the assertions are on outcomes, never on these durations).
BEFORE, DURING, AFTER = 1.5, 2.5, 2.0
# Answers that are a failure but an honest one during a fault: 503 (HTTP), A700/A702 (DIMSE out
# of resources), an association the balancer could not place (no node up yet) or a node that
# died under it (the client knows it was not acknowledged).
HONEST = {"503", "0xA700", "0xA702", "0xA7FF", "abort"}


STEPS_WORKER = Path(__file__).resolve().parents[1] / "jobs" / "steps_worker.py"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # The workers are `scanonce worker` with one extra job kind (tests/jobs/steps_worker.py), so
    # that a job can be killed mid-way at a known step; a short lease lets it be taken over soon.
    c = Cluster(
        nodes_wanted=3,
        workers_wanted=2,
        worker_argv=[sys.executable, str(STEPS_WORKER), "worker"],
        extra_env={"SCANONCE_JOB_LEASE_SECONDS": "2", "SCANONCE_JOB_MAX_ATTEMPTS": "3"},
    ).start()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    """What every client sent and what was acknowledged, over all the faults of the module: a
    later fault must not lose what an earlier one let through either."""
    return Ledger()


@pytest.fixture
def load(cluster: Cluster, ledger: Ledger) -> Iterator[Load]:
    ledger.new_round()
    load = Load(cluster, clients=5, ledger=ledger)
    if not ledger.studies:
        load.seed_studies()
    yield load
    load.stop()


def _assert_promise_kept(cluster: Cluster, load: Load, *, what: str) -> Verdict:
    # Whatever the fault was, the cluster must be whole again before the books are checked.
    for node in cluster.nodes:
        cluster.wait_ready(node, timeout=30)
    with ThreadPoolExecutor(1) as pool:
        # `scanonce verify` (a process: its start-up is mostly imports) runs beside our own check.
        verifying = pool.submit(cluster.verify)
        verdict = check_cluster(cluster, load.ledger)
        verified = verifying.result()
    logs = "\n".join(f"--- {name}\n{tail}" for name, tail in cluster.logs())
    assert verdict.acknowledged > 0, f"{what}: nothing was acknowledged at all\n{logs}"
    assert not verdict.lost, f"{what}: acknowledged instances lost: {verdict.lost[:10]}\n{logs}"
    assert not verdict.half_stored, f"{what}: half-stored instances visible: {verdict.half_stored[:10]}"
    assert not verdict.unknown_visible, f"{what}: instances nobody sent: {verdict.unknown_visible[:10]}"
    if verified is not None:
        # Orphans (an object stored whose row never committed: that request failed and said so)
        # are residue the reaper removes; an object missing or changed is a broken promise.
        assert verified.returncode == 0 or " 0 missing, 0 mismatched;" in verified.stdout, (
            f"{what}: scanonce verify is not clean:\n{verified.stdout}{verified.stderr}"
        )
    for op in ("qido", "wado", "priors", "stow", "cstore"):
        assert load.ledger.outcomes[op].get("200", 0) + load.ledger.outcomes[op].get("0x0000", 0) > 0, (
            f"{what}: no {op} succeeded: {dict(load.ledger.outcomes[op])}"
        )
    return verdict


def _report(fault: str, verdict: Verdict, load: Load) -> None:
    """One line of the fault matrix in docs/production.md (shown with `pytest -s`)."""
    answers = {op: dict(load.ledger.outcomes[op]) for op in sorted(load.ledger.outcomes)}
    print(
        f"\n| {fault} | {verdict.attempted} | {verdict.acknowledged} | {verdict.verified} | "
        f"{len(verdict.lost)} | {len(verdict.half_stored)} | {verdict.orphans} | {answers} |"
    )


def _odd_answers(load: Load) -> list[tuple[str, str]]:
    return [(op, status) for op, status, _t in load.ledger.odd if status not in HONEST]


def test_nodes_started_together_share_one_database_without_racing(cluster: Cluster) -> None:
    """Three nodes started at the same instant on a fresh database: all ready, one default
    facility, and the start-up jobs each queued once (first-start default rows race here)."""
    assert len(cluster.first_start_seconds) == 3
    with cluster.db.connect() as conn:  # type: ignore[union-attr]
        facilities = conn.execute("SELECT id FROM facility").fetchall()
        dup_jobs = conn.execute(
            "SELECT kind, key, count(*) FROM job WHERE status IN ('queued', 'running') "
            "GROUP BY kind, key HAVING count(*) > 1"
        ).fetchall()
    assert facilities == [("local",)]
    assert dup_jobs == []
    r = httpx.get(f"{cluster.url}/dicom-web/studies", headers=auth_headers("admin"), timeout=10)
    assert r.status_code in (200, 204)


def test_kill_one_node_loses_nothing_acknowledged(cluster: Cluster, load: Load) -> None:
    load.start()
    time.sleep(BEFORE)
    cluster.kill_node(1)
    time.sleep(DURING)
    ready_in = cluster.restart_node(1)
    time.sleep(AFTER)
    load.stop()
    verdict = _assert_promise_kept(cluster, load, what="kill -9 of a node")
    # Requests the dead node never answered were resent by the balancer (STOW-RS is idempotent);
    # one it was answering when it died reaches its client as an incomplete answer (a 502 from
    # the balancer or a cut association), never as a success.
    odd = [
        (op, s)
        for op, s in _odd_answers(load)
        if s not in ("502", "abort", "truncated", "RemoteProtocolError")
    ]
    logs = "\n".join(f"--- {name}\n{tail}" for name, tail in cluster.logs())
    assert not odd, f"unexpected answers while a node died: {odd}\n{logs}"
    assert ready_in < 60
    _report(f"kill -9 of a node (restarted, ready in {ready_in:.1f} s)", verdict, load)


def test_database_connections_cut_answers_503_then_recovers(cluster: Cluster, load: Load) -> None:
    load.start()
    time.sleep(BEFORE)
    assert cluster.db is not None
    cut = cluster.db.break_connections()
    time.sleep(0.5)
    cut += cluster.db.break_connections()
    time.sleep(DURING)
    load.stop()
    verdict = _assert_promise_kept(cluster, load, what="database connections cut")
    assert cut > 0
    assert not _odd_answers(load), f"a database cut must give 503 at worst: {_odd_answers(load)}"
    _report(f"database sessions cut ({cut})", verdict, load)


@pytest.mark.parametrize("mode", ["refuse", "stall"])
def test_object_store_fault_answers_503_and_nothing_half_stored(
    cluster: Cluster, load: Load, mode: str
) -> None:
    assert cluster.relay is not None
    load.start()
    time.sleep(BEFORE)
    cluster.relay.set_mode(mode)
    try:
        # A stall shorter than a node's patience with the store (read_timeout on the first try
        # and the retry, 2 x 1.5 s here) only slows requests down; a longer one gives 503s.
        time.sleep(DURING + (3.5 if mode == "stall" else 0))
    finally:
        cluster.relay.set_mode("pass")
    time.sleep(AFTER)
    load.stop()
    verdict = _assert_promise_kept(cluster, load, what=f"object store {mode}")
    assert not _odd_answers(load), f"an object store {mode} must give 503 at worst: {_odd_answers(load)}"
    failed_writes = sum(
        n
        for op in ("stow", "cstore")
        for s, n in load.ledger.outcomes[op].items()
        if s not in ("200", "0x0000")
    )
    assert failed_writes > 0, f"the fault did not reach the writers: {dict(load.ledger.outcomes)}"
    _report(f"object store {mode}", verdict, load)


def test_worker_killed_mid_job_is_reclaimed_after_its_lease_and_runs_once(
    cluster: Cluster, load: Load, tmp_path: Path
) -> None:
    """Under the same load: a job stops at a known step in one worker, which is then killed with
    SIGKILL; the other worker takes the job over once the lease (2 s) has run out, resumes from
    the checkpoint, and the job finishes once. The promise holds meanwhile."""
    from sqlalchemy import text

    from broker.db import make_engine
    from broker.jobs import service as jobs

    assert cluster.db is not None and len(cluster.workers) == 2
    engine = make_engine(cluster.db.url)
    log = tmp_path / "steps.log"
    try:
        load.start()
        job = jobs.enqueue(
            engine=engine, kind="test-steps", params={"log": str(log), "steps": 5, "hang_at": 3}
        )
        deadline = time.monotonic() + 60
        while not (log.exists() and "1 hang" in log.read_text()):
            assert time.monotonic() < deadline, "no worker reached the job's step 3"
            time.sleep(0.1)
        with engine.connect() as conn:
            owner = conn.execute(text("SELECT owner FROM job WHERE id = :id"), {"id": job.id}).scalar_one()
        (holder,) = [w for w in cluster.workers if w.popen is not None and f":{w.popen.pid}:" in owner]
        other = next(w for w in cluster.workers if w is not holder)
        holder.kill(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            with engine.connect() as conn:
                status, attempts, owner = conn.execute(
                    text("SELECT status, attempts, owner FROM job WHERE id = :id"), {"id": job.id}
                ).one()
            if status in ("done", "failed"):
                break
            assert time.monotonic() < deadline, f"the job was not taken over: {status}, {attempts} attempts"
            time.sleep(0.1)
        load.stop()
        assert other.popen is not None
        assert (status, attempts) == ("done", 2)
        assert f":{other.popen.pid}:" in owner
        # Steps 0-2 ran once (then the checkpoint), 3-4 on the second attempt, done once.
        assert log.read_text().splitlines() == ["1 0", "1 1", "1 2", "1 hang", "2 3", "2 4", "2 done"]
        verdict = _assert_promise_kept(cluster, load, what="kill -9 of a worker mid-job")
        assert not _odd_answers(load), f"a worker's death must not show to clients: {_odd_answers(load)}"
        _report("kill -9 of a worker mid-job (reclaimed after its 2 s lease, ran once)", verdict, load)
    finally:
        load.stop()
        engine.dispose()
        # The killed worker comes back for whatever test runs next.
        for w in cluster.workers:
            if not w.alive:
                w.start()
        assert os.path.exists(STEPS_WORKER)
