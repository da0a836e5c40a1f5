"""C-STORE-RQs received in the DUL thread (broker.dicom.fast_store): plain requests take the
short path and are stored as before, unusual ones still go through pynetdicom, and a message
whose framing breaks once taken over aborts the association and leaves nothing behind."""

from __future__ import annotations

import errno
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from broker.demo import synth
from broker.dicom import fast_store
from broker.dicom.received import HashingWriter
from tests.dimse.conftest import Node, _start, synthetic_studies
from tests.dimse.test_scp_store import _dataset_bytes, _indexed_sops, _stored_bytes
from tests.peers import dcmtk


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SOP Instance UIDs of the C-STOREs the fast path served, in order."""
    seen: list[str] = []
    serve = fast_store.FastStore._serve

    def counting(self: fast_store.FastStore, dul: Any, message: Any) -> None:
        seen.append(str(message.request.AffectedSOPInstanceUID))
        serve(self, dul, message)

    monkeypatch.setattr(fast_store.FastStore, "_serve", counting)
    return seen


@pytest.fixture(params=[True, False], ids=["fast", "pynetdicom"])
def either_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    yield from _start(tmp_path, dimse_fast_store=request.param)


def _folder(tmp: Path, count: int) -> list[Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(synthetic_studies()[:count]):
        path = tmp / f"{n}.dcm"
        path.write_bytes(synth.write_part10(ds))
        paths.append(path)
    return paths


def test_storescu_instances_are_stored_the_same_with_and_without_the_fast_path(
    either_node: Node, served: list[str], tmp_path: Path
) -> None:
    node = either_node
    paths = _folder(tmp_path / "send", 4)
    done = dcmtk("storescu", "-aet", "PACS1", "-aec", node.aet, "127.0.0.1", str(node.port), *paths)
    assert done.returncode == 0, done.stderr
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    assert _indexed_sops(node) == set(sent)
    for sop, path in sent.items():
        ds = pydicom.dcmread(path)
        raw = _stored_bytes(node, ds.StudyInstanceUID, ds.SeriesInstanceUID, sop)
        stored = pydicom.dcmread(io.BytesIO(raw))
        assert stored.PixelData == ds.PixelData
        assert stored.PatientID == ds.PatientID
    assert list(node.spool.iterdir()) == []
    fast = node.state.settings.dimse_fast_store
    assert sorted(served) == (sorted(sent) if fast else [])


def _associate(node: Node, ds: Any) -> Any:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    statuses: list[int] = []
    # What the SCP answers, seen as the SCU decodes it (its own reactor would take the message).
    handlers: list[Any] = [
        (evt.EVT_DIMSE_RECV, lambda event: statuses.append(int(event.message.command_set.Status)))
    ]
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet, evt_handlers=handlers)
    assert assoc.is_established
    assoc.statuses = statuses  # type: ignore[attr-defined]
    return assoc


def _pdvs(assoc: Any, ds: Any, message_id: int = 1) -> list[Any]:
    """The PDVs of a C-STORE-RQ for `ds` as pynetdicom would send them (8 KiB fragments)."""
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = io.BytesIO(_dataset_bytes(synth.write_part10(ds)))
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    cx_id = cast(int, assoc.accepted_contexts[0].context_id)
    return [pdv for p in message.encode_msg(cx_id, 8192) for pdv in p.presentation_data_value_list]


def _send(assoc: Any, *pdus: list[Any]) -> None:
    for pdvs in pdus:
        primitive: Any = P_DATA()
        # pynetdicom's setter takes [ID, bytes] pairs as lists, not tuples.
        primitive.presentation_data_value_list = [[cx, bytes(v)] for cx, v in pdvs]
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        assoc.dul.socket.send(pdu.encode())


def _status(assoc: Any) -> int:
    """The status of the C-STORE-RSP to a request sent raw (`_send`), once the SCU's own reactor
    has taken that response off its queue (as unexpected, and dropped it): a `send_c_store` made
    before that took the stale response for its own answer, on a busy machine."""
    deadline = time.monotonic() + 10
    while not assoc.statuses and time.monotonic() < deadline:
        time.sleep(0.01)
    assert assoc.statuses, "no C-STORE-RSP within 10 s"
    while not assoc.dimse.msg_queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert assoc.dimse.msg_queue.empty(), "the SCU did not take the response off its queue"
    return int(assoc.statuses.pop(0))


def _big(n: int = 0) -> Any:
    ds = synthetic_studies()[n]
    ds.PixelData = bytes(64 * 1024)
    ds.Rows = ds.Columns = 128
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    return ds


def test_a_command_set_split_over_fragments_still_goes_through_pynetdicom(
    node: Node, served: list[str]
) -> None:
    ds = _big()
    assoc = _associate(node, ds)
    try:
        (cx, command), *data = _pdvs(assoc, ds)
        body = command[1:]
        # One command set in two fragments (PS3.8 E.2 allows it), then the data set.
        _send(assoc, [(cx, b"\x01" + body[:20]), (cx, b"\x03" + body[20:])], *([pdv] for pdv in data))
        assert _status(assoc) == 0x0000
    finally:
        assoc.release()
    assert served == []
    assert _indexed_sops(node) == {ds.SOPInstanceUID}


def test_a_whole_message_in_one_pdu_takes_the_fast_path(node: Node, served: list[str]) -> None:
    ds = synthetic_studies()[0]
    assoc = _associate(node, ds)
    try:
        _send(assoc, _pdvs(assoc, ds))
        assert _status(assoc) == 0x0000
    finally:
        assoc.release()
    assert served == [ds.SOPInstanceUID]
    assert _indexed_sops(node) == {ds.SOPInstanceUID}


@pytest.mark.parametrize("breaking", ["command fragment", "other context", "fragment after the last"])
def test_a_message_broken_after_its_command_aborts_and_stores_nothing(
    node: Node, served: list[str], breaking: str
) -> None:
    ds = _big()
    assoc = _associate(node, ds)
    (cx, command), *data = _pdvs(assoc, ds)
    assert len(data) > 3
    try:
        if breaking == "command fragment":
            _send(assoc, [(cx, command), data[0]], [(cx, command)])
        elif breaking == "other context":
            _send(assoc, [(cx, command), data[0]], [(cx + 2, data[1][1])])
        else:
            last = (cx, b"\x02" + data[1][1][1:])
            _send(assoc, [(cx, command), data[0]], [last, data[2]])
        deadline = time.monotonic() + 10
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert assoc.is_aborted, "the SCP did not abort the association"
    finally:
        assoc.kill()
    deadline = time.monotonic() + 10
    while node.scp.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)
    assert served == []
    assert _indexed_sops(node) == set()
    assert list(node.spool.iterdir()) == []
    # The SCP keeps serving.
    again = _associate(node, ds)
    try:
        assert again.send_c_store(ds).Status == 0x0000
    finally:
        again.release()
    assert _indexed_sops(node) == {ds.SOPInstanceUID}


class _FillingFile:
    """A spool file on a disk that fills up after `room` bytes (ENOSPC, as a full disk says)."""

    def __init__(self, path: str, room: int) -> None:
        self.raw = open(path, "xb")  # noqa: SIM115 - closed by the SCP
        self.name = path
        self.room = room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()


@pytest.mark.parametrize("room", [0, 2000], ids=["at-once", "mid-data-set"])
def test_a_full_spool_disk_is_answered_a700_and_the_association_goes_on(
    node: Node, served: list[str], monkeypatch: pytest.MonkeyPatch, room: int
) -> None:
    """The issue's "a full disk: a clear failure status, nothing half-stored": the SCU gets
    0xA700 (retry later) for the instance it was sending, and the next one, once there is room
    again, is stored on the same association."""
    ds = _big()
    spooled: list[str] = []

    def full(ae: Any) -> Any:
        path = str(node.spool / f"full-{len(spooled)}.dcm")
        spooled.append(path)
        return HashingWriter(_FillingFile(path, room), keep=0)

    assoc = _associate(node, ds)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(fast_store, "_new_spool", full)
            _send(assoc, *([pdv] for pdv in _pdvs(assoc, ds)))
            assert _status(assoc) == 0xA700
            assert assoc.is_established
            assert _indexed_sops(node) == set()
            assert list(node.spool.iterdir()) == []
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert spooled and served == [ds.SOPInstanceUID]
    assert _indexed_sops(node) == {ds.SOPInstanceUID}


def test_the_group_wait_setting_reaches_the_ingest_writer(tmp_path: Path) -> None:
    """SCANONCE_INGEST_GROUP_WAIT_MS is what the SCP's group commit waits at most for other
    associations' instances (0: never); out-of-range values are refused when read."""
    import pydantic

    from broker.index.service import IngestBatcher
    from broker.settings import Settings

    for wait_ms in (0.0, 12.5):
        nodes = _start(tmp_path / str(wait_ms), ingest_group_wait_ms=wait_ms)
        node = next(nodes)
        try:
            batcher = node.scp.batcher
            assert isinstance(batcher, IngestBatcher)
            assert batcher._linger == wait_ms / 1000
        finally:
            nodes.close()
    for bad in (-1, 1000):
        with pytest.raises(pydantic.ValidationError, match="ingest_group_wait_ms"):
            Settings(data_dir=tmp_path / "x", ingest_group_wait_ms=bad)
