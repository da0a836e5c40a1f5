"""Linking a record as it arrives: create or update the record for an identifier, decide its
person (`decisions.decide`), record the decision, and mirror it onto the index's patient row.

`upsert_record` serves the feeds (FHIR, HL7 v2) and DICOM ingest alike; `link_patients` is what
ingest calls for the new or changed patient rows of a batch (the index's `PatientLinker`), and
`link_patient` index sync for one. They flush and never commit: they run inside the caller's
transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from sqlalchemy import select as sa_select
from sqlalchemy import update
from sqlmodel import Session, col, select

from broker.facilities import service as facilities
from broker.identity import batch, matching
from broker.identity.decisions import Match, decide
from broker.identity.locks import serialize_linking
from broker.identity.matching import Demographics
from broker.identity.models import IdentityRecord, LinkEvent, ReviewItem
from broker.identity.params import current_params, policy, term_frequencies
from broker.identity.records import (
    RECORD_COLUMNS,
    add_event,
    check_identifier,
    demo_of,
    get_record,
    new_person,
    now,
    other_names_of,
    record_id_of,
    review_values,
    set_identifiers,
    set_keys,
    set_other_names,
    sync_patients,
    trusted_issuers,
)
from broker.identity.schemas import Identifier, LinkDecision
from broker.index import service as index
from broker.index.models import Patient
from broker.security.schemas import Principal


def upsert_record(
    *,
    session: Session,
    identifier: Identifier,
    demographics: Demographics,
    identifiers: Sequence[Identifier] = (),
    facility_id: str | None = None,
    patient_pk: int | None = None,
    source: str = "dicom",
    principal: Principal | None = None,
    other_names: Sequence[matching.OtherName] | None = None,
) -> LinkDecision:
    """Create or update the record for `identifier` and link it; flushes, never commits.

    A feed (FHIR, HL7) is the registration system: its demographics win over what a DICOM
    header says about the same identifier. `principal`: the feed's caller, recorded with the
    link; None when the broker links on its own (ingest), recorded as "system".
    `other_names`: a PatientName's Ideographic and Phonetic groups (`matching.other_names`),
    or a feed's ideographic and phonetic names (FHIR IDE/SYL, HL7 XPN.8 I/P), stored with their
    representation to be searched by and shown, never compared; None when the caller says
    nothing of them (a feed message without such names, a header without a name), which keeps
    what is stored.
    """
    who = "system" if principal is None else principal.who
    ident = check_identifier(identifier)
    others = [check_identifier(i) for i in identifiers]
    if patient_pk is None:
        # A feed: lock the index's row for this identifier (if any) before the linking lock,
        # in the order ingest takes them (it writes its patient rows, then links), so a feed
        # and an ingest of the same patient wait for each other instead of deadlocking.
        patient_pk = index.lock_patient_by_identifier(
            session=session, issuer=ident.issuer, patient_id=ident.value
        )
    serialize_linking(session=session)
    record = get_record(session=session, issuer=ident.issuer, value=ident.value)
    if record is not None:
        record_id = record_id_of(record)
        changed = False
        takes_demographics = source != "dicom" or record.source == "dicom"
        if other_names is not None:
            stored = other_names_of(session=session, record_id=record_id)
            # A feed's record takes a header's other names only while it has none: the feed is
            # the registration system, and its names are not a header's to change.
            if set(other_names) != stored and (takes_demographics or not stored):
                set_other_names(session=session, record_id=record_id, names=other_names)
        if takes_demographics:
            new = demographics.as_dict()
            if source == "dicom":
                # A header that leaves a field empty does not erase what an earlier one said.
                new = {k: v or getattr(record, k) for k, v in new.items()}
            if demo_of(record).as_dict() != new:
                changed = True
                for k, v in new.items():
                    setattr(record, k, v)
            record.source = source
        if patient_pk is not None and record.patient_pk is None:
            record.patient_pk = patient_pk
        if facility_id and not record.facility_id:
            record.facility_id = facility_id
        record.updated_at = now()
        session.add(record)
        session.flush()
        set_identifiers(session=session, record=record, identifiers=others)
        if changed:
            set_keys(session=session, record_id=record_id, d=demo_of(record))
            decision = _relink_after_update(session=session, record=record, who=who)
        else:
            decision = LinkDecision(record_id=record_id, person_id=record.person_id, outcome="existing")
        session.flush()
        sync_patients(session=session, record_ids=[record_id])
        return decision

    match = decide(session=session, d=demographics, identifiers=others, exclude_record=None)
    person_id = match.person_id or new_person(session=session)
    record = IdentityRecord(
        issuer=ident.issuer,
        value=ident.value,
        person_id=person_id,
        facility_id=facility_id,
        patient_pk=patient_pk,
        source=source,
        family=demographics.family,
        given=demographics.given,
        middle=demographics.middle,
        birth_date=demographics.birth_date,
        sex=demographics.sex,
        address=demographics.address,
        phone=demographics.phone,
    )
    session.add(record)
    session.flush()
    set_keys(session=session, record_id=record_id_of(record), d=demographics, new=True)
    if other_names:
        set_other_names(session=session, record_id=record_id_of(record), names=other_names, new=True)
    set_identifiers(session=session, record=record, identifiers=others)
    return _apply(session=session, record=record, match=match, person_id=person_id, who=who)


def _apply(
    *, session: Session, record: IdentityRecord, match: Match, person_id: int, who: str
) -> LinkDecision:
    record_id = record_id_of(record)
    method = {"review": "new", "new": "new"}.get(match.outcome, match.outcome)
    add_event(
        session=session,
        record_id=record_id,
        person_id=person_id,
        previous=None,
        method=method,
        weight=match.weight,
        matched=match.matched,
        contributions=match.contributions,
        who=who,
        why=match.why,
    )
    review_ids = _add_reviews(session=session, record_id=record_id, review=match.review)
    if record.patient_pk is not None:
        index.assign_person(session=session, patient_pks=[record.patient_pk], person_id=person_id)
    return LinkDecision(
        record_id=record_id,
        person_id=person_id,
        outcome=match.outcome,
        weight=match.weight,
        matched_record_id=match.matched,
        contributions=match.contributions,
        review_ids=review_ids,
    )


def _add_reviews(
    *, session: Session, record_id: int, review: Sequence[tuple[int, matching.Score]]
) -> list[int]:
    ids: list[int] = []
    for cand_id, score in review:
        item = ReviewItem(**review_values(record_id=record_id, candidate=cand_id, score=score))
        session.add(item)
        session.flush()
        assert item.id is not None
        ids.append(item.id)
    return ids


def _relink_after_update(*, session: Session, record: IdentityRecord, who: str) -> LinkDecision:
    """Changed demographics: a record alone in its person may now match someone; a linked
    record that no longer resembles its person goes to review (never split silently)."""
    record_id = record_id_of(record)
    d = demo_of(record)
    params = current_params(session=session)
    mates = session.execute(
        sa_select(*RECORD_COLUMNS).where(
            col(IdentityRecord.person_id) == record.person_id,
            col(IdentityRecord.id) != record_id,
        )
    ).all()
    if not mates:
        manual = session.exec(
            select(LinkEvent.id).where(LinkEvent.record_id == record_id, LinkEvent.method == "manual-unlink")
        ).first()
        if manual is not None:
            return LinkDecision(record_id=record_id, person_id=record.person_id, outcome="existing")
        match = decide(session=session, d=d, identifiers=[], exclude_record=record_id)
        if match.person_id is None:
            review_ids = _add_reviews(session=session, record_id=record_id, review=match.review)
            return LinkDecision(
                record_id=record_id,
                person_id=record.person_id,
                outcome="review" if review_ids else "existing",
                review_ids=review_ids,
            )
        previous = record.person_id
        record.person_id = match.person_id
        session.add(record)
        session.flush()
        add_event(
            session=session,
            record_id=record_id,
            person_id=record.person_id,
            previous=previous,
            method=match.outcome,
            weight=match.weight,
            matched=match.matched,
            contributions=match.contributions,
            who=who,
            why="demographics updated",
        )
        # Questions asked about the old demographics are answered by the new ones.
        session.execute(
            update(ReviewItem)
            .where(col(ReviewItem.record_id) == record_id, col(ReviewItem.status) == "open")
            .values(
                status="superseded", reason="demographics updated, linked automatically", decided_at=now()
            )
        )
        return LinkDecision(
            record_id=record_id,
            person_id=record.person_id,
            outcome=match.outcome,
            weight=match.weight,
            matched_record_id=match.matched,
            contributions=match.contributions,
        )
    tf = term_frequencies(session=session, d=d, params=params)
    scores = [(m.id, matching.score_pair(d, demo_of(m), params=params, tf=tf)) for m in mates]
    best_id, best = max(scores, key=lambda s: s[1].weight)
    if best.weight < policy(params).review:
        session.add(
            ReviewItem(
                record_id=record_id,
                candidate_record_id=best_id,
                weight=round(best.weight, 3),
                contributions=json.dumps(
                    {**best.contributions, "note": "update conflicts with linked person"}
                ),
            )
        )
    return LinkDecision(record_id=record_id, person_id=record.person_id, outcome="existing")


# ---------------------------------------------------------------- DICOM ingest hook


def _json_values(attrs: dict[str, Any], tag: str) -> list[Any]:
    item = attrs.get(tag)
    return list(item.get("Value") or []) if isinstance(item, dict) else []


def patient_extras(dataset: Any) -> tuple[str, str, list[Identifier]]:
    """(address, telephone, other identifiers) from a pydicom Dataset or a DICOM JSON object.

    Other identifiers come from OtherPatientIDsSequence items that name an issuer; the caller
    keeps only issuers the broker knows (an ID under an unknown issuer is a bare ID).
    """
    if dataset is None:
        return "", "", []
    if isinstance(dataset, dict):  # DICOM JSON model (PS3.18 F.2), as ingest parses it
        address = " ".join(str(v) for v in _json_values(dataset, "00101040"))
        phone = str(next(iter(_json_values(dataset, "00102154")), "") or "")
        items = [
            (
                str(next(iter(_json_values(it, "00100020")), "") or ""),
                str(next(iter(_json_values(it, "00100021")), "") or ""),
            )
            for it in _json_values(dataset, "00101002")
            if isinstance(it, dict)
        ]
    else:
        address = str(getattr(dataset, "PatientAddress", "") or "")
        phone = str(getattr(dataset, "PatientTelephoneNumbers", "") or "")
        items = [
            (str(getattr(it, "PatientID", "") or ""), str(getattr(it, "IssuerOfPatientID", "") or ""))
            for it in getattr(dataset, "OtherPatientIDsSequence", None) or []
        ]
    others = [Identifier(issuer=i.strip(), value=v.strip()) for v, i in items if v.strip() and i.strip()]
    return address, phone, others


def link_patient(*, session: Session, patient: Patient, dataset: Any = None) -> None:
    """Link one new or changed patient row (index sync; ingest links its batch with
    `link_patients`, to the same outcomes).

    Sets the patient's person (through the index, which writes its rows; `patient` shows it).
    `dataset` (optional: a pydicom Dataset or the instance's DICOM JSON attributes) adds the
    address, telephone and OtherPatientIDsSequence, which the patient row does not hold.
    Flushes only: the caller's transaction commits.
    """
    if patient.pk is None:
        session.flush()  # the caller added the row: flushing gives it its key
    [what] = _what_to_link(session=session, patients=[(patient, dataset)])
    ident = Identifier(issuer=patient.issuer, value=patient.patient_id)
    _link_one(session=session, patient=patient, ident=ident, what=what)


def link_patients(*, session: Session, patients: Sequence[tuple[Patient, Any]]) -> None:
    """`link_patient` for each (patient row, dataset) in order, to the same outcomes: what ingest
    calls for the patient rows one batch creates or changes (the index's `PatientLinker`).

    The new records among them that carry no further identifier (a STOW-RS batch's new
    patients) are decided and written together (`batch.link_new`: a handful of statements,
    not a dozen per record); any other one (a record that exists, further identifiers) goes
    through `upsert_record` at its place in the order, after what came before it is written.
    Flushes only: the caller's transaction commits.
    """
    if any(patient.pk is None for patient, _dataset in patients):
        session.flush()  # the caller added the rows: flushing gives them their keys
    what = _what_to_link(session=session, patients=patients)
    if not what:
        return
    idents = [check_identifier(Identifier(issuer=p.issuer, value=p.patient_id)) for p, _dataset in patients]
    # After the patient rows are written (the caller's flush), as upsert_record takes it.
    serialize_linking(session=session)
    stored = batch.existing(session=session, idents=idents)
    pending: list[batch.NewRecord] = []
    seen: set[tuple[str, str]] = set()
    for (patient, _dataset), one, ident in zip(patients, what, idents, strict=True):
        key = (ident.issuer, ident.value)
        assert patient.pk is not None  # checked by _what_to_link
        if one.others or key in stored or key in seen:
            batch.link_new(session=session, records=pending)
            pending = []
            _link_one(session=session, patient=patient, ident=ident, what=one)
        else:
            pending.append(
                batch.NewRecord(
                    ident=ident,
                    d=one.d,
                    patient_pk=patient.pk,
                    facility_id=patient.facility_id,
                    other_names=one.other_names or (),
                )
            )
        seen.add(key)
    batch.link_new(session=session, records=pending)


class _ToLink(NamedTuple):
    d: Demographics
    others: list[Identifier]  # further identifiers, under issuers the broker knows
    other_names: tuple[matching.OtherName, ...] | None  # None: the header names no one


def _what_to_link(*, session: Session, patients: Sequence[tuple[Patient, Any]]) -> list[_ToLink]:
    """Each patient's demographics, the further identifiers under issuers the broker knows
    (an ID under an unknown issuer is a bare ID), and the other names of its PatientName."""
    known: set[str] | None = None
    out: list[_ToLink] = []
    for patient, dataset in patients:
        if patient.pk is None:
            raise ValueError("link_patient needs a patient row the caller has added to its session")
        address, phone, others = patient_extras(dataset)
        if others:
            if known is None:
                known = set(facilities.issuers(session=session).values()) | trusted_issuers(session=session)
            others = [i for i in others if i.issuer in known]
        d = matching.demographics(
            patient_name=patient.patient_name,
            birth_date=patient.birth_date,
            sex=patient.sex,
            address=address,
            phone=phone,
            lenient_date=True,
        )
        # A header without a name says nothing of other names either: it keeps what is stored.
        names = matching.other_names(patient.patient_name) if d.family or d.given else None
        out.append(_ToLink(d, others, names))
    return out


def _link_one(*, session: Session, patient: Patient, ident: Identifier, what: _ToLink) -> None:
    assert patient.pk is not None
    decision = upsert_record(
        session=session,
        identifier=ident,
        demographics=what.d,
        identifiers=what.others,
        facility_id=patient.facility_id,
        patient_pk=patient.pk,
        source="dicom",
        other_names=what.other_names,
    )
    if patient.person_id != decision.person_id:
        # Its identity record points at another patient row (or none): assign this one too.
        index.assign_person(session=session, patient_pks=[patient.pk], person_id=decision.person_id)
        patient.person_id = decision.person_id  # a row not in this session shows it as well


def _dicom_record_batches(session: Session, *conditions: Any, batch_size: int) -> Iterator[Sequence[Any]]:
    """(id, patient pk, address) of the DICOM records with an index patient that meet
    `conditions`, a batch at a time in id order; the session is committed after each batch (the
    caller's work on it) and once at the end, so a long run keeps what it has done."""
    after = 0
    while True:
        rows = session.execute(
            sa_select(col(IdentityRecord.id), col(IdentityRecord.patient_pk), col(IdentityRecord.address))
            .where(
                col(IdentityRecord.id) > after,
                col(IdentityRecord.source) == "dicom",
                col(IdentityRecord.patient_pk).is_not(None),
                *conditions,
            )
            .order_by(col(IdentityRecord.id))
            .limit(batch_size)
        ).all()
        if not rows:
            session.commit()
            return
        after = rows[-1][0]
        yield rows
        session.commit()


def relink_named(*, session: Session, batch_size: int = 500) -> int:
    """Relink the DICOM records stored without a name whose index patient has one now: names in
    another script (Cyrillic, Greek, Han, Hangul, kana) normalised to nothing before this
    release, so those records were linked on birth date and address alone, or not at all.
    Each is relinked as a changed header would relink it (`_relink_after_update`: a record
    alone may now join its person, a linked one that no longer resembles its person goes to
    review, never split silently). Commits per batch; safe to run twice (a record with a name
    is not read again). Returns how many records were relinked."""
    relinked = 0
    nameless = (col(IdentityRecord.family) == "", col(IdentityRecord.given) == "")
    for rows in _dicom_record_batches(session, *nameless, batch_size=batch_size):
        for patient in index.patients_by_pk(session=session, patient_pks=[pk for _id, pk, _a in rows]):
            family, given, _middle = matching.parse_person_name(patient.patient_name)
            if family or given:
                link_patient(session=session, patient=patient)
                relinked += 1
    return relinked


def refresh_addresses(*, session: Session, batch_size: int = 500) -> int:
    """Relink the DICOM records whose address their patient's header writes in another script
    or with letters such as Ø, Ł, ß, stored before those counted: such an address was its
    digits alone (every Cyrillic or Han address in a town looked the same) and Ø was dropped.
    The index keeps no address but the newest study's header, so that is what each is
    recomputed from; a record whose address normalises as stored is not touched, nor one with
    an ASCII address (it always normalised as it does now). A changed record is relinked as a
    changed header would relink it (`_relink_after_update`). Commits per batch; a second run
    finds nothing. Returns how many records were relinked."""
    refreshed = 0
    for rows in _dicom_record_batches(session, batch_size=batch_size):
        headers = index.newest_patient_headers(session=session, patient_pks=[pk for _id, pk, _a in rows])
        stale: dict[int, dict[str, Any]] = {}
        for _id, pk, stored in rows:
            attrs = headers.get(pk)
            if attrs is None:
                continue
            address = patient_extras(attrs)[0]
            if not address.isascii() and matching.normalize_address(address) != stored:
                stale[pk] = attrs
        for patient in index.patients_by_pk(session=session, patient_pks=list(stale)):
            assert patient.pk is not None
            link_patient(session=session, patient=patient, dataset=stale[patient.pk])
            refreshed += 1
    return refreshed
