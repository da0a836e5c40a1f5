"""Application state and the `Annotated` dependency aliases, declared once.

Routes take `SessionDep`, `StoreDep`, `PrincipalDep`, `SettingsDep`, `StateDep`, `FormDep`; nothing else
reaches for globals. FHIR's rules of every `/fhir` route are here too (JSON only: `fhir_json_only`;
unsupported search parameters: `fhir_lenient`, `fhir_unsupported`, `fhir_ignored_entry`), so that
the routes of `fhir` and of `audit` (`/fhir/AuditEvent`, a layer below) keep one copy of them.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.errors import BadRequest, Forbidden, NotAcceptable, UnsupportedMediaType
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


# -- FHIR (R4 http and search pages) --------------------------------------------------------------

# What `_format` may name, and the media ranges of an Accept header that JSON answers.
_FHIR_JSON_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir"}
_FHIR_JSON_ACCEPTED = _FHIR_JSON_FORMATS - {"json"} | {"*/*", "application/*"}
# FHIR's parameters of every interaction, not search criteria: `_format` is negotiated by
# `fhir_json_only`; `_pretty` only asks for indentation, which the compact JSON answered does without.
FHIR_EVERY_INTERACTION = ("_format", "_pretty")


def _refused(param: str) -> bool:
    """Whether a media range's parameter is q=0 (the client does not want that type)."""
    name, _, value = param.replace(" ", "").partition("=")
    return name == "q" and re.fullmatch(r"0(\.0{0,3})?", value) is not None


def fhir_json_only(request: Request) -> None:
    """FHIR's http page: 415 when the body is in a format the server does not take, 406 when the
    request asks only for a format it does not serve (XML, Turtle): `_format`, which stands in for
    the Accept header, else the Accept header. A dependency of every `/fhir` route."""
    sent = request.headers.get("content-type")
    if (
        request.method in ("POST", "PUT", "PATCH")
        and sent is not None
        and sent.split(";")[0].strip().lower() not in _FHIR_JSON_FORMATS - {"json"}
    ):
        raise UnsupportedMediaType(f"Content-Type {sent[:60]!r}: only JSON is taken (application/fhir+json)")
    fmt = request.query_params.get("_format")
    if fmt is not None:
        if fmt.split(";")[0].strip().lower() not in _FHIR_JSON_FORMATS:
            raise NotAcceptable(f"_format {fmt[:40]!r} is not served: JSON only (application/fhir+json)")
        return
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return
    for media_range in accept.split(","):
        kind, *params = (p.strip().lower() for p in media_range.split(";"))
        if kind in _FHIR_JSON_ACCEPTED and not any(_refused(p) for p in params):
            return
    raise NotAcceptable(f"Accept {accept[:60]!r}: only JSON is served (application/fhir+json)")


def fhir_lenient(request: Request) -> bool:
    """Prefer: handling=lenient (FHIR search): unknown parameters are ignored, not refused. The
    header is a list of preferences (RFC 7240: `return=minimal, handling=lenient`, possibly
    several headers, a preference with `;` parameters): one of them must be exactly
    handling=lenient (case and spaces aside, the value may be quoted), not merely contain it."""
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            name, _, value = preference.split(";", 1)[0].partition("=")
            if name.strip().lower() == "handling" and value.strip().strip('"').lower() == "lenient":
                return True
    return False


def fhir_one(values: Sequence[str], name: str, *, hint: str = "") -> str | None:
    """The one value of search parameter `name` (None when absent). Given twice is a 400: FHIR
    reads a repeated parameter as AND, and answering with one of the values would answer another
    question. `hint` says how to ask for alternatives where the parameter has a way."""
    if len(values) > 1:
        raise BadRequest(f"{name} may be given once" + (f" ({hint})" if hint else ""))
    return values[0] if values else None


def fhir_unsupported(names: Iterable[str], *, supported: Collection[str], lenient: bool) -> list[str]:
    """The search parameters among `names` that a search does not support, sorted: BadRequest
    naming them (strict handling, FHIR's default), or under lenient handling returned, for the
    answer to say they were ignored and to leave them out of its `self` link."""
    unknown = sorted(set(names) - set(supported))
    if unknown and not lenient:
        raise BadRequest(
            f"unsupported search parameter(s): {', '.join(n[:40] for n in unknown[:10])} "
            "(send Prefer: handling=lenient to have them ignored)"
        )
    return unknown


def fhir_ignored_entry(ignored: Sequence[str]) -> dict[str, Any]:
    """The searchset entry that says which parameters a lenient search ignored (FHIR search: an
    OperationOutcome with search.mode outcome)."""
    said = ", ".join(n[:40] for n in ignored[:10])
    issue = {"severity": "information", "code": "informational", "diagnostics": f"ignored: {said}"}
    return {"resource": {"resourceType": "OperationOutcome", "issue": [issue]}, "search": {"mode": "outcome"}}
