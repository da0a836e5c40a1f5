"""Deciding which person a record belongs to: shared identifiers first, then Fellegi–Sunter
weights over the blocked candidates, under the link policy (`auto_link_allowed`).

Reads only; `linking` applies what `decide` concludes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import or_, text
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from broker.identity import matching
from broker.identity.matching import Demographics
from broker.identity.models import IdentityIdentifier, IdentityRecord, NoLink
from broker.identity.params import KEY_CAP, TF_COLUMNS, Params, current_params, policy, tf_from_counts
from broker.identity.records import RECORD_COLUMNS, demo_of, trusted_issuers
from broker.identity.schemas import Identifier, Outcome

# The smallest contribution that counts as a corroborating field agreeing.
CORROBORATION_BITS = 3.0
# Birth years at least this far apart are a generation (parent and child); closer plainly
# different dates are a wrong date, judged by the weight alone.
GENERATION_YEARS = 12


@dataclass(slots=True)
class Match:
    """What `decide` concluded for a record: its person (None: a new person, or a human decides
    between the `review` candidates), and the evidence for the link history."""

    outcome: Outcome
    person_id: int | None = None
    weight: float | None = None
    # The record the link was decided against.
    matched: int | None = None
    contributions: dict[str, Any] = field(default_factory=dict)
    why: str = ""
    # (candidate record, its score) for the review queue.
    review: list[tuple[int, matching.Score]] = field(default_factory=list)


def nolink_records(*, session: Session, record_id: int | None) -> set[int]:
    """The records a human said are not the same person as `record_id`."""
    if record_id is None:
        return set()
    rows = session.exec(
        select(NoLink.record_a, NoLink.record_b).where(
            or_(col(NoLink.record_a) == record_id, col(NoLink.record_b) == record_id)
        )
    ).all()
    return {b if a == record_id else a for a, b in rows}


def decide(
    *,
    session: Session,
    d: Demographics,
    identifiers: Sequence[Identifier],
    exclude_record: int | None,
) -> Match:
    """Which person a record with demographics `d` belongs to."""
    params = current_params(session=session)
    forbidden = nolink_records(session=session, record_id=exclude_record)
    forbidden_persons: set[int] = set()
    if forbidden:
        forbidden_persons = set(
            session.exec(select(IdentityRecord.person_id).where(col(IdentityRecord.id).in_(forbidden))).all()
        )

    # Deterministic: identifiers shared with existing records.
    if identifiers:
        trusted = trusted_issuers(session=session)
        hit = identifier_match(
            session=session, identifiers=identifiers, trusted=trusted, exclude=exclude_record
        )
        if hit is not None:
            method, other = hit
            score = matching.score_pair(d, demo_of(other), params=params)
            if other.person_id not in forbidden_persons and score.weight >= 0:
                return Match(
                    outcome=method,
                    person_id=other.person_id,
                    weight=score.weight,
                    matched=other.id,
                    contributions=score.contributions,
                    why="shared identifier",
                )
            return Match(
                outcome="review",
                review=[(other.id, score)],
                why="shared identifier but demographics disagree",
            )

    found, counts = candidates(session=session, d=d, exclude=exclude_record)
    return choose(d=d, found=found, counts=counts, params=params, forbidden_persons=forbidden_persons)


def choose(
    *,
    d: Demographics,
    found: Sequence[Any],
    counts: tuple[Any, ...],
    params: Params,
    forbidden_persons: Collection[int] = (),
) -> Match:
    """The probabilistic part of `decide`: the person among the candidates `found` (rows of
    RECORD_COLUMNS, in record id order: it breaks ties) that a record with demographics `d`
    belongs to. `counts`: the name counts of term frequencies, as `candidates` reads them.

    Reads nothing: the batch linker (`batch.link_new`) calls it with candidates it read for a
    whole batch, so a batch and a record linked alone are decided by the one same rule."""
    if not found:
        return Match(outcome="new")
    tf = tf_from_counts(d=d, counts=counts, params=params)
    best_by_person: dict[int, tuple[int, matching.Score]] = {}
    for row in found:
        if row.person_id in forbidden_persons:
            continue
        score = matching.score_pair(d, demo_of(row), params=params, tf=tf)
        held = best_by_person.get(row.person_id)
        if held is None or score.weight > held[1].weight:
            best_by_person[row.person_id] = (row.id, score)
    auto, review_at, strict = policy(params)
    ranked = sorted(best_by_person.items(), key=lambda kv: kv[1][1].weight, reverse=True)
    if not ranked or ranked[0][1][1].weight < review_at:
        return Match(outcome="new")
    person_id, (rec_id, best) = ranked[0]
    rivals = [kv for kv in ranked[1:] if kv[1][1].weight >= review_at]
    if (
        best.weight >= auto
        and auto_link_allowed(best, strict=strict)
        # Another person as likely is ambiguity, unless the rules call that pair two people
        # (the new record's twin, father or son): then it is no rival to the one it matches.
        and not any(r[1][1].weight >= auto and auto_link_allowed(r[1][1], strict=strict) for r in rivals)
    ):
        return Match(
            outcome="probabilistic",
            person_id=person_id,
            weight=best.weight,
            matched=rec_id,
            contributions=best.contributions,
        )
    review = [(rid, s) for _pid, (rid, s) in [ranked[0], *rivals][:3]]
    return Match(outcome="review", review=review, why="candidate needs review")


def auto_link_allowed(score: matching.Score, *, strict: bool = True) -> bool:
    """Never on the name alone: a birth date, address or phone must agree too.

    `strict` (the default) also needs a name to agree, and sends the classic false-link
    patterns to review: twins or siblings (same family name and address, given names plainly
    different, not a typo of each other) and father/son (same names and address, birth dates
    plainly different and a generation apart). Without `strict` the Fellegi–Sunter weight
    decides, and a pair whose names both disagree needs two other fields to agree.
    """
    name_ok = any(score.contribution(f) > 0 for f in matching.NAME_FIELDS)
    agreeing = sum(score.contribution(f) >= CORROBORATION_BITS for f in matching.CORROBORATING)
    if agreeing == 0:
        return False
    if not strict:
        return name_ok or agreeing >= 2
    if not name_ok:
        return False
    family_level = score.levels[matching.FIELDS.index("family")]
    given_level = score.levels[matching.FIELDS.index("given")]
    date_level = score.levels[matching.FIELDS.index("birth_date")]
    # Read crossed, either name could be the given name (which record was swapped is unknown):
    # SONJA^NGUYEN against NGUYEN^PIA agrees on NGUYEN only, and that is the twin pattern.
    if given_level == 3 or (score.swapped and family_level == 3):
        return False
    return not (date_level == 3 and score.years_apart >= GENERATION_YEARS)


def identifier_match(
    *, session: Session, identifiers: Sequence[Identifier], trusted: set[str], exclude: int | None
) -> tuple[Outcome, Any] | None:
    """The first record one of `identifiers` names, and how ("identifier" or
    "trusted-identifier"); None if none does."""
    for ident in identifiers:
        # A record whose own (issuer, value) is this identifier: the sender asserts it is the same.
        own = session.execute(
            sa_select(*RECORD_COLUMNS).where(
                col(IdentityRecord.issuer) == ident.issuer,
                col(IdentityRecord.value) == ident.value,
            )
        ).first()
        if own is not None and own.id != exclude:
            return ("trusted-identifier" if ident.issuer in trusted else "identifier"), own
        if ident.issuer in trusted:
            other = session.execute(
                sa_select(*RECORD_COLUMNS)
                .join(IdentityIdentifier, col(IdentityIdentifier.record_id) == col(IdentityRecord.id))
                .where(
                    col(IdentityIdentifier.issuer) == ident.issuer,
                    col(IdentityIdentifier.value) == ident.value,
                )
            ).first()
            if other is not None and other.id != exclude:
                return "trusted-identifier", other
    return None


def candidates(
    *, session: Session, d: Demographics, exclude: int | None
) -> tuple[list[Any], tuple[Any, ...]]:
    """Records sharing a blocking key with `d`, and the name counts for term frequencies, in
    one round trip (the counts only matter when there are candidates to score).

    A key shared by more than KEY_CAP records (SMITH + JOHN, no birth date) is dropped rather
    than cut arbitrarily: it says little, and the other keys of a true match still find it.
    """
    keys = sorted(matching.query_keys(d))
    if not keys:
        return [], ()
    parts = [
        f"SELECT * FROM (SELECT key, record_id FROM identity_block WHERE key = :k{i} "
        f"LIMIT {KEY_CAP + 1}) AS b{i}"
        for i in range(len(keys))
    ]
    sql = text(
        f"WITH k AS ({' UNION ALL '.join(parts)}),"
        f" crowded AS (SELECT key FROM k GROUP BY key HAVING count(*) > {KEY_CAP})"
        f" SELECT r.id, r.person_id, r.issuer, r.family, r.given, r.middle, r.birth_date, r.sex,"
        f" r.address, r.phone, {TF_COLUMNS} FROM identity_record r"
        f" WHERE r.id IN (SELECT record_id FROM k WHERE key NOT IN (SELECT key FROM crowded))"
        # In id order: of two persons scoring the same, the one met first ranks first (`choose`).
        f" ORDER BY r.id"
    )
    params: dict[str, Any] = {f"k{i}": k for i, k in enumerate(keys)}
    params.update(tf_f=d.family, tf_g=d.given)
    rows = [r for r in session.execute(sql, params).all() if r.id != exclude]
    counts = (rows[0].tf_total, rows[0].tf_family, rows[0].tf_given) if rows else ()
    return rows, counts
