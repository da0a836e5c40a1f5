"""Helpers shared by tests across domains, one copy each: where pydicom's bundled files are, the
caller principal of service functions, small hand-made Part 10 objects (synthetic, never
patient data), and an index migrated back to an older revision with rows written as it wrote
them (for the tests of a migration that fills existing rows)."""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from alembic import command
from alembic.config import Config
from joserfc.jwk import ECKey
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import Connection, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.db import _MIGRATIONS, migrate
from broker.index.models import Instance, InstanceConflict
from broker.security.schemas import Principal, Role
from broker.security.tokens import load_or_create_signing_key, mint
from broker.settings import Settings

# The caller of service functions that act for someone, as the embedded default's HTTP caller is.
ADMIN = Principal(who="test", role=Role.admin, facility="local")

PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
TEST_FILES = PYDICOM_DATA / "test_files"
CHARSET_FILES = PYDICOM_DATA / "charset_files"

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def make_ds(
    *,
    sop: str,
    study: str,
    series: str,
    name: str = "DOE^JOHN",
    pid: str = "P1",
    modality: str = "CT",
    date: str = "20240101",
    time: str = "120000",
    accession: str = "A1",
    description: str = "CT HEAD",
    instance_number: int = 1,
    charset: str = "ISO_IR 192",
    issuer: str | None = None,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = name
    ds.PatientID = pid
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "M"
    ds.StudyDate = date
    ds.StudyTime = time
    ds.AccessionNumber = accession
    ds.StudyDescription = description
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(32))
    return ds


# What the quadrants of `quadrant_ds` render as (full-range window), in the order top-left,
# top-right, bottom-left, bottom-right.
QUADRANTS = (0, 85, 170, 255)


def quadrant_pixels(rows: int = 40, columns: int = 60, values: tuple[int, ...] = QUADRANTS) -> np.ndarray:
    """A rows x columns 8-bit image of four flat quadrants of `values` (top-left, top-right,
    bottom-left, bottom-right): by default the rendering of `quadrant_ds`, to cut expected regions from."""
    top, left = rows // 2, columns // 2
    arr = np.empty((rows, columns), dtype=np.uint8)
    arr[:top, :left], arr[:top, left:], arr[top:, :left], arr[top:, left:] = values
    return arr


def quadrant_ds(*, sop: str, study: str, series: str, rows: int = 40, columns: int = 60) -> Dataset:
    """`make_ds` with an 8-bit image of four flat quadrants (stored 10, 80, 150, 220, rendered as
    QUADRANTS): a rendering of part of it shows, pixel for pixel, which part it was. Not square, so
    that a region's aspect ratio is not the image's by chance."""
    ds = make_ds(sop=sop, study=study, series=series)
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = quadrant_pixels(rows, columns, (10, 80, 150, 220)).tobytes()
    return ds


def minimal_part10(path: Any, **attrs: str) -> str:
    """A minimal valid Part 10 object (Secondary Capture, no pixels, fresh UIDs) with the given
    attributes (typically the patient module), written to `path`."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    for key, value in attrs.items():
        setattr(ds, key, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write(tmp: Path, name: str, ds: Dataset) -> str:
    path = tmp / name
    path.write_bytes(to_bytes(ds))
    return str(path)


def auth_headers(
    role: str = "admin",
    *,
    facility: str | None = "local",
    subject: str = "test",
    expires_in: int = 3600,
    purpose_of_use: str | None = "default",
) -> dict[str, str]:
    """The headers an HTTP caller of the given role sends: a bearer token from the embedded issuer,
    signed with the tests' key (SCANONCE_AUTH_SIGNING_KEY_FILE, set in tests/conftest.py).
    `purpose_of_use`: the token's claim ("default": what the embedded issuer states for the role,
    TREAT for clinicians and radiologists; None: no claim)."""
    token = mint_token(
        role, facility=facility, subject=subject, expires_in=expires_in, purpose_of_use=purpose_of_use
    )
    return {"Authorization": f"Bearer {token}"}


def mint_token(
    role: str = "admin",
    *,
    facility: str | None = "local",
    subject: str = "test",
    expires_in: int = 3600,
    purpose_of_use: str | None = "default",
) -> str:
    settings = Settings()
    key = _signing_key(str(settings.resolved_signing_key_file()))
    extra = {} if purpose_of_use == "default" else {"purpose_of_use": purpose_of_use}
    return mint(
        key=key,
        settings=settings,
        subject=subject,
        role=role,
        facility=facility,
        expires_in=expires_in,
        extra=extra,
    )


@functools.cache
def _signing_key(path: str) -> ECKey:
    return load_or_create_signing_key(Path(path))


def indexed_instance_keys(engine: Engine, *, sop_uid: str | None = None, conflicts: bool = False) -> set[str]:
    """The object-store keys the index names for its instances (one instance's with `sop_uid`;
    with `conflicts`, the kept-apart conflicting copies' too). Tests find stored objects through
    this rather than a key layout of their own: the layout changes between releases."""
    with Session(engine) as session:
        query = select(col(Instance.object_key))
        if sop_uid is not None:
            query = query.where(col(Instance.sop_uid) == sop_uid)
        keys = set(session.exec(query).all())
        if conflicts:
            other = select(col(InstanceConflict.object_key))
            if sop_uid is not None:
                other = other.where(col(InstanceConflict.sop_uid) == sop_uid)
            keys |= set(session.exec(other).all())
    return keys


def cli_env(data_dir: Path, database_url: str) -> dict[str, str]:
    """The environment a `scanonce` command run by a test reads: its data folder and database,
    and a short connect timeout (an unreachable database answers in seconds)."""
    return {
        "SCANONCE_DATA_DIR": str(data_dir),
        "SCANONCE_DATABASE_URL": database_url,
        "SCANONCE_DB_CONNECT_TIMEOUT_SECONDS": "3",
    }


def migrated_back_to(engine: Engine, revision: str) -> None:
    """The index at `revision`: migrated to the head, then downgraded (a migration's test writes
    rows there as that release wrote them, then migrates them forward)."""
    migrate(engine)
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def insert_row(conn: Connection, table: str, **row: object) -> None:
    """One row as plain SQL: an older schema than the models describe takes no ORM object."""
    names = ", ".join(row)
    conn.execute(text(f"INSERT INTO {table} ({names}) VALUES ({', '.join(':' + k for k in row)})"), row)
