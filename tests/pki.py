"""A throw-away PKI for DICOM TLS tests and benchmarks: a CA and certificates it signs (or
self-signed "rogue" ones), EC P-256, valid for a day, generated on the spot; nothing shipped."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Signer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, *, issuer: Signer | None, ca: bool, server: bool
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def make_pki(folder: Path, parties: dict[str, tuple[bool, bool]]) -> dict[str, Path]:
    """Write `ca.crt` and, for each party name -> (signed by the CA, is a server), its
    `<name>.crt` and `<name>.key` (PKCS#8, unencrypted) into `folder`. Returns their paths as
    `ca`, `<name>_crt` and `<name>_key`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("ScanOnce test CA", ca_key, issuer=None, ca=True, server=False)
    out = {"ca": folder / "ca.crt"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, (signed, server) in parties.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, issuer=(ca, ca_key) if signed else None, ca=False, server=server)
        out[f"{name}_crt"] = folder / f"{name}.crt"
        out[f"{name}_crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{name}_key"] = folder / f"{name}.key"
        out[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return out
