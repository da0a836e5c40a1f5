"""Application state and the `Annotated` dependency aliases, declared once.

Routes take `SessionDep`, `StoreDep`, `PrincipalDep`, `SettingsDep`, `StateDep`; nothing else
reaches for globals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.security.schemas import Principal
from broker.security.service import principal_for_http
from broker.settings import Settings
from storage import ObjectStore


@dataclass
class AppState:
    """Everything a request needs that outlives it, built once by the app factory."""

    settings: Settings
    engine: Engine
    store: ObjectStore


def get_state(request: Request) -> AppState:
    return request.app.state.scanonce


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings_dep(state: StateDep) -> Settings:
    return state.settings


def get_session(state: StateDep) -> Iterator[Session]:
    with Session(state.engine, expire_on_commit=False) as session:
        yield session


def get_store(state: StateDep) -> ObjectStore:
    return state.store


def get_principal(state: StateDep) -> Principal:
    return principal_for_http(settings=state.settings)


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
