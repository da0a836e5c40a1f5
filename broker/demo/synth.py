"""Deterministic synthetic DICOM: patients and their studies.

Used by `scanonce demo` and the tests (the benchmarks' fast path, built on this, is
bench/synthdata.py). Everything here is invented: names come
from fixed tables, identifiers and dates from `random.Random` seeded by the caller, so the same
seed gives byte-identical Part 10 output on every run and machine (same pydicom version).

Patients
    `generate_patients` makes *persons* and, for each, one `SynthPatient` record per facility
    where that person is known. About a third of the persons are known at two facilities, with
    a different MRN and often a slightly different name (typo, accents stripped, middle name
    missing or reduced to an initial): exactly the records the broker has to link. Two
    deliberate traps help identity tests: a pair of twins (same family name, birth date and
    address, different given names: two persons) and, with two or more facilities, two
    different persons who carry the same bare MRN at different facilities. `SynthPatient.person`
    is the ground truth ("P0007") for checking linkage; it is never written into a dataset.

UIDs
    All UIDs live under `uid_root(seed)`, pydicom's root (1.2.826.0.1.3680043.8.498.) plus one
    seed-derived arc, and are made with `pydicom.uid.generate_uid(prefix=root, entropy_srcs=[...])`
    so they are deterministic and always exactly 64 characters long.

Dose (all standard, no private tags, recorded where modalities record it)
    CT  With ``dose_report=True`` (the demo sets it) a CT study also holds a CT Radiation Dose SR
        (X-Ray Radiation Dose SR Storage, Modality SR, its own series, TID 10011; see
        `broker.demo.rdsr`): one CT Acquisition per irradiation event (localizer, bolus
        tracking where the protocol has it, the diagnostic acquisition) and the study's
        DLP total (113813). Every CT image carries (0018,9345) CTDIvol in mGy and
        (0008,3010) IrradiationEventUID of the acquisition it was reconstructed from, so the
        image's CTDIvol equals that acquisition's Mean CTDIvol (113830) in the SR.
    NM  (0054,0016) RadiopharmaceuticalInformationSequence, first item:
        (0018,1074) RadionuclideTotalDose in MBq, (0018,0031) Radiopharmaceutical,
        (0018,1075) RadionuclideHalfLife in s, (0018,1078) RadiopharmaceuticalStartDateTime.
    CR/DX  per image: (0040,8302) EntranceDoseInmGy (DS, mGy), (0018,115E)
        ImageAndFluoroscopyAreaDoseProduct (DS, dGy*cm2), (0018,1411) ExposureIndex,
        (0018,1412) TargetExposureIndex, (0018,1413) DeviationIndex.
    MR and US carry no ionising-radiation dose.
    Children get paediatric doses (lower CTDIvol, weight-based NM activity).

Pixels are small deterministic patterns (a gradient plus a disc that moves with the instance
number) so a rendered frame is never uniform: 16-bit MONOCHROME2 for CT (stored 0..4095, rescale
intercept -1024, HU window 40/400), MR and NM; 8-bit MONOCHROME2 for CR, DX and US.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    NuclearMedicineImageStorage,
    UltrasoundImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

from broker.demo import rdsr

__all__ = [
    "DEFAULT_FACILITIES",
    "MODALITIES",
    "REFERENCE_DATE",
    "FacilitySpec",
    "SynthPatient",
    "generate_demo",
    "generate_patients",
    "generate_study",
    "uid_root",
    "write_demo",
    "write_files",
    "write_part10",
]

# Fixed "today" of the synthetic world: dates must not depend on the clock.
REFERENCE_DATE = date(2026, 6, 30)
_FIRST_STUDY_DATE = date(2016, 1, 1)
IMPLEMENTATION_VERSION_NAME = "SCANONCE_SYNTH"
MANUFACTURER = "ScanOnce Synthetic"

MODALITIES = ("CT", "MR", "CR", "DX", "US", "NM")


@dataclass(frozen=True, slots=True)
class FacilitySpec:
    id: str
    issuer: str
    name: str
    charset: str = "ISO_IR 192"  # what this facility's PACS writes when the name fits
    pediatric: bool = False
    mrn_prefix: str = ""
    mrn_digits: int = 7


DEFAULT_FACILITIES: tuple[FacilitySpec, ...] = (
    FacilitySpec("stmarys", "ST-MARYS", "St Mary's Hospital", "ISO_IR 100", False, "M", 8),
    FacilitySpec("northgen", "NORTH-GENERAL", "North General Hospital", "ISO_IR 192", False, "", 9),
    FacilitySpec("kids", "CHILDRENS", "Children's Hospital", "ISO_IR 192", True, "K", 6),
)


@dataclass(frozen=True, slots=True)
class SynthPatient:
    """One patient record as one facility knows it."""

    person: str  # ground truth across facilities; never written into a dataset
    facility_id: str
    issuer: str
    institution_name: str
    patient_id: str
    name: str  # PN: family^given^middle
    birth_date: str  # YYYYMMDD
    sex: str  # M, F or O
    address: str
    charset: str  # SpecificCharacterSet for this record's datasets
    uid_root: str
    height_cm: int
    weight_kg: int

    @property
    def birth(self) -> date:
        return _parse_da(self.birth_date)

    @property
    def is_child(self) -> bool:
        return _age_years(self.birth, REFERENCE_DATE) < 18


# --- name tables (invented combinations; a few need Latin-1, a few need UTF-8) ---------------------

_FAMILY = (
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Garcia",
    "Martinez",
    "Müller",
    "Schröder",
    "Dubois",
    "Lefèvre",
    "Nguyễn",
    "Tran",
    "Kowalski",
    "Łukasiewicz",
    "Dvořák",
    "Novák",
    "Öztürk",
    "Şahin",
    "Okafor",
    "Mensah",
    "Patel",
    "Singh",
    "Kim",
    "Park",
    "Wang",
    "Li",
    "Haddad",
    "Cohen",
    "O'Brien",
    "Murphy",
    "Ferreira",
    "Conceição",
    "Hernández",
    "Muñoz",
    "Peña",
    "Jansen",
    "van der Berg",
    "Andersson",
    "Ólafsdóttir",
    "Smith-Jones",
    "Rossi",
    "Bianchi",
    "Kaur",
    "Adeyemi",
    "Mbeki",
)
_GIVEN_F = (
    "Zoë",
    "Chloé",
    "Renée",
    "Amélie",
    "Siobhán",
    "Ana",
    "Aisha",
    "Olivia",
    "Emma",
    "Sofía",
    "Mia",
    "Priya",
    "Mei",
    "Yuki",
    "Fatima",
    "Ingrid",
    "Łucja",
    "Grace",
    "Hannah",
    "Nadia",
    "Chiamaka",
    "Eleanor",
    "Maria",
    "Ayşe",
    "Linnea",
)
_GIVEN_M = (
    "José",
    "François",
    "Jürgen",
    "Søren",
    "Noël",
    "Mohammed",
    "Liam",
    "Noah",
    "Mateo",
    "Lucas",
    "Kwame",
    "Chidi",
    "Arjun",
    "Hiroshi",
    "Omar",
    "Björn",
    "Thomas",
    "Daniel",
    "Samuel",
    "Jakub",
    "Minh",
    "Tomás",
    "Oliver",
    "Ethan",
    "Ravi",
)
_MIDDLE = ("Anne", "Marie", "James", "Lee", "Rose", "John", "Elena", "Paul", "Grace", "Karl", "Jean")
_STREETS = (
    "Maple Avenue",
    "Harbour Road",
    "Elm Street",
    "Mill Lane",
    "Station Road",
    "Cedar Court",
    "Riverside Drive",
    "Church Street",
    "Orchard Way",
    "Kingfisher Close",
    "Birch Grove",
)
_TOWNS = ("Riverton", "Eastbrook", "Fairhaven", "Northfield", "Ashford", "Millbridge", "Lakeside")
_REFERRERS = (
    "Adebayo^Funmilayo",
    "Bergström^Lars",
    "Chen^Wei",
    "Delacroix^Margot",
    "Esposito^Marco",
    "Fitzgerald^Aoife",
    "Gupta^Ananya",
    "Hoffmann^Klaus",
    "Ibrahim^Yusuf",
    "Jensen^Freja",
)


# --- study protocols ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Protocol:
    description: str
    body_part: str
    series: tuple[str, ...]
    dose: float  # CT: adult CTDIvol mGy; NM: adult MBq; CR/DX: adult entrance dose mGy; else 0
    length_cm: float = 0.0  # CT: adult scan length; CR/DX: adult field area in cm2
    agent: str = ""  # NM radiopharmaceutical
    pediatric_only: bool = False
    adult_only: bool = False
    bolus_tracking: bool = False  # CT: a monitoring scan times the contrast before the spiral


_PROTOCOLS: dict[str, tuple[_Protocol, ...]] = {
    "CT": (
        _Protocol(
            "CT HEAD WO CONTRAST",
            "HEAD",
            ("Axial 5mm Brain", "Axial 1.25mm Bone", "Coronal MPR", "Sagittal MPR"),
            53.0,
            18.0,
        ),
        _Protocol(
            "CT CHEST W CONTRAST",
            "CHEST",
            ("Axial 2.5mm Soft Tissue", "Axial 1.25mm Lung", "Coronal MPR", "Sagittal MPR"),
            10.0,
            35.0,
        ),
        _Protocol(
            "CT ABDOMEN PELVIS W CONTRAST",
            "ABDOMEN",
            ("Axial 2.5mm Portal Venous", "Coronal MPR", "Sagittal MPR"),
            15.0,
            45.0,
        ),
        _Protocol(
            "CT ANGIO CHEST PE PROTOCOL",
            "CHEST",
            ("Axial 1mm Arterial", "Coronal MIP"),
            12.0,
            32.0,
            adult_only=True,
            bolus_tracking=True,
        ),
        _Protocol(
            "CT CERVICAL SPINE WO CONTRAST",
            "CSPINE",
            ("Axial 1mm Bone", "Sagittal MPR", "Coronal MPR"),
            20.0,
            18.0,
        ),
    ),
    "MR": (
        _Protocol(
            "MR BRAIN WO W CONTRAST",
            "BRAIN",
            ("Sag T1", "Ax T2 FSE", "Ax FLAIR", "Ax DWI", "Ax T1 Post"),
            0.0,
        ),
        _Protocol("MR KNEE RIGHT WO CONTRAST", "KNEE", ("Cor PD FS", "Sag PD", "Ax T2 FS"), 0.0),
        _Protocol(
            "MR LUMBAR SPINE WO CONTRAST", "LSPINE", ("Sag T1", "Sag T2", "Ax T2"), 0.0, adult_only=True
        ),
        _Protocol(
            "MR ABDOMEN LIVER W CONTRAST",
            "ABDOMEN",
            ("Ax T2 HASTE", "Ax T1 In Out Phase", "Ax T1 Post Dynamic"),
            0.0,
        ),
    ),
    "CR": (
        _Protocol("XR CHEST 2 VIEWS", "CHEST", ("PA", "LAT"), 0.12, 700.0),
        _Protocol("XR HAND LEFT 3 VIEWS", "HAND", ("PA", "OBL", "LAT"), 0.05, 300.0),
        _Protocol("XR KNEE RIGHT 2 VIEWS", "KNEE", ("AP", "LAT"), 0.3, 400.0),
        _Protocol("XR ABDOMEN 1 VIEW", "ABDOMEN", ("AP",), 2.0, 1200.0),
    ),
    "DX": (
        _Protocol("XR CHEST 1 VIEW PORTABLE", "CHEST", ("AP",), 0.1, 700.0),
        _Protocol("XR CHEST 2 VIEWS", "CHEST", ("PA", "LAT"), 0.12, 700.0),
        _Protocol("XR FOREARM LEFT 2 VIEWS", "ARM", ("AP", "LAT"), 0.06, 300.0),
        _Protocol("XR PELVIS 1 VIEW", "PELVIS", ("AP",), 1.5, 1200.0),
    ),
    "US": (
        _Protocol("US ABDOMEN COMPLETE", "ABDOMEN", ("Abdomen",), 0.0),
        _Protocol("US RENAL BILATERAL", "KIDNEY", ("Kidneys",), 0.0),
        _Protocol("US PELVIS TRANSABDOMINAL", "PELVIS", ("Pelvis",), 0.0, adult_only=True),
        _Protocol("US THYROID", "THYROID", ("Thyroid",), 0.0),
        _Protocol("US HIPS INFANT", "HIP", ("Hips",), 0.0, pediatric_only=True),
        _Protocol("US APPENDIX", "ABDOMEN", ("RLQ",), 0.0, pediatric_only=True),
    ),
    "NM": (
        _Protocol(
            "NM BONE SCAN WHOLE BODY",
            "WHOLEBODY",
            ("WB Anterior Posterior",),
            740.0,
            agent="Tc-99m Medronate",
        ),
        _Protocol(
            "NM MYOCARDIAL PERFUSION REST STRESS",
            "HEART",
            ("Rest", "Stress"),
            1110.0,
            agent="Tc-99m Sestamibi",
            adult_only=True,
        ),
        _Protocol("NM RENAL MAG3", "KIDNEY", ("Dynamic Posterior",), 185.0, agent="Tc-99m Mertiatide"),
        _Protocol("NM THYROID", "THYROID", ("Anterior Static",), 185.0, agent="Tc-99m Pertechnetate"),
    ),
}

_SOP_CLASS = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "US": UltrasoundImageStorage,
    "NM": NuclearMedicineImageStorage,
}

_AXIAL = ("1", "0", "0", "0", "1", "0")
_SAGITTAL = ("0", "1", "0", "0", "0", "-1")
_CORONAL = ("1", "0", "0", "0", "0", "-1")
_TC99M_HALF_LIFE_S = "21624.0"


# --- helpers -------------------------------------------------------------------------------------------


def uid_root(seed: int) -> str:
    """The UID root for everything generated from `seed` (34 characters, ends with a dot)."""
    return f"{PYDICOM_ROOT_UID}{1_000_000 + abs(seed) % 1_000_000}."


def _uid(root: str, *parts: object) -> str:
    # generate_uid joins its entropy sources with "" — join with a separator ourselves so that
    # ("1", "23") and ("12", "3") cannot collide.
    return str(generate_uid(prefix=root, entropy_srcs=["|".join(str(p) for p in parts)]))


def _parse_da(value: str) -> date:
    return date(int(value[:4]), int(value[4:6]), int(value[6:8]))


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def _age_years(born: date, on: date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def _patient_age(born: date, on: date) -> str:
    """AS value: days under a month, weeks under ~4 months, months under 2 years, else years."""
    days = (on - born).days
    if days < 31:
        return f"{max(days, 0):03d}D"
    if days < 120:
        return f"{days // 7:03d}W"
    years = _age_years(born, on)
    if years < 2:
        return f"{(on.year - born.year) * 12 + on.month - born.month - (on.day < born.day):03d}M"
    return f"{years:03d}Y"


def _ds(value: float, places: int = 2) -> str:
    return f"{value:.{places}f}"


def _strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.replace("Ł", "L").replace("ł", "l"))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _fits(text: str, charset: str) -> bool:
    try:
        text.encode(python_encoding.get(charset, "ascii") if charset else "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _typical_size(age: int, sex: str) -> tuple[float, float]:
    """Rough (height cm, weight kg) for an age: enough for weight-based NM dosing."""
    if age < 18:
        height = min(50 + 6.5 * age + (age > 11) * 2 * (age - 11), 175)
        weight = max(3.5, 3.5 + 2.6 * age + (age > 10) * 1.5 * (age - 10))
        return height, weight
    return (176.0, 80.0) if sex == "M" else (163.0, 67.0)


def _size_at(p: SynthPatient, on: date) -> tuple[float, float]:
    """The patient's (height m, weight kg) on a date: children grow between studies."""
    now_h, now_w = _typical_size(_age_years(p.birth, REFERENCE_DATE), p.sex)
    then_h, then_w = _typical_size(_age_years(p.birth, on), p.sex)
    return p.height_cm * then_h / now_h / 100.0, p.weight_kg * then_w / now_w


# --- patients --------------------------------------------------------------------------------------


def _person_name(rng: random.Random, sex: str) -> tuple[str, str, str]:
    given_pool = _GIVEN_F if sex == "F" else _GIVEN_M if sex == "M" else _GIVEN_F + _GIVEN_M
    middle = rng.choice(_MIDDLE) if rng.random() < 0.45 else ""
    return rng.choice(_FAMILY), rng.choice(given_pool), middle


def _pn(family: str, given: str, middle: str) -> str:
    return f"{family}^{given}^{middle}" if middle else f"{family}^{given}"


def _vary_name(rng: random.Random, family: str, given: str, middle: str) -> tuple[str, str, str]:
    """How a second facility tends to have the same person's name."""
    choice = rng.randrange(6)
    if choice == 0:  # identical
        return family, given, middle
    if choice == 1 and middle:  # middle name missing
        return family, given, ""
    if choice == 2 and middle:  # middle name reduced to an initial
        return family, given, middle[0]
    if choice == 3 and _strip_accents(family + given) != family + given:  # ASCII-only system
        return _strip_accents(family), _strip_accents(given), _strip_accents(middle)
    if choice == 4 and "-" in family:  # double-barrelled name cut short
        return family.split("-")[0], given, middle
    # A typo: two adjacent letters of the given name swapped (or a letter doubled if too short).
    if len(given) >= 4:
        i = rng.randrange(1, len(given) - 2)
        given = given[:i] + given[i + 1] + given[i] + given[i + 2 :]
    else:
        given = given + given[-1]
    return family, given, middle


def _mrn(rng: random.Random, facility: FacilitySpec, taken: set[str]) -> str:
    prefix = facility.mrn_prefix
    while True:
        mrn = f"{prefix}{rng.randrange(10 ** (facility.mrn_digits - 1), 10**facility.mrn_digits)}"
        if mrn not in taken:
            taken.add(mrn)
            return mrn


# Children of every age band the paediatric dose levels distinguish, whatever the seed: person
# index -> (age in days on REFERENCE_DATE, body part of the CT `generate_demo` gives them).
_CHILD_COHORT: dict[int, tuple[int, str]] = {
    1: (150, "HEAD"),  # an infant of 5 months
    4: (365 + 120, "CHEST"),  # 1 year
    13: (5 * 365 + 100, "HEAD"),  # 5 years
    17: (10 * 365 + 200, "ABDOMEN"),  # 10 years
    22: (15 * 365 + 40, "HEAD"),  # a teenager of 15
}
_COHORT_CT_DAYS_AGO = 14


def generate_patients(
    *, seed: int, count: int, facilities: Sequence[FacilitySpec] | None = None
) -> list[SynthPatient]:
    """`count` persons, returned as one record per (person, facility): about a third have two.

    Records are ordered by person, then by the order of `facilities`. Besides about 30% children
    of random ages, persons 2, 5, 14, 18 and 23 (when `count` reaches them) are children aged
    5 months, 1, 5, 10 and 15 years.
    """
    facs = tuple(facilities) if facilities is not None else DEFAULT_FACILITIES
    if not facs:
        raise ValueError("at least one facility is needed")
    rng = random.Random(f"scanonce-synth|patients|{seed}")
    root = uid_root(seed)
    taken: dict[str, set[str]] = {f.id: set() for f in facs}
    general = [f for f in facs if not f.pediatric] or list(facs)
    kids = [f for f in facs if f.pediatric]
    records: list[SynthPatient] = []
    twin_of: tuple[str, str, date, str] | None = None  # family, sex, birth, address

    for n in range(count):
        person = f"P{n + 1:04d}"
        sex = "O" if rng.random() < 0.02 else rng.choice("FM")
        if twin_of is not None:
            family, _, born, address = twin_of
            _, given, middle = _person_name(rng, sex)
            twin_of = None
        else:
            family, given, middle = _person_name(rng, sex)
            age = rng.randrange(0, 18) if rng.random() < 0.3 else rng.randrange(18, 93)
            born = REFERENCE_DATE - timedelta(days=365 * age + rng.randrange(0, 365) + age // 4)
            address = f"{rng.randrange(1, 400)} {rng.choice(_STREETS)}, {rng.choice(_TOWNS)}"
            # Person 11 is person 10's twin: same family name, birth date and address.
            if n == 9 and count > 10:
                twin_of = (family, sex, born, address)
            if n in _CHILD_COHORT:
                born = REFERENCE_DATE - timedelta(days=_CHILD_COHORT[n][0])
        age_now = _age_years(born, REFERENCE_DATE)
        typical_h, typical_w = _typical_size(age_now, sex)
        height, weight = int(typical_h + rng.uniform(-6, 6)), int(typical_w * rng.uniform(0.85, 1.25))

        home_pool = kids if (age_now < 18 and kids and rng.random() < 0.7) else general
        home = rng.choice(home_pool)
        sites = [home]
        if len(facs) > 1 and rng.random() < 0.33:
            # Adults are not seen at a children's hospital.
            others = [f for f in facs if f is not home and (age_now < 18 or not f.pediatric)]
            if others:
                sites.append(rng.choice(others))
        sites.sort(key=facs.index)

        for i, fac in enumerate(sites):
            fam, giv, mid = (family, given, middle) if i == 0 else _vary_name(rng, family, given, middle)
            name = _pn(fam, giv, mid)
            charset = fac.charset if _fits(name, fac.charset) else "ISO_IR 192"
            records.append(
                SynthPatient(
                    person=person,
                    facility_id=fac.id,
                    issuer=fac.issuer,
                    institution_name=fac.name,
                    patient_id=_mrn(rng, fac, taken[fac.id]),
                    name=name,
                    birth_date=_da(born),
                    sex=sex,
                    address=address,
                    charset=charset,
                    uid_root=root,
                    height_cm=height,
                    weight_kg=weight,
                )
            )

    _plant_shared_mrn(records, taken)
    return records


def _plant_shared_mrn(records: list[SynthPatient], taken: dict[str, set[str]]) -> None:
    """Give two different persons at two facilities the same bare MRN (a bare ID links nobody)."""
    for i, a in enumerate(records):
        for j in range(len(records) - 1, i, -1):
            b = records[j]
            if (
                b.person != a.person
                and b.facility_id != a.facility_id
                and a.patient_id not in taken[b.facility_id]
            ):
                taken[b.facility_id].add(a.patient_id)
                records[j] = dataclasses.replace(b, patient_id=a.patient_id)
                return


# --- pixels -------------------------------------------------------------------------------------------


def _pattern(rows: int, cols: int, k: int) -> np.ndarray:
    """A float image in [0, 1]: diagonal gradient, a bright disc that moves with k, a darker ring."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    ny, nx = y / max(rows - 1, 1), x / max(cols - 1, 1)
    img = 0.15 + 0.25 * (0.6 * nx + 0.4 * ny)
    cy = 0.5 + 0.2 * math.sin(k * 0.7)
    cx = 0.5 + 0.2 * math.cos(k * 0.7)
    r = np.sqrt((ny - cy) ** 2 + (nx - cx) ** 2)
    img = np.where(r < 0.18, 0.95, img)
    img = np.where((r > 0.3) & (r < 0.34), 0.05, img)
    return np.asarray(img, dtype=np.float32)


def _pixels(modality: str, rows: int, cols: int, k: int) -> bytes:
    img = _pattern(rows, cols, k)
    if modality == "CT":  # stored 0..4095 -> -1024..3071 HU; background air, disc bone-ish
        arr = (img * 2600).astype("<u2")
    elif modality in ("MR", "NM"):
        arr = (img * 1500).astype("<u2")
    else:
        arr = (img * 255).astype(np.uint8)
    return arr.tobytes()


# --- studies -------------------------------------------------------------------------------------------


def _choose_protocol(rng: random.Random, modality: str, child: bool, body_part: str | None) -> _Protocol:
    options = [
        p
        for p in _PROTOCOLS[modality]
        if not (child and p.adult_only) and not (not child and p.pediatric_only)
    ]
    if body_part:
        wanted = [p for p in options if p.body_part == body_part.upper()]
        options = wanted or options
    return rng.choice(options)


def _orientation(series_description: str) -> tuple[str, ...]:
    d = series_description.lower()
    if d.startswith("sag"):
        return _SAGITTAL
    if d.startswith("cor"):
        return _CORONAL
    return _AXIAL


def _study_date(rng: random.Random, born: date) -> date:
    start = max(born + timedelta(days=1), _FIRST_STUDY_DATE)
    if start >= REFERENCE_DATE:
        return REFERENCE_DATE
    return start + timedelta(days=rng.randrange((REFERENCE_DATE - start).days + 1))


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _set_patient(ds: Dataset, p: SynthPatient) -> None:
    ds.SpecificCharacterSet = p.charset
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.IssuerOfPatientID = p.issuer
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    ds.PatientAddress = p.address


def _set_image_pixel(ds: Dataset, modality: str, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelRepresentation = 0
    if modality in ("CT", "MR", "NM"):
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7


# --- dose ------------------------------------------------------------------------------------------------

# CT dose model. Adults get the protocol's CTDIvol and scan length (`_PROTOCOLS`), typical practice
# just under national diagnostic reference levels (DRLs), e.g. the UK NDRLs (2019): CT head 60 mGy
# CTDIvol / 970 mGy.cm DLP, abdomen-pelvis 15 mGy / 745 mGy.cm; chest 10 mGy x 35 cm, CT angiography
# 12 mGy x 32 cm and cervical spine 20 mGy x 18 cm are of the same kind. Children:
#   head (16 cm phantom): about three quarters of the European paediatric DRLs by age band
#     (EC Radiation Protection 185, 2018: under 3 months 24 mGy, 3 months to 1 year 28, 1 to 6
#     years 40, 6 years and over 50; DLP 300, 385, 505, 650 mGy.cm), so every band stays under
#     its DRL in a typical exam (single exams vary by about 10% either way);
#   body (32 cm phantom): the adult CTDIvol times (weight / 70 kg) ** 0.6, a stand-in for the
#     scanner's size-based exposure control (RP 185 sets body DRLs by weight for that reason);
#   scan length: the adult length times 0.55 + 0.025 x age (an infant's head is about 10 cm).
# So a 5-year-old's head CT is about 30 mGy / 370 mGy.cm against an adult's 53 mGy / 950 mGy.cm.
_PAEDIATRIC_HEAD_CTDIVOL = ((0.25, 18.0), (1.0, 21.0), (6.0, 30.0), (18.0, 37.0))
_CT_BEAM_MM = 40.0  # 64 x 0.625 mm detector rows
# Projection radiography: entrance dose (protocol) times field area gives the dose-area product.
# Adults come out near the UK NDRLs (2019, in Gy.cm2: chest PA 0.1, abdomen AP 2.5, pelvis AP 2.2;
# (0018,115E) is in dGy.cm2, ten times those numbers); children get less dose on a smaller field.


def _age_exact(born: date, on: date) -> float:
    return max((on - born).days, 0) / 365.25


def _ct_events(
    rng: random.Random,
    *,
    proto: _Protocol,
    age: float,
    weight_kg: float,
    start: datetime,
    root: str,
    key: str,
) -> tuple[list[rdsr.CtIrradiationEvent], rdsr.CtIrradiationEvent]:
    """A CT study's irradiation events as the scanner logs them, and the one its images come from."""
    child = age < 18
    head = proto.body_part == "HEAD"
    if child and head:
        ctdi = next(mgy for below, mgy in _PAEDIATRIC_HEAD_CTDIVOL if age < below)
    elif child:
        ctdi = proto.dose * min(1.0, (weight_kg / 70.0) ** 0.6)
    else:
        ctdi = proto.dose
    ctdi = round(ctdi * rng.uniform(0.92, 1.08), 2)
    length_mm = round(proto.length_cm * 10 * min(1.0, 0.55 + 0.025 * age) * rng.uniform(0.95, 1.05))
    kvp = 120.0 if not child or (head and age >= 6) else (80.0 if age < 5 else 100.0)
    current = 300.0 if not child else round(60 + 12 * age)
    events: list[rdsr.CtIrradiationEvent] = []
    scout_mm = length_mm + (50 if child else 100)
    events.append(
        rdsr.CtIrradiationEvent(
            event_uid=_uid(root, "event", key, "localizer"),
            protocol="Topogram",
            acquisition_type="constant_angle",
            body_part=proto.body_part,
            start=start + timedelta(minutes=1),
            exposure_time_s=round(scout_mm / 100.0, 1),
            scanning_length_mm=scout_mm,
            single_collimation_mm=0.625,
            total_collimation_mm=0.625,
            kvp=kvp,
            tube_current_ma=20.0 if child else 35.0,
            max_tube_current_ma=20.0 if child else 35.0,
            rotation_time_s=0.5,
        )
    )
    if proto.bolus_tracking:
        events.append(
            rdsr.CtIrradiationEvent(
                event_uid=_uid(root, "event", key, "monitoring"),
                protocol="Bolus Tracking",
                acquisition_type="stationary",
                body_part=proto.body_part,
                start=start + timedelta(minutes=3),
                exposure_time_s=6.0,
                scanning_length_mm=10.0,
                single_collimation_mm=5.0,
                total_collimation_mm=10.0,
                kvp=100.0,
                tube_current_ma=40.0,
                max_tube_current_ma=40.0,
                rotation_time_s=0.5,
                ctdivol_mgy=round(0.8 * 12 * rng.uniform(0.9, 1.1), 2),  # 12 low-dose rotations
                phantom="body",
            )
        )
    sequenced = head and not child
    pitch = 1.0 if sequenced else (1.375 if child and not head else 0.984)
    rotation = 1.0 if head else 0.5
    rotations = math.ceil(length_mm / _CT_BEAM_MM) if sequenced else length_mm / (pitch * _CT_BEAM_MM) + 1
    main = rdsr.CtIrradiationEvent(
        event_uid=_uid(root, "event", key, "diagnostic"),
        protocol=f"{'PAED ' if child else ''}{proto.description}",
        acquisition_type="sequenced" if sequenced else "spiral",
        body_part=proto.body_part,
        start=start + timedelta(minutes=4),
        exposure_time_s=round(rotations * rotation, 2),
        scanning_length_mm=float(length_mm),
        single_collimation_mm=0.625,
        total_collimation_mm=_CT_BEAM_MM,
        kvp=kvp,
        tube_current_ma=current,
        max_tube_current_ma=round(current * 1.4),
        rotation_time_s=rotation,
        pitch=pitch,
        ctdivol_mgy=ctdi,
        phantom="head" if head else "body",
    )
    events.append(main)
    return events, main


def _dose_report(
    *,
    patient: SynthPatient,
    study: Dataset,
    events: Sequence[rdsr.CtIrradiationEvent],
    key: str,
    station: str,
) -> Dataset:
    """The scanner's CT Radiation Dose SR for the study whose attributes `study` carries."""
    root = patient.uid_root
    last = events[-1]
    end = last.start + timedelta(seconds=math.ceil(last.exposure_time_s) + 5)
    sop_uid = _uid(root, "dose-sr", key)
    ds = Dataset()
    ds.file_meta = _file_meta(XRayRadiationDoseSRStorage, sop_uid)
    _set_patient(ds, patient)
    for keyword in (
        "PatientAge", "PatientSize", "PatientWeight", "StudyInstanceUID", "StudyDate", "StudyTime",
        "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName", "InstitutionName",
    ):  # fmt: skip
        setattr(ds, keyword, study[keyword].value)
    ds.SOPClassUID = XRayRadiationDoseSRStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = _uid(root, "dose-series", key)
    ds.Modality = "SR"
    ds.SeriesNumber = 997
    ds.SeriesDescription = "Dose Report"
    ds.SeriesDate = ds.ContentDate = end.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = end.strftime("%H%M%S")
    ds.InstanceNumber = 1
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.StationName = station
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "Synth CT"
    ds.DeviceSerialNumber = f"{station}-0001"
    ds.SoftwareVersions = IMPLEMENTATION_VERSION_NAME
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = []
    device = rdsr.DeviceObserver(
        uid=_uid(root, "device", patient.facility_id, station),
        name=station,
        manufacturer=MANUFACTURER,
        model="Synth CT",
        serial=ds.DeviceSerialNumber,
    )
    ds.update(
        rdsr.ct_radiation_dose_content(events=events, study_uid=ds.StudyInstanceUID, device=device, end=end)
    )
    return ds


def generate_study(
    *,
    rng_seed: int,
    patient: SynthPatient,
    modality: str,
    n_series: int,
    n_instances_per_series: int,
    rows: int = 64,
    cols: int = 64,
    pixel: bool = True,
    body_part: str | None = None,
    study_date: date | None = None,
    dose_report: bool = False,
) -> Iterator[Dataset]:
    """One study of `patient` at the patient's facility; each dataset carries its file meta.

    `body_part` (a BodyPartExamined value such as "CHEST") picks a matching protocol when the
    modality has one; `study_date` pins the date (default: drawn between 2016 and REFERENCE_DATE).
    `dose_report` adds, after a CT study's images, the scanner's CT Radiation Dose SR (its own
    series); without it the images still carry CTDIvol and their irradiation event UID.
    The same arguments always give the same datasets, UIDs included. UIDs depend on rng_seed,
    the patient (issuer and ID), modality, body_part and study_date; not on the image size, the
    series and instance counts or `pixel`, which describe the same study differently.
    """
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise ValueError(f"unsupported modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    if n_series < 1 or n_instances_per_series < 1 or rows < 1 or cols < 1:
        raise ValueError("n_series, n_instances_per_series, rows and cols must be positive")
    # Everything that changes what the study *is* goes into the UIDs; rows, cols, pixel and the
    # series/instance counts do not (the same study rendered smaller, or without pixels).
    key = f"{rng_seed}|{patient.issuer}|{patient.patient_id}|{modality}"
    if body_part or study_date:
        key += f"|{(body_part or '').upper()}|{study_date.isoformat() if study_date else ''}"
    rng = random.Random(f"scanonce-synth|study|{key}")
    root = patient.uid_root
    born = patient.birth
    when = study_date or _study_date(rng, born)
    age = _age_years(born, when)
    child = age < 18
    height_then, weight_then = _size_at(patient, when)
    proto = _choose_protocol(rng, modality, child, body_part)
    study_uid = _uid(root, "study", key)
    frame_uid = _uid(root, "for", key)
    hour, minute, second = rng.randrange(7, 20), rng.randrange(60), rng.randrange(60)
    study_time = f"{hour:02d}{minute:02d}{second:02d}"
    accession = f"{patient.issuer.replace('-', '')[:3]}{when:%y}{rng.randrange(10**6, 10**7)}"
    referrer = rng.choice(_REFERRERS)
    study_id = str(rng.randrange(1000, 100000))
    station = f"{patient.facility_id[:6].upper()}{modality}{rng.randrange(1, 4)}"

    # Dose for the whole study, drawn once (from its own stream) so every instance agrees.
    events: list[rdsr.CtIrradiationEvent] = []
    imaged: rdsr.CtIrradiationEvent | None = None
    if modality == "CT":
        events, imaged = _ct_events(
            random.Random(f"scanonce-synth|ct-dose|{key}"),
            proto=proto,
            age=_age_exact(born, when),
            weight_kg=weight_then,
            start=datetime(when.year, when.month, when.day, hour, minute, second),
            root=root,
            key=key,
        )
    if modality == "NM" and child:
        # EANM-style weight-based activity with a floor.
        nm_mbq = max(proto.dose * weight_then / 70.0, 20.0 if proto.dose < 300 else 40.0)
    else:
        nm_mbq = proto.dose
    nm_mbq = round(nm_mbq * rng.uniform(0.95, 1.05), 1)

    thickness = rng.choice((1.25, 2.5, 5.0)) if modality == "CT" else rng.choice((3.0, 4.0, 5.0))
    fov = 220.0 if proto.body_part in ("HEAD", "BRAIN", "CSPINE", "KNEE", "THYROID") else 380.0
    spacing = fov / max(rows, cols)
    sop_class = _SOP_CLASS[modality]

    for s in range(n_series):
        desc = proto.series[s % len(proto.series)]
        if s >= len(proto.series):
            desc = f"{desc} {s // len(proto.series) + 1}"
        series_uid = _uid(root, "series", key, s)
        series_time = f"{hour:02d}{(minute + s) % 60:02d}{second:02d}"
        orient = _orientation(desc)
        for i in range(n_instances_per_series):
            sop_uid = _uid(root, "sop", key, s, i)
            ds = Dataset()
            ds.file_meta = _file_meta(sop_class, sop_uid)
            _set_patient(ds, patient)
            ds.PatientAge = _patient_age(born, when)
            ds.PatientSize = _ds(height_then)
            ds.PatientWeight = _ds(weight_then, 1)
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = _da(when)
            ds.StudyTime = study_time
            ds.SeriesTime = series_time
            ds.ContentTime = series_time
            ds.AccessionNumber = accession
            ds.StudyID = study_id
            ds.StudyDescription = proto.description
            ds.ReferringPhysicianName = referrer
            ds.InstitutionName = patient.institution_name
            ds.StationName = station
            ds.Manufacturer = MANUFACTURER
            ds.ManufacturerModelName = f"Synth {modality}"
            ds.Modality = modality
            ds.SeriesDescription = desc
            ds.SeriesNumber = s + 1
            ds.InstanceNumber = i + 1
            ds.BodyPartExamined = proto.body_part
            ds.ImageType = (
                ["DERIVED", "SECONDARY"]
                if "MPR" in desc or "MIP" in desc
                else [
                    "ORIGINAL",
                    "PRIMARY",
                ]
            )
            _set_image_pixel(ds, modality, rows, cols)
            _set_modality(
                ds,
                modality=modality,
                proto=proto,
                desc=desc,
                index=i,
                rng_seed=rng_seed,
                orient=orient,
                spacing=spacing,
                thickness=thickness,
                frame_uid=frame_uid,
                event=imaged,
                nm_mbq=nm_mbq,
                child=child,
                when=when,
                study_time=study_time,
            )
            if pixel:
                vr = "OW" if ds.BitsAllocated == 16 else "OB"
                ds.add_new(0x7FE00010, vr, _pixels(modality, rows, cols, s * 31 + i))
            yield ds
    if dose_report and events:
        yield _dose_report(patient=patient, study=ds, events=events, key=key, station=station)


def _set_modality(
    ds: Dataset,
    *,
    modality: str,
    proto: _Protocol,
    desc: str,
    index: int,
    rng_seed: int,
    orient: tuple[str, ...],
    spacing: float,
    thickness: float,
    frame_uid: str,
    event: rdsr.CtIrradiationEvent | None,
    nm_mbq: float,
    child: bool,
    when: date,
    study_time: str,
) -> None:
    if modality in ("CT", "MR"):
        half = spacing * max(ds.Rows, ds.Columns) / 2
        pos = -index * thickness
        if orient == _AXIAL:
            position = (-half, -half, pos)
        elif orient == _SAGITTAL:
            position = (pos, -half, half)
        else:
            position = (-half, pos, half)
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(v, 3) for v in position]
        ds.ImageOrientationPatient = list(orient)
        ds.PixelSpacing = [_ds(spacing, 4), _ds(spacing, 4)]
        ds.SliceThickness = _ds(thickness, 2)
        ds.SliceLocation = _ds(pos, 3)
        ds.PatientPosition = "HFS"
        ds.AcquisitionNumber = 1
    if modality == "CT":
        ds.ImageType = list(ds.ImageType) + ["AXIAL" if orient == _AXIAL else "REFORMATTED"]
        if event is None or event.ctdivol_mgy is None:
            raise ValueError("a CT image needs the irradiation event it was acquired in")
        ds.KVP = f"{event.kvp:g}"
        ds.XRayTubeCurrent = round(event.tube_current_ma)
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "BONE" if "Bone" in desc or "Lung" in desc else "STANDARD"
        ds.GantryDetectorTilt = "0"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.CTDIvol = event.ctdivol_mgy
        ds.IrradiationEventUID = event.event_uid
    elif modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.MagneticFieldStrength = "1.5" if rng_seed % 2 else "3"
        ds.RepetitionTime = "4000" if "T2" in desc or "FLAIR" in desc else "550"
        ds.EchoTime = "90" if "T2" in desc or "FLAIR" in desc else "12"
        ds.EchoTrainLength = 16
        ds.WindowCenter = "700"
        ds.WindowWidth = "1400"
    elif modality in ("CR", "DX"):
        view = desc.split()[0]
        ds.ViewPosition = {"PA": "PA", "AP": "AP", "LAT": "LL", "OBL": ""}.get(view, "")
        ds.PatientOrientation = ["L", "F"] if view in ("PA", "AP") else ["P", "F"]
        px = 350.0 / max(ds.Rows, ds.Columns)  # a 35 cm detector whatever the matrix
        ds.ImagerPixelSpacing = [_ds(px, 4), _ds(px, 4)]
        ds.PixelSpacing = [_ds(px, 4), _ds(px, 4)]
        ds.KVP = "70" if child else ("110" if proto.body_part == "CHEST" else "75")
        ds.Exposure = 2 if child else 5
        ds.DistanceSourceToDetector = "1800" if proto.body_part == "CHEST" else "1000"
        entrance = proto.dose * (0.4 if child else 1.0) * (1.0 + 0.1 * (index % 3))
        ds.EntranceDoseInmGy = _ds(entrance, 3)
        # Dose-area product: entrance dose (mGy) x field area (cm2), / 100 for dGy.cm2 (PS3.3).
        field_cm2 = proto.length_cm * (0.45 if child else 1.0)
        ds.ImageAndFluoroscopyAreaDoseProduct = _ds(entrance * field_cm2 / 100.0, 4)
        ds.ExposureIndex = str(400 + 25 * (index % 5) - 50)
        ds.TargetExposureIndex = "400"
        ds.DeviationIndex = _ds(10 * math.log10(float(ds.ExposureIndex) / 400.0), 2)
        ds.WindowCenter = "128"
        ds.WindowWidth = "256"
        if modality == "DX":
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.PixelIntensityRelationship = "LOG"
            ds.DetectorType = "DIRECT"
        else:
            ds.PlateType = "IP"
    elif modality == "US":
        region = Dataset()
        region.RegionSpatialFormat = 1
        region.RegionDataType = 1
        region.RegionFlags = 0
        region.RegionLocationMinX0 = 0
        region.RegionLocationMinY0 = 0
        region.RegionLocationMaxX1 = ds.Columns - 1
        region.RegionLocationMaxY1 = ds.Rows - 1
        region.PhysicalUnitsXDirection = 3  # cm
        region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX = round(12.0 / ds.Columns, 5)
        region.PhysicalDeltaY = round(12.0 / ds.Rows, 5)
        ds.SequenceOfUltrasoundRegions = [region]
        ds.TransducerData = "C5-1" if proto.body_part in ("ABDOMEN", "KIDNEY", "PELVIS") else "L12-5"
    elif modality == "NM":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "WHOLE BODY" if "WB" in desc else "STATIC", "EMISSION"]
        ds.NumberOfFrames = 1
        ds.FrameIncrementPointer = [0x00540010, 0x00540020]
        ds.EnergyWindowVector = [1]
        ds.NumberOfEnergyWindows = 1
        ds.DetectorVector = [1]
        ds.NumberOfDetectors = 1
        ds.PixelSpacing = [_ds(spacing * 2, 4), _ds(spacing * 2, 4)]
        window = Dataset()
        rng_item = Dataset()
        rng_item.EnergyWindowLowerLimit = "126"
        rng_item.EnergyWindowUpperLimit = "154"
        window.EnergyWindowRangeSequence = [rng_item]
        window.EnergyWindowName = "Tc99m"
        ds.EnergyWindowInformationSequence = [window]
        detector = Dataset()
        detector.ImagePositionPatient = ["-256.000", "-256.000", "0.000"]
        detector.ImageOrientationPatient = list(_CORONAL)
        ds.DetectorInformationSequence = [detector]
        pharma = Dataset()
        pharma.Radiopharmaceutical = proto.agent
        pharma.RadionuclideTotalDose = _ds(nm_mbq, 1)
        pharma.RadionuclideHalfLife = _TC99M_HALF_LIFE_S
        injected = f"{max(int(study_time[:2]) - 3, 0):02d}{study_time[2:4]}00"
        pharma.RadiopharmaceuticalStartDateTime = f"{_da(when)}{injected}"
        ds.RadiopharmaceuticalInformationSequence = [pharma]
        ds.WindowCenter = "700"
        ds.WindowWidth = "1400"


# --- demo ---------------------------------------------------------------------------------------------

_ADULT_MIX = (("CT", 35), ("CR", 13), ("DX", 12), ("MR", 20), ("US", 12), ("NM", 8))
_CHILD_MIX = (("US", 30), ("CR", 18), ("DX", 17), ("CT", 15), ("MR", 15), ("NM", 5))
_SHAPE = {"CT": (2, 3), "MR": (2, 3), "US": (1, 3), "NM": (1, 1)}


def generate_demo(*, seed: int = 42, patients: int = 40) -> Iterator[tuple[str, Dataset]]:
    """(facility_id, dataset) for a modest demo archive: a few hundred 64x64 instances.

    Persons known at two facilities get a prior of the same body part at each, so a lookup at
    one facility finds imaging done at the other.
    """
    records = generate_patients(seed=seed, count=patients)
    rng = random.Random(f"scanonce-synth|demo|{seed}")
    focus: dict[str, tuple[str, str]] = {}  # person -> (modality, body part) shared across sites
    for n, rec in enumerate(records):
        child = rec.is_child
        mix = _CHILD_MIX if child else _ADULT_MIX
        n_studies = rng.choice((1, 1, 2, 2, 3))
        cohort = _CHILD_COHORT.get(int(rec.person[1:]) - 1)
        for k in range(n_studies):
            when = None
            if k == 0 and rec.person in focus:
                modality, body_part = focus[rec.person]
            elif k == 0 and cohort is not None:
                # A recent CT, so the child is scanned at the cohort age.
                modality, body_part = "CT", cohort[1]
                when = REFERENCE_DATE - timedelta(days=_COHORT_CT_DAYS_AGO)
            else:
                modality = rng.choices([m for m, _ in mix], weights=[w for _, w in mix])[0]
                body_part = ""
            proto_rng = random.Random(f"scanonce-synth|demo-proto|{seed}|{n}|{k}")
            if not body_part:
                body_part = _choose_protocol(proto_rng, modality, child, None).body_part
            focus.setdefault(rec.person, (modality, body_part))
            if modality in ("CR", "DX"):
                n_series, n_inst = rng.choice((1, 2)), 1
            else:
                n_series, n_inst = _SHAPE[modality]
            for ds in generate_study(
                rng_seed=seed * 1000 + n * 10 + k,
                patient=rec,
                modality=modality,
                n_series=n_series,
                n_instances_per_series=n_inst,
                body_part=body_part,
                study_date=when,
                dose_report=True,
            ):
                yield rec.facility_id, ds


# --- Part 10 -------------------------------------------------------------------------------------------


def write_part10(ds: Dataset) -> bytes:
    """The dataset as a Part 10 file (preamble, file meta, Explicit VR Little Endian)."""
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        raise ValueError("a Part 10 file needs SOPClassUID and SOPInstanceUID")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "MediaStorageSOPInstanceUID" not in meta:
        ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    elif meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_files(datasets: Iterable[Dataset], folder: str | Path) -> list[Path]:
    """Write each dataset as `<SOPInstanceUID>.dcm` under `folder` (created if missing)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for ds in datasets:
        path = out / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(write_part10(ds))
        paths.append(path)
    return paths


def write_demo(*, folder: str | Path, seed: int = 42, patients: int = 40) -> dict[str, list[Path]]:
    """Write `generate_demo` as `<folder>/<facility_id>/<SOPInstanceUID>.dcm`, paths per facility."""
    out: dict[str, list[Path]] = {}
    for facility_id, ds in generate_demo(seed=seed, patients=patients):
        out.setdefault(facility_id, []).extend(write_files([ds], Path(folder) / facility_id))
    return out
