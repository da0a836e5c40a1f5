"""`scanonce` with one extra job kind, `test-steps`, for the killed-worker tests (run as a real
subprocess: `python tests/jobs/steps_worker.py worker`).

A `test-steps` job does `steps` steps, appending "<attempt> <step>" to the file `log` as each one
finishes and checkpointing after it. On its first attempt it stops before step `hang_at` and
waits forever (the test kills it there with SIGKILL); later attempts run through and append
"<attempt> done" once at the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from broker.cli import app
from broker.jobs import service as jobs
from broker.jobs.models import Job


@jobs.register("test-steps")
def steps(_engine: Engine, _store: Any, job: Job, progress: jobs.Progress) -> None:
    params = jobs.params_of(job)
    log = Path(params["log"])
    start = int(jobs.checkpoint_of(job).get("next", 0))
    for step in range(start, int(params["steps"])):
        if job.attempts == 1 and step == int(params["hang_at"]):
            with log.open("a") as f:
                f.write(f"{job.attempts} hang\n")
            while True:  # the test kills this process here
                time.sleep(1)
        time.sleep(float(params.get("pause", 0)))  # a step that takes a while (the SIGTERM test)
        with log.open("a") as f:
            f.write(f"{job.attempts} {step}\n")
        progress.update(done=step + 1, total=int(params["steps"]), checkpoint={"next": step + 1})
    with log.open("a") as f:
        f.write(f"{job.attempts} done\n")


if __name__ == "__main__":
    sys.exit(app())
