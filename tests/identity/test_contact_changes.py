"""A patient who moved: the newer study's address (or telephone) reaches the identity record and
its link is decided again on it, as a changed name's is; an older study arriving late, or one
whose header has no address, leaves the newer address in place. Newer is by StudyDate."""

from __future__ import annotations

from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from broker.identity import matching, service
from broker.identity.models import IdentityRecord, ReviewItem
from broker.index.models import Patient
from broker.index.service import ingest_files
from broker.security.schemas import Principal, Role
from storage import open_store

from .conftest import write_part10

P = Principal(who="test", role=Role.admin, facility="fac-a")
# No birth date: name and sex alone (11.2) are a question for review, not a link; the same
# address on top of them is a link.
PATIENT = {"PatientName": "Neumann^Michaela", "PatientSex": "F"}
MIAMI = "8 Stanley Street Miami 4223"
SPRINGFIELD = "12 Main Street Springfield 4000"
BOSTON = "1 Elm Road Boston 2108"

Study = Callable[..., list[str]]


@pytest.fixture
def study(engine: Any, tmp_path: Path) -> Study:
    """Ingest one batch of studies (one instance each) of `pid` at `facility`, each with its
    StudyDate and header attributes; returns the stored statuses."""
    store = open_store((tmp_path / "objects").as_uri())
    n = count()

    def ingest(facility: str, pid: str, *studies: tuple[str, dict[str, str]]) -> list[str]:
        paths = [
            write_part10(tmp_path / f"{next(n)}.dcm", PatientID=pid, StudyDate=date, **PATIENT, **header)
            for date, header in studies
        ]
        outcomes = ingest_files(engine=engine, store=store, principal=P, facility_id=facility, paths=paths)
        return [o.status for o in outcomes]

    return ingest


def _record(engine: Any, value: str) -> IdentityRecord:
    with Session(engine) as s:
        return s.exec(select(IdentityRecord).where(IdentityRecord.value == value)).one()


def _norm(address: str) -> str:
    return matching.normalize_address(address)


def test_a_newer_address_reaches_the_record_and_relinks_it(engine: Any, study: Study) -> None:
    assert study("fac-b", "B1", ("20240101", {"PatientAddress": MIAMI})) == ["stored"]
    assert study("fac-a", "A1", ("20230101", {"PatientAddress": SPRINGFIELD})) == ["stored"]
    a, b = _record(engine, "A1"), _record(engine, "B1")
    assert a.person_id != b.person_id  # a different address: a question, not a link
    with Session(engine) as s:
        [question] = s.exec(select(ReviewItem).where(ReviewItem.record_id == a.id)).all()
        assert question.status == "open"

    # She moved to Miami: her next study at A says so.
    assert study("fac-a", "A1", ("20250101", {"PatientAddress": MIAMI})) == ["stored"]
    a = _record(engine, "A1")
    assert a.address == _norm(MIAMI)
    assert a.person_id == b.person_id  # decided again, on the new address
    with Session(engine) as s:
        assert a.id is not None
        last = service.explain(session=s, record_id=a.id)["history"][-1]
        assert (last["why"], last["contributions"]["address"]["level"]) == ("demographics updated", "same")
        assert s.exec(select(ReviewItem.status).where(ReviewItem.record_id == a.id)).all() == ["superseded"]
        # The index row keeps the header's address the record was given.
        patient = s.exec(select(Patient).where(Patient.patient_id == "A1")).one()
        assert patient.address == MIAMI

    # A study from before the move, sent late, does not move her back.
    assert study("fac-a", "A1", ("20240601", {"PatientAddress": BOSTON})) == ["stored"]
    assert _record(engine, "A1").address == _norm(MIAMI)
    # A header that gives no address does not erase hers.
    assert study("fac-a", "A1", ("20260101", {})) == ["stored"]
    after = _record(engine, "A1")
    assert (after.address, after.person_id) == (_norm(MIAMI), b.person_id)


def test_a_late_older_study_does_not_win_over_a_newer_one_without_a_change(engine: Any, study: Study) -> None:
    """A newer study that repeats the stored address still dates it: a study older than it but
    newer than the first one does not overwrite the address either."""
    assert study("fac-a", "A1", ("20200101", {"PatientAddress": MIAMI})) == ["stored"]
    assert study("fac-a", "A1", ("20250101", {"PatientAddress": MIAMI})) == ["stored"]
    assert study("fac-a", "A1", ("20230101", {"PatientAddress": BOSTON})) == ["stored"]
    assert _record(engine, "A1").address == _norm(MIAMI)


def test_the_newest_study_of_a_batch_gives_the_address(engine: Any, study: Study) -> None:
    """Studies of one patient in one batch (a STOW-RS request), the older one first: the newer
    one's address is the record's, for a new patient and a known one alike."""
    assert study(
        "fac-a", "A1", ("20200101", {"PatientAddress": BOSTON}), ("20220101", {"PatientAddress": MIAMI})
    ) == ["stored", "stored"]
    assert _record(engine, "A1").address == _norm(MIAMI)
    assert study(
        "fac-a", "A1", ("20230101", {"PatientAddress": BOSTON}), ("20240101", {"PatientAddress": SPRINGFIELD})
    ) == ["stored", "stored"]
    assert _record(engine, "A1").address == _norm(SPRINGFIELD)


def test_a_newer_telephone_reaches_the_record(engine: Any, study: Study) -> None:
    assert study("fac-a", "A1", ("20230101", {"PatientTelephoneNumbers": "+1 305 555 0100"})) == ["stored"]
    old = _record(engine, "A1").phone
    assert study("fac-a", "A1", ("20250101", {"PatientTelephoneNumbers": "+1 617 555 0199"})) == ["stored"]
    new = _record(engine, "A1").phone
    assert new != old and new.endswith("6175550199")
    assert study("fac-a", "A1", ("20240101", {"PatientTelephoneNumbers": "+1 212 555 0142"})) == ["stored"]
    assert study("fac-a", "A1", ("20260101", {})) == ["stored"]
    assert _record(engine, "A1").phone == new


def test_a_linked_record_whose_new_address_unlike_its_person_goes_to_review(
    engine: Any, study: Study
) -> None:
    """Same path as a changed name: a record that no longer resembles its person is asked
    about, never split off silently."""
    phone = {"PatientTelephoneNumbers": "+1 305 555 0100"}
    assert study("fac-b", "B1", ("20240101", {"PatientAddress": MIAMI, **phone})) == ["stored"]
    assert study("fac-a", "A1", ("20240201", {"PatientAddress": MIAMI, **phone})) == ["stored"]
    a, b = _record(engine, "A1"), _record(engine, "B1")
    assert a.person_id == b.person_id
    moved = {"PatientAddress": BOSTON, "PatientTelephoneNumbers": "+1 617 555 0199"}
    assert study("fac-a", "A1", ("20250101", moved)) == ["stored"]
    a = _record(engine, "A1")
    assert (a.address, a.person_id) == (_norm(BOSTON), b.person_id)
    with Session(engine) as s:
        [question] = s.exec(select(ReviewItem).where(ReviewItem.record_id == a.id)).all()
        assert (question.candidate_record_id, question.status) == (b.id, "open")
        assert "update conflicts with linked person" in question.contributions
