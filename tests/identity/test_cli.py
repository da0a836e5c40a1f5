"""`scanonce identity` sub-commands against a real SQLite data dir."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session
from typer.testing import CliRunner

from broker.cli import app as scanonce
from broker.index.service import ingest_files
from broker.security.schemas import Principal, Role
from storage import open_store

from .conftest import cli_index, ingest_patient, write_part10


def test_review_link_unlink_explain(tmp_path: Path) -> None:
    engine = cli_index(tmp_path)
    with Session(engine) as s:
        ingest_patient(s, "fac-a", "A1", "NGUYEN^SONJA", "20150601", "F", "17 Sharwood Crescent 2866")
        ingest_patient(s, "fac-b", "B1", "NGUYEN^PIA", "20150601", "F", "17 Sharwood Crescent 2866")
    engine.dispose()
    run = CliRunner().invoke
    dd = ["--data-dir", str(tmp_path)]
    r = run(scanonce, ["identity", "review", *dd])
    assert r.exit_code == 0 and "given:different" in r.output
    r = run(scanonce, ["identity", "link", "ISSUER-B|B1", "ISSUER-A|A1", "--why", "", *dd])
    assert r.exit_code == 1 and "why" in r.output
    r = run(
        scanonce,
        ["identity", "link", "ISSUER-B|B1", "ISSUER-A|A1", "--who", "nurse", "--why", "same child", *dd],
    )
    assert r.exit_code == 0, r.output
    r = run(scanonce, ["identity", "explain", "ISSUER-B|B1", *dd])
    assert r.exit_code == 0 and '"manual-link"' in r.output and '"nurse"' in r.output
    r = run(scanonce, ["identity", "unlink", "ISSUER-B|B1", "--who", "nurse", "--why", "no, twins", *dd])
    assert r.exit_code == 0
    r = run(scanonce, ["identity", "unlink", "ISSUER-B|B1", "--why", "again", *dd])
    assert r.exit_code == 1 and "not linked" in r.output
    r = run(scanonce, ["identity", "explain", "NOPE|1", *dd])
    assert r.exit_code == 1


def test_policy_command(tmp_path: Path) -> None:
    run = CliRunner().invoke
    dd = ["--data-dir", str(tmp_path)]
    r = run(scanonce, ["identity", "policy", *dd])
    assert r.exit_code == 0 and "strict=True" in r.output
    r = run(scanonce, ["identity", "policy", "--no-strict", "--auto", "18", *dd])
    assert r.exit_code == 0 and "auto-link >= 18.0" in r.output and "strict=False" in r.output
    r = run(scanonce, ["identity", "policy", "--review", "30", *dd])
    assert r.exit_code == 1 and "review threshold" in r.output


def test_a_threshold_that_is_not_a_finite_number_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """`--auto nan` compared false with every weight: nothing would ever link automatically or
    reach the review queue, silently."""
    run = CliRunner().invoke
    dd = ["--data-dir", str(tmp_path)]
    for option in (["--auto", "nan"], ["--review", "nan"], ["--auto", "inf"], ["--review", "-inf"]):
        r = run(scanonce, ["identity", "policy", *option, *dd])
        assert r.exit_code == 1 and "finite" in r.output, (option, r.output)
    r = run(scanonce, ["identity", "policy", *dd])
    assert r.exit_code == 0 and "auto-link >= 16.0, review >= 10.0" in r.output


def test_relink_names_links_records_stored_without_their_name(tmp_path: Path) -> None:
    """After the upgrade: two records of 王^小東 stored when a Han name was no name (two persons),
    relinked on their names by `scanonce identity relink-names`; a second run has nothing to do."""
    from sqlalchemy import text

    engine = cli_index(tmp_path)
    with Session(engine) as s:
        a = ingest_patient(s, "fac-a", "A1", "王^小東", "19700312", "M", "1 Changan Avenue 100022")
        b = ingest_patient(s, "fac-b", "B1", "王^小東", "19700312", "M", "9 Other Road 200000")
        s.execute(text("UPDATE identity_record SET family = '', given = '', person_id = id"))
        s.execute(text("UPDATE patient SET person_id = pk"))
        s.commit()
        pks = (a.pk, b.pk)
    run = CliRunner().invoke
    dd = ["--data-dir", str(tmp_path)]
    r = run(scanonce, ["identity", "relink-names", *dd])
    assert r.exit_code == 0 and "2 record(s) relinked" in r.output, r.output
    r = run(scanonce, ["identity", "relink-names", *dd])
    assert r.exit_code == 0 and "0 record(s) relinked" in r.output, r.output
    with engine.connect() as conn:
        persons = conn.execute(text(f"SELECT DISTINCT person_id FROM patient WHERE pk IN {pks}")).all()
    engine.dispose()
    assert len(persons) == 1


def test_refresh_addresses_recomputes_addresses_stored_in_the_old_form(tmp_path: Path) -> None:
    """After the upgrade: a record stored when a Cyrillic address was its digits alone gets its
    whole address from its patient's newest study by `scanonce identity refresh-addresses`; a
    second run has nothing to do."""
    from sqlalchemy import text

    engine = cli_index(tmp_path)
    path = write_part10(
        tmp_path / "a1.dcm",
        SpecificCharacterSet="ISO_IR 192",
        PatientID="A1",
        PatientName="Иванов^Пётр",
        PatientBirthDate="19800115",
        PatientAddress="Казань, ул. Баумана, 12",
    )
    outcomes = ingest_files(
        engine=engine,
        store=open_store((tmp_path / "objects").as_uri()),
        principal=Principal(who="test", role=Role.admin, facility="fac-a"),
        facility_id="fac-a",
        paths=[path],
    )
    assert [o.status for o in outcomes] == ["stored"]
    with engine.begin() as conn:
        conn.execute(text("UPDATE identity_record SET address = '12'"))
    run = CliRunner().invoke
    dd = ["--data-dir", str(tmp_path)]
    r = run(scanonce, ["identity", "refresh-addresses", *dd])
    assert r.exit_code == 0 and "1 record(s) relinked on their addresses" in r.output, r.output
    r = run(scanonce, ["identity", "refresh-addresses", *dd])
    assert r.exit_code == 0 and "0 record(s) relinked" in r.output, r.output
    with engine.connect() as conn:
        assert conn.execute(text("SELECT address FROM identity_record")).scalar() == "КАЗАНЬ УЛ БАУМАНА 12"
    engine.dispose()
