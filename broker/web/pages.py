"""What the clinician's and the admin pages show, gathered from the broker's own services (the
lookup, identity, facilities, jobs): one function per page, each returning the template's context.
No HTTP here and no logic the API lacks: the lookup page shows `lookup.service.find_priors`'s
answer, the review page calls `identity.service.decide_review`, and so on."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from sqlmodel import Session

from broker.consent import service as consent
from broker.errors import BadRequest, NotFound, ScanOnceError
from broker.facilities import service as facilities
from broker.federation import service as federation
from broker.identity import service as identity
from broker.identity.schemas import issuer_from_system
from broker.jobs import service as jobs
from broker.lookup import service as lookup
from broker.lookup.schemas import AvoidedMonth, PriorsAnswer, Setting
from broker.security.schemas import Principal
from broker.web import present

SETTINGS = (
    (Setting.OUTPATIENT.value, "Outpatient"),
    (Setting.INPATIENT.value, "Inpatient"),
    (Setting.ED.value, "Emergency department"),
    (Setting.TRAUMA.value, "Trauma"),
)
# The lookup form's fields, as the page's URL carries them (a lookup is a bookmarkable GET).
FORM_FIELDS = (
    "facility",
    "mrn",
    "identifier",
    "family",
    "given",
    "birthdate",
    "exam",
    "code",
    "system",
    "setting",
    "now",
)
FIELD_MAX = 256  # characters in one field: more than any record's value (an identifier is 64)


@dataclass
class LookupForm:
    facility: str = ""
    mrn: str = ""
    identifier: str = ""
    family: str = ""
    given: str = ""
    birthdate: str = ""
    exam: str = ""
    code: str = ""
    system: str = "CPT"
    setting: str = Setting.OUTPATIENT.value
    now: str = ""

    @classmethod
    def from_query(cls, params: Any) -> LookupForm:
        # Bounded here (a pasted document), checked against FIELD_MAX in `lookup_view`.
        values = {name: str(params.get(name) or "").strip()[: FIELD_MAX * 4] for name in FORM_FIELDS}
        values["setting"] = values["setting"] or Setting.OUTPATIENT.value
        values["system"] = values["system"] or "CPT"
        return cls(**values)

    @property
    def planned(self) -> str:
        """The planned exam in words: the text, else the code's label (what an avoided repeat
        records, and the engine reads)."""
        if self.exam:
            return self.exam
        # Any code the vocabulary knows, not only those offered as suggestions (one per label).
        label = lookup.exam_label(code=self.code, code_system=self.system) if self.code else None
        return label or f"{self.system} {self.code}".strip()

    def query(self, **changes: str) -> str:
        values = {name: getattr(self, name) for name in FORM_FIELDS} | changes
        if not values.get("code"):
            values["system"] = ""
        return urlencode({k: v for k, v in values.items() if v})

    @property
    def by_name(self) -> bool:
        return bool(self.family or self.given or self.birthdate) and not (self.mrn or self.identifier)


@dataclass
class Candidate:
    """A person the demographic search found, with the identifiers a lookup can start from."""

    name: str
    birth_date: str
    sex: str
    identifiers: list[tuple[str, str, str]]  # (shown as, lookup query, facility name)


@dataclass
class LookupView:
    form: LookupForm
    facilities: list[tuple[str, str]]  # (id, name)
    suggestions: list[str]
    today: date
    errors: dict[str, str] = field(default_factory=dict)  # field name -> message shown beside it
    answer: PriorsAnswer | None = None
    candidates: list[Candidate] | None = None
    facility_names: dict[str, str] = field(default_factory=dict)
    avoided: AvoidedMonth | None = None
    ordering_facility: str = ""

    @property
    def first_error(self) -> str:
        """The field the page puts the focus on: the first refused (without JavaScript too)."""
        return next(iter(self.errors), "")

    @property
    def chart(self) -> present.Chart | None:
        return present.dose_chart(self.answer, self.today, self.facility_names) if self.answer else None

    @property
    def groups(self) -> tuple[list[Any], list[Any]]:
        return present.split(self.answer.priors) if self.answer else ([], [])

    @property
    def child(self) -> bool:
        return present.is_child(self.answer, self.today) if self.answer else False


def lookup_view(*, session: Session, principal: Principal, form: LookupForm) -> LookupView:
    """The lookup page: the form, and when it is filled in, the answer (or the people a name
    search found, or the message of what was wrong beside its field)."""
    registered = facilities.list_facilities(session=session)
    names = {f.id: f.name or f.id for f in registered}
    view = LookupView(
        form=form,
        facilities=[(f.id, f.name or f.id) for f in registered],
        suggestions=[s.label for s in lookup.exam_suggestions()],
        today=datetime.now(UTC).date(),
        facility_names=names,
    )
    for name in FORM_FIELDS:
        value = getattr(form, name)
        # Said beside the field (the hidden identifier is the MRN's), on either backend.
        slot = {"identifier": "mrn", "system": "code"}.get(name, name)
        if "\x00" in value:
            # PostgreSQL refuses a NUL in any text value, and no record holds one.
            view.errors[slot] = (
                "This field contains a NUL character (often pasted from another program): retype it."
            )
        elif len(value) > FIELD_MAX:
            # Cut, it would be looked up as another value and answered "no studies found".
            view.errors[slot] = f"This field is too long ({len(value)} characters; at most {FIELD_MAX})."
    if view.errors:
        return view
    if form.now:
        try:
            view.today = date.fromisoformat(form.now)
        except ValueError:
            view.errors["now"] = "The date must be written YYYY-MM-DD."
            return view
    if form.by_name:
        _search_people(session, principal, form, view)
        return view
    if not (form.mrn or form.identifier):
        if form.exam or form.code:
            view.errors["mrn"] = "Give the patient's MRN and facility, or search by name and birth date."
        return view
    if not (form.exam or form.code):
        view.errors["exam"] = "Give the planned exam, e.g. “CT abdomen pelvis”, or its procedure code."
        return view
    try:
        view.answer = lookup.find_priors(
            session=session,
            principal=principal,
            facility=None if form.identifier else (form.facility or None),
            mrn=None if form.identifier else (form.mrn or None),
            identifier=form.identifier or None,
            exam=form.exam or None,
            code=form.code or None,
            code_system=form.system if form.code else None,
            setting=form.setting,
            now=view.today,
        )
    except NotFound as exc:
        view.errors["facility"] = exc.message
        return view
    except BadRequest as exc:
        view.errors[_field_of(exc.message)] = exc.message
        return view
    view.ordering_facility = _ordering_facility(session, form)
    view.avoided = avoided_this_month(session=session, facility=view.ordering_facility, today=view.today)
    return view


def _field_of(message: str) -> str:
    """Which field the lookup's message is about, to show it beside that field."""
    lowered = message.lower()
    if "setting" in lowered:
        return "setting"
    if "code" in lowered and "exam" not in lowered:
        return "code"
    if any(w in lowered for w in ("identifier", "mrn", "patient id", "issuer", "facility")):
        return "mrn"
    return "exam"


def _ordering_facility(session: Session, form: LookupForm) -> str:
    """The facility a repeat is avoided at: the one the patient was looked up by."""
    if form.facility and not form.identifier:
        return form.facility
    system = issuer_from_system(form.identifier.partition("|")[0].strip())
    for facility_id, issuer in facilities.issuers(session=session).items():
        if issuer == system:
            return facility_id
    return ""


def _search_people(session: Session, principal: Principal, form: LookupForm, view: LookupView) -> None:
    try:
        # Only records the caller may see (consent, purpose of use), as FHIR's PDQm.
        people = identity.search_persons(
            session=session,
            family=form.family or None,
            given=form.given or None,
            birth_date=form.birthdate or None,
            limit=20,
            keep=consent.record_filter(session=session, principal=principal),
        )
    except BadRequest as exc:
        view.errors["family" if "birth" not in exc.message else "birthdate"] = exc.message
        return
    by_issuer = {issuer: facility_id for facility_id, issuer in facilities.issuers(session=session).items()}
    names = view.facility_names
    view.candidates = []
    for person in people:
        idents = []
        for ident in person.identifiers:
            facility_id = by_issuer.get(ident.issuer)
            query = form.query(
                identifier=f"{ident.issuer}|{ident.value}",
                family="",
                given="",
                birthdate="",
                facility="",
                mrn="",
            )
            where = names.get(facility_id, ident.issuer) if facility_id else ident.issuer
            idents.append((ident.value, query, where))
        view.candidates.append(
            Candidate(
                name=", ".join(
                    n for n in (person.family, " ".join(filter(None, (person.given, person.middle)))) if n
                ),
                birth_date=_da(person.birth_date),
                sex=person.sex,
                identifiers=idents,
            )
        )


def _da(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value


def avoided_this_month(*, session: Session, facility: str, today: date) -> AvoidedMonth | None:
    if not facility:
        return None
    month = datetime.now(UTC).strftime("%Y-%m")
    for row in lookup.avoided_per_month(session=session, facility=facility):
        if row.month == month:
            return row
    return AvoidedMonth(facility=facility, month=month, repeats_avoided=0, dose_spared_msv=0.0)


def record_avoided(
    *, session: Session, principal: Principal, study_uid: str, planned_exam: str, facility: str
) -> tuple[str, AvoidedMonth | None]:
    """Record the repeat avoided through the lookup service; (message, this month's count)."""
    out = lookup.record_avoided(
        session=session,
        principal=principal,
        study_uid=study_uid,
        planned_exam=planned_exam,
        facility=facility,
    )
    spared = f" (about {present.msv(out.estimated_dose_msv)} spared)" if out.estimated_dose_msv else ""
    month = avoided_this_month(session=session, facility=facility, today=datetime.now(UTC).date())
    return f"Recorded: this prior is used instead of a new {planned_exam}{spared}.", month


# -- admin pages ------------------------------------------------------------------------------------


@dataclass
class FacilityRow:
    id: str
    name: str
    issuer: str
    endpoint: str
    policy: str
    status: str
    last_completed: str
    last_error: str
    studies_at_facility: int
    not_fetched: int


def facility_rows(*, session: Session) -> list[FacilityRow]:
    rows = []
    for f in facilities.list_facilities(session=session):
        state = facilities.sync_state(session=session, facility_id=f.id)
        endpoint = f.dicomweb_url or (f"{f.ae_title}@{f.host}:{f.port}" if f.ae_title and f.host else "")
        rows.append(
            FacilityRow(
                id=f.id,
                name=f.name or f.id,
                issuer=f.issuer,
                endpoint=endpoint or "pushes to the broker",
                policy=f.sharing_policy,
                status=(state.last_status if state and state.last_status else None)
                or ("never synced" if facilities.has_archive_endpoint(f) else "no archive to sync"),
                last_completed=_when(state.last_completed_at) if state else "",
                last_error=state.last_error if state else "",
                studies_at_facility=state.studies_at_facility if state else 0,
                not_fetched=federation.remote_only_count(session=session, facility_id=f.id),
            )
        )
    return rows


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else ""


@dataclass
class JobRow:
    id: int
    kind: str
    key: str
    status: str
    done: int
    total: int | None
    percent: int | None
    message: str
    error: str
    created: str
    finished: str


def job_rows(*, session: Session, limit: int = 50) -> list[JobRow]:
    rows = []
    for j in jobs.list_jobs(session=session, limit=limit):
        assert j.id is not None
        percent = min(100, round(100 * j.progress_done / j.progress_total)) if j.progress_total else None
        rows.append(
            JobRow(
                id=j.id,
                kind=j.kind,
                key=j.key,
                status=j.status,
                done=j.progress_done,
                total=j.progress_total,
                percent=percent if j.status != "done" else 100,
                message=j.message,
                error=j.error[:300],
                created=_when(j.created_at),
                finished=_when(j.finished_at),
            )
        )
    return rows


FIELD_NAMES = {
    "family": "Family name",
    "given": "Given name",
    "middle": "Middle name",
    "birth_date": "Birth date",
    "sex": "Sex",
    "address": "Address",
    "phone": "Phone",
    "names": "Names",
}


@dataclass
class ReviewSide:
    record_id: int
    identifier: str
    facility: str
    values: dict[str, str]


@dataclass
class ReviewCard:
    id: int
    weight: float
    left: ReviewSide
    right: ReviewSide
    evidence: list[tuple[str, str, float]]  # field, agreement level, weight (log2 Bayes factor)


def review_cards(*, session: Session, limit: int = 50) -> list[ReviewCard]:
    """The open review items, each pair of records side by side with the matching evidence."""
    names = {f.id: f.name or f.id for f in facilities.list_facilities(session=session)}
    cards = []
    for item in identity.review_queue(session=session, status="open", limit=limit):
        assert item.id is not None
        sides = []
        for record_id in (item.record_id, item.candidate_record_id):
            rec = identity.require_record(session=session, record_id=record_id)
            demo = identity.demo_of(rec)
            values = {
                "family": demo.family,
                "given": demo.given,
                "middle": demo.middle,
                "birth_date": _da(demo.birth_date),
                "sex": demo.sex,
                "address": demo.address,
                "phone": demo.phone,
            }
            facility = names.get(rec.facility_id or "", rec.facility_id or rec.issuer)
            sides.append(
                ReviewSide(
                    record_id=record_id,
                    identifier=f"{rec.issuer} | {rec.value}",
                    facility=facility,
                    values=values,
                )
            )
        contributions = orjson.loads(item.contributions or "{}")
        evidence = [
            (FIELD_NAMES.get(name, name), str(c.get("level", "")), float(c.get("weight", 0.0)))
            for name, c in contributions.items()
            if isinstance(c, dict)
        ]
        cards.append(
            ReviewCard(id=item.id, weight=item.weight, left=sides[0], right=sides[1], evidence=evidence)
        )
    return cards


def decide_review(*, session: Session, principal: Principal, review_id: int, decision: str, why: str) -> str:
    """A reviewer's accept (link) or reject, through the identity service; the message shown."""
    if decision not in ("link", "reject"):
        raise BadRequest("decision must be link or reject")
    if "\x00" in why:
        raise BadRequest("the reason contains a NUL character (often pasted from another program)")
    identity.decide_review(
        session=session, principal=principal, review_id=review_id, decision=decision, why=why.strip()
    )
    verb = "linked: the two records are now one person" if decision == "link" else "rejected: never linked"
    return f"Review item {review_id} {verb}."


__all__ = [
    "LookupForm",
    "LookupView",
    "ScanOnceError",
    "decide_review",
    "facility_rows",
    "job_rows",
    "lookup_view",
    "record_avoided",
    "review_cards",
]
