"""What the sandbox world contains: MX postures, demo domains and their DNS shape.

This module is pure data: the servers (``recapito.sandbox.servers``), the DNS zone
(``recapito.sandbox.dns``) and the demo-data generator all read it, so the three agree.

Every MX server listens on its own loopback address and on the same port
(``RECAPITO_MX_PORT``), as real MX hosts all listen on 25 at different addresses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

# The demo sender's domain (``make demo`` sends as comunicazioni@banca-esempio.test). The
# sandbox makes a DKIM key per selector for it and publishes the public keys in its DNS.
SENDER_DOMAIN = "banca-esempio.test"
SENDER_DKIM_SELECTORS: tuple[tuple[str, Literal["rsa-sha256", "ed25519-sha256"]], ...] = (
    ("sandbox-rsa", "rsa-sha256"),
    ("sandbox-ed25519", "ed25519-sha256"),
)
# the algorithms the sandbox's settings sign with (both keys are published in DNS)
SENDER_DKIM_SIGNING: tuple[str, ...] = ("rsa-sha256",)

Posture = Literal[
    "tls13",  # TLS 1.3, certificate from the sandbox CA naming the MX host
    "tls12",  # TLS 1.2 at most, sandbox-CA certificate
    "selfsigned",  # TLS with a self-signed certificate
    "expired",  # TLS, sandbox-CA certificate that has expired
    "wrongname",  # TLS, sandbox-CA certificate for another host name
    "plain",  # no STARTTLS offered
    "greylist",  # 451 4.7.1 on the first try of a sender/recipient pair
    "rejecting",  # 550 5.1.1 for some mailboxes (see REJECTED_LOCAL_MARKERS), TLS 1.3
    "legacy",  # TLS 1.0/1.1 only (old ciphers allowed), sandbox-CA certificate
    "flapping",  # offers STARTTLS on its first FLAPPING_TLS_CONNECTIONS connections, then never
]


@dataclass(frozen=True)
class MXServer:
    host: str  # MX host name as published in DNS
    address: str  # loopback address it listens on
    posture: Posture


# The MX servers. Addresses 127.0.0.20-29 are reserved for the sandbox MX hosts;
# 127.0.0.29 is deliberately left without a listener (a dead primary MX).
MX_SERVERS: tuple[MXServer, ...] = (
    MXServer("mx.tls13.sandbox.test", "127.0.0.20", "tls13"),
    MXServer("mx.tls12.sandbox.test", "127.0.0.21", "tls12"),
    MXServer("mx.selfsigned.sandbox.test", "127.0.0.22", "selfsigned"),
    MXServer("mx.plain.sandbox.test", "127.0.0.23", "plain"),
    MXServer("mx.greylist.sandbox.test", "127.0.0.24", "greylist"),
    MXServer("mx.rejecting.sandbox.test", "127.0.0.25", "rejecting"),
    MXServer("mx.expired.sandbox.test", "127.0.0.26", "expired"),
    MXServer("mx.wrongname.sandbox.test", "127.0.0.27", "wrongname"),
    MXServer("mx.legacy.sandbox.test", "127.0.0.30", "legacy"),
    MXServer("mx.flapping.sandbox.test", "127.0.0.31", "flapping"),
)
# The flapping MX stops offering STARTTLS after this many connections (a stripped or
# downgraded server, as an attacker in the path would make it look).
FLAPPING_TLS_CONNECTIONS = 2
DEAD_MX = MXServer("mx.dead.sandbox.test", "127.0.0.29", "tls13")  # never listens
MX_BY_POSTURE: dict[str, MXServer] = {s.posture: s for s in MX_SERVERS}

# Accepted at RCPT, undeliverable later: every sandbox MX server accepts a recipient whose
# local part contains one of these markers, then writes an RFC 3464 delivery status
# notification to the envelope sender (the signed VERP return path) into the bounce mailbox
# instead of storing the message. Marker -> (status, diagnostic text of the remote MTA).
BOUNCE_LATER_MARKERS: dict[str, tuple[str, str]] = {
    "trasferito": ("5.1.1", "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"),
    "casellapiena": ("5.2.2", "552 5.2.2 <{rcpt}>: Mailbox full: quota exceeded"),
    "disattivato": ("5.2.1", "550 5.2.1 <{rcpt}>: Mailbox disabled, not accepting messages"),
}
# The bounce mailbox (a Dovecot IMAP user) and the name on its certificate: the collector
# connects to ``localhost`` and verifies that name against the sandbox CA.
BOUNCE_MAILBOX_USER = "bounces"
IMAP_SERVER = MXServer("localhost", "127.0.0.1", "tls13")
# The host name the sandbox's DSNs say they come from (Reporting-MTA).
BOUNCE_REPORTING_SUFFIX = "sandbox.test"


def bounce_later(address: str) -> tuple[str, str] | None:
    """(status, diagnostic) when ``address`` is accepted now and bounced later, else None."""
    local = address.rpartition("@")[0].lower()
    for marker, (status, text) in BOUNCE_LATER_MARKERS.items():
        if marker in local:
            return status, text.format(rcpt=address)
    return None


# Greylisting: a sender/recipient pair is refused until this many seconds after its first try.
GREYLIST_DELAY_SECONDS = 1.0
# The rejecting MX answers 550 5.1.1 for local parts containing one of these markers.
REJECTED_LOCAL_MARKERS = ("inesistente", "nobody", "cessato")


@dataclass(frozen=True)
class Domain:
    name: str
    mx: tuple[tuple[int, str], ...]  # (preference, MX host name); empty = no MX record
    weight: float  # share of demo addresses (0 = not used for ordinary addresses)
    kind: Literal["email", "pec", "null_mx", "nxdomain", "implicit_mx"] = "email"


def _mx(posture: str, pref: int = 10) -> tuple[int, str]:
    return (pref, MX_BY_POSTURE[posture].host)


# -- MTA-STS (RFC 8461) ------------------------------------------------------------------------

MTASTSPosture = Literal[
    "valid",  # 200 text/plain, a well-formed policy, certificate from the sandbox CA
    "broken",  # 200 text/plain, but the policy does not parse
    "oversize",  # 200 text/plain, a well-formed policy padded beyond 64 KiB
    "redirect",  # 302 to another policy URL (senders must not follow it)
    "wrongtype",  # 200 with a well-formed policy served as text/html
    "selfsigned",  # a well-formed policy behind a self-signed certificate
    "unreachable",  # the policy host's address has no listener
]

# The policy hosts (``mta-sts.<domain>``) all resolve to the sandbox HTTPS server, which picks
# the certificate by SNI and the answer by Host header; ``unreachable`` points at the dead MX
# address instead (nothing ever listens there).
MTA_STS_ADDRESS = "127.0.0.1"


@dataclass(frozen=True)
class MTASTSSite:
    """A domain publishing MTA-STS: its ``_mta-sts`` TXT id and what its policy host serves."""

    domain: str
    mx_posture: str  # the MX server its MX record points at
    posture: MTASTSPosture
    mode: Literal["enforce", "testing", "none"]
    mx_patterns: tuple[str, ...]
    policy_id: str = "20261201"
    max_age: int = 86400

    @property
    def policy_host(self) -> str:
        return f"mta-sts.{self.domain}"

    @property
    def policy_address(self) -> str:
        return DEAD_MX.address if self.posture == "unreachable" else MTA_STS_ADDRESS

    def policy_text(self) -> str:
        """The policy as a well-behaved policy host would serve it."""
        lines = ["version: STSv1", f"mode: {self.mode}"]
        lines += [f"mx: {pattern}" for pattern in self.mx_patterns]
        lines.append(f"max_age: {self.max_age}")
        return "\r\n".join(lines) + "\r\n"


MTA_STS_SITES: tuple[MTASTSSite, ...] = (
    # enforce, and the MX (TLS 1.3, CA certificate naming it) is listed: L4 is reachable
    MTASTSSite("sts-enforce.test", "tls13", "valid", "enforce", ("mx.tls13.sandbox.test",)),
    # testing: report-only; the wildcard lists the TLS 1.2 MX
    MTASTSSite("sts-testing.test", "tls12", "valid", "testing", ("*.tls12.sandbox.test",)),
    # none: the domain withdrew its policy
    MTASTSSite("sts-none.test", "tls13", "valid", "none", ("mx.tls13.sandbox.test",)),
    # enforce, the MX is listed but its certificate names another host: no compliant MX
    MTASTSSite(
        "sts-enforce-badcert.test", "wrongname", "valid", "enforce", ("mx.wrongname.sandbox.test",)
    ),
    # enforce, but no pattern matches the MX host
    MTASTSSite(
        "sts-enforce-mismatch.test", "tls13", "valid", "enforce", ("*.altro-provider.test",)
    ),
    MTASTSSite("sts-broken.test", "tls13", "broken", "enforce", ("mx.tls13.sandbox.test",)),
    MTASTSSite("sts-oversize.test", "tls13", "oversize", "enforce", ("mx.tls13.sandbox.test",)),
    MTASTSSite("sts-redirect.test", "tls13", "redirect", "enforce", ("mx.tls13.sandbox.test",)),
    MTASTSSite("sts-wrongtype.test", "tls13", "wrongtype", "enforce", ("mx.tls13.sandbox.test",)),
    MTASTSSite("sts-badwebcert.test", "tls13", "selfsigned", "enforce", ("mx.tls13.sandbox.test",)),
    MTASTSSite(
        "sts-unreachable.test", "tls13", "unreachable", "enforce", ("mx.tls13.sandbox.test",)
    ),
)
MTA_STS_BY_DOMAIN: dict[str, MTASTSSite] = {s.domain: s for s in MTA_STS_SITES}


DOMAINS: tuple[Domain, ...] = (
    # ordinary mailbox providers, skewed like a real Italian audience
    Domain("postaveloce.test", (_mx("tls13"), _mx("tls12", 20)), 0.34),
    Domain("mailitalia.test", (_mx("tls13"),), 0.20),
    Domain("casella.test", (_mx("tls12"),), 0.12),
    Domain("webposta.test", (_mx("greylist"),), 0.06),
    Domain("aziendale.test", (_mx("selfsigned"),), 0.07),
    Domain("vecchiaposta.test", (_mx("plain"),), 0.06),
    Domain("comune-esempio.test", (_mx("rejecting"),), 0.06),
    Domain("studio-legale.test", (_mx("expired"),), 0.03),
    Domain("hosting-condiviso.test", (_mx("wrongname"),), 0.03),
    # primary MX dead, secondary alive: exercises failover across MX hosts
    Domain("doppio-mx.test", ((10, DEAD_MX.host), _mx("tls13", 20)), 0.02),
    # an old server that speaks only TLS 1.0/1.1, and one whose STARTTLS disappears
    Domain("vecchio-tls.test", (_mx("legacy"),), 0.0),
    Domain("instabile.test", (_mx("flapping"),), 0.0),
    # no MX record: the domain's own A record is the implicit MX (RFC 5321 §5.1)
    Domain("solo-a.test", (), 0.005, "implicit_mx"),
    # null MX (RFC 7505): accepts no mail
    Domain("nessuna-posta.test", ((0, "."),), 0.005, "null_mx"),
    # not in DNS at all
    Domain("dominio-inesistente.test", (), 0.005, "nxdomain"),
    # PEC domains (certified mail addresses; delivered by the PEC issue, not by e-mail)
    Domain("pec.postaveloce.test", (_mx("tls13"),), 0.0, "pec"),
    Domain("legalmail-esempio.test", (_mx("tls13"),), 0.0, "pec"),
    # MTA-STS domains (weight 0: used by the MTA-STS tests, not by the demo audience)
    *(Domain(site.domain, (_mx(site.mx_posture),), 0.0) for site in MTA_STS_SITES),
)
DOMAINS_BY_NAME: dict[str, Domain] = {d.name: d for d in DOMAINS}
# The implicit-MX domain's A record points at this server.
IMPLICIT_MX_TARGET = MX_BY_POSTURE["tls12"]


def email_domains() -> list[tuple[str, float]]:
    """(domain, weight) of every domain used for ordinary demo e-mail addresses."""
    return [(d.name, d.weight) for d in DOMAINS if d.weight > 0]


def pec_domains() -> list[str]:
    return [d.name for d in DOMAINS if d.kind == "pec"]


def catch_all_posture(domain: str) -> MXServer:
    """Catch-all mode: the MX server that stands in for an arbitrary real domain.

    Chosen deterministically from the domain name so reruns land in the same place.
    """
    live = [s for s in MX_SERVERS if s.posture != "rejecting"]
    digest = hashlib.sha256(domain.lower().rstrip(".").encode()).digest()
    return live[int.from_bytes(digest[:4], "big") % len(live)]


# -- DNSSEC-signed domains for DANE (RFC 7672) ----------------------------------------------
#
# These live outside ``DOMAINS`` on purpose: each one is a zone of its own, signed and served
# by nsd (``recapito.sandbox.dnssec``), reachable only through the sandbox's validating
# resolver (unbound). The unsigned dnslib zone does not know them, so without DNSSEC tools
# they simply do not exist instead of existing unsigned. None of them takes part in the demo
# audience (weight 0).

DaneCase = Literal[
    "ee",  # TLSA 3 1 1 of the tls13 server's key: DANE-EE matches
    "ta",  # TLSA 2 0 1 of the sandbox CA; the MX certificate names the MX host
    "mismatch",  # a TLSA record that matches nothing the server presents
    "bogus",  # the TLSA record is altered after signing: validation fails (SERVFAIL)
    "notlsa",  # signed zone, no TLSA record at all
]


@dataclass(frozen=True)
class SignedDomain:
    name: str  # the zone apex, also the mail domain
    mx_host: str  # its only MX host, inside the same signed zone
    address: str  # the MX host's A record
    dane: DaneCase
    weight: float = 0.0


# The MX host of the DANE-TA case. Its certificate, issued by the sandbox CA, names it, and the
# server presents the CA certificate too (RFC 7672 §3.1.2: a DANE-TA trust anchor must be in
# the chain). It is served by the DNSSEC process, not by one of the posture servers above.
DANE_TA_MX = MXServer("mx.dane-ta.test", "127.0.0.28", "tls13")

SIGNED_DOMAINS: tuple[SignedDomain, ...] = (
    SignedDomain("dane-ok.test", "mx.dane-ok.test", MX_BY_POSTURE["tls13"].address, "ee"),
    SignedDomain("dane-ta.test", DANE_TA_MX.host, DANE_TA_MX.address, "ta"),
    SignedDomain(
        "dane-mismatch.test", "mx.dane-mismatch.test", MX_BY_POSTURE["tls13"].address, "mismatch"
    ),
    SignedDomain("dane-bogus.test", "mx.dane-bogus.test", MX_BY_POSTURE["tls13"].address, "bogus"),
    SignedDomain(
        "dane-notlsa.test", "mx.dane-notlsa.test", MX_BY_POSTURE["tls13"].address, "notlsa"
    ),
)
SIGNED_DOMAINS_BY_NAME: dict[str, SignedDomain] = {d.name: d for d in SIGNED_DOMAINS}
# Mail domains inside the dane-bogus.test zone: the MX record of the first fails DNSSEC
# validation; the second has a valid MX record whose host's A record fails validation.
BOGUS_MX_DOMAIN = "bogus-mx.dane-bogus.test"
BOGUS_A_DOMAIN = "bogus-a.dane-bogus.test"
BOGUS_A_HOST = "mx.bogus-a.dane-bogus.test"
