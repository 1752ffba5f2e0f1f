"""Ledger side of tracking: the delivery a token names, hits, unsubscribes, figures."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from recapito.ledger import Ledger
from recapito.ledger.schema import deliveries, events, tracking_hits
from recapito.ledger.store import as_utc, utcnow
from recapito.tracking.tokens import TokenError, TokenSigner, unsubscribe_token_from_address

UNSUBSCRIBE_REASON = "unsubscribed"
UNSUBSCRIBE_SOURCE = "list-unsubscribe"


@dataclass(frozen=True)
class DeliveryFacts:
    delivery_id: int
    campaign_id: int
    address: str
    accepted_at: datetime | None  # when the MX accepted it (the ``sent`` event)


@dataclass(frozen=True)
class Hit:
    delivery: DeliveryFacts
    kind: str  # open | click
    klass: str
    reason: str
    method: str
    user_agent: str
    ip_prefix: str | None
    delay_s: float | None
    link_index: int | None = None
    target: str | None = None


class TrackingStore:
    """The tracking service's view of the ledger (delivery facts cached: they never change
    once a message was accepted)."""

    def __init__(self, ledger: Ledger, cache_size: int = 50_000) -> None:
        self.ledger = ledger
        self._cache: OrderedDict[int, DeliveryFacts] = OrderedDict()
        self._cache_size = cache_size

    def delivery(self, delivery_id: int) -> DeliveryFacts | None:
        found = self._cache.get(delivery_id)
        if found is not None:
            self._cache.move_to_end(delivery_id)
            return found
        with self.ledger.engine.connect() as conn:
            row = conn.execute(
                sa.select(deliveries.c.campaign_id, deliveries.c.address).where(
                    deliveries.c.id == delivery_id
                )
            ).first()
            if row is None:
                return None
            sent = conn.execute(
                sa.select(sa.func.max(events.c.at)).where(
                    events.c.delivery_id == delivery_id, events.c.kind == "sent"
                )
            ).scalar()
        facts = DeliveryFacts(delivery_id, int(row[0]), str(row[1]), as_utc(sent))
        if facts.accepted_at is not None:  # not yet accepted: look again next time
            self._cache[delivery_id] = facts
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return facts

    def record(self, hit: Hit, at: datetime | None = None) -> None:
        with self.ledger.engine.begin() as conn:
            conn.execute(
                tracking_hits.insert().values(
                    campaign_id=hit.delivery.campaign_id,
                    delivery_id=hit.delivery.delivery_id,
                    kind=hit.kind,
                    **{"class": hit.klass},
                    reason=hit.reason,
                    at=at or utcnow(),
                    delay_s=hit.delay_s,
                    method=hit.method[:8],
                    link_index=hit.link_index,
                    target=hit.target,
                    user_agent=hit.user_agent[:400] or None,
                    ip_prefix=hit.ip_prefix,
                )
            )

    def unsubscribe(self, delivery: DeliveryFacts, data: dict[str, Any]) -> bool:
        """Suppress the delivery's address (reason ``unsubscribed``) and record an
        ``unsubscribe`` event; False when it was already suppressed (no new event)."""
        added = self.ledger.add_suppression(
            delivery.address,
            reason=UNSUBSCRIBE_REASON,
            source=UNSUBSCRIBE_SOURCE,
            campaign_id=delivery.campaign_id,
        )
        if added:
            self.ledger.add_event(
                delivery.campaign_id,
                "unsubscribe",
                delivery_id=delivery.delivery_id,
                source=UNSUBSCRIBE_SOURCE,
                data=data,
            )
        return added


def engagement(ledger: Ledger, campaign_id: int) -> dict[str, Any]:
    """Opens and clicks of a campaign, unique per delivery, people apart from machines.

    ``opens.human`` counts deliveries with a human pixel fetch or a human click (a click
    proves the message was opened even when its images were blocked); ``opens.machine``
    deliveries with a machine fetch (Apple MPP, image proxies, scanners); ``clicks.human``
    and ``clicks.scanner`` likewise. ``hits`` counts every request.
    """
    h = tracking_hits
    with ledger.engine.connect() as conn:
        grouped = conn.execute(
            sa.select(
                h.c.kind,
                h.c["class"],
                sa.func.count(sa.distinct(h.c.delivery_id)),
                sa.func.count(),
            )
            .where(h.c.campaign_id == campaign_id)
            .group_by(h.c.kind, h.c["class"])
        ).all()
        human_opened = conn.execute(
            sa.select(sa.func.count(sa.distinct(h.c.delivery_id))).where(
                h.c.campaign_id == campaign_id, h.c["class"] == "human"
            )
        ).scalar()
        reasons = conn.execute(
            sa.select(h.c.kind, h.c.reason, sa.func.count(sa.distinct(h.c.delivery_id)))
            .where(h.c.campaign_id == campaign_id, h.c["class"] != "human")
            .group_by(h.c.kind, h.c.reason)
        ).all()
        unsubscribed = conn.execute(
            sa.select(sa.func.count(sa.distinct(events.c.delivery_id))).where(
                events.c.campaign_id == campaign_id, events.c.kind == "unsubscribe"
            )
        ).scalar()
    unique: dict[tuple[str, str], int] = {}
    hits: dict[str, dict[str, int]] = {"open": {}, "click": {}}
    for kind, klass, n_unique, n_hits in grouped:
        unique[(str(kind), str(klass))] = int(n_unique)
        hits.setdefault(str(kind), {})[str(klass)] = int(n_hits)
    machine_reasons: dict[str, dict[str, int]] = {"open": {}, "click": {}}
    for kind, reason, n in reasons:
        machine_reasons.setdefault(str(kind), {})[str(reason) or "unknown"] = int(n)
    return {
        "opens": {
            "human": int(human_opened or 0),
            "human_pixel": unique.get(("open", "human"), 0),
            "machine": unique.get(("open", "machine"), 0),
        },
        "clicks": {
            "human": unique.get(("click", "human"), 0),
            "scanner": unique.get(("click", "scanner"), 0),
        },
        "hits": hits,
        "machine_reasons": machine_reasons,
        "unsubscribed": int(unsubscribed or 0),
    }


def unsubscribe_by_mail(
    store: TrackingStore, signer: TokenSigner, to_address: str, data: dict[str, Any] | None = None
) -> bool | None:
    """The mailto: form of List-Unsubscribe: a message to ``unsubscribe+TOKEN@domain``
    (for the collector of that mailbox). None when the address carries no valid token or
    names no delivery; otherwise whether the address was newly suppressed."""
    token = unsubscribe_token_from_address(to_address)
    if token is None:
        return None
    try:
        delivery_id = signer.verify_unsubscribe(token)
    except TokenError:
        return None
    facts = store.delivery(delivery_id)
    if facts is None:
        return None
    return store.unsubscribe(facts, {"method": "mailto", **(data or {})})
