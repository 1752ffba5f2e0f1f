"""A campaign's PEC rows: one chunk claimed and submitted through the sender's mailboxes,
and ``explain`` (which rule chose a contact's channel and mailbox)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl

from recapito.campaign import CampaignParams, _worker_name, campaign_dir
from recapito.config import Settings
from recapito.errors import InputError
from recapito.ledger import Claim, Ledger
from recapito.ledger.store import utcnow
from recapito.pec.mailboxes import PecMailbox, configured_mailboxes
from recapito.pec.rules import RuleSet, load_rules, trace
from recapito.pec.submit import ConnectionGate, MailboxPermits, PecOptions, PecRun, PecStats
from recapito.render.template import (
    CompiledTemplate,
    RenderedMessage,
    load_template,
    message_id_for,
)
from recapito.tracking import Tracker, contact_allows_tracking, tracker_for

_RULE_COLUMNS = ("_channel", "_rule", "_address", "_domain", "_mailbox", "_mailbox_rule", "_chunk")


def pec_renderer(
    template: CompiledTemplate,
    audience: pl.DataFrame,
    params: CampaignParams,
    tracker: Tracker | None = None,
) -> Any:
    """Renders one PEC message: From = the mailbox, one recipient, the receipt kind asked
    for, and a Message-ID naming the delivery (on the mailbox's domain). With ``tracker``
    (the campaign's, as for e-mail) the HTML gets tracked links and the open pixel of the
    same tracking service, unless tracking is off for the campaign or the contact, and
    ``{{ unsubscribe_url }}`` / ``List-Unsubscribe`` name the delivery as they do for
    e-mail. (Opens read low on PEC: the message sits inside the provider's envelope.)"""
    drop = [c for c in _RULE_COLUMNS if c in audience.columns]
    rows = {str(r["contact_id"]): r for r in audience.drop(drop).to_dicts()}

    def render(claim: Claim, mailbox: PecMailbox) -> RenderedMessage:
        context = rows.get(claim.contact_id, {})
        values = {**context, "campaign": params.name}
        headers = {
            "X-Recapito-Campaign": params.name,
            "X-Recapito-Delivery": str(claim.delivery_id),
            "X-TipoRicevuta": mailbox.receipt_kind,
        }
        transform = None
        if tracker is not None:
            headers.update(tracker.headers(claim.delivery_id))
            values["unsubscribe_url"] = tracker.body_link(claim.delivery_id)
            transform = tracker.transform(
                claim.delivery_id, params.tracking and contact_allows_tracking(context)
            )
        return template.render(
            values,
            sender=mailbox.address,
            recipient=claim.address,
            message_id=message_id_for(params.name, claim.delivery_id, mailbox.domain),
            headers=headers,
            transform=transform,
        )

    return render


def resolve_mailboxes(
    settings: Settings, given: Mapping[str, PecMailbox] | None = None
) -> dict[str, PecMailbox]:
    """The mailboxes handed over by the tasks layer (Prefect blocks), else the settings'."""
    if given:
        return dict(given)
    return configured_mailboxes(settings.home)


def deliver_pec_chunk(
    params: CampaignParams,
    chunk: int,
    settings: Settings,
    *,
    mailboxes: Mapping[str, PecMailbox] | None = None,
    permits: MailboxPermits | None = None,
    connection_gate: ConnectionGate | None = None,
    options: PecOptions | None = None,
    only_deferred: bool = False,
) -> dict[str, Any]:
    """Claim the PEC rows of one chunk and submit them; rows a provider asked to slow down
    for are taken again within ``params.pec_max_wait_seconds``, then left deferred.

    With ``only_deferred`` just the chunk's deferred PEC rows that are due are taken (the
    retry-deferred flow): planned, submitted, uncertain rows and those with receipts are
    never taken, so nothing is submitted twice."""
    boxes = resolve_mailboxes(settings, mailboxes)
    opts = options or PecOptions(
        helo_name=settings.helo_name, max_wait=float(params.pec_max_wait_seconds)
    )
    template = load_template(params.template)
    ledger = Ledger(settings.db_url, run_migrations=False)
    stats = PecStats()
    claimed = 0
    started = time.monotonic()
    try:
        campaign = ledger.get_campaign(params.name)
        if campaign is None:
            raise InputError(f"campaign {params.name!r} is not prepared")
        path = campaign_dir(settings, params.name) / "audience.parquet"
        audience = pl.scan_parquet(path).filter(pl.col("_chunk") == chunk).collect()
        render = pec_renderer(template, audience, params, tracker_for(settings, params.sender))
        while True:
            claims = ledger.claim_chunk(
                campaign.id,
                chunk,
                worker=_worker_name(),
                only_deferred=only_deferred,
                channel="pec",
                lease=opts.lease,
            )
            claimed += len(claims)
            if claims:
                run = PecRun(
                    ledger, boxes, opts, render, permits=permits, connection_gate=connection_gate
                )
                stats.merge(asyncio.run(run.run(claims)))
            only_deferred = True
            left = opts.max_wait - (time.monotonic() - started)
            wait = _next_due(ledger, campaign.id, chunk, left)
            if wait is None:
                break
            time.sleep(wait)
    finally:
        ledger.close()
    return {"chunk": chunk, "channel": "pec", "claimed": claimed, **stats.as_dict()}


def _next_due(ledger: Ledger, campaign_id: int, chunk: int, within: float) -> float | None:
    """Seconds until the chunk's deferred PEC rows are due, when that is within ``within``."""
    if within <= 0:
        return None
    import sqlalchemy as sa

    from recapito.ledger.schema import deliveries

    query = sa.select(sa.func.max(deliveries.c.next_attempt_at)).where(
        sa.and_(
            deliveries.c.campaign_id == campaign_id,
            deliveries.c.chunk == chunk,
            deliveries.c.channel == "pec",
            deliveries.c.state == "deferred",
            deliveries.c.reason == "pec_traffic_limit",
            deliveries.c.next_attempt_at <= utcnow() + timedelta(seconds=within),
        )
    )
    with ledger.engine.connect() as conn:
        latest = conn.execute(query).scalar()
    if latest is None:
        return None
    from recapito.ledger.store import as_utc

    due = as_utc(latest)
    assert due is not None
    return max(0.0, (due - utcnow()).total_seconds()) + 0.05


# ---- explain ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Explanation:
    campaign: str
    contact_id: str
    deliveries: list[dict[str, Any]]  # channel, address, rule, mailbox, mailbox_rule, state
    rules_file: str | None
    channel_trace: list[dict[str, Any]]
    mailbox_trace: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "campaign": self.campaign,
            "contact_id": self.contact_id,
            "deliveries": self.deliveries,
            "rules_file": self.rules_file,
            "channel_rules": self.channel_trace,
            "mailbox_rules": self.mailbox_trace,
        }

    def text(self) -> str:
        lines = [f"campaign {self.campaign!r}, contact {self.contact_id!r}"]
        for d in self.deliveries:
            lines.append(
                f"  channel {d['channel']} -> {d['address']} (state {d['state']}): "
                f"rule {d['rule'] or '-'}"
            )
            if d["channel"] == "pec":
                lines.append(
                    f"  mailbox {d['pec_mailbox'] or '-'}: rule {d['mailbox_rule'] or '-'}"
                )
        if self.rules_file:
            lines.append(f"rules ({self.rules_file}), first match wins:")
            for item in self.channel_trace:
                mark = "match" if item["matched"] else "no   "
                fired = "  <- fired" if item["fired"] else ""
                lines.append(f"  [{mark}] {item['description']}{fired}")
            if self.mailbox_trace:
                lines.append("mailbox rules:")
            for item in self.mailbox_trace:
                mark = "match" if item["matched"] else "no   "
                fired = "  <- fired" if item["fired"] else ""
                lines.append(f"  [{mark}] {item['description']}{fired}")
        return "\n".join(lines)


def _snapshot_rules(settings: Settings, name: str) -> Path | None:
    folder = campaign_dir(settings, name)
    for suffix in (".toml", ".yaml", ".yml"):
        path = folder / f"rules{suffix}"
        if path.exists():
            return path
    return None


def explain(settings: Settings, campaign_name: str, contact_id: str) -> Explanation:
    """Which rule chose this contact's channel (and PEC mailbox), as stored in the ledger,
    with what every rule of the campaign's rules (its snapshot) makes of the contact."""
    ledger = Ledger(settings.db_url, run_migrations=False)
    try:
        campaign = ledger.get_campaign(campaign_name)
        if campaign is None:
            raise InputError(f"no campaign named {campaign_name!r} in the ledger")
        rows = ledger.deliveries_of_contact(campaign.id, contact_id)
    finally:
        ledger.close()
    if not rows:
        raise InputError(f"contact {contact_id!r} has no delivery in campaign {campaign_name!r}")
    keep = ("channel", "address", "rule", "pec_mailbox", "mailbox_rule", "state")
    deliveries = [{k: r.get(k) for k in keep} for r in rows]
    snapshot = _snapshot_rules(settings, campaign_name)
    channel_trace: list[dict[str, Any]] = []
    mailbox_trace: list[dict[str, Any]] = []
    if snapshot is not None:
        rules: RuleSet = load_rules(snapshot)
        audience = pl.scan_parquet(campaign_dir(settings, campaign_name) / "audience.parquet")
        found = (
            audience.filter(pl.col("contact_id").cast(pl.String) == contact_id)
            .drop([c for c in _RULE_COLUMNS if c in audience.collect_schema().names()])
            .collect()
        )
        if found.height:
            result = trace(found.to_dicts()[0], rules, sender=campaign.sender)
            fired = {d["rule"] for d in deliveries} | {d["mailbox_rule"] for d in deliveries}
            channel_trace = [
                {"rule": n, "description": desc, "matched": hit, "fired": n in fired}
                for n, desc, hit in result.channel
            ]
            mailbox_trace = [
                {"rule": n, "description": desc, "matched": hit, "fired": n in fired}
                for n, desc, hit in result.mailbox
            ]
    return Explanation(
        campaign_name,
        contact_id,
        deliveries,
        str(snapshot) if snapshot else None,
        channel_trace,
        mailbox_trace,
    )
