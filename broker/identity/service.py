"""Patient identity: linking (issuer, value) records to persons (MPI). The one door other
packages use (`from broker.identity import service`); the work is done in the modules below.

Order of evidence, strongest first:
1. the same (issuer, value) is the same record;
2. a shared identifier from a trusted issuer (a national ID), or a record naming another
   record's (issuer, value) among its identifiers, links deterministically, unless the
   demographics contradict it (then a human reviews);
3. Fellegi–Sunter match weight over blocked candidates: auto-link above AUTO_WEIGHT when the
   name agrees *and* a birth date, address or phone agrees; a review item between the
   thresholds; a new person below.

Nothing is ever deleted: every change of a record's person is a `LinkEvent` with its method,
per-field contributions, who and why, and a merge can be split back by its group.

Functions never commit unless their name says a human or a feed made a decision (those are
called by routes/CLI/MLLP and commit themselves); `link_patients` runs inside ingest's
transaction.

Where each part lives:
- `params`: the Fellegi–Sunter parameters, training, the link policy;
- `records`: one record, its identifiers and keys, persons, the link history, trusted issuers;
- `locks`: the lock order every identity writer keeps (PostgreSQL);
- `decisions`: which person a record belongs to;
- `linking`: create or update a record and link it (feeds, ingest);
- `batch`: create and link a batch's new records at once (ingest);
- `manual`: merges, manual links and unlinks, the review queue, explain;
- `queries`: PIXm / PDQm reads;
- `rebuild`: the blocking-key rebuild job.
"""

from __future__ import annotations

from broker.identity import matching
from broker.identity.autotrain import TRAIN_JOB, ensure_trained, training_due
from broker.identity.decisions import CORROBORATION_BITS, GENERATION_YEARS, auto_link_allowed
from broker.identity.linking import (
    link_patient,
    link_patients,
    patient_extras,
    refresh_addresses,
    relink_named,
    upsert_record,
)
from broker.identity.manual import decide_review, explain, manual_link, merge, review_queue, unlink
from broker.identity.params import (
    AUTO_WEIGHT,
    KEY_CAP,
    REVIEW_WEIGHT,
    Params,
    Policy,
    current_params,
    policy,
    set_policy,
    train,
)
from broker.identity.queries import (
    cross_reference,
    fed_other_names,
    issuer_known,
    person_identifiers,
    person_of,
    person_view,
    search_persons,
    unconfirmed_patients,
)
from broker.identity.rebuild import (
    KEYS_JOB,
    REBUILD_BATCH,
    describe_rebuild,
    ensure_keys_current,
    keys_version,
    rebuild_keys,
    rebuild_keys_now,
    register_jobs,
)
from broker.identity.records import demo_of, get_record, require_record, set_trusted_issuer
from broker.identity.schemas import Explanation, Identifier, LinkDecision, PersonView, RebuildResult

__all__ = [
    "AUTO_WEIGHT",
    "CORROBORATION_BITS",
    "GENERATION_YEARS",
    "KEYS_JOB",
    "KEY_CAP",
    "TRAIN_JOB",
    "REBUILD_BATCH",
    "REVIEW_WEIGHT",
    "Explanation",
    "Identifier",
    "LinkDecision",
    "Params",
    "PersonView",
    "Policy",
    "RebuildResult",
    "auto_link_allowed",
    "cross_reference",
    "current_params",
    "decide_review",
    "demo_of",
    "describe_rebuild",
    "ensure_keys_current",
    "ensure_trained",
    "explain",
    "fed_other_names",
    "get_record",
    "require_record",
    "issuer_known",
    "keys_version",
    "link_patient",
    "link_patients",
    "manual_link",
    "matching",
    "merge",
    "patient_extras",
    "person_identifiers",
    "person_of",
    "person_view",
    "policy",
    "rebuild_keys",
    "rebuild_keys_now",
    "register_jobs",
    "refresh_addresses",
    "relink_named",
    "review_queue",
    "search_persons",
    "set_policy",
    "set_trusted_issuer",
    "train",
    "training_due",
    "unconfirmed_patients",
    "unlink",
    "upsert_record",
]
