"""FHIR R4 shapes and their mapping to identity's: issuers as identifier systems, `system|value`
tokens, a person as a Patient resource, and a posted Patient as identifiers and demographics
(validated with fhir.resources; BadRequest when it is not a valid Patient).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from broker.errors import BadRequest
from broker.identity import matching
from broker.identity.schemas import Identifier, PersonView, issuer_from_system, system_for_issuer


def parse_token(token: str, *, what: str) -> Identifier:
    """FHIR token `system|value`; a bare value has no issuer and is refused."""
    if "|" not in token:
        raise BadRequest(f"{what} must be system|value: a bare identifier has no issuer")
    system, value = token.split("|", 1)
    if not system.strip():
        raise BadRequest(f"{what} has no system (issuer)")
    if not value.strip():
        raise BadRequest(f"{what} has no value")
    return Identifier(issuer=issuer_from_system(system.strip()), value=value.strip())


_PERSON_ID = re.compile(r"[0-9]{1,18}")


def parse_person_id(text: str) -> int | None:
    """The person id a Patient's logical id names; None when it is no id this server gave out.
    ASCII digits only, and few enough for the database's integer: str.isdigit() also passes
    superscripts (int() refuses them) and other scripts' digits (int() reads them)."""
    return int(text) if _PERSON_ID.fullmatch(text) else None


def _date_fhir(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else ""


# ISO 21090 name representation (FHIR core extension): which writing system a HumanName is in.
EN_REPRESENTATION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"


def _representation(code: str) -> list[dict[str, str]]:
    return [{"url": EN_REPRESENTATION, "valueCode": code}]


def _group_name(group: str, code: str) -> dict[str, Any] | None:
    """One PN component group (family^given^middle^prefix^suffix) as a HumanName in `code`'s
    representation (IDE ideographic, SYL syllabic), as the record wrote it."""
    family, given, middle, prefix, suffix = (group.split("^") + [""] * 5)[:5]
    name: dict[str, Any] = {"extension": _representation(code), "use": "official"}
    givens = [g for g in (given, middle) if g]
    for key, value in (("family", family), ("given", givens), ("prefix", [prefix] if prefix else [])):
        if value:
            name[key] = value
    if suffix:
        name["suffix"] = [suffix]
    if len(name) == 2:
        return None
    name["text"] = " ".join(x for x in (prefix, family, *givens, suffix) if x)
    return name


@dataclass(frozen=True, slots=True)
class OtherNames:
    """A person's names besides the MPI's, as a Patient shows them."""

    # The Ideographic and Phonetic groups of the PatientName one of its records has in the
    # index (山田^太郎, やまだ^たろう), as written; "" where there is none.
    groups: tuple[str, str] = ("", "")
    # The ideographic and phonetic names a feed gave its records (FHIR IDE/SYL, HL7 XPN.8 I/P),
    # normalised as stored, that no header of the person names.
    fed: tuple[matching.OtherName, ...] = ()


def patient_resource(view: PersonView, *, other_names: OtherNames = OtherNames()) -> dict[str, Any]:
    """A person as a FHIR Patient (id: the person id; identifiers: every record's).

    `name`: the MPI's name of the person (normalised, from a PatientName's Alphabetic group);
    and one more HumanName for each of `other_names`, the groups then the fed names, each
    marked with its ISO 21090 representation (IDE, SYL; the first then ABC) as the feed takes
    them back."""
    res: dict[str, Any] = {
        "resourceType": "Patient",
        "id": str(view.person_id),
        "identifier": [{"system": system_for_issuer(i.issuer), "value": i.value} for i in view.identifiers],
        "active": True,
    }
    names: list[dict[str, Any]] = []
    if view.family or view.given:
        name: dict[str, Any] = {"use": "official"}
        if view.family:
            name["family"] = view.family
        given = [g for g in (view.given, view.middle) if g]
        if given:
            name["given"] = given
        names.append(name)
    groups = zip(other_names.groups, (matching.IDEOGRAPHIC, matching.PHONETIC), strict=True)
    others = [n for g, code in groups if (n := _group_name(g, code))]
    others += [n for f in other_names.fed if (n := _group_name(f"{f.family}^{f.given}", f.representation))]
    if others and names:
        names[0] = {"extension": _representation("ABC"), **names[0]}
    names += others
    if names:
        res["name"] = names
    if view.sex:
        res["gender"] = {"M": "male", "F": "female", "O": "other"}[view.sex]
    if len(view.birth_date) == 8 and matching.normalize_date(view.birth_date):
        res["birthDate"] = _date_fhir(view.birth_date)
    if view.address:
        res["address"] = [{"text": view.address}]
    if view.phone:
        res["telecom"] = [{"system": "phone", "value": view.phone}]
    return res


# Representations whose names are the record's other names (searched, never compared).
_OTHER_REPRESENTATIONS = (matching.IDEOGRAPHIC, matching.PHONETIC)


def _name_representation(name: Any) -> str:
    """A HumanName's ISO 21090 representation code ("" when it has none)."""
    for ext in name.extension or []:
        if ext.url == EN_REPRESENTATION:
            return str(ext.valueCode or "")
    return ""


def _other_names(names: list[Any]) -> tuple[matching.OtherName, ...] | None:
    """The IDE and SYL names, normalised as `matching.other_names` does for a PatientName's
    groups, each with its representation; None when there are none, so that what is stored is
    kept (a feed that never sends them must not erase a DICOM header's). One without family and
    given is ignored."""
    out: list[matching.OtherName] = []
    for name in names:
        representation = _name_representation(name)
        if representation not in _OTHER_REPRESENTATIONS:
            continue
        family = matching.normalize_name_part(str(name.family or ""))
        given = matching.normalize_name_part(str(name.given[0]) if name.given else "")
        matching.add_other_name(out, matching.OtherName(family, given, representation))
    return tuple(out) or None


def parse_patient(
    raw: bytes, *, url_id: str | None = None
) -> tuple[Identifier, list[Identifier], matching.Demographics, tuple[matching.OtherName, ...] | None]:
    """Validate a FHIR R4 Patient and extract identifiers, demographics and other names
    (BadRequest if not). `url_id`: the id an update's URL names; a body with another id is
    refused (FHIR update), one without an id is taken as the URL's.

    The record's name is the first current name without an ISO 21090 representation or with
    ABC (as `patient_resource` writes it); the names marked IDE or SYL are its other names, None
    when it has none. A name in another representation is neither."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("resourceType") != "Patient":
        raise BadRequest("body must be a FHIR Patient resource")
    if url_id is not None and body.get("id") not in (None, url_id):
        raise BadRequest("the resource's id is not the id in the URL")
    # Imported on first use: fhir.resources' models take a noticeable share of start-up.
    from fhir.resources.patient import Patient as FhirPatient

    try:
        patient = FhirPatient.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise BadRequest(f"invalid Patient at {where or 'root'}: {first.get('msg', 'invalid')}") from None
    idents: list[Identifier] = []
    for ident in patient.identifier or []:
        if not ident.system:
            raise BadRequest("every Patient.identifier needs a system (issuer); bare identifiers are refused")
        if not ident.value:
            raise BadRequest("every Patient.identifier needs a value")
        idents.append(Identifier(issuer=issuer_from_system(str(ident.system)), value=str(ident.value)))
    if not idents:
        raise BadRequest("a Patient needs at least one identifier with a system")
    current = [n for n in (patient.name or []) if n.use in (None, "official", "usual")]
    name = next((n for n in current if _name_representation(n) in ("", "ABC")), None)
    if name is None:
        # As a PatientName with an empty Alphabetic group is read from its other groups.
        name = next((n for n in current if _name_representation(n) in _OTHER_REPRESENTATIONS), None)
    family = str(name.family) if name and name.family else ""
    givens = [str(g) for g in (name.given or [])] if name else []
    birth = ""
    if patient.birthDate is not None:
        birth = str(patient.birthDate).replace("-", "")
        if len(birth) == 8 and not matching.normalize_date(birth):
            raise BadRequest("birthDate is in the future or before 1850")
        if len(birth) != 8:
            birth = ""  # a partial date (year only) says too little to match on
    address = ""
    if patient.address:
        a = patient.address[0]
        address = " ".join(
            str(x) for x in [*(a.line or []), a.city, a.district, a.state, a.postalCode, a.text] if x
        )
    phone = next((str(t.value) for t in (patient.telecom or []) if t.system == "phone" and t.value), "")
    demo = matching.demographics(
        family=family,
        given=givens[0] if givens else "",
        middle=" ".join(givens[1:]),
        birth_date=birth,
        sex=str(patient.gender or "")[:1] if patient.gender in ("male", "female", "other") else "",
        address=address,
        phone=phone,
    )
    return idents[0], idents[1:], demo, _other_names(current)


# ---------------------------------------------------------------- Consent (R4)

CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
LOINC = "http://loinc.org"
_MAX_CONSENT_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ConsentRequest:
    """A posted FHIR Consent as the consent domain needs it."""

    person_id: int
    decision: str  # deny | permit
    organization: str | None  # the facility where the choice was made
    scope: str | None  # the facility whose records it covers (provision.actor, role CST)


def _ref_id(reference: str | None, kind: str) -> str | None:
    if not reference:
        return None
    parts = reference.strip().rstrip("/").split("/")
    if len(parts) < 2 or parts[-2] != kind or not parts[-1]:
        raise BadRequest(f"expected a reference to {kind}, got {reference[:60]!r}")
    return parts[-1]


def parse_consent(raw: bytes) -> ConsentRequest:
    """A FHIR R4 Consent (validated with fhir.resources' R4B model, whose Consent is R4's): the
    patient (a Patient this server gave out), provision.type deny (opt-out) or permit (opt-in), the
    organization where it was given, and optionally provision.actor (role CST, custodian) naming
    the one facility whose records it covers. BadRequest otherwise; nothing is stored."""
    if len(raw) > _MAX_CONSENT_BYTES:
        raise BadRequest("resource too large")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("body is not JSON") from None
    if not isinstance(data, dict) or data.get("resourceType") != "Consent":
        raise BadRequest("expected a Consent resource")
    from fhir.resources.R4B.consent import Consent as FhirConsent

    try:
        res = FhirConsent.model_validate(data)
    except (ValidationError, ValueError) as exc:
        raise BadRequest(f"not a valid Consent: {str(exc).splitlines()[0][:200]}") from None
    if res.status != "active":
        raise BadRequest(
            "only an active Consent can be recorded (withdraw one with DELETE /api/consent/{id})"
        )
    ref = _ref_id(res.patient.reference if res.patient else None, "Patient")
    person = parse_person_id(ref) if ref is not None else None
    if person is None:
        raise BadRequest("Consent.patient must reference a Patient of this server (Patient/<id>)")
    provision = res.provision
    decision = provision.type if provision is not None else None
    if decision not in ("deny", "permit"):
        raise BadRequest("Consent.provision.type must be deny (opt-out) or permit (opt-in)")
    organization = None
    if res.organization:
        organization = _ref_id(res.organization[0].reference, "Organization")
    scope = None
    for actor in (provision.actor if provision is not None else None) or []:
        codes = {(c.system, c.code) for c in (actor.role.coding or [])} if actor.role else set()
        if (PARTICIPATION, "CST") in codes:
            scope = _ref_id(actor.reference.reference, "Organization")
    return ConsentRequest(person_id=person, decision=decision, organization=organization, scope=scope)


def consent_resource(
    *, consent_id: int, person_id: int | None, decision: str, organization: str, scope: str, recorded_at: str
) -> dict[str, Any]:
    """A recorded choice as a minimal valid FHIR R4 Consent."""
    provision: dict[str, Any] = {"type": decision}
    if scope:
        provision["actor"] = [
            {
                "role": {"coding": [{"system": PARTICIPATION, "code": "CST", "display": "custodian"}]},
                "reference": {"reference": f"Organization/{scope}"},
            }
        ]
    res: dict[str, Any] = {
        "resourceType": "Consent",
        "id": str(consent_id),
        "status": "active",
        "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": LOINC, "code": "59284-0", "display": "Patient Consent"}]}],
        "dateTime": recorded_at,
        "organization": [{"reference": f"Organization/{organization}"}],
        "policyRule": {"coding": [{"system": ACT_CODE, "code": "OPTOUT" if decision == "deny" else "OPTIN"}]},
        "provision": provision,
    }
    if person_id is not None:
        res["patient"] = {"reference": f"Patient/{person_id}"}
    return res
