"""The default demo data set, generated and encoded once for every test in tests/demo."""

from __future__ import annotations

import time

import pytest
from pydicom.dataset import Dataset

from broker.demo import synth


@pytest.fixture(scope="session")
def demo() -> list[tuple[str, Dataset, bytes]]:
    """(facility_id, dataset, Part 10 bytes) for every instance `scanonce demo` loads."""
    started = time.perf_counter()
    items = [(fac, ds, synth.write_part10(ds)) for fac, ds in synth.generate_demo()]
    elapsed = time.perf_counter() - started
    print(f"demo: {len(items)} instances generated and encoded in {elapsed:.2f} s")
    assert elapsed < 10
    return items


@pytest.fixture(scope="session")
def patients() -> list[synth.SynthPatient]:
    """The demo's patient records (seed 42, 40 persons)."""
    return synth.generate_patients(seed=42, count=40)
