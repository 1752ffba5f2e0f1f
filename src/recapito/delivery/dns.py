"""MX resolution (RFC 5321 §5.1) over dnspython: the only module here that imports it.

Results are data: a list of MX hosts with their addresses in preference order, or a
verdict that is either permanent (the domain takes no mail) or temporary (ask again
later). A DNS failure is never taken to mean "no TLS" or "send in cleartext".
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver


@dataclass(frozen=True)
class MXHost:
    preference: int
    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class MXResult:
    domain: str
    hosts: tuple[MXHost, ...] = ()
    # None when hosts were found; otherwise why not
    error: Literal["nxdomain", "null_mx", "no_mail_host", "temporary"] | None = None
    detail: str = ""
    implicit: bool = False  # no MX records: the domain's own address is the MX

    @property
    def permanent_failure(self) -> bool:
        return self.error in ("nxdomain", "null_mx", "no_mail_host")


@dataclass
class MXResolver:
    """Asynchronous MX resolver with a per-instance cache (one campaign run)."""

    nameserver: tuple[str, int] | None = None
    timeout: float = 5.0
    _cache: dict[str, MXResult] = field(default_factory=dict)
    _inflight: dict[str, asyncio.Future[MXResult]] = field(default_factory=dict)
    _resolver: dns.asyncresolver.Resolver | None = None

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            if self.nameserver is None:
                resolver = dns.asyncresolver.Resolver()
            else:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [self.nameserver[0]]
                resolver.port = self.nameserver[1]
            resolver.lifetime = self.timeout
            resolver.timeout = min(2.0, self.timeout)
            self._resolver = resolver
        return self._resolver

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
        except dns.resolver.NoAnswer:
            # RFC 5321 §5.1: no MX records, the domain itself is the mail host
            addresses = await self._addresses(domain)
            if isinstance(addresses, str):
                return MXResult(domain, error="temporary", detail=addresses)
            if not addresses:
                return MXResult(domain, error="no_mail_host", detail="no MX and no address")
            return MXResult(domain, hosts=(MXHost(0, domain, addresses),), implicit=True)
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.YXDOMAIN) as exc:
            return MXResult(domain, error="temporary", detail=type(exc).__name__)
        except dns.exception.DNSException as exc:
            return MXResult(domain, error="temporary", detail=type(exc).__name__)
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
        for (pref, name), addrs in zip(ordered, lookups, strict=True):
            if isinstance(addrs, str):
                failures.append(f"{name}: {addrs}")
            elif addrs:
                hosts.append(MXHost(pref, name, addrs))
        if hosts:
            return MXResult(domain, hosts=tuple(hosts))
        if failures:
            return MXResult(domain, error="temporary", detail="; ".join(failures))
        return MXResult(domain, error="no_mail_host", detail="no MX host has an address")

    async def _addresses(self, host: str) -> tuple[str, ...] | str:
        """Addresses of a host (A then AAAA); a string describes a temporary failure."""
        resolver = self._get_resolver()
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(host, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                if found:
                    break
                return type(exc).__name__
            found.extend(r.to_text() for r in answer)
        return tuple(found)
