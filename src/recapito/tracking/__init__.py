"""Open and click tracking, and one-click unsubscribe (DESIGN §10; Prefect-free core).

``tracker_for(settings, sender)`` gives the campaign renderer its ``Tracker`` (link
rewriting, open pixel, ``List-Unsubscribe`` headers); ``recapito tracking serve`` runs the
service that answers those URLs (``recapito.tracking.service``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recapito.tracking.links import Tracker, contact_allows_tracking
from recapito.tracking.tokens import TokenError, TokenSigner, tracking_keyring

if TYPE_CHECKING:
    from recapito.config import Settings


def tracker_for(settings: Settings, sender: str) -> Tracker:
    """The tracker of a campaign sent from ``sender`` (mailto: form on the bounce domain,
    or the sender's own domain)."""
    domain = settings.bounce_domain or sender.rpartition("@")[2].lower()
    return Tracker(TokenSigner(tracking_keyring(settings)), settings.tracking_url, domain)


__all__ = [
    "TokenError",
    "TokenSigner",
    "Tracker",
    "contact_allows_tracking",
    "tracker_for",
    "tracking_keyring",
]
