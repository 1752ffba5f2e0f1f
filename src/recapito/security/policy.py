"""Security levels and send decisions (DESIGN §5). Pure logic, no I/O.

Levels, per MX host, measured on a real connection:

* L0 plaintext: no STARTTLS offered (or stripped);
* L1 tls-legacy: TLS 1.0/1.1 or an obsolete cipher;
* L2 tls-encrypted: TLS ≥ 1.2, certificate not validated;
* L3 tls-verified: L2 and the certificate chains to a trusted root and names the MX host;
* L4 tls-policy: the recipient's own policy is satisfied: MTA-STS ``enforce`` (with L3 and
  the host listed in the policy) or a DANE TLSA match. A DANE match authenticates the
  server through DNSSEC on its own (RFC 7672), so it reaches L4 even when the
  certificate would not validate against public roots.

Recipient policies are floors in every mode: when DANE applies the host must match its
TLSA records; otherwise under MTA-STS ``enforce`` it must be listed and present a valid
certificate. The campaign's own floor (``secure`` with ``min_level``) comes on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Level = Literal["L0", "L1", "L2", "L3", "L4"]
LEVELS: tuple[Level, ...] = ("L0", "L1", "L2", "L3", "L4")
LEGACY_VERSIONS = frozenset({"SSLv3", "TLSv1", "TLSv1.1"})
WEAK_CIPHER_MARKERS = ("RC4", "3DES", "DES-CBC", "NULL", "EXPORT", "MD5")

# The TLS-RPT (RFC 8460) result types used as reasons, plus our tls-version-too-low.
STABLE_REASONS = frozenset({"starttls-not-supported", "tls-version-too-low"})


def level_at_least(level: str, floor: str) -> bool:
    order: tuple[str, ...] = LEVELS
    return order.index(level) >= order.index(floor)


@dataclass(frozen=True)
class TLSPolicy:
    """A campaign's transport policy: ``opportunistic`` or ``secure`` with a minimum level."""

    mode: Literal["opportunistic", "secure"] = "opportunistic"
    min_level: Level = "L0"

    @classmethod
    def parse(cls, text: str) -> TLSPolicy:
        """``opportunistic``, ``secure`` (= L3), or ``secure:L2`` / ``L2`` style."""
        value = text.strip()
        if value.lower() == "opportunistic":
            return cls()
        mode, _, level = value.partition(":")
        if mode.upper() in LEVELS and not level:
            mode, level = "secure", mode
        if mode.lower() != "secure":
            raise ValueError(
                f"tls policy {text!r}: expected 'opportunistic' or 'secure:L1'…'secure:L4'"
            )
        level = (level or "L3").upper()
        if level not in LEVELS or level == "L0":
            raise ValueError(f"tls policy {text!r}: minimum level must be L1, L2, L3 or L4")
        return cls("secure", LEVELS[LEVELS.index(level)])

    @property
    def label(self) -> str:
        return "opportunistic" if self.mode == "opportunistic" else f"secure:{self.min_level}"

    @property
    def needs_modern_tls(self) -> bool:
        """Secure at L2 or above must never negotiate below TLS 1.2."""
        return self.mode == "secure" and level_at_least(self.min_level, "L2")


@dataclass(frozen=True)
class RecipientPolicy:
    """What the recipient domain published, as it applies to one MX host."""

    dane: Literal["match", "mismatch", "none", "bogus", "unchecked"] = "unchecked"
    sts_mode: Literal["enforce", "testing", "none"] | None = None
    sts_listed: bool = True  # the host matches an ``mx`` pattern of the MTA-STS policy
    sts_error: str | None = None  # policy could not be fetched or parsed
    sts_temporary: bool = False  # policy discovery failed in DNS and nothing is cached

    @property
    def sts_enforced(self) -> bool:
        # DANE first: when it applies, MTA-STS is not consulted (RFC 8461 §2)
        return self.sts_mode == "enforce" and self.dane in ("none", "unchecked")


@dataclass(frozen=True)
class HostVerdict:
    """The level of one MX host and whether a message may go through it."""

    host: str
    level: Level
    send: bool
    reason: str | None = None  # TLS-RPT style when not sending
    defer: bool = False  # not a verdict on the host: try again later (bogus DNSSEC...)
    detail: str = ""
    facts: dict[str, str | None] = field(default_factory=dict)


def transport_level(version: str | None, cipher: str | None, cert_verdict: str | None) -> Level:
    """L0–L3 from the handshake facts alone."""
    if version is None:
        return "L0"
    if version in LEGACY_VERSIONS or any(m in (cipher or "") for m in WEAK_CIPHER_MARKERS):
        return "L1"
    return "L3" if cert_verdict == "valid" else "L2"


def _shortfall_reason(level: Level, cert_verdict: str | None, version: str | None) -> str:
    if level == "L0":
        return "starttls-not-supported"
    if level == "L1":
        return "tls-version-too-low"
    if level == "L2":
        return cert_verdict if cert_verdict and cert_verdict != "valid" else "validation-failure"
    return "validation-failure"


def judge_host(
    host: str,
    *,
    version: str | None,
    cipher: str | None,
    cert_verdict: str | None,
    policy: TLSPolicy,
    recipient: RecipientPolicy,
) -> HostVerdict:
    """Decide whether a message may go to ``host`` after its TLS handshake (or lack of one)."""
    base = transport_level(version, cipher, cert_verdict)
    facts = {"tls_version": version, "cipher": cipher, "certificate": cert_verdict}
    if recipient.sts_temporary and recipient.dane in ("none", "unchecked"):
        return HostVerdict(
            host,
            base,
            False,
            "sts-policy-fetch-error",
            defer=True,
            detail="MTA-STS discovery failed in DNS",
            facts=facts,
        )
    if recipient.dane == "bogus":
        return HostVerdict(
            host,
            base,
            False,
            "dnssec-invalid",
            defer=True,
            detail="TLSA lookup failed DNSSEC validation",
            facts=facts,
        )
    level: Level = base
    dane_ok = recipient.dane == "match" and base != "L0"
    sts_ok = recipient.sts_enforced and recipient.sts_listed and base == "L3"
    if dane_ok or sts_ok:
        level = "L4"
    # recipient floors apply whatever the campaign's mode
    if recipient.dane == "mismatch" or (recipient.dane == "match" and base == "L0"):
        reason = "starttls-not-supported" if base == "L0" else "tlsa-invalid"
        return HostVerdict(
            host,
            level,
            False,
            reason,
            detail="DANE TLSA records exist but the server does not match",
            facts=facts,
        )
    if recipient.sts_enforced:
        if not recipient.sts_listed:
            return HostVerdict(
                host,
                level,
                False,
                "validation-failure",
                detail="MX host not listed in the MTA-STS policy",
                facts=facts,
            )
        if base != "L3":
            reason = _shortfall_reason(base, cert_verdict, version)
            if base == "L2":
                reason = "sts-webpki-invalid" if reason == "validation-failure" else reason
            return HostVerdict(
                host,
                level,
                False,
                reason,
                detail="MTA-STS enforce needs a valid certificate",
                facts=facts,
            )
    if policy.mode == "secure" and not level_at_least(level, policy.min_level):
        reason = _shortfall_reason(level, cert_verdict, version)
        detail = f"level {level} below the required {policy.min_level}"
        if policy.min_level == "L4" and level == "L3":
            detail = "no MTA-STS enforce policy or DANE match for this MX host"
        return HostVerdict(host, level, False, reason, detail=detail, facts=facts)
    return HostVerdict(host, level, True, facts=facts)
