"""``recapito tls check``: what each MX of a domain offers and what every policy would decide.

Polite by construction: each MX host is contacted at most once per check, however many
of the checked domains share it (one EHLO + STARTTLS + QUIT, nothing is sent), with a
global cap on parallel connections and timeouts on every step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recapito.delivery.dns import MXHost, MXResolver, MXResult
from recapito.delivery.engine import NoRecipientPolicies, RecipientPolicies
from recapito.delivery.smtp import ConnectFailed, MXSession
from recapito.delivery.tls import TLSFacts, client_context
from recapito.security.policy import (
    LEVELS,
    RecipientPolicy,
    TLSPolicy,
    judge_host,
    transport_level,
)

POLICY_NAMES = ("opportunistic", "L1", "L2", "L3", "L4")


@dataclass(frozen=True)
class HostProbe:
    """What one MX host offered on one connection (or why it could not be reached)."""

    host: str
    reachable: bool
    starttls: bool
    tls: TLSFacts
    error: str | None = None


class HostAssessor:
    """Probes MX hosts, each at most once, sharing the result between domains."""

    def __init__(
        self,
        *,
        port: int,
        helo_name: str,
        extra_ca_file: Path | None,
        timeout: float = 15.0,
        max_parallel: int = 20,
    ) -> None:
        self.port = port
        self.helo_name = helo_name
        self.extra_ca_file = extra_ca_file
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max_parallel)
        self._probes: dict[str, asyncio.Task[HostProbe]] = {}
        self.connections = 0

    def probe(self, host: MXHost) -> asyncio.Task[HostProbe]:
        task = self._probes.get(host.name)
        if task is None:
            task = self._probes[host.name] = asyncio.ensure_future(self._probe(host))
        return task

    async def _probe(self, host: MXHost) -> HostProbe:
        errors: list[str] = []
        async with self._slots:
            for address in host.addresses:
                session = MXSession(
                    host.name,
                    address,
                    self.port,
                    helo_name=self.helo_name,
                    extra_ca_file=self.extra_ca_file,
                    connect_timeout=self.timeout,
                    command_timeout=self.timeout,
                )
                self.connections += 1
                try:
                    # the legacy-capable context classifies old servers too; nothing is sent
                    await session.open(client_context(legacy=True))
                except ConnectFailed as exc:
                    if exc.tls_failed:
                        return HostProbe(
                            host.name, True, True, TLSFacts(None, None, None), error=str(exc)
                        )
                    errors.append(str(exc))
                    continue
                await session.close()
                return HostProbe(host.name, True, session.starttls_offered, session.tls)
        return HostProbe(
            host.name,
            False,
            False,
            TLSFacts(None, None, None),
            error="; ".join(errors) or "no address",
        )


def _weakness(level: str, tls: TLSFacts) -> str | None:
    if level == "L0":
        return "starttls-not-supported"
    if level == "L1":
        return "tls-version-too-low"
    if level == "L2":
        return tls.cert_verdict or "validation-failure"
    return None


def _describe_host(host: MXHost, probe: HostProbe, recipient: RecipientPolicy) -> dict[str, Any]:
    entry: dict[str, Any] = {"host": host.name, "preference": host.preference}
    tls = probe.tls
    if not probe.reachable:
        entry.update(
            level=None,
            tls_version=None,
            cipher=None,
            certificate=None,
            reason="connection_failed",
            detail=probe.error,
        )
    elif probe.starttls and tls.version is None:
        # STARTTLS offered, but no handshake succeeded even with the legacy context
        entry.update(
            level="L0",
            tls_version=None,
            cipher=None,
            certificate=None,
            reason="validation-failure",
            detail=probe.error,
        )
    else:
        judged = judge_host(
            host.name,
            version=tls.version,
            cipher=tls.cipher,
            cert_verdict=tls.cert_verdict,
            policy=TLSPolicy(),
            recipient=recipient,
        )
        base = transport_level(tls.version, tls.cipher, tls.cert_verdict)
        entry.update(
            level=judged.level,
            tls_version=tls.version,
            cipher=tls.cipher,
            certificate=tls.cert_verdict,
            reason=judged.reason or _weakness(base, tls),
        )
    entry["dane"] = None if recipient.dane == "unchecked" else recipient.dane
    return entry


def _decide(
    policy: TLSPolicy,
    hosts: tuple[MXHost, ...],
    probes: list[HostProbe],
    recipients: list[RecipientPolicy],
) -> str:
    """What delivery would do under ``policy``: the engine's rule, on the probed facts."""
    outcome = "insecure_channel"
    for host, probe, recipient in zip(hosts, probes, recipients, strict=True):
        if not probe.reachable or (probe.starttls and probe.tls.version is None):
            outcome = "defer"  # an unreachable MX might have qualified
            continue
        verdict = judge_host(
            host.name,
            version=probe.tls.version,
            cipher=probe.tls.cipher,
            cert_verdict=probe.tls.cert_verdict,
            policy=policy,
            recipient=recipient,
        )
        if verdict.send:
            return "send"
        if verdict.defer:
            outcome = "defer"
    return outcome


async def check_domain(
    domain: str,
    resolver: MXResolver,
    assessor: HostAssessor,
    policies: RecipientPolicies,
) -> dict[str, Any]:
    mx: MXResult = await resolver.resolve(domain)
    result: dict[str, Any] = {"domain": mx.domain, "mx": [], "mta_sts": None, "dane": None}
    if mx.error is not None:
        verdict = "domain_invalid" if mx.permanent_failure else "defer"
        result["error"] = f"{mx.error}: {mx.detail}"
        result["decision"] = dict.fromkeys(POLICY_NAMES, verdict)
        return result
    probes = list(await asyncio.gather(*(assessor.probe(h) for h in mx.hosts)))
    recipients = [
        await policies.for_host(mx, host, assessor.port, probe.tls.chain)
        for host, probe in zip(mx.hosts, probes, strict=True)
    ]
    result["mx"] = [
        _describe_host(host, probe, recipient)
        for host, probe, recipient in zip(mx.hosts, probes, recipients, strict=True)
    ]
    result["mta_sts"] = recipients[0].sts_mode
    dane = sorted({r.dane for r in recipients} - {"unchecked"})
    result["dane"] = ",".join(dane) or None
    result["decision"] = {
        name: _decide(
            TLSPolicy() if name == "opportunistic" else TLSPolicy.parse(name),
            mx.hosts,
            probes,
            recipients,
        )
        for name in POLICY_NAMES
    }
    return result


async def check_domains(
    domains: list[str],
    *,
    resolver: MXResolver,
    port: int,
    helo_name: str,
    extra_ca_file: Path | None,
    policies: RecipientPolicies | None = None,
    timeout: float = 15.0,
) -> tuple[list[dict[str, Any]], int]:
    """Check every domain; returns the results and how many connections were opened."""
    assessor = HostAssessor(
        port=port, helo_name=helo_name, extra_ca_file=extra_ca_file, timeout=timeout
    )
    chosen = policies or NoRecipientPolicies()
    results = await asyncio.gather(*(check_domain(d, resolver, assessor, chosen) for d in domains))
    return list(results), assessor.connections


__all__ = ["LEVELS", "HostAssessor", "check_domain", "check_domains"]
