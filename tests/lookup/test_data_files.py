"""The data files behind the relevance engine: versioned, internally consistent, their codes real."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
from pydicom.sr._concepts_dict import concepts

from broker.lookup import vocabulary
from broker.lookup.vocabulary import DATA_DIR, DataFileError, Vocabulary

ROOT = Path(__file__).resolve().parents[2]


def _sct() -> dict[str, tuple[set[str], set[int]]]:
    """pydicom's copy of PS3.16: SNOMED CT code -> (its meanings, context groups listing it)."""
    out: dict[str, tuple[set[str], set[int]]] = {}
    sct: dict[str, dict[str, tuple[str, list[int]]]] = concepts["SCT"]  # type: ignore[assignment]
    for by_code in sct.values():
        for code, (meaning, cids) in by_code.items():
            meanings, groups = out.setdefault(code, (set(), set()))
            meanings.add(meaning.lower())
            groups.update(cids)
    return out


def test_every_data_file_has_a_version() -> None:
    for name in ("regions", "vocabulary", "codes", "rules"):
        doc = tomllib.loads((DATA_DIR / f"{name}.toml").read_text())
        assert doc["version"], name
    assert set(vocabulary.load().versions) == {"regions", "vocabulary", "codes", "rules"}


def test_region_codes_are_the_dicom_ones() -> None:
    """Each region's SNOMED CT code exists in PS3.16 with that meaning, in the context group the
    file claims (CID 4031 for Common Anatomic Regions)."""
    sct = _sct()
    vocab = vocabulary.load()
    wrong = []
    for region in [*vocab.regions.values()]:
        scheme, value, meaning = region.code
        known = sct.get(value)
        if (
            scheme != "SCT"
            or known is None
            or meaning.lower() not in known[0]
            or (region.cid not in known[1] and not (region.cid == 0 and not known[1]))
        ):
            wrong.append((region.id, region.code, region.cid, known))
    assert wrong == []
    in_4031 = [r.id for r in vocab.regions.values() if r.cid == 4031]
    assert len(in_4031) >= 45, "most of the tree is CID 4031 itself"


def test_macro_codes_are_dicom_codes() -> None:
    sct = _sct()
    for macro in vocabulary.load().macros.values():
        assert macro.code[1] in sct, macro.id


def test_codes_name_their_source_and_known_regions() -> None:
    vocab = vocabulary.load()
    assert sum(len(t) for t in vocab.codes.values()) >= 100
    for system, table in vocab.codes.items():
        for entry in table.values():
            assert entry.source in vocab.code_sources, (system, entry.code)
            for r in entry.regions:
                assert r in vocab.regions or r in vocab.macros


def test_every_default_window_has_a_source() -> None:
    vocab = vocabulary.load()
    assert vocab.window_days == {"trauma": 1, "ed": 30, "inpatient": 30, "outpatient": 90}
    for setting, source in vocab.window_sources.items():
        assert len(source) > 40, setting


def test_body_part_terms_cover_annex_l_basics() -> None:
    vocab = vocabulary.load()
    for bp, expected in {
        "ABDOMEN": ["ABDOMEN"],
        "CHEST": ["CHEST"],
        "HEAD": ["HEAD"],
        "CSPINE": ["CSPINE"],
        "LSPINE": ["LSPINE"],
        "TLSPINE": ["TSPINE", "LSPINE"],
        "ABDOMENPELVIS": ["ABDOMEN", "PELVIS"],
        "CHESTABDPELVIS": ["CHEST", "ABDOMEN", "PELVIS"],
        "KNEE": ["KNEE"],
        "BREAST": ["BREAST"],
        "Head_Neck": ["HEAD", "NECK"],
    }.items():
        assert vocab.body_part(bp) == expected, bp


def test_data_files_ship_with_the_package() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '"lookup/data/*"' in text


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        (
            "regions.toml",
            'parent = "HEAD"\ncode = ["SCT", "12738006"',
            'parent = "HEADS"\ncode = ["SCT", "12738006"',
            "unknown parent",
        ),
        (
            "vocabulary.toml",
            '"KNEE" = { regions = ["KNEE"] }',
            '"KNEE" = { regions = ["KNEES"] }',
            "unknown region",
        ),
        ("codes.toml", 'source = "aim2013" }', 'source = "hearsay" }', "unknown source"),
        ("rules.toml", 'shows = ["CSPINE"]', 'shows = ["C_SPINE"]', "unknown region"),
    ],
)
def test_a_broken_data_file_is_refused(tmp_path: Path, file: str, old: str, new: str, message: str) -> None:
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR, data)
    text = (data / file).read_text()
    assert old in text
    (data / file).write_text(text.replace(old, new, 1))
    with pytest.raises(DataFileError, match=message):
        Vocabulary(data)
