"""Recipient-published policies (DANE, MTA-STS) for the engine and ``tls check``.

The policy sources are built from the settings: DANE is consulted only through a
configured validating resolver whose AD bit we trust; MTA-STS through the configured
resolver and HTTPS. This module combines them into one ``RecipientPolicies``.
"""

from __future__ import annotations

from recapito.config import Settings
from recapito.delivery.engine import NoRecipientPolicies, RecipientPolicies


def recipient_policies(
    settings: Settings, nameserver: tuple[str, int] | None = None
) -> RecipientPolicies:
    """The recipient policy sources the settings allow (none yet: see the MTA-STS and DANE
    modules, wired here as they land)."""
    return NoRecipientPolicies()
