"""Linking a batch of new records at once: what ingest asks for the patients one STOW-RS or
C-STORE batch creates (`linking.link_patients`), decided as `decide` decides each record linked
alone, one after the other, in a handful of statements instead of a dozen per record.

The record linked alone is written before the next is decided, and the next sees it: as a
candidate, in the crowding of a blocking key, in the name counts of a term frequency and in the
largest record id (the record count a term frequency divides by). Here each record is decided
against what is stored plus the records decided before it in the batch, held in memory, so
every decision is the one the record-by-record path makes (`decisions.choose` scores both).
The new records' ids are drawn before deciding, as the largest id is part of the weights;
persons are made for those that need one after deciding, and everything is written with one
executemany per table.

Only for records that are new, carry no further identifiers and appear once in the batch: the
caller links any other record through `linking.upsert_record`, in between (the identifier
match reads what the batch wrote before it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection
from sqlmodel import Session

from broker.db import Prepared, core_table
from broker.identity import matching
from broker.identity.decisions import Match, choose
from broker.identity.matching import Demographics
from broker.identity.models import BlockKey, IdentityName, IdentityRecord, LinkEvent, Person, ReviewItem
from broker.identity.params import KEY_CAP, current_params
from broker.identity.records import event_values, now, other_name_rows, review_values
from broker.identity.schemas import Identifier
from broker.index import service as index

# Never a blocking key (they all have a prefix and a colon) nor a normalised name (letters,
# spaces, hyphens): what pads an IN list or a key union to the size of a cached statement.
_PAD = "#"
# SQLite allows 500 terms in a compound SELECT: the key union is read this many keys at a time.
_KEYS_PER_READ = 256


class NewRecord(NamedTuple):
    """A record to create: its identifier (checked), demographics and the patient row it
    mirrors onto (its person is set there)."""

    ident: Identifier
    d: Demographics
    patient_pk: int
    facility_id: str | None
    other_names: tuple[matching.OtherName, ...] = ()  # matching.other_names of its PatientName


class _Row(NamedTuple):
    """A candidate, as `decisions.candidates` reads one (RECORD_COLUMNS)."""

    id: int
    person_id: int
    issuer: str
    family: str
    given: str
    middle: str
    birth_date: str
    sex: str
    address: str
    phone: str


def _bucket(n: int) -> int:
    """The size a list of n values is padded to: statements are compiled for a few sizes only."""
    return max(4, 1 << (n - 1).bit_length())


def _padded(values: Sequence[str], n: int) -> list[str]:
    return [*values, *([_PAD] * (n - len(values)))]


_RECORD_COLUMNS = (
    "r.id, r.person_id, r.issuer, r.family, r.given, r.middle, r.birth_date, r.sex, r.address, r.phone"
)


@lru_cache(maxsize=16)
def _existing_statement(n: int) -> Prepared:
    pairs = ", ".join(f"(:i{i}, :v{i})" for i in range(n))
    return Prepared(text(f"SELECT issuer, value FROM identity_record WHERE (issuer, value) IN ({pairs})"))


def existing(*, session: Session, idents: Sequence[Identifier]) -> set[tuple[str, str]]:
    """Which of `idents` already have a record (one read)."""
    found: set[tuple[str, str]] = set()
    conn = session.connection()
    for start in range(0, len(idents), _KEYS_PER_READ):
        chunk = idents[start : start + _KEYS_PER_READ]
        n = _bucket(len(chunk))
        params: dict[str, str] = {}
        for i in range(n):
            ident = chunk[i] if i < len(chunk) else Identifier(issuer=_PAD, value=_PAD)
            params[f"i{i}"], params[f"v{i}"] = ident.issuer, ident.value
        found.update((str(i), str(v)) for i, v in _existing_statement(n).all(conn, params))
    return found


@lru_cache(maxsize=16)
def _candidates_statement(n: int) -> Prepared:
    """The records sharing one of n keys, per key as `decisions.candidates` reads them (at most
    KEY_CAP + 1 rows of a key); a crowded key comes back once, with no record."""
    parts = [
        f"SELECT * FROM (SELECT key, record_id FROM identity_block WHERE key = :k{i} "
        f"LIMIT {KEY_CAP + 1}) AS b{i}"
        for i in range(n)
    ]
    nulls = ", ".join(["NULL"] * 10)
    return Prepared(
        text(
            f"WITH k AS ({' UNION ALL '.join(parts)}),"
            f" crowded AS (SELECT key FROM k GROUP BY key HAVING count(*) > {KEY_CAP})"
            f" SELECT k.key, {_RECORD_COLUMNS} FROM k JOIN identity_record r ON r.id = k.record_id"
            f" WHERE k.key NOT IN (SELECT key FROM crowded)"
            f" UNION ALL SELECT key, {nulls} FROM crowded"
        )
    )


def _stored_candidates(
    conn: Connection, keys: list[str]
) -> tuple[dict[str, list[int] | None], dict[int, _Row]]:
    """Per key, the ids of the stored records holding it (None: crowded); and those records."""
    by_key: dict[str, list[int] | None] = {}
    rows: dict[int, _Row] = {}
    for start in range(0, len(keys), _KEYS_PER_READ):
        chunk = keys[start : start + _KEYS_PER_READ]
        n = _bucket(len(chunk))
        params = {f"k{i}": k for i, k in enumerate(_padded(chunk, n))}
        for key, *record in _candidates_statement(n).all(conn, params):
            if record[0] is None:
                by_key[key] = None
                continue
            ids = by_key.setdefault(key, [])
            if ids is not None:
                ids.append(int(record[0]))
            rows[int(record[0])] = _Row(*record)
    return by_key, rows


@lru_cache(maxsize=64)
def _counts_statement(dialect: str, families: int, givens: int) -> Prepared:
    """The largest record id, the records per family and per given name of a batch's records,
    and (PostgreSQL) ids drawn from the record id sequence for the new records, in one read."""
    f_in = ", ".join(f":f{i}" for i in range(families))
    g_in = ", ".join(f":g{i}" for i in range(givens))
    sql = (
        "SELECT 0 AS kind, '' AS name, (SELECT max(id) FROM identity_record) AS n"
        f" UNION ALL SELECT 1, family, count(*) FROM identity_record WHERE family IN ({f_in}) GROUP BY family"
        f" UNION ALL SELECT 2, given, count(*) FROM identity_record WHERE given IN ({g_in}) GROUP BY given"
    )
    if dialect == "postgresql":
        sql += (
            " UNION ALL SELECT 3, '', nextval(pg_get_serial_sequence('identity_record', 'id'))"
            " FROM generate_series(1, :ids)"
        )
    return Prepared(text(sql))


class _Counts(NamedTuple):
    largest: int
    family: dict[str, int]
    given: dict[str, int]
    ids: list[int]  # for the new records, in order


def _counts(conn: Connection, records: Sequence[NewRecord]) -> _Counts:
    families = sorted({r.d.family for r in records if r.d.family})
    givens = sorted({r.d.given for r in records if r.d.given})
    nf, ng = _bucket(len(families)), _bucket(len(givens))
    dialect = conn.dialect.name
    params: dict[str, Any] = {f"f{i}": v for i, v in enumerate(_padded(families, nf))}
    params.update({f"g{i}": v for i, v in enumerate(_padded(givens, ng))})
    if dialect == "postgresql":
        params["ids"] = len(records)
    largest, family, given, ids = 0, defaultdict(int), defaultdict(int), []
    for kind, name, n in _counts_statement(dialect, nf, ng).all(conn, params):
        if kind == 0:
            largest = int(n or 0)
        elif kind == 1:
            family[name] = int(n)
        elif kind == 2:
            given[name] = int(n)
        else:
            ids.append(int(n))
    if dialect != "postgresql":
        # SQLite gives a new row the largest id plus one (no AUTOINCREMENT), and this
        # transaction is its only writer (it has written the batch's patient rows).
        ids = list(range(largest + 1, largest + 1 + len(records)))
    return _Counts(largest, family, given, sorted(ids))


_INSERT_RECORDS = Prepared(
    core_table(IdentityRecord).insert(),
    column_keys=[c.name for c in core_table(IdentityRecord).columns],
)
_INSERT_KEYS = Prepared(core_table(BlockKey).insert(), column_keys=["key", "record_id"])
_INSERT_NAMES = Prepared(
    core_table(IdentityName).insert(), column_keys=["record_id", "family", "given", "representation"]
)
_INSERT_EVENTS = Prepared(
    core_table(LinkEvent).insert(),
    column_keys=[c.name for c in core_table(LinkEvent).columns if c.name != "id"],
)
_INSERT_REVIEWS = Prepared(
    core_table(ReviewItem).insert(),
    column_keys=[c.name for c in core_table(ReviewItem).columns if c.name != "id"],
)


@lru_cache(maxsize=16)
def _persons_statement(n: int) -> Prepared:
    table = core_table(Person)
    return Prepared(
        table.insert()
        .values([{"created_at": bindparam(f"c{i}", type_=table.c.created_at.type)} for i in range(n)])
        .returning(table.c.id)
    )


def _new_persons(conn: Connection, n: int) -> list[int]:
    """n new persons' ids, in the order they were made."""
    when = now()
    ids = _persons_statement(n).all(conn, {f"c{i}": when for i in range(n)})
    return sorted(int(i) for (i,) in ids)


def link_new(*, session: Session, records: Sequence[NewRecord], who: str = "system") -> None:
    """Create and link `records` (new, no further identifiers, each (issuer, value) once), as
    `linking.upsert_record` would one after the other; flushes nothing, never commits.

    Takes no lock: the caller holds the linking lock (`locks.serialize_linking`)."""
    if not records:
        return
    conn = session.connection()
    params = current_params(session=session)
    query_keys = [sorted(matching.query_keys(r.d)) for r in records]
    own_keys = [matching.block_keys(r.d) for r in records]
    stored_by_key, stored = _stored_candidates(conn, sorted(set().union(*query_keys)))
    counts = _counts(conn, records)
    largest, family, given = counts.largest, counts.family, counts.given

    # Decide each record in order against the stored ones and the batch's records before it.
    batch_by_key: dict[str, list[int]] = defaultdict(list)
    batch_rows: dict[int, _Row] = {}
    matches: list[Match] = []
    persons: list[int] = []  # a person's id, or -(1 + i): the new person of record i
    for i, (rec, record_id) in enumerate(zip(records, counts.ids, strict=True)):
        d = rec.d
        found_ids: set[int] = set()
        for key in query_keys[i]:
            stored_ids = stored_by_key.get(key, [])
            mine = batch_by_key.get(key, [])
            if stored_ids is None or len(stored_ids) + len(mine) > KEY_CAP:
                continue  # crowded: says little (see decisions.candidates)
            found_ids.update(stored_ids)
            found_ids.update(mine)
        found = [stored.get(x) or batch_rows[x] for x in sorted(found_ids)]
        named = (largest, family.get(d.family, 0), given.get(d.given, 0)) if found else ()
        match = choose(d=d, found=found, counts=named, params=params)
        person = match.person_id if match.person_id is not None else -(1 + i)
        matches.append(match)
        persons.append(person)
        batch_rows[record_id] = _Row(
            record_id,
            person,
            rec.ident.issuer,
            d.family,
            d.given,
            d.middle,
            d.birth_date,
            d.sex,
            d.address,
            d.phone,
        )
        for key in own_keys[i]:
            batch_by_key[key].append(record_id)
        family[d.family] = family.get(d.family, 0) + 1
        given[d.given] = given.get(d.given, 0) + 1
        largest = max(largest, record_id)

    # The new persons, made in the order their records were decided, as one by one.
    tokens = [p for i, p in enumerate(persons) if p == -(1 + i)]
    real = dict(zip(tokens, _new_persons(conn, len(tokens)), strict=True)) if tokens else {}
    persons = [real.get(p, p) for p in persons]

    when = now()
    record_rows: list[dict[str, Any]] = []
    key_rows: list[dict[str, Any]] = []
    name_rows: list[dict[str, Any]] = []
    event_rows: list[dict[str, Any]] = []
    review_rows: list[dict[str, Any]] = []
    for rec, record_id, person, match, keys in zip(
        records, counts.ids, persons, matches, own_keys, strict=True
    ):
        record_rows.append(
            {
                "id": record_id,
                "issuer": rec.ident.issuer,
                "value": rec.ident.value,
                "person_id": person,
                "facility_id": rec.facility_id,
                "patient_pk": rec.patient_pk,
                "source": "dicom",
                "family": rec.d.family,
                "given": rec.d.given,
                "middle": rec.d.middle,
                "birth_date": rec.d.birth_date,
                "sex": rec.d.sex,
                "address": rec.d.address,
                "phone": rec.d.phone,
                "merged_into": None,
                "updated_at": when,
            }
        )
        key_rows.extend({"key": k, "record_id": record_id} for k in keys)
        name_rows.extend(other_name_rows(record_id=record_id, names=rec.other_names))
        event_rows.append(
            {
                **event_values(
                    record_id=record_id,
                    person_id=person,
                    previous=None,
                    method={"review": "new", "new": "new"}.get(match.outcome, match.outcome),
                    weight=match.weight,
                    matched=match.matched,
                    contributions=match.contributions,
                    who=who,
                    why=match.why,
                ),
                "created_at": when,
            }
        )
        for candidate, score in match.review:
            review_rows.append(
                {
                    **review_values(record_id=record_id, candidate=candidate, score=score),
                    "status": "open",
                    "decided_by": None,
                    "reason": None,
                    "decided_at": None,
                    "created_at": when,
                }
            )
    _INSERT_RECORDS.run(conn, record_rows)
    _INSERT_KEYS.run(conn, key_rows)
    _INSERT_NAMES.run(conn, name_rows)
    _INSERT_EVENTS.run(conn, event_rows)
    _INSERT_REVIEWS.run(conn, review_rows)
    index.assign_persons(
        session=session,
        persons={rec.patient_pk: person for rec, person in zip(records, persons, strict=True)},
    )
