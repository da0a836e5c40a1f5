"""`scanonce import` as an operator runs it: dry run first, then the import, into a real PACS."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from broker.cli import app as scanonce
from broker.clikit import state as cli_state
from tests.imports.conftest import (
    LOCAL_MRN,
    MINE,
    add_destination,
    ingest_outside,
    pacs_clear,
    pacs_instances,
    register_local_patient,
)
from tests.peers import OrthancPeer


def test_dry_run_sends_nothing_then_the_import_delivers_with_local_identifiers(
    pacs: OrthancPeer, tmp_path: Path
) -> None:
    pacs_clear(pacs)
    data = tmp_path / "data"
    st = cli_state(data)
    try:
        add_destination(st, pacs)
        study = ingest_outside(st, tmp_path)
        register_local_patient(st)
    finally:
        st.engine.dispose()
    run = CliRunner().invoke
    where = ["--data-dir", str(data)]

    r = run(scanonce, ["import", study.study_uid, "--to", MINE, "--dry-run", *where])
    assert r.exit_code == 0, r.output
    assert "UIDs kept" in r.output and LOCAL_MRN in r.output
    assert r.output.count("instance ") == len(study.files)  # one diff table per instance
    assert pacs_instances(pacs) == []  # a dry run sends nothing

    r = run(scanonce, ["import", study.study_uid, "--to", MINE, *where])
    assert r.exit_code == 0, r.output
    assert ": done:" in r.output
    got = pacs_instances(pacs)
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(study.files)
    assert {str(d.PatientID) for d in got} == {LOCAL_MRN}

    # A destination the broker does not know: a clear refusal, exit 1, nothing sent.
    r = run(scanonce, ["import", study.study_uid, "--to", "nowhere", *where])
    assert r.exit_code == 1
    assert "nowhere" in r.output
    assert len(pacs_instances(pacs)) == len(study.files)
