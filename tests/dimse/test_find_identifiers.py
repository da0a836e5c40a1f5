"""C-FIND pending responses: the identifiers the SCP encodes straight from the index's DICOM JSON
(`IdentifierEncoder`) and sends itself (`_PendingResponses`) must be exactly what pydicom and
pynetdicom would have sent for the Dataset built from the same match."""

from __future__ import annotations

import copy
import queue
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlmodel import Session

from broker.demo import synth
from broker.dimse import service as ds
from broker.index.schemas import Query
from broker.index.service import ingest_files, search
from broker.security.schemas import Principal, Role
from tests.dimse.conftest import SYNTH, Node
from tests.peers import dcmtk

# -- the reference: the Dataset the SCP used to hand pynetdicom, encoded by pydicom -----------


def reference_identifier(
    match: dict[str, Any], request: ds.FindRequest, *, retrieve_ae_title: str | None = None
) -> Dataset:
    """Exactly the requested keys (PS3.4 C.4.1.1.3.2) with the match's values and VRs, empty
    (dictionary VR) where it has none, RetrieveAETitle filled in when empty, TimezoneOffsetFromUTC
    left out when the match has none (it may not be sent empty)."""
    found = Dataset.from_json(copy.deepcopy(match))
    out = Dataset()
    out.SpecificCharacterSet = "ISO_IR 192"
    out.QueryRetrieveLevel = request.level
    for tag in request.return_keys:
        if tag == 0x00080054 and retrieve_ae_title and (tag not in found or found[tag].is_empty):
            out.RetrieveAETitle = retrieve_ae_title
        elif tag == 0x00080201:
            if tag in found and not found[tag].is_empty:
                out[tag] = found[tag]
        elif tag in found:
            out[tag] = found[tag]
        else:
            vr = dictionary_VR(tag).split(" or ")[0]
            out[tag] = DataElement(tag, vr, DicomSequence() if vr == "SQ" else None)
    return out


def _request(level: str, *keywords: str) -> ds.FindRequest:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in keywords:
        vr = dictionary_VR(keyword)
        setattr(identifier, keyword, DicomSequence() if vr == "SQ" else None if vr in ("US", "DS") else "")
    return ds.parse_identifier(identifier, levels=ds.PATIENT_ROOT_LEVELS)


STUDY_KEYS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientWeight", "StudyDate",
    "StudyTime", "AccessionNumber", "StudyID", "StudyInstanceUID", "StudyDescription",
    "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries",
    "RetrieveAETitle", "InstitutionName", "ReferencedStudySequence", "OtherPatientIDs",
    "InstanceAvailability", "Rows", "OtherPatientNames",
)  # fmt: skip

MATCHES: dict[str, dict[str, Any]] = {
    "plain": {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        "00100020": {"vr": "LO", "Value": ["PID-1"]},
        "00080020": {"vr": "DA", "Value": ["20210310"]},
        "00080030": {"vr": "TM", "Value": ["101010.123"]},
        "00080061": {"vr": "CS", "Value": ["CT", "SR"]},  # multi-valued
        "00201208": {"vr": "IS", "Value": [10]},
        "00201206": {"vr": "IS", "Value": [2]},
        "0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.8.498.1"]},  # odd: NUL padded
        "00080056": {"vr": "CS", "Value": ["ONLINE"]},
        "00080201": {"vr": "SH", "Value": ["+0100"]},  # beside StudyDate and StudyTime, unasked
    },
    "ideographic and phonetic person names, UTF-8 text": {
        "00100010": {
            "vr": "PN",
            "Value": [
                {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
            ],
        },
        "00081030": {"vr": "LO", "Value": ["Thorax Zürich 北京"]},
        "00100040": {"vr": "CS", "Value": ["O"]},
    },
    "person name groups: phonetic only, ideographic empty, several names": {
        "00100010": {"vr": "PN", "Value": [{"Phonetic": "やまだ"}]},
        "00101001": {
            "vr": "PN",
            "Value": [{"Alphabetic": "A^B", "Ideographic": ""}, None, {}, {"Ideographic": "X="}],
        },
    },
    "empty values of every shape": {
        "00100010": {"vr": "PN"},
        "00100020": {"vr": "LO", "Value": []},
        "00080020": {"vr": "DA", "Value": [None]},
        "00080050": {"vr": "SH", "Value": [""]},
        "00080054": {"vr": "AE", "Value": [""]},  # filled in with this node's AE title
        "00081110": {"vr": "SQ", "Value": []},
        "00101000": {"vr": "LO", "Value": ["A", None, "B"]},
        "00080201": {"vr": "SH", "Value": [""]},  # left out: never sent with a zero length
    },
    "sequence with items, numbers pydicom formats, a binary VR": {
        "00081110": {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": ["1.2.840.10008.3.1.2.3.1"]},
                    "00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
                },
                {},
            ],
        },
        "00101030": {"vr": "DS", "Value": [70.5]},
        "00201208": {"vr": "IS", "Value": ["007"]},
        "00280010": {"vr": "US", "Value": [512]},
        "00080054": {"vr": "AE", "Value": ["ELSEWHERE"]},  # kept: the index knows better
    },
    "values pydicom changes or encodes in its default repertoire": {
        "0020000D": {"vr": "UI", "Value": ["1.2.3.4 "]},  # UIDs are stripped
        "00101030": {"vr": "DS", "Value": ["70.50"]},
        "00100040": {"vr": "CS", "Value": ["Ä"]},  # not ASCII in a CS
        "00080020": {"vr": "DA", "Value": ["20210310", "20210311"]},
    },
}


@pytest.mark.parametrize("implicit_vr", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize("name", list(MATCHES))
def test_encoded_identifier_is_what_pydicom_writes_for_the_dataset(name: str, implicit_vr: bool) -> None:
    request = _request("STUDY", *STUDY_KEYS)
    match = MATCHES[name]
    encoder = ds.IdentifierEncoder(request, implicit_vr=implicit_vr, retrieve_ae_title="SCANONCE")
    got = encoder.encode(match)
    want = encode(reference_identifier(match, request, retrieve_ae_title="SCANONCE"), implicit_vr, True)
    assert want and got == want
    decoded = decode(BytesIO(got), implicit_vr, True)
    zoned = {"TimezoneOffsetFromUTC"} if name == "plain" else set()  # the one match with an offset
    assert {e.keyword for e in decoded} == {*STUDY_KEYS, "SpecificCharacterSet", "QueryRetrieveLevel", *zoned}
    assert decoded.SpecificCharacterSet == "ISO_IR 192"


def test_person_name_groups_and_text_decode_as_sent() -> None:
    request = _request("STUDY", "PatientName", "StudyDescription", "ModalitiesInStudy", "InstitutionName")
    encoder = ds.IdentifierEncoder(request, implicit_vr=False)
    match = MATCHES["ideographic and phonetic person names, UTF-8 text"] | MATCHES["plain"]
    match["00100010"] = MATCHES["ideographic and phonetic person names, UTF-8 text"]["00100010"]
    decoded = decode(BytesIO(encoder.encode(match)), False, True)
    assert str(decoded.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert decoded.PatientName.ideographic == "山田^太郎"
    assert decoded.StudyDescription == "Thorax Zürich 北京"
    assert list(decoded.ModalitiesInStudy) == ["CT", "SR"]
    assert decoded["InstitutionName"].is_empty and decoded["InstitutionName"].VR == "LO"


# -- over a real association --------------------------------------------------------------

NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"


def _crafted_study() -> list[Dataset]:
    """A CT and an SR series of one study, for a patient with ideographic and phonetic names."""
    base = SYNTH[0]
    study_uid, patient_id = generate_uid(), "JP-0001"
    out = []
    for modality in ("CT", "SR"):
        inst = copy.deepcopy(base)
        inst.SpecificCharacterSet = "ISO_IR 192"
        inst.PatientName = NAME
        inst.PatientID = patient_id
        inst.StudyInstanceUID = study_uid
        inst.SeriesInstanceUID = generate_uid()
        inst.SOPInstanceUID = generate_uid()
        inst.file_meta.MediaStorageSOPInstanceUID = inst.SOPInstanceUID
        inst.Modality = modality
        inst.StudyDescription = "Thorax Zürich 北京"
        out.append(inst)
    return out


CRAFTED = _crafted_study()


@pytest.fixture(scope="module")
def archive(loaded_node: Node, tmp_path_factory: pytest.TempPathFactory) -> Node:
    folder = tmp_path_factory.mktemp("find-archive")
    paths = [str(p) for p in synth.write_files([*SYNTH, *CRAFTED], folder)]
    outcomes = ingest_files(
        engine=loaded_node.state.engine,
        store=loaded_node.state.store,
        principal=Principal(who="test", role=Role.admin, facility="local"),
        facility_id="local",
        paths=paths,
    )
    assert all(o.ok for o in outcomes), [o.message for o in outcomes if not o.ok]
    return loaded_node


FIND_KEYS = ("PatientName", "PatientID", "StudyDate", "StudyInstanceUID", "StudyDescription",
             "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "AdmittingDiagnosesDescription",
             "ReferencedStudySequence", "RetrieveAETitle")  # fmt: skip


def _expected(node: Node, request: ds.FindRequest) -> list[Dataset]:
    keywords = [pydicom.datadict.keyword_for_tag(t) for t in request.return_keys]
    with Session(node.state.engine) as session:
        result = search(
            session=session,
            query=Query(
                level=request.query_level,
                filters=dict(request.filters),
                includefields=frozenset(keywords),
                limit=1000,
            ),  # fmt: skip
        )
    return [reference_identifier(m, request, retrieve_ae_title=node.aet) for m in result.matches]


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian], ids=["implicit", "explicit"]
)
@pytest.mark.parametrize("max_pdu", [0, 64], ids=["unlimited-pdu", "64-byte-pdu"])
def test_pynetdicom_scu_receives_the_reference_identifiers(archive: Node, syntax: str, max_pdu: int) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    for keyword in FIND_KEYS:
        setattr(identifier, keyword, DicomSequence() if keyword.endswith("Sequence") else "")
    ae = AE(ae_title="PACS1")
    model = StudyRootQueryRetrieveInformationModelFind
    ae.add_requested_context(model, [syntax])
    # max_pdu 64: every command set and identifier reaches the SCU in several fragments.
    assoc = ae.associate("127.0.0.1", archive.port, ae_title=archive.aet, max_pdu=max_pdu)
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_find(identifier, model))
    finally:
        assoc.release()
    assert [rsp.Status for rsp, _ in responses[:-1]] == [0xFF00] * (len(responses) - 1)
    assert responses[-1][0].Status == 0x0000
    got = [found for _, found in responses[:-1] if found is not None]
    expected = _expected(archive, ds.parse_identifier(identifier, levels=ds.STUDY_ROOT_LEVELS))
    assert len(got) == len(expected) == 4  # the three synthetic studies and the crafted one
    assert sorted(got, key=lambda d: d.StudyInstanceUID) == sorted(expected, key=lambda d: d.StudyInstanceUID)
    mine = next(d for d in got if d.PatientID == "JP-0001")
    assert str(mine.PatientName) == NAME
    assert list(mine.ModalitiesInStudy) == ["CT", "SR"] and mine.NumberOfStudyRelatedInstances == 2
    assert mine.RetrieveAETitle == archive.aet
    assert len(mine.ReferencedStudySequence) == 0 and mine["AdmittingDiagnosesDescription"].is_empty


def test_findscu_decodes_ideographic_names_and_utf8(archive: Node, tmp_path: Path) -> None:
    args = ["-aet", "PACS1", "-aec", archive.aet, "-P", "-X", "-od", str(tmp_path)]
    for k in ("QueryRetrieveLevel=STUDY", "PatientID=JP-0001", "PatientName", "StudyDescription",
              "ModalitiesInStudy", "NumberOfStudyRelatedSeries"):  # fmt: skip
        args += ["-k", k]
    dcmtk("findscu", *args, "127.0.0.1", str(archive.port))
    (found,) = [pydicom.dcmread(p) for p in sorted(tmp_path.glob("rsp*.dcm"))]
    assert str(found.PatientName) == NAME
    assert found.StudyDescription == "Thorax Zürich 北京"
    assert list(found.ModalitiesInStudy) == ["CT", "SR"] and found.NumberOfStudyRelatedSeries == 2


# -- cancel ---------------------------------------------------------------------------------


class _RecordingDul:
    def __init__(self) -> None:
        self.to_provider_queue: queue.Queue[Any] = queue.Queue()
        self.sent: list[P_DATA] = []

    def send_pdu(self, primitive: P_DATA) -> None:
        self.sent.append(primitive)


class _Assoc:
    """Just enough of an association: who calls, and a DUL that records what is sent."""

    def __init__(self) -> None:
        self.requestor = type("Requestor", (), {"ae_title": "PACS1"})()
        self.dimse = type("Dimse", (), {"maximum_pdu_size": 16384})()
        self.dul = _RecordingDul()
        self.is_established = True


class _FindEvent:
    """A C-FIND event whose peer sends C-CANCEL after the first pending response."""

    def __init__(self, identifier: Dataset) -> None:
        self.identifier = identifier
        self.request = type(
            "Req", (), {"AffectedSOPClassUID": PatientRootQueryRetrieveInformationModelFind, "MessageID": 7}
        )()
        self.context = type("Cx", (), {"context_id": 3, "transfer_syntax": ExplicitVRLittleEndian})()
        self.assoc = _Assoc()

    @property
    def is_cancelled(self) -> bool:
        return bool(self.assoc.dul.sent)


def _messages(sent: list[P_DATA]) -> Iterator[Any]:
    """Reassemble the recorded P-DATA into DIMSE messages with pynetdicom's own decoder."""
    message = C_FIND_RSP()
    for pdata in sent:
        if message.decode_msg(pdata):
            yield message.message_to_primitive()
            message = C_FIND_RSP()


def test_find_stops_with_cancel_status_when_the_peer_cancels(archive: Node) -> None:
    from broker.dimse.scp import _on_find

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.PatientName = ""
    event = _FindEvent(identifier)
    yielded = [status for status, _ in _on_find(event, archive.scp)]  # type: ignore[arg-type]
    assert yielded == [0xFE00]  # Cancel, for pynetdicom to send; the other studies are not sent
    (pending,) = list(_messages(event.assoc.dul.sent))
    assert pending.Status == 0xFF00 and pending.MessageIDBeingRespondedTo == 7
    assert pending.AffectedSOPClassUID == PatientRootQueryRetrieveInformationModelFind
    found = decode(pending.Identifier, False, True)
    assert found.QueryRetrieveLevel == "STUDY" and found.StudyInstanceUID and "PatientName" in found


class _VanishingPeerEvent(_FindEvent):
    """A C-FIND event whose association is aborted once the first response is queued."""

    @property
    def is_cancelled(self) -> bool:
        if self.assoc.dul.sent:
            self.assoc.is_established = False
        return False


def test_find_stops_sending_when_the_association_is_gone(archive: Node) -> None:
    from broker.dimse.scp import _on_find

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    event = _VanishingPeerEvent(identifier)
    assert list(_on_find(event, archive.scp)) == []  # type: ignore[arg-type]
    assert len(list(_messages(event.assoc.dul.sent))) == 1  # of the four studies
