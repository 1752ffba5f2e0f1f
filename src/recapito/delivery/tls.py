"""TLS facts of one SMTP connection and the security level they amount to (DESIGN §5).

The client negotiates with a permissive context (no verification), so one handshake
gives encryption whatever the certificate; the certificate verdict is then computed
offline from the chain the server presented, against the trust store, for the MX host
name. One connection therefore yields both the L2 and the L3 facts.
"""

from __future__ import annotations

import ssl
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import verification

from recapito.security.policy import transport_level

# DER encoding selector of the certificate objects CPython 3.11/3.12 return from
# the private get_unverified_chain() (ssl.ENCODING_DER is not exported).
_ENCODING_DER = 2


@dataclass(frozen=True)
class TLSFacts:
    version: str | None  # e.g. "TLSv1.3"; None for cleartext
    cipher: str | None
    cert_verdict: str | None  # "valid" or a TLS-RPT style failure reason; None in cleartext
    chain: tuple[bytes, ...] = ()  # DER certificates as presented, leaf first

    @property
    def level(self) -> str:
        """L0–L3 from the handshake alone (L4 needs the recipient's policy)."""
        return transport_level(self.version, self.cipher, self.cert_verdict)


def client_context(*, legacy: bool) -> ssl.SSLContext:
    """A client context that negotiates without verifying; the certificate is judged offline.

    ``legacy=False`` refuses anything below TLS 1.2 during the handshake itself (what
    secure delivery at L2+ uses); ``legacy=True`` also speaks TLS 1.0/1.1 and old ciphers,
    for opportunistic delivery and for classifying old servers. Secure delivery never
    sends through a legacy context.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if legacy:
        with warnings.catch_warnings():
            # deprecated on purpose: old servers must still be reachable and classified
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# System bundles carry a few old roots with non-positive serial numbers; cryptography warns
# about each. A module-level filter (catch_warnings is not thread-safe: chunks run in threads).
warnings.filterwarnings(
    "ignore", message=".*serial number.*", category=CryptographyDeprecationWarning
)


@lru_cache(maxsize=8)
def trust_store(extra_ca_file: Path | None) -> verification.Store:
    """The system trust anchors plus the configured extra CA file (e.g. the sandbox CA)."""
    certs: list[x509.Certificate] = []
    paths = [ssl.get_default_verify_paths().cafile]
    if extra_ca_file is not None:
        paths.append(str(extra_ca_file))
    for path in paths:
        if path and Path(path).is_file():
            certs.extend(x509.load_pem_x509_certificates(Path(path).read_bytes()))
    return verification.Store(certs)


def presented_chain(ssl_object: Any) -> tuple[bytes, ...]:
    """The certificates the server sent, DER, leaf first (just the leaf if that is all we get)."""
    raw_chain: list[bytes] = []
    inner = getattr(ssl_object, "_sslobj", ssl_object)
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        for item in getter() or []:
            raw_chain.append(
                item.public_bytes(_ENCODING_DER) if hasattr(item, "public_bytes") else item
            )
    if not raw_chain:
        leaf_der = ssl_object.getpeercert(binary_form=True)
        if leaf_der:
            raw_chain = [leaf_der]
    return tuple(raw_chain)


def certificate_verdict(
    raw_chain: tuple[bytes, ...],
    server_name: str,
    extra_ca_file: Path | None,
    now: datetime | None = None,
) -> str:
    """Verify a presented chain for ``server_name``; returns "valid" or a TLS-RPT reason."""
    if not raw_chain:
        return "validation-failure"
    try:
        chain = [x509.load_der_x509_certificate(der) for der in raw_chain]
    except ValueError:
        return "validation-failure"
    leaf, intermediates = chain[0], chain[1:]
    moment = now or datetime.now(UTC)
    if leaf.not_valid_after_utc < moment:
        return "certificate-expired"
    try:
        verifier = (
            verification.PolicyBuilder()
            .store(trust_store(extra_ca_file))
            .time(moment)
            .build_server_verifier(x509.DNSName(server_name))
        )
        verifier.verify(leaf, intermediates)
    except verification.VerificationError as exc:
        # the message names the failed check before "(encountered processing ...)"
        text = str(exc).split("(encountered", 1)[0].lower()
        if "subjectaltname" in text:
            return "certificate-host-mismatch"
        if "not valid at validation time" in text:
            return "certificate-expired"
        return "certificate-not-trusted"
    except ValueError:
        return "certificate-host-mismatch"
    return "valid"
