"""The fallback sweeper (DESIGN §8): works over ``fallback_steps.fallback_due_at``.

``enroll`` gives each primary delivery of a campaign a *watch* row (step 0). Each sweep
claims the due rows (conditional UPDATE on ``claim_token``/``lease_until``, as the delivery
ledger claims chunks) and:

- a watch row reads its delivery: a trigger of the policy (insecure_channel, hard bounce,
  permanent failure, PEC error / not_pec / timeout) starts that clause's chain at once; a
  confirmation ends the watch; past a ``wait … for …`` window without one, that clause's
  chain starts; otherwise it is looked at again later;
- a due channel step is written ``sending`` (attempts + 1) *before* the provider call, then
  ``sent`` with the provider id, or ``failed`` (hard: next step now; soft: one delayed retry)
  or ``uncertain`` (the request may have gone: never resent; a ``sending`` row whose lease
  ran out also becomes ``uncertain``);
- a ``sent`` step is done when its provider confirms delivery (status callbacks,
  ``record_sms_status``); a failure or a ``wait`` that ran out moves to the next step.

Every step change is an event (``fallback_*``) in the ledger. Retrying a sweep never sends
twice: only ``due`` rows are sent, and only by the claim that moved them to ``sending``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from recapito.fallback.policy import PRIMARY_CHANNELS, Policy, Rule
from recapito.fallback.sms import (
    FINAL_FAILURES,
    SmsError,
    TwilioSms,
    advances,
    classify_code,
    normalize_phone,
    render_sms,
)
from recapito.ledger.schema import deliveries, events, fallback_steps, suppressions, tracking_hits
from recapito.ledger.store import Ledger, as_utc, utcnow

WATCHING = "watching"
PENDING = "pending"  # a later step of a chain, not due yet
DUE = "due"
SENDING = "sending"
SENT = "sent"
DELIVERED = "delivered"
FAILED = "failed"
UNCERTAIN = "uncertain"
DONE = "done"  # watch closed (confirmed, or nothing to do)
TRIGGERED = "triggered"
SKIPPED = "skipped"
CLAIMABLE = (WATCHING, DUE, SENT)

SMS_OPT_OUT = "sms_opt_out"


@dataclass(frozen=True)
class StepRow:
    id: int
    campaign_id: int
    delivery_id: int
    contact_id: str
    channel: str
    step_index: int
    address: str | None
    attempts: int


@dataclass(frozen=True)
class ChannelResult:
    provider_id: str | None
    status: str
    final: bool = False  # nothing will confirm it later (paper handed to the print queue)


class ChannelSender(Protocol):
    def send(self, step: StepRow) -> ChannelResult: ...


@dataclass(frozen=True)
class SweepConfig:
    lease: timedelta = timedelta(minutes=5)
    recheck: timedelta = timedelta(minutes=15)  # a watch row looks again this often
    retry_delay: timedelta = timedelta(minutes=30)  # soft SMS errors: one retry after this
    max_attempts: int = 2
    give_up_after: timedelta = timedelta(days=7)  # a watch or a sent step then closes
    batch: int = 500


# ---- enrolment ------------------------------------------------------------------------------


def enroll(
    ledger: Ledger,
    campaign_id: int,
    policy: Policy,
    phones: Mapping[str, str | None],
    *,
    now: datetime | None = None,
) -> int:
    """A watch row per e-mail and PEC delivery of the campaign (a campaign mixes both: the
    PEC rows bring the pec_error / not_pec / delivery_timeout triggers). Again: no
    duplicates. Returns how many rows are new."""
    now = now or utcnow()
    with ledger.engine.begin() as conn:
        rows = conn.execute(
            sa.select(deliveries.c.id, deliveries.c.contact_id, deliveries.c.channel).where(
                deliveries.c.campaign_id == campaign_id,
                deliveries.c.channel.in_(sorted(PRIMARY_CHANNELS)),
            )
        ).all()
        have = {
            int(r[0])
            for r in conn.execute(
                sa.select(fallback_steps.c.delivery_id).where(
                    fallback_steps.c.campaign_id == campaign_id, fallback_steps.c.step_index == 0
                )
            )
        }
        new = [
            {
                "campaign_id": campaign_id,
                "delivery_id": int(r.id),
                "contact_id": r.contact_id,
                "step_index": 0,
                "channel": r.channel,
                "state": WATCHING,
                "fallback_due_at": now,
                "attempts": 0,
                "address": phones.get(r.contact_id),
                "created_at": now,
                "updated_at": now,
            }
            for r in rows
            if int(r.id) not in have
        ]
        if new:
            conn.execute(fallback_steps.insert(), new)
    return len(new)


# ---- triggers -------------------------------------------------------------------------------


def triggers_of(state: str, permanence: str | None) -> list[str]:
    """The policy triggers a primary delivery's state stands for, most specific first."""
    if state == "insecure_channel":
        return ["insecure_channel"]
    if state == "bounced":
        return ["hard_bounce"] if permanence != "transient" else []
    if state == "failed":
        return ["failed", "hard_bounce"] if permanence != "transient" else []
    if state in ("pec_rejected", "delivery_error"):
        return ["pec_error"]
    if state == "not_pec":
        return ["not_pec", "pec_error"]
    if state == "delivery_timeout":
        return ["delivery_timeout", "pec_error"]
    if state == "suppressed":
        return ["suppressed"]
    return []


def _confirmations(conn: Connection, delivery_id: int, state: str) -> set[str]:
    found = {state} if state in ("delivered", "accepted") else set()
    for (kind,) in conn.execute(
        sa.select(tracking_hits.c.kind)
        .where(tracking_hits.c.delivery_id == delivery_id, tracking_hits.c["class"] == "human")
        .distinct()
    ):
        found.add("opened" if kind == "open" else "clicked")
        if kind == "click":
            found.add("opened")
    return found


# ---- the sweep ------------------------------------------------------------------------------


class Sweeper:
    def __init__(
        self,
        ledger: Ledger,
        policy: Policy,
        senders: Mapping[str, ChannelSender],
        config: SweepConfig | None = None,
        *,
        worker: str = "sweeper",
        campaign_id: int | None = None,
    ) -> None:
        self.campaign_id = campaign_id  # only this campaign's rows (its policy) when set
        self.ledger = ledger
        self.policy = policy
        self.senders = senders
        self.config = config or SweepConfig()
        self.worker = worker

    def _event(self, conn: Connection, step: Any, kind: str, now: datetime, **data: Any) -> None:
        payload = {"step": int(step.step_index), "channel": step.channel, **data}
        conn.execute(
            events.insert().values(
                campaign_id=step.campaign_id,
                delivery_id=step.delivery_id,
                kind=kind,
                at=now,
                source="fallback",
                data_json=json.dumps(payload, sort_keys=True, default=str),
                raw_ref=None,
            )
        )

    def _scope(self) -> Any:
        if self.campaign_id is None:
            return sa.true()
        return fallback_steps.c.campaign_id == self.campaign_id

    def expire_stale(self, now: datetime) -> int:
        """``sending`` rows whose lease ran out become ``uncertain`` (never resent)."""
        with self.ledger.engine.begin() as conn:
            stale = conn.execute(
                sa.select(fallback_steps).where(
                    fallback_steps.c.state == SENDING,
                    fallback_steps.c.lease_until < now,
                    self._scope(),
                )
            ).all()
            for row in stale:
                done = conn.execute(
                    fallback_steps.update()
                    .where(fallback_steps.c.id == row.id, fallback_steps.c.state == SENDING)
                    .values(state=UNCERTAIN, claim_token=None, updated_at=now)
                ).rowcount
                if done:
                    self._event(conn, row, "fallback_uncertain", now)
        return len(stale)

    def claim(self, now: datetime) -> tuple[str, list[Any]]:
        token = secrets.token_hex(16)
        free = sa.or_(fallback_steps.c.claim_token.is_(None), fallback_steps.c.lease_until < now)
        with self.ledger.engine.begin() as conn:
            ids = [
                int(r[0])
                for r in conn.execute(
                    sa.select(fallback_steps.c.id)
                    .where(
                        fallback_steps.c.state.in_(CLAIMABLE),
                        fallback_steps.c.fallback_due_at <= now,
                        free,
                        self._scope(),
                    )
                    .order_by(fallback_steps.c.fallback_due_at, fallback_steps.c.id)
                    .limit(self.config.batch)
                )
            ]
            if ids:
                conn.execute(
                    fallback_steps.update()
                    .where(
                        fallback_steps.c.id.in_(ids),
                        fallback_steps.c.state.in_(CLAIMABLE),
                        fallback_steps.c.fallback_due_at <= now,
                        free,
                    )
                    .values(claim_token=token, lease_until=now + self.config.lease)
                )
            rows = conn.execute(
                sa.select(fallback_steps)
                .where(fallback_steps.c.claim_token == token)
                .order_by(fallback_steps.c.id)
            ).all()
        return token, list(rows)

    def sweep(self, now: datetime | None = None) -> dict[str, int]:
        """One pass over the due rows; returns counts of what was done."""
        now = now or utcnow()
        counts: dict[str, int] = {}

        def bump(key: str) -> None:
            counts[key] = counts.get(key, 0) + 1

        if self.expire_stale(now):
            bump("uncertain")
        token, rows = self.claim(now)
        for row in rows:
            if row.state == WATCHING:
                bump(self._watch(row, token, now))
            elif row.state == DUE:
                bump(self._send(row, token, now))
            elif row.state == SENT:
                bump(self._check_sent(row, token, now))
        return counts

    # -- watch rows

    def _start_chain(
        self, conn: Connection, watch: Any, rule_index: int, now: datetime, why: str
    ) -> None:
        rule: Rule = self.policy.rules[rule_index]
        conn.execute(
            fallback_steps.insert(),
            [
                {
                    "campaign_id": watch.campaign_id,
                    "delivery_id": watch.delivery_id,
                    "contact_id": watch.contact_id,
                    "rule_index": rule_index,
                    "step_index": i + 1,
                    "channel": step.channel,
                    "state": DUE if i == 0 else PENDING,
                    "fallback_due_at": now if i == 0 else None,
                    "attempts": 0,
                    "address": watch.address,
                    "created_at": now,
                    "updated_at": now,
                }
                for i, step in enumerate(rule.steps)
            ],
        )
        self._event(conn, watch, "fallback_triggered", now, trigger=why, rule=rule_index)

    def _watch(self, row: Any, token: str, now: datetime) -> str:
        mine = sa.and_(fallback_steps.c.id == row.id, fallback_steps.c.claim_token == token)
        with self.ledger.engine.begin() as conn:
            d = conn.execute(
                sa.select(deliveries.c.state, deliveries.c.permanence).where(
                    deliveries.c.id == row.delivery_id
                )
            ).one()
            for trig in triggers_of(d.state, d.permanence):
                idx = self.policy.trigger_rule(trig)
                if idx is not None:
                    self._start_chain(conn, row, idx, now, trig)
                    conn.execute(
                        fallback_steps.update()
                        .where(mine)
                        .values(
                            state=TRIGGERED,
                            outcome=trig,
                            rule_index=idx,
                            claim_token=None,
                            fallback_due_at=None,
                            updated_at=now,
                        )
                    )
                    return "triggered"
            widx = self.policy.window_rule()
            created = as_utc(row.created_at)
            assert created is not None
            if widx is not None:
                rule = self.policy.rules[widx]
                assert rule.window is not None
                if _confirmations(conn, int(row.delivery_id), d.state) & rule.confirm:
                    conn.execute(
                        fallback_steps.update()
                        .where(mine)
                        .values(state=DONE, outcome="confirmed", claim_token=None, updated_at=now)
                    )
                    return "confirmed"
                end = created + rule.window
                if now >= end:
                    self._start_chain(conn, row, widx, now, "unconfirmed")
                    conn.execute(
                        fallback_steps.update()
                        .where(mine)
                        .values(
                            state=TRIGGERED,
                            outcome="unconfirmed",
                            rule_index=widx,
                            claim_token=None,
                            fallback_due_at=None,
                            updated_at=now,
                        )
                    )
                    return "triggered"
                nxt = min(end, now + self.config.recheck)
            else:
                if now - created >= self.config.give_up_after:
                    conn.execute(
                        fallback_steps.update()
                        .where(mine)
                        .values(state=DONE, outcome="no_trigger", claim_token=None, updated_at=now)
                    )
                    return "closed"
                nxt = now + self.config.recheck
            conn.execute(
                fallback_steps.update()
                .where(mine)
                .values(fallback_due_at=nxt, claim_token=None, updated_at=now)
            )
        return "watching"

    # -- channel steps

    def _next_step(self, conn: Connection, row: Any, now: datetime) -> None:
        nxt = conn.execute(
            fallback_steps.update()
            .where(
                fallback_steps.c.delivery_id == row.delivery_id,
                fallback_steps.c.step_index == row.step_index + 1,
                fallback_steps.c.state == PENDING,
            )
            .values(state=DUE, fallback_due_at=now, updated_at=now)
        ).rowcount
        if not nxt:
            self._event(conn, row, "fallback_exhausted", now)

    def _wait_of(self, row: Any) -> timedelta | None:
        if row.rule_index is None:
            return None
        steps = self.policy.rules[int(row.rule_index)].steps
        i = int(row.step_index) - 1
        return steps[i].wait if 0 <= i < len(steps) else None

    def _send(self, row: Any, token: str, now: datetime) -> str:
        mine = sa.and_(fallback_steps.c.id == row.id, fallback_steps.c.claim_token == token)
        sender = self.senders.get(row.channel)
        with self.ledger.engine.begin() as conn:
            if sender is None:
                # the channel is not configured here: the row stays due for a sweeper that has it
                conn.execute(
                    fallback_steps.update()
                    .where(mine)
                    .values(claim_token=None, fallback_due_at=now + self.config.recheck)
                )
                return "no_sender"
            # the attempt row, committed before the provider is called
            moved = conn.execute(
                fallback_steps.update()
                .where(mine, fallback_steps.c.state == DUE)
                .values(state=SENDING, attempts=fallback_steps.c.attempts + 1, updated_at=now)
            ).rowcount
            if not moved:
                return "lost_claim"
            self._event(conn, row, "fallback_attempt", now, attempt=int(row.attempts) + 1)
        step = StepRow(
            id=int(row.id),
            campaign_id=int(row.campaign_id),
            delivery_id=int(row.delivery_id),
            contact_id=row.contact_id,
            channel=row.channel,
            step_index=int(row.step_index),
            address=row.address,
            attempts=int(row.attempts) + 1,
        )
        try:
            result = sender.send(step)
        except SmsError as exc:
            return self._failed(
                row, token, now, exc.kind, exc.code, str(exc), int(row.attempts) + 1
            )
        with self.ledger.engine.begin() as conn:
            wait = self._wait_of(row)
            conn.execute(
                fallback_steps.update()
                .where(mine, fallback_steps.c.state == SENDING)
                .values(
                    state=DONE if result.final else SENT,
                    provider_id=result.provider_id,
                    provider_status=sa.func.coalesce(
                        fallback_steps.c.provider_status, result.status
                    ),
                    outcome=result.status,
                    sent_at=now,
                    claim_token=None,
                    fallback_due_at=None if result.final else now + (wait or self.config.recheck),
                    updated_at=now,
                )
            )
            self._event(conn, row, "fallback_sent", now, provider_id=result.provider_id)
        return "sent"

    def _failed(
        self,
        row: Any,
        token: str,
        now: datetime,
        kind: str,
        code: int | None,
        why: str,
        attempts: int,
    ) -> str:
        mine = sa.and_(fallback_steps.c.id == row.id, fallback_steps.c.claim_token == token)
        with self.ledger.engine.begin() as conn:
            if kind == "uncertain":
                conn.execute(
                    fallback_steps.update()
                    .where(mine)
                    .values(state=UNCERTAIN, outcome=why[:64], claim_token=None, updated_at=now)
                )
                self._event(conn, row, "fallback_uncertain", now, reason=why)
                return "uncertain"
            if kind == "soft" and attempts < self.config.max_attempts:
                conn.execute(
                    fallback_steps.update()
                    .where(mine)
                    .values(
                        state=DUE,
                        error_code=code,
                        outcome=f"soft:{code}",
                        provider_id=None,
                        provider_status=None,
                        fallback_due_at=now + self.config.retry_delay,
                        claim_token=None,
                        updated_at=now,
                    )
                )
                self._event(conn, row, "fallback_retry", now, code=code)
                return "retry"
            conn.execute(
                fallback_steps.update()
                .where(mine)
                .values(
                    state=FAILED,
                    error_code=code,
                    outcome=f"{kind}:{code}",
                    claim_token=None,
                    fallback_due_at=None,
                    updated_at=now,
                )
            )
            self._event(conn, row, "fallback_failed", now, code=code, severity=kind)
            self._next_step(conn, row, now)
        return "failed"

    def _check_sent(self, row: Any, token: str, now: datetime) -> str:
        mine = sa.and_(fallback_steps.c.id == row.id, fallback_steps.c.claim_token == token)
        status = row.provider_status
        if status in ("delivered", "read"):
            with self.ledger.engine.begin() as conn:
                conn.execute(
                    fallback_steps.update()
                    .where(mine)
                    .values(state=DELIVERED, claim_token=None, fallback_due_at=None, updated_at=now)
                )
            return "delivered"
        if status in FINAL_FAILURES:
            code = row.error_code
            return self._failed(
                row, token, now, classify_code(code), code, f"{status}", int(row.attempts)
            )
        sent = as_utc(row.sent_at) or now
        wait = self._wait_of(row)
        with self.ledger.engine.begin() as conn:
            if (wait is not None and now >= sent + wait) or (
                now - sent >= self.config.give_up_after
            ):
                conn.execute(
                    fallback_steps.update()
                    .where(mine)
                    .values(
                        state=FAILED if wait else DONE,
                        outcome="unconfirmed",
                        claim_token=None,
                        fallback_due_at=None,
                        updated_at=now,
                    )
                )
                self._event(conn, row, "fallback_unconfirmed", now)
                if wait:
                    self._next_step(conn, row, now)
                return "unconfirmed"
            conn.execute(
                fallback_steps.update()
                .where(mine)
                .values(
                    fallback_due_at=min(now + self.config.recheck, sent + wait)
                    if wait
                    else now + self.config.recheck,
                    claim_token=None,
                    updated_at=now,
                )
            )
        return "waiting"


# ---- SMS channel and callbacks ----------------------------------------------------------


class SmsChannel:
    """The ``sms`` channel: number check, opt-out store, template, then Twilio."""

    def __init__(
        self,
        ledger: Ledger,
        sms: TwilioSms,
        template: str,
        *,
        region: str = "IT",
        max_segments: int = 3,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        self.ledger = ledger
        self.sms = sms
        self.template = template
        self.region = region
        self.max_segments = max_segments
        self.context = dict(context or {})

    def send(self, step: StepRow) -> ChannelResult:
        if not step.address:
            raise SmsError("hard", None, "no phone number")
        to = normalize_phone(step.address, self.region)
        if is_opted_out(self.ledger, to):
            raise SmsError("hard", 21610, "opted out")
        body = render_sms(
            self.template,
            {**self.context, "contact_id": step.contact_id},
            max_segments=self.max_segments,
        )
        sent = self.sms.send(to, body, reference=str(step.id))
        return ChannelResult(sent.sid, sent.status)


class PaperQueue:
    """The ``paper`` channel here only hands the step to the print queue (the letters are
    rendered in batch by ``recapito.fallback.paper`` from the ``done`` paper steps)."""

    def send(self, step: StepRow) -> ChannelResult:
        return ChannelResult(None, "queued_for_print", final=True)


def opt_out(ledger: Ledger, phone: str, *, source: str = "sms_stop") -> None:
    """Record a STOP (or an operator's suppression) for an E.164 number."""
    now = utcnow()
    with ledger.engine.begin() as conn:
        exists = conn.execute(
            sa.select(suppressions.c.address).where(suppressions.c.address == phone)
        ).first()
        if exists is None:
            conn.execute(
                suppressions.insert().values(
                    address=phone, reason=SMS_OPT_OUT, source=source, created_at=now
                )
            )


def is_opted_out(ledger: Ledger, phone: str) -> bool:
    with ledger.engine.connect() as conn:
        row = conn.execute(
            sa.select(suppressions.c.address).where(suppressions.c.address == phone)
        ).first()
    return row is not None


STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "ANNULLA"})


def record_sms_status(
    ledger: Ledger,
    sid: str,
    status: str,
    error_code: int | None = None,
    *,
    step_id: int | None = None,
    now: datetime | None = None,
) -> str:
    """A status callback: monotonic (a late ``sent`` after ``delivered`` is ignored).

    Returns ``unknown`` (no such message), ``ignored`` (not a step forward) or ``applied``.
    A final failure makes the step due now, so the next sweep moves on.
    """
    now = now or utcnow()
    with ledger.engine.begin() as conn:
        row = conn.execute(
            sa.select(fallback_steps).where(fallback_steps.c.provider_id == sid)
        ).first()
        values: dict[str, Any] = {"provider_status": status, "updated_at": now}
        if row is None and step_id is not None:
            # the callback overtook the recording of Twilio's answer: the step is still
            # ``sending``; the sid is taken from here and the answer keeps this status
            row = conn.execute(
                sa.select(fallback_steps).where(
                    fallback_steps.c.id == step_id,
                    fallback_steps.c.state == SENDING,
                    fallback_steps.c.provider_id.is_(None),
                )
            ).first()
            values["provider_id"] = sid
        if row is None:
            return "unknown"
        if not advances(row.provider_status, status):
            return "ignored"
        if status in ("delivered", "read") and row.state == SENT:
            values.update(state=DELIVERED, fallback_due_at=None)
        elif status in FINAL_FAILURES:
            values.update(error_code=error_code)
            if row.state == SENT:
                values["fallback_due_at"] = now
        done = conn.execute(
            fallback_steps.update()
            .where(
                fallback_steps.c.id == row.id,
                sa.or_(
                    fallback_steps.c.provider_status.is_(None),
                    fallback_steps.c.provider_status == row.provider_status,
                ),
            )
            .values(**values)
        ).rowcount
        if not done:
            return "ignored"
        conn.execute(
            events.insert().values(
                campaign_id=row.campaign_id,
                delivery_id=row.delivery_id,
                kind="sms_status",
                at=now,
                source="twilio",
                data_json=json.dumps(
                    {"status": status, "error_code": error_code, "step": int(row.step_index)},
                    sort_keys=True,
                ),
                raw_ref=sid,
            )
        )
    return "applied"


def steps_of(ledger: Ledger, campaign_id: int) -> list[dict[str, Any]]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(fallback_steps)
            .where(fallback_steps.c.campaign_id == campaign_id)
            .order_by(fallback_steps.c.delivery_id, fallback_steps.c.step_index)
        ).all()
    return [dict(r._mapping) for r in rows]


def funnel(ledger: Ledger, campaign_id: int) -> dict[str, dict[str, int]]:
    """Fallback funnel per channel: state → count (the report's table)."""
    out: dict[str, dict[str, int]] = {}
    for row in steps_of(ledger, campaign_id):
        if row["step_index"] == 0:
            continue
        per = out.setdefault(row["channel"], {})
        per[row["state"]] = per.get(row["state"], 0) + 1
    return out
