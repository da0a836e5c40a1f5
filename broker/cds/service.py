"""CDS Hooks 2.0 services over the prior lookup.

A hook call names the patient by the EHR's own FHIR id; the broker knows patients by their
issuer-qualified identifiers. So the service reads the Patient resource (prefetched, or fetched
from the CDS client's `fhirServer` with its `fhirAuthorization`) and looks its identifiers up; the
draft ServiceRequests give the planned exams (LOINC / CPT / RadLex code, text, bodySite). Each draft
order with a relevant prior gets one card; an unknown patient or an order that is not an imaging
exam gets none. Cards are recorded (`cds_card`) so that feedback, which names only a card's uuid,
can turn an accepted suggestion into an avoided repeat.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import orjson
from sqlalchemy import text, update
from sqlmodel import Session, col, select

from broker.cds.errors import PreconditionFailed
from broker.cds.models import Feedback, IssuedCard
from broker.cds.schemas import (
    Action,
    Card,
    CdsResponse,
    Coding,
    Discovery,
    FeedbackAnswer,
    Link,
    Service,
    Source,
    Suggestion,
)
from broker.errors import BadRequest, NotFound, ScanOnceError
from broker.facilities import service as facilities
from broker.lookup import service as lookup
from broker.lookup.schemas import PriorOut, PriorsAnswer, Setting
from broker.lookup.vocabulary import load as load_vocabulary
from broker.security import network
from broker.security.schemas import Principal

__all__ = ["discovery", "call_service", "record_feedback", "SERVICES", "OVERRIDE_REASONS"]

PRIOR_SELECT = "scanonce-prior-imaging"
PRIOR_SIGN = "scanonce-prior-imaging-sign"

# What the service asks the CDS client to send with each call (the spec's prefetch templates).
PREFETCH = {
    "patient": "Patient/{{context.patientId}}",
    "encounter": "Encounter/{{context.encounterId}}",
}
_DESCRIPTION = (
    "Relevant prior imaging of this patient at every facility of the network, before {what}: "
    "why it is relevant, its radiation dose and what a repeat would cost, with links to view it."
)
SERVICES: dict[str, Service] = {
    PRIOR_SELECT: Service(
        hook="order-select",
        id=PRIOR_SELECT,
        title="ScanOnce: relevant prior imaging",
        description=_DESCRIPTION.format(what="an imaging order is chosen"),
        prefetch=PREFETCH,
    ),
    PRIOR_SIGN: Service(
        hook="order-sign",
        id=PRIOR_SIGN,
        title="ScanOnce: relevant prior imaging (at signing)",
        description=_DESCRIPTION.format(what="imaging orders are signed"),
        prefetch=PREFETCH,
    ),
}

OVERRIDE_SYSTEM = "urn:scanonce:cds:override-reason"
OVERRIDE_REASONS = [
    Coding(
        system=OVERRIDE_SYSTEM, code="prior-reviewed", display="Prior reviewed; a new exam is still needed"
    ),
    Coding(system=OVERRIDE_SYSTEM, code="clinical-change", display="Clinical change since the prior"),
    Coding(
        system=OVERRIDE_SYSTEM,
        code="prior-inadequate",
        display="Prior not adequate (protocol, quality, missing series)",
    ),
    Coding(system=OVERRIDE_SYSTEM, code="prior-unavailable", display="Prior images cannot be had in time"),
    Coding(system=OVERRIDE_SYSTEM, code="not-this-patient", display="The prior is not this patient's"),
]

# Setting of the order from the Encounter's class (HL7 v3 ActCode), and an explicit override the
# CDS client may send as a request extension (CDS Hooks 2.0 "Extensions").
SETTING_EXTENSION = "org.scanonce.setting"
_ENCOUNTER_SETTING = {
    "EMER": "ed",
    "IMP": "inpatient",
    "ACUTE": "inpatient",
    "NONAC": "inpatient",
    "OBSENC": "inpatient",
    "SS": "inpatient",
    "AMB": "outpatient",
    "VR": "outpatient",
    "HH": "outpatient",
    "FLD": "outpatient",
    "PRENC": "outpatient",
}
# FHIR code systems of procedure codes, as the lookup's code tables name them.
_CODE_SYSTEMS = {
    "http://loinc.org": "LOINC",
    "urn:oid:2.16.840.1.113883.6.1": "LOINC",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "urn:oid:2.16.840.1.113883.6.12": "CPT",
    "http://www.radlex.org": "RADLEX",
    "http://radlex.org": "RADLEX",
}
SCT = "http://snomed.info/sct"
_FETCH_TIMEOUT_S = 5.0
_MAX_BODY = 2_000_000
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

Fetch = Callable[[str], dict[str, Any] | None]


def discovery() -> Discovery:
    return Discovery(services=list(SERVICES.values()))


def _service(service_id: str) -> Service:
    svc = SERVICES.get(service_id)
    if svc is None:
        raise NotFound(f"no CDS service {service_id[:64]!r} here (GET /cds-services lists them)")
    return svc


# -- the request ----------------------------------------------------------------------------------------


@dataclass
class HookCall:
    hook: str
    hook_instance: str
    context: dict[str, Any]
    prefetch: dict[str, Any]
    fhir_server: str | None
    access_token: str | None
    extension: dict[str, Any]


def _json(raw: bytes, what: str) -> Any:
    if len(raw) > _MAX_BODY:
        raise BadRequest(f"{what} is larger than {_MAX_BODY} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest(f"{what} is not JSON") from None


def _http_url(value: Any) -> bool:
    """Whether a fhirServer is a URL the service could call: checked with the request, so that a
    malformed one is the client's 400 whether or not this call needs to read from it."""
    if not isinstance(value, str) or not re.match(r"^https?://[^\x00-\x20\x7f]+$", value, re.IGNORECASE):
        return False
    try:
        parts = urlsplit(value)
        port = parts.port  # ValueError when not a number 0-65535
        httpx.URL(value)  # what the fetch will parse
        (parts.hostname or "").encode("idna")  # UnicodeError: a label over 63 characters ...
    except (ValueError, httpx.InvalidURL):
        return False
    return bool(parts.hostname) and port != 0


def _parse_call(raw: bytes, svc: Service) -> HookCall:
    body = _json(raw, "the hook request")
    if not isinstance(body, dict):
        raise BadRequest("the hook request must be a JSON object")
    hook = body.get("hook")
    if not isinstance(hook, str) or not hook:
        raise BadRequest("hook is required")
    if hook != svc.hook:
        raise BadRequest(f"this service answers the {svc.hook} hook, not {hook[:40]!r}")
    instance = body.get("hookInstance")
    if not isinstance(instance, str) or not _UUID_RE.match(instance):
        raise BadRequest("hookInstance is required and must be a UUID")
    context = body.get("context")
    if not isinstance(context, dict):
        raise BadRequest("context is required (an object)")
    for key in ("userId", "patientId"):
        if not isinstance(context.get(key), str) or not context[key]:
            raise BadRequest(f"context.{key} is required")
    # FHIR ids, which the service puts in the path of a read from fhirServer.
    for key in ("patientId", "encounterId"):
        if context.get(key) is not None and not (
            isinstance(context[key], str) and _FHIR_ID.fullmatch(context[key])
        ):
            raise BadRequest(f"context.{key} must be a FHIR id (letters, digits, '-' and '.', up to 64)")
    drafts = context.get("draftOrders")
    if not isinstance(drafts, dict) or drafts.get("resourceType") != "Bundle":
        raise BadRequest("context.draftOrders is required and must be a FHIR Bundle")
    if not isinstance(drafts.get("entry", []), list):
        raise BadRequest("context.draftOrders.entry must be an array")
    selections = context.get("selections")
    if hook == "order-select" and (
        not isinstance(selections, list) or not selections or not all(isinstance(s, str) for s in selections)
    ):
        raise BadRequest("context.selections is required for order-select (the selected orders' ids)")
    if selections is not None and (
        not isinstance(selections, list) or not all(isinstance(s, str) for s in selections)
    ):
        raise BadRequest("context.selections must be an array of order ids (ServiceRequest/id)")
    server = body.get("fhirServer")
    if server is not None and not _http_url(server):
        raise BadRequest("fhirServer must be an http(s) URL with a host (and a port 1-65535, if any)")
    auth = body.get("fhirAuthorization")
    token = None
    if auth is not None:
        if server is None:
            raise BadRequest("fhirAuthorization is given without the fhirServer it is for")
        if not isinstance(auth, dict) or not isinstance(auth.get("access_token"), str):
            raise BadRequest("fhirAuthorization.access_token is required")
        if str(auth.get("token_type", "")).lower() != "bearer":
            raise BadRequest("fhirAuthorization.token_type must be Bearer")
        token = auth["access_token"]
    prefetch = body.get("prefetch") or {}
    if not isinstance(prefetch, dict):
        raise BadRequest("prefetch must be an object")
    extension = body.get("extension") or {}
    if not isinstance(extension, dict):
        raise BadRequest("extension must be an object")
    if extension.get(SETTING_EXTENSION) is not None:
        # Checked here, not only when an order is judged: a call that makes no card (a patient
        # the broker does not know) must refuse it as well.
        extension[SETTING_EXTENSION] = Setting.parse(extension[SETTING_EXTENSION]).value
    return HookCall(hook, instance, context, prefetch, server, token, extension)


def _fetcher(call: HookCall) -> Fetch | None:
    """Reads a resource from the CDS client's FHIR server (None: no server to ask)."""
    if call.fhir_server is None:
        return None
    base = call.fhir_server.rstrip("/")
    headers = {"accept": "application/fhir+json"}
    if call.access_token:
        headers["authorization"] = f"Bearer {call.access_token}"

    def fetch(path: str) -> dict[str, Any] | None:
        try:
            # Only to the administrator's outbound networks (a request names this server).
            r = network.guarded_get(f"{base}/{path}", headers=headers, timeout=_FETCH_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise PreconditionFailed(f"the FHIR server could not be reached ({type(exc).__name__})") from None
        if r.status_code != 200:
            raise PreconditionFailed(f"the FHIR server answered {r.status_code} for {path.split('/')[0]}")
        try:
            data = r.json()
        except ValueError:
            raise PreconditionFailed("the FHIR server's answer is not JSON") from None
        return data if isinstance(data, dict) else None

    return fetch


def _resource(
    call: HookCall, key: str, kind: str, fetch: Fetch | None, ident: str | None
) -> dict[str, Any] | None:
    """A prefetched resource, else read from the FHIR server; None when neither can give it."""
    value = call.prefetch.get(key)
    if isinstance(value, dict) and value.get("resourceType") == kind:
        return value
    if fetch is None or not ident:
        return None
    got = fetch(f"{kind}/{ident}")
    return got if got is not None and got.get("resourceType") == kind else None


def _check_identifiers(patient: Mapping[str, Any]) -> None:
    """The Patient's identifiers name the patient: a wrong shape is the client's 400."""
    idents = patient.get("identifier")
    if idents is None:
        return
    if not isinstance(idents, list) or not all(isinstance(i, dict) for i in idents):
        raise BadRequest("the Patient's identifier must be an array of Identifiers")
    for ident in idents:
        for key in ("system", "value"):
            if ident.get(key) is not None and not isinstance(ident[key], str):
                raise BadRequest(f"the Patient's identifier.{key} must be a string")


def _setting(call: HookCall, fetch: Fetch | None) -> str:
    explicit = call.extension.get(SETTING_EXTENSION)
    if explicit is not None:
        return str(explicit)  # checked by _parse_call
    try:
        enc = _resource(call, "encounter", "Encounter", fetch, call.context.get("encounterId"))
    except PreconditionFailed:
        enc = None  # the setting only picks a window: without it the widest default stands
    klass = (enc or {}).get("class")
    code = klass.get("code") if isinstance(klass, dict) else None
    return _ENCOUNTER_SETTING.get(str(code or "").upper(), "outpatient")


# -- draft orders -----------------------------------------------------------------------------------------


@dataclass
class DraftOrder:
    ref: str  # ServiceRequest/id ("" when the order has no id)
    text: str
    code: str | None
    code_system: str | None
    body_part: str | None


def _concept(value: Any, where: str) -> dict[str, Any]:
    """A CodeableConcept as FHIR shapes it, else BadRequest: what the order says is read from
    these fields, and a wrong shape must be the client's 400, not a fault of ours (a null is
    taken as absent)."""
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a CodeableConcept (an object)")
    codings = value.get("coding") or []
    if not isinstance(codings, list) or not all(isinstance(c, dict) for c in codings):
        raise BadRequest(f"{where}.coding must be an array of Codings")
    for c in codings:
        for key in ("system", "code", "display"):
            if c.get(key) is not None and not isinstance(c[key], str):
                raise BadRequest(f"{where}.coding.{key} must be a string")
    if value.get("text") is not None and not isinstance(value["text"], str):
        raise BadRequest(f"{where}.text must be a string")
    return value


def _body_part(sites: Any, where: str) -> str | None:
    """A BodyPartExamined term from ServiceRequest.bodySite (SNOMED CT as DICOM codes regions)."""
    if sites is None:
        return None
    if not isinstance(sites, list):
        raise BadRequest(f"{where} must be an array of CodeableConcepts")
    vocab = load_vocabulary()
    by_code = {r.code[1]: r.body_part[0] for r in vocab.regions.values() if r.body_part}
    for n, site in enumerate(sites):
        concept = _concept(site, f"{where}[{n}]")
        for c in concept.get("coding") or []:
            if c.get("system") == SCT and c.get("code") in by_code:
                return by_code[c["code"]]
        if concept.get("text") and concept["text"].strip():
            return str(concept["text"]).strip()
    return None


def _orders(call: HookCall) -> list[DraftOrder]:
    entries = call.context["draftOrders"].get("entry") or []
    chosen = set(call.context.get("selections") or [])
    orders = []
    named = set()
    for entry in entries:
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or res.get("resourceType") != "ServiceRequest":
            continue
        ref = f"ServiceRequest/{res['id']}" if isinstance(res.get("id"), str) else ""
        named.add(ref)
        if call.hook == "order-select" and ref not in chosen:
            continue
        where = f"draftOrders {ref or 'ServiceRequest'}"
        concept = _concept(res["code"], f"{where} code") if res.get("code") is not None else {}
        codings: list[dict[str, Any]] = concept.get("coding") or []
        coded = next((c for c in codings if c.get("system") in _CODE_SYSTEMS and c.get("code")), None)
        text = concept.get("text") or next((c.get("display") for c in codings if c.get("display")), "")
        orders.append(
            DraftOrder(
                ref=ref,
                text=str(text or "").strip(),
                code=str(coded["code"]) if coded else None,
                code_system=_CODE_SYSTEMS[coded["system"]] if coded else None,
                body_part=_body_part(res.get("bodySite"), f"{where} bodySite"),
            )
        )
    if call.hook == "order-select":
        missing = sorted(s for s in chosen if s.startswith("ServiceRequest/") and s not in named)
        if missing:
            raise BadRequest(f"context.selections names orders not in draftOrders: {', '.join(missing[:5])}")
    return orders


# -- cards ------------------------------------------------------------------------------------------------


def _ago(days: int | None) -> str:
    if days is None:
        return "at an unknown date"
    if days <= 0:
        return "today"
    if days == 1:
        return "yesterday"
    if days < 60:
        return f"{days} days ago"
    if days < 730:
        return f"{round(days / 30.4)} months ago"
    return f"{round(days / 365.25)} years ago"


def _summary(p: PriorOut, where: str) -> str:
    what = p.description or f"{p.modality} study"
    text = f"Prior {what} {_ago(p.age_days)} at {where}"
    if p.link == "unconfirmed":
        text += " (possible match)"
    return text if len(text) < 140 else text[:136] + "..."


def _why(p: PriorOut) -> str:
    """The verdict's reasons that say why (which regions overlapped), without how the texts were
    read or the window (said already)."""
    said = [r for r in p.reasons if not r.startswith(("read:", "prior:")) and "window" not in r]
    return "; ".join(said or p.reasons) + f" (rule {p.rule})"


def _msv(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f} mSv" if value >= 1 else f"{value:.2f} mSv"


def _detail(order: DraftOrder, p: PriorOut, answer: PriorsAnswer, names: Mapping[str, str]) -> str:
    where = names.get(p.facility, p.facility)
    when = p.study_date.isoformat() if p.study_date else "an unknown date"
    lines = [
        f"**{p.description or p.modality}** ({p.modality}) on {when}, {_ago(p.age_days)}, at {where}"
        + (" is inside" if p.in_window else " is outside")
        + f" the {answer.setting} look-back window of {answer.window_days} days.",
        "",
        f"**Why it is relevant** to the planned *{order.text or order.code}*: " + _why(p) + ".",
    ]
    if p.dose is not None and p.dose.effective_dose_msv is not None:
        parts = [f"effective dose {_msv(p.dose.effective_dose_msv)}"]
        if p.dose.dlp_mgy_cm is not None:
            parts.append(f"DLP {p.dose.dlp_mgy_cm:g} mGy·cm")
        if p.dose.ctdivol_mgy is not None:
            parts.append(f"CTDIvol {p.dose.ctdivol_mgy:g} mGy")
        if p.dose.age_at_exam_years is not None:
            parts.append(f"age {p.dose.age_at_exam_years:.0f} at the exam")
        lines += ["", "**Dose of the prior**: " + ", ".join(parts) + f" ({p.dose.source or 'estimate'})."]
    cost = answer.repeat_cost
    if cost is not None and cost.effective_dose_msv is not None:
        lines += ["", f"**A repeat would cost** about {_msv(cost.effective_dose_msv)} ({cost.detail})."]
    cum = answer.cumulative_12_months
    if cum is not None and cum.studies_counted:
        lines += [
            "",
            f"**Cumulative dose, last 12 months**, all facilities: {_msv(cum.effective_dose_msv)} "
            f"over {cum.studies_counted} {'study' if cum.studies_counted == 1 else 'studies'}"
            + ("" if cum.complete else " (some without an estimate)")
            + ".",
        ]
    usable = []
    if p.usability.thin_slices is True:
        usable.append("thin-slice reconstructions present")
    elif p.usability.thin_slices is False:
        usable.append("no thin-slice reconstructions")
    if p.usability.contrast:
        usable.append(f"contrast: {p.usability.contrast}")
    if usable:
        lines += ["", "**Usability**: " + ", ".join(usable) + "."]
    if p.availability == "NEARLINE":
        lines += ["", f"Images are held at {where}: they are fetched when the study is opened."]
    if p.link == "unconfirmed":
        lines += ["", "This study belongs to a record that may be this patient's (awaiting identity review)."]
    others = [o for o in answer.priors if o.relevant and o.study_instance_uid != p.study_instance_uid][:3]
    if others:
        lines += ["", "Other relevant priors:"]
        for o in others:
            where_o = names.get(o.facility, o.facility)
            lines.append(f"- {o.description or o.modality}, {o.study_date or 'undated'}, {where_o}")
    if answer.withheld_by_consent:
        lines += ["", "Some records are withheld by consent."]
    return "\n".join(lines)


def _code_label(order: DraftOrder) -> str | None:
    if not order.code:
        return None
    return lookup.exam_label(code=order.code, code_system=order.code_system) or order.code


def _lookup_link(base: str, who: tuple[str, str], order: DraftOrder, setting: str, fac: str | None) -> str:
    params = {"facility": fac, "mrn": who[1]} if fac else {"identifier": f"{who[0]}|{who[1]}"}
    # The page reads `exam` as words: a coded order without text goes as code + system instead.
    if order.text or not order.code:
        params["exam"] = order.text
    else:
        params.update({"code": order.code, "system": order.code_system or "CPT"})
    params["setting"] = setting
    return f"{base}/?" + urlencode(params)


def call_service(
    *,
    session: Session,
    principal: Principal,
    service_id: str,
    raw: bytes,
    base_url: str,
    now: date | None = None,
) -> CdsResponse:
    """Answer one hook call: a card per draft imaging order that has a relevant prior. Unknown
    service: NotFound; malformed request: BadRequest; patient data out of reach: PreconditionFailed."""
    svc = _service(service_id)
    call = _parse_call(raw, svc)
    orders = _orders(call)
    if not orders:
        return CdsResponse(cards=[])
    fetch = _fetcher(call)
    patient = _resource(call, "patient", "Patient", fetch, call.context["patientId"])
    if patient is None:
        raise PreconditionFailed(
            "the patient's identifiers are needed: send prefetch 'patient' (Patient/{{context.patientId}}) "
            "or a fhirServer the service may read it from"
        )
    _check_identifiers(patient)
    who = lookup.known_fhir_patient(session=session, patient=patient)
    if who is None:
        return CdsResponse(cards=[])  # a patient the broker does not know: no card, not an error
    setting = _setting(call, fetch)
    registered = facilities.list_facilities(session=session)
    ordering_facility = next((f.id for f in registered if f.issuer == who[0]), None)
    names = {f.id: f.name or f.id for f in registered}
    cards: list[Card] = []
    rows: list[IssuedCard] = []
    identifier = f"{who[0]}|{who[1]}"
    # The person's studies are the same for every draft order: read once, judged per order.
    person = lookup.person_studies(session=session, principal=principal, identifier=identifier)
    for order in orders:
        try:
            answer = lookup.find_priors(
                session=session,
                principal=principal,
                identifier=identifier,
                person=person,
                exam=order.text or None,
                code=order.code,
                code_system=order.code_system,
                body_part=order.body_part,
                setting=setting,
                now=now,
            )
        except BadRequest as exc:
            if "setting" in exc.message:
                raise
            continue  # not an exam the engine can read (a lab order, an unknown code with no text)
        relevant = [p for p in answer.priors if p.relevant]
        if not relevant:
            continue
        prior = next((p for p in relevant if p.link == "confirmed"), relevant[0])
        card_uuid, suggestion_uuid = str(uuid.uuid4()), str(uuid.uuid4())
        suggestions = None
        if order.ref:
            suggestions = [
                Suggestion(
                    label="Use the prior: remove this order",
                    uuid=suggestion_uuid,
                    isRecommended=prior.in_window,
                    actions=[
                        Action(
                            type="delete",
                            description=f"Remove the draft order {order.text or order.code}"[:200],
                            resourceId=order.ref,
                        )
                    ],
                )
            ]
        cards.append(
            Card(
                uuid=card_uuid,
                summary=_summary(prior, names.get(prior.facility, prior.facility)),
                detail=_detail(order, prior, answer, names),
                indicator="warning" if prior.in_window else "info",
                source=Source(label="ScanOnce prior lookup", url=f"{base_url}/"),
                suggestions=suggestions,
                selectionBehavior="at-most-one" if suggestions else None,
                overrideReasons=OVERRIDE_REASONS,
                links=[
                    Link(
                        label="View the prior",
                        url=f"{base_url}/viewer/viewer?StudyInstanceUIDs={prior.study_instance_uid}",
                        type="absolute",
                    ),
                    Link(
                        label="All of this patient's imaging (ScanOnce)",
                        url=_lookup_link(base_url, who, order, setting, ordering_facility),
                        type="absolute",
                    ),
                ],
            )
        )
        rows.append(
            IssuedCard(
                uuid=card_uuid,
                service_id=svc.id,
                hook_instance=call.hook_instance,
                suggestion_uuid=suggestion_uuid if suggestions else None,
                order_ref=order.ref[:128],
                # Words the engine reads, as record_avoided needs them when feedback accepts it.
                planned_exam=(order.text or _code_label(order) or "")[:256],
                prior_study_uid=prior.study_instance_uid,
                facility_id=ordering_facility or principal.facility,
                indicator="warning" if prior.in_window else "info",
            )
        )
    if rows:
        session.add_all(rows)
        if session.get_bind().dialect.name == "postgresql":
            # A card record lost in a crash costs only the avoided-repeat count of its feedback
            # (a 404 then); not waiting for the WAL flush keeps it off the hook's latency.
            session.execute(text("SET LOCAL synchronous_commit TO OFF"))
        session.commit()
    return CdsResponse(cards=cards)


# -- feedback ---------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    card: str
    outcome: str
    accepted: list[str]
    reason: dict[str, Any] | None
    comment: str
    at: datetime


def _parse_feedback(raw: bytes) -> list[_Entry]:
    body = _json(raw, "the feedback")
    items = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise BadRequest("feedback must be an object with a non-empty feedback array")
    out = []
    for n, item in enumerate(items):
        where = f"feedback[{n}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be an object")
        card = item.get("card")
        if not isinstance(card, str) or not card:
            raise BadRequest(f"{where}.card is required (the card's uuid)")
        outcome = item.get("outcome")
        if outcome not in ("accepted", "overridden"):
            raise BadRequest(f"{where}.outcome must be accepted or overridden")
        accepted: list[str] = []
        raw_accepted = item.get("acceptedSuggestions")
        if outcome == "accepted":
            if not isinstance(raw_accepted, list) or not raw_accepted:
                raise BadRequest(f"{where}.acceptedSuggestions is required for an accepted outcome")
            for s in raw_accepted:
                if not isinstance(s, dict) or not isinstance(s.get("id"), str) or not s["id"]:
                    raise BadRequest(f"{where}.acceptedSuggestions: each needs the suggestion's id")
                accepted.append(s["id"])
        reason = None
        comment = ""
        override = item.get("overrideReason")
        if override is not None:
            if not isinstance(override, dict):
                raise BadRequest(f"{where}.overrideReason must be an object")
            reason = override.get("reason")
            if reason is not None and (
                not isinstance(reason, dict) or not isinstance(reason.get("code"), str)
            ):
                raise BadRequest(f"{where}.overrideReason.reason must be a Coding with a code")
            comment = override.get("userComment") or ""
            if not isinstance(comment, str):
                raise BadRequest(f"{where}.overrideReason.userComment must be a string")
        stamp = item.get("outcomeTimestamp")
        if not isinstance(stamp, str):
            raise BadRequest(f"{where}.outcomeTimestamp is required (ISO 8601, UTC)")
        try:
            at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(f"{where}.outcomeTimestamp is not an ISO 8601 date-time") from None
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        out.append(_Entry(card, outcome, accepted, reason, comment, at))
    return out


def record_feedback(*, session: Session, principal: Principal, service_id: str, raw: bytes) -> FeedbackAnswer:
    """Store each feedback entry; an accepted suggestion to drop the order becomes an avoided
    repeat (once per card, however often the client repeats the feedback). A malformed entry or
    a card this service did not issue refuses the whole request, storing nothing."""
    svc = _service(service_id)
    entries = _parse_feedback(raw)
    uuids = sorted({e.card for e in entries})
    cards = {
        c.uuid: c
        for c in session.exec(
            select(IssuedCard).where(col(IssuedCard.uuid).in_(uuids), IssuedCard.service_id == svc.id)
        )
    }
    unknown = [u for u in uuids if u not in cards]
    if unknown:
        raise NotFound(f"no card {unknown[0][:40]!r} was issued by {svc.id}")
    rows = []
    for e in entries:
        reason = e.reason or {}
        row = Feedback(
            card_uuid=e.card,
            service_id=svc.id,
            outcome=e.outcome,
            accepted_suggestions=",".join(e.accepted)[:1024],
            override_system=str(reason.get("system") or "")[:256],
            override_code=str(reason.get("code") or "")[:64],
            override_display=str(reason.get("display") or "")[:256],
            user_comment=e.comment[:1024],
            outcome_at=e.at,
        )
        session.add(row)
        rows.append((e, row))
    session.commit()
    avoided = 0
    for e, row in rows:
        card = cards[e.card]
        if e.outcome != "accepted" or card.suggestion_uuid is None or card.suggestion_uuid not in e.accepted:
            continue
        # Claim the card first: a repeated or concurrent feedback records the repeat only once.
        claimed = session.execute(
            update(IssuedCard)
            .where(col(IssuedCard.uuid) == card.uuid, col(IssuedCard.avoided_id).is_(None))
            .values(avoided_id=-1)
        )
        session.commit()
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            continue
        try:
            out = lookup.record_avoided(
                session=session,
                principal=principal,
                study_uid=card.prior_study_uid,
                planned_exam=card.planned_exam or "the draft order",
                facility=card.facility_id,
            )
        except ScanOnceError:
            # The prior is gone from the index since (or its facility): the feedback is kept,
            # the card stays open for a later acceptance.
            session.rollback()
            session.execute(
                update(IssuedCard).where(col(IssuedCard.uuid) == card.uuid).values(avoided_id=None)
            )
            session.commit()
            continue
        session.execute(update(IssuedCard).where(col(IssuedCard.uuid) == card.uuid).values(avoided_id=out.id))
        row.avoided_id = out.id
        session.add(row)
        session.commit()
        avoided += 1
    return FeedbackAnswer(recorded=len(rows), repeats_avoided=avoided)
