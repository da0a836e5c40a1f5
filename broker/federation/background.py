"""The periodic index sync and the job worker (which also prunes old finished jobs, hourly), as
background threads of the app process.

The app's lifespan starts them and sets `stop` on shutdown:

    stop = threading.Event()
    threads = start_background(engine=state.engine, store=state.store, settings=state.settings, stop=stop)
    ...
    stop.set()

In production, `scanonce worker` processes run `broker.jobs.service.work` instead, and any number
of nodes may run the scheduler: queueing is idempotent (one active sync per facility).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.engine import Engine

from broker.jobs import service as jobs
from broker.settings import Settings

log = logging.getLogger("scanonce.federation.background")

DEFAULT_SYNC_INTERVAL = 3600.0


def sync_interval(settings: Settings) -> float:
    """`SCANONCE_SYNC_INTERVAL_SECONDS` (0 turns the schedule off); an hour by default."""
    return float(getattr(settings, "sync_interval_seconds", DEFAULT_SYNC_INTERVAL) or 0)


def scheduler_loop(
    *, engine: Engine, interval_seconds: float, stop: threading.Event, calling_ae: str = "SCANONCE"
) -> None:
    from broker.federation import service

    tick = max(1.0, min(interval_seconds / 4, 60.0))
    while not stop.is_set():
        try:
            queued = service.queue_due_syncs(
                engine=engine, interval_seconds=interval_seconds, calling_ae=calling_ae
            )
            if queued:
                log.info("queued %d periodic syncs", len(queued))
        except Exception:  # the schedule must survive a bad tick (database restart, ...)
            log.exception("periodic sync scheduling failed")
        stop.wait(tick)


def start_background(
    *, engine: Engine, store: Any, settings: Settings, stop: threading.Event, worker: bool = True
) -> list[threading.Thread]:
    import broker.federation.sync  # noqa: F401 - registers the "sync" job handler

    threads: list[threading.Thread] = []
    if worker:
        threads.append(
            threading.Thread(
                target=jobs.work,
                kwargs={
                    "engine": engine,
                    "store": store,
                    "stop": stop,
                    "keep_finished": jobs.retention(settings.job_retention_days),
                },
                name="scanonce-jobs",
                daemon=True,
            )
        )
    interval = sync_interval(settings)
    if interval > 0:
        threads.append(
            threading.Thread(
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
        )
    for t in threads:
        t.start()
    return threads
