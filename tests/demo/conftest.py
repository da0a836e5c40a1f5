"""The default demo data set, generated and encoded once for every test in tests/demo."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from broker.demo import synth


@pytest.fixture(scope="session")
def demo() -> list[tuple[str, Dataset, bytes]]:
    """(facility_id, dataset, Part 10 bytes) for every instance `scanonce demo` loads."""
    # No timing assertion here: the suite runs on loaded 2-core machines; the demo's speed is
    # the README's concern, not a test's.
    return [(fac, ds, synth.write_part10(ds)) for fac, ds in synth.generate_demo()]


@pytest.fixture(scope="session")
def patients() -> list[synth.SynthPatient]:
    """The demo's patient records (seed 42, 40 persons)."""
    return synth.generate_patients(seed=42, count=40)
