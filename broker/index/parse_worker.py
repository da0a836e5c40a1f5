"""The start of each parse worker process (see `ingest._parse_pool`). Imports nothing of the
broker or of pydicom: the pool unpickles this module's initializer first, so what it sets runs
before the worker's first task imports the parser."""

from __future__ import annotations

import os
import sys
import threading
import time

# pydicom imports numpy and Pillow at its own import when they are installed (its pixel data
# handlers), ~8 MB of heap and ~9 MB of mapped libraries in every worker. Parsing never decodes
# pixels (the serving process renders them), so a worker refuses both: pydicom then starts
# without its pixel handlers.
NOT_IN_WORKERS = ("numpy", "PIL")


def start_worker(parent: int) -> None:
    """In each parse worker, before it parses: keep numpy and Pillow out, and exit once the
    server that started it is gone. A worker holds both ends of its task queue's pipe, so a
    server killed outright (SIGKILL, OOM killer) would leave it blocked on that queue forever,
    holding its memory."""
    for name in NOT_IN_WORKERS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="scanonce-parent-watch", daemon=True).start()
