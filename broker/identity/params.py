"""The Fellegi–Sunter parameters linking uses: the stored m/u estimates and thresholds (cached
per database for a few seconds), training them from the records, the link policy, and the name
term frequencies a score is adjusted by.

A parameter set is the JSON document `matching` reads (`m`, `u`, `lambda`, and `policy` once
thresholds were set); every change is a new `ModelParams` row, so earlier links stay explainable.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from typing import Any, NamedTuple, cast

from sqlalchemy import select as sa_select
from sqlalchemy import text
from sqlmodel import Session, col, select

from broker.errors import BadRequest
from broker.identity import matching
from broker.identity.matching import Demographics
from broker.identity.models import BlockKey, IdentitySetting, ModelParams
from broker.identity.records import RECORD_COLUMNS, demo_of
from broker.identity.schemas import LinkPolicy, ModelParameters
from broker.security.schemas import Principal
from broker.security.service import authorize

log = logging.getLogger("scanonce.identity")

# Match weights (log2 Bayes factor). Exact name + exact birth date is ~ +26 with default
# parameters; a common exact name alone is ~ +12 (never enough: see auto_link_allowed).
# Conservative on purpose: a false link shows one patient's images to another patient's
# clinician, a miss only costs a review.
AUTO_WEIGHT = 16.0
REVIEW_WEIGHT = 10.0
# A blocking key shared by more records than this says little; its candidates are cut.
KEY_CAP = 100
# Pseudo-count for term frequencies: a small index borrows the default name frequencies.
_TF_PSEUDO = 1000.0

Params = ModelParameters
"""A parameter set: the JSON document `matching.score_pair` and `matching.probability` read."""


class Policy(NamedTuple):
    """The link thresholds of a parameter set."""

    auto: float
    review: float
    strict: bool


_PARAMS_CACHE: dict[str, tuple[float, Params]] = {}
# Parameters change only when someone trains or sets thresholds; other processes notice
# within this many seconds (saves a query on every link).
_PARAMS_TTL = 10.0


def current_params(*, session: Session) -> Params:
    key = str(session.get_bind().engine.url)
    hit = _PARAMS_CACHE.get(key)
    if hit is not None and time.monotonic() - hit[0] < _PARAMS_TTL:
        return hit[1]
    row = session.exec(select(ModelParams).order_by(col(ModelParams.id).desc()).limit(1)).first()
    # Typed where it enters: the stored JSON was written by _store from a Params.
    params = cast(Params, matching.DEFAULT_PARAMS if row is None else json.loads(row.params))
    _PARAMS_CACHE[key] = (time.monotonic(), params)
    return params


def _forget_params(session: Session) -> None:
    _PARAMS_CACHE.pop(str(session.get_bind().engine.url), None)


def _store(session: Session, params: Params, *, pairs: int) -> None:
    session.add(ModelParams(params=json.dumps(params), pairs=pairs))
    session.commit()
    _forget_params(session)


TRAINED_RECORDS = "trained_records"


def train(*, session: Session, principal: Principal, max_pairs: int = 200_000, seed: int = 7) -> Params:
    """Estimate m/u from the records themselves (matching.fit_parameters): u from random pairs,
    m by EM over the pairs that blocking proposes, one training rule (key kind) at a time as
    Splink trains. Stores the result (used from the next link on); `principal` is logged."""
    authorize(principal, action="identity.write")
    rows = session.execute(sa_select(*RECORD_COLUMNS)).all()
    if len(rows) < 50:
        raise BadRequest("too few identity records to estimate parameters (need at least 50)")
    demo = {r.id: demo_of(r) for r in rows}
    ids = list(demo)
    rng = random.Random(seed)
    # Two distinct records per pair: a record compared with itself agrees on everything, and
    # in a small index those pairs alone would make a full address look 1e-4 likely by chance.
    drawn = (rng.sample(ids, 2) for _ in range(min(max_pairs, 50_000)))
    random_pairs = [(demo[a], demo[b]) for a, b in drawn]
    blocks: dict[str, list[int]] = {}
    for key, rid in session.execute(sa_select(col(BlockKey.key), col(BlockKey.record_id))).all():
        # A record ingest linked after the records were read (on PostgreSQL each statement sees
        # what has committed by then) has keys but no demographics here: train without it.
        if rid in demo and matching.training_rule(key) is not None:
            blocks.setdefault(key, []).append(rid)
    by_rule: dict[str, set[tuple[int, int]]] = {}
    for key, members in blocks.items():
        if len(members) > KEY_CAP:
            continue
        seen = by_rule.setdefault(matching.training_rule(key) or "", set())
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                seen.add((a, b) if a < b else (b, a))
    levels_by_rule = {}
    n_pairs = 0
    for rule, seen in sorted(by_rule.items()):
        pairs = sorted(seen)
        rng.shuffle(pairs)
        pairs = pairs[:max_pairs]
        n_pairs += len(pairs)
        levels_by_rule[rule] = matching.level_matrix([(demo[a], demo[b]) for a, b in pairs])
    union = sorted(set().union(*by_rule.values()))
    blocked_pairs = len(union)
    rng.shuffle(union)
    params = cast(
        Params,
        matching.fit_parameters(
            random_levels=matching.level_matrix(random_pairs),
            levels_by_rule=levels_by_rule,
            blocked_levels=matching.level_matrix([(demo[a], demo[b]) for a, b in union[:max_pairs]]),
            blocked_pairs=blocked_pairs,
            records=len(ids),
        ),
    )
    kept = current_params(session=session).get("policy")
    if kept is not None:
        params["policy"] = kept
    # How many records this training saw: the automatic retraining (identity.autotrain) compares
    # the index's growth against it.
    session.merge(IdentitySetting(name=TRAINED_RECORDS, value=str(len(ids))))
    _store(session, params, pairs=n_pairs)
    log.info("identity parameters trained on %d records by %s", len(ids), principal.who)
    return params


def policy(params: Params) -> Policy:
    """(auto-link weight, review weight, strict) for a parameter set."""
    pol = params.get("policy", {})
    return Policy(
        auto=float(pol.get("auto", AUTO_WEIGHT)),
        review=float(pol.get("review", REVIEW_WEIGHT)),
        strict=bool(pol.get("strict", True)),
    )


def set_policy(
    *,
    session: Session,
    principal: Principal,
    auto: float | None = None,
    review: float | None = None,
    strict: bool | None = None,
) -> Params:
    """Store new thresholds (a new parameter row, so earlier decisions stay explainable);
    `principal` is logged."""
    authorize(principal, action="identity.write")
    params = current_params(session=session).copy()
    a, r, st = policy(params)
    a, r, st = (
        (a if auto is None else auto),
        (r if review is None else review),
        (st if strict is None else strict),
    )
    if not (math.isfinite(a) and math.isfinite(r)):
        # NaN compares false with every weight (nothing would link or be reviewed, silently),
        # and JSON has no NaN or infinity to store.
        raise BadRequest("thresholds must be finite numbers (a large one, e.g. 1000, means never auto-link)")
    if r > a:
        raise BadRequest("the review threshold must not be above the auto-link threshold")
    params["policy"] = LinkPolicy(auto=a, review=r, strict=st)
    _store(session, params, pairs=0)
    log.info("identity link policy set to auto %s, review %s, strict %s by %s", a, r, st, principal.who)
    return params


# ---------------------------------------------------------------- name term frequencies

# The counts a term frequency needs, as columns of a query (linking adds them to its
# candidate query: one round trip).
TF_COLUMNS = (
    "(SELECT max(id) FROM identity_record) AS tf_total,"
    " (SELECT count(*) FROM identity_record WHERE family = :tf_f) AS tf_family,"
    " (SELECT count(*) FROM identity_record WHERE given = :tf_g) AS tf_given"
)


def term_frequencies(*, session: Session, d: Demographics, params: Params) -> dict[str, float]:
    """How common the record's family and given names are (one query: two index counts)."""
    row = session.execute(text(f"SELECT {TF_COLUMNS}"), {"tf_f": d.family, "tf_g": d.given}).one()
    return tf_from_counts(d=d, counts=tuple(row), params=params)


def tf_from_counts(*, d: Demographics, counts: tuple[Any, ...], params: Params) -> dict[str, float]:
    total = counts[0] or 0
    tf: dict[str, float] = {}
    for field, count in (("family", counts[1]), ("given", counts[2])):
        if getattr(d, field):
            prior_u = params["u"][field][0]
            tf[field] = (count + _TF_PSEUDO * prior_u) / (total + _TF_PSEUDO)
    return tf
