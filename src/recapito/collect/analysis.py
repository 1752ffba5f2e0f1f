"""The report's bounce analysis: what the bounce collector recorded for a campaign."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from recapito.ledger import Ledger, State
from recapito.ledger.schema import deliveries, events, suppressions

SOURCE = "bounce-imap"  # the events and suppressions the bounce collector writes


def bounce_analysis(ledger: Ledger, campaign_id: int) -> dict[str, Any]:
    """Bounced deliveries by reason and permanence, and the collector's other events."""
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(deliveries.c.reason, deliveries.c.permanence, sa.func.count())
            .where(
                deliveries.c.campaign_id == campaign_id,
                deliveries.c.state == State.BOUNCED.value,
            )
            .group_by(deliveries.c.reason, deliveries.c.permanence)
        ).all()
        kinds = conn.execute(
            sa.select(events.c.kind, sa.func.count())
            .where(events.c.campaign_id == campaign_id, events.c.source == SOURCE)
            .group_by(events.c.kind)
        ).all()
        suppressed = conn.execute(
            sa.select(sa.func.count())
            .select_from(suppressions)
            .where(suppressions.c.campaign_id == campaign_id, suppressions.c.source == SOURCE)
        ).scalar_one()
    reasons: dict[str, dict[str, int]] = {}
    for reason, permanence, count in rows:
        entry = reasons.setdefault(str(reason or "unknown"), {"total": 0})
        entry[str(permanence or "unknown")] = entry.get(str(permanence or "unknown"), 0) + count
        entry["total"] += int(count)
    return {
        "bounced": sum(e["total"] for e in reasons.values()),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1]["total"], kv[0]))),
        "events": {str(k): int(n) for k, n in kinds},
        "suppressed": int(suppressed),
    }
