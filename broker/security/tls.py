"""DICOM TLS (PS3.15 B.1, the BCP 195 profiles): the SSL contexts of the DIMSE listener and of
the broker's own DIMSE calls (an SCU to facility archives), from settings.

The listener: with dimse_tls_cert_file and dimse_tls_key_file it speaks TLS only; with
dimse_tls_ca_file as well, a peer must present a client certificate signed by one of those CAs
(mutual TLS), so a peer without one is refused during the handshake, before any association.

A client certificate is bound to calling AE titles by the facility registry (`FacilityAE.certificate`:
`sha256:<fingerprint>` or `subject:<RFC 4514 name>`); `certificate_binding` checks and normalises
what an administrator gives, `peer_certificate` reads what a peer presented, `matches` compares.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from broker.errors import BadRequest, InvalidSetting
from broker.settings import Settings


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's SSL context, or None for plain TCP."""
    cert, key = settings.dimse_tls_cert_file, settings.dimse_tls_key_file
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise BadRequest("DIMSE TLS needs both SCANONCE_DIMSE_TLS_CERT_FILE and SCANONCE_DIMSE_TLS_KEY_FILE")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195
    _load_pair(context, settings)
    if settings.dimse_tls_ca_file is not None:
        _load_ca(context, settings)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load_pair(context: ssl.SSLContext, settings: Settings) -> None:
    """The certificate and its key into `context`, or `InvalidSetting` naming both settings (a
    file missing, unreadable, not PEM, or a key that is not the certificate's)."""
    cert, key = settings.dimse_tls_cert_file, settings.dimse_tls_key_file
    try:
        context.load_cert_chain(str(cert), str(key))
    except OSError as exc:  # ssl.SSLError too
        raise InvalidSetting(
            f"SCANONCE_DIMSE_TLS_CERT_FILE {cert} and SCANONCE_DIMSE_TLS_KEY_FILE {key}: cannot load "
            f"the certificate and its key ({_why(exc)})"
        ) from None


def _load_ca(context: ssl.SSLContext, settings: Settings) -> None:
    try:
        context.load_verify_locations(cafile=str(settings.dimse_tls_ca_file))
    except OSError as exc:
        raise _ca_unusable(settings, exc) from None


def _ca_unusable(settings: Settings, exc: OSError) -> InvalidSetting:
    return InvalidSetting(
        f"SCANONCE_DIMSE_TLS_CA_FILE {settings.dimse_tls_ca_file}: cannot load the CA certificates "
        f"({_why(exc)})"
    )


def _why(exc: OSError) -> str:
    return exc.strerror or getattr(exc, "reason", None) or type(exc).__name__


def client_context(settings: Settings) -> ssl.SSLContext | None:
    """The broker's SSL context as a DIMSE SCU (None: plain TCP), verifying the archive's
    certificate against dimse_tls_ca_file (else the system's CAs) and its host name."""
    if not settings.dimse_tls_outbound:
        return None
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=str(settings.dimse_tls_ca_file) if settings.dimse_tls_ca_file else None,
        )
    except OSError as exc:
        raise _ca_unusable(settings, exc) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.dimse_tls_cert_file is not None and settings.dimse_tls_key_file is not None:
        _load_pair(context, settings)
    return context


# The SCU's context in force: set by the app from settings (plain TCP until then).
_client: ssl.SSLContext | None = None
_lock = threading.Lock()


def configure(settings: Settings) -> None:
    global _client
    context = client_context(settings)
    with _lock:
        _client = context


def tls_kwargs(*, hostname: str | None = None) -> dict[str, Any]:
    """Keyword arguments for pynetdicom's `AE.associate`: TLS to the archive when configured."""
    context = _client
    if context is None:
        return {}
    return {"tls_args": (context, hostname)}


# -- binding client certificates to calling AE titles ----------------------------------------------

_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The client certificate a DIMSE peer presented: its SHA-256 fingerprint and subject, in the
    forms a binding is stored in."""

    sha256: str  # "sha256:<64 hex>"
    subject: str  # "subject:<RFC 4514>"

    @property
    def bindings(self) -> tuple[str, str]:
        return self.sha256, self.subject


def _subject(name: x509.Name) -> str:
    return "subject:" + name.rfc4514_string()


def certificate_binding(value: str) -> str:
    """The stored form of an administrator's binding: `sha256:` and a fingerprint (hex, colons
    and case as `openssl x509 -fingerprint -sha256` prints them, or bare), or `subject:` and a
    distinguished name in RFC 4514 (`CN=SM_PACS,O=St Mary's`). BadRequest otherwise."""
    text = value.strip()
    kind, colon, rest = text.partition(":")
    kind = kind.strip().lower()
    if colon and kind == "sha256":
        digest = rest.replace(":", "").replace(" ", "").lower()
        if not _HEX.match(digest):
            raise BadRequest("a certificate fingerprint is sha256: and 64 hex digits")
        return "sha256:" + digest
    if colon and kind == "subject":
        try:
            name = x509.Name.from_rfc4514_string(rest.strip())
        except ValueError:
            raise BadRequest("a certificate subject is an RFC 4514 name, e.g. subject:CN=SM_PACS") from None
        if not list(name):
            raise BadRequest("a certificate subject is an RFC 4514 name, e.g. subject:CN=SM_PACS")
        return _subject(name)
    raise BadRequest("certificate must be sha256:<fingerprint> or subject:<RFC 4514 name>")


def peer_certificate(sock: Any) -> PeerCertificate | None:
    """The client certificate the peer on `sock` presented (None: not TLS, or none presented).
    Only a certificate the handshake verified gets here (CERT_REQUIRED with the CA file)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    return PeerCertificate(sha256="sha256:" + hashlib.sha256(der).hexdigest(), subject=_subject(cert.subject))


def matches(binding: str, cert: PeerCertificate) -> bool:
    return binding in cert.bindings
