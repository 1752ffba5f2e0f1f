"""Which delivery a bounce is about, in the order of DESIGN §7:

1. the signed VERP token of the address the bounce was sent to (cannot be forged);
2. our own headers found in the returned copy: ``X-Recapito-Delivery``, then the
   ``Message-ID`` (looked up in the ledger, as every delivery records it);
3. the DSN ``Original-Envelope-Id`` (a delivery id, a VERP token or a Message-ID);
4. last, the failed recipient address (``Final-Recipient``): the most recent delivery to it.

Steps 2–4 only name a delivery the ledger has; step 4 is a guess (an address may have
several deliveries), which is why it comes last.
"""

from __future__ import annotations

import re
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from recapito.bounces.parse import BounceReport
from recapito.identity.verp import VerpKeyring, delivery_from_return_path
from recapito.ledger.schema import deliveries


class HasEngine(Protocol):
    @property
    def engine(self) -> Engine: ...


_DIGITS = re.compile(r"^\d{1,20}$")
_MSGID = re.compile(r"<[^<>\s]+>")


def _exists(engine: Engine, delivery_id: int) -> bool:
    with engine.connect() as conn:
        row = conn.execute(sa.select(deliveries.c.id).where(deliveries.c.id == delivery_id)).first()
    return row is not None


def _by_message_id(engine: Engine, message_id: str) -> int | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(deliveries.c.id)
            .where(deliveries.c.message_id == message_id)
            .order_by(deliveries.c.id.desc())
            .limit(1)
        ).first()
    return int(row[0]) if row else None


def _by_address(engine: Engine, address: str) -> int | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(deliveries.c.id)
            .where(sa.func.lower(deliveries.c.address) == address.lower())
            .order_by(deliveries.c.updated_at.desc(), deliveries.c.id.desc())
            .limit(1)
        ).first()
    return int(row[0]) if row else None


def correlate(
    report: BounceReport,
    ledger: HasEngine,
    keyring: VerpKeyring | None = None,
    *,
    recipient: str | None = None,
    prefix: str | None = None,
) -> int | None:
    """The ledger's delivery id for this bounce, or None.

    ``keyring`` verifies VERP tokens (without it that step is skipped); ``recipient``
    picks one failed recipient of a multi-recipient DSN for the address step (default: the
    first failed one); ``prefix`` None accepts any VERP local-part prefix.
    """
    engine = ledger.engine
    if keyring is not None and report.verp_address:
        found = delivery_from_return_path(report.verp_address, keyring, prefix)
        if found is not None:
            return found
    if report.recapito_delivery and _DIGITS.match(report.recapito_delivery.strip()):
        delivery = int(report.recapito_delivery.strip())
        if _exists(engine, delivery):
            return delivery
    if report.original_message_id:
        found = _by_message_id(engine, report.original_message_id)
        if found is not None:
            return found
    envid = (report.original_envelope_id or "").strip()
    if envid:
        if _DIGITS.match(envid) and _exists(engine, int(envid)):
            return int(envid)
        if keyring is not None:
            found = delivery_from_return_path(f"{prefix or 'bounces'}+{envid}@x", keyring, None)
            if found is not None:
                return found
        mid = _MSGID.search(envid) or _MSGID.search(f"<{envid}>")
        if mid:
            found = _by_message_id(engine, mid.group(0))
            if found is not None:
                return found
    address = recipient
    if address is None:
        address = next((r.recipient for r in report.failed if r.recipient), None)
    if address:
        return _by_address(engine, address)
    return None


__all__ = ["correlate"]
