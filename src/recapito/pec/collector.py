"""The PEC receipt collector: what one message of a PEC mailbox does to the ledger.

``ReceiptCollector.handle`` is the handler ``recapito.collect.mailbox.poll`` calls for every
unseen message of a PEC mailbox:

1. the raw bytes are kept as evidence under ``$RECAPITO_HOME/evidence/pec/<2 hex>/<sha256>.eml``
   (mode 0600) before anything else;
2. ``recapito.pec.receipts.parse_receipt`` reads it (S/MIME signature checked against the
   configured trust anchors);
3. a receipt about one of our submissions is correlated (our Message-ID in the daticert
   ``msgid``, ``X-Riferimento-Message-ID`` or ``postacert.eml``, checked against the
   delivery's campaign; else the ``identificativo`` of a receipt seen before);
4. in **one** transaction: a row in ``inbound_messages`` (SHA-256 of the bytes: a message
   filed twice changes nothing), a row in ``pec_receipts`` keyed by (receipt Message-ID,
   type, recipient) — a receipt seen again with other bytes changes nothing either — and the
   effects: the delivery's state moves forward (``recapito.ledger.states.PEC_TRANSITIONS``:
   out of order is fine, a delivery receipt after the 12 h warning or the 24 h timeout
   still counts, ``esterno`` ends ``not_pec``) and a ``pec_<kind>`` event records it;
5. the message goes to the archive folder; to quarantine when it is not a receipt of ours
   (certified mail, anomaly envelopes, plain mail, other people's notices), cannot be read,
   or its signature is ``invalid`` (tampered, unsigned, untrusted: never applied).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from recapito.collect.mailbox import Disposition, InboundMessage, MailboxSettings, poll
from recapito.config import Settings, home_dir, sandbox_settings_path
from recapito.errors import ConfigError, TransientError
from recapito.ledger import Ledger, State
from recapito.ledger.schema import campaigns, deliveries, events, inbound_messages, pec_receipts
from recapito.ledger.states import TRANSITIONS
from recapito.ledger.store import _insert_ignore, as_utc, utcnow
from recapito.pec import smime
from recapito.pec.receipts import Receipt, ReceiptParser, parse_receipt
from recapito.render.template import message_id_for

SOURCE = "pec-imap"
EVIDENCE_DIR = Path("evidence") / "pec"
CA_SETTING = "RECAPITO_PEC_CA_FILE"  # trust anchors for receipt signatures (PEM bundle)
VERIFY_SETTING = "RECAPITO_PEC_VERIFY_SIGNATURES"  # "0" to skip (status ``unchecked``)

# the state each receipt kind moves a delivery to
TARGET = {
    "acceptance": State.PEC_ACCEPTED,
    "taken_in_charge": State.PEC_ACCEPTED,
    "non_acceptance": State.PEC_REJECTED,
    "delivery": State.DELIVERED,
    "delivery_warning": State.DELIVERY_WARNING,
    "delivery_timeout": State.DELIVERY_TIMEOUT,
    "delivery_error": State.DELIVERY_ERROR,
    "virus": State.DELIVERY_ERROR,
}
# our Message-IDs: <campaign.delivery.tag@domain> (recapito.render.template.message_id_for)
_OURS = re.compile(
    r"^<?(?P<safe>[A-Za-z0-9-]{1,40})\.(?P<id>\d{1,18})\.(?P<tag>[0-9a-f]{16})"
    r"@(?P<domain>[^>\s]+)>?$"
)


def delivery_id_of(message_id: str) -> int | None:
    """The delivery id a Message-ID of ours encodes (None for other Message-IDs)."""
    m = _OURS.match(message_id.strip())
    return int(m.group("id")) if m else None


@dataclass
class ReceiptCounts:
    by_kind: dict[str, int] = field(default_factory=dict)
    by_signature: dict[str, int] = field(default_factory=dict)
    transitions: dict[str, int] = field(default_factory=dict)  # new state -> deliveries
    correlated: int = 0
    uncorrelated: int = 0
    duplicates: int = 0
    rejected_signatures: int = 0
    not_receipts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "by_kind": dict(sorted(self.by_kind.items())),
            "by_signature": dict(sorted(self.by_signature.items())),
            "transitions": dict(sorted(self.transitions.items())),
            "correlated": self.correlated,
            "uncorrelated": self.uncorrelated,
            "duplicates": self.duplicates,
            "rejected_signatures": self.rejected_signatures,
            "not_receipts": self.not_receipts,
        }


def receipt_key(receipt: Receipt, digest: str) -> str:
    """SHA-256 of (receipt Message-ID, type, recipient); the raw digest stands in for a
    missing Message-ID."""
    recipient = (receipt.consegna or "").lower()
    parts = (receipt.message_id or f"sha256:{digest}", receipt.type, recipient)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class ReceiptCollector:
    def __init__(
        self,
        ledger: Ledger,
        home: Path,
        mailbox: str,
        *,
        trust: smime.TrustStore | None = None,
        verify: bool = True,
        parser: ReceiptParser = parse_receipt,
    ) -> None:
        self.ledger = ledger
        self.evidence_root = home / EVIDENCE_DIR
        self.mailbox = mailbox
        self.trust = trust
        self.verify = verify
        self.parser = parser
        self.counts = ReceiptCounts()

    def handle(self, message: InboundMessage) -> Disposition:
        raw = message.raw or b""
        digest = hashlib.sha256(raw).hexdigest()
        evidence = keep_evidence(self.evidence_root, digest, raw)
        try:
            receipt: Receipt | None = self.parser(raw, self.trust, self.verify)
        except Exception:  # a parser failure is this message's problem only
            receipt = None
        try:
            with self.ledger.engine.begin() as conn:
                return self._record(conn, digest, raw, evidence, receipt)
        except sa.exc.OperationalError as exc:
            raise TransientError(f"ledger unavailable: {exc}") from exc

    # -- internals ------------------------------------------------------------------------

    def _record(
        self, conn: Connection, digest: str, raw: bytes, evidence: Path, receipt: Receipt | None
    ) -> Disposition:
        now = utcnow()
        previous = conn.execute(
            sa.select(inbound_messages.c.disposition).where(inbound_messages.c.sha256 == digest)
        ).first()
        if previous is not None:  # filed before (a crash before the MOVE): file it only
            self.counts.duplicates += 1
            return "archive" if previous[0] in ("archived", "duplicate") else "quarantine"
        kind = receipt.kind if receipt is not None else "unparseable"
        self.counts.by_kind[kind] = self.counts.by_kind.get(kind, 0) + 1
        detail: dict[str, Any] = {"kind": kind}
        delivery: Mapping[str, Any] | None = None
        disposition = "quarantined"
        if receipt is not None:
            status = receipt.signature.status
            self.counts.by_signature[status] = self.counts.by_signature.get(status, 0) + 1
            detail.update(
                type=receipt.type,
                signature=status,
                signature_reason=receipt.signature.reason,
                problems=list(receipt.problems),
            )
            if not receipt.is_receipt:
                self.counts.not_receipts += 1
            elif status == "invalid":
                self.counts.rejected_signatures += 1
            else:
                delivery = correlate(conn, receipt)
                if delivery is None:
                    self.counts.uncorrelated += 1
                else:
                    self.counts.correlated += 1
                    disposition = self._apply(conn, receipt, delivery, digest, now, detail)
        conn.execute(
            _insert_ignore(conn, inbound_messages).values(
                sha256=digest,
                source=SOURCE,
                mailbox=self.mailbox[:400],
                message_id=(receipt.message_id or "")[:998] or None if receipt else None,
                kind=kind[:32],
                disposition=disposition,
                campaign_id=delivery["campaign_id"] if delivery is not None else None,
                delivery_id=delivery["id"] if delivery is not None else None,
                size=len(raw),
                evidence_path=str(evidence)[:400],
                detail_json=json.dumps(detail, default=str, sort_keys=True),
                received_at=now,
            )
        )
        return "quarantine" if disposition == "quarantined" else "archive"

    def _apply(
        self,
        conn: Connection,
        receipt: Receipt,
        delivery: Mapping[str, Any],
        digest: str,
        now: datetime,
        detail: dict[str, Any],
    ) -> str:
        target = TARGET[receipt.kind]
        tipo = _tipo_for(receipt, str(delivery["address"]))
        if receipt.kind in ("acceptance", "taken_in_charge") and tipo == "esterno":
            target = State.NOT_PEC
        sent_at = _sent_at(conn, int(delivery["id"]))
        delay = None
        if sent_at is not None and receipt.date is not None:
            # daticert times have whole seconds: a receipt in the second of the submission
            delay = max(0.0, (receipt.date - sent_at).total_seconds())
        key = receipt_key(receipt, digest)
        inserted = conn.execute(
            _insert_ignore(conn, pec_receipts)
            .values(
                receipt_key=key,
                sha256=digest,
                mailbox=self.mailbox[:400],
                campaign_id=delivery["campaign_id"],
                delivery_id=delivery["id"],
                type=receipt.type[:32],
                kind=receipt.kind,
                receipt_kind=receipt.receipt_kind,
                errore=(receipt.errore or None) and receipt.errore[:32],
                errore_esteso=receipt.errore_esteso,
                recipient=(receipt.consegna or str(delivery["address"]))[:320],
                recipient_tipo=tipo,
                identificativo=(receipt.identificativo or "")[:400] or None,
                msgid=(receipt.msgid or "")[:400] or None,
                provider=(receipt.provider or "")[:200] or None,
                signature=receipt.signature.status,
                signature_reason=receipt.signature.reason,
                issued_at=receipt.date,
                received_at=now,
                delay_s=delay,
            )
            .returning(pec_receipts.c.id)
        ).first()
        if inserted is None:  # the same receipt (Message-ID, type, recipient) seen before
            self.counts.duplicates += 1
            detail["duplicate_of"] = key
            return "duplicate"
        current = State(str(delivery["state"]))
        moved = False
        if target != current and target in TRANSITIONS[current]:
            result = conn.execute(
                deliveries.update()
                .where(deliveries.c.id == delivery["id"], deliveries.c.state == current.value)
                .values(
                    state=target.value,
                    reason=_reason(receipt, target),
                    updated_at=now,
                )
            )
            moved = bool(result.rowcount)
        if moved:
            self.counts.transitions[target.value] = self.counts.transitions.get(target.value, 0) + 1
            conn.execute(
                pec_receipts.update()
                .where(pec_receipts.c.id == inserted[0])
                .values(new_state=target.value)
            )
        data = {
            "type": receipt.type,
            "receipt_kind": receipt.receipt_kind,
            "identificativo": receipt.identificativo,
            "errore": receipt.errore,
            "errore_esteso": (receipt.errore_esteso or "")[:500] or None,
            "recipient_tipo": tipo,
            "provider": receipt.provider,
            "issued_at": receipt.date.isoformat() if receipt.date else None,
            "signature": receipt.signature.status,
            "mailbox": self.mailbox,
            "from_state": current.value,
            "to_state": target.value if moved else None,
            "delay_s": delay,
        }
        conn.execute(
            events.insert().values(
                campaign_id=delivery["campaign_id"],
                delivery_id=delivery["id"],
                kind=f"pec_{receipt.kind}",
                at=now,
                source=SOURCE,
                data_json=json.dumps(data, default=str, sort_keys=True),
                raw_ref=f"sha256:{digest}",
            )
        )
        detail.update(to_state=target.value if moved else None, from_state=current.value)
        return "archived"


def _reason(receipt: Receipt, target: State) -> str | None:
    if target == State.DELIVERY_ERROR:
        if receipt.kind == "virus" or receipt.errore == "virus":
            return "virus"
        return f"pec_{receipt.errore or 'altro'}"
    if target == State.PEC_REJECTED:
        return f"pec_non_accettazione_{receipt.errore or 'altro'}"
    if target == State.NOT_PEC:
        return "pec_esterno"
    if target == State.DELIVERY_TIMEOUT:
        return "pec_timeout"
    return None


def _tipo_for(receipt: Receipt, address: str) -> str | None:
    wanted = address.lower()
    for d in receipt.recipients:
        if d.address.lower() == wanted:
            return d.tipo
    return receipt.recipient_tipo


def _sent_at(conn: Connection, delivery_id: int) -> datetime | None:
    value = conn.execute(
        sa.select(sa.func.min(events.c.at)).where(
            events.c.delivery_id == delivery_id, events.c.kind == "sent"
        )
    ).scalar()
    return as_utc(value)


_ROW = sa.select(
    deliveries.c.id,
    deliveries.c.campaign_id,
    deliveries.c.address,
    deliveries.c.state,
    deliveries.c.channel,
    deliveries.c.message_id,
    campaigns.c.name,
).join(campaigns, campaigns.c.id == deliveries.c.campaign_id)


def correlate(conn: Connection, receipt: Receipt) -> Mapping[str, Any] | None:
    """The delivery a receipt is about: our Message-ID (checked against the delivery's
    campaign and stored Message-ID), else the ``identificativo`` of an earlier receipt."""
    for candidate in receipt.correlation_ids():
        m = _OURS.match(candidate.strip())
        if m is None:
            continue
        row = conn.execute(_ROW.where(deliveries.c.id == int(m.group("id")))).first()
        if row is None:
            continue
        found = dict(row._mapping)
        stored = (found.get("message_id") or "").strip().lower()
        expected = message_id_for(str(found["name"]), int(found["id"]), m.group("domain"))
        if candidate.lower() in (stored, expected.lower()):
            return found
    if receipt.identificativo:
        row = conn.execute(
            _ROW.where(
                deliveries.c.id
                == sa.select(pec_receipts.c.delivery_id)
                .where(
                    pec_receipts.c.identificativo == receipt.identificativo[:400],
                    pec_receipts.c.delivery_id.is_not(None),
                )
                .limit(1)
                .scalar_subquery()
            )
        ).first()
        if row is not None:
            return dict(row._mapping)
    return None


def keep_evidence(root: Path, digest: str, raw: bytes) -> Path:
    """The raw bytes in ``root/<2 hex>/<sha256>.eml`` (0600, written once, atomically)."""
    folder = root / digest[:2]
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
        raise TransientError(f"cannot keep PEC evidence in {folder}: {exc}") from exc
    return path


# -- settings and one collector run -------------------------------------------------------------


def trust_store(
    env: Mapping[str, str] | None = None, home: Path | None = None
) -> smime.TrustStore | None:
    """The trust anchors of ``RECAPITO_PEC_CA_FILE``: the environment first, then the
    sandbox's ``settings.json`` (None when neither sets it)."""
    environ = os.environ if env is None else env
    value = environ.get(CA_SETTING)
    if not value:
        value = _sandbox_setting(home or home_dir(), CA_SETTING)
    if not value:
        return None
    path = Path(value)
    try:
        return smime.TrustStore.from_pem_file(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{CA_SETTING}={value}: {exc}") from None


def _sandbox_setting(home: Path, name: str) -> str | None:
    try:
        data = json.loads(sandbox_settings_path(home).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = data.get(name) if isinstance(data, dict) else None
    return str(value) if value else None


def verify_enabled(env: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if env is None else env
    return environ.get(VERIFY_SETTING, "1").strip().lower() not in ("0", "false", "no", "off")


def receipt_mailboxes(
    home: Path, env: Mapping[str, str] | None = None
) -> dict[str, MailboxSettings]:
    """The IMAP side of every configured PEC mailbox, by name: the mailboxes of
    ``recapito.pec.mailboxes`` (blocks / ``RECAPITO_PEC_MAILBOXES_FILE``) that have an IMAP
    host, plus ``RECAPITO_PEC_IMAP_MAILBOXES=name,…`` with ``RECAPITO_PEC_IMAP_<NAME>_*``
    settings like the bounce mailbox's."""
    from recapito.pec.mailboxes import configured_mailboxes

    environ = dict(os.environ if env is None else env)
    out: dict[str, MailboxSettings] = {}
    for name, box in configured_mailboxes(home, environ).items():
        if not box.imap_host:
            continue
        out[name] = MailboxSettings(
            host=box.imap_host,
            port=box.imap_port,
            user=box.username,
            password=box.password,
            security="tls",
            ca_file=box.ca_file,
        )
    listed = environ.get("RECAPITO_PEC_IMAP_MAILBOXES", "").split(",")
    for name in filter(None, (n.strip() for n in listed)):
        prefix = "RECAPITO_PEC_IMAP_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()
        out[name] = MailboxSettings.load(prefix, environ)
    return out


def collect_receipts(
    settings: Settings,
    mailboxes: Mapping[str, MailboxSettings] | None = None,
    *,
    only: Sequence[str] | None = None,
    limit: int | None = None,
    env: Mapping[str, str] | None = None,
    trust: smime.TrustStore | None = None,
) -> dict[str, Any]:
    """Poll every PEC mailbox once (or those named in ``only``): counts per mailbox and in
    total, never addresses. A mailbox that cannot be reached is reported and the others are
    still polled; ``TransientError`` only when none could be."""
    boxes = dict(mailboxes) if mailboxes is not None else receipt_mailboxes(settings.home, env)
    if only:
        boxes = {k: v for k, v in boxes.items() if k in set(only)}
    anchors = trust if trust is not None else trust_store(env, settings.home)
    verify = verify_enabled(env)
    ledger = Ledger(settings.db_url)
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    total = ReceiptCounts()
    try:
        for name, box in sorted(boxes.items()):
            collector = ReceiptCollector(ledger, settings.home, name, trust=anchors, verify=verify)
            try:
                stats = poll(box, collector.handle, limit=limit)
            except TransientError as exc:
                errors[name] = str(exc)
                continue
            results[name] = {**stats.as_dict(), **collector.counts.as_dict()}
            _merge(total, collector.counts)
    finally:
        ledger.close()
    if boxes and not results:
        raise TransientError("no PEC mailbox could be polled: " + "; ".join(errors.values()))
    return {
        "mailboxes": results,
        "errors": errors,
        "seen": sum(r["seen"] for r in results.values()),
        "archived": sum(r["archived"] for r in results.values()),
        "quarantined": sum(r["quarantined"] for r in results.values()),
        "trust_anchors": len(anchors) if anchors is not None else 0,
        "verify": verify,
        **total.as_dict(),
    }


def _merge(total: ReceiptCounts, part: ReceiptCounts) -> None:
    for name in ("by_kind", "by_signature", "transitions"):
        into: dict[str, int] = getattr(total, name)
        for k, v in getattr(part, name).items():
            into[k] = into.get(k, 0) + v
    for name in ("correlated", "uncorrelated", "duplicates", "rejected_signatures", "not_receipts"):
        setattr(total, name, getattr(total, name) + getattr(part, name))


__all__ = [
    "SOURCE",
    "ReceiptCollector",
    "ReceiptCounts",
    "collect_receipts",
    "correlate",
    "delivery_id_of",
    "keep_evidence",
    "receipt_key",
    "receipt_mailboxes",
    "trust_store",
]
