"""Ingest: what a facility pushing studies would notice, on both backends."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from sqlalchemy import event, update
from sqlmodel import Session, select

from broker.app import build_state
from broker.deps import AppState
from broker.dicom import status
from broker.facilities import service as facilities
from broker.index import service
from broker.index.models import Instance, InstanceConflict, Series, SeriesFacts, Study
from broker.index.schemas import Query
from broker.security.schemas import Principal, Role
from broker.settings import Settings
from storage import LocalStore
from tests.support import ADMIN, CHARSET_FILES, TEST_FILES, make_ds, write

P = Principal(who="test", role=Role.admin, facility="local")


@pytest.fixture
def state(settings: Settings) -> Iterator[AppState]:
    st = build_state(settings)
    yield st
    st.engine.dispose()


def _ingest(state: AppState, paths: list[str], **kw: object) -> list[service.StoreOutcome]:
    return service.ingest_files(
        engine=state.engine,
        store=state.store,
        principal=P,
        facility_id=kw.pop("facility_id", "local"),  # type: ignore[arg-type]
        paths=paths,
        **kw,  # type: ignore[arg-type]
    )


def _stored_bytes(state: AppState, sop: str, study: str) -> bytes:
    with Session(state.engine) as s:
        (ref,) = [r for r in service.find_instances(session=s, study_uid=study) if r.sop_uid == sop]
    return b"".join(state.store.get(ref.object_key))


def test_real_files_are_stored_byte_for_byte_and_indexed(state: AppState) -> None:
    names = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "US1_J2KR.dcm"]
    paths = [str(TEST_FILES / n) for n in names if (TEST_FILES / n).exists()]
    outcomes = _ingest(state, paths)
    assert [o.status for o in outcomes] == ["stored"] * len(paths)
    for path, outcome in zip(paths, outcomes, strict=True):
        original = Path(path).read_bytes()
        assert _stored_bytes(state, outcome.sop_instance_uid, outcome.study_uid) == original
        with Session(state.engine) as s:
            ref = service.find_instances(
                session=s,
                study_uid=outcome.study_uid,
                sop_uid=outcome.sop_instance_uid,
                series_uid=outcome.series_uid,
            )[0]
        assert ref.size == len(original)
    with Session(state.engine) as s:
        assert len(service.search(session=s, query=Query(level="study")).matches) == len(
            {o.study_uid for o in outcomes}
        )


def test_same_instance_twice_is_one_instance(state: AppState, tmp_path: Path) -> None:
    path = write(tmp_path, "a.dcm", make_ds(sop="1.2.3.1", study="1.2.3", series="1.2.3.9"))
    assert _ingest(state, [path])[0].status == "stored"
    again = _ingest(state, [path, path])
    assert [o.status for o in again] == ["duplicate", "duplicate"]
    with Session(state.engine) as s:
        study = s.exec(select(Study).where(Study.study_uid == "1.2.3")).one()
        assert (study.num_instances, study.num_series) == (1, 1)


def test_conflicting_copy_is_kept_apart_and_the_stored_one_is_untouched(
    state: AppState, tmp_path: Path
) -> None:
    first = write(tmp_path, "a.dcm", make_ds(sop="1.2.3.1", study="1.2.3", series="1.2.3.9", name="DOE^JOHN"))
    other = write(
        tmp_path, "b.dcm", make_ds(sop="1.2.3.1", study="1.2.3", series="1.2.3.9", name="ROE^RICHARD")
    )
    assert _ingest(state, [first])[0].status == "stored"
    outcome = _ingest(state, [other])[0]
    assert outcome.status == "failed"
    assert outcome.failure_reason == status.DUPLICATE_SOP_INSTANCE
    assert "different object" in outcome.message
    assert _stored_bytes(state, "1.2.3.1", "1.2.3") == Path(first).read_bytes()
    with Session(state.engine) as s:
        conflict = s.exec(select(InstanceConflict)).one()
        assert conflict.sha256 == hashlib.sha256(Path(other).read_bytes()).hexdigest()
        assert b"".join(state.store.get(conflict.object_key)) == Path(other).read_bytes()
        match = service.search(session=s, query=Query(level="study", filters={"PatientName": "ROE*"}))
        assert match.matches == []


def test_bad_files_fail_alone_and_change_nothing(state: AppState, tmp_path: Path) -> None:
    good = write(tmp_path, "good.dcm", make_ds(sop="1.2.3.1", study="1.2.3", series="1.2.3.9"))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(Path(good).read_bytes()[:200])
    text = tmp_path / "note.txt"
    text.write_text("this is not DICOM")
    no_meta = tmp_path / "no_meta.dcm"
    shutil.copy(TEST_FILES / "no_meta.dcm", no_meta)
    bad_uid = write(tmp_path, "bad_uid.dcm", make_ds(sop="1.2.3.abc", study="1.2.3", series="1.2.3.9"))
    path_uid = write(tmp_path, "path_uid.dcm", make_ds(sop="1.2.3.2", study="../../etc", series="1.2.3.9"))
    outcomes = _ingest(state, [str(truncated), str(text), good, str(no_meta), bad_uid, path_uid])
    assert [o.status for o in outcomes] == ["failed", "failed", "stored", "failed", "failed", "failed"]
    assert outcomes[1].failure_reason == status.CANNOT_UNDERSTAND
    assert "SOPInstanceUID" in outcomes[4].message
    assert "StudyInstanceUID" in outcomes[5].message
    keys = [o.key for o in state.store.list()]
    assert len(keys) == 1 and ".." not in keys[0] and "etc" not in keys[0]


def test_study_uid_mismatch_fails_alone(state: AppState, tmp_path: Path) -> None:
    a = write(tmp_path, "a.dcm", make_ds(sop="1.2.3.1", study="1.2.3", series="1.2.3.9"))
    b = write(tmp_path, "b.dcm", make_ds(sop="1.2.4.1", study="1.2.4", series="1.2.4.9"))
    outcomes = _ingest(state, [a, b], expected_study_uid="1.2.3")
    assert [o.status for o in outcomes] == ["stored", "failed"]
    assert outcomes[1].failure_reason == status.STUDY_UID_MISMATCH


@pytest.mark.parametrize(
    "name", ["chrH31.dcm", "chrX1.dcm", "chrRuss.dcm", "chrJapMulti.dcm", "chrGreek.dcm"]
)
def test_names_in_any_character_set_come_back_as_utf8(state: AppState, name: str) -> None:
    import pydicom

    expected = str(pydicom.dcmread(CHARSET_FILES / name).PatientName)
    outcome = _ingest(state, [str(CHARSET_FILES / name)])[0]
    assert outcome.status == "stored", outcome.message
    with Session(state.engine) as s:
        (match,) = service.search(session=s, query=Query(level="study")).matches
        frags = service.metadata_fragments(session=s, study_uid=outcome.study_uid)
    assert match["00100010"]["Value"][0]["Alphabetic"] == expected.split("=")[0]
    assert match["00080005"]["Value"] == ["ISO_IR 192"]
    meta = orjson.loads(frags[0])
    assert meta["00080005"]["Value"] == ["ISO_IR 192"]


def test_issuer_in_data_is_honoured_only_when_registered(state: AppState, tmp_path: Path) -> None:
    with Session(state.engine) as s:
        facilities.add_facility(session=s, principal=ADMIN, facility_id="stmarys", issuer="ST-MARYS")
    known = write(
        tmp_path, "a.dcm", make_ds(sop="1.2.3.1", study="1.2.3", series="1.2.3.9", issuer="ST-MARYS")
    )
    unknown = write(
        tmp_path, "b.dcm", make_ds(sop="1.2.4.1", study="1.2.4", series="1.2.4.9", issuer="NOBODY")
    )
    _ingest(state, [known, unknown])
    with Session(state.engine) as s:
        issuers = {
            m["0020000D"]["Value"][0]: m["00100021"]["Value"][0]
            for m in service.search(session=s, query=Query(level="study")).matches
        }
    # Answered as the objects say; the unregistered one is qualified by the sending facility.
    assert issuers == {"1.2.3": "ST-MARYS", "1.2.4": "NOBODY"}
    with Session(state.engine) as s:
        qualified = {st.study_uid: st.issuer for st in s.exec(select(Study)).all()}
    assert qualified == {"1.2.3": "ST-MARYS", "1.2.4": "LOCAL"}


def test_metadata_has_bulk_data_uris_under_the_serving_base(state: AppState) -> None:
    outcome = _ingest(state, [str(TEST_FILES / "CT_small.dcm")])[0]
    with Session(state.engine) as s:
        frags = service.metadata_fragments(session=s, study_uid=outcome.study_uid)
    body = b"".join(service.render_metadata(frags, base="http://h:1/dicom-web"))
    (meta,) = orjson.loads(body)
    pixel = meta["7FE00010"]
    assert "InlineBinary" not in pixel
    assert pixel["BulkDataURI"] == (
        f"http://h:1/dicom-web/studies/{outcome.study_uid}/series/{outcome.series_uid}"
        f"/instances/{outcome.sop_instance_uid}/bulk/7FE00010"
    )


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm", "CT_small.dcm", "MR_small.dcm"])
def test_truncated_files_are_refused(state: AppState, tmp_path: Path, name: str) -> None:
    data = (TEST_FILES / name).read_bytes()
    if "truncated" not in name:
        data = data[: len(data) - 1000]  # cut inside the pixel data
    path = tmp_path / name
    path.write_bytes(data)
    (outcome,) = _ingest(state, [str(path)])
    assert outcome.status == "failed"
    assert outcome.failure_reason == status.CANNOT_UNDERSTAND
    assert "truncated" in outcome.message
    assert list(state.store.list()) == []


def test_a_deflated_file_is_not_mistaken_for_a_truncated_one(state: AppState) -> None:
    (outcome,) = _ingest(state, [str(TEST_FILES / "image_dfl.dcm")])
    assert outcome.status == "stored", outcome.message


def test_parsing_in_worker_processes_gives_the_same_outcomes(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`scanonce serve` parses in worker processes, a large call a group at a time (the next
    group parsed while this one is written); the answers and their order must not change."""
    from broker.index import ingest
    from broker.index.ingest import configure_parsing

    monkeypatch.setattr(ingest, "INGEST_GROUP", 2)
    good = write(tmp_path, "a.dcm", make_ds(sop="1.2.3.1", study="1.2.3", series="1.2.3.9"))
    other = write(tmp_path, "b.dcm", make_ds(sop="1.2.3.2", study="1.2.3", series="1.2.3.9"))
    bad = tmp_path / "bad.dcm"
    bad.write_text("not DICOM")
    settings.ingest_processes = 2
    st = build_state(settings)
    try:
        outcomes = _ingest(st, [good, str(bad), str(TEST_FILES / "CT_small.dcm"), good, other])
        assert [o.status for o in outcomes] == ["stored", "failed", "stored", "duplicate", "stored"]
        assert outcomes[1].failure_reason == status.CANNOT_UNDERSTAND
        assert [o.sop_instance_uid for o in outcomes[3:]] == ["1.2.3.1", "1.2.3.2"]
        assert _stored_bytes(st, "1.2.3.1", "1.2.3") == Path(good).read_bytes()
        assert _stored_bytes(st, "1.2.3.2", "1.2.3") == Path(other).read_bytes()
    finally:
        configure_parsing(processes=0)
        st.engine.dispose()


def test_metadata_is_stored_packed_and_rows_of_earlier_versions_still_read(state: AppState) -> None:
    """Each instance's metadata is stored deflated (about a third of its JSON): what WADO-RS
    metadata, instance-level QIDO-RS and the facts job read is the same JSON; a row written
    before packing (plain JSON) is read as it is."""
    (outcome,) = _ingest(state, [str(TEST_FILES / "CT_small.dcm")])
    with Session(state.engine) as s:
        (frag,) = service.metadata_fragments(session=s, study_uid=outcome.study_uid)
        stored = s.exec(select(Instance.metadata_json)).one()
    meta = orjson.loads(frag)
    assert meta["00080018"]["Value"] == [outcome.sop_instance_uid]
    assert meta["00100010"]["Value"] == [{"Alphabetic": "CompressedSamples^CT1"}]
    assert stored[:1] == b"\x01" and len(stored) * 2 < len(frag)

    def instance_answer() -> dict:
        with Session(state.engine) as s:
            result = service.search(
                session=s,
                query=Query(
                    level="instance", study_uid=outcome.study_uid, includefields=frozenset({"00180050"})
                ),
            )
        (match,) = result.matches
        return match

    packed_answer = instance_answer()
    assert packed_answer["00180050"]["Value"] == meta["00180050"]["Value"]
    # As an earlier version wrote it: the JSON itself.
    with Session(state.engine) as s:
        s.exec(update(Instance).values(metadata_json=frag))
        s.commit()
    with Session(state.engine) as s:
        assert service.metadata_fragments(session=s, study_uid=outcome.study_uid) == [frag]
    assert instance_answer() == packed_answer


def test_a_group_into_known_and_new_rows_counts_right_in_a_few_statements(
    state: AppState, tmp_path: Path
) -> None:
    """C-STORE groups mostly add to a study and series already stored: the writer reads what
    exists once and touches only what the group changes (issue 18: its statements are most of
    a C-STORE's CPU). Counters stay right whichever rows are new."""
    a, b = "1.2.826.0.1.3680043.8.498.501", "1.2.826.0.1.3680043.8.498.502"

    def f(study: str, series: str, n: int, modality: str = "CT", pid: str = "P1") -> str:
        ds = make_ds(
            sop=f"{series}.{n}", study=study, series=series, instance_number=n, modality=modality, pid=pid
        )
        return write(tmp_path, f"{series}-{n}.dcm", ds)

    assert {o.status for o in _ingest(state, [f(a, a + ".1", 1), f(a, a + ".1", 2)])} == {"stored"}
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    event.listen(state.engine, "before_cursor_execute", count)
    try:
        outcomes = _ingest(state, [f(a, a + ".1", n) for n in range(3, 7)])
    finally:
        event.remove(state.engine, "before_cursor_execute", count)
    assert {o.status for o in outcomes} == {"stored"}
    # One read of what exists, the instances' insert, two counters, the series' facts.
    assert 1 <= len(statements) <= 5, statements

    mixed = [
        f(a, a + ".1", 7),
        f(a, a + ".2", 1, "MR"),
        f(b, b + ".1", 1, "CT", "P2"),
        f(b, b + ".1", 2, "CT", "P2"),
    ]
    assert {o.status for o in _ingest(state, mixed)} == {"stored"}
    with Session(state.engine) as s:
        studies = {st.study_uid: st for st in s.exec(select(Study))}
        series = {se.series_uid: se.num_instances for se in s.exec(select(Series))}
    assert (studies[a].num_instances, studies[a].num_series, studies[a].modalities) == (8, 2, "\\CT\\MR\\")
    assert (studies[b].num_instances, studies[b].num_series, studies[b].modalities) == (2, 1, "\\CT\\")
    assert series == {a + ".1": 7, a + ".2": 1, b + ".1": 2}
    with Session(state.engine) as s:
        facts = {f.series_pk: f.instances for f in s.exec(select(SeriesFacts))}
        pk_of = {se.series_uid: se.pk for se in s.exec(select(Series))}
    assert facts == {pk_of[uid]: n for uid, n in series.items()}


def test_new_series_add_their_modality_to_a_stored_study_once(state: AppState, tmp_path: Path) -> None:
    """ModalitiesInStudy of a stored study gains each new series' modality once, however many
    new series of it one group brings, and a modality is matched literally ("_T" is a valid CS
    value, and a LIKE wildcard: it must not be taken for the CT already listed)."""
    a = "1.2.826.0.1.3680043.8.498.511"

    def f(series: str, n: int, modality: str) -> str:
        ds = make_ds(
            sop=f"{series}.{n}", study=a, series=series, instance_number=n, modality=modality, pid="P1"
        )
        return write(tmp_path, f"{series}-{n}.dcm", ds)

    assert {o.status for o in _ingest(state, [f(a + ".1", 1, "CT")])} == {"stored"}
    group = [f(a + ".2", 1, "SR"), f(a + ".3", 1, "SR"), f(a + ".4", 1, "CT"), f(a + ".5", 1, "_T")]
    assert {o.status for o in _ingest(state, group)} == {"stored"}
    with Session(state.engine) as s:
        study = s.exec(select(Study)).one()
    assert (study.modalities, study.num_series, study.num_instances) == ("\\CT\\SR\\_T\\", 5, 5)


def test_a_consumed_batch_is_durable_before_its_names_appear_and_synced_once(
    state: AppState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A STOW-RS batch into a local folder (stored as a group, `put_files`): each object's bytes
    are synced before its name appears in the store, once, and each folder that gained a name
    is synced before the ingest returns."""
    if not isinstance(state.store, LocalStore):
        pytest.skip("fsyncs of a local folder")
    study = "1.2.826.0.1.3680043.8.498.91"
    paths = [
        write(tmp_path, f"{n}.dcm", make_ds(sop=f"{study}.1.{n}", study=study, series=f"{study}.1"))
        for n in range(6)
    ]
    inode_of = {os.stat(p).st_ino: p for p in paths}
    root = state.store.root
    synced: list[tuple[int, int]] = []
    named_before_sync: list[str] = []
    lock = threading.Lock()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if st.st_ino in inode_of and any(
            os.path.samestat(st, os.stat(f)) for f in root.rglob("*.dcm") if not f.name.startswith(".tmp-")
        ):
            named_before_sync.append(inode_of[st.st_ino])
        real_fsync(fd)
        with lock:
            synced.append((st.st_dev, st.st_ino))

    monkeypatch.setattr(os, "fsync", fsync)
    outcomes = _ingest(state, paths, consume=True)

    assert [o.status for o in outcomes] == ["stored"] * 6
    assert not named_before_sync
    objects = [f for f in root.rglob("*.dcm") if not f.name.startswith(".tmp-")]
    assert len(objects) == 6
    for f in objects:
        st = f.stat()
        assert synced.count((st.st_dev, st.st_ino)) == 1, f
        parent = f.parent.stat()
        assert (parent.st_dev, parent.st_ino) in synced
    assert sorted(f.read_bytes() for f in objects) == sorted(Path(p).read_bytes() for p in paths)
