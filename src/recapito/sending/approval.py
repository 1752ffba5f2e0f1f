"""Approval of large campaigns: the preview shown before delivery and the decision record.

The preview holds counts (per channel, per TLS level last seen at each recipient domain,
per slot) and one rendered sample whose addresses are masked; never a recipient list.
The decision is kept in the campaign's counts (``approval``) and as a ledger event, so a
re-run of an approved campaign does not ask again.
"""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime
from typing import Any

import polars as pl
import sqlalchemy as sa

from recapito.campaign import CampaignParams, campaign_dir
from recapito.config import Settings
from recapito.errors import InputError
from recapito.ledger import Ledger
from recapito.ledger.schema import deliveries
from recapito.ledger.store import utcnow
from recapito.render.template import load_template, message_id_for

_ADDRESS = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")


def mask_address(text: str) -> str:
    """``anna.rossi@example.it`` → ``a***@example.it`` in any text."""
    return _ADDRESS.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text)


def needs_approval(params: CampaignParams, settings: Settings) -> bool:
    """True when the campaign is above its threshold and no approval is on record."""
    if params.approval_threshold is None:
        return False
    ledger = Ledger(settings.db_url, run_migrations=False)
    try:
        camp = ledger.get_campaign(params.name)
        if camp is None:
            raise InputError(f"campaign {params.name!r} is not prepared")
        recipients = sum(ledger.state_counts(camp.id).values())
        decided = camp.counts.get("approval") or {}
    finally:
        ledger.close()
    return recipients > params.approval_threshold and not decided.get("approved")


def _levels(ledger: Ledger, campaign_id: int) -> dict[str, int]:
    """Recipients of the campaign by the TLS level last seen at their domain."""
    with ledger.engine.connect() as conn:
        mine = conn.execute(
            sa.select(deliveries.c.domain, deliveries.c.channel, sa.func.count())
            .where(deliveries.c.campaign_id == campaign_id)
            .group_by(deliveries.c.domain, deliveries.c.channel)
        ).all()
        seen = conn.execute(
            sa.select(deliveries.c.domain, deliveries.c.tls_level)
            .where(
                sa.and_(
                    deliveries.c.tls_level.is_not(None),
                    deliveries.c.domain.in_(
                        sa.select(deliveries.c.domain)
                        .where(deliveries.c.campaign_id == campaign_id)
                        .scalar_subquery()
                    ),
                )
            )
            .order_by(deliveries.c.updated_at)
        ).all()
    latest = {str(d): str(level) for d, level in seen}
    levels: dict[str, int] = {}
    for domain, channel, n in mine:
        key = "PEC" if channel == "pec" else latest.get(str(domain), "not yet seen")
        levels[key] = levels.get(key, 0) + int(n)
    return dict(sorted(levels.items()))


def _sample(params: CampaignParams, settings: Settings) -> dict[str, str]:
    path = campaign_dir(settings, params.name) / "audience.parquet"
    first = pl.scan_parquet(path).head(1).collect().to_dicts()
    if not first:
        return {}
    row = {k: v for k, v in first[0].items() if not k.startswith("_")}
    recipient = mask_address(str(row.get("email") or "sample@example.invalid"))
    message = load_template(params.template).render(
        {**row, "campaign": params.name, "unsubscribe_url": "https://example.invalid/u/0"},
        sender=params.sender,
        recipient=recipient,
        message_id=message_id_for(params.name, 0, params.sender_domain),
    )
    parsed = email.message_from_bytes(message.data, policy=email.policy.default)
    body = parsed.get_body(preferencelist=("plain", "html"))
    text = body.get_content() if body is not None else ""
    lines = [ln.rstrip() for ln in str(text).splitlines() if ln.strip()][:25]
    return {
        "to": recipient,
        "from": str(parsed.get("From", "")),
        "subject": mask_address(message.subject),
        "text": mask_address("\n".join(lines)),
    }


def preview(params: CampaignParams, settings: Settings) -> dict[str, Any]:
    """What the approver sees: counts per channel and TLS level, slots, one sample."""
    from recapito.sending.slots import slot_sizes

    ledger = Ledger(settings.db_url, run_migrations=False)
    try:
        camp = ledger.get_campaign(params.name)
        if camp is None:
            raise InputError(f"campaign {params.name!r} is not prepared")
        with ledger.engine.connect() as conn:
            channels = {
                str(c): int(n)
                for c, n in conn.execute(
                    sa.select(deliveries.c.channel, sa.func.count())
                    .where(deliveries.c.campaign_id == camp.id)
                    .group_by(deliveries.c.channel)
                ).all()
            }
        levels = _levels(ledger, camp.id)
    finally:
        ledger.close()
    audience = campaign_dir(settings, params.name) / "audience.parquet"
    return {
        "campaign": params.name,
        "recipients": sum(channels.values()),
        "threshold": params.approval_threshold,
        "sending_mode": params.sending_mode,
        "channels": channels,
        "tls_levels": levels,
        "slots": slot_sizes(audience) if audience.exists() else {},
        "sample": _sample(params, settings),
    }


def preview_markdown(data: dict[str, Any]) -> str:
    out = [
        f"# Approval needed: {data['campaign']}",
        "",
        f"**{data['recipients']:,} recipients** (approval above {data['threshold']:,}); "
        f"sending mode **{data['sending_mode']}**. Resume the run with approve = true to "
        "deliver, or approve = false to reject it (nothing is sent).",
        "",
        "| channel | recipients |",
        "|---|---:|",
        *(f"| {k} | {n:,} |" for k, n in data["channels"].items()),
        "",
        "| TLS level last seen at the domain | recipients |",
        "|---|---:|",
        *(f"| {k} | {n:,} |" for k, n in data["tls_levels"].items()),
    ]
    slots = data.get("slots") or {}
    if slots:
        out += ["", "| slot (UTC) | recipients |", "|---|---:|"]
        out += [f"| {at} | {n:,} |" for at, n in list(slots.items())[:50]]
        if len(slots) > 50:
            out.append(f"| … {len(slots) - 50} more slots | |")
    sample = data.get("sample") or {}
    if sample:
        out += [
            "",
            "## Sample (addresses masked)",
            "",
            f"- **From:** {sample['from']}",
            f"- **To:** {sample['to']}",
            f"- **Subject:** {sample['subject']}",
            "",
            "```text",
            sample["text"].replace("```", "'''"),
            "```",
        ]
    return "\n".join(out)


def mark_awaiting(settings: Settings, name: str) -> None:
    ledger = Ledger(settings.db_url, run_migrations=False)
    try:
        camp = ledger.get_campaign(name)
        if camp is not None:
            ledger.update_campaign(camp.id, status="awaiting_approval")
    finally:
        ledger.close()


def record_decision(settings: Settings, name: str, approved: bool, note: str) -> str:
    """Keep the decision (campaign counts + an ``approval`` event); returns the status."""
    ledger = Ledger(settings.db_url, run_migrations=False)
    try:
        camp = ledger.get_campaign(name)
        if camp is None:
            raise InputError(f"no campaign named {name!r}")
        decision = {"approved": approved, "note": note[:500], "at": utcnow().isoformat()}
        status = "approved" if approved else "rejected"
        ledger.update_campaign(camp.id, status=status, counts={**camp.counts, "approval": decision})
        ledger.add_event(camp.id, "approval", source="prefect", data=decision)
    finally:
        ledger.close()
    return status


def future_slot_status(
    settings: Settings, name: str, plan: dict[str, list[int]], now: datetime | None = None
) -> bool:
    """After a run: when chunks of future slots still hold planned rows the campaign is
    ``scheduled`` (set here); returns whether it is."""
    now = now or datetime.now(UTC)
    from recapito.sending.slots import split_due

    _due, future = split_due(plan, now)
    waiting = {c for chunks in future.values() for c in chunks}
    if not waiting:
        return False
    ledger = Ledger(settings.db_url, run_migrations=False)
    try:
        camp = ledger.get_campaign(name)
        if camp is None:
            return False
        planned = set(ledger.planned_chunks(camp.id))
        if planned & waiting:
            ledger.update_campaign(camp.id, status="scheduled")
            return True
    finally:
        ledger.close()
    return False
