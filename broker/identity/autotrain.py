"""The matcher trains itself: when the identity records have grown enough since the last training
(`training_due`), a durable job (`identity-train`) re-estimates the Fellegi–Sunter parameters
(`params.train`), so a network gets trained figures without a manual step. `scanonce identity
train` still trains at once.

The rule: train when there are at least `MIN_RECORDS` records (what `train` needs) and either no
training has been recorded yet, or the records grew by `GROWTH` (20 %) or by `STEP` (10,000) since
the last training, whichever comes first. Figures estimated on 5,000 records barely move at
6,000 (docs/identity.md: the EM estimates are stable once each training rule has a few thousand
pairs), so +20 % keeps a small network close to its data, and +10,000 keeps a large one from
waiting for hundreds of thousands of new records. A training reads every record (minutes at a
million), which is why it is a job and not done inside a link.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.identity.models import IdentityRecord, IdentitySetting
from broker.identity.params import TRAINED_RECORDS, train
from broker.jobs import service as jobs
from broker.jobs.models import Job
from broker.security.service import system_principal

log = logging.getLogger("scanonce.identity")

TRAIN_JOB = "identity-train"
MIN_RECORDS = 50
GROWTH = 0.20
STEP = 10_000


def trained_records(*, session: Session) -> int | None:
    """How many records the last training saw (None: never trained)."""
    row = session.get(IdentitySetting, TRAINED_RECORDS)
    return int(row.value) if row is not None and row.value.isdigit() else None


def training_due(*, records: int, last: int | None) -> bool:
    if records < MIN_RECORDS:
        return False
    if last is None:
        return True
    return records >= last * (1 + GROWTH) or records >= last + STEP


def ensure_trained(*, engine: Engine) -> Job | None:
    """Queue the training job when it is due (two cheap queries when it is not). Called at
    startup and by the periodic scheduler; queueing is idempotent (one active job)."""
    with Session(engine) as session:
        records = int(session.execute(sa_select(func.count()).select_from(IdentityRecord)).scalar_one())
        last = trained_records(session=session)
    if not training_due(records=records, last=last):
        return None
    log.info("identity records grew to %d (last trained on %s): training queued", records, last)
    return jobs.enqueue(engine=engine, kind=TRAIN_JOB)


def _train_job(engine: Engine, _store: Any, job: Job, progress: jobs.Progress) -> None:
    with Session(engine) as session:
        records = int(session.execute(sa_select(func.count()).select_from(IdentityRecord)).scalar_one())
        if not training_due(records=records, last=trained_records(session=session)):
            progress.update(message="training not due any more")
            return
        params = train(session=session, principal=system_principal(who="identity-train", facility="local"))
    progress.update(message=f"trained on {params.get('records', records)} records")


def register_jobs() -> None:
    jobs.register(TRAIN_JOB)(_train_job)
