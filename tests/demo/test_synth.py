"""The synthetic generator: deterministic, valid Part 10, realistic enough to exercise the broker."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian

from broker.demo import synth
from broker.dicom.uids import is_valid_uid

REQUIRED = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
    "PatientSex", "PatientAddress", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "SOPClassUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
    "ReferringPhysicianName", "Modality", "SeriesDescription", "SeriesNumber", "InstanceNumber",
)  # fmt: skip
IMAGE_REQUIRED = ("BodyPartExamined", "Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")


def _read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def test_same_seed_gives_byte_identical_output() -> None:
    first = [synth.write_part10(ds) for _, ds in synth.generate_demo(seed=7, patients=12)]
    second = [synth.write_part10(ds) for _, ds in synth.generate_demo(seed=7, patients=12)]
    assert first and first == second


def test_different_seed_gives_different_patients_and_uids() -> None:
    a = list(synth.generate_demo(seed=7, patients=12))
    b = list(synth.generate_demo(seed=8, patients=12))
    assert {ds.SOPInstanceUID for _, ds in a}.isdisjoint({ds.SOPInstanceUID for _, ds in b})
    assert {str(ds.PatientName) for _, ds in a} != {str(ds.PatientName) for _, ds in b}


def test_demo_is_a_modest_mixed_archive(demo: list[tuple[str, Dataset, bytes]]) -> None:
    assert 150 <= len(demo) <= 800
    assert {ds.Modality for _, ds, _ in demo} >= {"CT", "MR", "US", "NM"}
    assert {ds.Modality for _, ds, _ in demo} & {"CR", "DX"}
    assert {fac for fac, _, _ in demo} == {"stmarys", "northgen", "kids"}
    years = {ds.StudyDate[:4] for _, ds, _ in demo}
    assert len(years) >= 5, years


def test_every_demo_instance_round_trips_with_valid_uids(demo: list[tuple[str, Dataset, bytes]]) -> None:
    issuers = {f.id: f.issuer for f in synth.DEFAULT_FACILITIES}
    sop_uids: set[str] = set()
    for fac, original, data in demo:
        assert data[128:132] == b"DICM"
        ds = _read(data)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        for keyword in REQUIRED + (IMAGE_REQUIRED if ds.Modality != "SR" else ()):
            assert keyword in ds and str(ds[keyword].value) != "", keyword
        uids = [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID]
        uids += [ds.FrameOfReferenceUID] if "FrameOfReferenceUID" in ds else []
        assert all(is_valid_uid(u) for u in uids), uids
        assert ds.SOPInstanceUID.startswith(synth.uid_root(42))
        assert ds.IssuerOfPatientID == issuers[fac]
        # Names survive the declared character set (Latin-1 or UTF-8) unchanged.
        assert str(ds.PatientName) == str(original.PatientName)
        assert ds.SOPInstanceUID not in sop_uids
        sop_uids.add(ds.SOPInstanceUID)


def test_dcmtk_reads_what_we_write(tmp_path: Path, demo: list[tuple[str, Dataset, bytes]]) -> None:
    from tests.peers import dcmtk

    by_modality = {ds.Modality: ds for _, ds, _ in demo}
    paths = synth.write_files(by_modality.values(), tmp_path / "out")
    assert [p.name for p in paths] == [f"{ds.SOPInstanceUID}.dcm" for ds in by_modality.values()]
    for path in paths:
        out = dcmtk("dcmdump", "-q", "+E", path)  # raises with dcmtk's complaint on failure
        assert "PatientName" in out.stdout


def test_orthanc_accepts_decodes_and_renders_them(
    tmp_path: Path, demo: list[tuple[str, Dataset, bytes]]
) -> None:
    """A third-party archive takes our files over DIMSE, reads the names in the declared
    character set (Latin-1 and UTF-8) and renders a picture, not a flat grey square."""
    import httpx
    from PIL import Image

    from tests.peers import dcmtk, orthanc

    picked: dict[tuple[str, str], Dataset] = {}
    for _, ds, _ in demo:
        if ds.Modality != "SR":  # a dose report has no picture to preview
            picked.setdefault((ds.Modality, ds.SpecificCharacterSet), ds)
    assert {cs for _, cs in picked} == {"ISO_IR 100", "ISO_IR 192"}
    paths = synth.write_files(picked.values(), tmp_path / "files")
    with orthanc(tmp_path / "orthanc", dicomweb=False) as peer:
        dcmtk("storescu", "-aec", peer.aet, "127.0.0.1", str(peer.dicom_port), *paths)
        with httpx.Client(base_url=peer.url, trust_env=False, timeout=10) as client:
            ids = client.get("/instances").json()
            assert len(ids) == len(picked)
            by_uid = {ds.SOPInstanceUID: ds for ds in picked.values()}
            for oid in ids:
                tags = client.get(f"/instances/{oid}/simplified-tags").json()
                ours = by_uid[tags["SOPInstanceUID"]]
                assert tags["PatientName"] == str(ours.PatientName)
                assert tags["IssuerOfPatientID"] == ours.IssuerOfPatientID
                png = client.get(f"/instances/{oid}/preview")
                assert png.status_code == 200, (ours.Modality, png.text[:200])
                pixels = np.asarray(Image.open(io.BytesIO(png.content)).convert("L"))
                assert pixels.std() > 5, f"{ours.Modality} preview is uniform"


def test_write_demo_sorts_files_by_facility(tmp_path: Path, demo: list[tuple[str, Dataset, bytes]]) -> None:
    written = synth.write_demo(folder=tmp_path, seed=42, patients=40)
    assert {fac: len(paths) for fac, paths in written.items()} == {
        fac: sum(f == fac for f, _, _ in demo) for fac in {f for f, _, _ in demo}
    }
    # Same bytes as the in-memory demo, file by file.
    expected = {ds.SOPInstanceUID: data for _, ds, data in demo}
    for fac, paths in written.items():
        for path in paths:
            assert path.parent == tmp_path / fac
            assert path.read_bytes() == expected[path.stem]


def test_patients_are_varied_and_some_are_known_at_two_facilities(patients: list[synth.SynthPatient]) -> None:
    people = defaultdict(list)
    for p in patients:
        people[p.person].append(p)
    assert len(people) == 40
    both = [recs for recs in people.values() if len(recs) == 2]
    assert len(both) >= 5
    for a, b in both:
        assert a.facility_id != b.facility_id and a.issuer != b.issuer
        assert a.patient_id != b.patient_id
        assert (a.birth_date, a.sex) == (b.birth_date, b.sex)
    assert any(a.name != b.name for a, b in both), "no name variation between facilities"
    assert any(p.is_child for p in patients) and any(not p.is_child for p in patients)
    assert not any(p.facility_id == "kids" and not p.is_child for p in patients if len(people[p.person]) > 1)
    assert any(not p.name.isascii() for p in patients)
    assert any(p.name.count("^") == 2 for p in patients)  # family^given^middle
    assert any(p.charset == "ISO_IR 100" for p in patients)
    for p in patients:
        p.name.encode({"ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}[p.charset])
        assert p.patient_id and p.address and len(p.birth_date) == 8 and p.sex in "MFO"
    # Per issuer, every MRN is unique.
    keys = [(p.issuer, p.patient_id) for p in patients]
    assert len(keys) == len(set(keys))


def test_identity_traps_are_planted(patients: list[synth.SynthPatient]) -> None:
    by_mrn = defaultdict(set)
    for p in patients:
        by_mrn[p.patient_id].add(p.person)
    assert any(len(persons) > 1 for persons in by_mrn.values()), "no bare MRN shared by two persons"
    twins: defaultdict[tuple[str, str, str], set[str]] = defaultdict(set)
    for p in patients:
        twins[(p.name.split("^")[0], p.birth_date, p.address)].add(p.person)
    assert any(len(persons) == 2 for persons in twins.values()), "no twins"


def test_demo_has_the_same_body_part_at_two_facilities(
    demo: list[tuple[str, Dataset, bytes]], patients: list[synth.SynthPatient]
) -> None:
    person_of = {(p.issuer, p.patient_id): p.person for p in patients}
    seen = defaultdict(set)
    for fac, ds, _ in demo:
        if ds.Modality != "SR":
            seen[(person_of[(ds.IssuerOfPatientID, ds.PatientID)], ds.BodyPartExamined)].add(fac)
    assert sum(len(facs) >= 2 for facs in seen.values()) >= 5


def test_custom_facilities_are_used() -> None:
    facs = [
        synth.FacilitySpec("a", "ISSUER-A", "Alpha Clinic"),
        synth.FacilitySpec("b", "ISSUER-B", "Beta Clinic", mrn_prefix="B", mrn_digits=5),
    ]
    records = synth.generate_patients(seed=1, count=30, facilities=facs)
    assert {p.facility_id for p in records} == {"a", "b"}
    assert {p.issuer for p in records} == {"ISSUER-A", "ISSUER-B"}
    # All but the one planted shared-MRN trap follow the facility's format.
    at_b = [p.patient_id for p in records if p.facility_id == "b"]
    assert sum(not mrn.startswith("B") for mrn in at_b) <= 1 and len(at_b) >= 5
    ds = next(synth.generate_study(rng_seed=1, patient=records[0], modality="CT", n_series=1,
                                   n_instances_per_series=1))  # fmt: skip
    assert ds.InstitutionName in {"Alpha Clinic", "Beta Clinic"}


def _study(patient: synth.SynthPatient, modality: str, **kw: object) -> list[Dataset]:
    args: dict = {"n_series": 2, "n_instances_per_series": 3} | kw
    return [_read(synth.write_part10(ds)) for ds in synth.generate_study(
        rng_seed=5, patient=patient, modality=modality, **args)]  # fmt: skip


def _adult_and_child(patients: Iterable[synth.SynthPatient]) -> tuple[synth.SynthPatient, synth.SynthPatient]:
    adult = next(p for p in patients if p.birth_date < "19900101")
    child = next(p for p in patients if p.birth_date > "20190101")
    return adult, child


def test_nm_activity_is_weight_based_and_mr_us_carry_no_dose(patients: list[synth.SynthPatient]) -> None:
    adult, child = _adult_and_child(patients)
    when = synth.REFERENCE_DATE
    adult_nm = _study(adult, "NM", body_part="WHOLEBODY", study_date=when, n_series=1)[0]
    child_nm = _study(child, "NM", body_part="WHOLEBODY", study_date=when, n_series=1)[0]
    pharma = adult_nm.RadiopharmaceuticalInformationSequence[0]
    assert pharma.Radiopharmaceutical and float(pharma.RadionuclideTotalDose) > 100
    assert float(child_nm.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose) < float(
        pharma.RadionuclideTotalDose
    )
    for modality in ("MR", "US"):
        ds = _study(adult, modality)[0]
        assert "CTDIvol" not in ds and "EntranceDoseInmGy" not in ds
        assert "ImageAndFluoroscopyAreaDoseProduct" not in ds


@pytest.mark.parametrize(
    ("modality", "bits", "sop_class"),
    [
        ("CT", 16, "1.2.840.10008.5.1.4.1.1.2"),
        ("MR", 16, "1.2.840.10008.5.1.4.1.1.4"),
        ("NM", 16, "1.2.840.10008.5.1.4.1.1.20"),
        ("CR", 8, "1.2.840.10008.5.1.4.1.1.1"),
        ("DX", 8, "1.2.840.10008.5.1.4.1.1.1.1"),
        ("US", 8, "1.2.840.10008.5.1.4.1.1.6.1"),
    ],
)
def test_pixels_render_as_a_picture(
    patients: list[synth.SynthPatient], modality: str, bits: int, sop_class: str
) -> None:
    datasets = _study(patients[0], modality, rows=48, cols=40)
    first = datasets[0]
    assert first.SOPClassUID == sop_class
    assert (first.BitsAllocated, first.PhotometricInterpretation) == (bits, "MONOCHROME2")
    pixels = first.pixel_array
    assert pixels.shape == (48, 40)
    assert pixels.std() > 0.05 * pixels.max() > 0, "image is (nearly) uniform"
    # Consecutive instances are different images, not one frame copied.
    assert not np.array_equal(pixels, datasets[1].pixel_array)
    if modality == "CT":
        hu = apply_modality_lut(pixels, first)
        assert hu.min() < -500 and hu.max() > 300  # air and dense tissue both present
        assert (float(first.WindowCenter), float(first.WindowWidth)) == (40.0, 400.0)


def test_geometry_and_numbering(patients: list[synth.SynthPatient]) -> None:
    datasets = _study(patients[0], "CT", n_series=2, n_instances_per_series=4, body_part="CHEST")
    axial = [ds for ds in datasets if ds.SeriesNumber == 1]
    assert [ds.InstanceNumber for ds in axial] == [1, 2, 3, 4]
    zs = [float(ds.ImagePositionPatient[2]) for ds in axial]
    assert zs == sorted(zs, reverse=True) and len(set(zs)) == 4
    assert [float(v) for v in axial[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(axial[0].PixelSpacing[0]) > 0
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 2
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1


def test_study_uids_depend_on_seed_and_patient(patients: list[synth.SynthPatient]) -> None:
    def uid(p: synth.SynthPatient, seed: int) -> str:
        return next(synth.generate_study(rng_seed=seed, patient=p, modality="US", n_series=1,
                                         n_instances_per_series=1)).StudyInstanceUID  # fmt: skip

    assert uid(patients[0], 1) == uid(patients[0], 1)
    assert len({uid(patients[0], 1), uid(patients[0], 2), uid(patients[1], 1)}) == 3
    # A different exam of the same patient with the same seed is a different study.
    head, chest = (
        next(
            synth.generate_study(
                rng_seed=1,
                patient=patients[0],
                modality="CT",
                n_series=1,
                n_instances_per_series=1,
                body_part=part,
            )
        )  # fmt: skip
        for part in ("HEAD", "CHEST")
    )
    assert (head.BodyPartExamined, chest.BodyPartExamined) == ("HEAD", "CHEST")
    assert head.StudyInstanceUID != chest.StudyInstanceUID


def test_without_pixels_the_image_attributes_remain(patients: list[synth.SynthPatient]) -> None:
    ds = _study(patients[0], "MR", pixel=False)[0]
    assert "PixelData" not in ds and (ds.Rows, ds.Columns) == (64, 64)


def test_rejects_unknown_modality(patients: list[synth.SynthPatient]) -> None:
    with pytest.raises(ValueError, match="modality"):
        next(synth.generate_study(rng_seed=1, patient=patients[0], modality="XA", n_series=1,
                                  n_instances_per_series=1))  # fmt: skip
