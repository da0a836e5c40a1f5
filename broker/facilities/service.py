"""Facility registry: who is federated, where their archive answers, what they share, and how
their last index sync went."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from broker.db import session_scope
from broker.errors import BadRequest, Conflict, NotFound
from broker.facilities.models import Facility, FacilityAE, SyncState
from broker.facilities.schemas import FACILITY_ID, SharingPolicy
from broker.security import network, tls
from broker.security.schemas import Principal
from broker.security.service import authorize
from broker.settings import Settings

_AE = re.compile(r"^[ -\[\]-~]{1,16}$")
_UNSET: Any = object()
# A calling AE title, alone (accepted from loopback only) or with the network it calls from, and
# the client certificate bound to it (DICOM TLS; broker.security.tls.certificate_binding).
CallingAE = str | tuple[str, str | None] | tuple[str, str | None, str | None]


def ensure_default_facility(*, engine: Engine, settings: Settings) -> None:
    """The embedded default always has the `local` facility (safe to call on every start, and
    from nodes starting together: one inserts it, the others find it)."""
    try:
        with session_scope(engine) as session:
            if session.get(Facility, settings.default_facility) is None:
                session.add(
                    Facility(
                        id=settings.default_facility, name="Local archive", issuer=settings.default_issuer
                    )
                )
    except IntegrityError:
        # Another node inserted it between this one's look and its insert (a node crashed at
        # start on this): there it is now, or it is a real conflict.
        with Session(engine) as session:
            if session.get(Facility, settings.default_facility) is None:
                raise


def _ae(value: str, what: str) -> str:
    value = value.strip()
    if not _AE.match(value) or not value:
        raise BadRequest(f"{what} must be 1-16 characters, no backslash or control characters")
    return value


def _check_endpoints(facility: Facility) -> None:
    if facility.dicomweb_url is not None and not re.match(r"^https?://", facility.dicomweb_url):
        raise BadRequest("dicomweb_url must be an http:// or https:// URL")
    dimse = (facility.ae_title, facility.host, facility.port)
    if any(v is not None for v in dimse) and not all(v is not None for v in dimse):
        raise BadRequest("a DIMSE endpoint needs all of ae_title, host and port")
    if facility.port is not None and not 0 < facility.port < 65536:
        raise BadRequest("port must be 1-65535")
    if facility.sharing_policy not in SharingPolicy.__members__:
        raise BadRequest(f"sharing_policy must be one of {', '.join(SharingPolicy.__members__)}")


def _check_outbound(facility: Facility, changed: set[str]) -> None:
    """The broker will connect to these endpoints (sync, retrieve): refuse at once an address
    outside the administrator's outbound networks (checked again at every connection)."""
    allowed = network.outbound_networks()
    if "dicomweb_url" in changed and facility.dicomweb_url:
        network.check_url(facility.dicomweb_url, allowed, what="dicomweb_url")
    if changed & {"host", "port"} and facility.host and facility.port:
        network.check_registered_host(facility.host, facility.port, allowed, what="host")


def _calling_entries(entries: Iterable[CallingAE]) -> dict[str, tuple[str | None, str | None]]:
    """title -> (network, certificate binding), both checked and normalised."""
    wanted: dict[str, tuple[str | None, str | None]] = {}
    for entry in entries:
        title, net, cert = (entry, None, None) if isinstance(entry, str) else (*entry, None)[:3]
        wanted[_ae(title, "calling AE title")] = (
            network.parse_network(net) if net else None,
            tls.certificate_binding(cert) if cert else None,
        )
    return wanted


def _set_calling_aes(session: Session, facility_id: str, entries: Iterable[CallingAE]) -> None:
    """Replace the facility's calling AE titles; each with its network (None: loopback only)."""
    networks = _calling_entries(entries)
    wanted = list(networks)
    if wanted:
        taken = session.exec(
            select(FacilityAE).where(
                col(FacilityAE.ae_title).in_(wanted), FacilityAE.facility_id != facility_id
            )
        ).first()
        if taken is not None:
            raise Conflict(
                f"calling AE title {taken.ae_title!r} already belongs to facility {taken.facility_id!r}"
            )
    session.exec(delete(FacilityAE).where(col(FacilityAE.facility_id) == facility_id))
    session.flush()
    for title in wanted:
        net, cert = networks[title]
        session.add(FacilityAE(ae_title=title, facility_id=facility_id, network=net, certificate=cert))


def _consent_policy(value: Any) -> str:
    text = str(value) if value is not None else "opt-out"
    if text not in ("opt-out", "opt-in"):
        raise BadRequest("consent_policy must be opt-out or opt-in")
    return text


def add_facility(
    *,
    session: Session,
    principal: Principal,
    facility_id: str,
    issuer: str,
    name: str = "",
    dicomweb_url: str | None = None,
    ae_title: str | None = None,
    host: str | None = None,
    port: int | None = None,
    calling_ae_titles: Iterable[CallingAE] = (),
    sharing_policy: str = "share_all",
    consent_policy: str = "opt-out",
) -> Facility:
    authorize(principal, action="facility.write", facility=facility_id)
    if not re.match(FACILITY_ID, facility_id):
        raise BadRequest("facility id must be 1-64 letters, digits, '.', '_' or '-'")
    if not issuer:
        raise BadRequest("issuer is required")
    if session.get(Facility, facility_id) is not None:
        raise Conflict(f"facility {facility_id!r} already exists")
    if session.exec(select(Facility).where(Facility.issuer == issuer)).first() is not None:
        raise Conflict(f"issuer {issuer!r} is already registered to another facility")
    facility = Facility(
        id=facility_id,
        issuer=issuer,
        name=name,
        dicomweb_url=dicomweb_url.rstrip("/") if dicomweb_url else None,
        ae_title=_ae(ae_title, "AE title") if ae_title else None,
        host=host or None,
        port=port,
        sharing_policy=str(sharing_policy),
        consent_policy=_consent_policy(consent_policy),
    )
    _check_endpoints(facility)
    _check_outbound(facility, {"dicomweb_url", "host", "port"})
    session.add(facility)
    session.flush()
    _set_calling_aes(session, facility_id, calling_ae_titles)
    session.commit()
    session.refresh(facility)
    return facility


def update_facility(*, session: Session, principal: Principal, facility_id: str, **changes: Any) -> Facility:
    """Change the given fields (issuer, name, dicomweb_url, ae_title, host, port,
    calling_ae_titles (titles, or (title, network) pairs), sharing_policy); a None endpoint
    field clears it."""
    authorize(principal, action="facility.write", facility=facility_id)
    facility = get_facility(session=session, facility_id=facility_id)
    allowed = {
        "issuer",
        "name",
        "dicomweb_url",
        "ae_title",
        "host",
        "port",
        "sharing_policy",
        "consent_policy",
    }
    unknown = set(changes) - allowed - {"calling_ae_titles"}
    if unknown:
        raise BadRequest(f"unknown facility fields: {', '.join(sorted(unknown))}")
    if "issuer" in changes:
        issuer = changes["issuer"]
        if not issuer:
            raise BadRequest("issuer cannot be empty")
        other = session.exec(
            select(Facility).where(Facility.issuer == issuer, Facility.id != facility_id)
        ).first()
        if other is not None:
            raise Conflict(f"issuer {issuer!r} is already registered to another facility")
    for name in allowed & set(changes):
        value = changes[name]
        if name == "dicomweb_url" and value:
            value = value.rstrip("/")
        if name == "ae_title" and value:
            value = _ae(value, "AE title")
        if name in ("name",) and value is None:
            value = ""
        if name == "sharing_policy" and value is not None:
            value = str(value)
        if name == "consent_policy":
            value = _consent_policy(value)
        setattr(facility, name, value)
    _check_endpoints(facility)
    _check_outbound(facility, set(changes))
    if changes.get("calling_ae_titles") is not None:
        _set_calling_aes(session, facility_id, changes["calling_ae_titles"])
    session.add(facility)
    session.commit()
    session.refresh(facility)
    return facility


def remove_facility(*, session: Session, principal: Principal, facility_id: str) -> None:
    """Unregister a facility. Refused while the index holds its studies or patients: those rows
    are qualified by its issuer and must not become orphans (their foreign keys say so, so the
    registry needs no knowledge of the index's tables)."""
    authorize(principal, action="facility.write", facility=facility_id)
    facility = get_facility(session=session, facility_id=facility_id)
    for table in (FacilityAE, SyncState):
        session.exec(delete(table).where(table.facility_id == facility_id))  # type: ignore[arg-type]
    session.delete(facility)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"facility {facility_id!r} still has studies in the index; remove them first") from exc


def list_facilities(*, session: Session) -> list[Facility]:
    return list(session.exec(select(Facility).order_by(col(Facility.id))))


def issuers(*, session: Session) -> dict[str, str]:
    """Each registered facility's id and the issuer that qualifies its patient IDs."""
    return dict(session.exec(select(Facility.id, Facility.issuer)).all())


def get_facility(*, session: Session, facility_id: str) -> Facility:
    facility = session.get(Facility, facility_id)
    if facility is None:
        raise NotFound(f"no facility {facility_id!r}")
    return facility


def calling_ae_titles(*, session: Session, facility_id: str) -> list[str]:
    return [ae.ae_title for ae in calling_aes(session=session, facility_id=facility_id)]


def calling_aes(*, session: Session, facility_id: str) -> list[FacilityAE]:
    """The facility's calling AE titles with their networks (None: loopback only)."""
    return list(
        session.exec(
            select(FacilityAE).where(FacilityAE.facility_id == facility_id).order_by(col(FacilityAE.ae_title))
        )
    )


def sync_state(*, session: Session, facility_id: str) -> SyncState | None:
    return session.get(SyncState, facility_id)


def facility_for_calling_ae(
    *,
    session: Session,
    ae_title: str,
    address: str | None = None,
    certificate: tls.PeerCertificate | None = None,
) -> Facility | None:
    """The facility a DIMSE caller belongs to, by its calling AE title (trailing spaces ignored)
    and, when `address` is given, only if that peer address lies in the AE title's network
    (None registered: loopback only). A known AE title from another address is no one.

    Under DICOM TLS, `certificate` (the client certificate the peer presented, or None) must be
    the one bound to the AE title, if one is; and a certificate bound to some AE titles may
    associate as none other: a valid certificate for AE A cannot call as AE B."""
    row = session.get(FacilityAE, ae_title.strip())
    if row is None:
        return None
    if address is not None:
        allowed = network.networks([row.network] if row.network else network.LOOPBACK)
        if not network.address_in(address, allowed):
            return None
    if row.certificate is not None and (certificate is None or not tls.matches(row.certificate, certificate)):
        return None
    if row.certificate is None and certificate is not None:
        bound = session.exec(
            select(FacilityAE.ae_title).where(col(FacilityAE.certificate).in_(certificate.bindings)).limit(1)
        ).first()
        if bound is not None:
            return None
    return session.get(Facility, row.facility_id)


def record_sync_state(
    *, engine: Engine, facility_id: str, job_id: int, status: str, error: str = "", total: int | None = None
) -> None:
    """Remember how a facility's index sync went (shown by `GET /api/facilities` and the CLI)."""
    with session_scope(engine) as session:
        if session.get(Facility, facility_id) is None:
            return
        state = session.get(SyncState, facility_id) or SyncState(facility_id=facility_id)
        state.last_job_id = job_id
        state.last_status = status
        state.last_error = error[:1024]
        if status == "running":
            state.last_started_at = datetime.now(UTC)
        if status == "done":
            state.last_completed_at = datetime.now(UTC)
        if total is not None:
            state.studies_at_facility = total
        session.add(state)


def has_archive_endpoint(facility: Facility) -> bool:
    return bool(facility.dicomweb_url or (facility.ae_title and facility.host and facility.port))
