"""Which network addresses may talk to the broker, and which the broker may talk to.

Inbound (DIMSE): a registered calling AE title is accepted only from its network (a CIDR); an AE
title alone is a string anyone can send. Outbound: the calls the broker makes on a caller's
behalf (a facility's DICOMweb archive, an EHR's FHIR server named in a CDS Hooks request, the
JWKS of a token's issuer) go only to the networks an administrator configured
(`SCANONCE_OUTBOUND_ALLOW_NETWORKS`, default loopback only). The check is made twice: when the
target is registered or named (a clear 400/403 at once), and on the address actually connected
to, after DNS resolution, so that a name that resolves elsewhere later (DNS rebinding) is still
refused. `guarded_client` is an httpx client that connects only to allowed addresses.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from broker.errors import BadRequest, Forbidden

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LOOPBACK: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


class OutboundRefused(Forbidden):
    """The broker will not connect to this address for a caller (not an allowed network)."""


def parse_network(value: str) -> str:
    """A CIDR (or a single address) in its normal form; BadRequest if it is not one."""
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise BadRequest(f"{value!r} is not a network (CIDR such as 10.1.2.0/24, or one address)") from None


def networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())


def _address(value: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return address


def address_in(address: str, allowed: Sequence[IPNetwork]) -> bool:
    """Whether an IP address (as a socket reports it) lies in one of `allowed`."""
    ip = _address(address)
    return ip is not None and any(ip.version == n.version and ip in n for n in allowed)


def is_loopback_host(host: str) -> bool:
    """A bind address that only this machine can reach ("" and 0.0.0.0 are every interface)."""
    if host == "localhost":
        return True
    ip = _address(host)
    return ip is not None and ip.is_loopback


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def allowed_addresses(host: str, port: int, allowed: Sequence[IPNetwork]) -> list[str]:
    """The addresses `host` resolves to now that lie in `allowed`; OutboundRefused if none do."""
    addresses = _resolve(host, port)
    ok = [a for a in addresses if address_in(a, allowed)]
    if not ok:
        raise OutboundRefused(
            f"{host} is not in the networks the broker may connect to "
            "(SCANONCE_OUTBOUND_ALLOW_NETWORKS; an administrator sets it)"
        )
    return ok


def check_url(url: str, allowed: Sequence[IPNetwork], *, what: str) -> None:
    """At registration: refuse (400) a URL whose host is, or resolves only to, addresses outside
    the allowed networks. A name that does not resolve now is let through (it may be registered
    before its DNS exists): every connection is checked again anyway."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise BadRequest(f"{what}: the port is not a number 0-65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"{what} must be an http:// or https:// URL")
    check_registered_host(parts.hostname, port, allowed, what=what)


def check_registered_host(host: str, port: int, allowed: Sequence[IPNetwork], *, what: str) -> None:
    """As `check_url`, for a host and port (a DIMSE archive)."""
    try:
        allowed_addresses(host, port, allowed)
    except OutboundRefused as exc:
        raise BadRequest(f"{what}: {exc.message}") from None
    except httpcore.ConnectError:
        return


def check_host(host: str, port: int, allowed: Sequence[IPNetwork], *, what: str) -> str:
    """At connect time for a non-HTTP peer (DIMSE SCU): the allowed address to connect to."""
    try:
        return allowed_addresses(host, port, allowed)[0]
    except httpcore.ConnectError as exc:
        raise OutboundRefused(f"{what}: {exc}") from None


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves the host itself and connects only to an allowed address (TLS still verifies
    the certificate against the host name: httpcore wraps this stream with server_hostname)."""

    def __init__(self, allowed: Sequence[IPNetwork]) -> None:
        self.allowed = tuple(allowed)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        last: Exception | None = None
        for address in allowed_addresses(host, port, self.allowed):
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        assert last is not None
        raise last


# The allow-list in force: set by the app (and the CLI) from settings; loopback until then.
_configured: tuple[IPNetwork, ...] = networks(LOOPBACK)
_configured_lock = threading.Lock()


def configure(values: Iterable[str]) -> None:
    global _configured
    with _configured_lock:
        _configured = networks(values)


def outbound_networks() -> tuple[IPNetwork, ...]:
    return _configured


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default verifying TLS context, built once per process: building it (loading the
    CA bundle) cost 20-40 ms of CPU for every client, and an import opens several."""
    return httpx.create_ssl_context()


def guarded_client(**kwargs: Any) -> httpx.Client:
    """An httpx.Client that connects only to the configured outbound networks; a refused
    connection raises OutboundRefused (a Forbidden, 403) out of the request call."""
    transport = httpx.HTTPTransport(verify=_tls_context())
    transport._pool._network_backend = _GuardedBackend(outbound_networks())
    kwargs.setdefault("trust_env", False)  # a proxy would connect for us, unchecked
    return httpx.Client(transport=transport, **kwargs)


def guarded_get(url: str, **kwargs: Any) -> httpx.Response:
    client_args = {k: kwargs.pop(k) for k in ("timeout", "trust_env") if k in kwargs}
    with guarded_client(**client_args) as client:
        return client.get(url, **kwargs)
