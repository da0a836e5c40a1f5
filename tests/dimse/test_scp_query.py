"""C-FIND, C-MOVE and C-GET against the SCP with dcmtk's findscu, movescu and getscu (and
pynetdicom for the bad inputs dcmtk will not send)."""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom.association
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlmodel import Session

from broker.facilities import service as facilities
from broker.index.schemas import Query
from broker.index.service import find_instances, search
from tests.dimse.conftest import COMPRESSED, PATIENT, SYNTH, TEST_FILES, Node
from tests.peers import dcmtk, free_port, storescp
from tests.support import ADMIN


def _findscu(node: Node, model: str, keys: dict[str, str], out: Path) -> list[Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    args: list[str] = ["-aet", "PACS1", "-aec", node.aet, model, "-X", "-od", str(out)]
    for keyword, value in keys.items():
        args += ["-k", f"{keyword}={value}" if value else keyword]
    dcmtk("findscu", *args, "127.0.0.1", str(node.port))
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _search(node: Node, level: str, filters: dict[str, str], **kw: Any) -> list[Dataset]:
    with Session(node.state.engine) as session:
        result = search(
            session=session,
            query=Query(level=level, filters=filters, includefields=frozenset(filters), limit=1000, **kw),  # type: ignore[arg-type]
        )
    return [Dataset.from_json(m) for m in result.matches]


def _answers(found: list[Dataset], keywords: list[str]) -> set[tuple[str, ...]]:
    return {tuple(str(ds.get(k, "") or "") for k in keywords) for ds in found}


STUDY_KEYS = ["StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "ModalitiesInStudy",
              "NumberOfStudyRelatedInstances", "AccessionNumber"]  # fmt: skip


@pytest.mark.parametrize("model", ["-S", "-P"])
def test_findscu_study_level_gives_the_index_answer(archive: Node, tmp_path: Path, model: str) -> None:
    keys = {k: "" for k in STUDY_KEYS} | {"QueryRetrieveLevel": "STUDY", "PatientID": PATIENT.PatientID}
    found = _findscu(archive, model, keys, tmp_path)
    assert len(found) == 2  # the patient's CT and MR studies
    assert {ds.PatientID for ds in found} == {PATIENT.PatientID}
    expected = _search(archive, "study", {k: v for k, v in keys.items() if k != "QueryRetrieveLevel"})
    assert _answers(found, STUDY_KEYS) == _answers(expected, STUDY_KEYS)
    for ds in found:
        assert ds.QueryRetrieveLevel == "STUDY"
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        # Exactly the requested keys come back (and the two the response always carries).
        assert {e.keyword for e in ds} == set(STUDY_KEYS) | {"QueryRetrieveLevel", "SpecificCharacterSet"}


def test_findscu_wildcard_and_date_range(archive: Node, tmp_path: Path) -> None:
    family = str(PATIENT.PatientName).split("^")[0]
    keys = {
        "QueryRetrieveLevel": "STUDY",
        "PatientName": family[:3].lower() + "*",  # PN matching is case-insensitive, as in QIDO-RS
        "StudyDate": "20210301-20210331",
        "StudyInstanceUID": "",
    }
    found = _findscu(archive, "-S", keys, tmp_path)
    expected = _search(archive, "study", {k: v for k, v in keys.items() if k != "QueryRetrieveLevel"})
    assert {ds.StudyInstanceUID for ds in found} == {ds.StudyInstanceUID for ds in expected}
    assert {ds.StudyInstanceUID for ds in found} == {SYNTH[0].StudyInstanceUID}  # the March CT only


def test_findscu_patient_root_patient_level(archive: Node, tmp_path: Path) -> None:
    keys = {"QueryRetrieveLevel": "PATIENT", "PatientID": "*", "PatientName": "", "PatientBirthDate": "",
            "NumberOfPatientRelatedStudies": ""}  # fmt: skip
    found = _findscu(archive, "-P", keys, tmp_path)
    expected = _search(archive, "patient", {k: v for k, v in keys.items() if k != "QueryRetrieveLevel"})
    cols = ["PatientID", "PatientName", "PatientBirthDate", "NumberOfPatientRelatedStudies"]
    assert _answers(found, cols) == _answers(expected, cols)
    by_id = {ds.PatientID: ds for ds in found}
    assert by_id[PATIENT.PatientID].NumberOfPatientRelatedStudies == 2


def test_findscu_series_and_image_levels(archive: Node, tmp_path: Path) -> None:
    ct = [ds for ds in SYNTH if ds.Modality == "CT"]
    study = ct[0].StudyInstanceUID
    series = _findscu(
        archive,
        "-S",
        {
            "QueryRetrieveLevel": "SERIES",
            "StudyInstanceUID": study,
            "SeriesInstanceUID": "",
            "Modality": "",
            "NumberOfSeriesRelatedInstances": "",
        },  # fmt: skip
        tmp_path / "series",
    )
    assert {ds.SeriesInstanceUID for ds in series} == {ds.SeriesInstanceUID for ds in ct}
    assert {ds.Modality for ds in series} == {"CT"}
    assert {int(ds.NumberOfSeriesRelatedInstances) for ds in series} == {2}
    first = ct[0].SeriesInstanceUID
    images = _findscu(
        archive,
        "-P",
        {
            "QueryRetrieveLevel": "IMAGE",
            "PatientID": ct[0].PatientID,
            "StudyInstanceUID": study,
            "SeriesInstanceUID": first,
            "SOPInstanceUID": "",
            "InstanceNumber": "",
        },  # fmt: skip
        tmp_path / "images",
    )
    assert {ds.SOPInstanceUID for ds in images} == {
        ds.SOPInstanceUID for ds in ct if ds.SeriesInstanceUID == first
    }


def _find_status(
    node: Node, identifier: Dataset, model: str = StudyRootQueryRetrieveInformationModelFind
) -> Dataset:
    ae = AE(ae_title="PACS1")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_find(identifier, model))
    finally:
        assoc.release()
    status, _ = responses[-1]
    return status


def _identifier(**keys: str) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _retrieve(archive: Node, model: Any, identifier: Dataset, move_to: str | None = None) -> list[Any]:
    """A C-MOVE (to `move_to`) or C-GET as a peer sends it, on an association of its own: the
    responses."""
    ae = AE(ae_title="PACS1")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", archive.port, ae_title=archive.aet)
    try:
        if move_to is None:
            return list(assoc.send_c_get(identifier, model))
        return list(assoc.send_c_move(identifier, move_to, model))
    finally:
        assoc.release()


def test_find_with_invalid_keys_or_values_fails_with_a_reason(archive: Node) -> None:
    bad_date = _find_status(archive, _identifier(QueryRetrieveLevel="STUDY", StudyDate="2021xx01"))
    assert bad_date.Status == 0xC000 and "StudyDate" in bad_date.ErrorComment
    no_level = _find_status(archive, _identifier(PatientID="X"))
    assert no_level.Status == 0xA900 and "QueryRetrieveLevel" in no_level.ErrorComment
    # PATIENT is not a level of the Study Root model.
    wrong_level = _find_status(archive, _identifier(QueryRetrieveLevel="PATIENT", PatientID="X"))
    assert wrong_level.Status == 0xA900
    wildcard_uid = _find_status(archive, _identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2.*"))
    assert wildcard_uid.Status == 0xA900
    # The SCP still answers a good question on the same node.
    ok = _find_status(
        archive,
        _identifier(QueryRetrieveLevel="PATIENT", PatientID=PATIENT.PatientID),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert ok.Status == 0x0000


# -- retrieve -------------------------------------------------------------------------------


@pytest.fixture
def sink(archive: Node, tmp_path: Path) -> Iterator[Any]:
    """A dcmtk storescp registered as a facility archive (its AE title is a move destination)."""
    with storescp(tmp_path / "sink", aet="SINKAE") as peer:
        with Session(archive.state.engine) as session:
            if "sinkfac" not in {f.id for f in facilities.list_facilities(session=session)}:
                facilities.add_facility(
                    session=session, principal=ADMIN, facility_id="sinkfac", issuer="SINK", ae_title="SINKAE",
                    host="127.0.0.1", port=peer.port,
                )  # fmt: skip
            else:
                facilities.update_facility(
                    session=session, principal=ADMIN, facility_id="sinkfac", port=peer.port
                )
        yield peer


def _image_keys(ds: Dataset) -> list[str]:
    return [
        "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
        "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}", "-k", f"SOPInstanceUID={ds.SOPInstanceUID}",
    ]  # fmt: skip


def _uids(files: list[Path]) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}


def test_movescu_study_to_a_registered_destination(archive: Node, sink: Any) -> None:
    study = [ds for ds in SYNTH if ds.Modality == "MR"]
    done = dcmtk(
        "movescu", "-aet", "PACS1", "-aec", archive.aet, "-aem", "SINKAE", "-S",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study[0].StudyInstanceUID}",
        "127.0.0.1", str(archive.port),
    )  # fmt: skip
    assert done.returncode == 0
    assert _uids(sink.files()) == {ds.SOPInstanceUID for ds in study}
    received = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in sink.files()}
    for ds in study:
        assert received[ds.SOPInstanceUID].PixelData == ds.PixelData


def test_movescu_compressed_instance_arrives_in_its_stored_syntax(archive: Node, sink: Any) -> None:
    original = pydicom.dcmread(TEST_FILES / COMPRESSED)
    dcmtk(
        "movescu", "-aet", "PACS1", "-aec", archive.aet, "-aem", "SINKAE", "-S",
        *_image_keys(original),
        "127.0.0.1", str(archive.port),
    )  # fmt: skip
    (path,) = sink.files()
    got = pydicom.dcmread(path)
    assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert got.PixelData == original.PixelData


def test_move_to_an_unknown_destination_fails_with_a801(archive: Node) -> None:
    ae = AE(ae_title="PACS1")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", archive.port, ae_title=archive.aet)
    try:
        identifier = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=PATIENT.StudyInstanceUID)
        responses = list(
            assoc.send_c_move(identifier, "NOSUCHAE", StudyRootQueryRetrieveInformationModelMove)
        )
    finally:
        assoc.release()
    assert responses[-1][0].Status == 0xA801


def test_getscu_series_and_patient(archive: Node, tmp_path: Path) -> None:
    ct = [ds for ds in SYNTH if ds.Modality == "CT"]
    series = ct[0].SeriesInstanceUID
    out = tmp_path / "get"
    out.mkdir()
    dcmtk(
        "getscu", "-aet", "PACS1", "-aec", archive.aet, "-S", "-od", out,
        "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={ct[0].StudyInstanceUID}",
        "-k", f"SeriesInstanceUID={series}", "127.0.0.1", str(archive.port),
    )  # fmt: skip
    assert _uids(list(out.iterdir())) == {ds.SOPInstanceUID for ds in ct if ds.SeriesInstanceUID == series}
    out2 = tmp_path / "patient"
    out2.mkdir()
    dcmtk(
        "getscu", "-aet", "PACS1", "-aec", archive.aet, "-P", "-od", out2,
        "-k", "QueryRetrieveLevel=PATIENT", "-k", f"PatientID={PATIENT.PatientID}",
        "127.0.0.1", str(archive.port),
    )  # fmt: skip
    assert _uids(list(out2.iterdir())) == {
        ds.SOPInstanceUID for ds in SYNTH if ds.PatientID == PATIENT.PatientID
    }


def test_getscu_of_a_compressed_instance_is_decompressed_for_a_peer_that_takes_only_uncompressed(
    archive: Node, tmp_path: Path
) -> None:
    original = pydicom.dcmread(TEST_FILES / COMPRESSED)
    out = tmp_path / "get"
    out.mkdir()
    dcmtk(
        "getscu", "-aet", "PACS1", "-aec", archive.aet, "-S", "-od", out,
        *_image_keys(original),
        "127.0.0.1", str(archive.port),
    )  # fmt: skip
    (path,) = list(out.iterdir())
    got = pydicom.dcmread(path)
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert got.pixel_array.shape == original.pixel_array.shape


def test_move_reports_instances_it_cannot_read_as_failed_sub_operations(archive: Node, sink: Any) -> None:
    cr = [ds for ds in SYNTH if ds.Modality == "CR"]
    with Session(archive.state.engine) as session:
        refs = find_instances(session=session, study_uid=cr[0].StudyInstanceUID)
    lost = refs[0]
    archive.state.store.delete(lost.object_key)  # indexed, but the object is gone
    identifier = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=cr[0].StudyInstanceUID)
    responses = _retrieve(archive, StudyRootQueryRetrieveInformationModelMove, identifier, move_to="SINKAE")
    final, _ = responses[-1]
    assert final.Status == 0xB000  # warning: some sub-operations failed
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (len(refs) - 1, 1)
    assert _uids(sink.files()) == {r.sop_uid for r in refs[1:]}


def test_move_with_an_invalid_identifier_fails_with_a900(archive: Node, sink: Any) -> None:
    responses = _retrieve(
        archive,
        StudyRootQueryRetrieveInformationModelMove,
        _identifier(StudyInstanceUID="1.2.3"),
        move_to="SINKAE",
    )
    final, _ = responses[-1]
    assert final.Status == 0xA900 and "QueryRetrieveLevel" in final.ErrorComment
    assert sink.files() == []


def test_no_patient_data_in_logs(archive: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    name = str(PATIENT.PatientName)
    with caplog.at_level(logging.DEBUG):
        found = _findscu(
            archive, "-P",
            {"QueryRetrieveLevel": "STUDY", "SpecificCharacterSet": "ISO_IR 192", "PatientName": name,
             "PatientID": PATIENT.PatientID, "PatientBirthDate": ""},
            tmp_path,
        )  # fmt: skip
    assert found and all(str(ds.PatientName) == name for ds in found)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Accepting Association" in logged  # the logs were captured
    for secret in (name, name.split("^")[0], PATIENT.PatientID, PATIENT.PatientBirthDate):
        assert secret not in logged


@pytest.mark.parametrize(
    "keys",
    [
        {"QueryRetrieveLevel": "STUDY", "PatientID": "*"},  # would move the whole archive
        {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.3"},  # no series named
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"},
    ],
)
def test_move_needs_the_unique_key_of_its_level(archive: Node, sink: Any, keys: dict[str, str]) -> None:
    responses = _retrieve(
        archive, StudyRootQueryRetrieveInformationModelMove, _identifier(**keys), move_to="SINKAE"
    )
    final, _ = responses[-1]
    assert final.Status == 0xA900
    assert sink.files() == []


def test_find_with_a_key_the_index_cannot_match_warns_ff01(archive: Node) -> None:
    ae = AE(ae_title="PACS1")
    model = StudyRootQueryRetrieveInformationModelFind
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", archive.port, ae_title=archive.aet)
    try:
        identifier = _identifier(
            QueryRetrieveLevel="STUDY", StudyInstanceUID=PATIENT.StudyInstanceUID, InstitutionName="Nowhere"
        )
        responses = list(assoc.send_c_find(identifier, model))
    finally:
        assoc.release()
    # PS3.4 C.4.1.1.3.1: the unsupported key is ignored for matching, and the SCP says so.
    assert [rsp.Status for rsp, _ in responses] == [0xFF01, 0x0000]
    first = responses[0][1]
    assert first is not None and first.StudyInstanceUID == PATIENT.StudyInstanceUID


def _find_statuses(node: Node, identifier: Dataset) -> list[int]:
    ae = AE(ae_title="PACS1")
    model = StudyRootQueryRetrieveInformationModelFind
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
    try:
        return [rsp.Status for rsp, _ in assoc.send_c_find(identifier, model)]
    finally:
        assoc.release()


def test_find_with_a_sequence_match_value_warns_ff01(archive: Node) -> None:
    # Sequence matching (PS3.4 C.2.2.2.6) is not supported: a sequence key whose item holds a
    # value is ignored for matching, and the peer must be told (FF01), not led to believe
    # that every answer has procedure code X.
    identifier = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=PATIENT.StudyInstanceUID)
    identifier.ProcedureCodeSequence = [_identifier(CodeValue="X", CodingSchemeDesignator="")]
    assert _find_statuses(archive, identifier) == [0xFF01, 0x0000]
    # An item of empty keys asks only for the sequence to be returned: nothing is ignored.
    identifier.ProcedureCodeSequence = [_identifier(CodeValue="", CodingSchemeDesignator="")]
    assert _find_statuses(archive, identifier) == [0xFF00, 0x0000]


def test_find_patient_level_answers_the_patient_related_counts(archive: Node) -> None:
    ae = AE(ae_title="PACS1")
    model = PatientRootQueryRetrieveInformationModelFind
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", archive.port, ae_title=archive.aet)
    identifier = _identifier(
        QueryRetrieveLevel="PATIENT",
        PatientID=PATIENT.PatientID,
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="",
    )
    try:
        answers = [found for _rsp, found in assoc.send_c_find(identifier, model) if found is not None]
    finally:
        assoc.release()
    mine = [ds for ds in SYNTH if ds.PatientID == PATIENT.PatientID]
    # PS3.4 C.6.1.1.2: the counts of the patient's studies, series and instances held.
    counts = [f"NumberOfPatientRelated{what}" for what in ("Studies", "Series", "Instances")]
    studies, series = {ds.StudyInstanceUID for ds in mine}, {ds.SeriesInstanceUID for ds in mine}
    expected = (len(studies), len(series), len(mine))
    assert [tuple(str(a.get(k)) for k in counts) for a in answers] == [tuple(str(n) for n in expected)]


def test_move_with_an_invalid_identifier_connects_nowhere(
    archive: Node, caplog: pytest.LogCaptureFixture
) -> None:
    # A registered destination that is down: the bad identifier is the answer (0xA900), not
    # "destination unknown" from a sub-association that should never have been attempted; and
    # the server's log does not report it as a broken handler with a traceback.
    with Session(archive.state.engine) as session:
        facilities.add_facility(
            session=session, principal=ADMIN, facility_id="downfac", issuer="DOWN", ae_title="DOWNAE",
            host="127.0.0.1", port=free_port(),
        )  # fmt: skip
    responses = _retrieve(
        archive,
        StudyRootQueryRetrieveInformationModelMove,
        _identifier(QueryRetrieveLevel="STUDY"),
        move_to="DOWNAE",
    )
    final, _ = responses[-1]
    assert final.Status == 0xA900 and "StudyInstanceUID" in final.ErrorComment
    assert final.get("NumberOfFailedSuboperations") is None  # no sub-operation was attempted
    server = [
        r for r in caplog.records if r.name == "pynetdicom.service_class" and r.levelno >= logging.ERROR
    ]
    assert server == []


def test_find_ignores_group_lengths_as_some_modalities_send(
    archive: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Group Length (gggg,0000) is retired (PS3.5 7.2) but older devices (GE workstations among
    # them) still put it in their queries; it is no key, and no reason to refuse the query.
    # pynetdicom's encoder drops group lengths, so they are put on the wire here.
    encode = pynetdicom.association.encode

    def with_group_length(ds: Dataset, implicit: bool, little: bool, deflated: bool = False) -> bytes | None:
        body = encode(ds, implicit, little, deflated)
        assert body is not None and little
        if implicit:
            return struct.pack("<HHII", 0x0008, 0x0000, 4, 14) + body
        return struct.pack("<HH2sHI", 0x0008, 0x0000, b"UL", 4, 14) + body

    monkeypatch.setattr(pynetdicom.association, "encode", with_group_length)
    identifier = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=PATIENT.StudyInstanceUID)
    assert _find_statuses(archive, identifier) == [0xFF00, 0x0000]


def test_get_with_an_invalid_identifier_reports_no_sub_operation(archive: Node) -> None:
    responses = _retrieve(
        archive, StudyRootQueryRetrieveInformationModelGet, _identifier(QueryRetrieveLevel="STUDY")
    )
    final, _ = responses[-1]
    assert final.Status == 0xA900 and "StudyInstanceUID" in final.ErrorComment
    # Refused before any sub-operation: a getscu must not show "1 failed" for it.
    assert final.get("NumberOfFailedSuboperations") in (None, 0)


def test_get_of_a_list_of_patients_is_refused_with_a_reason(archive: Node) -> None:
    # PATIENT level names one patient (PS3.4 C.4.2.2.1: single value matching on Patient ID);
    # a list was read as one ID holding a backslash and answered Success with nothing sent.
    identifier = _identifier(QueryRetrieveLevel="PATIENT", PatientID=f"{PATIENT.PatientID}\\OTHER")
    responses = _retrieve(archive, PatientRootQueryRetrieveInformationModelGet, identifier)
    final, _ = responses[-1]
    assert final.Status == 0xA900 and "single" in final.ErrorComment


def test_find_with_a_key_missing_from_the_dictionary_ignores_it_with_ff01(archive: Node) -> None:
    # A well-formed tag the dictionary does not know (a newer standard's, say) is an optional
    # key the SCP does not support (PS3.4 C.4.1.1.3.1), as it is for QIDO-RS: ignored for
    # matching, with FF01, and not returned. The query is not refused.
    identifier = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=PATIENT.StudyInstanceUID)
    identifier.add_new(0x00080003, "LO", "x")
    identifier.add_new(0x00101234, "LO", "")
    ae = AE(ae_title="PACS1")
    model = StudyRootQueryRetrieveInformationModelFind
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", archive.port, ae_title=archive.aet)
    try:
        responses = list(assoc.send_c_find(identifier, model))
    finally:
        assoc.release()
    assert [rsp.Status for rsp, _ in responses] == [0xFF01, 0x0000]
    found = responses[0][1]
    assert found is not None and found.StudyInstanceUID == PATIENT.StudyInstanceUID
    assert 0x00080003 not in found and 0x00101234 not in found
