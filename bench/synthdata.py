"""The benchmarks' fast data path: many Part 10 CT instances, made by patching one template.

The demo generator (`broker.demo.synth`) builds every dataset with pydicom, which is far too slow
for a 100,000-instance index build. Here one CT instance from `synth.generate_study` becomes a
template whose identifying values are placeholders of fixed byte width; each instance is then
the template with new identifiers written over the placeholders, so no element length (or group
length) ever changes and no dataset is ever re-encoded. Patients come from
`synth.generate_patients` (one record per person), so names are as varied as the demo's.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import date, timedelta

from pydicom.uid import UID, generate_uid

from broker.demo import synth

__all__ = ["bulk_instances"]

# Placeholders written into the template, then overwritten in place. Each has the exact byte
# width of the value that replaces it, so no element length (or group length) ever changes.
_PH_STUDY_UID = "1.9" + "1" * 61
_PH_SERIES_UID = "1.9" + "2" * 61
_PH_SOP_UID = UID("1.9" + "3" * 61)
_PH_FOR_UID = "1.9" + "4" * 61
_PH_NAME = "Q" * 64
_PH_PID = "W" * 16
_PH_ACCESSION = "X" * 16
_PH_STUDY_ID = "Z" * 8
_PH_BIRTH = "18880808"
_PH_DATE = "19000101"
_PH_TIME = "010203"
_PH_SEX = "O "  # CS padded to even length
_PH_SERIES_NO = "9" * 6
_PH_INSTANCE_NO = "8" * 6
_PH_POSITION = "-777777.0 "  # the z of ImagePositionPatient and SliceLocation (DS, width 10)
_BULK_ISSUER = "ST-MARYS"
_FIRST_STUDY_DATE = date(2016, 1, 1)
# Per-patient or per-event values the template must not repeat for every study: a bench
# instance has no address, age or irradiation event of its own.
_DROPPED = ("PatientAddress", "PatientAge", "PatientSize", "PatientWeight", "IrradiationEventUID")


def _uid(root: str, *parts: object) -> str:
    # Separator-joined like synth's UIDs, so ("1", "23") and ("12", "3") cannot collide.
    return str(generate_uid(prefix=root, entropy_srcs=["|".join(str(p) for p in parts)]))


def _template(seed: int, rows: int, cols: int) -> tuple[bytes, int]:
    """One CT instance with placeholders, as Part 10 bytes, and the length of its header."""
    patient = synth.generate_patients(seed=seed, count=1, facilities=synth.DEFAULT_FACILITIES[:1])[0]
    ds = next(
        synth.generate_study(
            rng_seed=seed,
            patient=patient,
            modality="CT",
            n_series=1,
            n_instances_per_series=1,
            rows=rows,
            cols=cols,
            body_part="CHEST",
        )
    )
    for keyword in _DROPPED:
        if keyword in ds:
            delattr(ds, keyword)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = _PH_NAME
    ds.PatientID = _PH_PID
    ds.IssuerOfPatientID = _BULK_ISSUER
    ds.PatientBirthDate = _PH_BIRTH
    ds.PatientSex = _PH_SEX
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _PH_SOP_UID
    ds.StudyInstanceUID = _PH_STUDY_UID
    ds.SeriesInstanceUID = _PH_SERIES_UID
    ds.FrameOfReferenceUID = _PH_FOR_UID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _PH_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = _PH_TIME
    ds.AccessionNumber = _PH_ACCESSION
    ds.StudyID = _PH_STUDY_ID
    ds.InstitutionName = "St Mary's Hospital"
    ds.SeriesNumber = _PH_SERIES_NO
    ds.InstanceNumber = _PH_INSTANCE_NO
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], _PH_POSITION]
    ds.SliceLocation = _PH_POSITION
    pixels = ds.PixelData
    data = synth.write_part10(ds)
    return data, len(data) - len(pixels)


def _locate(header: bytes, placeholder: str, expected: int) -> list[int]:
    needle = placeholder.encode("ascii")
    found: list[int] = []
    at = header.find(needle)
    while at != -1:
        found.append(at)
        at = header.find(needle, at + len(needle))
    if len(found) != expected:
        raise RuntimeError(f"bulk template: placeholder found {len(found)} times, expected {expected}")
    return found


def _fixed(value: str, width: int, pad: bytes = b" ") -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > width:
        raise ValueError("value wider than its template slot")
    return raw + pad * (width - len(raw))


def _study_date(rng: random.Random, born: date) -> date:
    start = max(born + timedelta(days=1), _FIRST_STUDY_DATE)
    if start >= synth.REFERENCE_DATE:
        return synth.REFERENCE_DATE
    return start + timedelta(days=rng.randrange((synth.REFERENCE_DATE - start).days + 1))


def bulk_instances(
    *,
    seed: int,
    n_studies: int,
    series_per_study: int,
    instances_per_series: int,
    rows: int = 16,
    cols: int = 16,
) -> Iterator[bytes]:
    """Part 10 CT instances, fast: one template file with identifiers patched in place.

    Each study has its own patient values (three studies per patient), UIDs, accession and
    date; each instance its own SOP Instance UID, number and slice position. Pixel data is the
    same for every instance. rows=cols=512 gives realistic 512 KiB CT slices.
    """
    template, header_len = _template(seed, rows, cols)
    header = template[:header_len]
    slots = {
        "study": _locate(header, _PH_STUDY_UID, 1),
        "series": _locate(header, _PH_SERIES_UID, 1),
        "sop": _locate(header, _PH_SOP_UID, 2),
        "for": _locate(header, _PH_FOR_UID, 1),
        "name": _locate(header, _PH_NAME, 1),
        "pid": _locate(header, _PH_PID, 1),
        "accession": _locate(header, _PH_ACCESSION, 1),
        "study_id": _locate(header, _PH_STUDY_ID, 1),
        "birth": _locate(header, _PH_BIRTH, 1),
        "date": _locate(header, _PH_DATE, 3),
        "time": _locate(header, _PH_TIME, 3),
        # Two bytes are not distinctive: anchor on the explicit VR and length before the value.
        "sex": [at + 4 for at in _locate(header, "CS\x02\x00" + _PH_SEX, 1)],
        "series_no": _locate(header, _PH_SERIES_NO, 1),
        "instance_no": _locate(header, _PH_INSTANCE_NO, 1),
        "position": _locate(header, _PH_POSITION, 2),
    }
    n_patients = -(-n_studies // 3)
    # One record per person (the first facility's), whatever the facilities it is known at.
    people: dict[str, synth.SynthPatient] = {}
    for record in synth.generate_patients(seed=seed, count=n_patients):
        people.setdefault(record.person, record)
    patients = list(people.values())
    root = synth.uid_root(seed)
    base = bytearray(template)
    for st in range(n_studies):
        patient = patients[st // 3]
        pid = f"B{seed % 1000:03d}{st // 3:08d}"
        srng = random.Random(f"scanonce-bench|study|{seed}|{st}")
        when = _study_date(srng, patient.birth)
        key = f"bulk|{seed}|{st}"
        study_values = {
            "study": _uid(root, "study", key).encode(),
            "for": _uid(root, "for", key).encode(),
            "name": _fixed(patient.name, len(_PH_NAME)),
            "pid": _fixed(pid, len(_PH_PID)),
            "accession": _fixed(f"BK{seed % 100:02d}{st:010d}", len(_PH_ACCESSION)),
            "study_id": _fixed(str(st % 10**8), len(_PH_STUDY_ID)),
            "birth": patient.birth_date.encode(),
            "date": when.strftime("%Y%m%d").encode(),
            "time": f"{srng.randrange(7, 20):02d}{srng.randrange(60):02d}{srng.randrange(60):02d}".encode(),
            "sex": _fixed(patient.sex, 2),
        }
        for slot, value in study_values.items():
            for at in slots[slot]:
                base[at : at + len(value)] = value
        for se in range(series_per_study):
            series_uid = _uid(root, "series", key, se).encode()
            base[slots["series"][0] : slots["series"][0] + 64] = series_uid
            at = slots["series_no"][0]
            base[at : at + 6] = _fixed(str(se + 1), 6)
            for i in range(instances_per_series):
                sop = _uid(root, "sop", key, se, i).encode()
                for at in slots["sop"]:
                    base[at : at + 64] = sop
                at = slots["instance_no"][0]
                base[at : at + 6] = _fixed(str(i + 1), 6)
                z = _fixed(f"{-2.5 * i:.1f}", len(_PH_POSITION))
                for at in slots["position"]:
                    base[at : at + len(z)] = z
                yield bytes(base)
