"""Recipient-published policies (DANE, MTA-STS) for the delivery engine and ``tls check``.

DANE is consulted only through a configured validating resolver whose AD bit we trust
(``RECAPITO_DANE_RESOLVER``); MTA-STS always, through the configured resolver and HTTPS.
DANE comes first: when it applies, MTA-STS is not consulted (RFC 8461 §2).
"""

from __future__ import annotations

from recapito.config import Settings
from recapito.delivery.dns import MXHost, MXResolver, MXResult
from recapito.delivery.engine import RecipientPolicies
from recapito.security.dane import DANEOutcome, DANEResolver, dane_outcome, match_tlsa
from recapito.security.mta_sts import MTASTSResolver, PolicyStore
from recapito.security.policy import RecipientPolicy


class PublishedPolicies:
    """``RecipientPolicies`` from what the recipient domain publishes."""

    def __init__(self, sts: MTASTSResolver | None, dane: DANEResolver | None = None) -> None:
        self.sts = sts
        self.dane = dane

    async def for_host(
        self,
        mx: MXResult,
        host: MXHost,
        port: int,
        chain: tuple[bytes, ...],
        *,
        refresh: bool = False,
    ) -> RecipientPolicy:
        dane: DANEOutcome = "unchecked"
        if self.dane is not None:
            tlsa = await self.dane.tlsa_for(mx, host, port, refresh=refresh)
            verdict = match_tlsa(tlsa.records, chain, host.name) if tlsa.applies and chain else None
            dane = dane_outcome(tlsa, verdict)
            if dane in ("match", "mismatch", "bogus"):
                return RecipientPolicy(dane=dane)  # DANE applies: MTA-STS is not consulted
        if self.sts is None:
            return RecipientPolicy(dane=dane)
        result = await self.sts.policy(mx.domain, refresh=refresh)
        return RecipientPolicy(
            dane=dane,
            sts_mode=result.mode,
            sts_listed=result.lists(host.name) if result.policy is not None else True,
            sts_error=result.error,
            sts_temporary=result.temporary,
        )


def recipient_policies(
    settings: Settings,
    nameserver: tuple[str, int] | None = None,
    store: PolicyStore | None = None,
) -> RecipientPolicies:
    """The policy sources for these settings; ``nameserver`` overrides the configured one."""
    sts = MTASTSResolver.from_settings(settings, store=store)
    if nameserver is not None and settings.dane_resolver is None:
        sts = MTASTSResolver(
            nameserver=nameserver,
            https_port=settings.https_port,
            extra_ca_file=settings.tls_ca_file,
            store=store,
        )
    dane = DANEResolver(settings.dane_resolver) if settings.dane_resolver is not None else None
    return PublishedPolicies(sts, dane)


def mx_resolver(
    settings: Settings, nameserver: tuple[str, int] | None = None, timeout: float = 5.0
) -> MXResolver:
    """The MX resolver for these settings: through the validating resolver when there is one
    (so DANE's preconditions on the MX and address answers can be checked)."""
    if settings.dane_resolver is not None:
        return MXResolver(settings.dane_resolver, timeout=timeout, dnssec=True)
    return MXResolver(nameserver or settings.dns, timeout=timeout)
