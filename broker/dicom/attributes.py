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
    """A QIDO/C-FIND attribute key given by keyword or by 8-hex-digit tag -> tag hex, else None."""
    key = key.strip()
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        tag = int(key, 16)
        try:
            dictionary_VR(tag)
        except KeyError:
            if (tag >> 16) % 2 == 0:
                return None
        return key.upper()
    found = tag_for_keyword(key)
    return f"{found:08X}" if found is not None else None


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
