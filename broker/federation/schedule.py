"""The periodic index sync: a background thread of `scanonce serve` that queues a sync job for each
facility whose last sync is older than `SCANONCE_SYNC_INTERVAL_SECONDS` (the job worker, in
`broker.jobs.worker`, runs them). Any number of nodes may run it: queueing is idempotent (one
active sync per facility)."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.engine import Engine

from broker.federation import service
from broker.identity import service as identity
from broker.settings import Settings

log = logging.getLogger("scanonce.federation.schedule")

DEFAULT_SYNC_INTERVAL = 3600.0


def sync_interval(settings: Settings) -> float:
    """`SCANONCE_SYNC_INTERVAL_SECONDS` (0 turns the schedule off); an hour by default."""
    return float(getattr(settings, "sync_interval_seconds", DEFAULT_SYNC_INTERVAL) or 0)


def scheduler_loop(
    *, engine: Engine, interval_seconds: float, stop: threading.Event, calling_ae: str = "SCANONCE"
) -> None:
    tick = max(1.0, min(interval_seconds / 4, 60.0))
    while not stop.is_set():
        try:
            queued = service.queue_due_syncs(
                engine=engine, interval_seconds=interval_seconds, calling_ae=calling_ae
            )
            if queued:
                log.info("queued %d periodic syncs", len(queued))
            # Syncs grow the identity records: retrain the matcher when they grew enough.
            identity.ensure_trained(engine=engine)
        except Exception:  # the schedule must survive a bad tick (database restart, ...)
            log.exception("periodic sync scheduling failed")
        stop.wait(tick)


def start_scheduler(*, engine: Engine, settings: Settings, stop: threading.Event) -> threading.Thread | None:
    """Start the schedule in a daemon thread until `stop` is set; None when it is turned off."""
    interval = sync_interval(settings)
    if interval <= 0:
        return None
    thread = threading.Thread(
        target=scheduler_loop,
        kwargs={
            "engine": engine,
            "interval_seconds": interval,
            "stop": stop,
            "calling_ae": settings.ae_title,
        },
        name="scanonce-sync-schedule",
        daemon=True,
    )
    thread.start()
    return thread
