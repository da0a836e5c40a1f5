"""Concurrent clients through the balancer: STOW-RS, C-STORE, QIDO-RS, WADO-RS and prior lookups.

Every instance a client sends gets fresh UIDs; the ledger remembers what was sent (its SHA-256)
and whether the broker acknowledged it (STOW-RS 200/202 naming it in ReferencedSOPSequence,
C-STORE status 0x0000). `check_cluster` then holds the broker to its promise: every acknowledged
instance is retrievable byte-identical, and every instance the index shows is whole.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.cluster.harness import Cluster
from tests.support import auth_headers, make_ds

OPS = ("stow", "cstore", "qido", "wado", "priors")
PATIENTS = [f"PCL{i}" for i in range(6)]


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dataset_body(data: bytes) -> bytes:
    """A Part 10 object's data set after its preamble and File Meta group: what a C-STORE carries,
    so what must come back byte-identical from an instance stored over DIMSE."""
    meta_len = int.from_bytes(data[140:144], "little")  # (0002,0000) UL: 132 + tag 4 + VR 2 + len 2
    return data[144 + meta_len :]


def encoded_body(ds: Dataset) -> bytes:
    """The data set as pynetdicom sends it in Explicit VR Little Endian (no File Meta)."""
    from pynetdicom.dsutils import encode

    data = encode(ds, False, True)
    assert data is not None
    return data


@dataclass
class Sent:
    sop: str
    study: str
    series: str
    via: str  # stow | cstore
    digest: str  # SHA-256 of the Part 10 bytes (stow) or of the data set body (cstore)
    acked: bool = False
    retrieved: bool = False  # already retrieved byte-identical through the balancer once


@dataclass
class Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: dict[str, Sent] = field(default_factory=dict)
    # op -> status (HTTP code or DIMSE status/"abort"/exception name) -> count
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # (op, status, monotonic time) of every answer that is neither success nor 503
    odd: list[tuple[str, str, float]] = field(default_factory=list)
    studies: list[tuple[str, str]] = field(default_factory=list)  # acknowledged (study, series)

    def record(self, op: str, status: str, seconds: float, ok: bool) -> None:
        with self.lock:
            self.outcomes[op][status] += 1
            if ok:
                self.latencies[op].append(seconds)
            elif status not in ("503", "0xA700", "0xA702", "0xA7FF"):
                self.odd.append((op, status, time.monotonic()))

    def new_round(self) -> None:
        """Forget the answers counted so far (what was sent, and acknowledged, is kept: a later
        fault must not lose it either)."""
        with self.lock:
            self.outcomes.clear()
            self.latencies.clear()
            self.odd.clear()

    def acked(self) -> list[Sent]:
        with self.lock:
            return [s for s in self.sent.values() if s.acked]

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return len(self.sent), sum(1 for s in self.sent.values() if s.acked)


class Load:
    """`clients` threads, each cycling through OPS against the balancer until stop()."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        clients: int = 5,
        ops: tuple[str, ...] = OPS,
        seed: int = 7,
        ledger: Ledger | None = None,
    ) -> None:
        self.cluster = cluster
        self.ledger = ledger or Ledger()
        self.clients = clients
        self.ops = ops
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rng = random.Random(seed)
        self._headers = auth_headers("admin")
        self._counter = itertools.count()

    # -- running ----------------------------------------------------------------------

    def seed_studies(self) -> None:
        """One acknowledged study per patient before the load, so that reads have targets."""
        with httpx.Client(base_url=self.cluster.url, headers=self._headers, timeout=30) as client:
            for pid in PATIENTS:
                for _ in range(10):
                    status = self._stow(client, pid)
                    if status == "200":
                        break
                    time.sleep(0.5)
                else:
                    raise RuntimeError(f"could not seed the cluster: STOW-RS answered {status}")

    def start(self) -> Load:
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i,), name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        self._threads.clear()
        self._stop.clear()

    def _run(self, i: int) -> None:
        ops = list(self.ops)
        rng = random.Random(i)
        rng.shuffle(ops)
        with httpx.Client(base_url=self.cluster.url, headers=self._headers, timeout=30) as client:
            for n in itertools.count():
                if self._stop.is_set():
                    return
                op = ops[n % len(ops)]
                start = time.monotonic()
                try:
                    status = getattr(self, f"_{op}")(client, rng.choice(PATIENTS))
                except (httpx.HTTPError, OSError) as exc:
                    status = type(exc).__name__
                ok = status in ("200", "0x0000")
                self.ledger.record(op, status, time.monotonic() - start, ok)
                if not ok:
                    time.sleep(0.05)  # a client backs off a little before its next request

    # -- operations (each returns its status as text) -----------------------------------

    def _new_instance(self, pid: str) -> Dataset:
        n = next(self._counter)
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        return make_ds(
            sop=sop, study=study, series=series, pid=pid, name=f"CLUSTER^{pid}", accession=f"CL{n}",
            description="CT HEAD", instance_number=1,
        )  # fmt: skip

    def _stow(self, client: httpx.Client, pid: str) -> str:
        ds = self._new_instance(pid)
        data = part10(ds)
        sent = Sent(ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, "stow", _sha(data))
        with self.ledger.lock:
            self.ledger.sent[sent.sop] = sent
        boundary = f"cl{next(self._counter)}"
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode()
        )  # fmt: skip
        r = client.post(
            "/dicom-web/studies",
            content=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
            },
        )
        if r.status_code in (200, 202):
            referenced = r.json().get("00081199", {}).get("Value", [])
            if any(item["00081155"]["Value"][0] == sent.sop for item in referenced):
                with self.ledger.lock:
                    sent.acked = True
                    self.ledger.studies.append((sent.study, sent.series))
        return str(r.status_code)

    def _cstore(self, _client: httpx.Client, pid: str) -> str:
        from pynetdicom import AE

        ds = self._new_instance(pid)
        sent = Sent(
            ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, "cstore", _sha(encoded_body(ds))
        )
        with self.ledger.lock:
            self.ledger.sent[sent.sop] = sent
        ae = AE(ae_title="CLUSTERSCU")
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        assoc = ae.associate("127.0.0.1", self.cluster.dimse_port, ae_title="SCANONCE")
        if not assoc.is_established:
            return "rejected" if assoc.is_rejected else "abort"
        try:
            status = assoc.send_c_store(ds)
        finally:
            if assoc.is_established:
                assoc.release()
        if not status or "Status" not in status:
            return "abort"
        code = f"0x{int(status.Status):04X}"
        if code == "0x0000":
            with self.ledger.lock:
                sent.acked = True
                self.ledger.studies.append((sent.study, sent.series))
        return code

    def _qido(self, client: httpx.Client, pid: str) -> str:
        r = client.get("/dicom-web/studies", params={"PatientID": pid, "limit": "20"})
        return str(r.status_code if r.status_code != 204 else 200)

    def _wado(self, client: httpx.Client, _pid: str) -> str:
        with self.ledger.lock:
            if not self.ledger.studies:
                return "200"
            study, series = self._rng.choice(self.ledger.studies)
        with client.stream(
            "GET",
            f"/dicom-web/studies/{study}/series/{series}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        ) as r:
            try:
                r.read()
            except httpx.HTTPError:
                return "truncated"  # a 200 whose body was cut: the client got a broken answer
        return str(r.status_code)

    def _priors(self, client: httpx.Client, pid: str) -> str:
        r = client.get("/api/priors", params={"facility": "local", "mrn": pid, "exam": "CT HEAD"})
        return str(r.status_code)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------- checking


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    boundary = next(
        p.split("=", 1)[1].strip('"') for p in content_type.split(";") if p.strip().startswith("boundary=")
    )
    dash = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(dash)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, rest = chunk.partition(b"\r\n\r\n")
        parts.append(rest[:-2] if rest.endswith(b"\r\n") else rest)
    return parts


@dataclass
class Verdict:
    attempted: int
    acknowledged: int
    verified: int  # acknowledged and retrieved byte-identical through the balancer
    lost: list[str]  # acknowledged but not retrievable byte-identical
    half_stored: list[str]  # in the index, but the object is missing or not what was sent
    orphans: int  # objects without an index row (crash residue the reaper removes)
    unknown_visible: list[str]  # in the index but never sent by a client


def check_cluster(cluster: Cluster, ledger: Ledger) -> Verdict:
    """Every acknowledged instance retrieved through the balancer and compared by SHA-256 (once:
    after a later fault it is checked in the index and the bucket, which is where a loss would
    show); every indexed instance checked against the bucket (the object whole, its digest the
    index's and the sender's)."""
    headers = {
        **auth_headers("admin"),
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
    }
    acked = ledger.acked()

    def retrieve(s: Sent) -> str | None:
        # A 503 is "try again" (the broker could not reach the bucket this once: moto's server
        # answers an occasional request with 503), not a loss: ask again, as a client would. A
        # real loss still shows: below as a missing index row, or as an answer other than 503.
        with httpx.Client(base_url=cluster.url, timeout=30) as client:
            for attempt in range(5):
                r = client.get(
                    f"/dicom-web/studies/{s.study}/series/{s.series}/instances/{s.sop}", headers=headers
                )
                if r.status_code != 503:
                    break
                time.sleep(0.5 * (attempt + 1))
        if r.status_code != 200:
            return f"{s.sop}: HTTP {r.status_code}"
        (data,) = multipart_parts(r.headers["content-type"], r.content)
        got = _sha(data) if s.via == "stow" else _sha(dataset_body(data))
        if got != s.digest:
            return f"{s.sop}: bytes differ"
        s.retrieved = True
        return None

    rows = cluster.index_rows()
    keys = cluster.bucket_keys()
    with ledger.lock:
        sent = dict(ledger.sent)
    s3 = cluster.s3()

    def whole(item: tuple[str, tuple[str, str, int]]) -> str | None:
        sop, (sha, key, size) = item
        if keys.get(key) != size:
            return f"{sop}: object {'missing' if key not in keys else 'of another size'}"
        data = s3.get_object(Bucket=cluster.bucket, Key=key)["Body"].read()
        if _sha(data) != sha:
            return f"{sop}: object digest is not the index's"
        s = sent.get(sop)
        if s is not None and s.digest != _sha(data if s.via == "stow" else dataset_body(data)):
            return f"{sop}: object is not what its sender sent"
        return None

    with ThreadPoolExecutor(8) as pool:
        lost = [x for x in pool.map(retrieve, [s for s in acked if not s.retrieved]) if x]
        half = [x for x in pool.map(whole, rows.items()) if x]
    unknown = [sop for sop in rows if sop not in sent]
    for s in acked:
        if s.sop not in rows:
            lost.append(f"{s.sop}: acknowledged but not in the index")
    indexed_keys = {key for _sha, key, _size in rows.values()}
    orphans = sum(1 for k in keys if k not in indexed_keys)
    attempted, acknowledged = ledger.counts()
    return Verdict(
        attempted=attempted,
        acknowledged=acknowledged,
        verified=len(acked) - len({x.split(":")[0] for x in lost}),
        lost=lost,
        half_stored=half,
        orphans=orphans,
        unknown_visible=unknown,
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
