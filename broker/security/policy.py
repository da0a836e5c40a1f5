"""The authorization policy: ONE table that says, for every HTTP method and path, which
permission a caller needs, and which roles hold which permissions. The guard middleware
(broker.security.http) asks `decide` for every request; no route decides for itself.

A path that no rule names is admin-only, so a new route is closed until it is classified here.
Facility scope: a rule whose path has a `{facility}` segment (the per-facility DICOMweb partitions)
lets a facility node act only on its own facility there.

DIMSE asks the same questions: `DIMSE_RULES` names the permission of each DIMSE operation, and
`decide_dimse` answers through the same `permits` as `decide` (a C-STORE is a write into the
calling facility's partition, as a STOW-RS to `/facilities/{facility}/dicom-web/studies` is).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from broker.security.schemas import Principal, Role


class Permission(StrEnum):
    public = "public"  # no token needed (what the standards require open)
    authenticated = "authenticated"  # any signed-in caller (the pages' shell, assets)
    images_read = "images.read"  # DICOMweb QIDO/WADO, FHIR ImagingStudy, the viewer's data
    images_write = "images.write"  # STOW-RS
    patients_read = "patients.read"  # FHIR Patient, PIX
    patients_write = "patients.write"  # FHIR Patient create/update (ADT-like feeds)
    lookup_read = "lookup.read"  # the prior lookup and its page
    lookup_write = "lookup.write"  # "scan avoided" reports
    cds = "cds"  # CDS Hooks service calls (the EHR)
    identity_review = "identity.review"  # the review queue, links, explanations
    facilities_read = "facilities.read"
    jobs_read = "jobs.read"
    metrics_read = "metrics.read"
    imports_write = "imports.write"
    audit_read = "audit.read"
    consent_read = "consent.read"  # a patient's sharing choices (API and FHIR Consent)
    consent_write = "consent.write"  # recording and withdrawing them (at the caller's facility)
    break_glass = "break-glass"  # asking for an emergency read
    break_glass_review = "break-glass.review"  # listing and reviewing emergency reads
    admin = "admin"


_READ = {"GET", "HEAD"}
_WRITE = {"POST", "PUT", "PATCH", "DELETE"}
_ANY = _READ | _WRITE

# Which permissions each role holds (admin holds all).
ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.clinician: frozenset(
        {
            Permission.authenticated,
            Permission.images_read,
            Permission.patients_read,
            Permission.lookup_read,
            Permission.lookup_write,
            Permission.cds,
            Permission.facilities_read,
            Permission.consent_read,
            Permission.consent_write,
            Permission.break_glass,
        }
    ),
    Role.radiologist: frozenset(
        {
            Permission.authenticated,
            Permission.break_glass,
            Permission.imports_write,  # bringing an outside study into the local PACS (IRWF.b)
            Permission.images_read,
            Permission.patients_read,
            Permission.lookup_read,
            Permission.lookup_write,
            Permission.cds,
            Permission.facilities_read,
        }
    ),
    Role.facility: frozenset(
        {
            Permission.authenticated,
            Permission.images_read,
            Permission.images_write,
            Permission.patients_write,
            # A facility's registration system feeds its patients' choices, as it feeds patients.
            Permission.consent_read,
            Permission.consent_write,
        }
    ),
    Role.reviewer: frozenset(
        {
            Permission.authenticated,
            Permission.identity_review,
            Permission.patients_read,
            Permission.facilities_read,
            Permission.jobs_read,
            Permission.break_glass_review,
        }
    ),
    Role.auditor: frozenset(
        {Permission.authenticated, Permission.audit_read, Permission.metrics_read, Permission.facilities_read}
    ),
    Role.admin: frozenset(Permission),
}


@dataclass(frozen=True, slots=True)
class Rule:
    methods: frozenset[str]
    # Segments: `*` one, `{facility}` one (scoped), `**` the rest, none or more (`/x/**` covers `/x`).
    template: str
    permission: Permission

    def match(self, method: str, segments: list[str]) -> tuple[bool, str | None]:
        if method not in self.methods:
            return False, None
        parts = self.template.strip("/").split("/") if self.template != "/" else []
        facility = None
        for i, part in enumerate(parts):
            if part == "**":
                return True, facility
            if i >= len(segments):
                return False, None
            if part == "{facility}":
                facility = segments[i]
            elif part != "*" and part != segments[i]:
                return False, None
        return len(parts) == len(segments), facility


def _r(methods: set[str], template: str, permission: Permission) -> Rule:
    return Rule(frozenset(methods), template, permission)


P = Permission
# First match wins: specific rules before general ones.
RULES: tuple[Rule, ...] = (
    # Open, as the standards require (and what a page needs to sign in).
    _r(_READ, "/healthz", P.public),
    _r(_READ, "/readyz", P.public),
    _r(_READ, "/cds-services", P.public),
    _r(_READ, "/fhir/metadata", P.public),
    _r(_READ, "/.well-known/**", P.public),
    _r(_READ, "/auth/**", P.public),
    _r({"POST"}, "/auth/**", P.public),
    _r(_READ, "/static/**", P.public),
    # SMART App Launch: the EHR opens it before there is a session (it makes one).
    _r(_READ, "/launch", P.public),
    _r(_READ, "/launch/callback", P.public),
    # DICOMweb: the broker-wide service and each facility's partition.
    _r(_READ, "/dicom-web/**", P.images_read),
    _r({"POST"}, "/dicom-web/studies", P.images_write),
    _r({"POST"}, "/dicom-web/studies/*", P.images_write),
    _r(_READ, "/facilities/{facility}/dicom-web/**", P.images_read),
    _r({"POST"}, "/facilities/{facility}/dicom-web/studies", P.images_write),
    _r({"POST"}, "/facilities/{facility}/dicom-web/studies/*", P.images_write),
    # FHIR.
    _r(_READ, "/fhir/ImagingStudy/**", P.images_read),
    _r(_READ, "/fhir/Patient/**", P.patients_read),
    _r({"POST", "PUT"}, "/fhir/Patient/**", P.patients_write),
    _r(_READ, "/fhir/Consent", P.consent_read),
    _r({"POST"}, "/fhir/Consent", P.consent_write),
    _r(_READ, "/fhir/AuditEvent/**", P.audit_read),
    # CDS Hooks service calls.
    _r({"POST"}, "/cds-services/**", P.cds),
    # The prior lookup.
    _r(_READ, "/api/priors/**", P.lookup_read),
    _r({"POST"}, "/api/priors/avoided", P.lookup_write),
    _r(_READ, "/api/metrics/avoided", P.lookup_read),
    # Consent and break-the-glass.
    _r(_READ, "/api/consent", P.consent_read),
    _r({"POST"}, "/api/consent", P.consent_write),
    _r({"DELETE"}, "/api/consent/*", P.consent_write),
    _r({"POST"}, "/api/break-glass", P.break_glass),
    _r(_READ, "/api/break-glass", P.break_glass_review),
    _r({"POST"}, "/api/break-glass/*/reviewed", P.break_glass_review),
    # Identity review.
    _r(_READ, "/api/identity/review", P.identity_review),
    _r({"POST"}, "/api/identity/review/*", P.identity_review),
    _r({"POST"}, "/api/identity/link", P.identity_review),
    _r({"POST"}, "/api/identity/unlink", P.identity_review),
    _r(_READ, "/api/identity/records/**", P.identity_review),
    # Facilities: reading the registry; changing it is admin (unlisted).
    _r(_READ, "/api/facilities", P.facilities_read),
    _r(_READ, "/api/facilities/*", P.facilities_read),
    # Operations.
    _r(_READ, "/api/jobs/**", P.jobs_read),
    _r(_READ, "/metrics", P.metrics_read),
    _r(_READ, "/api/verify/**", P.admin),
    _r({"POST"}, "/api/verify", P.admin),
    _r(_READ, "/api/audit/**", P.audit_read),
    _r({"POST"}, "/api/imports/**", P.imports_write),
    _r(_READ, "/api/imports/**", P.imports_write),
    # What a destination's imports get (StudyID, institution): configuring it is the admin's.
    _r({"PUT"}, "/api/imports/destinations/*", P.admin),
    # The pages and their assets.
    _r(_READ, "/", P.lookup_read),
    _r(_READ, "/record", P.lookup_read),
    _r({"POST"}, "/avoided", P.lookup_write),
    _r(_READ, "/viewer/**", P.images_read),
    _r(_READ, "/imports", P.imports_write),
    _r(_READ, "/compare", P.lookup_read),  # today's local study beside an outside prior, in the viewer
    _r({"POST"}, "/imports", P.imports_write),
    _r(_READ, "/admin/review", P.identity_review),
    _r({"POST"}, "/admin/review/*", P.identity_review),
    _r(_READ, "/admin/jobs", P.jobs_read),
    _r(_READ, "/admin/facilities", P.facilities_read),
    _r(_READ, "/api", P.authenticated),
    _r(_READ, "/docs/**", P.authenticated),
    _r(_READ, "/openapi.json", P.authenticated),
)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    permission: Permission
    reason: str = ""


# The DIMSE operations the SCP serves and what each needs. C-STORE writes into a facility's
# partition (scoped); queries and retrieves read the federation-wide index, as QIDO-RS/WADO-RS do.
DIMSE_RULES: dict[str, Permission] = {
    "C-ECHO": P.authenticated,
    "C-STORE": P.images_write,
    "C-FIND": P.images_read,
    "C-MOVE": P.images_read,
    "C-GET": P.images_read,
}

# Actions that services ask `broker.security.service.authorize` about, and their permissions
# (the DIMSE operations as "dimse.<op>"). An action not named here was already decided by the
# HTTP guard before the service ran (the route's rule above).
ACTIONS: dict[str, Permission] = {f"dimse.{op[2:].lower()}": p for op, p in DIMSE_RULES.items()}


def required(method: str, path: str) -> tuple[Permission, str | None]:
    """The permission `method path` needs and the facility its path scopes it to (if any)."""
    segments = [s for s in path.split("/") if s]
    if any(s in {".", ".."} for s in segments):
        return Permission.admin, None
    for rule in RULES:
        matched, facility = rule.match(method, segments)
        if matched:
            return rule.permission, facility
    return Permission.admin, None


def is_public(method: str, path: str) -> bool:
    return required(method, path)[0] is Permission.public


def decide(principal: Principal, method: str, path: str, *, default_facility: str = "local") -> Decision:
    permission, facility = required(method, path)
    if facility is None and permission is Permission.images_write:
        # The broker-wide STOW-RS stores into the default facility's partition.
        facility = default_facility
    return permits(principal, permission, facility=facility)


def decide_dimse(principal: Principal, operation: str, *, facility: str | None = None) -> Decision:
    """May `principal` perform a DIMSE `operation` ("C-STORE", ...) on `facility`'s partition
    (C-STORE: the partition it stores into)? An operation not in DIMSE_RULES is admin-only."""
    return permits(principal, DIMSE_RULES.get(operation, Permission.admin), facility=facility)


def permits(principal: Principal, permission: Permission, *, facility: str | None = None) -> Decision:
    """The one answer for every interface: the role must hold `permission`, and a facility node
    acts only in its own facility's partition."""
    if permission is Permission.public:
        return Decision(True, permission)
    if permission not in ROLE_PERMISSIONS.get(principal.role, frozenset()):
        return Decision(False, permission, f"role {principal.role} lacks {permission}")
    if facility is not None and principal.role is Role.facility and facility != principal.facility:
        # A facility node acts only in its own partition.
        return Decision(False, permission, "outside the caller's facility")
    return Decision(True, permission)
