"""The consent rule as a service (`may_share`), on SQLite and PostgreSQL: an opt-out follows the
person through identity's links (and stops following when the records are unlinked), a deny
wins over a permit, a migration adds the facility's consent policy; and the tokens the embedded
issuer mints state the purpose of use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from joserfc import jwt
from sqlalchemy import inspect
from sqlmodel import Session, select

from broker.app import build_state
from broker.consent import service as consent
from broker.identity import service as identity
from broker.identity.models import IdentityRecord
from broker.index import service as index_service
from broker.index.models import Patient
from broker.index.schemas import Query
from broker.index.service import ingest_files
from broker.security.schemas import Principal, Role
from broker.security.tokens import load_or_create_signing_key, mint
from broker.settings import Settings
from tests.support import ADMIN, make_ds, write

NORTH = Principal(who="dr-north", role=Role.clinician, facility="north", purpose_of_use="TREAT")
SOUTH = Principal(who="dr-south", role=Role.clinician, facility="south", purpose_of_use="TREAT")


def _setup(settings: Settings, tmp: Path) -> tuple[Any, int, int]:
    """Two facilities, one patient at each with the same demographics (linked to one person)."""
    state = build_state(settings)
    with Session(state.engine) as session:
        from broker.facilities import service as facilities

        facilities.add_facility(session=session, principal=ADMIN, facility_id="north", issuer="NORTH")
        facilities.add_facility(session=session, principal=ADMIN, facility_id="south", issuer="SOUTH")
    for facility, pid, n in (("north", "N1", 1), ("south", "S1", 2)):
        ds = make_ds(sop=f"1.2.3.{n}.1", study=f"1.2.3.{n}", series=f"1.2.3.{n}.0", pid=pid, name="ROE^ANN")
        out = ingest_files(
            engine=state.engine,
            store=state.store,
            principal=ADMIN,
            facility_id=facility,
            paths=[write(tmp, f"{pid}.dcm", ds)],
        )
        assert out[0].ok
    with Session(state.engine) as session:
        pks = {p.patient_id: p.pk for p in session.exec(select(Patient)) if p.pk is not None}
    return state, pks["N1"], pks["S1"]


def _linked(state: Any, north_pk: int, south_pk: int) -> bool:
    with Session(state.engine) as session:
        a, b = (session.get(Patient, pk) for pk in (north_pk, south_pk))
        return a is not None and b is not None and a.person_id is not None and a.person_id == b.person_id


def test_an_opt_out_follows_the_person_and_not_an_unlinked_record(settings: Settings, tmp_path: Path) -> None:
    state, north_pk, south_pk = _setup(settings, tmp_path)
    if not _linked(state, north_pk, south_pk):
        with Session(state.engine) as session:
            recs = {r.patient_pk: r.id for r in session.exec(select(IdentityRecord)) if r.id is not None}
            identity.manual_link(
                session=session,
                principal=ADMIN,
                record_id=recs[south_pk],
                to_record_id=recs[north_pk],
                why="same person",
            )
            session.commit()
    assert _linked(state, north_pk, south_pk)
    with Session(state.engine) as session:
        assert consent.may_share(session=session, patient_pk=south_pk, from_facility="south", principal=NORTH)
        consent.record_consent(
            session=session, principal=NORTH, facility="north", patient_id="N1", decision="deny"
        )
        # Given at north, it withholds south's record of the same person from north, and north's
        # from south; each facility still sees its own.
        assert not consent.may_share(
            session=session, patient_pk=south_pk, from_facility="south", principal=NORTH
        )
        assert not consent.may_share(
            session=session, patient_pk=north_pk, from_facility="north", principal=SOUTH
        )
        assert consent.may_share(session=session, patient_pk=north_pk, from_facility="north", principal=NORTH)
        assert consent.may_share(session=session, patient_pk=north_pk, from_facility="north", principal=ADMIN)
        # A permit does not undo a deny.
        consent.record_consent(
            session=session, principal=SOUTH, facility="south", patient_id="S1", decision="permit"
        )
        assert not consent.may_share(
            session=session, patient_pk=south_pk, from_facility="south", principal=NORTH
        )

        # Unlinked: the south record is no longer that person's, and the north opt-out no longer
        # covers it.
        rec = session.exec(select(IdentityRecord).where(IdentityRecord.patient_pk == south_pk)).one()
        assert rec.id is not None
        identity.unlink(session=session, principal=ADMIN, record_id=rec.id, why="not the same person")
        session.commit()
    assert not _linked(state, north_pk, south_pk)
    with Session(state.engine) as session:
        assert consent.may_share(session=session, patient_pk=south_pk, from_facility="south", principal=NORTH)
        assert not consent.may_share(
            session=session, patient_pk=north_pk, from_facility="north", principal=SOUTH
        )
    state.engine.dispose()


def test_the_migration_adds_the_tables_and_the_facility_policy(settings: Settings) -> None:
    state = build_state(settings)
    insp = inspect(state.engine)
    assert {"consent", "break_glass"} <= set(insp.get_table_names())
    assert "consent_policy" in {c["name"] for c in insp.get_columns("facility")}
    state.engine.dispose()


def test_the_embedded_issuer_states_treatment_for_clinical_roles(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    key = load_or_create_signing_key(tmp_path / "key.json")

    def claims(role: str, **extra: Any) -> dict[str, Any]:
        token = mint(key=key, settings=settings, subject="s", role=role, facility=None, extra=extra)
        return jwt.decode(token, key).claims

    assert claims("clinician")["purpose_of_use"] == "TREAT"
    assert claims("radiologist")["purpose_of_use"] == "TREAT"
    assert "purpose_of_use" not in claims("admin")
    assert "purpose_of_use" not in claims("facility")
    assert "purpose_of_use" not in claims("clinician", purpose_of_use=None)
    assert claims("clinician", purpose_of_use="HRESCH")["purpose_of_use"] == "HRESCH"


def _study_uids(state: Any, principal: Principal, patient_id: str) -> set[str]:
    """The study UIDs a QIDO-RS-like index search by PatientID returns to `principal`."""
    with Session(state.engine) as session:
        query = Query(
            level="study", filters={"PatientID": patient_id}, visible=consent.visibility(principal=principal)
        )
        found = index_service.search(session=session, query=query)
    return {m["0020000D"]["Value"][0] for m in found.matches}


def test_each_caller_gets_its_own_rule_and_the_search_keeps_its_filters(
    settings: Settings, tmp_path: Path
) -> None:
    """The condition is kept per caller: callers of two facilities, asking in turn in one process,
    each see by their own rule, and the search's own filters still apply around the rule."""
    state, _north_pk, _south_pk = _setup(settings, tmp_path)
    for _ in range(2):  # the second time from the kept conditions and compiled statements
        # Only the record asked for, though the rule would show the other facility's too.
        assert _study_uids(state, NORTH, "S1") == {"1.2.3.2"}
        assert _study_uids(state, SOUTH, "S1") == {"1.2.3.2"}
        assert _study_uids(state, SOUTH, "N1") == {"1.2.3.1"}
    with Session(state.engine) as session:
        consent.record_consent(
            session=session, principal=SOUTH, facility="south", patient_id="S1", decision="deny"
        )
    # The opt-out withholds south's record from north, not from south itself.
    assert _study_uids(state, NORTH, "S1") == set()
    assert _study_uids(state, SOUTH, "S1") == {"1.2.3.2"}
    assert _study_uids(state, NORTH, "N1") == {"1.2.3.1"}
    state.engine.dispose()
