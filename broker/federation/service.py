"""Facility registry."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from broker.db import session_scope
from broker.errors import Conflict, NotFound
from broker.federation.models import Facility
from broker.settings import Settings


def ensure_default_facility(*, engine: Engine, settings: Settings) -> None:
    """The embedded default always has the `local` facility (safe to call on every start)."""
    with session_scope(engine) as session:
        if session.get(Facility, settings.default_facility) is None:
            session.add(
                Facility(id=settings.default_facility, name="Local archive", issuer=settings.default_issuer)
            )


def add_facility(*, session: Session, facility_id: str, issuer: str, name: str = "") -> Facility:
    if session.get(Facility, facility_id) is not None:
        raise Conflict(f"facility {facility_id!r} already exists")
    if session.exec(select(Facility).where(Facility.issuer == issuer)).first() is not None:
        raise Conflict(f"issuer {issuer!r} is already registered to another facility")
    facility = Facility(id=facility_id, issuer=issuer, name=name)
    session.add(facility)
    session.commit()
    session.refresh(facility)
    return facility


def list_facilities(*, session: Session) -> list[Facility]:
    return list(session.exec(select(Facility).order_by(Facility.id)))


def get_facility(*, session: Session, facility_id: str) -> Facility:
    facility = session.get(Facility, facility_id)
    if facility is None:
        raise NotFound(f"no facility {facility_id!r}")
    return facility
