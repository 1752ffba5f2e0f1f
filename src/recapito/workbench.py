"""The analyst's workbench (notebooks/): ledger tables as Polars frames, Parquet exports of
them, and a small demo ledger to try the notebooks on.

Frames never carry e-mail addresses: ``deliveries.address`` and ``pec_receipts.recipient``
are dropped, and anything shaped like an address in free text (SMTP replies, event data,
the campaign's sender) reads ``<address>``. Contacts are known by their ``contact_id``.

Where the data comes from, first match wins: an ``export_dir`` of Parquet files written by
``export_tables`` (``<table>.parquet``), an explicit ``db_url``, ``RECAPITO_DB_URL``, then the
ledger under ``RECAPITO_HOME`` (``recapito.config.Settings``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import sqlalchemy as sa

from recapito.config import Settings
from recapito.ledger import Ledger, Outcome, PlannedDelivery, State
from recapito.ledger.schema import campaigns, deliveries, events, pec_receipts, tracking_hits
from recapito.ledger.store import RecordOutcome

TABLES: Mapping[str, sa.Table] = {
    "campaigns": campaigns,
    "deliveries": deliveries,
    "events": events,
    "tracking_hits": tracking_hits,
    "pec_receipts": pec_receipts,
}
_DROPPED = {"deliveries": ("address", "claim_token"), "pec_receipts": ("recipient",)}
ADDRESS_PATTERN = r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"


def resolve_db_url(db_url: str | None = None) -> str:
    if db_url:
        return db_url
    return os.environ.get("RECAPITO_DB_URL") or Settings.load().db_url


def redact(frame: pl.DataFrame) -> pl.DataFrame:
    """Every text column with e-mail addresses replaced by ``<address>``."""
    text = [c for c, t in frame.schema.items() if t == pl.String]
    return frame.with_columns(pl.col(text).str.replace_all(ADDRESS_PATTERN, "<address>"))


def _frame(rows: list[Any], names: list[str]) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame({n: pl.Series(n, [], dtype=pl.String) for n in names})
    data: dict[str, list[Any]] = {n: [] for n in names}
    for row in rows:
        for name, value in zip(names, row, strict=True):
            if isinstance(value, datetime):  # SQLite: naive UTC; PostgreSQL: aware
                value = value if value.tzinfo else value.replace(tzinfo=UTC)
                value = value.astimezone(UTC)
            data[name].append(value)
    return pl.DataFrame(data, strict=False)


def load_tables(
    db_url: str | None = None, *, export_dir: str | Path | None = None
) -> dict[str, pl.DataFrame]:
    """The analysis tables (see ``TABLES``), redacted."""
    if export_dir:
        directory = Path(export_dir)
        return {
            name: redact(pl.read_parquet(directory / f"{name}.parquet"))
            for name in TABLES
            if (directory / f"{name}.parquet").exists()
        }
    ledger = Ledger(resolve_db_url(db_url))
    try:
        out: dict[str, pl.DataFrame] = {}
        with ledger.engine.connect() as conn:
            for name, table in TABLES.items():
                keep = [c for c in table.columns if c.name not in _DROPPED.get(name, ())]
                rows = [tuple(r) for r in conn.execute(sa.select(*keep)).all()]
                out[name] = redact(_frame(rows, [c.name for c in keep]))
        return out
    finally:
        ledger.close()


def export_tables(db_url: str | None, directory: str | Path) -> list[Path]:
    """Write the redacted analysis tables as Parquet (files 0600)."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in load_tables(db_url).items():
        path = target / f"{name}.parquet"
        frame.write_parquet(path)
        path.chmod(0o600)
        written.append(path)
    return written


def history_from_tables(tables: Mapping[str, pl.DataFrame], channel: str = "email") -> Any:
    """The send-time model's ``EngagementHistory`` from loaded tables (ledger or Parquet):
    sends are the accepted deliveries of ``channel`` (bounced ones left out) at their first
    ``sent`` event, engagements the human tracking hits."""
    from recapito.sendtime import EngagementHistory

    d = tables["deliveries"].filter(
        (pl.col("channel") == channel) & (pl.col("state") != State.BOUNCED.value)
    )
    sent = (
        tables["events"]
        .filter(pl.col("kind") == "sent")
        .group_by("delivery_id")
        .agg(pl.col("at").min().alias("sent_at"))
    )
    sends = d.select("contact_id", pl.col("id").alias("delivery_id")).join(sent, on="delivery_id")
    hits = tables["tracking_hits"].filter(pl.col("class") == "human")
    return EngagementHistory.from_frames(sends, hits.select("delivery_id", "at", "kind", "class"))


def provider_of(mx_host: str | None) -> str:
    """The mailbox provider behind an MX host: its last two labels (``mx1.libero.it`` ->
    ``libero.it``; ``x.mail.protection.outlook.com`` -> ``outlook.com``)."""
    if not mx_host:
        return "(no MX)"
    labels = mx_host.rstrip(".").lower().split(".")
    return ".".join(labels[-2:])


# --- the demo ledger ----------------------------------------------------------------------

_DOMAINS = (  # domain, MX host, TLS version, level
    ("mailitalia.test", "mx1.mailitalia.test", "TLSv1.3", "L3"),
    ("posta.test", "mx.posta.test", "TLSv1.2", "L2"),
    ("vecchiaposta.test", "mx.vecchiaposta.test", None, "L0"),
    ("azienda.test", "aspmx.google.test", "TLSv1.3", "L4"),
    ("studio.test", "aspmx.google.test", "TLSv1.3", "L4"),
    ("comune.test", "comune-test.mail.protection.outlook.test", "TLSv1.2", "L3"),
    ("antica.test", "mail.antica.test", "TLSv1", "L1"),
)
_BOUNCES = (
    ("user_unknown", "permanent"),
    ("mailbox_full", "transient"),
    ("spam_rejected", "permanent"),
)
_PEC_PROVIDERS = ("Aruba PEC S.p.A.", "Poste Italiane", "InfoCert S.p.A.")


def demo_ledger(db_url: str, *, contacts: int = 300, campaigns: int = 3, seed: int = 3) -> str:
    """Fill ``db_url`` with a few small past campaigns for the notebooks: e-mail deliveries
    over several domains, providers and TLS levels, failures and bounces, human and machine
    tracking hits at varied send times (``recapito.sendtime.synthetic``), and PEC deliveries
    with receipts. Returns ``db_url``."""
    from recapito.sendtime.synthetic import simulate

    world = simulate(contacts, campaigns, seed=seed)
    rng = np.random.default_rng(seed)
    ledger = Ledger(db_url)
    try:
        sends = world.history.sends
        hits = world.history.engagements
        ids = world.contacts.get_column("contact_id").to_list()
        domain_of = {c: _DOMAINS[i % len(_DOMAINS)] for i, c in enumerate(ids)}
        for week in range(campaigns):
            name = f"demo-week-{week + 1}"
            part = sends.filter(
                pl.col("sent_at") >= world.start + timedelta(weeks=week),
                pl.col("sent_at") < world.start + timedelta(weeks=week + 1),
            )
            _email_campaign(ledger, name, part, hits, domain_of, rng)
        _pec_campaign(ledger, "demo-pec", ids[: max(10, contacts // 5)], world.now, rng)
    finally:
        ledger.close()
    return db_url


def _email_campaign(
    ledger: Ledger,
    name: str,
    part: pl.DataFrame,
    hits: pl.DataFrame,
    domain_of: Mapping[str, tuple[str, str, str | None, str]],
    rng: np.random.Generator,
) -> None:
    camp = ledger.ensure_campaign(
        name, sender="notizie@recapito.test", template_hash="d" * 64, params={"demo": True}
    )
    rows = part.to_dicts()
    ledger.plan(
        camp.id,
        [
            PlannedDelivery(
                r["contact_id"],
                f"{r['contact_id'].lower()}@{domain_of[r['contact_id']][0]}",
                domain_of[r["contact_id"]][0],
                0,
            )
            for r in rows
        ],
    )
    claims = {c.contact_id: c for c in ledger.claim_chunk(camp.id, 0, worker="demo")}
    ops = []
    failed: set[str] = set()
    for r in rows:
        claim = claims[r["contact_id"]]
        _, mx, version, level = domain_of[r["contact_id"]]
        if rng.random() < 0.03:
            failed.add(r["contact_id"])
            outcome = Outcome(
                State.FAILED,
                mx_host=mx,
                reply_code=550,
                reply_status="5.1.1",
                reply_text=f"5.1.1 <{claim.address}>: user unknown",
                reason="user_unknown",
                permanence="permanent",
            )
        else:
            outcome = Outcome(
                State.ACCEPTED,
                mx_host=mx,
                reply_code=250,
                tls_version=version,
                tls_level=level,
                message_id=f"<{claim.delivery_id}@recapito.test>",
            )
        ops.append(RecordOutcome(claim, outcome))
    ledger.apply(ops)
    # the past: each message accepted at its synthetic send time, tracked as simulated
    by_contact = {c: claims[c].delivery_id for c in claims}
    sent = {int(r["delivery_id"]): r for r in rows}
    sent_by_contact = {r["contact_id"]: r["sent_at"].astimezone(UTC) for r in rows}
    with ledger.engine.begin() as conn:
        for r in rows:
            delivery = by_contact[r["contact_id"]]
            conn.execute(
                events.update()
                .where(events.c.delivery_id == delivery)
                .values(at=r["sent_at"].astimezone(UTC).replace(tzinfo=None))
            )
        tracked = hits.filter(pl.col("delivery_id").is_in(list(sent)))
        hit_rows = []
        for h in tracked.iter_rows(named=True):
            contact = sent[h["delivery_id"]]["contact_id"]
            if contact in failed:
                continue
            at = h["at"].astimezone(UTC)
            delay = (at - sent[h["delivery_id"]]["sent_at"]).total_seconds()
            hit_rows.append(
                {
                    "campaign_id": camp.id,
                    "delivery_id": by_contact[contact],
                    "kind": h["kind"],
                    "class": h["class"],
                    "reason": "apple-mpp" if h["class"] == "machine" else "",
                    "at": at.replace(tzinfo=None),
                    "delay_s": delay,
                    "method": "GET",
                }
            )
        if hit_rows:
            conn.execute(tracking_hits.insert(), hit_rows)
        accepted = [c for c in by_contact if c not in failed]
        bounced = [c for c in accepted if rng.random() < 0.04]
        for contact in bounced:
            reason, permanence = _BOUNCES[int(rng.integers(len(_BOUNCES)))]
            delivery = by_contact[contact]
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == delivery)
                .values(state=State.BOUNCED.value, reason=reason, permanence=permanence)
            )
            sent_at = sent_by_contact[contact]
            conn.execute(
                events.insert().values(
                    campaign_id=camp.id,
                    delivery_id=delivery,
                    kind="bounced",
                    at=(sent_at + timedelta(minutes=float(rng.uniform(1, 600)))).replace(
                        tzinfo=None
                    ),
                    source="bounce-imap",
                    data_json=json.dumps({"reason": reason}),
                )
            )
    ledger.update_campaign(camp.id, status="completed")


def _pec_campaign(
    ledger: Ledger, name: str, contacts: list[str], now: datetime, rng: np.random.Generator
) -> None:
    camp = ledger.ensure_campaign(
        name, sender="protocollo@pec.recapito.test", template_hash="p" * 64, params={}
    )
    ledger.plan(
        camp.id,
        [
            PlannedDelivery(c, f"{c.lower()}@pec.demo.test", "pec.demo.test", 0, channel="pec")
            for c in contacts
        ],
    )
    claims = ledger.claim_chunk(camp.id, 0, worker="demo", channel="pec")
    ledger.apply([RecordOutcome(c, Outcome(State.ACCEPTED, reply_code=250)) for c in claims])
    submitted = now - timedelta(days=2)
    with ledger.engine.begin() as conn:
        for i, claim in enumerate(claims):
            provider = _PEC_PROVIDERS[i % len(_PEC_PROVIDERS)]
            base = 20.0 * (1 + i % len(_PEC_PROVIDERS))
            kinds = [("accettazione", "accepted", 2.0, State.PEC_ACCEPTED)]
            final = rng.random()
            if final < 0.85:
                delay = float(rng.lognormal(np.log(base), 0.6))
                kinds.append(("avvenuta-consegna", "delivered", delay, State.DELIVERED))
                state = State.DELIVERED
            elif final < 0.93:
                kinds.append(("errore-consegna", "delivery_error", 300.0, State.DELIVERY_ERROR))
                state = State.DELIVERY_ERROR
            else:
                state = State.PEC_ACCEPTED
            for receipt_type, kind, delay_s, new_state in kinds:
                issued = submitted + timedelta(seconds=delay_s)
                conn.execute(
                    pec_receipts.insert().values(
                        receipt_key=f"{claim.delivery_id:032d}{receipt_type:>32}"[:64],
                        sha256=f"{claim.delivery_id:064d}",
                        mailbox="protocollo",
                        campaign_id=camp.id,
                        delivery_id=claim.delivery_id,
                        type=receipt_type,
                        kind=kind,
                        receipt_kind="completa",
                        recipient=claim.address,
                        provider=provider,
                        signature="valid",
                        issued_at=issued.replace(tzinfo=None),
                        received_at=(issued + timedelta(seconds=5)).replace(tzinfo=None),
                        delay_s=delay_s,
                        new_state=new_state.value,
                    )
                )
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == claim.delivery_id)
                .values(state=state.value)
            )
    ledger.update_campaign(camp.id, status="completed")
