"""PEC submission: claimed PEC deliveries out through the sender's mailboxes over SMTPS.

Rules (DESIGN §6):

* implicit TLS (port 465) with the provider's certificate always verified (system store plus
  the mailbox's ``ca_file``), AUTH with the mailbox's credentials;
* one recipient per message, ``From`` = MAIL FROM = the mailbox (the renderer writes the
  headers, this module the envelope);
* per-mailbox pacing shared by every run of the process (token bucket, connection slots from
  ``recapito.delivery.pacing``) and, through ``permits``/``connection_gate`` from the tasks
  layer, by every worker on any host (Prefect global concurrency and rate limits);
* a provider's traffic-limit answer (4xx or 5xx whose text speaks of limits, too many
  messages, rate…) pauses that mailbox with exponential back-off and the message waits:
  never a failed recipient. Past ``max_wait`` it is ``deferred`` to a later run;
* the ledger discipline of the e-mail engine: claims in, ``sending`` committed before the
  body leaves (after MAIL FROM and RCPT TO were accepted), the reply recorded right after
  (group commit); a reply lost after the body left makes the delivery ``uncertain``, never
  resent blindly.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import aiosmtplib
import sqlalchemy as sa

from recapito.delivery.pacing import REGISTRY
from recapito.ledger import Claim, Ledger, Outcome, State
from recapito.ledger.batch import GroupCommitter
from recapito.ledger.schema import deliveries
from recapito.ledger.store import MarkSending, RecordOutcome, utcnow
from recapito.pec.mailboxes import PecMailbox
from recapito.pec.rules import NO_MAILBOX
from recapito.render.template import RenderedMessage

PecRenderer = Callable[[Claim, PecMailbox], RenderedMessage]
# (mailbox name, n) -> permits granted (blocking; called in a thread)
MailboxPermits = Callable[[str, int], int]
# mailbox name -> release function, once a connection slot is held (blocking; in a thread)
ConnectionGate = Callable[[str], Callable[[], None]]

# Provider answers that mean "slow down", in the wordings providers use (EN and IT).
TRAFFIC_LIMIT = re.compile(
    r"limit|limite|too many|troppi|traffic|traffico|rate|frequen|soglia|quota|superat|"
    r"exceed|try again later|riprova|throttl",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class PecOptions:
    helo_name: str = "localhost"
    connect_timeout: float = 15.0
    command_timeout: float = 60.0
    messages_per_connection: int = 100
    backoff_initial: float = 5.0  # first pause after a traffic-limit answer
    backoff_max: float = 120.0
    max_wait: float = 900.0  # a message waits at most this long in one run, then is deferred
    retry_after: timedelta = timedelta(minutes=15)  # deferred: next attempt
    give_up_after: timedelta = timedelta(hours=72)  # since the first attempt: then expired
    lease: timedelta = timedelta(minutes=30)


@dataclass
class PecStats:
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    per_mailbox: Counter[str] = field(default_factory=Counter)  # accepted per mailbox
    backoffs: Counter[str] = field(default_factory=Counter)  # traffic-limit pauses per mailbox
    connections: int = 0
    seconds: float = 0.0

    def merge(self, other: PecStats) -> None:
        self.outcomes.update(other.outcomes)
        self.reasons.update(other.reasons)
        self.per_mailbox.update(other.per_mailbox)
        self.backoffs.update(other.backoffs)
        self.connections += other.connections
        self.seconds += other.seconds

    def as_dict(self) -> dict[str, object]:
        return {
            "outcomes": dict(self.outcomes),
            "reasons": dict(self.reasons),
            "per_mailbox": dict(self.per_mailbox),
            "backoffs": dict(self.backoffs),
            "connections": self.connections,
            "seconds": round(self.seconds, 3),
        }


def tls_context(mailbox: PecMailbox) -> ssl.SSLContext:
    """Verified TLS (≥ 1.2) with the system roots plus the mailbox's extra CA file."""
    ctx = ssl.create_default_context()
    if mailbox.ca_file is not None:
        ctx.load_verify_locations(cafile=str(mailbox.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def is_traffic_limit(code: int, text: str) -> bool:
    return code in (421, 450, 451, 452, 454, 550, 554) and bool(TRAFFIC_LIMIT.search(text))


def sent_today(ledger: Ledger, mailbox: str, now: datetime | None = None) -> int:
    """PEC messages accepted through ``mailbox`` since midnight UTC (per-day limit)."""
    moment = now or utcnow()
    midnight = moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    query = sa.select(sa.func.count()).where(
        sa.and_(
            deliveries.c.channel == "pec",
            deliveries.c.pec_mailbox == mailbox,
            deliveries.c.state.in_(
                [State.SENDING.value, State.ACCEPTED.value, State.DELIVERED.value]
            ),
            deliveries.c.updated_at >= midnight,
        )
    )
    with ledger.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


class _Backoff:
    """Traffic-limit pauses of one mailbox, shared by its connections."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.until = 0.0
        self.current = 0.0

    def hit(self) -> float:
        self.current = self.initial if self.current == 0 else min(self.maximum, self.current * 2)
        self.until = max(self.until, time.monotonic() + self.current)
        return self.current

    def ok(self) -> None:
        self.current = 0.0

    def wait(self) -> float:
        return max(0.0, self.until - time.monotonic())


@dataclass
class _Box:
    mailbox: PecMailbox
    queue: asyncio.Queue[Claim]
    backoff: _Backoff
    left_today: int | None
    ctx: ssl.SSLContext


class _Retry(Exception):
    """The message was not sent (refused before DATA, connection lost before DATA)."""


class PecRun:
    def __init__(
        self,
        ledger: Ledger,
        mailboxes: Mapping[str, PecMailbox],
        options: PecOptions,
        render: PecRenderer,
        *,
        permits: MailboxPermits | None = None,
        connection_gate: ConnectionGate | None = None,
    ) -> None:
        self.ledger = ledger
        self.mailboxes = mailboxes
        self.options = options
        self.render = render
        self.permits = permits
        self.connection_gate = connection_gate
        self.stats = PecStats()
        self._commits: GroupCommitter | None = None
        self._writes: list[asyncio.Future[bool]] = []
        self._started = 0.0
        self._done: set[int] = set()

    # ---- ledger -----------------------------------------------------------------------------

    def _record(self, claim: Claim, outcome: Outcome) -> None:
        assert self._commits is not None
        self._done.add(claim.delivery_id)
        self.stats.outcomes[outcome.state.value] += 1
        if outcome.reason:
            self.stats.reasons[outcome.reason] += 1
        self._writes.append(self._commits.submit(RecordOutcome(claim, outcome, source="pec")))

    def _defer(self, claim: Claim, reason: str, text: str, code: int | None = None) -> None:
        now = utcnow()
        first = claim.first_attempt_at or now
        if now - first >= self.options.give_up_after:
            self._record(
                claim,
                Outcome(State.EXPIRED, reason=reason, reply_code=code, reply_text=text),
            )
            return
        self._record(
            claim,
            Outcome(
                State.DEFERRED,
                reason=reason,
                reply_code=code,
                reply_text=text[:500],
                permanence="transient",
                next_attempt_at=now + self.options.retry_after,
            ),
        )

    # ---- running -----------------------------------------------------------------------------

    async def run(self, claims: Sequence[Claim]) -> PecStats:
        self._started = time.monotonic()
        self._commits = GroupCommitter(self.ledger)
        boxes: dict[str, _Box] = {}
        try:
            for claim in claims:
                box_name = claim.pec_mailbox
                mailbox = self.mailboxes.get(box_name) if box_name else None
                if mailbox is None:
                    why = (
                        "no PEC mailbox rule chose a mailbox for this recipient"
                        if not box_name
                        else f"PEC mailbox {box_name!r} is not configured"
                    )
                    self._record(
                        claim,
                        Outcome(
                            State.FAILED, reason=NO_MAILBOX, permanence="permanent", reply_text=why
                        ),
                    )
                    continue
                box = boxes.get(mailbox.name)
                if box is None:
                    left = None
                    if mailbox.per_day is not None:
                        left = max(0, mailbox.per_day - sent_today(self.ledger, mailbox.name))
                    box = boxes[mailbox.name] = _Box(
                        mailbox,
                        asyncio.Queue(),
                        _Backoff(self.options.backoff_initial, self.options.backoff_max),
                        left,
                        tls_context(mailbox),
                    )
                box.queue.put_nowait(claim)
            workers: list[asyncio.Task[None]] = []
            for box in boxes.values():
                count = min(box.mailbox.connections, box.queue.qsize())
                workers.extend(asyncio.create_task(self._worker(box)) for _ in range(count))
            try:
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()
                # whatever is still queued (cancellation) was never sent: give it back
                unsent = [c for b in boxes.values() for c in _drain(b.queue)]
                unsent = [c for c in unsent if c.delivery_id not in self._done]
                if unsent:
                    await asyncio.get_running_loop().run_in_executor(
                        None, self.ledger.release, unsent
                    )
        finally:
            if self._writes:
                await asyncio.gather(*self._writes, return_exceptions=True)
            await self._commits.close()
            self.stats.seconds += time.monotonic() - self._started
        return self.stats

    async def _worker(self, box: _Box) -> None:
        name = box.mailbox.name
        slots = REGISTRY.slots(("pec-mailbox", name), box.mailbox.connections)
        bucket = REGISTRY.bucket(("pec-mailbox", name), box.mailbox.per_minute)
        loop = asyncio.get_running_loop()
        while not box.queue.empty():
            await slots.acquire()
            release_global: Callable[[], None] | None = None
            try:
                if self.connection_gate is not None:
                    release_global = await loop.run_in_executor(None, self.connection_gate, name)
                await self._session(box, bucket)
            finally:
                if release_global is not None:
                    await loop.run_in_executor(None, release_global)
                slots.release()

    async def _pause(self, box: _Box) -> bool:
        """Sit out the mailbox's back-off; False when the run's patience is used up."""
        wait = box.backoff.wait()
        if wait <= 0:
            return True
        if time.monotonic() + wait - self._started > self.options.max_wait:
            return False
        await asyncio.sleep(wait)
        return True

    def _defer_all(self, box: _Box, reason: str, text: str) -> None:
        for claim in _drain(box.queue):
            self._defer(claim, reason, text)

    async def _session(self, box: _Box, bucket: object) -> None:
        """One SMTPS connection: log in, send up to ``messages_per_connection`` messages."""
        from recapito.delivery.pacing import TokenBucket

        assert isinstance(bucket, TokenBucket)
        mailbox = box.mailbox
        if not await self._pause(box):
            self._defer_all(box, "pec_traffic_limit", "provider traffic limit: deferred")
            return
        if box.queue.empty():
            return
        try:
            smtp = await self._connect(box)
        except aiosmtplib.SMTPAuthenticationError as exc:
            text = f"{exc.code} {exc.message}"
            if exc.code >= 500 and not TRAFFIC_LIMIT.search(exc.message):
                # wrong or expired credentials: nothing this mailbox sends will go
                self._defer_all(box, "pec_auth_failed", text)
                return
            box.backoff.hit()
            self.stats.backoffs[mailbox.name] += 1
            return
        except (OSError, aiosmtplib.SMTPException, ssl.SSLError) as exc:
            box.backoff.hit()
            if isinstance(exc, ssl.SSLCertVerificationError):
                self._defer_all(box, "pec_certificate_invalid", str(exc)[:300])
            return
        self.stats.connections += 1
        sent = 0
        try:
            while sent < self.options.messages_per_connection and not box.queue.empty():
                if box.left_today is not None and box.left_today <= 0:
                    self._defer_all(box, "pec_daily_limit", "mailbox daily limit reached")
                    return
                try:
                    claim = box.queue.get_nowait()
                except asyncio.QueueEmpty:
                    return  # another connection of the mailbox took the last one
                delay = bucket.reserve()
                if self.permits is not None:
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(None, self.permits, mailbox.name, 1)
                if delay > 0:
                    await asyncio.sleep(delay)
                if box.backoff.wait() > 0:
                    box.queue.put_nowait(claim)
                    return  # another connection of the mailbox was told to slow down
                try:
                    await self._send_one(smtp, box, claim)
                    sent += 1
                except _Retry:
                    box.queue.put_nowait(claim)
                    return
        finally:
            try:
                await smtp.quit(timeout=5)
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                smtp.close()

    async def _connect(self, box: _Box) -> aiosmtplib.SMTP:
        mailbox = box.mailbox
        loop = asyncio.get_running_loop()
        target = mailbox.smtp_address or mailbox.smtp_host
        sock = await loop.run_in_executor(
            None,
            lambda: socket.create_connection(
                (target, mailbox.smtp_port), timeout=self.options.connect_timeout
            ),
        )
        sock.setblocking(False)
        smtp = aiosmtplib.SMTP(
            hostname=mailbox.smtp_host,  # SNI and the name the certificate must carry
            sock=sock,
            use_tls=True,
            tls_context=box.ctx,
            local_hostname=self.options.helo_name,
            timeout=self.options.command_timeout,
        )
        try:
            await smtp.connect()
            await smtp.login(mailbox.username, mailbox.password)
        except BaseException:
            smtp.close()
            sock.close()
            raise
        return smtp

    async def _send_one(self, smtp: aiosmtplib.SMTP, box: _Box, claim: Claim) -> None:
        mailbox = box.mailbox
        try:
            message = self.render(claim, mailbox)
        except Exception as exc:  # a template that fails on this contact's data
            self._record(
                claim,
                Outcome(
                    State.FAILED,
                    reason="render_error",
                    permanence="permanent",
                    reply_text=str(exc)[:500],
                ),
            )
            return
        if len(message.data) > mailbox.max_size:
            self._record(
                claim,
                Outcome(
                    State.FAILED,
                    reason="message_too_large",
                    permanence="permanent",
                    reply_text=f"{len(message.data)} bytes, mailbox limit {mailbox.max_size}",
                    message_id=message.message_id,
                ),
            )
            return
        try:
            await smtp.mail(mailbox.address)
            await smtp.rcpt(claim.address)
        except aiosmtplib.SMTPResponseException as exc:
            with _quiet():
                await smtp.rset()
            self._refused(box, claim, exc.code, exc.message, message.message_id, sent=False)
            return
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError):
            box.backoff.hit()
            raise _Retry() from None
        assert self._commits is not None
        if not await self._commits.submit(MarkSending(claim)):
            # the claim is no longer ours (lease expired meanwhile): never send it
            self._done.add(claim.delivery_id)
            with _quiet():
                await smtp.rset()
            return
        try:
            reply = await smtp.data(message.data)
        except aiosmtplib.SMTPResponseException as exc:
            self._refused(box, claim, exc.code, exc.message, message.message_id, sent=True)
            return
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            self._record(
                claim,
                Outcome(
                    State.UNCERTAIN,
                    reason="reply_lost",
                    reply_text=f"connection lost after the message was sent: {exc}"[:500],
                    mx_host=mailbox.smtp_host,
                    message_id=message.message_id,
                ),
            )
            raise _Retry() from None
        box.backoff.ok()
        if box.left_today is not None:
            box.left_today -= 1
        self.stats.per_mailbox[mailbox.name] += 1
        self._record(
            claim,
            Outcome(
                State.ACCEPTED,
                mx_host=mailbox.smtp_host,
                reply_code=reply.code,
                reply_text=reply.message[:500],
                message_id=message.message_id,
                tls_version=_tls_version(smtp),
                tls_level="L3",  # verified chain and name, always (never sent otherwise)
                reason=None,
            ),
        )

    def _refused(
        self, box: _Box, claim: Claim, code: int, text: str, message_id: str, *, sent: bool
    ) -> None:
        """A provider's refusal: slow down on traffic limits, defer 4xx, fail other 5xx."""
        full = f"{code} {text}"
        if is_traffic_limit(code, text):
            box.backoff.hit()
            self.stats.backoffs[box.mailbox.name] += 1
            if not sent:
                raise _Retry()
            # refused after the body: the provider's answer is final for this try; the
            # message goes out again when due (a short wait, within this chunk's run)
            self._record(
                claim,
                Outcome(
                    State.DEFERRED,
                    reason="pec_traffic_limit",
                    reply_code=code,
                    reply_text=full[:500],
                    permanence="transient",
                    next_attempt_at=utcnow() + timedelta(seconds=box.backoff.current),
                    message_id=message_id,
                ),
            )
            return
        if 400 <= code < 500:
            self._defer(claim, "pec_transient", full, code)
            return
        self._record(
            claim,
            Outcome(
                State.FAILED,
                reason="pec_refused",
                permanence="permanent",
                reply_code=code,
                reply_text=full[:500],
                mx_host=box.mailbox.smtp_host,
                message_id=message_id,
            ),
        )


def _tls_version(smtp: aiosmtplib.SMTP) -> str | None:
    transport = smtp.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    version = ssl_object.version() if ssl_object is not None else None
    return str(version) if version else None


def _drain(queue: asyncio.Queue[Claim]) -> list[Claim]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


class _quiet:
    """Ignore errors of a courtesy command (RSET after a refusal)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(
            exc[0],  # type: ignore[arg-type]
            (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError),
        )
