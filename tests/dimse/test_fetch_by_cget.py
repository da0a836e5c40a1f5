"""Retrieve on demand by C-GET from a facility archive that is itself a broker node (real DIMSE
both ways): what the facility fails to send keeps the study at the facility."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from broker.demo import synth
from broker.errors import Unavailable
from broker.facilities import service as facilities
from broker.federation import service as federation
from broker.index.service import find_instances, ingest_files, remote_holders
from broker.security.schemas import Principal, Role
from tests.dimse.conftest import SYNTH, Node, _start
from tests.support import ADMIN

MR = [ds for ds in SYNTH if ds.Modality == "MR"]


@pytest.fixture
def far(tmp_path: Path) -> Iterator[Node]:
    """A facility's archive: another node holding the MR study."""
    for far in _start(tmp_path / "far"):
        paths = [str(p) for p in synth.write_files(MR, tmp_path / "mr")]
        admin = Principal(who="test", role=Role.admin, facility="local")
        ingest_files(
            engine=far.state.engine, store=far.state.store, principal=admin, facility_id="local", paths=paths
        )
        yield far


def test_a_c_get_with_failed_sub_operations_leaves_the_study_at_its_facility(node: Node, far: Node) -> None:
    study = MR[0].StudyInstanceUID
    with Session(node.state.engine) as session:
        facilities.add_facility(
            session=session, principal=ADMIN, facility_id="far", issuer="FAR", ae_title=far.aet,
            host="127.0.0.1", port=far.port, sharing_policy="index_only",
        )  # fmt: skip
    federation.sync_facility(engine=node.state.engine, store=node.state.store, facility_id="far")
    # One instance the facility has indexed but cannot read: its C-GET sub-operation fails.
    with Session(far.state.engine) as session:
        lost = find_instances(session=session, study_uid=study, series_uid=None)[0]
    data = b"".join(far.state.store.get(lost.object_key))
    far.state.store.delete(lost.object_key)

    with pytest.raises(Unavailable) as failed:
        federation.ensure_local(engine=node.state.engine, store=node.state.store, study_uid=study)
    assert (
        f"1 of {len(MR)} instances of the study are missing from facility 'far' (1 not sent by the facility)"
        in failed.value.message
    )
    # Not marked as held here with an instance missing: the next retrieve asks the facility again.
    # What arrived was acknowledged to the facility, so it is kept.
    with Session(node.state.engine) as session:
        assert remote_holders(session=session, study_uid=study) == ["far"]
        held = {ref.sop_uid for ref in find_instances(session=session, study_uid=study, series_uid=None)}
    assert held == {ds.SOPInstanceUID for ds in MR} - {lost.sop_uid}

    # The facility has it back: the next try completes the study.
    far.state.store.put(lost.object_key, io.BytesIO(data))
    federation.ensure_local(
        engine=node.state.engine, store=node.state.store, study_uid=study, retry_after=timedelta(0)
    )
    with Session(node.state.engine) as session:
        assert remote_holders(session=session, study_uid=study) == []
        assert len(find_instances(session=session, study_uid=study, series_uid=None)) == len(MR)
