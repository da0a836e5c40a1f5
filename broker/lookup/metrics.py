"""Prometheus counters of what ScanOnce is for: repeats avoided and the estimated effective dose
they spared, per facility (the facility whose clinician did not repeat the exam).

On prometheus_client's default registry, which the broker's `/metrics` serves; each process
counts its own records since it started (Prometheus sums the nodes and takes `increase()` over a
month). `GET /api/metrics/avoided` answers the same question from the table, across restarts.
"""

from __future__ import annotations

from prometheus_client import Counter

REPEATS_AVOIDED = Counter(
    "scanonce_repeats_avoided",
    "Repeat exams avoided: a clinician used a prior instead of ordering again",
    ["facility"],
)
DOSE_SPARED_MSV = Counter(
    "scanonce_dose_spared_msv",
    "Estimated effective dose spared by avoided repeats, in mSv",
    ["facility"],
)


def count_avoided(*, facility: str, dose_msv: float | None) -> None:
    """One avoided repeat recorded; a repeat without a dose estimate spares no counted dose."""
    REPEATS_AVOIDED.labels(facility=facility).inc()
    if dose_msv is not None and dose_msv > 0:
        DOSE_SPARED_MSV.labels(facility=facility).inc(dose_msv)
