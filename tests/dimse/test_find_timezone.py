"""C-FIND and Timezone Offset From UTC (0008,0201), read with dcmtk's findscu against the running
SCP: PS3.4 C.4.1.1.3.2 has a response carry it when its attributes of time are in a designated
time zone (and never with a zero-length value). The broker matches dates and times as each study
recorded them and does not adjust them (Timezone query adjustment is not negotiated), so a
response says the zone of its own study: the TimezoneOffsetFromUTC its instances carried."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from broker.demo import synth
from broker.index.service import ingest_files
from broker.security.schemas import Principal, Role
from tests.dimse.conftest import Node
from tests.peers import dcmtk

OFFSET = "+0100"


def _study(seed: int, *, offset: str | None) -> list[Dataset]:
    (patient,) = synth.generate_patients(seed=seed, count=1)
    datasets = list(
        synth.generate_study(
            rng_seed=seed,
            patient=patient,
            modality="CT",
            n_series=1,
            n_instances_per_series=1,
            rows=16,
            cols=16,
            study_date=date(2024, 3, 31),
        )
    )
    for ds in datasets:
        ds.PatientID = f"TZ-{seed}"
        ds.StudyTime = "013000"
        if offset is not None:
            ds.TimezoneOffsetFromUTC = offset
    return datasets


@pytest.fixture(scope="module")
def zoned(loaded_node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node holding a study recorded with its time zone (TZ-1) and one without (TZ-2)."""
    folder = tmp_path_factory.mktemp("zoned")
    paths = synth.write_files([*_study(1, offset=OFFSET), *_study(2, offset=None)], folder)
    outcomes = ingest_files(
        engine=loaded_node.state.engine,
        store=loaded_node.state.store,
        principal=Principal(who="test", role=Role.admin, facility="local"),
        facility_id="local",
        paths=[str(p) for p in paths],
    )
    assert all(o.status == "stored" for o in outcomes), [o.message for o in outcomes if not o.ok]
    yield loaded_node


def _findscu(node: Node, out: Path, *keys: str, level: str = "STUDY") -> dict[str, Dataset]:
    """The pending responses' identifiers by Patient ID, as findscu wrote them."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["-aet", "PACS1", "-aec", node.aet, "-S", "-X", "-od", str(out)]
    for key in (f"QueryRetrieveLevel={level}", "PatientID=TZ-*", "PatientID", *keys):
        args += ["-k", key]
    dcmtk("findscu", *args, "127.0.0.1", str(node.port))
    found = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return {str(ds.PatientID): ds for ds in found}


@pytest.mark.parametrize("asked", ["0008,0201", f"0008,0201={OFFSET}", "0008,0201=-0500"])
def test_a_requested_offset_is_answered_with_the_studys_own(zoned: Node, tmp_path: Path, asked: str) -> None:
    found = _findscu(zoned, tmp_path, "StudyDate", "StudyTime", asked)
    # Not a matching key: a value asked for selects nothing (both studies answer).
    assert set(found) == {"TZ-1", "TZ-2"}
    # The study recorded in +0100: its date and time come with the zone they are in.
    assert found["TZ-1"].TimezoneOffsetFromUTC == OFFSET
    assert (found["TZ-1"].StudyDate, found["TZ-1"].StudyTime) == ("20240331", "013000")
    # A study recorded without one: the zone of its times is not known, and PS3.4 forbids a
    # zero-length value, so the element is absent rather than empty or guessed.
    assert "TimezoneOffsetFromUTC" not in found["TZ-2"]


def test_times_in_a_response_come_with_their_zone_unasked(zoned: Node, tmp_path: Path) -> None:
    found = _findscu(zoned, tmp_path, "StudyTime")
    assert found["TZ-1"].TimezoneOffsetFromUTC == OFFSET
    assert "TimezoneOffsetFromUTC" not in found["TZ-2"]
    # A response holding no date or time needs no zone: exactly the keys asked for.
    plain = _findscu(zoned, tmp_path / "plain", "StudyInstanceUID")
    assert {e.keyword for e in plain["TZ-1"]} == {
        "QueryRetrieveLevel",
        "SpecificCharacterSet",
        "PatientID",
        "StudyInstanceUID",
    }


def test_a_series_level_response_gives_its_studys_offset(zoned: Node, tmp_path: Path) -> None:
    found = _findscu(zoned, tmp_path, "SeriesInstanceUID", "0008,0201", level="SERIES")
    assert found["TZ-1"].TimezoneOffsetFromUTC == OFFSET
    assert "TimezoneOffsetFromUTC" not in found["TZ-2"]
