"""DICOM TLS (PS3.15 B.1, the BCP 195 profiles): the SSL contexts of the DIMSE listener and of
the broker's own DIMSE calls (an SCU to facility archives), from settings.

The listener: with dimse_tls_cert_file and dimse_tls_key_file it speaks TLS only; with
dimse_tls_ca_file as well, a peer must present a client certificate signed by one of those CAs
(mutual TLS), so a peer without one is refused during the handshake, before any association.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any

from broker.errors import BadRequest
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
    context.load_cert_chain(str(cert), str(key))
    if settings.dimse_tls_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.dimse_tls_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(settings: Settings) -> ssl.SSLContext | None:
    """The broker's SSL context as a DIMSE SCU (None: plain TCP), verifying the archive's
    certificate against dimse_tls_ca_file (else the system's CAs) and its host name."""
    if not settings.dimse_tls_outbound:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(settings.dimse_tls_ca_file) if settings.dimse_tls_ca_file else None,
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.dimse_tls_cert_file is not None and settings.dimse_tls_key_file is not None:
        context.load_cert_chain(str(settings.dimse_tls_cert_file), str(settings.dimse_tls_key_file))
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
