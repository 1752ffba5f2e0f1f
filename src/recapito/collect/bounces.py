"""The bounce collector: what one returned message does to the ledger.

``BounceCollector.handle(message)`` is the handler ``recapito.collect.mailbox.poll`` calls:

1. the raw bytes are hashed (SHA-256) and kept as evidence under
   ``$RECAPITO_HOME/evidence/bounces/<2 hex>/<sha256>.eml`` (mode 0600);
2. the message is parsed and classified (``recapito.bounces.parse_bounce``) and correlated
   to a delivery (``recapito.bounces.correlate``: signed VERP token, our headers or
   Message-ID in the returned part, ``Original-Envelope-Id``, ``Final-Recipient`` last);
3. in **one** ledger transaction: a row in ``inbound_messages`` keyed by the SHA-256 (a
   message already there changes nothing more: a re-poll after a crash between this
   commit and the IMAP MOVE never counts twice; a copy with another SHA-256 but the same
   Message-ID is a duplicate and changes nothing either), and the effects:

   - a DSN or free-text notice whose recipient failed: the delivery goes from
     ``accepted`` (or ``delivered``, ``uncertain``) to ``bounced`` with reason, status and
     permanence; a ``bounced`` event per failed recipient; a hard bounce (the address or
     its domain is dead, ``recapito.bounces.is_hard``) puts the address on the suppression
     list. Each failed recipient is matched to the delivery of the same campaign with that
     address, or else to the correlated delivery (aliases, forwarding);
   - an ARF complaint: a ``complaint`` event and a suppression (reason ``complaint``);
   - an auto-reply or a delay warning: an ``auto_reply`` / ``delayed_warning`` event only;

4. the message is archived when it was correlated, quarantined otherwise (not a bounce,
   unparseable, or not ours).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from recapito.bounces import BounceReport, is_hard, parse_bounce
from recapito.bounces.correlate import correlate
from recapito.collect.analysis import SOURCE
from recapito.collect.mailbox import Disposition, InboundMessage, MailboxSettings, poll
from recapito.config import Settings
from recapito.errors import TransientError
from recapito.identity.verp import VerpKeyring
from recapito.ledger import Ledger, State
from recapito.ledger.schema import deliveries, events, inbound_messages, suppressions
from recapito.ledger.store import _insert_ignore, utcnow

EVIDENCE_DIR = Path("evidence") / "bounces"
# Post-send states a bounce may move to ``bounced`` (see recapito.ledger.states).
BOUNCEABLE = (State.ACCEPTED.value, State.DELIVERED.value, State.UNCERTAIN.value)
EVENT_KINDS = {
    "dsn": "bounced",
    "free_text": "bounced",
    "arf": "complaint",
    "auto_reply": "auto_reply",
    "delayed_warning": "delayed_warning",
}
_MAX_TEXT = 1000

Parser = Callable[[bytes], BounceReport]
Correlator = Callable[[BounceReport, Ledger], "int | None"]


@dataclass
class CollectCounts:
    """What the handled messages did (per collector run)."""

    by_kind: dict[str, int] = field(default_factory=dict)
    bounced: int = 0  # deliveries moved to ``bounced``
    bounce_events: int = 0
    complaints: int = 0
    suppressed: int = 0
    correlated: int = 0
    uncorrelated: int = 0
    duplicates: int = 0
    parse_errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "by_kind": dict(sorted(self.by_kind.items())),
            "bounced": self.bounced,
            "bounce_events": self.bounce_events,
            "complaints": self.complaints,
            "suppressed": self.suppressed,
            "correlated": self.correlated,
            "uncorrelated": self.uncorrelated,
            "duplicates": self.duplicates,
            "parse_errors": self.parse_errors,
        }


class BounceCollector:
    def __init__(
        self,
        ledger: Ledger,
        home: Path,
        mailbox_label: str,
        *,
        keyring: VerpKeyring | None = None,
        parser: Parser = parse_bounce,
        correlator: Correlator | None = None,
    ) -> None:
        self.ledger = ledger
        self.evidence_root = home / EVIDENCE_DIR
        self.mailbox_label = mailbox_label
        self.parser = parser
        self.correlator = correlator or default_correlator(keyring)
        self.counts = CollectCounts()

    # -- the handler ---------------------------------------------------------------------

    def handle(self, message: InboundMessage) -> Disposition:
        raw = message.raw or b""
        digest = hashlib.sha256(raw).hexdigest()
        evidence = self._keep_evidence(digest, raw)
        message_id = _message_id(raw)
        try:
            report: BounceReport | None = self.parser(raw)
        except Exception:  # a parser failure is this message's problem only
            self.counts.parse_errors += 1
            report = None
        delivery_id = None
        if report is not None and report.kind in EVENT_KINDS:
            try:
                delivery_id = self.correlator(report, self.ledger)
            except sa.exc.OperationalError as exc:
                raise TransientError(f"ledger unavailable while correlating: {exc}") from exc
        kind = report.kind if report is not None else "unparseable"
        try:
            with self.ledger.engine.begin() as conn:
                return self._record(
                    conn, digest, raw, evidence, message_id, report, kind, delivery_id
                )
        except sa.exc.OperationalError as exc:
            raise TransientError(f"ledger unavailable: {exc}") from exc

    # -- internals ------------------------------------------------------------------------

    def _keep_evidence(self, digest: str, raw: bytes) -> Path:
        folder = self.evidence_root / digest[:2]
        path = folder / f"{digest}.eml"
        if path.exists():
            return path
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = folder / f".{digest}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(raw)
            os.replace(tmp, path)
        except OSError as exc:
            raise TransientError(f"cannot keep bounce evidence in {folder}: {exc}") from exc
        return path

    def _record(
        self,
        conn: Connection,
        digest: str,
        raw: bytes,
        evidence: Path,
        message_id: str | None,
        report: BounceReport | None,
        kind: str,
        delivery_id: int | None,
    ) -> Disposition:
        now = utcnow()
        previous = conn.execute(
            sa.select(inbound_messages.c.disposition).where(inbound_messages.c.sha256 == digest)
        ).first()
        if previous is not None:  # processed before (a crash before the MOVE): file it only
            self.counts.duplicates += 1
            return "archive" if previous[0] in ("archived", "duplicate") else "quarantine"
        duplicate = message_id is not None and (
            conn.execute(
                sa.select(inbound_messages.c.sha256)
                .where(
                    inbound_messages.c.source == SOURCE,
                    inbound_messages.c.message_id == message_id,
                    inbound_messages.c.disposition != "quarantined",
                )
                .limit(1)
            ).first()
            is not None
        )
        row = None
        if delivery_id is not None:
            row = conn.execute(
                sa.select(
                    deliveries.c.id,
                    deliveries.c.campaign_id,
                    deliveries.c.address,
                    deliveries.c.state,
                ).where(deliveries.c.id == delivery_id)
            ).first()
        detail: dict[str, Any] = {"kind": kind}
        if report is not None:
            detail["mta_family"] = report.mta_family
            detail["recipients"] = len(report.recipients)
        disposition = "quarantined"
        if duplicate:
            disposition = "duplicate"
            self.counts.duplicates += 1
        elif row is not None and report is not None:
            disposition = "archived"
            self.counts.correlated += 1
            detail.update(self._effects(conn, report, dict(row._mapping), digest, now))
        elif report is not None and report.kind in EVENT_KINDS:
            self.counts.uncorrelated += 1
        self.counts.by_kind[kind] = self.counts.by_kind.get(kind, 0) + 1
        conn.execute(
            _insert_ignore(conn, inbound_messages).values(
                sha256=digest,
                source=SOURCE,
                mailbox=self.mailbox_label[:400],
                message_id=message_id[:998] if message_id else None,
                kind=kind[:32],
                disposition=disposition,
                campaign_id=row._mapping["campaign_id"] if row is not None else None,
                delivery_id=row._mapping["id"] if row is not None else None,
                size=len(raw),
                evidence_path=str(evidence)[:400],
                detail_json=json.dumps(detail, default=str, sort_keys=True),
                received_at=now,
            )
        )
        return "quarantine" if disposition == "quarantined" else "archive"

    def _effects(
        self,
        conn: Connection,
        report: BounceReport,
        delivery: Mapping[str, Any],
        digest: str,
        now: Any,
    ) -> dict[str, Any]:
        campaign_id = int(delivery["campaign_id"])
        raw_ref = f"sha256:{digest}"
        base = {"mta_family": report.mta_family, "report_kind": report.kind}
        if report.kind in ("auto_reply", "delayed_warning", "arf"):
            first = report.recipients[0] if report.recipients else None
            data = {**base, **(_recipient_data(first) if first else {})}
            event_kind = EVENT_KINDS[report.kind]
            _event(conn, campaign_id, int(delivery["id"]), event_kind, data, raw_ref, now)
            if report.kind == "arf":
                self.counts.complaints += 1
                address = (first.recipient if first and first.recipient else None) or str(
                    delivery["address"]
                )
                if _suppress(conn, address, "complaint", campaign_id, now):
                    self.counts.suppressed += 1
                return {"complaint": True}
            return {}
        failed = [r for r in report.recipients if r.action == "failed"]
        if not failed:  # a DSN that reports no failure (delivered/relayed/delayed only)
            data = {**base, "actions": sorted({r.action or "none" for r in report.recipients})}
            _event(conn, campaign_id, int(delivery["id"]), "dsn_notice", data, raw_ref, now)
            return {"failed": 0}
        moved = 0
        for recipient in failed:
            target = _match(conn, delivery, recipient.recipient)
            data = {**base, **_recipient_data(recipient)}
            _event(conn, campaign_id, int(target["id"]), "bounced", data, raw_ref, now)
            self.counts.bounce_events += 1
            result = conn.execute(
                deliveries.update()
                .where(deliveries.c.id == target["id"], deliveries.c.state.in_(BOUNCEABLE))
                .values(
                    state=State.BOUNCED.value,
                    reason=recipient.reason,
                    permanence=recipient.permanence,
                    reply_status=recipient.status,
                    reply_code=recipient.reply_code,
                    reply_text=(recipient.diagnostic or "")[:_MAX_TEXT] or None,
                    updated_at=now,
                )
            )
            moved += result.rowcount or 0
            if is_hard(recipient.reason, recipient.permanence):
                address = str(target["address"])
                if _suppress(conn, address, recipient.reason, campaign_id, now):
                    self.counts.suppressed += 1
        self.counts.bounced += moved
        return {"failed": len(failed), "bounced": moved}


def default_correlator(keyring: VerpKeyring | None) -> Correlator:
    """``recapito.bounces.correlate`` with the keyring that verifies our VERP tokens (any
    local-part prefix): VERP -> our headers / Message-ID -> envelope id -> recipient."""

    def chosen(report: BounceReport, ledger: Ledger) -> int | None:
        return correlate(report, ledger, keyring, prefix=None)

    return chosen


def _recipient_data(recipient: Any) -> dict[str, Any]:
    return {
        "recipient": recipient.recipient,
        "action": recipient.action,
        "reason": recipient.reason,
        "status": recipient.status,
        "reply_code": recipient.reply_code,
        "permanence": recipient.permanence,
        "scope": recipient.scope,
        "confidence": recipient.confidence,
        "remote_mta": recipient.remote_mta,
        "diagnostic": (recipient.diagnostic or "")[:_MAX_TEXT],
    }


def _match(conn: Connection, delivery: Mapping[str, Any], address: str | None) -> Mapping[str, Any]:
    """The delivery of the same campaign with that address, else the correlated one."""
    if not address or address.lower() == str(delivery["address"]).lower():
        return delivery
    row = conn.execute(
        sa.select(deliveries.c.id, deliveries.c.campaign_id, deliveries.c.address)
        .where(
            deliveries.c.campaign_id == delivery["campaign_id"],
            sa.func.lower(deliveries.c.address) == address.lower(),
            deliveries.c.channel == "email",
        )
        .limit(1)
    ).first()
    return dict(row._mapping) if row is not None else delivery


def _event(
    conn: Connection,
    campaign_id: int,
    delivery_id: int,
    kind: str,
    data: Mapping[str, Any],
    raw_ref: str,
    now: Any,
) -> None:
    conn.execute(
        events.insert().values(
            campaign_id=campaign_id,
            delivery_id=delivery_id,
            kind=kind,
            at=now,
            source=SOURCE,
            data_json=json.dumps(dict(data), default=str, sort_keys=True),
            raw_ref=raw_ref,
        )
    )


def _suppress(conn: Connection, address: str, reason: str, campaign_id: int, now: Any) -> bool:
    result = conn.execute(
        _insert_ignore(conn, suppressions)
        .values(
            address=address.strip().lower(),
            reason=reason,
            source=SOURCE,
            campaign_id=campaign_id,
            created_at=now,
        )
        .returning(suppressions.c.address)
    )
    return result.first() is not None


def _message_id(raw: bytes) -> str | None:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0][:65536]
    try:
        value = BytesHeaderParser(policy=compat32).parsebytes(head).get("Message-ID")
    except Exception:
        return None
    text = str(value).strip() if value is not None else ""
    return text or None


# -- one collector run ----------------------------------------------------------------------

MAILBOX_PREFIX = "RECAPITO_BOUNCE_IMAP"


def collect_bounces(
    settings: Settings,
    mailbox: MailboxSettings | None = None,
    *,
    limit: int | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Poll the bounce mailbox once: every unseen message handled and filed away.

    ``mailbox`` defaults to the ``RECAPITO_BOUNCE_IMAP_*`` settings. Returns counts only
    (never addresses). ``TransientError`` when the mailbox or the ledger is unreachable.
    """
    box = mailbox or MailboxSettings.load(MAILBOX_PREFIX, env)
    ledger = Ledger(settings.db_url)
    try:
        collector = BounceCollector(
            ledger, settings.home, box.label, keyring=VerpKeyring.from_settings(settings)
        )
        stats = poll(box, collector.handle, limit=limit)
    finally:
        ledger.close()
    seconds = stats.seconds
    return {
        "mailbox": box.label,
        **stats.as_dict(),
        **collector.counts.as_dict(),
        "messages_per_s": round(stats.seen / seconds, 1) if seconds > 0 else None,
    }
