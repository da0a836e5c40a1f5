"""`scanonce token create`: a bearer token from the broker's embedded issuer (the key in the data
dir), for scripts, facility nodes and the demo."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from broker.clikit import DataDir, fail, usage_error
from broker.clikit import settings as _settings
from broker.errors import ScanOnceError
from broker.security.schemas import Role
from broker.security.tokens import load_or_create_signing_key, mint
from broker.settings import Settings

token_app = typer.Typer(help="Bearer tokens from the broker's own issuer.", no_args_is_help=True)

# The demo's callers, one token each (`scanonce demo` prints them).
DEMO_ROLES: tuple[tuple[Role, str], ...] = (
    (Role.admin, "demo-admin"),
    (Role.clinician, "demo-clinician"),
    (Role.radiologist, "demo-radiologist"),
    (Role.facility, "demo-facility-node"),
    (Role.reviewer, "demo-reviewer"),
    (Role.auditor, "demo-auditor"),
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (e.g. 30m, 1h, 7d)")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def token_for(
    *,
    settings: Settings,
    role: Role,
    subject: str,
    facility: str | None,
    seconds: int,
    purpose_of_use: str | None = None,
) -> str:
    key = load_or_create_signing_key(settings.resolved_signing_key_file())
    # Unset: the issuer's default for the role (TREAT for clinicians and radiologists); "none": no claim.
    extra: dict[str, str | None] = {}
    if purpose_of_use is not None:
        extra["purpose_of_use"] = None if purpose_of_use.lower() == "none" else purpose_of_use.upper()
    return mint(
        key=key,
        settings=settings,
        subject=subject,
        role=role,
        facility=facility,
        expires_in=seconds,
        extra=dict(extra),
    )


def create(
    role: Annotated[Role, typer.Option(help="The caller's role.")],
    subject: Annotated[str, typer.Option(help="Who the token is for (its `sub`).")],
    facility: Annotated[
        str | None, typer.Option(help="The caller's facility (default: the broker's default facility).")
    ] = None,
    expires: Annotated[str, typer.Option(help="Lifetime: 30m, 1h, 7d ...")] = "1h",
    purpose_of_use: Annotated[
        str | None,
        typer.Option(
            help="HL7 PurposeOfUse claim (default: TREAT for clinicians and radiologists; 'none': no claim)."
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Print a bearer token (send it as `Authorization: Bearer <token>`)."""
    try:
        seconds = parse_duration(expires)
    except ValueError as exc:
        usage_error(str(exc))
    settings = _settings(data_dir)
    try:
        token = token_for(
            settings=settings,
            role=role,
            subject=subject,
            facility=facility,
            seconds=seconds,
            purpose_of_use=purpose_of_use,
        )
    except ScanOnceError as exc:  # the signing key file: unreadable, not a key, or not creatable
        fail(exc)
    print(token)


def demo_tokens(settings: Settings, *, seconds: int = 7 * 86400) -> list[tuple[Role, str, str]]:
    """(role, subject, token) for each demo caller."""
    return [
        (
            role,
            subject,
            token_for(settings=settings, role=role, subject=subject, facility=None, seconds=seconds),
        )
        for role, subject in DEMO_ROLES
    ]


def register(app: typer.Typer) -> None:
    token_app.command("create")(create)
    app.add_typer(token_app, name="token")
