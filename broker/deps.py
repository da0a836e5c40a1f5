"""Application state and the `Annotated` dependency aliases, declared once.

Routes take `SessionDep`, `StoreDep`, `PrincipalDep`, `SettingsDep`, `StateDep`, `FormDep`; nothing else
reaches for globals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.errors import BadRequest, Forbidden
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


def get_principal(request: Request, state: StateDep) -> Principal:
    # The guard middleware (broker.security.http) verified the caller and put it here.
    principal = getattr(request.state, "principal", None)
    if principal is not None:
        return principal
    if state.settings.auth_enabled:
        # An open route (no token asked) that wants a caller: never guess one.
        raise Forbidden("this needs an authenticated caller")
    return principal_for_http(settings=state.settings)


_FORM_LIMIT = 16 * 1024


async def get_form(request: Request) -> dict[str, str]:
    """A small HTML form post (application/x-www-form-urlencoded), first value of each field."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise BadRequest("expected a form (application/x-www-form-urlencoded)")
    body = await request.body()
    if len(body) > _FORM_LIMIT:
        raise BadRequest("form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=64)
    return {name: values[0] for name, values in fields.items()}


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
FormDep = Annotated[dict[str, str], Depends(get_form)]
