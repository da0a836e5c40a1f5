"""Dose objects as modalities write them, for the dose tests: CT and projection X-ray Radiation
Dose SRs (TID 10011 / TID 10001 content trees of CONTAINER, NUM, CODE, UIDREF and TEXT items with
coded concept names and UCUM units), CT images carrying CTDIvol and CR/DX images carrying DAP.

`meaning` lets a test rewrite every code meaning (localised, misspelt) to show the reader goes by
code value and scheme only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

XRAY_RDSR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.67"
CT_IMAGE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
ENHANCED_CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2.1"

Meaning = Callable[[str, str, str], str]  # (value, scheme, meaning) -> meaning written


def _as_written(value: str, scheme: str, meaning: str) -> str:
    return meaning


# Target regions as SNOMED CT codes (CID 4030); many scanners still write the legacy SRT ones.
HEAD = ("69536005", "SCT", "Head")
CHEST = ("51185008", "SCT", "Chest")
CHEST_SRT = ("T-D3000", "SRT", "Chest")
ABDOMEN_PELVIS = ("818982008", "SCT", "Abdomen and Pelvis")
HEAD_PHANTOM = ("113690", "DCM", "IEC Head Dosimetry Phantom")
BODY_PHANTOM = ("113691", "DCM", "IEC Body Dosimetry Phantom")


@dataclass
class CTEventSpec:
    ctdivol: float | str | None = 10.0
    dlp: float | str | None = 300.0
    phantom: tuple[str, str, str] | None = BODY_PHANTOM
    region: tuple[str, str, str] | None = CHEST
    uid: str | None = field(default_factory=generate_uid)
    protocol: str = "Helical"
    ctdivol_unit: str = "mGy"
    dlp_unit: str = "mGy.cm"
    water_equivalent_diameter_cm: float | None = None
    diameter_concept: tuple[str, str, str] = ("113980", "DCM", "Water Equivalent Diameter")
    scan_length_mm: float = 300.0


class SR:
    """Builds content items; each concept is (value, scheme, meaning)."""

    def __init__(self, meaning: Meaning = _as_written) -> None:
        self.meaning = meaning

    def code(self, concept: tuple[str, str, str]) -> Dataset:
        value, scheme, meaning = concept
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = scheme
        item.CodeMeaning = self.meaning(value, scheme, meaning)
        return item

    def _item(self, relationship: str, value_type: str, concept: tuple[str, str, str]) -> Dataset:
        item = Dataset()
        item.RelationshipType = relationship
        item.ValueType = value_type
        item.ConceptNameCodeSequence = [self.code(concept)]
        return item

    def container(
        self, concept: tuple[str, str, str], children: Sequence[Dataset], rel: str = "CONTAINS"
    ) -> Dataset:
        item = self._item(rel, "CONTAINER", concept)
        item.ContinuityOfContent = "SEPARATE"
        item.ContentSequence = list(children)
        return item

    def num(
        self, concept: tuple[str, str, str], value: float | str, unit: str, rel: str = "CONTAINS"
    ) -> Dataset:
        item = self._item(rel, "NUM", concept)
        measured = Dataset()
        _set_ds(measured, 0x0040A30A, value if isinstance(value, str) else f"{value:.6g}")
        measured.MeasurementUnitsCodeSequence = [self.code((unit, "UCUM", unit))]
        item.MeasuredValueSequence = [measured]
        return item

    def coded(
        self, concept: tuple[str, str, str], value: tuple[str, str, str], rel: str = "CONTAINS"
    ) -> Dataset:
        item = self._item(rel, "CODE", concept)
        item.ConceptCodeSequence = [self.code(value)]
        return item

    def uidref(self, concept: tuple[str, str, str], uid: str, rel: str = "CONTAINS") -> Dataset:
        item = self._item(rel, "UIDREF", concept)
        item.UID = uid
        return item

    def text(self, concept: tuple[str, str, str], text: str, rel: str = "CONTAINS") -> Dataset:
        item = self._item(rel, "TEXT", concept)
        item.TextValue = text
        return item


def _set_ds(ds: Dataset, tag: int, text: str) -> None:
    """A DS value as its bytes, so a test can store what pydicom would refuse (garbage)."""
    raw = text.encode("ascii")
    raw += b" " * (len(raw) % 2)
    ds[tag] = RawDataElement(Tag(tag), "DS", len(raw), raw, 0, False, True)


def _study(ds: Dataset, study_uid: str | None, modality: str) -> None:
    ds.PatientName = "Dose^Test"
    ds.PatientID = "DOSE-1"
    ds.PatientBirthDate = "20210301"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = "20260301"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 99 if modality == "SR" else 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "ScanOnce Test Scanner"
    ds.ManufacturerModelName = "Model 1"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1.0"


def _file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta


def _rdsr_document(sr: SR, study_uid: str | None, children: list[Dataset]) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = XRAY_RDSR_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    _study(ds, study_uid, "SR")
    ds.ContentDate = "20260301"
    ds.ContentTime = "102000"
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = [sr.code(("113701", "DCM", "X-Ray Radiation Dose Report"))]
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "10011" if any(_is_ct(c) for c in children) else "10001"
    ds.ContentTemplateSequence = [template]
    ds.ContentSequence = children
    _file_meta(ds)
    return ds


def _is_ct(item: Dataset) -> bool:
    return item.ConceptNameCodeSequence[0].CodeValue in ("113811", "113819")


def _observer(sr: SR, study_uid: str) -> list[Dataset]:
    scope = sr.coded(
        ("113705", "DCM", "Scope of Accumulation"), ("113014", "DCM", "Study"), rel="HAS OBS CONTEXT"
    )
    scope.ContentSequence = [
        sr.uidref(("110180", "DCM", "Study Instance UID"), study_uid, rel="HAS PROPERTIES")
    ]
    return [
        sr.coded(
            ("121058", "DCM", "Procedure reported"),
            ("P5-08000", "SRT", "Computed Tomography X-Ray"),
            rel="HAS CONCEPT MOD",
        ),
        sr.coded(("121005", "DCM", "Observer Type"), ("121007", "DCM", "Device"), rel="HAS OBS CONTEXT"),
        sr.uidref(
            ("121012", "DCM", "Device Observer UID"), "1.2.826.0.1.3680043.10.1234.1", rel="HAS OBS CONTEXT"
        ),
        scope,
    ]


def ct_rdsr(
    events: Sequence[CTEventSpec],
    *,
    dlp_total: float | None | str = "sum",
    study_uid: str | None = None,
    meaning: Meaning = _as_written,
    extra: Sequence[Dataset] = (),
) -> Dataset:
    """A CT Radiation Dose SR (TID 10011) as a scanner writes it; `dlp_total=None` leaves out
    113813, "sum" writes the sum of the events' DLPs."""
    sr = SR(meaning)
    study_uid = study_uid or generate_uid()
    accumulated: list[Dataset] = [
        sr.num(("113812", "DCM", "Total Number of Irradiation Events"), len(events), "{events}")
    ]
    if dlp_total == "sum":
        total = sum(float(e.dlp) for e in events if isinstance(e.dlp, float | int))
        accumulated.append(sr.num(("113813", "DCM", "CT Dose Length Product Total"), total, "mGy.cm"))
    elif dlp_total is not None:
        accumulated.append(sr.num(("113813", "DCM", "CT Dose Length Product Total"), dlp_total, "mGy.cm"))
    children = _observer(sr, study_uid)
    children.append(sr.container(("113811", "DCM", "CT Accumulated Dose Data"), accumulated))
    for ev in events:
        children.append(_ct_acquisition(sr, ev))
    children.extend(extra)
    children.append(
        sr.coded(
            ("113854", "DCM", "Source of Dose Information"), ("113856", "DCM", "Automated Data Collection")
        )
    )
    return _rdsr_document(sr, study_uid, children)


def _ct_acquisition(sr: SR, ev: CTEventSpec) -> Dataset:
    items: list[Dataset] = [sr.text(("125203", "DCM", "Acquisition Protocol"), ev.protocol)]
    if ev.region is not None:
        items.append(sr.coded(("123014", "DCM", "Target Region"), ev.region))
    items.append(
        sr.coded(("113820", "DCM", "CT Acquisition Type"), ("116152004", "SCT", "Spiral Acquisition"))
    )
    if ev.uid is not None:
        items.append(sr.uidref(("113769", "DCM", "Irradiation Event UID"), ev.uid))
    source = [
        sr.text(("113832", "DCM", "Identification of the X-Ray Source"), "A"),
        sr.num(("113733", "DCM", "KVP"), 120, "kV"),
        sr.num(("113833", "DCM", "Maximum X-Ray Tube Current"), 300, "mA"),
        sr.num(("113734", "DCM", "X-Ray Tube Current"), 200, "mA"),
        sr.num(("113834", "DCM", "Exposure Time per Rotation"), 0.5, "s"),
    ]
    items.append(
        sr.container(
            ("113822", "DCM", "CT Acquisition Parameters"),
            [
                sr.num(("113824", "DCM", "Exposure Time"), 5.2, "s"),
                sr.num(("113825", "DCM", "Scanning Length"), ev.scan_length_mm, "mm"),
                sr.num(("113826", "DCM", "Nominal Single Collimation Width"), 0.625, "mm"),
                sr.num(("113827", "DCM", "Nominal Total Collimation Width"), 40, "mm"),
                sr.num(("113828", "DCM", "Pitch Factor"), 0.984, "{ratio}"),
                sr.num(("113823", "DCM", "Number of X-Ray Sources"), 1, "{X-Ray sources}"),
                sr.container(("113831", "DCM", "CT X-Ray Source Parameters"), source),
            ],
        )
    )
    dose: list[Dataset] = []
    if ev.ctdivol is not None:
        dose.append(sr.num(("113830", "DCM", "Mean CTDIvol"), ev.ctdivol, ev.ctdivol_unit))
    if ev.phantom is not None:
        dose.append(sr.coded(("113835", "DCM", "CTDIw Phantom Type"), ev.phantom))
    if ev.dlp is not None:
        dose.append(sr.num(("113838", "DCM", "DLP"), ev.dlp, ev.dlp_unit))
    if ev.water_equivalent_diameter_cm is not None:
        dose.append(sr.num(ev.diameter_concept, ev.water_equivalent_diameter_cm * 10, "mm"))
    items.append(sr.container(("113829", "DCM", "CT Dose"), dose))
    return sr.container(("113819", "DCM", "CT Acquisition"), items)


def projection_rdsr(
    *,
    dap_total: tuple[float | str, str] | None,
    events: Sequence[tuple[float | str, str]] = (),
    study_uid: str | None = None,
) -> Dataset:
    """A projection X-Ray Radiation Dose SR (TID 10001): DAP total in the accumulated data
    (TID 10002/10004) and one TID 10003 container per event; values as (number, UCUM unit)."""
    sr = SR()
    study_uid = study_uid or generate_uid()
    accumulated = [
        sr.coded(
            ("113764", "DCM", "Acquisition Plane"), ("113622", "DCM", "Single Plane"), rel="HAS CONCEPT MOD"
        )
    ]
    if dap_total is not None:
        accumulated.append(sr.num(("113722", "DCM", "Dose Area Product Total"), dap_total[0], dap_total[1]))
    children = [
        sr.coded(
            ("121058", "DCM", "Procedure reported"),
            ("113704", "DCM", "Projection X-Ray"),
            rel="HAS CONCEPT MOD",
        ),
        sr.container(("113702", "DCM", "Accumulated X-Ray Dose Data"), accumulated),
    ]
    for value, unit in events:
        children.append(
            sr.container(
                ("113706", "DCM", "Irradiation Event X-Ray Data"),
                [
                    sr.coded(
                        ("113764", "DCM", "Acquisition Plane"),
                        ("113622", "DCM", "Single Plane"),
                        rel="HAS CONCEPT MOD",
                    ),
                    sr.uidref(("113769", "DCM", "Irradiation Event UID"), generate_uid()),
                    sr.num(("122130", "DCM", "Dose Area Product"), value, unit),
                ],
            )
        )
    ds = _rdsr_document(sr, study_uid, children)
    return ds


def ct_series(
    *,
    count: int,
    ctdivol: float,
    spacing_mm: float = 5.0,
    start_mm: float = 0.0,
    study_uid: str,
    series_uid: str | None = None,
    phantom: tuple[str, str, str] | None = BODY_PHANTOM,
    event_uid: str | None = None,
    water_equivalent_diameter_mm: float | None = None,
) -> list[Dataset]:
    """CT images of one axial series, each header carrying CTDIvol (0018,9345)."""
    series_uid = series_uid or generate_uid()
    images = []
    for n in range(count):
        ds = Dataset()
        ds.SOPClassUID = CT_IMAGE_SOP_CLASS
        ds.SOPInstanceUID = generate_uid()
        _study(ds, study_uid, "CT")
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = n + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-250.0, -250.0, start_mm - n * spacing_mm]
        ds.SliceThickness = spacing_mm
        ds.CTDIvol = ctdivol
        if phantom is not None:
            ds.CTDIPhantomTypeCodeSequence = [SR().code(phantom)]
        if event_uid is not None:
            ds.IrradiationEventUID = event_uid
        if water_equivalent_diameter_mm is not None:
            ds.WaterEquivalentDiameter = water_equivalent_diameter_mm
        _file_meta(ds)
        images.append(ds)
    return images


def localizer(*, study_uid: str, ctdivol: float = 0.2) -> Dataset:
    ds = ct_series(count=1, ctdivol=ctdivol, study_uid=study_uid)[0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    return ds


def dx_image(*, dap_dgy_cm2: float | str, study_uid: str, event_uid: str | None = None) -> Dataset:
    """A DX image whose header carries Image and Fluoroscopy Area Dose Product (0018,115E)."""
    ds = Dataset()
    ds.SOPClassUID = DX_IMAGE_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    _study(ds, study_uid, "DX")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    _set_ds(ds, 0x0018115E, str(dap_dgy_cm2))
    if event_uid is not None:
        ds.IrradiationEventUID = event_uid
    _file_meta(ds)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def enhanced_ct(
    *, frames: int, ctdivol: float, spacing_mm: float, study_uid: str, per_frame_ctdivol: bool = True
) -> Dataset:
    """An Enhanced CT image: CTDIvol in the CT Exposure functional group (per frame, or shared),
    frame positions in Plane Position, slice thickness in the shared Pixel Measures."""
    ds = Dataset()
    ds.SOPClassUID = ENHANCED_CT_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    _study(ds, study_uid, "CT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.NumberOfFrames = frames
    measures = Dataset()
    measures.SliceThickness = spacing_mm
    measures.PixelSpacing = [0.7, 0.7]
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    per_frame = []
    for n in range(frames):
        position = Dataset()
        position.ImagePositionPatient = [-250.0, -250.0, -n * spacing_mm]
        frame = Dataset()
        frame.PlanePositionSequence = [position]
        if per_frame_ctdivol:
            exposure = Dataset()
            exposure.CTDIvol = ctdivol + (1.0 if n % 2 else -1.0)  # tube current modulation
            exposure.CTDIPhantomTypeCodeSequence = [SR().code(BODY_PHANTOM)]
            frame.CTExposureSequence = [exposure]
        per_frame.append(frame)
    if not per_frame_ctdivol:
        exposure = Dataset()
        exposure.CTDIvol = ctdivol
        shared.CTExposureSequence = [exposure]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = per_frame
    _file_meta(ds)
    return ds
