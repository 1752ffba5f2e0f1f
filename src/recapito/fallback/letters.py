"""Letters of a campaign, built from the ledger and the campaign's audience snapshot.

Which recipients: the campaign's ``paper`` fallback steps that the sweeper handed to the
print queue (``recapito.fallback.sweeper``), when there are any; otherwise (no fallback
policy ran) the same recipients as the data-cleaning export: ``insecure_channel`` rows and
hard bounces. Their postal address comes from the audience snapshot's canonical columns
(``first_name``, ``last_name``, ``postal_address``, ``postcode``, ``city``, ``province``);
a contact without one still gets a letter entry, which validation then rejects with its
reason (so the operator sees whom paper could not reach).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl
import sqlalchemy as sa

from recapito.config import Settings
from recapito.fallback.exports import EXPORT_REASONS
from recapito.fallback.paper import Letter
from recapito.ledger import Ledger, State
from recapito.ledger.schema import deliveries

__all__ = ["campaign_letters", "letters_dir", "paper_delivery_ids"]

_PAPER_STEPS = sa.text(
    "SELECT DISTINCT delivery_id FROM fallback_steps WHERE campaign_id = :c "
    "AND channel = 'paper' AND (provider_status = 'queued_for_print' OR state = 'done')"
)


def letters_dir(settings: Settings, campaign: str) -> Path:
    from recapito.campaign import campaign_dir

    return campaign_dir(settings, campaign) / "letters"


def paper_delivery_ids(ledger: Ledger, campaign_id: int) -> list[int] | None:
    """Deliveries whose fallback chain reached paper; None when no policy ran here."""
    if not sa.inspect(ledger.engine).has_table("fallback_steps"):
        return None
    with ledger.engine.connect() as conn:
        ids = sorted(int(r[0]) for r in conn.execute(_PAPER_STEPS, {"c": campaign_id}))
    return ids or None


def _failure_ids(ledger: Ledger, campaign_id: int) -> list[int]:
    hard = sa.and_(
        deliveries.c.state.in_([State.BOUNCED.value, State.FAILED.value]),
        deliveries.c.reason.in_(sorted(EXPORT_REASONS)),
        sa.func.coalesce(deliveries.c.permanence, "") != "temporary",
    )
    query = (
        sa.select(deliveries.c.id)
        .where(
            deliveries.c.campaign_id == campaign_id,
            sa.or_(deliveries.c.state == State.INSECURE_CHANNEL.value, hard),
        )
        .order_by(deliveries.c.id)
    )
    with ledger.engine.connect() as conn:
        return [int(r[0]) for r in conn.execute(query)]


def _text(value: Any) -> str:
    return " ".join(str(value or "").split())


def campaign_letters(
    ledger: Ledger,
    settings: Settings,
    campaign: str,
    *,
    product: str = "posta4",
    audience: pl.DataFrame | None = None,
) -> tuple[list[Letter], str]:
    """The campaign's letters, and which selection chose them (``policy``/``failures``)."""
    from recapito.campaign import campaign_dir

    camp = ledger.get_campaign(campaign)
    if camp is None:
        from recapito.errors import InputError

        raise InputError(f"no campaign named {campaign!r}")
    ids = paper_delivery_ids(ledger, camp.id)
    source = "policy"
    if ids is None:
        ids, source = _failure_ids(ledger, camp.id), "failures"
    if audience is None:
        path = campaign_dir(settings, campaign) / "audience.parquet"
        audience = pl.read_parquet(path) if path.exists() else pl.DataFrame({"contact_id": []})
    people = {
        str(r["contact_id"]): r for r in audience.to_dicts() if r.get("contact_id") is not None
    }
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(deliveries.c.id, deliveries.c.contact_id)
            .where(deliveries.c.id.in_(ids))
            .order_by(deliveries.c.id)
        ).all()
    letters: list[Letter] = []
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", campaign)
    for delivery_id, contact_id in rows:
        person = people.get(str(contact_id), {})
        name = _text(f"{person.get('first_name') or ''} {person.get('last_name') or ''}")
        street = _text(person.get("postal_address"))
        letters.append(
            Letter(
                letter_id=f"{safe}-{delivery_id}",
                recipient=name,
                lines=[street] if street else [],
                postcode=_text(person.get("postcode")),
                city=_text(person.get("city")),
                province=_text(person.get("province")),
                product=product,
                variables={
                    k: v
                    for k, v in person.items()
                    if k in ("first_name", "last_name", "city") and v is not None
                },
                contact_id=str(contact_id),
                campaign=campaign,
                delivery_id=int(delivery_id),
            )
        )
    return letters, source
