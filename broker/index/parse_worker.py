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

# What `ps -o comm`, top and /proc/<pid>/comm show for the serving process's children, which
# `spawn` starts with the same command line (`python -c "from multiprocessing.spawn ..."`):
# bench/archive.py groups a server's CPU by it. At most 15 bytes (the kernel's limit).
PARSE_WORKER_NAME = "scanonce-parse"
DIMSE_RECEIVER_NAME = "scanonce-dimse"


def name_process(name: str) -> None:
    """Name this process (Linux: its main thread's comm; elsewhere nothing). Threads started
    afterwards inherit the name."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def start_worker(parent: int) -> None:
    """In each parse worker, before it parses: keep numpy and Pillow out, and exit once the
    server that started it is gone. A worker holds both ends of its task queue's pipe, so a
    server killed outright (SIGKILL, OOM killer) would leave it blocked on that queue forever,
    holding its memory."""
    name_process(PARSE_WORKER_NAME)
    for name in NOT_IN_WORKERS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="scanonce-parent-watch", daemon=True).start()
