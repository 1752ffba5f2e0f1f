"""Ledger access: SQLAlchemy Core over SQLite (default) or PostgreSQL.

Every write that records a server's verdict is its own short transaction, committed
right after the reply, so a crash loses at most the reply being waited for; that
delivery is then ``uncertain``, never silently resent.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine

from recapito.errors import ConfigError, LedgerError
from recapito.ledger.schema import (
    campaigns,
    deliveries,
    events,
    mta_sts_policies,
    mx_facts,
    rejections,
    suppressions,
)
from recapito.ledger.states import SEND_OUTCOMES, State

_INSERT_BATCH = 5_000


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything in the ledger is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def create_ledger_engine(url: str) -> Engine:
    """An engine for the ledger URL; SQLite files get WAL mode and a busy timeout."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"ledger URL {url!r} is not a database URL") from exc
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError(
            f"ledger URL {parsed.render_as_string(hide_password=True)!r}: unsupported database "
            "(use sqlite:///PATH or postgresql://…)"
        )
    if parsed.get_driver_name() in ("", "psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return sa.create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=10)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    cfg = Config()
    cfg.set_main_option("script_location", str(files("recapito.ledger") / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@dataclass(frozen=True)
class Campaign:
    id: int
    name: str
    status: str
    sender: str
    template_hash: str
    params: dict[str, Any]
    counts: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class PlannedDelivery:
    contact_id: str
    address: str
    domain: str
    chunk: int
    channel: str = "email"
    rule: str | None = None  # the channel rule that fired (recapito.pec.rules)
    mailbox_rule: str | None = None  # PEC rows: the rule that chose the mailbox
    pec_mailbox: str | None = None  # PEC rows: the sender mailbox


@dataclass(frozen=True)
class Claim:
    delivery_id: int
    campaign_id: int
    contact_id: str
    address: str
    domain: str
    chunk: int
    attempt: int
    token: str
    first_attempt_at: datetime | None = None
    pec_mailbox: str | None = None  # PEC rows: the sender mailbox chosen at planning


@dataclass(frozen=True)
class Outcome:
    """What a send attempt ended with; written on a claimed row."""

    state: State
    mx_host: str | None = None
    reply_code: int | None = None
    reply_status: str | None = None
    reply_text: str | None = None
    reason: str | None = None
    permanence: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_level: str | None = None
    message_id: str | None = None
    next_attempt_at: datetime | None = None
    # kept in the delivery's event (not a column): the certificate verdict of the MX host
    tls_certificate: str | None = None


@dataclass(frozen=True)
class MXFacts:
    mx_host: str
    starttls_offered: bool
    ever_offered_starttls: bool
    tls_version: str | None
    tls_cipher: str | None
    tls_level: str | None
    cert_verdict: str | None
    checked_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class MTASTSPolicyRecord:
    """A cached MTA-STS policy of one recipient domain (RFC 8461 §5)."""

    domain: str
    policy_id: str
    mode: str
    mx_patterns: tuple[str, ...]
    max_age: int
    fetched_at: datetime
    expires_at: datetime
    policy_sha256: str


_EVENT_KIND = {
    State.ACCEPTED: "sent",
    State.DEFERRED: "deferred",
    State.FAILED: "failed",
    State.INSECURE_CHANNEL: "insecure_channel",
    State.SUPPRESSED: "suppressed",
    State.UNCERTAIN: "uncertain",
    State.EXPIRED: "expired",
}


# Statements on the per-reply hot path, built once (building them costs more than running them).
_RECORD_OUTCOME = (
    deliveries.update()
    .where(
        sa.and_(
            deliveries.c.id == sa.bindparam("b_id"),
            deliveries.c.state.in_([State.CLAIMED.value, State.SENDING.value]),
            deliveries.c.claim_token == sa.bindparam("b_token"),
        )
    )
    .values(
        {
            name: sa.func.coalesce(sa.bindparam(name), deliveries.c.message_id)
            if name == "message_id"
            else sa.bindparam(name)
            for name in (
                "state",
                "mx_host",
                "reply_code",
                "reply_status",
                "reply_text",
                "reason",
                "permanence",
                "tls_version",
                "tls_cipher",
                "tls_level",
                "next_attempt_at",
                "lease_until",
                "updated_at",
                "message_id",
            )
        }
    )
)
_INSERT_EVENT = events.insert()
_MARK_SENDING = (
    deliveries.update()
    .where(
        sa.and_(
            deliveries.c.id == sa.bindparam("b_id"),
            deliveries.c.state == State.CLAIMED.value,
            deliveries.c.claim_token == sa.bindparam("b_token"),
        )
    )
    .values(
        state=State.SENDING.value,
        updated_at=sa.bindparam("b_now"),
        # known before the body leaves: an operator can find an uncertain message by it
        message_id=sa.func.coalesce(sa.bindparam("b_mid"), deliveries.c.message_id),
    )
)


_RECORDABLE = SEND_OUTCOMES | {State.UNCERTAIN, State.EXPIRED}


@dataclass(frozen=True)
class MarkSending:
    """The body of a claimed delivery is about to leave (committed before it does)."""

    claim: Claim
    message_id: str | None = None


@dataclass(frozen=True)
class RecordOutcome:
    """The verdict of a send attempt, with its event."""

    claim: Claim
    outcome: Outcome
    source: str = "smtp"


@dataclass(frozen=True)
class Suppress:
    """An address no campaign should try again (e.g. a hard bounce at send time)."""

    address: str
    reason: str
    source: str
    campaign_id: int | None = None


LedgerOp = MarkSending | RecordOutcome | Suppress


def _outcome_values(op: RecordOutcome, now: datetime) -> dict[str, Any]:
    outcome = op.outcome
    return {
        "b_id": op.claim.delivery_id,
        "b_token": op.claim.token,
        "state": outcome.state.value,
        "mx_host": outcome.mx_host,
        "reply_code": outcome.reply_code,
        "reply_status": outcome.reply_status,
        "reply_text": outcome.reply_text,
        "reason": outcome.reason,
        "permanence": outcome.permanence,
        "tls_version": outcome.tls_version,
        "tls_cipher": outcome.tls_cipher,
        "tls_level": outcome.tls_level,
        "next_attempt_at": outcome.next_attempt_at,
        "lease_until": None,
        "updated_at": now,
        "message_id": outcome.message_id,
    }


def _outcome_event(op: RecordOutcome, now: datetime, *, late: bool) -> dict[str, Any]:
    outcome = op.outcome
    data = {k: v for k, v in asdict(outcome).items() if v is not None and k != "state"}
    data["attempt"] = op.claim.attempt
    if late:
        data["late"] = True
    return {
        "campaign_id": op.claim.campaign_id,
        "delivery_id": op.claim.delivery_id,
        "kind": _EVENT_KIND[outcome.state],
        "at": now,
        "source": op.source,
        "data_json": json.dumps(data, default=str, sort_keys=True),
        "raw_ref": None,
    }


class Ledger:
    def __init__(self, url: str, *, run_migrations: bool = True) -> None:
        self.url = url
        self.engine = create_ledger_engine(url)
        try:
            if run_migrations:
                migrate(self.engine)
            else:
                with self.engine.connect():
                    pass
        except sa.exc.OperationalError as exc:
            self.engine.dispose()
            reason = str(exc.orig or exc).strip().splitlines()[0]
            shown = sa.engine.make_url(url).render_as_string(hide_password=True)
            raise LedgerError(
                f"ledger database {shown} unreachable ({reason}): check RECAPITO_DB_URL"
            ) from None

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # ---- campaigns -------------------------------------------------------------------

    def ensure_campaign(
        self, name: str, *, sender: str, template_hash: str, params: Mapping[str, Any]
    ) -> Campaign:
        """Create the campaign, or return the existing one of that name (a re-run resumes it).

        Re-running a name with a different template is refused: the rows already sent
        would not match what the new template would produce.
        """
        existing = self.get_campaign(name)
        if existing is not None:
            if existing.template_hash != template_hash:
                raise LedgerError(
                    f"campaign {name!r} already exists with another template "
                    f"(hash {existing.template_hash[:12]}…); choose a new campaign name"
                )
            return existing
        now = utcnow()
        try:
            with self._tx() as conn:
                conn.execute(
                    campaigns.insert().values(
                        name=name,
                        status="created",
                        sender=sender,
                        template_hash=template_hash,
                        params_json=json.dumps(dict(params), sort_keys=True, default=str),
                        counts_json="{}",
                        created_at=now,
                        updated_at=now,
                    )
                )
        except sa.exc.IntegrityError:
            pass  # created concurrently by another worker: fall through and read it
        created = self.get_campaign(name)
        assert created is not None
        return created

    def get_campaign(self, name: str) -> Campaign | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(campaigns).where(campaigns.c.name == name)).first()
        return None if row is None else _campaign(row._mapping)

    def campaign_by_id(self, campaign_id: int) -> Campaign:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(campaigns).where(campaigns.c.id == campaign_id)).first()
        if row is None:
            raise LedgerError(f"no campaign with id {campaign_id}")
        return _campaign(row._mapping)

    def list_campaigns(self) -> list[Campaign]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(campaigns).order_by(campaigns.c.id)).all()
        return [_campaign(r._mapping) for r in rows]

    def update_campaign(
        self,
        campaign_id: int,
        *,
        status: str | None = None,
        counts: Mapping[str, Any] | None = None,
    ) -> None:
        values: dict[str, Any] = {"updated_at": utcnow()}
        if status is not None:
            values["status"] = status
        if counts is not None:
            values["counts_json"] = json.dumps(dict(counts), sort_keys=True, default=str)
        with self._tx() as conn:
            conn.execute(campaigns.update().where(campaigns.c.id == campaign_id).values(**values))

    # ---- planning ----------------------------------------------------------------------

    def plan(self, campaign_id: int, rows: Iterable[PlannedDelivery]) -> int:
        """Insert planned deliveries; rows already planned for this campaign are left alone.

        Returns how many rows are new. Safe to call again after a crash or a retry.
        """
        now = utcnow()
        inserted = 0
        batch: list[dict[str, Any]] = []

        def flush(conn: Connection) -> int:
            if not batch:
                return 0
            # RETURNING counts what was really inserted (executemany rowcount is not
            # reliable across drivers).
            stmt = _insert_ignore(conn, deliveries).returning(deliveries.c.id)
            new = len(conn.execute(stmt, batch).all())
            batch.clear()
            return new

        with self._tx() as conn:
            for row in rows:
                batch.append(
                    {
                        "campaign_id": campaign_id,
                        "contact_id": row.contact_id,
                        "channel": row.channel,
                        "address": row.address,
                        "domain": row.domain,
                        "chunk": row.chunk,
                        "rule": row.rule,
                        "mailbox_rule": row.mailbox_rule,
                        "pec_mailbox": row.pec_mailbox,
                        "state": State.PLANNED.value,
                        "attempts": 0,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
                if len(batch) >= _INSERT_BATCH:
                    inserted += flush(conn)
            inserted += flush(conn)
        return inserted

    def replace_rejections(self, campaign_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
        """Store the targeting rejections of a campaign (replacing those of an earlier run)."""
        payload = [
            {
                "campaign_id": campaign_id,
                "line": r.get("line"),
                "contact_id": r.get("contact_id"),
                "address": (str(r["address"])[:400] if r.get("address") is not None else None),
                "reason": str(r["reason"]),
            }
            for r in rows
        ]
        with self._tx() as conn:
            conn.execute(rejections.delete().where(rejections.c.campaign_id == campaign_id))
            for i in range(0, len(payload), _INSERT_BATCH):
                conn.execute(rejections.insert(), payload[i : i + _INSERT_BATCH])
        return len(payload)

    def _count_by(self, key: Any, *where: Any) -> dict[str, int]:
        """How many rows per value of ``key`` among those matching ``where``."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(key, sa.func.count()).where(sa.and_(*where)).group_by(key)
            ).all()
        return {str(r[0]): int(r[1]) for r in rows}

    def rejection_counts(self, campaign_id: int) -> dict[str, int]:
        return self._count_by(rejections.c.reason, rejections.c.campaign_id == campaign_id)

    def chunks(self, campaign_id: int) -> list[int]:
        query = sa.select(deliveries.c.chunk).where(deliveries.c.campaign_id == campaign_id)
        with self.engine.connect() as conn:
            return [int(r[0]) for r in conn.execute(query.distinct().order_by(deliveries.c.chunk))]

    def planned_chunks(self, campaign_id: int, channel: str | None = None) -> dict[int, str]:
        """Chunks that still hold ``planned`` rows, each with a token of those rows.

        The token changes whenever the set of planned rows does (rows released after a
        crash, rows sent), so a cached result for a chunk is reused only while its work is
        truly the same."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    deliveries.c.chunk,
                    sa.func.count(),
                    sa.func.sum(deliveries.c.attempts),
                    sa.func.min(deliveries.c.id),
                    sa.func.max(deliveries.c.id),
                )
                .where(
                    sa.and_(
                        deliveries.c.campaign_id == campaign_id,
                        deliveries.c.state == State.PLANNED.value,
                        sa.true() if channel is None else deliveries.c.channel == channel,
                    )
                )
                .group_by(deliveries.c.chunk)
                .order_by(deliveries.c.chunk)
            ).all()
        return {int(r[0]): f"p{r[1]}-{r[2]}-{r[3]}-{r[4]}" for r in rows}

    # ---- claims and outcomes -------------------------------------------------------------

    def claim_holders(self, campaign_id: int) -> list[str]:
        """The workers holding claimed or sending rows of a campaign."""
        with self.engine.connect() as conn:
            return [
                str(w)
                for (w,) in conn.execute(
                    sa.select(deliveries.c.worker)
                    .where(
                        sa.and_(
                            deliveries.c.campaign_id == campaign_id,
                            deliveries.c.state.in_([State.CLAIMED.value, State.SENDING.value]),
                            deliveries.c.worker.is_not(None),
                        )
                    )
                    .distinct()
                ).all()
            ]

    def expire_stale_claims(
        self, campaign_id: int | None = None, *, dead_workers: Sequence[str] = ()
    ) -> dict[str, int]:
        """Deal with claims whose lease ran out (their worker died), and with the claims of
        ``dead_workers`` (known dead: a process of this host that no longer exists).

        A row still ``claimed`` never reached the point where its body was sent: it goes
        back to ``planned``. A row ``sending`` may have been accepted by the server without
        the reply reaching us: it becomes ``uncertain``, never resent without a decision.
        """
        now = utcnow()
        gone = deliveries.c.lease_until < now
        if dead_workers:
            gone = sa.or_(gone, deliveries.c.worker.in_(list(dead_workers)))
        expired = sa.and_(
            deliveries.c.state.in_([State.CLAIMED.value, State.SENDING.value]),
            gone,
        )
        if campaign_id is not None:
            expired = sa.and_(expired, deliveries.c.campaign_id == campaign_id)
        counts = {"released": 0, "uncertain": 0}
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(deliveries.c.id, deliveries.c.campaign_id, deliveries.c.state).where(
                    expired
                )
            ).all()
            if not rows:
                return counts
            for state, new_state, kind, why in (
                (State.CLAIMED, State.PLANNED, "released", "lease expired before sending"),
                (
                    State.SENDING,
                    State.UNCERTAIN,
                    "uncertain",
                    "lease expired while the message was being sent",
                ),
            ):
                ids = [r[0] for r in rows if r[2] == state.value]
                if not ids:
                    continue
                values: dict[str, Any] = {"state": new_state.value, "updated_at": now}
                if new_state == State.PLANNED:
                    values.update(worker=None, claim_token=None, lease_until=None)
                else:
                    values["reason"] = "lease_expired"
                for start in range(0, len(ids), 900):
                    part = ids[start : start + 900]
                    conn.execute(
                        deliveries.update()
                        .where(
                            sa.and_(deliveries.c.id.in_(part), deliveries.c.state == state.value)
                        )
                        .values(**values)
                    )
                conn.execute(
                    events.insert(),
                    [
                        {
                            "campaign_id": r[1],
                            "delivery_id": r[0],
                            "kind": kind,
                            "at": now,
                            "source": "ledger",
                            "data_json": json.dumps({"why": why}),
                        }
                        for r in rows
                        if r[2] == state.value
                    ],
                )
                counts[kind] = len(ids)
        return counts

    def requeue(
        self,
        campaign_id: int,
        *,
        state: State,
        reason: str | None = None,
        operator: str,
    ) -> int:
        """An operator's decision to send again: rows in ``state`` (``uncertain``, or
        ``failed`` with ``reason``) go back to ``planned``, each with an event saying who."""
        if state not in (State.UNCERTAIN, State.FAILED):
            raise LedgerError(f"only uncertain or failed deliveries can be resent, not {state}")
        cond = sa.and_(deliveries.c.campaign_id == campaign_id, deliveries.c.state == state.value)
        if reason is not None:
            cond = sa.and_(cond, deliveries.c.reason == reason)
        now = utcnow()
        with self._tx() as conn:
            ids = [r[0] for r in conn.execute(sa.select(deliveries.c.id).where(cond))]
            for start in range(0, len(ids), 900):
                part = ids[start : start + 900]
                conn.execute(
                    deliveries.update()
                    .where(sa.and_(deliveries.c.id.in_(part), deliveries.c.state == state.value))
                    .values(
                        state=State.PLANNED.value,
                        worker=None,
                        claim_token=None,
                        lease_until=None,
                        next_attempt_at=None,
                        updated_at=now,
                    )
                )
            if ids:
                conn.execute(
                    events.insert(),
                    [
                        {
                            "campaign_id": campaign_id,
                            "delivery_id": i,
                            "kind": "resend_requested",
                            "at": now,
                            "source": "operator",
                            "data_json": json.dumps(
                                {"from_state": state.value, "reason": reason, "by": operator}
                            ),
                        }
                        for i in ids
                    ],
                )
        return len(ids)

    def mark_sending(self, claim: Claim) -> bool:
        """Commit that the body of this claimed delivery is about to go out."""
        return self.apply([MarkSending(claim)])[0]

    def claim_chunk(
        self,
        campaign_id: int,
        chunk: int,
        *,
        worker: str,
        lease: timedelta = timedelta(minutes=30),
        only_deferred: bool = False,
        channel: str | None = None,
    ) -> list[Claim]:
        """Claim every sendable row of a chunk with one conditional UPDATE.

        Only ``planned`` rows and ``deferred`` rows that are due are taken (with
        ``only_deferred``, just the due deferred rows); a row claimed by someone else is
        never taken, so two workers can never send the same delivery. With ``channel``
        only that channel's rows are taken (e-mail and PEC chunks are sent apart).
        """
        now = utcnow()
        token = uuid.uuid4().hex
        due = sa.and_(
            deliveries.c.state == State.DEFERRED.value,
            deliveries.c.next_attempt_at <= now,
        )
        sendable = due if only_deferred else sa.or_(deliveries.c.state == State.PLANNED.value, due)
        with self._tx() as conn:
            conn.execute(
                deliveries.update()
                .where(
                    sa.and_(
                        deliveries.c.campaign_id == campaign_id,
                        deliveries.c.chunk == chunk,
                        sendable,
                        sa.true() if channel is None else deliveries.c.channel == channel,
                    )
                )
                .values(
                    state=State.CLAIMED.value,
                    worker=worker,
                    claim_token=token,
                    lease_until=now + lease,
                    attempts=deliveries.c.attempts + 1,
                    first_attempt_at=sa.func.coalesce(deliveries.c.first_attempt_at, now),
                    updated_at=now,
                )
            )
            rows = conn.execute(
                sa.select(
                    deliveries.c.id,
                    deliveries.c.contact_id,
                    deliveries.c.address,
                    deliveries.c.domain,
                    deliveries.c.attempts,
                    deliveries.c.first_attempt_at,
                    deliveries.c.pec_mailbox,
                )
                .where(deliveries.c.claim_token == token)
                .order_by(deliveries.c.domain, deliveries.c.id)
            ).all()
        return [
            Claim(
                delivery_id=int(r[0]),
                campaign_id=campaign_id,
                contact_id=str(r[1]),
                address=str(r[2]),
                domain=str(r[3]),
                chunk=chunk,
                attempt=int(r[4]),
                token=token,
                first_attempt_at=as_utc(r[5]),
                pec_mailbox=r[6],
            )
            for r in rows
        ]

    def record(self, claim: Claim, outcome: Outcome, *, source: str = "smtp") -> bool:
        """Write the outcome of a claimed delivery and its event, in one transaction.

        Returns False when the claim is no longer ours (lease expired and the row was
        marked uncertain meanwhile): the outcome is then kept as an event only.
        """
        return self.apply([RecordOutcome(claim, outcome, source)])[0]

    def apply(self, ops: Sequence[LedgerOp]) -> list[bool]:
        """Several writes of the delivery hot path in one transaction (a group commit).

        Each operation keeps its own meaning and answer: ``MarkSending`` and
        ``RecordOutcome`` say whether the claim was still ours, ``Suppress`` whether
        the address was new to the list. Nothing is visible before the commit.
        """
        for op in ops:
            if isinstance(op, RecordOutcome) and op.outcome.state not in _RECORDABLE:
                raise LedgerError(f"{op.outcome.state} is not an outcome of a send attempt")
        now = utcnow()
        answers: list[bool] = []
        event_rows: list[dict[str, Any]] = []
        with self._tx() as conn:
            for op in ops:
                if isinstance(op, MarkSending):
                    params = {
                        "b_id": op.claim.delivery_id,
                        "b_token": op.claim.token,
                        "b_now": now,
                        "b_mid": op.message_id,
                    }
                    answers.append(conn.execute(_MARK_SENDING, params).rowcount == 1)
                elif isinstance(op, RecordOutcome):
                    owned = conn.execute(_RECORD_OUTCOME, _outcome_values(op, now)).rowcount == 1
                    answers.append(owned)
                    event_rows.append(_outcome_event(op, now, late=not owned))
                else:
                    answers.append(self._suppress(conn, op, now))
            if event_rows:
                conn.execute(_INSERT_EVENT, event_rows)
        return answers

    def extend_leases(self, tokens: Iterable[str], lease: timedelta) -> int:
        """Push back the lease of claims still held under these claim tokens."""
        tokens = list(tokens)
        if not tokens:
            return 0
        now = utcnow()
        with self._tx() as conn:
            result = conn.execute(
                deliveries.update()
                .where(
                    sa.and_(
                        deliveries.c.claim_token.in_(tokens),
                        deliveries.c.state.in_([State.CLAIMED.value, State.SENDING.value]),
                    )
                )
                .values(lease_until=now + lease)
            )
            return int(result.rowcount)

    def release(self, claims: Sequence[Claim]) -> int:
        """Give back claims that were never attempted (no byte of the message left us)."""
        if not claims:
            return 0
        now = utcnow()
        released = 0
        with self._tx() as conn:
            for claim in claims:
                result = conn.execute(
                    deliveries.update()
                    .where(
                        sa.and_(
                            deliveries.c.id == claim.delivery_id,
                            deliveries.c.state == State.CLAIMED.value,
                            deliveries.c.claim_token == claim.token,
                        )
                    )
                    .values(
                        state=State.PLANNED.value,
                        worker=None,
                        claim_token=None,
                        lease_until=None,
                        attempts=deliveries.c.attempts - 1,
                        updated_at=now,
                    )
                )
                released += result.rowcount
        return released

    def due_deferred(
        self, campaign_id: int, within: timedelta, channel: str | None = None
    ) -> tuple[dict[int, str], datetime | None]:
        """Chunks with deferred rows due before now + ``within``, and the latest such due time
        (with ``channel``, only that channel's rows: e-mail and PEC are retried apart).

        Each chunk comes with a token that changes whenever its deferred rows change (one
        more attempt, one fewer row), so a retry of the same rows is recognisable and a
        retry of new ones is not mistaken for it. Waiting until the latest due time lets
        one retry round take every one of them.
        """
        horizon = utcnow() + within
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    deliveries.c.chunk,
                    sa.func.max(deliveries.c.next_attempt_at),
                    sa.func.count(),
                    sa.func.sum(deliveries.c.attempts),
                    sa.func.max(deliveries.c.id),
                )
                .where(
                    sa.and_(
                        deliveries.c.campaign_id == campaign_id,
                        deliveries.c.state == State.DEFERRED.value,
                        deliveries.c.next_attempt_at <= horizon,
                        sa.true() if channel is None else deliveries.c.channel == channel,
                    )
                )
                .group_by(deliveries.c.chunk)
                .order_by(deliveries.c.chunk)
            ).all()
        due = [d for d in (as_utc(r[1]) for r in rows) if d is not None]
        latest = max(due) if due else None
        return {int(r[0]): f"{r[2]}-{r[3]}-{r[4]}" for r in rows}, latest

    def campaigns_with_due_deferred(self, within: timedelta = timedelta(0)) -> list[int]:
        """Ids of the campaigns holding deferred rows due before now + ``within``."""
        horizon = utcnow() + within
        query = (
            sa.select(deliveries.c.campaign_id)
            .where(
                sa.and_(
                    deliveries.c.state == State.DEFERRED.value,
                    deliveries.c.next_attempt_at <= horizon,
                )
            )
            .distinct()
            .order_by(deliveries.c.campaign_id)
        )
        with self.engine.connect() as conn:
            return [int(r[0]) for r in conn.execute(query)]

    def add_event(
        self,
        campaign_id: int,
        kind: str,
        *,
        delivery_id: int | None = None,
        source: str,
        data: Mapping[str, Any] | None = None,
        raw_ref: str | None = None,
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                events.insert().values(
                    campaign_id=campaign_id,
                    delivery_id=delivery_id,
                    kind=kind,
                    at=utcnow(),
                    source=source,
                    data_json=json.dumps(dict(data or {}), default=str, sort_keys=True),
                    raw_ref=raw_ref,
                )
            )

    # ---- suppressions -------------------------------------------------------------------

    def add_suppression(
        self, address: str, *, reason: str, source: str, campaign_id: int | None = None
    ) -> bool:
        return self.apply([Suppress(address, reason, source, campaign_id)])[0]

    @staticmethod
    def _suppress(conn: Connection, op: Suppress, now: datetime) -> bool:
        result = conn.execute(
            _insert_ignore(conn, suppressions)
            .values(
                address=op.address.strip().lower(),
                reason=op.reason,
                source=op.source,
                campaign_id=op.campaign_id,
                created_at=now,
            )
            .returning(suppressions.c.address)
        )
        return result.first() is not None

    def suppressed_among(self, addresses: Iterable[str]) -> set[str]:
        """The subset of ``addresses`` (compared case-insensitively) that is suppressed."""
        keys = sorted({a.strip().lower() for a in addresses})
        found: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(keys), 900):
                part = keys[i : i + 900]
                found.update(
                    str(r[0])
                    for r in conn.execute(
                        sa.select(suppressions.c.address).where(suppressions.c.address.in_(part))
                    )
                )
        return found

    # ---- MX facts -----------------------------------------------------------------------

    def get_mx_facts(self, mx_host: str) -> MXFacts | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(mx_facts).where(mx_facts.c.mx_host == mx_host)).first()
        if row is None:
            return None
        m = row._mapping
        return MXFacts(
            mx_host=m["mx_host"],
            starttls_offered=bool(m["starttls_offered"]),
            ever_offered_starttls=bool(m["ever_offered_starttls"]),
            tls_version=m["tls_version"],
            tls_cipher=m["tls_cipher"],
            tls_level=m["tls_level"],
            cert_verdict=m["cert_verdict"],
            checked_at=as_utc(m["checked_at"]) or utcnow(),
            expires_at=as_utc(m["expires_at"]) or utcnow(),
        )

    def save_mx_facts(self, facts: MXFacts) -> None:
        """Insert or update what an MX host offered; ``ever_offered_starttls`` only grows."""
        previous = self.get_mx_facts(facts.mx_host)
        values = asdict(facts)
        if previous is not None:
            values["ever_offered_starttls"] = (
                previous.ever_offered_starttls or facts.ever_offered_starttls
            )
        with self._tx() as conn:
            if previous is None:
                try:
                    conn.execute(mx_facts.insert().values(**values))
                    return
                except sa.exc.IntegrityError:
                    pass
            conn.execute(
                mx_facts.update().where(mx_facts.c.mx_host == facts.mx_host).values(**values)
            )

    # ---- MTA-STS policy cache --------------------------------------------------------------

    def get_mta_sts_policy(self, domain: str) -> MTASTSPolicyRecord | None:
        """The cached policy of ``domain`` (expired or not), or None."""
        key = domain.lower().rstrip(".")
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(mta_sts_policies).where(mta_sts_policies.c.domain == key)
            ).first()
        if row is None:
            return None
        m = row._mapping
        try:
            patterns = tuple(str(p) for p in json.loads(m["mx_patterns"]))
        except (ValueError, TypeError):
            return None  # a damaged row is as good as no cache: the policy gets refetched
        return MTASTSPolicyRecord(
            domain=m["domain"],
            policy_id=m["policy_id"],
            mode=m["mode"],
            mx_patterns=patterns,
            max_age=int(m["max_age"]),
            fetched_at=as_utc(m["fetched_at"]) or utcnow(),
            expires_at=as_utc(m["expires_at"]) or utcnow(),
            policy_sha256=m["policy_sha256"],
        )

    def save_mta_sts_policy(self, record: MTASTSPolicyRecord) -> None:
        """Insert or replace the cached policy of ``record.domain``."""
        key = record.domain.lower().rstrip(".")
        values = {**asdict(record), "domain": key, "mx_patterns": json.dumps(record.mx_patterns)}
        update = mta_sts_policies.update().where(mta_sts_policies.c.domain == key).values(**values)
        with self._tx() as conn:
            if conn.execute(update).rowcount:
                return
        try:
            with self._tx() as conn:
                conn.execute(mta_sts_policies.insert().values(**values))
        except sa.exc.IntegrityError:
            with self._tx() as conn:  # inserted meanwhile by another worker
                conn.execute(update)

    # ---- reading ------------------------------------------------------------------------

    def state_counts(self, campaign_id: int) -> dict[str, int]:
        return self._count_by(deliveries.c.state, deliveries.c.campaign_id == campaign_id)

    def tls_mix(self, campaign_id: int) -> dict[str, int]:
        """Accepted deliveries by negotiated TLS version (``none`` for cleartext)."""
        return self._count_by(
            sa.func.coalesce(deliveries.c.tls_version, "none"),
            deliveries.c.campaign_id == campaign_id,
            deliveries.c.state == State.ACCEPTED.value,
        )

    def domain_table(self, campaign_id: int) -> list[dict[str, Any]]:
        """Per recipient domain: how many deliveries in each state."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(deliveries.c.domain, deliveries.c.state, sa.func.count())
                .where(deliveries.c.campaign_id == campaign_id)
                .group_by(deliveries.c.domain, deliveries.c.state)
            ).all()
        table: dict[str, dict[str, Any]] = {}
        for domain, state, count in rows:
            entry = table.setdefault(str(domain), {"domain": str(domain), "total": 0})
            entry[str(state)] = int(count)
            entry["total"] += int(count)
        return sorted(table.values(), key=lambda e: (-int(e["total"]), str(e["domain"])))

    def level_mix(self, campaign_id: int) -> dict[str, int]:
        """Deliveries by the security level of the MX host they went to (or were refused at)."""
        return self._count_by(
            sa.func.coalesce(deliveries.c.tls_level, "unknown"),
            deliveries.c.campaign_id == campaign_id,
            deliveries.c.state.in_([State.ACCEPTED.value, State.INSECURE_CHANNEL.value]),
        )

    def insecure_by_domain(self, campaign_id: int) -> list[dict[str, Any]]:
        """``insecure_channel`` deliveries per recipient domain and TLS-RPT reason."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    deliveries.c.domain,
                    deliveries.c.reason,
                    sa.func.max(deliveries.c.tls_level),
                    sa.func.count(),
                )
                .where(
                    sa.and_(
                        deliveries.c.campaign_id == campaign_id,
                        deliveries.c.state == State.INSECURE_CHANNEL.value,
                    )
                )
                .group_by(deliveries.c.domain, deliveries.c.reason)
                .order_by(sa.func.count().desc(), deliveries.c.domain)
            ).all()
        return [
            {"domain": str(r[0]), "reason": str(r[1]), "best_level": r[2], "recipients": int(r[3])}
            for r in rows
        ]

    def count_by_state_reason(self, campaign_id: int, state: State) -> dict[str, int]:
        """Deliveries of one state by reason."""
        return self._count_by(
            deliveries.c.reason,
            deliveries.c.campaign_id == campaign_id,
            deliveries.c.state == state.value,
            deliveries.c.reason.is_not(None),
        )

    def reply_reasons(self, campaign_id: int) -> dict[str, int]:
        return self._count_by(
            deliveries.c.reason,
            deliveries.c.campaign_id == campaign_id,
            deliveries.c.reason.is_not(None),
        )

    def deliveries_of(self, campaign_id: int) -> list[dict[str, Any]]:
        """Every delivery row of a campaign, as plain dicts (for checks and exports)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(deliveries)
                .where(deliveries.c.campaign_id == campaign_id)
                .order_by(deliveries.c.id)
            ).all()
        return [dict(r._mapping) for r in rows]

    def deliveries_of_contact(self, campaign_id: int, contact_id: str) -> list[dict[str, Any]]:
        """The delivery rows of one contact in a campaign (one per channel)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(deliveries)
                .where(
                    sa.and_(
                        deliveries.c.campaign_id == campaign_id,
                        deliveries.c.contact_id == contact_id,
                    )
                )
                .order_by(deliveries.c.id)
            ).all()
        return [dict(r._mapping) for r in rows]

    def rule_table(self, campaign_id: int) -> list[dict[str, Any]]:
        """Recipients per (channel rule, channel, PEC mailbox), with their states."""
        key = (deliveries.c.rule, deliveries.c.channel, deliveries.c.pec_mailbox)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(*key, deliveries.c.state, sa.func.count())
                .where(deliveries.c.campaign_id == campaign_id)
                .group_by(*key, deliveries.c.state)
            ).all()
        table: dict[tuple[str, str, str], dict[str, Any]] = {}
        for rule, channel, mailbox, state, count in rows:
            ident = (str(rule or "-"), str(channel), str(mailbox or "-"))
            entry = table.setdefault(
                ident,
                {"rule": ident[0], "channel": ident[1], "mailbox": ident[2], "recipients": 0},
            )
            entry[str(state)] = int(count)
            entry["recipients"] += int(count)
        return sorted(table.values(), key=lambda e: (-int(e["recipients"]), str(e["rule"])))

    def events_of(self, campaign_id: int, kind: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(events).where(events.c.campaign_id == campaign_id)
        if kind is not None:
            query = query.where(events.c.kind == kind)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(events.c.id)).all()
        return [dict(r._mapping) for r in rows]


def _insert_ignore(conn: Connection, table: sa.Table) -> Any:
    """INSERT … ON CONFLICT DO NOTHING for the connection's dialect."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    raise LedgerError(f"unsupported ledger database {conn.dialect.name!r}")


def _campaign(m: Mapping[Any, Any]) -> Campaign:
    return Campaign(
        id=int(m["id"]),
        name=str(m["name"]),
        status=str(m["status"]),
        sender=str(m["sender"]),
        template_hash=str(m["template_hash"]),
        params=json.loads(m["params_json"]),
        counts=json.loads(m["counts_json"] or "{}"),
        created_at=as_utc(m["created_at"]) or utcnow(),
    )
