"""Test inputs made from pydicom's bundled files (synthetic; no patient data).

Image files are re-labelled with fresh UIDs and demographics so that one archive holds several
studies in several transfer syntaxes; the character-set files are kept byte for byte so that
their decoding is what the broker really receives.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from tests.support import CHARSET_FILES, TEST_FILES

ROOT = "1.2.826.0.1.3680043.10.1077"


def uid(*parts: int) -> str:
    return ".".join([ROOT, *map(str, parts)])


@dataclass
class Item:
    path: Path
    facility: str
    study: str
    series: str
    sop: str
    sop_class: str
    transfer_syntax: str

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass
class Corpus:
    items: list[Item] = field(default_factory=list)

    def by_facility(self) -> dict[str, list[Item]]:
        out: dict[str, list[Item]] = defaultdict(list)
        for item in self.items:
            out[item.facility].append(item)
        return dict(out)

    def study(self, study: str) -> list[Item]:
        return [i for i in self.items if i.study == study]

    def sop(self, sop: str) -> Item:
        return next(i for i in self.items if i.sop == sop)


# Studies of the corpus (facility "local" unless said otherwise).
MUELLER = uid(1)  # Müller^Hans, CT + MR + OT, 2020-01-05; several transfer syntaxes
MULLER = uid(2)  # MULLER^Anna, MR, 2021-06-10; big endian and implicit
SMITH = uid(3)  # Smith^John, NM, 2022-12-01; JPEG lossy only
NORTH_FACILITY = "north"


def relabel(src: Path, dst: Path, **attrs: object) -> pydicom.Dataset:
    ds = pydicom.dcmread(src)
    for key, value in attrs.items():
        setattr(ds, key, value)
    if "SOPInstanceUID" in attrs:
        ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(str(attrs["SOPInstanceUID"]))
    ds.save_as(dst)
    return ds


def build_corpus(folder: Path) -> Corpus:
    folder.mkdir(parents=True, exist_ok=True)
    corpus = Corpus()

    def add(
        src: Path, name: str, *, study: str, series: str, sop: str, facility: str = "local", **attrs: object
    ) -> None:
        dst = folder / name
        ds = relabel(src, dst, StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop, **attrs)
        corpus.items.append(
            Item(dst, facility, study, series, sop, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        )

    mueller = dict(
        SpecificCharacterSet="ISO_IR 100",
        PatientName="Müller^Hans",
        PatientID="PID-1",
        StudyDate="20200105",
        StudyTime="101500",
        AccessionNumber="ACC-1",
        StudyDescription="Chest and head",
    )
    add(TEST_FILES / "CT_small.dcm", "m_ct.dcm", study=MUELLER, series=uid(1, 1), sop=uid(1, 1, 1), **mueller)
    add(
        TEST_FILES / "MR_small_RLE.dcm",
        "m_rle.dcm",
        study=MUELLER,
        series=uid(1, 2),
        sop=uid(1, 2, 1),
        **mueller,
    )
    add(
        TEST_FILES / "MR_small_jp2klossless.dcm",
        "m_j2k.dcm",
        study=MUELLER,
        series=uid(1, 2),
        sop=uid(1, 2, 2),
        InstanceNumber=2,
        **mueller,
    )
    add(
        TEST_FILES / "SC_rgb_rle_2frame.dcm",
        "m_rgb.dcm",
        study=MUELLER,
        series=uid(1, 3),
        sop=uid(1, 3, 1),
        **mueller,
    )
    muller = dict(
        PatientName="MULLER^Anna",
        PatientID="PID-2",
        StudyDate="20210610",
        AccessionNumber="ACC-2",
        StudyDescription="Knee",
    )
    add(
        TEST_FILES / "MR_small_bigendian.dcm",
        "a_be.dcm",
        study=MULLER,
        series=uid(2, 1),
        sop=uid(2, 1, 1),
        **muller,
    )
    add(
        TEST_FILES / "MR_small_implicit.dcm",
        "a_impl.dcm",
        study=MULLER,
        series=uid(2, 1),
        sop=uid(2, 1, 2),
        InstanceNumber=2,
        **muller,
    )
    smith = dict(PatientName="Smith^John", PatientID="PID-3", StudyDate="20221201", AccessionNumber="ACC-3")
    add(
        TEST_FILES / "JPEG-lossy.dcm", "s_lossy.dcm", study=SMITH, series=uid(3, 1), sop=uid(3, 1, 1), **smith
    )
    for name in ("chrX1.dcm", "chrH31.dcm", "chrGerm.dcm"):
        ds = pydicom.dcmread(CHARSET_FILES / name)
        corpus.items.append(
            Item(
                CHARSET_FILES / name,
                NORTH_FACILITY,
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID),
                str(ds.SOPClassUID),
                str(ds.file_meta.TransferSyntaxUID),
            )
        )
    return corpus


def multipart_body(
    parts: list[bytes], *, part_type: str | None = "application/dicom", boundary: str | None = None
) -> tuple[bytes, str]:
    """A STOW-RS body and its Content-Type, written by hand (independent of the server's code)."""
    boundary = boundary or f"b-{secrets.token_hex(8)}"
    chunks = []
    for data in parts:
        chunks.append(f"--{boundary}\r\n".encode())
        if part_type:
            chunks.append(f"Content-Type: {part_type}\r\n".encode())
        chunks.append(b"\r\n" + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def split_multipart(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Parts of a multipart/related response as (headers, body), parsed independently of the server."""
    boundary = next(
        p.split("=", 1)[1].strip().strip('"')
        for p in content_type.split(";")
        if p.strip().startswith("boundary=")
    )
    delim = b"--" + boundary.encode()
    chunks = body.split(b"\r\n" + delim)
    first = chunks[0]
    assert first.startswith(delim), "body does not start with the boundary"
    chunks[0] = first[len(delim) :]
    parts = []
    for chunk in chunks:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, data))
    return parts
