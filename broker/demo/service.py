"""Loading the deterministic demo data set: its facilities, then its studies through the same
ingest path as STOW-RS (so identity links the demo patients as it would real ones)."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.demo import synth
from broker.facilities import service as facilities
from broker.index import service as index
from broker.security.schemas import Principal, Role
from broker.security.service import system_principal

BATCH = 64


def ensure_demo_facilities(*, engine: Engine) -> None:
    """The demo's facilities, registered once (safe to call again)."""
    with Session(engine) as session:
        known = {f.id for f in facilities.list_facilities(session=session)}
        for spec in synth.DEFAULT_FACILITIES:
            if spec.id not in known:
                facilities.add_facility(
                    principal=system_principal(who="demo", facility=spec.id),
                    session=session,
                    facility_id=spec.id,
                    issuer=spec.issuer,
                    name=spec.name,
                )


def load_demo(
    *,
    engine: Engine,
    store: Any,
    seed: int = 42,
    patients: int = 40,
    progress: Callable[[int, int], None] | None = None,
) -> Counter[str]:
    """Generate the demo studies for `seed` and ingest them; returns the count of each outcome
    (stored, duplicate, failed). The same seed gives the same UIDs, so a second load stores nothing."""
    ensure_demo_facilities(engine=engine)
    counts: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="scanonce-demo-") as tmp:
        by_facility: dict[str, list[str]] = {}
        for n, (facility_id, ds) in enumerate(synth.generate_demo(seed=seed, patients=patients)):
            path = Path(tmp) / f"{n}.dcm"
            path.write_bytes(synth.write_part10(ds))
            by_facility.setdefault(facility_id, []).append(str(path))
        total = sum(len(v) for v in by_facility.values())
        done = 0
        for facility_id, files in by_facility.items():
            principal = Principal(who="demo", role=Role.admin, facility=facility_id)
            for start in range(0, len(files), BATCH):
                chunk = files[start : start + BATCH]
                for outcome in index.ingest_files(
                    engine=engine, store=store, principal=principal, facility_id=facility_id, paths=chunk
                ):
                    counts[outcome.status] += 1
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    return counts
