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

Posture = Literal[
    "tls13",  # TLS 1.3, certificate from the sandbox CA naming the MX host
    "tls12",  # TLS 1.2 at most, sandbox-CA certificate
    "selfsigned",  # TLS with a self-signed certificate
    "expired",  # TLS, sandbox-CA certificate that has expired
    "wrongname",  # TLS, sandbox-CA certificate for another host name
    "plain",  # no STARTTLS offered
    "greylist",  # 451 4.7.1 on the first try of a sender/recipient pair
    "rejecting",  # 550 5.1.1 for some mailboxes (see REJECTED_LOCAL_MARKERS), TLS 1.3
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
)
DEAD_MX = MXServer("mx.dead.sandbox.test", "127.0.0.29", "tls13")  # never listens
MX_BY_POSTURE: dict[str, MXServer] = {s.posture: s for s in MX_SERVERS}

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
    # no MX record: the domain's own A record is the implicit MX (RFC 5321 §5.1)
    Domain("solo-a.test", (), 0.005, "implicit_mx"),
    # null MX (RFC 7505): accepts no mail
    Domain("nessuna-posta.test", ((0, "."),), 0.005, "null_mx"),
    # not in DNS at all
    Domain("dominio-inesistente.test", (), 0.005, "nxdomain"),
    # PEC domains (certified mail addresses; delivered by the PEC issue, not by e-mail)
    Domain("pec.postaveloce.test", (_mx("tls13"),), 0.0, "pec"),
    Domain("legalmail-esempio.test", (_mx("tls13"),), 0.0, "pec"),
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
