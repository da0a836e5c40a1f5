"""The DIMSE client functions, against the broker's own SCP and dcmtk's storescp."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlmodel import Session

from broker.errors import Unavailable
from broker.index.schemas import Query
from broker.index.service import find_instances, search
from broker.peers import dimse as scu
from broker.peers.errors import DimseStatusError
from tests.dimse.conftest import PATIENT, SYNTH, Node
from tests.peers import free_port, storescp


def _where(node: Node) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": node.port, "called_ae": node.aet, "calling_ae": "PACS1"}


def test_echo_a_real_peer_and_a_down_one(tmp_path: Path) -> None:
    with storescp(tmp_path / "in", aet="ECHOME") as peer:
        scu.echo(host="127.0.0.1", port=peer.port, called_ae="ECHOME")
    port = free_port()
    with pytest.raises(Unavailable) as down:
        scu.echo(host="127.0.0.1", port=port, called_ae="GONE", timeout=3)
    assert f"GONE@127.0.0.1:{port}" in down.value.message


def test_rejected_association_is_unavailable_naming_the_peer(closed_node: Node) -> None:
    with pytest.raises(Unavailable) as refused:
        scu.echo(host="127.0.0.1", port=closed_node.port, called_ae=closed_node.aet, calling_ae="STRANGER")
    assert "rejected" in refused.value.message and closed_node.aet in refused.value.message


def test_find_study_and_series_levels_return_dicom_json(archive: Node) -> None:
    studies = scu.find(
        **_where(archive),
        level="STUDY",
        keys={
            "PatientID": PATIENT.PatientID,
            "StudyInstanceUID": None,
            "StudyDate": None,
            "PatientName": None,
        },
    )
    with Session(archive.state.engine) as session:
        expected = search(
            session=session, query=Query(level="study", filters={"PatientID": PATIENT.PatientID})
        )
    assert sorted(m["0020000D"]["Value"][0] for m in studies) == sorted(
        m["0020000D"]["Value"][0] for m in expected.matches
    )
    # Non-ASCII names survive the trip (ISO_IR 192 on the wire).
    assert {m["00100010"]["Value"][0]["Alphabetic"] for m in studies} == {str(PATIENT.PatientName)}
    series = scu.find(
        **_where(archive),
        level="SERIES",
        keys={"StudyInstanceUID": PATIENT.StudyInstanceUID, "SeriesInstanceUID": None, "Modality": None},
    )
    assert {m["0020000E"]["Value"][0] for m in series} == {
        ds.SeriesInstanceUID for ds in SYNTH if ds.StudyInstanceUID == PATIENT.StudyInstanceUID
    }


def test_find_failure_status_raises_with_status_and_comment(archive: Node) -> None:
    with pytest.raises(DimseStatusError) as failed:
        scu.find(**_where(archive), level="STUDY", keys={"StudyDate": "2021-13-45"})
    assert failed.value.status == 0xC000 and "StudyDate" in failed.value.comment


def test_move_to_storescp_and_to_an_unknown_destination(archive: Node, tmp_path: Path) -> None:
    mr = [ds for ds in SYNTH if ds.Modality == "MR"]
    with storescp(tmp_path / "in", aet="WORKSTN") as peer:
        archive.peers.add_destination("WORKSTN", "127.0.0.1", peer.port)
        result = scu.move(**_where(archive), destination_ae="WORKSTN", study_uid=mr[0].StudyInstanceUID)
        files = peer.files()
    assert (result.completed, result.failed) == (len(mr), 0)
    assert {pydicom.dcmread(p).SOPInstanceUID for p in files} == {ds.SOPInstanceUID for ds in mr}
    with pytest.raises(DimseStatusError) as unknown:
        scu.move(**_where(archive), destination_ae="NOWHERE", study_uid=mr[0].StudyInstanceUID)
    assert unknown.value.status == 0xA801


def test_get_series_writes_part10_files(archive: Node, tmp_path: Path) -> None:
    ct = [ds for ds in SYNTH if ds.Modality == "CT"]
    result = scu.get(
        **_where(archive),
        into=tmp_path / "got",
        level="SERIES",
        study_uid=ct[0].StudyInstanceUID,
        series_uid=ct[0].SeriesInstanceUID,
    )
    wanted = {ds.SOPInstanceUID: ds for ds in ct if ds.SeriesInstanceUID == ct[0].SeriesInstanceUID}
    assert result.completed == len(wanted) and result.failed == 0
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == sorted(Path(p).name for p in result.paths)
    got = [pydicom.dcmread(p) for p in result.paths]
    assert {ds.SOPInstanceUID for ds in got} == set(wanted)
    for ds in got:
        assert ds.PixelData == wanted[ds.SOPInstanceUID].PixelData


def test_other_in_process_storage_scps_still_receive_in_memory(archive: Node) -> None:
    """The SCP spools C-STORE data sets to disk; a plain pynetdicom AE in the same process (as
    other domains write them) must still get `event.request.DataSet` in memory."""
    received: list[int] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        with lock:
            received.append(len(cast(Any, event.request).DataSet.getvalue()))
        return 0x0000

    ae = AE(ae_title="PLAIN")
    ae.supported_contexts = AllStoragePresentationContexts
    server = cast(
        Any, ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    )
    try:
        archive.peers.add_destination("PLAIN", "127.0.0.1", server.server_address[1])
        mr = [ds for ds in SYNTH if ds.Modality == "MR"]
        result = scu.move(**_where(archive), destination_ae="PLAIN", study_uid=mr[0].StudyInstanceUID)
    finally:
        ae.shutdown()
    assert result.completed == len(mr)
    assert len(received) == len(mr) and all(n > 32 * 32 for n in received)


def _dataset_bytes(part10: bytes) -> bytes:
    import io

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(part10)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return part10[fp.tell() :]


def test_store_sends_files_as_they_are(node: Node, tmp_path: Path) -> None:
    from tests.dimse.conftest import sample_folder

    files = sorted(sample_folder(tmp_path / "send").rglob("*.dcm"))
    results = scu.store(host="127.0.0.1", port=node.port, called_ae=node.aet, paths=files, calling_ae="PACS1")
    assert [r.path for r in results] == [str(p) for p in files]
    assert all(r.ok for r in results), [
        (Path(r.path).name, hex(r.status), r.comment) for r in results if not r.ok
    ]
    # Byte for byte: files are sent from disk as they are and stored as received (the two
    # pydicom files whose meta names other UIDs are decoded and re-encoded, identically here).
    with Session(node.state.engine) as session:
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            (ref,) = find_instances(
                session=session, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                sop_uid=ds.SOPInstanceUID,
            )  # fmt: skip
            stored = b"".join(node.state.store.get(ref.object_key))
            assert _dataset_bytes(stored) == _dataset_bytes(path.read_bytes()), path.name


def test_store_decompresses_for_a_peer_that_takes_only_uncompressed(tmp_path: Path) -> None:
    from tests.dimse.conftest import COMPRESSED, TEST_FILES

    received: list[Any] = []

    def on_store(event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        received.append(dataset)
        return 0x0000

    ae = AE(ae_title="OLDPACS")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cast(str, cx.abstract_syntax), ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    handlers: list[Any] = [(evt.EVT_C_STORE, on_store)]
    server = cast(Any, ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers))
    try:
        (result,) = scu.store(
            host="127.0.0.1",
            port=server.server_address[1],
            called_ae="OLDPACS",
            paths=[TEST_FILES / COMPRESSED],
        )
    finally:
        ae.shutdown()
    assert result.ok
    original = pydicom.dcmread(TEST_FILES / COMPRESSED)
    (got,) = received
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert got.pixel_array.shape == original.pixel_array.shape


def test_store_to_a_down_peer_is_unavailable(tmp_path: Path) -> None:
    from tests.dimse.conftest import TEST_FILES

    port = free_port()
    with pytest.raises(Unavailable) as down:
        scu.store(
            host="127.0.0.1", port=port, called_ae="GONE", paths=[TEST_FILES / "CT_small.dcm"], timeout=3
        )
    assert f"GONE@127.0.0.1:{port}" in down.value.message


def test_find_answers_name_this_node_as_retrieve_ae(archive: Node) -> None:
    keys = {"StudyInstanceUID": PATIENT.StudyInstanceUID, "RetrieveAETitle": None}
    keys["SmallestImagePixelValue"] = None
    studies = scu.find(**_where(archive), level="STUDY", keys=keys)
    assert [m["00080054"]["Value"] for m in studies] == [[archive.aet]]
    assert studies[0]["00280106"] == {"vr": "US"}  # requested, unknown here: returned empty
