"""MX resolution (RFC 5321 §5.1) over dnspython: the only module here that imports it.

Results are data: a list of MX hosts with their addresses in preference order, or a
verdict that is either permanent (the domain takes no mail) or temporary (ask again
later). A DNS failure is never taken to mean "no TLS" or "send in cleartext".

With ``dnssec=True`` the nameserver is a trusted DNSSEC-validating resolver
(``RECAPITO_DANE_RESOLVER``): queries carry EDNS with the DO bit, the results say whether the
MX and address answers were validated (``authenticated``, the AD bit), which DANE needs
(RFC 7672 §2.2), and a SERVFAIL from it, its answer for data that fails validation, comes
back as a temporary error with detail ``dnssec-invalid``.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver

# EDNS payload size announced to a validating resolver (the DNS flag day 2020 value).
DNSSEC_PAYLOAD = 1232
# The TLS-RPT result type for a DNSSEC validation failure, used as the detail of such errors.
DNSSEC_INVALID = "dnssec-invalid"


def make_resolver(nameserver: tuple[str, int] | None, timeout: float) -> dns.asyncresolver.Resolver:
    """An asynchronous resolver: the system's, or only ``nameserver`` when one is configured."""
    if nameserver is None:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [nameserver[0]]
        resolver.port = nameserver[1]
    resolver.lifetime = timeout
    resolver.timeout = min(2.0, timeout)
    return resolver


@dataclass(frozen=True)
class MXHost:
    preference: int
    name: str
    addresses: tuple[str, ...]
    authenticated: bool = False  # the address answers were DNSSEC-validated (dnssec mode)


@dataclass(frozen=True)
class MXResult:
    domain: str
    hosts: tuple[MXHost, ...] = ()
    # None when hosts were found; otherwise why not
    error: Literal["nxdomain", "null_mx", "no_mail_host", "temporary"] | None = None
    detail: str = ""
    implicit: bool = False  # no MX records: the domain's own address is the MX
    authenticated: bool = False  # the MX answer (or its absence) was DNSSEC-validated

    @property
    def permanent_failure(self) -> bool:
        return self.error in ("nxdomain", "null_mx", "no_mail_host")


@dataclass
class MXResolver:
    """Asynchronous MX resolver with a per-instance cache (one campaign run)."""

    nameserver: tuple[str, int] | None = None
    timeout: float = 5.0
    # ``nameserver`` is a trusted validating resolver: ask with DO, report its AD bit
    dnssec: bool = False
    _cache: dict[str, MXResult] = field(default_factory=dict)
    _inflight: dict[str, asyncio.Future[MXResult]] = field(default_factory=dict)
    _resolver: dns.asyncresolver.Resolver | None = None

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            resolver = make_resolver(self.nameserver, self.timeout)
            if self._trust_ad:
                resolver.use_edns(0, dns.flags.DO, DNSSEC_PAYLOAD)
            self._resolver = resolver
        return self._resolver

    @property
    def _trust_ad(self) -> bool:
        # The AD bit means something only from the resolver we were told to trust.
        return self.dnssec and self.nameserver is not None

    def _validated(self, response: dns.message.Message | None) -> bool:
        return self._trust_ad and response is not None and bool(response.flags & dns.flags.AD)

    def _failure(self, exc: dns.exception.DNSException) -> str:
        """The detail of a temporary failure; a validating resolver's SERVFAIL is bogus DNSSEC."""
        if self._trust_ad and isinstance(exc, dns.resolver.NoNameservers):
            for error in exc.kwargs.get("errors", ()):
                response = error[-1] if isinstance(error, tuple) and error else None
                if (
                    isinstance(response, dns.message.Message)
                    and response.rcode() == dns.rcode.SERVFAIL
                ):
                    return DNSSEC_INVALID
        return type(exc).__name__

    async def resolve(self, domain: str) -> MXResult:
        key = domain.lower().rstrip(".")
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[MXResult] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            result = await self._resolve(key)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._inflight.pop(key, None)
        if result.error != "temporary":
            self._cache[key] = result
        fut.set_result(result)
        return result

    async def _resolve(self, domain: str) -> MXResult:
        resolver = self._get_resolver()
        try:
            answer = await resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            return MXResult(domain, error="nxdomain", detail="domain does not exist")
        except dns.resolver.NoAnswer as exc:
            # RFC 5321 §5.1: no MX records, the domain itself is the mail host
            secure_mx = self._validated(exc.kwargs.get("response"))
            found = await self._addresses(domain)
            if isinstance(found, str):
                return MXResult(domain, error="temporary", detail=found)
            addresses, secure = found
            if not addresses:
                return MXResult(domain, error="no_mail_host", detail="no MX and no address")
            return MXResult(
                domain,
                hosts=(MXHost(0, domain, addresses, secure),),
                implicit=True,
                authenticated=secure_mx,
            )
        except dns.exception.DNSException as exc:
            return MXResult(domain, error="temporary", detail=self._failure(exc))
        secure_mx = self._validated(answer.response)
        records = sorted(
            ((int(r.preference), r.exchange.to_text().rstrip(".").lower()) for r in answer),
            key=lambda pr: pr[0],
        )
        if any(name in ("", ".") for _, name in records):
            # RFC 7505 null MX: the domain declares it accepts no mail
            return MXResult(domain, error="null_mx", detail="null MX record (RFC 7505)")
        # equal preferences are tried in random order (RFC 5321 §5.1)
        groups: dict[int, list[str]] = {}
        for pref, name in records:
            groups.setdefault(pref, []).append(name)
        ordered: list[tuple[int, str]] = []
        for pref in sorted(groups):
            names = groups[pref]
            random.shuffle(names)
            ordered.extend((pref, n) for n in names)
        lookups = await asyncio.gather(*(self._addresses(name) for _, name in ordered))
        hosts: list[MXHost] = []
        failures: list[str] = []
        for (pref, name), found in zip(ordered, lookups, strict=True):
            if isinstance(found, str):
                failures.append(f"{name}: {found}")
            elif found[0]:
                hosts.append(MXHost(pref, name, found[0], found[1]))
        if hosts:
            return MXResult(domain, hosts=tuple(hosts), authenticated=secure_mx)
        if failures:
            detail = "; ".join(failures)
            if all(f.endswith(f": {DNSSEC_INVALID}") for f in failures):
                detail = f"{DNSSEC_INVALID}: {detail}"
            return MXResult(domain, error="temporary", detail=detail)
        return MXResult(domain, error="no_mail_host", detail="no MX host has an address")

    async def _addresses(self, host: str) -> tuple[tuple[str, ...], bool] | str:
        """Addresses of a host (A then AAAA) and whether every answer was DNSSEC-validated;
        a string describes a temporary failure."""
        resolver = self._get_resolver()
        found: list[str] = []
        secure = self._trust_ad
        for rdtype in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(host, rdtype)
            except dns.resolver.NXDOMAIN:
                secure = False
                continue
            except dns.resolver.NoAnswer as exc:
                secure = secure and self._validated(exc.kwargs.get("response"))
                continue
            except dns.exception.DNSException as exc:
                failure = self._failure(exc)
                # An AAAA lookup that fails after A succeeded leaves the A records usable,
                # but not when validation failed: forged data makes the whole host suspect.
                if found and failure != DNSSEC_INVALID:
                    secure = False
                    break
                return failure
            secure = secure and self._validated(answer.response)
            found.extend(r.to_text() for r in answer)
        return tuple(found), secure
