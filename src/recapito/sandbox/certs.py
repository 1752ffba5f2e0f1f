"""The sandbox PKI: one private CA and a leaf certificate per MX host (and per MTA-STS policy host).

Each leaf is shaped by the posture of its MX server (see ``world.Posture``):

- ``selfsigned``: a certificate that signs itself, so no chain to the CA exists;
- ``expired``: signed by the sandbox CA, but ``not_after`` lies in the past;
- ``wrongname``: signed by the sandbox CA, valid, but naming ``wrong.sandbox.test``;
- every other posture: signed by the sandbox CA, valid, naming the MX host.

Files live under ``$RECAPITO_HOME/sandbox``: ``ca.pem`` / ``ca-key.pem`` and
``certs/<mx host>.pem`` / ``certs/<mx host>.key``. On a restart the existing files are kept
when they still match what the posture asks for, so clients that pinned the CA keep working.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from recapito.sandbox import world

# The name carried by the ``wrongname`` posture's certificate instead of the MX host.
WRONG_NAME = "wrong.sandbox.test"
CA_COMMON_NAME = "recapito sandbox CA"

CA_LIFETIME = dt.timedelta(days=3650)
LEAF_LIFETIME = dt.timedelta(days=365)
# A certificate that would expire within this margin is regenerated rather than reused.
RENEW_MARGIN = dt.timedelta(days=2)


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and the PEM private key that goes with it."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class SandboxPKI:
    """Where the CA and every MX host's certificate are stored."""

    ca: KeyPair
    leaves: dict[str, KeyPair]  # by MX host name

    @property
    def ca_file(self) -> Path:
        return self.ca.cert


def leaf_name(server: world.MXServer) -> str:
    """The DNS name a posture's certificate is issued for."""
    return WRONG_NAME if server.posture == "wrongname" else server.host


def ensure_certificates(
    sandbox_dir: Path,
    servers: Iterable[world.MXServer] = world.MX_SERVERS,
    now: dt.datetime | None = None,
) -> SandboxPKI:
    """Create (or reuse) the CA and the leaf certificate of every server."""
    moment = now or dt.datetime.now(dt.UTC)
    sandbox_dir.mkdir(parents=True, exist_ok=True)
    certs_dir = sandbox_dir / "certs"
    certs_dir.mkdir(exist_ok=True)

    ca_pair = KeyPair(sandbox_dir / "ca.pem", sandbox_dir / "ca-key.pem")
    loaded = _load_pair(ca_pair)
    if loaded is not None and _ca_usable(loaded[0], loaded[1], moment):
        ca_cert, ca_key = loaded
    else:
        ca_cert, ca_key = _make_ca(moment)
        _write_pair(ca_pair, ca_cert, ca_key)

    leaves: dict[str, KeyPair] = {}
    for server in servers:
        pair = KeyPair(certs_dir / f"{server.host}.pem", certs_dir / f"{server.host}.key")
        current = _load_pair(pair)
        if current is None or not _leaf_usable(current[0], current[1], server, ca_cert, moment):
            cert, key = _make_leaf(server, ca_cert, ca_key, moment)
            _write_pair(pair, cert, key)
        leaves[server.host] = pair
    return SandboxPKI(ca=ca_pair, leaves=leaves)


# -- building -------------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "recapito sandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _make_ca(now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = _name(CA_COMMON_NAME)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_window(server: world.MXServer, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    if server.posture == "expired":
        # Valid for a while in the past, expired since yesterday.
        return now - dt.timedelta(days=90), now - dt.timedelta(days=1)
    return now - dt.timedelta(hours=1), now + LEAF_LIFETIME


def _make_leaf(
    server: world.MXServer,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    dns_name = leaf_name(server)
    subject = _name(dns_name)
    self_signed = server.posture == "selfsigned"
    issuer = subject if self_signed else ca_cert.subject
    signer = key if self_signed else ca_key
    not_before, not_after = _leaf_window(server, now)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if not self_signed:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256()), key


# -- reuse checks ---------------------------------------------------------------------------


def _load_pair(pair: KeyPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        return None
    return cert, key


def _public_der(public_key: object) -> bytes:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return b""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ca_usable(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return (
        constraints.ca
        and cert.subject == cert.issuer
        and cert.not_valid_before_utc <= now
        and cert.not_valid_after_utc > now + RENEW_MARGIN
    )


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _leaf_usable(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    server: world.MXServer,
    ca_cert: x509.Certificate,
    now: dt.datetime,
) -> bool:
    if _dns_names(cert) != [leaf_name(server)]:
        return False
    issuer = cert if server.posture == "selfsigned" else ca_cert
    if not _issued_by(cert, issuer):
        return False
    if server.posture == "expired":
        return cert.not_valid_after_utc < now
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc > now + RENEW_MARGIN


# -- files ----------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _write_pair(pair: KeyPair, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first, so a crash between the two writes leaves a mismatch that the next
    # start detects (and repairs) instead of a certificate without its key.
    _atomic_write(pair.key, key_pem, 0o600)
    _atomic_write(pair.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


# -- MTA-STS policy hosts -------------------------------------------------------------------


def policy_host_server(site: world.MTASTSSite) -> world.MXServer:
    """The certificate shape of an MTA-STS policy host, in the terms ``_make_leaf`` knows.

    A ``selfsigned`` site gets a self-signed certificate; every other site a sandbox-CA
    certificate naming ``mta-sts.<domain>``.
    """
    posture: world.Posture = "selfsigned" if site.posture == "selfsigned" else "tls13"
    return world.MXServer(site.policy_host, site.policy_address, posture)


def ensure_policy_host_certificates(
    sandbox_dir: Path,
    sites: Iterable[world.MTASTSSite] = world.MTA_STS_SITES,
    now: dt.datetime | None = None,
) -> dict[str, KeyPair]:
    """Create (or reuse) the certificate of every MTA-STS policy host, by host name.

    Same CA, directory and reuse rules as the MX certificates.
    """
    pki = ensure_certificates(sandbox_dir, [policy_host_server(s) for s in sites], now)
    return pki.leaves
