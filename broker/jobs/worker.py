"""The job worker as a background thread of `scanonce serve`, and as the `scanonce worker` process.

Job kinds are registered by their domains (`register_jobs()` of each, called by the app factory),
never by importing a module for its side effects: a worker runs exactly the kinds its process
registered, and says which when it starts.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy.engine import Engine

from broker.jobs import service as jobs
from broker.settings import Settings


def start_worker_thread(
    *, engine: Engine, store: Any, settings: Settings, stop: threading.Event
) -> threading.Thread:
    """Run the worker loop in a daemon thread until `stop` is set (the app's lifespan)."""
    thread = threading.Thread(
        target=jobs.work,
        kwargs={
            "engine": engine,
            "store": store,
            "stop": stop,
            "keep_finished": jobs.retention(settings.job_retention_days),
            "policy": jobs.Policy.of(settings),
        },
        name="scanonce-jobs",
        daemon=True,
    )
    thread.start()
    return thread


def run_worker(*, engine: Engine, store: Any, settings: Settings, stop: threading.Event) -> int:
    """The `scanonce worker` loop in this thread; returns how many jobs ran."""
    return jobs.work(
        engine=engine,
        store=store,
        stop=stop,
        keep_finished=jobs.retention(settings.job_retention_days),
        policy=jobs.Policy.of(settings),
    )
