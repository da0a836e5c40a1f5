"""A running broker node (state in-process, SCP on a free loopback port) and test data."""

from __future__ import annotations

import shutil
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from broker.app import build_state
from broker.demo import synth
from broker.deps import AppState
from broker.dimse.scp import ScpHandle, start_scp, stop_scp
from broker.dimse.service import DimsePeers
from broker.index.service import ingest_files
from broker.security.schemas import Principal, Role
from broker.settings import Settings
from tests.support import TEST_FILES

# Real files of several SOP classes and transfer syntaxes (uncompressed, big endian, deflated,
# JPEG baseline/extended/2000, RLE), each with a distinct SOP Instance UID.
SAMPLES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "SC_rgb_rle.dcm",
    "JPEG2000.dcm",
    "JPEG-lossy.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "rtdose.dcm",
    "rtplan.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
    "image_dfl.dcm",
    "ExplVR_BigEnd.dcm",
)


@dataclass
class Node:
    state: AppState
    scp: ScpHandle
    spool: Path  # where the SCP receives C-STORE data sets

    @property
    def port(self) -> int:
        return self.scp.port

    @property
    def aet(self) -> str:
        return self.state.settings.ae_title

    @property
    def peers(self) -> DimsePeers:
        return self.scp.peers


def _start(tmp: Path, **overrides: object) -> Generator[Node, None, None]:
    settings = Settings(data_dir=tmp / "data", host="127.0.0.1", dimse_port=0, **overrides)  # type: ignore[arg-type]
    state = build_state(settings)
    scp = start_scp(state=state, port=0)
    try:
        # The SCP spools received C-STORE data sets under the data dir.
        yield Node(state=state, scp=scp, spool=settings.data_dir / "spool")
    finally:
        stop_scp(scp)
        state.engine.dispose()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A fresh node in open mode (the embedded default)."""
    yield from _start(tmp_path)


@pytest.fixture
def closed_node(tmp_path: Path) -> Iterator[Node]:
    """A fresh node with open mode off: only registered calling AEs may associate."""
    yield from _start(tmp_path, dimse_open_mode=False)


@pytest.fixture(scope="module")
def loaded_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node shared by the read-only query/retrieve tests of a module."""
    yield from _start(tmp_path_factory.mktemp("loaded"))


def synthetic_studies(seed: int = 7) -> list[Dataset]:
    """Two patients, three studies (CT, MR, CR) with several series: small 32x32 images."""
    records = synth.generate_patients(seed=seed, count=4)
    # Two patients whose Patient IDs are unique here (the generator plants a shared bare MRN).
    ids = [r.patient_id for r in records]
    patients = [r for r in records if ids.count(r.patient_id) == 1][:2]
    out: list[Dataset] = []
    for n, (patient, modality) in enumerate(((patients[0], "CT"), (patients[0], "MR"), (patients[1], "CR"))):
        out += synth.generate_study(
            rng_seed=seed * 100 + n,
            patient=patient,
            modality=modality,
            n_series=2 if modality != "CR" else 1,
            n_instances_per_series=2,
            rows=32,
            cols=32,
            study_date=date(2021, 3 + n, 10),
        )
    return out


def sample_folder(folder: Path, *, with_synthetic: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLES:
        shutil.copy(TEST_FILES / name, folder / name)
    if with_synthetic:
        synth.write_files(synthetic_studies(), folder / "synth")
    return folder


SYNTH = synthetic_studies()
PATIENT = SYNTH[0]  # two studies (CT, MR); the other patient has one (CR)
COMPRESSED = "SC_rgb_jpeg_dcmtk.dcm"  # JPEG baseline, for retrieve in the stored syntax


@pytest.fixture(scope="module")
def archive(loaded_node: Node, tmp_path_factory: pytest.TempPathFactory) -> Node:
    """The shared node holding the synthetic studies and a few real files."""
    folder = tmp_path_factory.mktemp("archive")
    paths = [str(p) for p in synth.write_files(SYNTH, folder)]
    paths += [str(TEST_FILES / n) for n in ("CT_small.dcm", "MR_small.dcm", COMPRESSED)]
    outcomes = ingest_files(
        engine=loaded_node.state.engine,
        store=loaded_node.state.store,
        principal=Principal(who="test", role=Role.admin, facility="local"),
        facility_id="local",
        paths=paths,
    )
    assert all(o.status == "stored" for o in outcomes), [o.message for o in outcomes if not o.ok]
    return loaded_node
