"""The SCP's association policy, C-ECHO and C-STORE, against dcmtk and pynetdicom as SCUs."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlmodel import Session

from broker.demo import synth
from broker.facilities import service as facilities
from broker.index.schemas import Query
from broker.index.service import find_instances, search
from storage import LocalStore
from tests.dimse.conftest import TEST_FILES, Node, _start, sample_folder, synthetic_studies
from tests.peers import dcmtk
from tests.support import ADMIN

# dcmtk storescu's option proposing each stored transfer syntax (uncompressed: -xe).
_STORESCU_OPTION = {
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def _scu(aet: str = "TESTSCU") -> AE:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def _indexed_sops(node: Node) -> set[str]:
    with Session(node.state.engine) as session:
        result = search(session=session, query=Query(level="instance", limit=10_000))
    return {m["00080018"]["Value"][0] for m in result.matches}


def _stored_bytes(node: Node, study: str, series: str, sop: str) -> bytes:
    with Session(node.state.engine) as session:
        (ref,) = find_instances(session=session, study_uid=study, series_uid=series, sop_uid=sop)
    return b"".join(node.state.store.get(ref.object_key))


def _elements(ds: Dataset) -> dict[int, object]:
    # dcmtk drops group lengths and trailing padding (FFFC,FFFC) when it re-encodes.
    return {e.tag: e.value for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC}


def _dataset_bytes(part10: bytes) -> bytes:
    """The data set of a Part 10 file without its preamble and file meta."""
    fp = io.BytesIO(part10)
    read_preamble(fp, False)
    meta = pydicom.filereader._read_file_meta_info(fp)
    del meta
    return part10[fp.tell() :]


def test_echoscu_gets_success(node: Node) -> None:
    done = dcmtk("echoscu", "-aet", "PACS1", "-aec", node.aet, "127.0.0.1", str(node.port))
    assert done.returncode == 0


def test_storescu_folder_is_stored_byte_for_byte_and_indexed(node: Node, tmp_path: Path) -> None:
    folder = sample_folder(tmp_path / "send")
    files = sorted(p for p in folder.rglob("*.dcm"))
    started = time.perf_counter()
    # storescu proposes one transfer syntax family per run: send each group as it is stored.
    by_option: dict[str, list[Path]] = {}
    for path in files:
        ts = pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID
        by_option.setdefault(_STORESCU_OPTION.get(ts, "-xe"), []).append(path)
    for option, group in by_option.items():
        dcmtk("storescu", "-aet", "PACS1", "-aec", node.aet, option, "127.0.0.1", str(node.port), *group)
    elapsed = time.perf_counter() - started
    print(f"storescu: {len(files)} instances in {elapsed:.2f} s")
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
    assert _indexed_sops(node) == set(sent)
    for sop, path in sent.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = _stored_bytes(node, ds.StudyInstanceUID, ds.SeriesInstanceUID, sop)
        # Kept in the transfer syntax it was sent in (compressed pixel data untouched). dcmtk
        # re-encodes what it sends, so compare data sets here; byte-exactness is tested below.
        received = pydicom.dcmread(io.BytesIO(stored))
        assert received.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID, path.name
        assert _elements(received) == _elements(pydicom.dcmread(path)), path.name
    assert list(node.spool.iterdir()) == []  # every spooled data set was removed


def test_duplicate_is_success_and_conflict_is_refused_and_kept_apart(node: Node) -> None:
    original = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ae = _scu()
    ae.add_requested_context(CTImageStorage, original.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
    assert assoc.is_established
    try:
        first = assoc.send_c_store(original)
        again = assoc.send_c_store(original)
        changed = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
        changed.StudyDescription = "tampered copy"
        conflict = assoc.send_c_store(changed)
    finally:
        assoc.release()
    assert first.Status == 0x0000
    assert again.Status == 0x0000  # same SOP Instance UID, same bytes: idempotent
    assert conflict.Status == 0xC000
    assert "conflict" in conflict.ErrorComment
    stored = _stored_bytes(
        node, original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID
    )
    assert pydicom.dcmread(io.BytesIO(stored)).StudyDescription == original.StudyDescription
    kept_apart = [o.key for o in node.state.store.list("conflicts/")]
    assert len(kept_apart) == 1 and original.SOPInstanceUID in kept_apart[0]


def _send_file_as_is(node: Node, path: Path, sop_class: str) -> Dataset:
    """Send a Part 10 file's bytes unchanged (pynetdicom's chunked send reads only the meta)."""
    ae = _scu()
    meta = pydicom.filereader.read_file_meta_info(path)
    ae.add_requested_context(sop_class, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()


def _with_meta(part10: bytes, *, sop_class: str | None = None, sop_instance: str | None = None) -> bytes:
    """The same data set under a file meta that names another SOP Class or Instance (what a
    chunked send puts in the C-STORE request)."""
    fp = io.BytesIO(part10)
    read_preamble(fp, False)
    meta = pydicom.filereader._read_file_meta_info(fp)
    if sop_class is not None:
        meta.MediaStorageSOPClassUID = UID(sop_class)
    if sop_instance is not None:
        meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    del meta[0x00020000]  # group length, recomputed
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    return out.getvalue() + _dataset_bytes(part10)


def _part10(ds: Dataset, path: Path) -> Path:
    path.write_bytes(synth.write_part10(ds))
    return path


def test_malformed_datasets_get_failure_statuses_and_nothing_is_stored(node: Node, tmp_path: Path) -> None:
    good = synthetic_studies()[0]
    # 1. The data set's SOP Class differs from the one the command names.
    secondary_capture = "1.2.840.10008.5.1.4.1.1.7"
    encoded = synth.write_part10(good)
    path = tmp_path / "wrong_class.dcm"
    path.write_bytes(_with_meta(encoded, sop_class=secondary_capture))
    rsp = _send_file_as_is(node, path, secondary_capture)
    assert rsp.Status == 0xA900 and "SOPClassUID" in rsp.ErrorComment
    # 2. An invalid Study Instance UID.
    bad_uid = pydicom.dcmread(io.BytesIO(synth.write_part10(good)))
    bad_uid.StudyInstanceUID = "1.2.abc"
    rsp = _send_file_as_is(node, _part10(bad_uid, tmp_path / "bad_uid.dcm"), good.SOPClassUID)
    assert rsp.Status == 0xA900 and "StudyInstanceUID" in rsp.ErrorComment
    # 3. Garbage after a valid file meta: the data set cannot be parsed.
    garbage = tmp_path / "garbage.dcm"
    meta_only = synth.write_part10(good)
    garbage.write_bytes(
        meta_only[: len(meta_only) - len(_dataset_bytes(meta_only))] + b"\xff\xfe\x00\x01" * 64
    )
    rsp = _send_file_as_is(node, garbage, good.SOPClassUID)
    assert rsp.Status == 0xC000
    assert _indexed_sops(node) == set()
    assert list(node.state.store.list()) == []
    # The SCP still serves: the good instance is stored.
    good_path = _part10(good, tmp_path / "good.dcm")
    rsp = _send_file_as_is(node, good_path, good.SOPClassUID)
    assert rsp.Status == 0x0000
    assert _indexed_sops(node) == {good.SOPInstanceUID}
    # Stored byte for byte as sent: the data set is never decoded and re-encoded.
    stored = _stored_bytes(node, good.StudyInstanceUID, good.SeriesInstanceUID, good.SOPInstanceUID)
    assert _dataset_bytes(stored) == _dataset_bytes(good_path.read_bytes())


def test_unknown_calling_ae_is_rejected_when_open_mode_is_off(closed_node: Node) -> None:
    ae = _scu("STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", closed_node.port, ae_title=closed_node.aet)
    assert assoc.is_rejected
    rj = cast(Any, assoc.acceptor.primitive)
    # A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognized.
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    done = dcmtk(
        "echoscu",
        "-aet",
        "STRANGER",
        "-aec",
        closed_node.aet,
        "127.0.0.1",
        str(closed_node.port),
        check=False,
    )
    assert done.returncode != 0 and "Rejected" in done.stdout + done.stderr

    closed_node.peers.add_calling("PACS1", "local")
    done = dcmtk("echoscu", "-aet", "PACS1", "-aec", closed_node.aet, "127.0.0.1", str(closed_node.port))
    assert done.returncode == 0


def test_calling_ae_registered_to_a_facility_is_accepted_and_stores_for_it(
    closed_node: Node, tmp_path: Path
) -> None:
    with Session(closed_node.state.engine) as session:
        facilities.add_facility(
            session=session,
            principal=ADMIN,
            facility_id="northgen",
            issuer="NORTH-GENERAL",
            calling_ae_titles=["NG_PACS"],
        )
    study = synthetic_studies()[:2]
    paths = synth.write_files(study, tmp_path / "send")
    dcmtk("storescu", "-aet", "NG_PACS", "-aec", closed_node.aet, "127.0.0.1", str(closed_node.port), *paths)
    with Session(closed_node.state.engine) as session:
        result = search(session=session, query=Query(level="study", facility_id="northgen"))
    assert [m["0020000D"]["Value"][0] for m in result.matches] == [study[0].StudyInstanceUID]
    # The facility's AE title is the only one let in.
    done = dcmtk(
        "echoscu", "-aet", "OTHER", "-aec", closed_node.aet, "127.0.0.1", str(closed_node.port), check=False
    )
    assert done.returncode != 0


def test_peer_vanishing_mid_transfer_leaves_nothing_and_the_scp_keeps_serving(node: Node) -> None:
    big = synthetic_studies()[0]
    big.PixelData = bytes(4 * 1024 * 1024)  # 4 MiB: many P-DATA PDUs
    big.Rows = big.Columns = 1024
    big.BitsAllocated, big.BitsStored, big.HighBit = 32, 32, 31
    encoded = synth.write_part10(big)
    ae = _scu()
    ae.add_requested_context(big.SOPClassUID, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet, max_pdu=16384)
    assert assoc.is_established
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = big.SOPClassUID
    req.AffectedSOPInstanceUID = big.SOPInstanceUID
    req.Priority = 2
    req.DataSet = io.BytesIO(_dataset_bytes(encoded))
    from pynetdicom.dimse_messages import C_STORE_RQ

    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    cx_id = cast(int, assoc.accepted_contexts[0].context_id)
    sock = cast(Any, assoc.dul.socket)
    for n, pdata in enumerate(msg.encode_msg(cx_id, 16384)):
        if n == 20:  # about a tenth of the data set is sent, then the TCP connection drops
            break
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        sock.send(pdu.encode())
    time.sleep(0.3)
    sock.socket.close()
    assoc.kill()
    deadline = time.monotonic() + 10
    while node.scp.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(node.spool.iterdir()) == []  # the half-received data set was removed
    assert _indexed_sops(node) == set()
    # The next association is served normally.
    done = dcmtk("echoscu", "-aet", "PACS1", "-aec", node.aet, "127.0.0.1", str(node.port))
    assert done.returncode == 0
    small = synthetic_studies()[1]
    ae = _scu()
    ae.add_requested_context(small.SOPClassUID, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
    try:
        assert assoc.send_c_store(small).Status == 0x0000
    finally:
        assoc.release()
    assert _indexed_sops(node) == {small.SOPInstanceUID}


@pytest.mark.parametrize("name", ["JPEGLSNearLossless_08.dcm"])
def test_real_file_without_study_uid_is_refused(node: Node, name: str) -> None:
    path = TEST_FILES / name
    rsp = _send_file_as_is(node, path, pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)
    assert rsp.Status == 0xA900 and "StudyInstanceUID" in rsp.ErrorComment


def test_unsupported_sop_class_and_transfer_syntax_are_rejected_per_context(node: Node) -> None:
    ae = _scu()
    ae.add_requested_context("1.2.826.0.1.3680043.8.498.999.1")  # not a storage SOP class we know
    ae.add_requested_context(CTImageStorage, ["1.2.826.0.1.3680043.8.498.999.2"])  # no such syntax
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
    assert assoc.is_established
    try:
        results = {str(cx.abstract_syntax) + "/" + str(cx.transfer_syntax[-1]): cx.result
                   for cx in assoc.rejected_contexts}  # fmt: skip
        # PS3.8 9.3.3.2: 0x03 abstract syntax not supported, 0x04 transfer syntaxes not supported.
        assert results == {
            "1.2.826.0.1.3680043.8.498.999.1/1.2.840.10008.1.2": 0x03,
            f"{CTImageStorage}/1.2.826.0.1.3680043.8.498.999.2": 0x04,
        }
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [CTImageStorage]
        assert assoc.send_c_store(pydicom.dcmread(TEST_FILES / "CT_small.dcm")).Status == 0x0000
    finally:
        assoc.release()


def test_a_large_instance_is_received_through_a_file_not_memory(node: Node, tmp_path: Path) -> None:
    import tracemalloc

    big = synthetic_studies()[0]
    big.Rows = big.Columns = 2048
    big.BitsAllocated, big.BitsStored, big.HighBit = 32, 32, 31
    big.NumberOfFrames = 6
    big.PixelData = bytes(6 * 2048 * 2048 * 4)  # 96 MiB
    path = _part10(big, tmp_path / "big.dcm")
    del big
    tracemalloc.start()
    try:
        # The SCU streams from the file too (pynetdicom's chunked send), so the process's peak
        # is what the SCP holds while receiving, parsing, hashing and storing.
        rsp = _send_file_as_is(node, path, "1.2.840.10008.5.1.4.1.1.2")
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rsp.Status == 0x0000
    # The DIMSE path holds at most a PDU (256 KiB) of it; with an unbounded PDU size it was four
    # copies (385 MiB). The bound allows for the index's ingest, which today reads the data set's
    # last element (the pixel data) once to detect truncation; at 16 MiB once that is streamed.
    size = 6 * 2048 * 2048 * 4
    assert peak < size * 1.1, f"peak {peak / 2**20:.1f} MiB while receiving a 96 MiB instance"
    print(f"peak traced memory while storing 96 MiB: {peak / 2**20:.1f} MiB")


@pytest.mark.parametrize("pixels", [16, 1024], ids=["kept-in-memory", "parsed-from-the-spool-file"])
def test_cstore_is_checked_against_its_request_and_hashed_as_received(
    node: Node, tmp_path: Path, pixels: int
) -> None:
    """The SCP parses each data set once (from the bytes kept while spooling, or from the spool
    file when it is large) and takes its content address from the hash computed while writing:
    a data set that is not the instance its request names is still refused, and what is stored
    is addressed by the hash of exactly the bytes received."""
    ds = synthetic_studies()[0]
    ds.Rows = ds.Columns = pixels  # 1024x1024x2 = 2 MiB: above what the spool keeps in memory
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(range(256)) * (pixels * pixels * 2 // 256)
    encoded = synth.write_part10(ds)
    other = "1.2.826.0.1.3680043.8.498.999"
    wrong = tmp_path / "wrong_instance.dcm"
    wrong.write_bytes(_with_meta(encoded, sop_instance=other))
    rsp = _send_file_as_is(node, wrong, ds.SOPClassUID)
    assert rsp.Status == 0xA900 and "SOPInstanceUID" in rsp.ErrorComment
    assert _indexed_sops(node) == set()
    assert list(node.state.store.list()) == []

    rsp = _send_file_as_is(node, _part10(ds, tmp_path / "right.dcm"), ds.SOPClassUID)
    assert rsp.Status == 0x0000
    with Session(node.state.engine) as session:
        (ref,) = find_instances(
            session=session,
            study_uid=ds.StudyInstanceUID,
            series_uid=ds.SeriesInstanceUID,
            sop_uid=ds.SOPInstanceUID,
        )
    stored = b"".join(node.state.store.get(ref.object_key))
    assert _dataset_bytes(stored) == _dataset_bytes(encoded)
    assert ref.size == len(stored)
    assert ref.object_key.endswith(hashlib.sha256(stored).hexdigest() + ".dcm")


class _FullDisk(LocalStore):
    """A local store on a disk that is full (the one part that cannot be made real here)."""

    def put(self, key: str, data: Any, *, size: int | None = None) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    def put_file(self, key: str, path: str, *, move: bool = False) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_is_out_of_resources_and_nothing_is_indexed(node: Node, tmp_path: Path) -> None:
    node.state.store = _FullDisk(tmp_path / "full")
    good = synthetic_studies()[0]
    rsp = _send_file_as_is(node, _part10(good, tmp_path / "good.dcm"), good.SOPClassUID)
    assert rsp.Status == 0xA700
    assert _indexed_sops(node) == set()
    assert list(node.spool.iterdir()) == []


def test_parallel_associations_storing_into_the_same_study(node: Node, tmp_path: Path) -> None:
    patient = synth.generate_patients(seed=11, count=1)[0]
    study = list(
        synth.generate_study(
            rng_seed=5, patient=patient, modality="CT", n_series=2, n_instances_per_series=8, rows=16, cols=16
        )
    )
    paths = synth.write_files(study, tmp_path / "send")
    # Four senders at once, each with a share of both series (as a PACS with several workers).
    where = ["-aec", node.aet, "127.0.0.1", str(node.port)]
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda n: dcmtk("storescu", "-aet", f"W{n}", *where, *paths[n::4]), range(4)))
    assert all(d.returncode == 0 for d in done)
    assert _indexed_sops(node) == {ds.SOPInstanceUID for ds in study}
    with Session(node.state.engine) as session:
        (match,) = search(
            session=session,
            query=Query(
                level="study", filters={"NumberOfStudyRelatedInstances": "", "NumberOfStudyRelatedSeries": ""}
            ),
        ).matches
    assert (match["00201208"]["Value"][0], match["00201206"]["Value"][0]) == (16, 2)


def test_spool_leftovers_of_a_crash_are_removed_at_start(tmp_path: Path) -> None:
    import os

    spool = tmp_path / "n" / "data" / "spool"
    spool.mkdir(parents=True)
    (spool / "crashed.dcm").write_bytes(b"half a data set")
    os.utime(spool / "crashed.dcm", (time.time() - 7200, time.time() - 7200))
    (spool / "in-flight.dcm").write_bytes(b"another node's transfer")
    nodes = _start(tmp_path / "n")
    next(nodes)
    try:
        assert sorted(p.name for p in spool.iterdir()) == ["in-flight.dcm"]
    finally:
        nodes.close()


def test_pynetdicom_message_lines_are_logged_when_heard_and_not_built_otherwise(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """With pynetdicom's logger at INFO (the default `--log-level info`) each C-STORE is still
    described in the log; above it, the associations carry no describing handlers at all
    (building descriptions nobody prints cost ~2% of a C-STORE's CPU), even when the server
    started while INFO was heard."""
    caplog.set_level(logging.INFO, logger="pynetdicom")
    node: Node = request.getfixturevalue("node")
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")

    def store_and_handlers() -> list[Any]:
        ae = _scu()
        ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
        assert assoc.is_established
        try:
            assert assoc.send_c_store(ds).Status == 0x0000
            (served,) = [a for a in node.scp.ae.active_associations if a.is_established]
            return cast(list[Any], served.get_handlers(evt.EVT_DIMSE_RECV))
        finally:
            assoc.release()

    caplog.set_level(logging.INFO, logger="pynetdicom")
    assert store_and_handlers()
    assert "Received Store Request" in caplog.messages
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    assert store_and_handlers() == []
    assert "Received Store Request" not in caplog.messages


def test_cstore_responses_and_spooled_file_meta_are_the_bytes_pynetdicom_would_write(
    node: Node, tmp_path: Path
) -> None:
    """The SCP writes a plain C-STORE-RSP and a spool file's File Meta itself, not through
    pynetdicom and pydicom (~15% of a C-STORE's CPU): the peer must receive, and the store
    keep, exactly what those would have written; a response with an error comment still goes
    through pynetdicom."""
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dsutils import create_file_meta

    ds = synthetic_studies()[0]
    ae = _scu()
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    received: list[bytes] = []
    assoc = ae.associate(
        "127.0.0.1",
        node.port,
        ae_title=node.aet,
        evt_handlers=[(evt.EVT_DATA_RECV, lambda event: received.append(bytes(event.data)))],
    )
    assert assoc.is_established
    try:
        received.clear()
        assert assoc.send_c_store(ds).Status == 0x0000
        success = b"".join(received)
        received.clear()
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            other = "1.2.826.0.1.3680043.8.498.998"
            wrong = tmp_path / "wrong.dcm"
            wrong.write_bytes(_with_meta(synth.write_part10(ds), sop_instance=other))
            refused = assoc.send_c_store(wrong)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
        assert refused.Status == 0xA900 and "SOPInstanceUID" in refused.ErrorComment
    finally:
        assoc.release()

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1  # the association's first request
    rsp.AffectedSOPClassUID = ds.SOPClassUID
    rsp.AffectedSOPInstanceUID = ds.SOPInstanceUID
    rsp.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    expected = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(1, 16382))
    assert success == expected

    stored = _stored_bytes(node, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    meta = DicomBytesIO()
    write_file_meta_info(
        meta,
        create_file_meta(
            sop_class_uid=UID(ds.SOPClassUID),
            sop_instance_uid=UID(ds.SOPInstanceUID),
            transfer_syntax=UID(ds.file_meta.TransferSyntaxUID),
        ),
    )
    assert stored[:132] == b"\0" * 128 + b"DICM"
    assert stored[132 : 132 + len(meta.getvalue())] == meta.getvalue()
