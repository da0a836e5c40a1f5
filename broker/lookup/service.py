"""The prior lookup: from one issuer-qualified patient identifier, every study of the same person
across facilities, each judged against the planned exam (relevance engine), with its dose, where
its pixels are, and whether the link to the person is confirmed; the person's cumulative dose; what
a repeat would cost; and repeats that clinicians avoided.

Reads only (`find_priors` writes nothing); `record_avoided` writes the lookup's own table. The
facts it needs (series facts, dose records) are kept by the index at ingest (index.facts).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlmodel import Session, col, select

from broker.consent import service as consent
from broker.errors import BadRequest, NotFound
from broker.facilities import service as facilities
from broker.identity import service as identity
from broker.identity.schemas import issuer_from_system
from broker.index import service as index
from broker.index.facts import StudyView
from broker.lookup import dose as dosemath
from broker.lookup import metrics
from broker.lookup.models import AvoidedRepeat
from broker.lookup.relevance import interpret_exam, judge
from broker.lookup.schemas import (
    AvoidedMonth,
    AvoidedOut,
    CumulativeOut,
    DoseOut,
    ExamInterpretation,
    ExamSuggestion,
    PlannedOut,
    PriorFacts,
    PriorOut,
    PriorsAnswer,
    ProcedureCode,
    RepeatCostOut,
    SeriesFacts,
    Setting,
    UsabilityOut,
    Verdict,
    Windows,
)
from broker.lookup.vocabulary import load as load_vocabulary
from broker.security.schemas import Principal
from broker.security.service import authorize

if TYPE_CHECKING:
    from broker.index.models import Patient

__all__ = [
    "find_priors",
    "record_avoided",
    "avoided_per_month",
    "resolve_identifier",
    "confirmed_patients",
    "planned_exam",
    "exam_suggestions",
    "exam_label",
]

_CUMULATIVE_DAYS = 365
# Relevance regions (the engine's tree) onto the k-factor table's regions (broker/lookup/dose).
_DOSE_TOPS = {
    "HEAD": "head",
    "NECK": "neck",
    "CHEST": "chest",
    "LUNG": "chest",
    "ABDOMEN": "abdomen_pelvis",
    "PELVIS": "abdomen_pelvis",
}


# -- who --------------------------------------------------------------------------------------------


def resolve_identifier(
    *,
    session: Session,
    facility: str | None = None,
    mrn: str | None = None,
    identifier: str | None = None,
) -> tuple[str, str]:
    """(issuer, value) of the patient: facility + MRN, or `system|value` where the system is the
    issuer a facility registered (as written in IssuerOfPatientID; `urn:oid:` is stripped, so an
    OID issuer may be given as a FHIR system). A bare Patient ID is never enough."""
    if identifier is not None:
        if facility or mrn:
            raise BadRequest("give either identifier=system|value or facility and mrn, not both")
        system, sep, value = identifier.partition("|")
        system, value = system.strip(), value.strip()
        if not sep or not system or not value:
            raise BadRequest("identifier must be system|value, the system being a facility's issuer")
        system = issuer_from_system(system)
        registered = set(facilities.issuers(session=session).values())
        if system not in registered and not identity.issuer_known(session=session, issuer=system):
            raise BadRequest("the identifier's system is not a registered issuer")
        return system, value
    if not facility or not mrn or not mrn.strip():
        raise BadRequest("give facility and mrn, or identifier=system|value: a bare Patient ID is not enough")
    fac = facilities.get_facility(session=session, facility_id=facility)
    return fac.issuer, mrn.strip()


def confirmed_patients(
    *, session: Session, issuer: str, value: str
) -> tuple[bool, int | None, list[Patient]]:
    """(known, person id, the index's patient rows of that person): every record confirmed as
    the same person as (issuer, value), at any facility. Records only proposed by an open review
    item are not among them. FHIR ImagingStudy search and CDS Hooks start here too."""
    patient = index.patient_by_identifier(session=session, issuer=issuer, patient_id=value)
    person_id = patient.person_id if patient is not None else None
    if person_id is None:
        person_id = identity.person_of(
            session=session, identifier=identity.Identifier(issuer=issuer, value=value)
        )
    if patient is None and person_id is None:
        return False, None, []
    if person_id is None:
        assert patient is not None
        return True, None, [patient]
    confirmed = index.patients_of_persons(session=session, person_ids=[person_id])
    if patient is not None and all(p.pk != patient.pk for p in confirmed):
        confirmed.append(patient)
    return True, person_id, confirmed


def known_fhir_patient(*, session: Session, patient: Mapping[str, Any]) -> tuple[str, str] | None:
    """(issuer, value) of the first identifier of a FHIR Patient that the broker knows: how a
    patient handed over by an EHR (CDS Hooks context, SMART launch) becomes one of ours."""
    idents = patient.get("identifier")
    # An EHR's Patient of another shape names no one here (a number would not iterate: a 500).
    for ident in idents if isinstance(idents, list) else []:
        if not isinstance(ident, dict):
            continue
        system, value = ident.get("system"), ident.get("value")
        if not isinstance(system, str) or not isinstance(value, str):
            continue
        if not system.strip() or not value.strip():
            continue
        issuer = issuer_from_system(system.strip())
        found, _person, _rows = confirmed_patients(session=session, issuer=issuer, value=value.strip())
        if found:
            return issuer, value.strip()
    return None


@dataclass(frozen=True)
class PersonStudies:
    """A patient's person and studies as one caller may see them: read once, then judged against
    each planned exam (a CDS Hooks call carries a draft order per exam)."""

    found: bool
    studies: list[tuple[StudyView, str, str]]
    withheld: int


def _person_studies(
    session: Session, issuer: str, value: str, principal: Principal | None = None
) -> PersonStudies:
    """Whether the patient was found, and the person's (study, link, detail) rows through
    confirmed links, then those reached only through an open review item (unconfirmed); without
    those the caller may not see (consent, purpose of use: broker.consent), only counted
    (`withheld`)."""
    found, person_id, confirmed = confirmed_patients(session=session, issuer=issuer, value=value)
    if not found:
        return PersonStudies(found=False, studies=[], withheld=0)
    out: list[tuple[StudyView, str, str]] = []
    for s in index.studies_of_patients(session=session, patients=confirmed):
        same = s.issuer == issuer and s.patient_id == value
        out.append((s, "confirmed", "same identifier" if same else "linked to the same person"))
    if person_id is not None:
        pending = identity.unconfirmed_patients(session=session, person_id=person_id)
        known = {p.pk for p in confirmed}
        others = [
            p for p in index.patients_by_pk(session=session, patient_pks=list(pending)) if p.pk not in known
        ]
        for s in index.studies_of_patients(session=session, patients=others):
            review = pending.get(s.patient_pk)
            out.append((s, "unconfirmed", f"possible match awaiting review (review item {review})"))
    if principal is None:
        return PersonStudies(found=True, studies=out, withheld=0)
    # The caller's rule, looked up once for both questions below.
    rule = consent.visibility(principal=principal)
    named = next((p for p in confirmed if p.issuer == issuer and p.patient_id == value), None)
    if (
        rule is not None
        and named is not None
        and named.pk is not None
        and not rule.allows(session=session, patient_pk=named.pk, facility=named.facility_id)
    ):
        # The caller named another facility's record it may not see: answered as for a patient
        # the broker does not know (a denial does not reveal that the record exists).
        return PersonStudies(found=False, studies=[], withheld=0)
    studies = [s for s, _l, _d in out]
    kept, withheld = (studies, 0) if rule is None else rule.filter(session=session, studies=studies)
    visible = {s.study_pk for s in kept}
    return PersonStudies(
        found=True, studies=[row for row in out if row[0].study_pk in visible], withheld=withheld
    )


def person_studies(
    *,
    session: Session,
    principal: Principal,
    facility: str | None = None,
    mrn: str | None = None,
    identifier: str | None = None,
) -> PersonStudies:
    """The studies `find_priors` judges, for a patient named as `find_priors` takes it."""
    authorize(principal, action="lookup.read", facility=facility)
    issuer, value = resolve_identifier(session=session, facility=facility, mrn=mrn, identifier=identifier)
    return _person_studies(session, issuer, value, principal)


# -- the planned exam -------------------------------------------------------------------------------


def planned_exam(
    *,
    exam: str | None = None,
    code: str | None = None,
    code_system: str | None = None,
    modality: str | None = None,
    body_part: str | None = None,
) -> ExamInterpretation:
    """The engine's reading of the planned exam; BadRequest (with the engine's reason) when it
    cannot be read. An unknown code falls back to the text, and the notes say so."""
    if not any(v and v.strip() for v in (exam, code, modality, body_part)):
        raise BadRequest("give the planned exam: exam text, a procedure code, or modality and bodypart")
    return interpret_exam(
        text=exam or None,
        code=code or None,
        code_system=code_system or None,
        modality=modality or None,
        body_part=body_part or None,
    )


@functools.cache
def _suggestions() -> tuple[ExamSuggestion, ...]:
    seen: dict[str, ExamSuggestion] = {}
    for system, table in load_vocabulary().codes.items():
        for entry in table.values():
            key = entry.label.lower()
            if key in seen:
                continue
            try:  # offered only if the engine reads the label as text too
                interpret_exam(text=entry.label)
            except BadRequest:
                continue
            seen[key] = ExamSuggestion(label=entry.label, system=system, code=entry.code)
    return tuple(sorted(seen.values(), key=lambda e: e.label.lower()))


def exam_label(*, code: str, code_system: str | None = None) -> str | None:
    """The label of a procedure code the vocabulary knows, when the engine reads it as text: the
    words an avoided repeat records for an order that came as a code alone."""
    _system, entry = load_vocabulary().code(code, code_system)
    if entry is None:
        return None
    try:
        interpret_exam(text=entry.label)
    except BadRequest:
        return None
    return entry.label


def exam_suggestions() -> list[ExamSuggestion]:
    """The coded exams of the vocabulary (CPT, LOINC, RadLex), one per label, in label order:
    what a form offers as the planned exam. Each label is text the engine reads."""
    return list(_suggestions())


# -- facts for the engine and dose --------------------------------------------------------------------


def _date(value: str) -> date | None:
    try:
        return datetime.strptime(value[:8], "%Y%m%d").date() if len(value) >= 8 else None
    except ValueError:
        return None


def _first(item: dict[str, Any], tag: str) -> str | None:
    vals = (item.get(tag) or {}).get("Value") or []
    return str(vals[0]) if vals else None


def _codes(study_json: dict[str, Any]) -> tuple[ProcedureCode, ...]:
    items = (study_json.get("00081032") or {}).get("Value") or []
    return tuple(
        ProcedureCode(value=v, scheme=_first(item, "00080102"), meaning=_first(item, "00080104"))
        for item in items
        if (v := _first(item, "00080100"))
    )


def _prior_facts(s: StudyView) -> PriorFacts:
    body = next((se.body_part for se in s.series if se.body_part), None)
    lat = next((se.laterality for se in s.series if se.laterality), None)
    return PriorFacts(
        study_date=_date(s.study_date),
        modalities=s.modalities or tuple(dict.fromkeys(se.modality for se in s.series if se.modality)),
        study_description=s.description or None,
        procedure_codes=_codes(s.study_json),
        body_part_examined=body,
        laterality=lat,
        series=tuple(
            SeriesFacts(
                modality=se.modality or None,
                description=se.description or None,
                body_part_examined=se.body_part or None,
                laterality=se.laterality or None,
                slice_thickness_mm=se.min_slice_thickness_mm,
                number_of_instances=se.instances or None,
                contrast_agent=se.contrast_agent or None,
            )
            for se in s.series
        ),
        study_instance_uid=s.study_uid,
    )


def dose_region(regions: tuple[str, ...] | list[str]) -> str | None:
    """The k-table region of an exam from the engine's regions (trunk for chest + abdomen ...)."""
    vocab = load_vocabulary()
    tops: set[str] = set()
    for r in regions:
        chain = vocab.ancestors(r) if r in vocab.regions else [r]
        hit = next((_DOSE_TOPS[a] for a in chain if a in _DOSE_TOPS), None)
        if hit:
            tops.add(hit)
    if {"chest", "abdomen_pelvis"} <= tops:
        return "trunk"
    if {"head", "neck"} <= tops:
        return "head_neck"
    for key in ("abdomen_pelvis", "chest", "head", "neck"):
        if key in tops:
            return key
    return None


def _age_at(s: StudyView) -> float | None:
    exam, birth = _date(s.study_date), _date(s.birth_date)
    if exam is None or birth is None or birth > exam:
        return None
    return dosemath.age_at(birth_date=birth, exam_date=exam)


def _study_dose(s: StudyView, verdict: Verdict) -> dosemath.StudyDose | None:
    if not s.doses:
        return None
    return dosemath.study_dose(
        s.doses,
        age_at_exam_years=_age_at(s),
        region=dose_region(verdict.prior.regions),
        study_instance_uid=s.study_uid,
        study_date=_date(s.study_date),
    )


def _dose_out(d: dosemath.StudyDose | None, s: StudyView) -> DoseOut | None:
    if d is None:
        return None
    dlp = d.dlp_total_reported_mgy_cm
    if dlp is None and d.dlp_by_phantom_mgy_cm:
        dlp = round(sum(d.dlp_by_phantom_mgy_cm.values()), 2)
    ctdi = max(d.ctdivol_per_event_mgy) if d.ctdivol_per_event_mgy else None
    return DoseOut(
        dlp_mgy_cm=dlp,
        ctdivol_mgy=ctdi,
        dap_gy_cm2=d.dap_total_gy_cm2,
        effective_dose_msv=d.effective_dose_msv,
        source=None if d.source is None else d.source.value,
        method=d.method,
        age_at_exam_years=None if d.age_at_exam_years is None else round(d.age_at_exam_years, 2),
        notes=list(d.notes),
    )


# -- the lookup -------------------------------------------------------------------------------------


def find_priors(
    *,
    session: Session,
    principal: Principal,
    facility: str | None = None,
    mrn: str | None = None,
    identifier: str | None = None,
    exam: str | None = None,
    code: str | None = None,
    code_system: str | None = None,
    modality: str | None = None,
    body_part: str | None = None,
    setting: Setting | str = Setting.OUTPATIENT,
    now: date | None = None,
    windows: Windows | None = None,
    person: PersonStudies | None = None,
) -> PriorsAnswer:
    """Every study of the patient's person across facilities, judged against the planned exam.

    Unknown patient: an empty answer (`patient_found` false), not an error. Bad exam: BadRequest
    with the engine's reason. Writes nothing. `person`, from `person_studies` for the same caller
    and patient, spares re-reading them when one call judges several planned exams."""
    # Every caller is named; sharing policy per facility is for `authorize` to enforce.
    authorize(principal, action="lookup.read", facility=facility)
    the_setting = Setting.parse(setting)
    planned = planned_exam(
        exam=exam, code=code, code_system=code_system, modality=modality, body_part=body_part
    )
    if person is None:
        person = person_studies(
            session=session, principal=principal, facility=facility, mrn=mrn, identifier=identifier
        )
    today = now or datetime.now(UTC).date()
    wins = windows or load_vocabulary().default_windows()
    planned_out = PlannedOut(
        text=exam,
        code=code,
        modality=planned.modality,
        regions=list(planned.regions),
        laterality=planned.laterality,
        contrast=planned.contrast,
        decided_by=planned.decided_by,
        notes=list(planned.notes),
    )
    found, studies, withheld = person.found, person.studies, person.withheld
    answer = PriorsAnswer(
        patient_found=found,
        setting=the_setting.value,
        window_days=wins.days(the_setting),
        planned=planned_out,
    )
    if not found:
        answer.notes.append("no patient with this identifier is known to the broker")
        return answer
    if withheld:
        # Neutral on purpose: neither how many, nor where, nor why beyond consent.
        answer.withheld_by_consent = True
        answer.notes.append(consent.WITHHELD_NOTE)

    rows: list[tuple[PriorOut, dosemath.StudyDose | None, StudyView, Verdict]] = []
    for s, link, detail in studies:
        verdict = judge(planned, _prior_facts(s), setting=the_setting, now=today, windows=wins)
        d = _study_dose(s, verdict)
        u = verdict.usability
        modality = next(
            (m for m in s.modalities if m not in ("SR", "KO", "PR")), s.modalities[0] if s.modalities else ""
        )
        rows.append(
            (
                PriorOut(
                    study_instance_uid=s.study_uid,
                    facility=s.facility_id,
                    study_date=_date(s.study_date),
                    age_days=verdict.age_days,
                    modality=modality,
                    modalities=list(s.modalities),
                    description=s.description,
                    relevant=verdict.relevant,
                    in_window=verdict.relevant and verdict.in_window,
                    rule=verdict.rule,
                    reasons=list(verdict.reasons),
                    usability=UsabilityOut(
                        thin_slices=u.thin_slices,
                        contrast=u.contrast,
                        phases=list(u.phases),
                        contrast_matches_planned=u.contrast_matches_planned,
                        series_complete=u.series_complete,
                        notes=list(u.notes),
                    ),
                    dose=_dose_out(d, s),
                    availability="NEARLINE" if s.has_pixels is False else "ONLINE",
                    link=link,  # type: ignore[arg-type]
                    link_detail=detail,
                ),
                d,
                s,
                verdict,
            )
        )

    def order(row: tuple[PriorOut, object, object, object]) -> tuple[int, int, int, str]:
        p = row[0]
        days = p.age_days if p.age_days is not None else 10**9
        return (0 if p.relevant else 1, 0 if p.in_window else 1, days, p.study_instance_uid)

    rows.sort(key=order)
    answer.priors = [r[0] for r in rows]
    warned = [p for p in answer.priors if p.in_window]
    if warned:
        p = warned[0]
        answer.warning = (
            f"A relevant {p.modality} {p.age_days} days ago at {p.facility} lies within the "
            f"{the_setting.value} window of {answer.window_days} days: review it before repeating."
        )

    # The person's cumulative dose: confirmed links only (an unconfirmed match may be someone else).
    # `now` may be any date (judging as of one): the window starts no earlier than the calendar.
    since = max(today, date.min + timedelta(days=_CUMULATIVE_DAYS)) - timedelta(days=_CUMULATIVE_DAYS)
    confirmed_doses = [d for p, d, _s, _v in rows if d is not None and p.link == "confirmed"]
    confirmed_uids_without = [
        p.study_instance_uid
        for p, d, s, _v in rows
        if d is None
        and p.link == "confirmed"
        and p.study_date is not None
        and p.study_date >= since
        and any(m in ("CT", "CR", "DX", "XA", "RF", "MG", "NM", "PT") for m in s.modalities)
    ]
    cum = dosemath.cumulative(confirmed_doses, since=since, until=today)
    answer.cumulative_12_months = CumulativeOut(
        since=since,
        effective_dose_msv=round(cum.effective_dose_msv, 3),
        studies_counted=cum.studies_counted,
        studies_without_estimate=len(cum.studies_without_estimate) + len(confirmed_uids_without),
        complete=cum.complete and not confirmed_uids_without,
    )

    # What a repeat would cost: the most recent relevant prior's own dose, else a typical dose.
    relevant = [(p, d, s) for p, d, s, _v in rows if p.relevant]
    prior_dose = next(
        (d for _p, d, _s in relevant if d is not None and d.effective_dose_msv is not None), None
    )
    prior_uid = next(
        (p.study_instance_uid for p, d, _s in relevant if d is not None and d.effective_dose_msv is not None),
        None,
    )
    age_now = _age_now(studies, today)
    region = dose_region(planned.regions) or ""
    cost = dosemath.repeat_cost(
        prior=prior_dose, modality=planned.modality or "", region=region, age_years=age_now
    )
    answer.repeat_cost = RepeatCostOut(
        effective_dose_msv=cost.effective_dose_msv,
        basis=cost.basis,
        detail=cost.detail,
        prior_study_instance_uid=prior_uid if cost.basis == "prior" else None,
    )
    return answer


def _age_now(studies: list[tuple[StudyView, str, str]], today: date) -> float | None:
    for s, link, _d in studies:
        birth = _date(s.birth_date)
        if link == "confirmed" and birth is not None and birth <= today:
            return dosemath.age_at(birth_date=birth, exam_date=today)
    return None


# -- avoided repeats ----------------------------------------------------------------------------------


def record_avoided(
    *,
    session: Session,
    principal: Principal,
    study_uid: str,
    planned_exam: str,
    facility: str,
    now: datetime | None = None,
) -> AvoidedOut:
    """A clinician saw `study_uid` and did not repeat `planned_exam`: record it with the dose
    spared (the prior's own effective dose, else the typical dose of the exam). Commits. The
    CDS Hooks feedback calls this too."""
    authorize(principal, action="lookup.write", facility=facility)
    planned_text = planned_exam.strip()
    if not planned_text:
        raise BadRequest("planned_exam must name the exam that was not repeated")
    facilities.get_facility(session=session, facility_id=facility)
    views = index.studies_by_uid(session=session, study_uids=[study_uid])
    views, _withheld = consent.filter_studies(session=session, principal=principal, studies=views)
    if not views:
        raise NotFound("no such study in the index")
    s = views[0]
    planned = interpret_exam(text=planned_text)
    verdict = judge(
        planned, _prior_facts(s), setting=Setting.OUTPATIENT, now=(now or datetime.now(UTC)).date()
    )
    d = _study_dose(s, verdict)
    cost = dosemath.repeat_cost(
        prior=d,
        modality=planned.modality or "",
        region=dose_region(planned.regions) or "",
        age_years=_age_at(s),
    )
    row = AvoidedRepeat(
        study_uid=study_uid,
        planned_exam=planned_text[:256],
        facility_id=facility,
        who=principal.who[:128],
        estimated_dose_msv=cost.effective_dose_msv,
        basis=cost.basis,
        recorded_at=now or datetime.now(UTC),
    )
    session.add(row)
    session.commit()
    session.refresh(row)
    assert row.id is not None
    metrics.count_avoided(facility=row.facility_id, dose_msv=row.estimated_dose_msv)
    return AvoidedOut(
        id=row.id,
        study_instance_uid=row.study_uid,
        planned_exam=row.planned_exam,
        facility=row.facility_id,
        who=row.who,
        estimated_dose_msv=row.estimated_dose_msv,
        basis=row.basis,
        recorded_at=row.recorded_at,
    )


def avoided_per_month(*, session: Session, facility: str | None = None) -> list[AvoidedMonth]:
    """Repeats avoided and estimated dose spared, per facility per month (oldest first)."""
    stmt = select(AvoidedRepeat)
    if facility:
        stmt = stmt.where(AvoidedRepeat.facility_id == facility)
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for row in session.exec(stmt.order_by(col(AvoidedRepeat.recorded_at))):
        key = (row.facility_id, row.recorded_at.strftime("%Y-%m"))
        totals[key][0] += 1
        totals[key][1] += row.estimated_dose_msv or 0.0
    return [
        AvoidedMonth(facility=f, month=m, repeats_avoided=int(n), dose_spared_msv=round(msv, 3))
        for (f, m), (n, msv) in sorted(totals.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    ]
