"""The CT Radiation Dose SR content a CT scanner writes (DICOM PS3.16 TID 10011), built with pydicom.

A scanner reports its dose as an X-Ray Radiation Dose SR (SOP Class 1.2.840.10008.5.1.4.1.1.88.67),
a series of its own (Modality SR) in the study it irradiated. Its content tree, by coded concept:

    (113701, DCM) X-Ray Radiation Dose Report          CONTAINER, TID 10011 CT Radiation Dose
      HAS CONCEPT MOD (121058, DCM) Procedure reported = (77477000, SCT) Computed Tomography X-Ray
        HAS CONCEPT MOD (363703001, SCT) Has Intent   = (261004008, SCT) Diagnostic Intent
      HAS OBS CONTEXT  device observer (TID 1002/1004: 121005, 121012..121016)
      CONTAINS (113809, DCM) Start of X-Ray Irradiation, (113810, DCM) End of X-Ray Irradiation
      CONTAINS (113705, DCM) Scope of Accumulation = (113014, DCM) Study
        HAS PROPERTIES (110180, DCM) Study Instance UID
      CONTAINS (113811, DCM) CT Accumulated Dose Data   TID 10012
        (113812, DCM) Total Number of Irradiation Events  {events}
        (113813, DCM) CT Dose Length Product Total        mGy.cm
      CONTAINS (113819, DCM) CT Acquisition, one per irradiation event   TID 10013
        (125203, DCM) Acquisition Protocol, (123014, DCM) Target Region,
        (113820, DCM) CT Acquisition Type, (113769, DCM) Irradiation Event UID,
        (113822, DCM) CT Acquisition Parameters (exposure time, scanning length, collimation,
            pitch, number of sources, (113831, DCM) CT X-Ray Source Parameters: kVp, mA, rotation),
        (113829, DCM) CT Dose: (113830, DCM) Mean CTDIvol mGy, (113835, DCM) CTDIw Phantom Type,
            (113838, DCM) DLP mGy.cm   -- absent for a localizer (Constant Angle Acquisition)

Units are UCUM. A reader must find values by concept code, never by position or code meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset

__all__ = [
    "ACQUISITION_TYPES",
    "PHANTOMS",
    "TARGET_REGIONS",
    "CtIrradiationEvent",
    "DeviceObserver",
    "ct_radiation_dose_content",
]

Code = tuple[str, str, str]  # (CodeValue, CodingSchemeDesignator, CodeMeaning)

# CID 10013 CT Acquisition Type
ACQUISITION_TYPES: dict[str, Code] = {
    "sequenced": ("113804", "DCM", "Sequenced Acquisition"),
    "spiral": ("116152004", "SCT", "Spiral Acquisition"),
    "constant_angle": ("113805", "DCM", "Constant Angle Acquisition"),
    "stationary": ("113806", "DCM", "Stationary Acquisition"),
}
# CID 4052 Phantom Devices (the CTDIw phantom the scanner's CTDIvol refers to)
PHANTOMS: dict[str, Code] = {
    "head": ("113690", "DCM", "IEC Head Dosimetry Phantom"),
    "body": ("113691", "DCM", "IEC Body Dosimetry Phantom"),
}
# CID 4030 CT, MR and PET Anatomy Imaged, keyed by the images' BodyPartExamined
TARGET_REGIONS: dict[str, Code] = {
    "HEAD": ("69536005", "SCT", "Head"),
    "CHEST": ("43799004", "SCT", "Chest"),
    "ABDOMEN": ("818982008", "SCT", "Abdomen and Pelvis"),
    "CSPINE": ("122494005", "SCT", "Cervical spine"),
}

_REPORT: Code = ("113701", "DCM", "X-Ray Radiation Dose Report")
_CT_XRAY: Code = ("77477000", "SCT", "Computed Tomography X-Ray")
_DIAGNOSTIC_INTENT: Code = ("261004008", "SCT", "Diagnostic Intent")
_DEVICE: Code = ("121007", "DCM", "Device")
_STUDY_SCOPE: Code = ("113014", "DCM", "Study")

_MGY: Code = ("mGy", "UCUM", "mGy")
_MGY_CM: Code = ("mGy.cm", "UCUM", "mGy.cm")
_EVENTS: Code = ("{events}", "UCUM", "events")
_SECONDS: Code = ("s", "UCUM", "s")
_MM: Code = ("mm", "UCUM", "mm")
_RATIO: Code = ("{ratio}", "UCUM", "ratio")
_SOURCES: Code = ("{X-Ray sources}", "UCUM", "X-Ray sources")
_KV: Code = ("kV", "UCUM", "kV")
_MA: Code = ("mA", "UCUM", "mA")


@dataclass(frozen=True, slots=True)
class CtIrradiationEvent:
    """One CT irradiation event as the scanner logged it."""

    event_uid: str
    protocol: str
    acquisition_type: str  # a key of ACQUISITION_TYPES
    body_part: str  # a key of TARGET_REGIONS
    start: datetime
    exposure_time_s: float
    scanning_length_mm: float
    single_collimation_mm: float
    total_collimation_mm: float
    kvp: float
    tube_current_ma: float
    max_tube_current_ma: float
    rotation_time_s: float
    pitch: float | None = None  # spiral and sequenced acquisitions only
    ctdivol_mgy: float | None = None  # None for a localizer: no CT Dose container
    phantom: str = "body"  # a key of PHANTOMS

    @property
    def dlp_mgy_cm(self) -> float | None:
        """DLP as the scanner computes it: CTDIvol times the irradiated length."""
        if self.ctdivol_mgy is None:
            return None
        return round(self.ctdivol_mgy * self.scanning_length_mm / 10.0, 2)


@dataclass(frozen=True, slots=True)
class DeviceObserver:
    uid: str
    name: str
    manufacturer: str
    model: str
    serial: str


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _item(relationship: str, value_type: str, concept: Code) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code_item(concept)]
    return item


def _container(relationship: str, concept: Code, children: Sequence[Dataset]) -> Dataset:
    item = _item(relationship, "CONTAINER", concept)
    item.ContinuityOfContent = "SEPARATE"
    item.ContentSequence = list(children)
    return item


def _code(relationship: str, concept: Code, value: Code, children: Sequence[Dataset] = ()) -> Dataset:
    item = _item(relationship, "CODE", concept)
    item.ConceptCodeSequence = [_code_item(value)]
    if children:
        item.ContentSequence = list(children)
    return item


def _num(concept: Code, value: float, unit: Code) -> Dataset:
    item = _item("CONTAINS", "NUM", concept)
    measured = Dataset()
    # DS holds 16 characters at most: round, and drop a float's trailing noise.
    measured.NumericValue = f"{value:.6g}"
    measured.MeasurementUnitsCodeSequence = [_code_item(unit)]
    item.MeasuredValueSequence = [measured]
    return item


def _text(relationship: str, concept: Code, value: str) -> Dataset:
    item = _item(relationship, "TEXT", concept)
    item.TextValue = value
    return item


def _uidref(relationship: str, concept: Code, value: str) -> Dataset:
    item = _item(relationship, "UIDREF", concept)
    item.UID = value
    return item


def _datetime(concept: Code, value: datetime) -> Dataset:
    item = _item("CONTAINS", "DATETIME", concept)
    item.DateTime = value.strftime("%Y%m%d%H%M%S")
    return item


def _observer(device: DeviceObserver) -> list[Dataset]:
    ctx = "HAS OBS CONTEXT"
    return [
        _code(ctx, ("121005", "DCM", "Observer Type"), _DEVICE),
        _uidref(ctx, ("121012", "DCM", "Device Observer UID"), device.uid),
        _text(ctx, ("121013", "DCM", "Device Observer Name"), device.name),
        _text(ctx, ("121014", "DCM", "Device Observer Manufacturer"), device.manufacturer),
        _text(ctx, ("121015", "DCM", "Device Observer Model Name"), device.model),
        _text(ctx, ("121016", "DCM", "Device Observer Serial Number"), device.serial),
    ]


def _acquisition(event: CtIrradiationEvent) -> Dataset:
    """TID 10013 CT Irradiation Event Data."""
    source = [
        _text("CONTAINS", ("113832", "DCM", "Identification of the X-Ray Source"), "A"),
        _num(("113733", "DCM", "KVP"), event.kvp, _KV),
        _num(("113833", "DCM", "Maximum X-Ray Tube Current"), event.max_tube_current_ma, _MA),
        _num(("113734", "DCM", "X-Ray Tube Current"), event.tube_current_ma, _MA),
    ]
    if event.acquisition_type != "constant_angle":
        source.append(_num(("113834", "DCM", "Exposure Time per Rotation"), event.rotation_time_s, _SECONDS))
    parameters = [
        _num(("113824", "DCM", "Exposure Time"), event.exposure_time_s, _SECONDS),
        _num(("113825", "DCM", "Scanning Length"), event.scanning_length_mm, _MM),
        _num(("113826", "DCM", "Nominal Single Collimation Width"), event.single_collimation_mm, _MM),
        _num(("113827", "DCM", "Nominal Total Collimation Width"), event.total_collimation_mm, _MM),
    ]
    if event.pitch is not None:
        parameters.append(_num(("113828", "DCM", "Pitch Factor"), event.pitch, _RATIO))
    parameters += [
        _num(("113823", "DCM", "Number of X-Ray Sources"), 1, _SOURCES),
        _container("CONTAINS", ("113831", "DCM", "CT X-Ray Source Parameters"), source),
    ]
    children = [
        _text("CONTAINS", ("125203", "DCM", "Acquisition Protocol"), event.protocol),
        _code("CONTAINS", ("123014", "DCM", "Target Region"), TARGET_REGIONS[event.body_part]),
        _code(
            "CONTAINS", ("113820", "DCM", "CT Acquisition Type"), ACQUISITION_TYPES[event.acquisition_type]
        ),
        _uidref("CONTAINS", ("113769", "DCM", "Irradiation Event UID"), event.event_uid),
        _container("CONTAINS", ("113822", "DCM", "CT Acquisition Parameters"), parameters),
    ]
    dlp = event.dlp_mgy_cm
    if event.ctdivol_mgy is not None and dlp is not None:
        children.append(
            _container(
                "CONTAINS",
                ("113829", "DCM", "CT Dose"),
                [
                    _num(("113830", "DCM", "Mean CTDIvol"), event.ctdivol_mgy, _MGY),
                    _code("CONTAINS", ("113835", "DCM", "CTDIw Phantom Type"), PHANTOMS[event.phantom]),
                    _num(("113838", "DCM", "DLP"), dlp, _MGY_CM),
                ],
            )
        )
    return _container("CONTAINS", ("113819", "DCM", "CT Acquisition"), children)


def ct_radiation_dose_content(
    *, events: Sequence[CtIrradiationEvent], study_uid: str, device: DeviceObserver, end: datetime
) -> Dataset:
    """The SR Document Content module (root container and its tree) of a CT Radiation Dose report.

    Merge it into a dataset that already has the patient, study, series and SR document
    attributes; the total DLP is the sum of the events' DLPs, as a scanner accumulates it.
    """
    if not events:
        raise ValueError("a CT dose report needs at least one irradiation event")
    total_dlp = sum(e.dlp_mgy_cm or 0.0 for e in events)
    procedure = _code(
        "HAS CONCEPT MOD",
        ("121058", "DCM", "Procedure reported"),
        _CT_XRAY,
        [_code("HAS CONCEPT MOD", ("363703001", "SCT", "Has Intent"), _DIAGNOSTIC_INTENT)],
    )
    scope = _code(
        "CONTAINS",
        ("113705", "DCM", "Scope of Accumulation"),
        _STUDY_SCOPE,
        [_uidref("HAS PROPERTIES", ("110180", "DCM", "Study Instance UID"), study_uid)],
    )
    accumulated = _container(
        "CONTAINS",
        ("113811", "DCM", "CT Accumulated Dose Data"),
        [
            _num(("113812", "DCM", "Total Number of Irradiation Events"), len(events), _EVENTS),
            _num(("113813", "DCM", "CT Dose Length Product Total"), round(total_dlp, 2), _MGY_CM),
        ],
    )
    root = Dataset()
    root.ValueType = "CONTAINER"
    root.ConceptNameCodeSequence = [_code_item(_REPORT)]
    root.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "10011"
    root.ContentTemplateSequence = [template]
    root.ContentSequence = [
        procedure,
        *_observer(device),
        _datetime(("113809", "DCM", "Start of X-Ray Irradiation"), min(e.start for e in events)),
        _datetime(("113810", "DCM", "End of X-Ray Irradiation"), end),
        scope,
        accumulated,
        *(_acquisition(e) for e in events),
    ]
    return root
