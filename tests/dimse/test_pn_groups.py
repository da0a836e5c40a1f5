"""Non-Latin patient names over DIMSE: pydicom's Japanese, Korean and Chinese files sent with
dcmtk's storescu (each in its own character set), then asked for with findscu in UTF-8."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.dimse.conftest import Node
from tests.peers import dcmtk
from tests.support import CHARSET_FILES, make_ds, write

SENT = ["chrH31.dcm", "chrH32.dcm", "chrI2.dcm", "chrX1.dcm", "chrKoreanMulti.dcm"]


@pytest.fixture
def stored(node: Node) -> Iterator[Node]:
    paths = [str(CHARSET_FILES / name) for name in SENT]
    dcmtk("storescu", "-aet", "PACS1", "-aec", node.aet, "127.0.0.1", str(node.port), *paths)
    yield node


def _findscu(node: Node, model: str, keys: dict[str, str], out: Path) -> list[Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    args: list[str] = ["-aet", "PACS1", "-aec", node.aet, model, "-X", "-od", str(out)]
    for keyword, value in {"SpecificCharacterSet": "ISO_IR 192", **keys}.items():
        args += ["-k", f"{keyword}={value}" if value else keyword]
    dcmtk("findscu", *args, "127.0.0.1", str(node.port))
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_patient_root_patient_level_answers_every_component_group(stored: Node, tmp_path: Path) -> None:
    keys = {"QueryRetrieveLevel": "PATIENT", "PatientID": "H31EXAMPLE", "PatientName": ""}
    (found,) = _findscu(stored, "-P", keys, tmp_path)
    assert found.SpecificCharacterSet == "ISO_IR 192"
    assert str(found.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"


@pytest.mark.parametrize(
    ("name", "ids"),
    [
        ("山田*", {"H31EXAMPLE", "H32EXAMPLE"}),
        ("やまだ^たろう", {"H31EXAMPLE", "H32EXAMPLE"}),
        ("Yamada^Tarou=山田^太郎", {"H31EXAMPLE"}),
        ("洪*", {"I2EXAMPLE"}),
        ("김희중", {"2008-3"}),
    ],
)
def test_find_matches_any_component_group(stored: Node, tmp_path: Path, name: str, ids: set[str]) -> None:
    keys = {"QueryRetrieveLevel": "STUDY", "PatientName": name, "PatientID": "", "StudyInstanceUID": ""}
    found = _findscu(stored, "-S", keys, tmp_path)
    assert {ds.PatientID for ds in found} == ids
    names = {ds.PatientID: str(ds.PatientName) for ds in found}
    if "H32EXAMPLE" in names:
        assert names["H32EXAMPLE"] == "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"


def test_find_matches_a_referring_physician_in_any_component_group(node: Node, tmp_path: Path) -> None:
    """C-FIND ReferringPhysicianName is matched as PatientName is: 山田* finds the study referred
    by Yamada^Tarou=山田^太郎=やまだ^たろう (before, its Alphabetic group alone: nothing)."""
    paths = []
    for n, (pid, referrer) in enumerate(
        {"JP": "Yamada^Tarou=山田^太郎=やまだ^たろう", "EN": "Smith^Anne"}.items()
    ):
        ds = make_ds(sop=f"1.5.{n}.1.1", study=f"1.5.{n}", series=f"1.5.{n}.1", pid=pid)
        ds.ReferringPhysicianName = referrer
        paths.append(write(tmp_path, f"ref{n}.dcm", ds))
    dcmtk("storescu", "-aet", "PACS1", "-aec", node.aet, "127.0.0.1", str(node.port), *paths)
    for n, (referrer, ids) in enumerate(
        (("山田*", {"JP"}), ("==やまだ^たろう", {"JP"}), ("yamada*", {"JP"}), ("smith^anne", {"EN"}))
    ):
        keys = {
            "QueryRetrieveLevel": "STUDY",
            "ReferringPhysicianName": referrer,
            "PatientID": "",
            "StudyInstanceUID": "",
        }
        found = _findscu(node, "-S", keys, tmp_path / f"q{n}")
        assert {ds.PatientID for ds in found} == ids, referrer
        if "JP" in ids:
            assert str(found[0].ReferringPhysicianName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
