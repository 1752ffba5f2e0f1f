"""PEC timeouts the providers may never report (issue 6 item 5), run by the collector flow.

- **acceptance overdue**: a message the provider took (SMTP ``250``, state ``accepted``) with
  no acceptance receipt after ``acceptance_within`` (default 30 min): an alert — one
  ``pec_acceptance_overdue`` event per delivery, the count in the flow's artifact. The
  state does not change (a late acceptance is still welcome).
- **delivery timeout**: no delivery receipt ``delivery_within`` (default 24 h) after
  submission: the delivery ends ``delivery_timeout`` (event ``pec_delivery_timeout``, source
  ``pec-timeout``) even when the provider never says so. A delivery receipt arriving later
  still moves it to ``delivered`` (``recapito.ledger.states.PEC_TRANSITIONS``).

Submission time is the delivery's first ``sent`` event.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from recapito.errors import ConfigError
from recapito.ledger import Ledger, State
from recapito.ledger.schema import deliveries, events
from recapito.ledger.store import utcnow

SOURCE = "pec-timeout"
ACCEPTANCE_SETTING = "RECAPITO_PEC_ACCEPTANCE_TIMEOUT_MINUTES"
DELIVERY_SETTING = "RECAPITO_PEC_DELIVERY_TIMEOUT_HOURS"
DEFAULT_ACCEPTANCE = timedelta(minutes=30)
DEFAULT_DELIVERY = timedelta(hours=24)
WAITING = (
    State.ACCEPTED.value,
    State.PEC_ACCEPTED.value,
    State.DELIVERY_WARNING.value,
)


def limits_from_env(env: Mapping[str, str] | None = None) -> tuple[timedelta, timedelta]:
    environ = os.environ if env is None else env

    def number(name: str, default: float) -> float:
        text = environ.get(name)
        if not text:
            return default
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r}: expected a number") from None
        if value <= 0:
            raise ConfigError(f"{name}={text!r}: must be above zero")
        return value

    return (
        timedelta(minutes=number(ACCEPTANCE_SETTING, DEFAULT_ACCEPTANCE.total_seconds() / 60)),
        timedelta(hours=number(DELIVERY_SETTING, DEFAULT_DELIVERY.total_seconds() / 3600)),
    )


def check_timeouts(
    ledger: Ledger,
    *,
    acceptance_within: timedelta = DEFAULT_ACCEPTANCE,
    delivery_within: timedelta = DEFAULT_DELIVERY,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Apply both timeouts to every PEC delivery; counts only (never addresses)."""
    at = now or utcnow()
    sent = (
        sa.select(events.c.delivery_id, sa.func.min(events.c.at).label("sent_at"))
        .where(events.c.kind == "sent", events.c.delivery_id.is_not(None))
        .group_by(events.c.delivery_id)
        .subquery()
    )
    waiting = (
        sa.select(deliveries.c.id, deliveries.c.campaign_id, deliveries.c.state, sent.c.sent_at)
        .join(sent, sent.c.delivery_id == deliveries.c.id)
        .where(deliveries.c.channel == "pec", deliveries.c.state.in_(WAITING))
    )
    timed_out = 0
    overdue_new = 0
    overdue_campaigns: dict[int, int] = {}
    with ledger.engine.begin() as conn:
        late = conn.execute(waiting.where(sent.c.sent_at <= at - delivery_within)).all()
        for row in late:
            result = conn.execute(
                deliveries.update()
                .where(deliveries.c.id == row.id, deliveries.c.state == row.state)
                .values(state=State.DELIVERY_TIMEOUT.value, reason="pec_timeout", updated_at=at)
            )
            if not result.rowcount:
                continue
            timed_out += 1
            conn.execute(
                events.insert().values(
                    campaign_id=row.campaign_id,
                    delivery_id=row.id,
                    kind="pec_delivery_timeout",
                    at=at,
                    source=SOURCE,
                    data_json=json.dumps(
                        {
                            "from_state": row.state,
                            "hours": delivery_within.total_seconds() / 3600,
                            "sent_at": str(row.sent_at),
                        },
                        sort_keys=True,
                    ),
                )
            )
        unaccepted = conn.execute(
            waiting.where(
                deliveries.c.state == State.ACCEPTED.value,
                sent.c.sent_at <= at - acceptance_within,
            )
        ).all()
        if unaccepted:
            alerted = {
                int(r[0])
                for r in conn.execute(
                    sa.select(events.c.delivery_id).where(
                        events.c.kind == "pec_acceptance_overdue",
                        events.c.delivery_id.in_([r.id for r in unaccepted]),
                    )
                )
            }
            for row in unaccepted:
                overdue_campaigns[row.campaign_id] = overdue_campaigns.get(row.campaign_id, 0) + 1
                if row.id in alerted:
                    continue
                overdue_new += 1
                conn.execute(
                    events.insert().values(
                        campaign_id=row.campaign_id,
                        delivery_id=row.id,
                        kind="pec_acceptance_overdue",
                        at=at,
                        source=SOURCE,
                        data_json=json.dumps(
                            {"minutes": acceptance_within.total_seconds() / 60}, sort_keys=True
                        ),
                    )
                )
    return {
        "delivery_timeout": timed_out,
        "acceptance_overdue": sum(overdue_campaigns.values()),
        "acceptance_overdue_new": overdue_new,
        "acceptance_overdue_by_campaign": {str(k): v for k, v in sorted(overdue_campaigns.items())},
        "acceptance_within_minutes": acceptance_within.total_seconds() / 60,
        "delivery_within_hours": delivery_within.total_seconds() / 3600,
    }


def alert_markdown(result: Mapping[str, Any]) -> str | None:
    """An alert for the flow's artifact, or None when nothing is overdue."""
    if not result["acceptance_overdue"] and not result["delivery_timeout"]:
        return None
    lines = ["# PEC timeouts", ""]
    if result["acceptance_overdue"]:
        lines.append(
            f"**{result['acceptance_overdue']:,} PEC messages have no acceptance receipt** "
            f"{result['acceptance_within_minutes']:g} minutes after submission "
            f"({result['acceptance_overdue_new']:,} new since the last run). Check the "
            "provider and the receipt mailboxes."
        )
        lines += ["", "| campaign id | overdue |", "|---|---:|"]
        lines += [f"| {c} | {n:,} |" for c, n in result["acceptance_overdue_by_campaign"].items()]
    if result["delivery_timeout"]:
        lines += [
            "",
            f"{result['delivery_timeout']:,} deliveries ended `delivery_timeout`: no delivery "
            f"receipt {result['delivery_within_hours']:g} h after submission.",
        ]
    return "\n".join(lines) + "\n"
