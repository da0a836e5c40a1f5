"""FHIR R4 ImagingStudy: search parameters read into one index query, and the index's DICOM JSON
answers written as ImagingStudy resources (the DICOM to FHIR mapping of R4's ImagingStudy page).

Who the studies belong to comes from the lookup's `confirmed_patients` (a person's records at
every facility, confirmed links only); what matches comes from the one query engine
(`index.search`), the same that answers QIDO-RS and C-FIND. Writes nothing.

Also the one builder of a Patient as stored (`patient_resources`, `read_patient`): the read,
PDQm and the answer to a create or update.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any
from urllib.parse import urlencode

from sqlmodel import Session

from broker.consent import service as consent
from broker.deps import fhir_one, fhir_unsupported
from broker.dicom.json_model import pn_groups
from broker.dicom.uids import is_valid_uid
from broker.errors import BadRequest
from broker.facilities import service as facilities
from broker.fhir.schemas import (
    OtherNames,
    issuer_from_system,
    parse_person_id,
    patient_resource,
    system_for_issuer,
)
from broker.identity import service as identity
from broker.index import service as index
from broker.lookup import service as lookup
from broker.lookup.vocabulary import load as load_vocabulary
from broker.lookup.vocabulary import normalise_body_part
from broker.security.schemas import Principal

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
DICOM_UID = "urn:dicom:uid"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

MAX_COUNT = 500
DEFAULT_COUNT = 50
# How many studies a bodysite search may look through (the person's studies are few).
_BODYSITE_CAP = 10_000

# FHIR code systems of DICOM coding scheme designators (procedure codes).
_SCHEMES = {
    "C4": "http://www.ama-assn.org/go/cpt",
    "C5": "http://www.ama-assn.org/go/cpt",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "LN": "http://loinc.org",
    "LNC": "http://loinc.org",
    "RADLEX": "http://www.radlex.org",
    "RPID": "http://www.radlex.org",
    "SCT": SCT,
    "DCM": DCM,
}
_LATERALITY = {
    "L": ("7771000", "Left"),
    "R": ("24028007", "Right"),
    "B": ("51440002", "Right and left"),
}

_PATIENT_REF = ("patient", "subject", "subject:Patient")
_PATIENT_IDENT = (
    "patient.identifier",
    "subject.identifier",
    "subject:Patient.identifier",
    "patient:Patient.identifier",
)
_SINGLE = ("identifier", "modality", "bodysite", "_sort", "_count", "_offset", "_format", "_summary")
# A total is always given (fhirpy's count() sends _total); _pretty is FHIR's for every interaction
# and only asks for indentation, which the compact JSON answered does without.
_IGNORED = ("_total", "_totalMethod", "_pretty")
_SUPPORTED = (*_PATIENT_REF, *_PATIENT_IDENT, *_SINGLE, *_IGNORED, "started")
_DATE_RE = re.compile(
    r"^(?P<prefix>eq|ne|gt|lt|ge|le|sa|eb|ap)?(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?:[01]\d|2[0-3]):[0-5]\d(?::(?:[0-5]\d|60)(?:\.\d+)?)?(?:Z|[+-](?:0\d|1[0-3]):[0-5]\d|[+-]14:00)?)?"
    r")?)?$"
)


@dataclass
class SearchAnswer:
    """One page of matches and what the Bundle needs around it."""

    resources: list[dict[str, Any]]
    total: int
    offset: int
    count: int
    params: list[tuple[str, str]]  # the search as understood, for the paging links
    notes: list[str] = field(default_factory=list)  # information for an OperationOutcome entry


# -- parameters ---------------------------------------------------------------------------------------


def _one(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    return fhir_one(params.get(name) or [], name, hint="separate alternatives with commas")


def _int(params: Mapping[str, Sequence[str]], name: str, default: int, high: int | None) -> int:
    raw = _one(params, name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, not {raw[:20]!r}") from None
    if value < 0 or (high is not None and value > high):
        raise BadRequest(f"{name} must be between 0 and {high}" if high else f"{name} must not be negative")
    return value


def _token(raw: str, *, what: str) -> tuple[str | None, str]:
    """(system, code) of a FHIR token: `system|code`, `|code` (no system) or `code` (any system)."""
    if "|" not in raw:
        if not raw.strip():
            raise BadRequest(f"{what} is empty")
        return None, raw.strip()
    system, code = raw.split("|", 1)
    if not code.strip():
        raise BadRequest(f"{what} has no code after the '|'")
    return system.strip(), code.strip()


def _person_ref(raw: str) -> int:
    """A Patient reference (`Patient/123`, `123`, or an absolute URL ending so) as a person id."""
    ref = raw.strip().rstrip("/")
    tail = ref.rsplit("/", 2)
    if len(tail) >= 2 and tail[-2] != "Patient":
        raise BadRequest(f"patient must reference a Patient, not {ref[:60]!r}")
    pid = parse_person_id(tail[-1])
    # None: not an id this server gave out, so it names no one here (an empty answer, not an error).
    return -1 if pid is None else pid


def _patients_from(
    session: Session, params: Mapping[str, Sequence[str]], notes: list[str]
) -> tuple[int, ...] | None:
    """The patient rows the search is about (None: not constrained). Repeated parameters AND,
    commas OR, as FHIR search does."""
    sets: list[set[int]] = []
    for name in _PATIENT_REF:
        for raw in params.get(name) or []:
            refs = [_person_ref(v) for v in raw.split(",") if v.strip()]
            persons = [p for p in refs if p >= 0]
            rows = index.patients_of_persons(session=session, person_ids=persons) if persons else []
            if set(refs) - {p.person_id for p in rows}:
                # Said as for an unknown patient.identifier (docs/fhir.md: an informational entry).
                notes.append(
                    f"no patient records of the reference in {name} are known to the broker "
                    "(no such Patient, or none with studies)"
                )
            sets.append({p.pk for p in rows if p.pk is not None})
    for name in _PATIENT_IDENT:
        for raw in params.get(name) or []:
            pks: set[int] = set()
            for alternative in raw.split(","):
                system, value = _token(alternative, what=name)
                if not system:
                    raise BadRequest(f"{name} must be system|value: a bare identifier has no issuer")
                found, _person, rows = lookup.confirmed_patients(
                    session=session, issuer=issuer_from_system(system), value=value
                )
                if not found:
                    notes.append(f"no patient with the identifier in {name} is known to the broker")
                pks.update(p.pk for p in rows if p.pk is not None)
            sets.append(pks)
    if not sets:
        return None
    return tuple(sorted(set.intersection(*sets)))


def _day_range(match: re.Match[str]) -> tuple[date, date]:
    y, m, d = int(match["y"]), match["m"], match["d"]
    try:
        if d is not None:
            lo = hi = date(y, int(m), int(d))
        elif m is not None:
            lo = date(y, int(m), 1)
            hi = date(y, int(m), calendar.monthrange(y, int(m))[1])
        else:
            lo, hi = date(y, 1, 1), date(y, 12, 31)
    except ValueError:
        raise BadRequest(f"started: {match.string[:40]!r} is not a valid date") from None
    return lo, hi


def _started(values: Sequence[str]) -> tuple[date | None, date | None] | None:
    """The StudyDate range all `started` parameters allow together (each at day precision: a time
    in a value widens it to its whole day, StudyDate being what the index knows); None when no
    date can match (before year 1 or after 9999: Python's dates end there, and so do DICOM's)."""
    low: date | None = None
    high: date | None = None
    for raw in values:
        if "," in raw:
            raise BadRequest("started: alternatives (commas) are not supported; give a range with ge and le")
        m = _DATE_RE.match(raw.strip())
        if not m:
            raise BadRequest(f"started: {raw[:40]!r} is not a FHIR date (e.g. ge2026-01-01)")
        prefix = m["prefix"] or "eq"
        if prefix in ("ne", "ap"):
            raise BadRequest(
                f"started: the prefix {prefix!r} is not supported (eq, lt, le, gt, ge, sa, eb are)"
            )
        lo, hi = _day_range(m)
        strict = "T" not in raw  # a date-time's own day still counts under gt / lt
        if prefix in ("gt", "sa") and strict and hi == date.max:
            return None
        if prefix in ("lt", "eb") and strict and lo == date.min:
            return None
        if prefix == "eq":
            new_lo, new_hi = lo, hi
        elif prefix in ("gt", "sa"):
            new_lo, new_hi = (hi + timedelta(days=1) if strict else lo), None
        elif prefix == "ge":
            new_lo, new_hi = lo, None
        elif prefix in ("lt", "eb"):
            new_lo, new_hi = None, (lo - timedelta(days=1) if strict else hi)
        else:  # le
            new_lo, new_hi = None, hi
        if new_lo is not None:
            low = new_lo if low is None else max(low, new_lo)
        if new_hi is not None:
            high = new_hi if high is None else min(high, new_hi)
    return low, high


def _identifier(raw: str) -> tuple[str, str]:
    """("StudyInstanceUID" | "AccessionNumber", DICOM match value) of an identifier search."""
    uids: list[str] = []
    accessions: list[str] = []
    for alternative in raw.split(","):
        system, value = _token(alternative, what="identifier")
        # A token matches exactly; the index reads * and ? as wildcards (and * alone as universal
        # matching: the whole network), so a value carrying them cannot be passed on.
        if system == DICOM_UID or (system is None and value.startswith("urn:oid:")):
            uid = value.removeprefix("urn:oid:")
            if not is_valid_uid(uid):
                raise BadRequest(f"identifier: {uid[:64]!r} is not a DICOM UID")
            uids.append(uid)
        elif re.search(r"[*?\\]", value):
            raise BadRequest("identifier: an accession number with *, ? or \\ cannot be searched exactly")
        else:
            accessions.append(value)
    if uids and accessions:
        raise BadRequest("identifier: give Study Instance UIDs or accession numbers, not both at once")
    if uids:
        return "StudyInstanceUID", "\\".join(uids)
    if len(accessions) > 1:
        raise BadRequest("identifier: one accession number at a time")
    return "AccessionNumber", accessions[0]


def _modalities(raw: str) -> str | None:
    """ModalitiesInStudy match value; None when every alternative names another code system."""
    codes = []
    for alternative in raw.split(","):
        system, code = _token(alternative, what="modality")
        if system and system != DCM:
            continue  # a code of another system is no DICOM modality: it matches nothing
        if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", code):
            raise BadRequest(f"modality: {code[:20]!r} is not a DICOM modality code (CID 29: CT, MR ...)")
        codes.append(code)
    return "\\".join(codes) if codes else None


def _coded_regions() -> list[tuple[tuple[str, str, str], tuple[str, ...]]]:
    """(code, BodyPartExamined terms) of every region and compound region of the lookup's tree."""
    vocab = load_vocabulary()
    return [(r.code, r.body_part) for r in vocab.regions.values()] + [
        (m.code, m.body_part) for m in vocab.macros.values()
    ]


def _body_parts(raw: str) -> tuple[str, ...]:
    """BodyPartExamined terms for a bodysite token: a SNOMED CT code (any of the regions DICOM
    codes so, PS3.16 Annex L) or, without a system, a BodyPartExamined term itself."""
    terms: set[str] = set()
    for alternative in raw.split(","):
        system, code = _token(alternative, what="bodysite")
        if system not in (None, "", SCT):
            continue
        matched = False
        for (_scheme, value, _meaning), body_parts in _coded_regions():
            if value == code:
                terms.update(body_parts)
                matched = True
        if not matched and system is None and re.fullmatch(r"[A-Za-z][A-Za-z0-9_ ]{0,15}", code):
            terms.add(normalise_body_part(code))
    return tuple(sorted(terms))


def _check_names(params: Mapping[str, Sequence[str]], *, lenient: bool, notes: list[str]) -> None:
    unknown = fhir_unsupported(params, supported=_SUPPORTED, lenient=lenient)
    if unknown:
        notes.append(f"ignored unsupported search parameter(s): {', '.join(n[:40] for n in unknown[:10])}")


# -- the search ---------------------------------------------------------------------------------------


def search_imaging_studies(
    *,
    session: Session,
    params: Mapping[str, Sequence[str]],
    base_url: str,
    lenient: bool = False,
    principal: Principal | None = None,
) -> SearchAnswer:
    """FHIR ImagingStudy search over the index. BadRequest (an OperationOutcome at the route)
    for a parameter that is malformed, unsupported (unless lenient) or missing its patient."""
    notes: list[str] = []
    _check_names(params, lenient=lenient, notes=notes)
    _one(params, "_format")  # which format: negotiated by the routes (406 for any but JSON)
    summary = _one(params, "_summary")
    if summary not in (None, "count", "false"):
        raise BadRequest("_summary: only count (or false) is supported")
    count = 0 if summary == "count" else _int(params, "_count", DEFAULT_COUNT, MAX_COUNT)
    offset = _int(params, "_offset", 0, None)
    sort = _one(params, "_sort") or "-started"
    if sort not in ("started", "-started"):
        raise BadRequest("_sort: only started and -started are supported")

    filters: dict[str, str] = {}
    identifier = _one(params, "identifier")
    if identifier is not None:
        key, value = _identifier(identifier)
        filters[key] = value
    patient_pks = _patients_from(session, params, notes)
    if patient_pks is None and identifier is None:
        raise BadRequest(
            "an ImagingStudy search needs its patient (patient=Patient/id, or "
            "patient.identifier=system|value) or a study identifier"
        )
    empty = False
    started = _started(params.get("started") or [])
    low, high = started if started is not None else (None, None)
    if started is None or (low is not None and high is not None and low > high):
        empty = True
    elif low is not None or high is not None:
        # isoformat, not strftime: %Y does not pad years before 1000 on every platform.
        filters["StudyDate"] = "-".join(d.isoformat().replace("-", "") if d else "" for d in (low, high))
    modality = _one(params, "modality")
    if modality is not None:
        mods = _modalities(modality)
        if mods is None:
            empty = True
        else:
            filters["ModalitiesInStudy"] = mods
    body_parts: tuple[str, ...] | None = None
    bodysite = _one(params, "bodysite")
    if bodysite is not None:
        body_parts = _body_parts(bodysite)
        empty = empty or not body_parts

    understood = [(k, v) for k, values in params.items() if k in _SUPPORTED for v in values]
    understood = [(k, v) for k, v in understood if k not in ("_offset", "_count", *_IGNORED)]
    if empty or patient_pks == ():
        return SearchAnswer(resources=[], total=0, offset=offset, count=count, params=understood, notes=notes)

    query = index.Query(
        level="study",
        filters=filters,
        includefields="all",
        limit=count,
        offset=offset,
        patient_pks=patient_pks,
        body_parts=body_parts,
        order="-date" if sort == "-started" else "date",
    )
    if principal is not None:
        # Only the studies the caller may see (consent, purpose of use), counted as such.
        query.visible = consent.visibility(principal=principal)
    total = index.count(session=session, query=query)
    resources: list[dict[str, Any]] = []
    if count and offset < total:
        studies = index.search(session=session, query=query).matches
        resources = _resources(session, studies, base_url)
    return SearchAnswer(
        resources=resources, total=total, offset=offset, count=count, params=understood, notes=notes
    )


def read_imaging_study(
    *, session: Session, study_uid: str, base_url: str, principal: Principal | None = None
) -> dict[str, Any] | None:
    """One ImagingStudy by its id (the Study Instance UID); None when the index has no such study
    or the caller may not see it (the same answer: a denial does not reveal that it exists)."""
    if not re.fullmatch(r"[0-9.]{1,64}", study_uid):
        return None
    query = index.Query(level="study", study_uid=study_uid, includefields="all", limit=1)
    if principal is not None:
        query.visible = consent.visibility(principal=principal)
    studies = index.search(session=session, query=query).matches
    return _resources(session, studies, base_url)[0] if studies else None


def bundle(answer: SearchAnswer, *, search_url: str) -> dict[str, Any]:
    """The searchset Bundle of one page, with self / first / previous / next links. The self link
    is the search as processed, not as asked: FHIR search has the client read it to learn which
    parameters were applied (an unknown one ignored under Prefer: handling=lenient is not)."""
    base = search_url

    def page(offset: int) -> str:
        return f"{base}?" + urlencode(
            [*answer.params, ("_count", str(answer.count)), ("_offset", str(offset))]
        )

    links = [{"relation": "self", "url": page(answer.offset)}]
    if answer.count:
        links.append({"relation": "first", "url": page(0)})
        if answer.offset > 0:
            links.append({"relation": "previous", "url": page(max(0, answer.offset - answer.count))})
        if answer.offset + answer.count < answer.total:
            links.append({"relation": "next", "url": page(answer.offset + answer.count)})
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/{r['id']}",
            "resource": r,
            "search": {"mode": "match"},
        }
        for r in answer.resources
    ]
    if answer.notes:
        entries.append(
            {
                "resource": {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {"severity": "information", "code": "informational", "diagnostics": n}
                        for n in answer.notes
                    ],
                },
                "search": {"mode": "outcome"},
            }
        )
    out: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": answer.total,
        "link": links,
    }
    if entries:  # FHIR JSON has no empty arrays
        out["entry"] = entries
    return out


# -- DICOM JSON to ImagingStudy -------------------------------------------------------------------------


def _v(attrs: Mapping[str, Any], tag: str) -> Any:
    values = (attrs.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _fhir_date(dicom_date: Any) -> str | None:
    d = str(dicom_date or "")
    if len(d) >= 8 and d[:8].isdigit():
        try:
            date(int(d[:4]), int(d[4:6]), int(d[6:8]))
        except ValueError:
            return None
        return f"{d[:4]}-{d[4:6]}-{d[6:8]}"
    return None


def _count(attrs: Mapping[str, Any], tag: str) -> int | None:
    try:
        n = int(_v(attrs, tag))
    except (TypeError, ValueError):
        return None
    return n if n >= 0 else None


def _coding(item: Mapping[str, Any]) -> dict[str, Any] | None:
    code = _v(item, "00080100")
    if not code:
        return None
    out: dict[str, Any] = {"code": str(code)}
    scheme = str(_v(item, "00080102") or "").upper()
    if scheme in _SCHEMES:
        out["system"] = _SCHEMES[scheme]
    meaning = _v(item, "00080104")
    if meaning:
        out["display"] = str(meaning)
    return out


def _body_site(term: str) -> dict[str, Any] | None:
    """The SNOMED CT Coding of a BodyPartExamined term (PS3.16 Annex L), from the lookup's regions."""
    term = normalise_body_part(term)
    if not term:
        return None
    for (scheme, value, meaning), body_parts in _coded_regions():
        if term in body_parts and scheme == "SCT":
            return {"system": SCT, "code": value, "display": meaning}
    return None


def _series(s: Mapping[str, Any]) -> dict[str, Any] | None:
    uid = _v(s, "0020000E")
    modality = _v(s, "00080060")
    if not uid or not modality:
        return None
    out: dict[str, Any] = {"uid": str(uid)}
    number = _count(s, "00200011")
    if number is not None:
        out["number"] = number
    out["modality"] = {"system": DCM, "code": str(modality)}
    desc = _v(s, "0008103E")
    if desc:
        out["description"] = str(desc)
    n = _count(s, "00201209")
    if n is not None:
        out["numberOfInstances"] = n
    site = _body_site(str(_v(s, "00180015") or ""))
    if site:
        out["bodySite"] = site
    lat = _LATERALITY.get(str(_v(s, "00200060") or "").strip().upper())
    if lat:
        out["laterality"] = {"system": SCT, "code": lat[0], "display": lat[1]}
    started = _fhir_date(_v(s, "00080021") or _v(s, "00400244"))
    if started:
        out["started"] = started
    return out


def _resources(session: Session, studies: list[dict[str, Any]], base_url: str) -> list[dict[str, Any]]:
    uids = [str(_v(s, "0020000D")) for s in studies]
    owners = index.study_owners(session=session, study_uids=uids)
    series_of: dict[str, list[dict[str, Any]]] = {u: [] for u in uids}
    if uids:
        found = index.search(
            session=session,
            query=index.Query(
                level="series",
                filters={"StudyInstanceUID": "\\".join(uids)},
                includefields="all",
                limit=100_000,
            ),
        )
        for s in found.matches:
            series_of.setdefault(str(_v(s, "0020000D")), []).append(s)
    names = {f.id: f.name or f.id for f in facilities.list_facilities(session=session)}
    persons: dict[tuple[str, str], int | None] = {}
    for o in owners.values():
        if o.person_id is None and (o.issuer, o.patient_id) not in persons:
            persons[(o.issuer, o.patient_id)] = identity.person_of(
                session=session, identifier=identity.Identifier(issuer=o.issuer, value=o.patient_id)
            )
    endpoint = {
        "resourceType": "Endpoint",
        "id": "dicomweb",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom", "application/dicom+json"],
        "address": f"{base_url}/dicom-web",
    }
    out = []
    for attrs, uid in zip(studies, uids, strict=True):
        owner = owners.get(uid)
        res: dict[str, Any] = {
            "resourceType": "ImagingStudy",
            "id": uid,
            "contained": [endpoint],
            "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{uid}"}],
            "status": "available",
        }
        accession = _v(attrs, "00080050")
        if accession:
            acsn: dict[str, Any] = {
                "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                "value": str(accession),
            }
            if owner is not None:
                acsn["assigner"] = {"display": names.get(owner.facility_id, owner.facility_id)}
            res["identifier"].append(acsn)
        mods = [str(m) for m in (attrs.get("00080061") or {}).get("Value") or []]
        if mods:
            res["modality"] = [{"system": DCM, "code": m} for m in mods]
        subject: dict[str, Any] = {"type": "Patient"}
        if owner is not None:
            person = owner.person_id
            if person is None:
                person = persons.get((owner.issuer, owner.patient_id))
            if person is not None:
                subject["reference"] = f"Patient/{person}"
            subject["identifier"] = {"system": system_for_issuer(owner.issuer), "value": owner.patient_id}
        res["subject"] = subject
        started = _fhir_date(_v(attrs, "00080020"))
        if started:
            res["started"] = started
        res["endpoint"] = [{"reference": "#dicomweb"}]
        n_series, n_inst = _count(attrs, "00201206"), _count(attrs, "00201208")
        if n_series is not None:
            res["numberOfSeries"] = n_series
        if n_inst is not None:
            res["numberOfInstances"] = n_inst
        codes = [c for item in (attrs.get("00081032") or {}).get("Value") or [] if (c := _coding(item))]
        if codes:
            res["procedureCode"] = [{"coding": [c]} for c in codes]
        desc = _v(attrs, "00081030")
        if desc:
            res["description"] = str(desc)
        series = [x for s in series_of.get(uid, []) if (x := _series(s))]
        if series:
            res["series"] = sorted(series, key=lambda x: (x.get("number") is None, x.get("number", 0)))
        out.append(res)
    return out


# -- what the server supports -------------------------------------------------------------------------------

_IMAGING_PARAMS = [
    ("patient", "reference", "The person (Patient/id): their studies at every facility"),
    ("subject", "reference", "Same as patient"),
    ("identifier", "token", "Study Instance UID (urn:dicom:uid|urn:oid:...) or accession number"),
    ("started", "date", "StudyDate; eq, lt, le, gt, ge, sa, eb; repeat for a range"),
    ("modality", "token", "DICOM modality (DCM)"),
    ("bodysite", "token", "SNOMED CT body region, or a BodyPartExamined term"),
]


def capability_statement(*, base_url: str) -> dict[str, Any]:
    """The CapabilityStatement of `/fhir` (GET /fhir/metadata): what FHIR clients may ask."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-12-05",
        "kind": "instance",
        "software": {"name": "ScanOnce"},
        "implementation": {
            "description": "ScanOnce inter-facility imaging broker",
            "url": f"{base_url}/fhir",
        },
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": "ImagingStudy",
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "searchParam": [
                            {"name": name, "type": kind, "documentation": doc}
                            for name, kind, doc in _IMAGING_PARAMS
                        ],
                    },
                    {
                        "type": "Patient",
                        "interaction": [
                            {"code": "read"},
                            {"code": "search-type"},
                            {"code": "create"},
                            {"code": "update"},
                        ],
                        "searchParam": [
                            {"name": "identifier", "type": "token"},
                            {"name": "family", "type": "string"},
                            {"name": "given", "type": "string"},
                            {"name": "birthdate", "type": "date"},
                        ],
                        "operation": [
                            {
                                "name": "ihe-pix",
                                "definition": "https://profiles.ihe.net/ITI/PIXm/OperationDefinition/IHE.PIXm.pix",
                            }
                        ],
                    },
                    {
                        # The audit trail (broker.audit.routes), for auditors: IHE BALP's query.
                        "type": "AuditEvent",
                        "interaction": [{"code": "search-type"}],
                        "searchParam": [
                            {"name": "patient", "type": "token"},
                            {"name": "agent", "type": "token"},
                            {"name": "date", "type": "date"},
                            {"name": "action", "type": "token"},
                            {"name": "subtype", "type": "token"},
                            {"name": "purpose", "type": "token"},
                            {"name": "entity-id", "type": "token"},
                        ],
                    },
                    {
                        "type": "Consent",
                        "interaction": [{"code": "create"}, {"code": "search-type"}],
                        "searchParam": [
                            {
                                "name": "patient",
                                "type": "reference",
                                "documentation": "The person (Patient/id): their sharing choices",
                            }
                        ],
                    },
                ],
            }
        ],
    }


def other_names(
    *,
    session: Session,
    views: Sequence[identity.PersonView],
    keep: Callable[[Collection[int]], set[int]] | None = None,
) -> dict[int, OtherNames]:
    """Per person, its names besides the MPI's that a Patient shows (`OtherNames`), from the
    records the caller may see (`keep`, and the views' identifiers). The MPI keeps a person's
    name from the Alphabetic group alone.

    The groups: those of the PatientName of the most recently updated index patient row that
    has either. The fed names: a feed's (FHIR IDE/SYL, HL7 I/P) that no header of the person
    names (any visible patient row's groups, normalised as stored), so a name a feed and a
    header both gave is shown once, as the header wrote it."""
    visible = {(i.issuer, i.value) for v in views for i in v.identifiers}
    patients = index.patients_of_persons(session=session, person_ids=[v.person_id for v in views])
    groups: dict[int, tuple[str, str]] = {}
    named: dict[int, set[tuple[str, str]]] = {}
    for patient in sorted(patients, key=lambda p: p.updated_at, reverse=True):
        if patient.person_id is None or (patient.issuer, patient.patient_id) not in visible:
            continue
        _alphabetic, ideographic, phonetic = pn_groups(patient.patient_name)
        if ideographic or phonetic:
            groups.setdefault(patient.person_id, (ideographic, phonetic))
            header = named.setdefault(patient.person_id, set())
            header.update((n.family, n.given) for n in identity.matching.other_names(patient.patient_name))
    fed = identity.fed_other_names(session=session, person_ids=[v.person_id for v in views], keep=keep)
    out: dict[int, OtherNames] = {}
    for person_id in groups.keys() | fed.keys():
        header = named.get(person_id, set())
        only_fed = tuple(n for n in fed.get(person_id, []) if (n.family, n.given) not in header)
        out[person_id] = OtherNames(groups=groups.get(person_id, ("", "")), fed=only_fed)
    return out


def patient_resources(
    *,
    session: Session,
    views: Sequence[identity.PersonView],
    keep: Callable[[Collection[int]], set[int]] | None = None,
) -> list[dict[str, Any]]:
    """The persons as Patient resources, each with its other names (`other_names`) from the
    records `keep` lets the caller see. The one builder of a stored Patient: the read, the
    search and the answer to a create or update all give this, so that a client that reads
    the resource back from any of them, or sends it back as an update, sees the same."""
    names = other_names(session=session, views=views, keep=keep)
    return [patient_resource(v, other_names=names.get(v.person_id, OtherNames())) for v in views]


def read_patient(*, session: Session, person_id: int, principal: Principal) -> dict[str, Any]:
    """A person as a Patient, from the records `principal` may see (consent, purpose of use).
    NotFound when it has none the caller may see, as for an unknown person."""
    keep = consent.record_filter(session=session, principal=principal)
    view = identity.person_view(session=session, person_id=person_id, keep=keep)
    (resource,) = patient_resources(session=session, views=[view], keep=keep)
    return resource
