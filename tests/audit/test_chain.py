"""The hash chain: appends, the database refusing edits, and `verify` naming the first broken row
after each kind of tampering (done with SQL directly, after dropping the triggers), on SQLite and
PostgreSQL."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session
from typer.testing import CliRunner

from broker.audit import service
from broker.audit.schemas import AuditRecord
from broker.audit.service import AuditQuery
from broker.db import make_engine
from tests.audit.conftest import drop_triggers


def _event(n: int, **kw: Any) -> AuditRecord:
    values: dict[str, Any] = {
        "action": "E",
        "subtype": "query",
        "agent_who": f"user{n % 3}",
        "agent_role": "clinician",
        "patient_id": f"P{n}",
        "patient_issuer": "HOSP-A",
        "source_interface": "dicomweb",
    }
    values.update(kw)
    return AuditRecord(**values)


def _fill(engine: Engine, n: int = 6) -> None:
    for i in range(1, n + 1):
        service.record_now(engine=engine, records=[_event(i)])


def _rows(engine: Engine) -> list[dict[str, Any]]:
    return service.rows_between(engine=engine, first=1, limit=1000)


def test_appended_events_form_a_chain_that_verifies(engine: Engine) -> None:
    _fill(engine, 5)
    rows = _rows(engine)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["prev_hash"] == "0" * 64
    assert all(rows[i]["prev_hash"] == rows[i - 1]["hash"] for i in range(1, 5))
    result = service.verify(engine=engine)
    assert result.ok and result.checked == 5
    assert (result.head_seq, result.head_hash) == (5, rows[-1]["hash"])


def test_the_database_refuses_update_and_delete(engine: Engine) -> None:
    _fill(engine, 2)
    for statement in (
        "UPDATE audit_event SET agent_who = 'someone else' WHERE seq = 1",
        "DELETE FROM audit_event WHERE seq = 2",
        "DELETE FROM audit_chain_head",
    ):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    assert service.verify(engine=engine).ok
    assert [r["agent_who"] for r in _rows(engine)] == ["user1", "user2"]


def _tamper(engine: Engine, *statements: str, **params: Any) -> None:
    drop_triggers(engine)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement), params)


def test_an_edited_row_is_named(engine: Engine) -> None:
    _fill(engine)
    _tamper(engine, "UPDATE audit_event SET patient_id = 'SOMEONE-ELSE' WHERE seq = 3")
    result = service.verify(engine=engine)
    assert not result.ok
    assert result.broken_seq == 3 and "edited" in result.problem
    assert result.checked == 2


def test_a_deleted_row_is_named(engine: Engine) -> None:
    _fill(engine)
    _tamper(engine, "DELETE FROM audit_event WHERE seq = 4")
    result = service.verify(engine=engine)
    assert not result.ok
    assert result.broken_seq == 4 and "missing" in result.problem


def test_rows_deleted_from_the_end_are_named(engine: Engine) -> None:
    _fill(engine)
    _tamper(engine, "DELETE FROM audit_event WHERE seq >= 5")
    result = service.verify(engine=engine)
    assert not result.ok
    assert result.broken_seq == 5 and "deleted from the end" in result.problem


def test_reordered_rows_are_named(engine: Engine) -> None:
    """Rows 2 and 3 swapped, each keeping its own (valid) hash: the links break."""
    _fill(engine)
    _tamper(
        engine,
        "UPDATE audit_event SET seq = 1000 WHERE seq = 2",
        "UPDATE audit_event SET seq = 2 WHERE seq = 3",
        "UPDATE audit_event SET seq = 3 WHERE seq = 1000",
    )
    result = service.verify(engine=engine)
    assert not result.ok
    assert result.broken_seq == 2


def test_an_inserted_row_is_named_even_with_a_correct_hash(engine: Engine) -> None:
    """A forged row slipped in after row 3 (later rows renumbered), its own hash computed
    correctly over its contents and a correct link to row 3: the row after it no longer links."""
    _fill(engine)
    rows = _rows(engine)
    forged = dict(rows[3])
    forged.update(seq=4, agent_who="nobody", prev_hash=rows[2]["hash"])
    forged["hash"] = service.row_hash(forged)
    columns = ", ".join(forged)
    values = ", ".join(f":{k}" for k in forged)
    _tamper(engine, "UPDATE audit_event SET seq = seq + 100 WHERE seq >= 4")
    _tamper(engine, "UPDATE audit_event SET seq = seq - 99 WHERE seq >= 104")
    _tamper(engine, f"INSERT INTO audit_event ({columns}) VALUES ({values})", **forged)
    result = service.verify(engine=engine)
    assert not result.ok
    # Row 4 (the forgery) links and hashes correctly; the renumbered old row 4, now 5, does not.
    assert result.broken_seq == 5


def test_a_row_appended_behind_the_brokers_back_is_named(engine: Engine) -> None:
    _fill(engine, 3)
    rows = _rows(engine)
    forged = dict(rows[2])
    forged.update(seq=4, prev_hash=rows[2]["hash"], agent_who="nobody")
    forged["hash"] = service.row_hash(forged)
    columns, values = ", ".join(forged), ", ".join(f":{k}" for k in forged)
    _tamper(engine, f"INSERT INTO audit_event ({columns}) VALUES ({values})", **forged)
    result = service.verify(engine=engine)
    assert not result.ok and result.broken_seq == 4 and "beyond the head" in result.problem


def test_a_rewritten_chain_is_caught_by_an_anchored_head(engine: Engine) -> None:
    """Someone recomputes every hash after editing row 2 and moves the head: the chain is
    self-consistent again, but not with the head written down before."""
    _fill(engine, 4)
    anchor = service.head(engine=engine)
    rows = _rows(engine)
    drop_triggers(engine)
    prev = "0" * 64
    with engine.begin() as conn:
        for row in rows:
            if row["seq"] == 2:
                row["patient_id"] = "SOMEONE-ELSE"
            row["prev_hash"] = prev
            row["hash"] = prev = service.row_hash(row)
            conn.execute(
                text("UPDATE audit_event SET patient_id = :p, prev_hash = :ph, hash = :h WHERE seq = :s"),
                {"p": row["patient_id"], "ph": row["prev_hash"], "h": row["hash"], "s": row["seq"]},
            )
        conn.execute(text("UPDATE audit_chain_head SET hash = :h"), {"h": prev})
    assert service.verify(engine=engine).ok  # what a rewrite of everything achieves
    result = service.verify(engine=engine, expect_head=anchor)
    assert not result.ok and result.broken_seq == anchor[0] and "anchored head" in result.problem


def test_control_characters_are_neutralised_before_hashing(engine: Engine) -> None:
    service.record_now(
        engine=engine,
        records=[
            _event(1, agent_who="eve\nINFO forged line\x1b[31m", entity="q=\u202eevil", patient_id="x" * 500)
        ],
    )
    row = _rows(engine)[0]
    assert row["agent_who"] == "eve\ufffdINFO forged line\ufffd[31m"
    assert row["entity"] == "q=\ufffdevil"
    assert len(row["patient_id"]) == 128
    assert service.verify(engine=engine).ok


def test_concurrent_writers_serialise_on_the_head(engine: Engine) -> None:
    """Threads appending through their own transactions (and the group-commit writer at the
    same time) never fork the chain: sequence numbers are unique and gapless."""
    writer = service.AuditWriter(engine)
    errors: list[BaseException] = []

    def direct(k: int) -> None:
        try:
            for i in range(10):
                service.record_now(engine=engine, records=[_event(k * 100 + i)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def grouped(k: int) -> None:
        try:
            for i in range(10):
                writer.record([_event(k * 100 + i, subtype="read")])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=direct, args=(k,)) for k in range(3)]
    threads += [threading.Thread(target=grouped, args=(k,)) for k in range(3, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = service.verify(engine=engine)
    assert result.ok and result.checked == 70 and result.head_seq == 70


def test_appends_from_another_process_or_a_rolled_back_one_do_not_fork_the_chain(engine: Engine) -> None:
    """An append chains onto where its process last left the head when that is still the head,
    and finds out when it is not: another process appended meanwhile (here a second engine on
    the same database), or its own last append rolled back."""
    other = make_engine(engine.url.render_as_string(hide_password=False))
    try:
        _fill(engine, 2)
        with Session(engine) as session:
            service.append(session=session, records=[_event(20)])
            session.rollback()
        _fill(engine, 10)  # past the pause after a wrong guess
        service.record_now(engine=other, records=[_event(30)])
        _fill(engine, 1)
    finally:
        other.dispose()
    rows = _rows(engine)
    assert [r["seq"] for r in rows] == list(range(1, 15))
    assert "P20" not in {r["patient_id"] for r in rows}
    result = service.verify(engine=engine)
    assert result.ok and result.checked == 14 and result.head_seq == 14


def test_search_by_patient_agent_action_subtype_and_date(engine: Engine) -> None:
    _fill(engine, 6)
    service.record_now(
        engine=engine, records=[_event(7, action="R", subtype="retrieve", patient_issuer="HOSP-B")]
    )
    with Session(engine) as session:
        assert service.search(session=session, query=AuditQuery(patient="P7"))[0] == 1
        assert service.search(session=session, query=AuditQuery(patient="HOSP-A|P7"))[0] == 0
        assert service.search(session=session, query=AuditQuery(agent="user1"))[0] == 3  # 1, 4, 7
        assert service.search(session=session, query=AuditQuery(action="R"))[0] == 1
        assert service.search(session=session, query=AuditQuery(subtype="query"))[0] == 6
        today = _rows(engine)[0]["recorded"][:10]
        assert service.search(session=session, query=AuditQuery(dates=(f"ge{today}", f"le{today}")))[0] == 7
        assert service.search(session=session, query=AuditQuery(dates=("le2000-01-01",)))[0] == 0
        total, rows = service.search(session=session, query=AuditQuery(), limit=2)
        assert total == 7 and [r["seq"] for r in rows] == [7, 6]


def test_cli_verify_head_and_list(tmp_path: Any) -> None:
    from broker.cli import app

    runner = CliRunner()
    data = tmp_path / "data"
    env = {"SCANONCE_DATA_DIR": str(data), "COLUMNS": "250"}
    from broker.db import make_engine, migrate

    data.mkdir()
    engine = make_engine(f"sqlite:///{data / 'index.sqlite3'}")
    migrate(engine)  # what a node does on its first start; the audit CLI never does
    result = runner.invoke(app, ["audit", "verify"], env=env)
    assert result.exit_code == 0, result.output
    assert "intact: 0 events" in result.output
    try:
        _fill(engine, 3)
        head = runner.invoke(app, ["audit", "head"], env=env)
        assert head.output.strip().startswith("3:")
        listed = runner.invoke(app, ["audit", "list", "--patient", "P2"], env=env)
        assert "P2" in listed.output and "P3" not in listed.output
        assert (
            runner.invoke(app, ["audit", "verify", "--expect-head", head.output.strip()], env=env).exit_code
            == 0
        )
        _tamper(engine, "UPDATE audit_event SET outcome = '0', agent_who = 'x' WHERE seq = 2")
    finally:
        engine.dispose()
    broken = runner.invoke(app, ["audit", "verify"], env=env)
    assert broken.exit_code == 1
    assert "BROKEN at row 2" in broken.output
