"""`scanonce identity` sub-commands against a real SQLite data dir."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session
from typer.testing import CliRunner

from broker.cli import app as scanonce

from .conftest import cli_index, ingest_patient


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
