"""Which attributes belong to which query level, and which QIDO-RS returns by default.

From PS3.18 Tables 10.6.1-5 / 10.6.3-3..5 (QIDO-RS required return attributes) and the
Patient, General Study, Patient Study and General Series modules of PS3.3.
"""

from __future__ import annotations

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword


def tag_hex(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}"


def resolve_key(key: str) -> str | None:
    """A QIDO/C-FIND attribute key -> tag hex, else None (PS3.18 8.3.4.1).

    The grammar is `tag = 8HEXDIG / keyword from PS3.6`: any eight hex digits name an attribute
    (private, or public but newer than pydicom's dictionary) and are accepted here; whether the
    index can match on it is the query engine's business. A keyword must be a registered one.
    """
    key = key.strip()
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        return key.upper()
    if not key.isidentifier():
        # pydicom's dictionary holds an entry with an empty keyword; "" names nothing.
        return None
    found = tag_for_keyword(key)
    return f"{found:08X}" if found is not None else None


def vr_of(tag: str) -> str:
    """The tag's VR from the data dictionary (the first of "US or SS"), "UN" when unknown."""
    try:
        return str(dictionary_VR(int(tag, 16))).split(" or ")[0]
    except (KeyError, ValueError):
        return "UN"


def keyword_of(tag: str) -> str:
    return keyword_for_tag(int(tag, 16)) or tag


def _tags(*keywords: str) -> frozenset[str]:
    return frozenset(tag_hex(k) for k in keywords)


STUDY_TAGS = _tags(
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "StudyDescription",
    "StudyInstanceUID",
    "StudyID",
    "ProcedureCodeSequence",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "InstitutionName",
    "TimezoneOffsetFromUTC",
    "SpecificCharacterSet",
    "ReasonForPerformedProcedureCodeSequence",
    "RequestedProcedureDescription",
)
SERIES_TAGS = _tags(
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "Laterality",
    "PatientPosition",
    "ProtocolName",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepID",
    "PerformedProcedureStepDescription",
    "RequestAttributesSequence",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "FrameOfReferenceUID",
    "OperatorsName",
    "PerformingPhysicianName",
    "InstitutionalDepartmentName",
)


def is_study_level(tag: str) -> bool:
    return tag.startswith("0010") or tag in STUDY_TAGS


def is_series_level(tag: str) -> bool:
    return tag in SERIES_TAGS


STUDY_DEFAULTS = _tags(
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "TimezoneOffsetFromUTC",
    "RetrieveURL",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "StudyDescription",
)
SERIES_DEFAULTS = _tags(
    "SpecificCharacterSet",
    "Modality",
    "TimezoneOffsetFromUTC",
    "SeriesDescription",
    "RetrieveURL",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
    "BodyPartExamined",
    "InstanceAvailability",
)
INSTANCE_DEFAULTS = _tags(
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "TimezoneOffsetFromUTC",
    "RetrieveURL",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
PATIENT_DEFAULTS = _tags(
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
)
