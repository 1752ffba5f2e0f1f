"""The delivery engine: claimed deliveries out to their MX hosts, outcomes into the ledger.

Work arrives as claims (already held in the ledger). Claims are grouped by the MX host
list of their domain; each group is served by a few connections that each carry many
messages, several groups in parallel, with a cap per MX host and a global cap. Every
outcome is committed to the ledger right after the server's reply.

Guarantees:
* a claim is sent at most once per run: it sits in exactly one queue and leaves it once;
* a connection that breaks before DATA puts the message back for another connection;
  one that breaks after DATA makes the delivery ``uncertain`` (never resent blindly);
* claims never attempted (cancellation, crash of the chunk) are released to ``planned``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from recapito.delivery.dns import MXHost, MXResolver, MXResult
from recapito.delivery.pacing import Pacer, PacingOptions, PacingStats, SharedSlots
from recapito.delivery.replies import classify_reply
from recapito.delivery.smtp import ClaimLost, ConnectFailed, MXSession, SessionLost, SMTPReply
from recapito.delivery.tls import client_context
from recapito.errors import TemplateError
from recapito.ledger import Claim, Ledger, MXFacts, Outcome, State
from recapito.ledger.batch import GroupCommitter
from recapito.ledger.store import MarkSending, RecordOutcome, Suppress, utcnow
from recapito.render.template import RenderedMessage
from recapito.security.policy import (
    LEVELS,
    STABLE_REASONS,
    HostVerdict,
    RecipientPolicy,
    TLSPolicy,
    judge_host,
)

Renderer = Callable[[Claim], RenderedMessage]

# Set when the process is asked to stop (Ctrl-C, SIGTERM): every delivery run of the
# process stops taking messages, lets the ones in flight finish, and releases the claims it
# never attempted, so a re-run sends them at once instead of after the lease.
STOP = threading.Event()
# Takes up to n sending permits from a limit shared with other workers, blocking until
# they are granted, and says how many it got (the tasks layer backs it with a Prefect
# global concurrency limit). Called in a thread.
Permits = Callable[[int], int]


@dataclass(frozen=True)
class DeliveryOptions:
    sender: str
    helo_name: str
    mx_port: int = 25
    extra_ca_file: Path | None = None
    connections_per_host: int = 4
    max_connections: int = 32
    messages_per_connection: int = 200
    # a further connection to a host is opened only for at least this many messages
    min_messages_per_connection: int = 10
    connect_timeout: float = 15.0
    command_timeout: float = 60.0
    retry_after: timedelta = timedelta(minutes=5)  # first retry of deferred mail
    retry_factor: float = 1.5  # each further retry waits this much longer
    give_up_after: timedelta = timedelta(hours=72)  # since the first attempt: then expired
    mx_facts_ttl: timedelta = timedelta(hours=24)
    tls_policy: TLSPolicy = field(default_factory=TLSPolicy)
    pacing: PacingOptions = field(default_factory=PacingOptions)
    # a paced wait longer than this closes the connection and reconnects afterwards
    # (servers drop idle sessions after a few minutes; RFC 5321 asks for 5)
    pause_after: float = 10.0
    lease: timedelta = timedelta(minutes=30)  # claims are renewed well before it runs out
    permits: Permits | None = None  # a rate shared by every worker, taken in blocks
    permit_block: int = 10
    # permanent failures that add the address to the suppression list
    suppress_reasons: frozenset[str] = frozenset(
        {"user_unknown", "domain_invalid", "mailbox_disabled"}
    )


@dataclass
class DeliveryStats:
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    tls: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    seconds: float = 0.0
    pacing: PacingStats = field(default_factory=PacingStats)

    def merge(self, other: DeliveryStats) -> None:
        self.outcomes.update(other.outcomes)
        self.reasons.update(other.reasons)
        self.tls.update(other.tls)
        self.connections += other.connections
        self.seconds += other.seconds
        self.pacing.merge(other.pacing)

    def as_dict(self) -> dict[str, object]:
        return {
            "outcomes": dict(self.outcomes),
            "reasons": dict(self.reasons),
            "tls": dict(self.tls),
            "connections": self.connections,
            "seconds": round(self.seconds, 3),
            "paced_messages": self.pacing.paced_messages,
            "paced_seconds": round(self.pacing.waited_seconds, 3),
            "paced_pauses": self.pacing.pauses,
        }


class RecipientPolicies(Protocol):
    """Where recipient-published policies (DANE, MTA-STS) come from."""

    async def for_host(
        self,
        mx: MXResult,
        host: MXHost,
        port: int,
        chain: tuple[bytes, ...],
        *,
        refresh: bool = False,
    ) -> RecipientPolicy:
        """The policy that applies to ``host`` for ``mx.domain``; ``chain`` is what the host
        presented (DER, leaf first; empty in cleartext), for DANE matching."""
        ...


class NoRecipientPolicies:
    """Recipient policies not checked (no validating resolver, no MTA-STS lookups)."""

    async def for_host(
        self,
        mx: MXResult,
        host: MXHost,
        port: int,
        chain: tuple[bytes, ...],
        *,
        refresh: bool = False,
    ) -> RecipientPolicy:
        return RecipientPolicy()


@dataclass
class _Group:
    """Recipients served by the same MX host list (and, with policies, the same domain)."""

    mx: MXResult
    queue: asyncio.Queue[tuple[Claim, int]]
    domain_slots: SharedSlots | None = None  # a provider limit on this domain's connections
    connected: int = 0
    unreachable: list[str] = field(default_factory=list)
    verdicts: dict[str, HostVerdict] = field(default_factory=dict)

    @property
    def hosts(self) -> tuple[MXHost, ...]:
        return self.mx.hosts


class DeliveryRun:
    def __init__(
        self,
        ledger: Ledger,
        options: DeliveryOptions,
        render: Renderer,
        resolver: MXResolver,
        policies: RecipientPolicies | None = None,
    ) -> None:
        self.ledger = ledger
        self.options = options
        self.render = render
        self.resolver = resolver
        self.policies = policies or NoRecipientPolicies()
        self._checks_policies = policies is not None
        self.stats = DeliveryStats()
        self._done: set[int] = set()  # delivery ids with a recorded outcome
        self._marked: set[int] = set()  # delivery ids committed as "sending"
        self._commits: GroupCommitter | None = None
        self._writes: list[asyncio.Future[bool]] = []
        self.pacer = Pacer(options.pacing)
        self._permits = 0  # shared-limit permits taken and not yet used
        self._permit_lock = asyncio.Lock()
        self._global_slots = asyncio.Semaphore(options.max_connections)
        self._facts_saved: set[str] = set()
        # what each MX host offered in earlier runs, read once per host (downgrade check)
        self._known: dict[str, MXFacts | None] = {}
        # stable shortfalls already confirmed by a second connection in this run
        self._confirmed: dict[str, HostVerdict] = {}

    # ---- outcomes ----------------------------------------------------------------------

    def _record(self, claim: Claim, outcome: Outcome) -> asyncio.Future[bool]:
        """Queue the outcome for the next group commit; the future says when it is durable.

        Callers need not wait: the next write of the same connection ("the next body is
        leaving") is committed after this one, never before it.
        """
        assert self._commits is not None
        committed = self._commits.submit(RecordOutcome(claim, outcome))
        self._writes.append(committed)
        self._done.add(claim.delivery_id)
        if outcome.state == State.FAILED and outcome.reason in self.options.suppress_reasons:
            # a hard bounce at send time: no campaign should try this address again
            self._writes.append(
                self._commits.submit(
                    Suppress(claim.address, outcome.reason, "smtp", claim.campaign_id)
                )
            )
        self.stats.outcomes[outcome.state.value] += 1
        if outcome.reason and outcome.state != State.ACCEPTED:
            self.stats.reasons[outcome.reason] += 1
        if outcome.state == State.ACCEPTED:
            self.stats.tls[outcome.tls_version or "none"] += 1
        return committed

    def _next_attempt(self, claim: Claim) -> datetime | None:
        """When to try again (exponential backoff), or None once the retry window is over."""
        delay = self.options.retry_after * self.options.retry_factor ** max(0, claim.attempt - 1)
        when = utcnow() + delay
        started = claim.first_attempt_at or utcnow()
        if when - started > self.options.give_up_after:
            return None
        return when

    def _expired(self, claim: Claim, last: Outcome) -> Outcome:
        hours = self.options.give_up_after.total_seconds() / 3600
        return Outcome(
            State.EXPIRED,
            mx_host=last.mx_host,
            reply_code=last.reply_code,
            reply_status=last.reply_status,
            reply_text=f"gave up after {hours:g} h; last: {last.reason}: {last.reply_text}"[:1000],
            reason="expired",
            permanence="permanent",
            tls_version=last.tls_version,
            tls_cipher=last.tls_cipher,
            tls_level=last.tls_level,
            message_id=last.message_id,
        )

    def _record_deferral(self, claim: Claim, outcome: Outcome) -> None:
        """A deferral with its next attempt time, or expired when the window is over."""
        when = self._next_attempt(claim)
        if when is None:
            self._record(claim, self._expired(claim, outcome))
        else:
            self._record(claim, replace(outcome, next_attempt_at=when))

    def _defer(self, claim: Claim, reason: str, text: str, mx_host: str | None = None) -> None:
        self._record_deferral(
            claim,
            Outcome(
                State.DEFERRED,
                mx_host=mx_host,
                reason=reason,
                permanence="temporary",
                reply_text=text[:1000],
            ),
        )

    def _dns_outcome(self, claim: Claim, result: MXResult) -> None:
        if result.permanent_failure:
            status = "5.1.10" if result.error == "null_mx" else "5.1.2"
            self._record(
                claim,
                Outcome(
                    State.FAILED,
                    reason="domain_invalid",
                    permanence="permanent",
                    reply_status=status,
                    reply_text=f"{result.domain}: {result.detail}",
                ),
            )
        else:
            # a DNSSEC validation failure is never taken as "no security": defer it too
            reason = (
                "dnssec-invalid" if result.detail.startswith("dnssec-invalid") else "dns_temporary"
            )
            self._defer(claim, reason, f"{result.domain}: {result.detail}")

    def _reply_outcome(
        self, claim: Claim, session: MXSession, msg_id: str, reply: SMTPReply
    ) -> None:
        verdict = classify_reply(reply.code, reply.text)
        accepted = verdict.state == State.ACCEPTED
        outcome = Outcome(
            verdict.state,
            mx_host=session.mx_host,
            reply_code=reply.code,
            reply_status=verdict.status,
            reply_text=f"{reply.stage}: {reply.text}"[:1000],
            reason=None if accepted else verdict.reason,
            permanence=None if accepted else verdict.permanence,
            tls_version=session.tls.version,
            tls_cipher=session.tls.cipher,
            tls_level=session.level,
            tls_certificate=session.tls.cert_verdict,
            message_id=msg_id,
        )
        if verdict.state == State.DEFERRED:
            self._record_deferral(claim, outcome)
        else:
            self._record(claim, outcome)

    # ---- connections -------------------------------------------------------------------

    def _slots(self, host: str) -> SharedSlots:
        """Connections to ``host``: shared by every delivery run of this process."""
        return self.pacer.mx_slots(host, self.options.connections_per_host)

    def _save_facts(self, session: MXSession) -> None:
        if session.mx_host in self._facts_saved:
            return
        self._facts_saved.add(session.mx_host)
        now = utcnow()
        self.ledger.save_mx_facts(
            MXFacts(
                mx_host=session.mx_host,
                starttls_offered=session.starttls_offered,
                ever_offered_starttls=session.starttls_offered,
                tls_version=session.tls.version,
                tls_cipher=session.tls.cipher,
                tls_level=session.tls.level,
                cert_verdict=session.tls.cert_verdict,
                checked_at=now,
                expires_at=now + self.options.mx_facts_ttl,
            )
        )

    def _session(self, host: MXHost, address: str) -> MXSession:
        return MXSession(
            host.name,
            address,
            self.options.mx_port,
            helo_name=self.options.helo_name,
            extra_ca_file=self.options.extra_ca_file,
            connect_timeout=self.options.connect_timeout,
            command_timeout=self.options.command_timeout,
        )

    def _known_facts(self, host: str) -> MXFacts | None:
        if host not in self._known:
            self._known[host] = self.ledger.get_mx_facts(host)
        return self._known[host]

    async def _classify_legacy(self, host: MXHost, address: str) -> HostVerdict:
        """A host whose STARTTLS failed under the modern context: find its real level on a
        separate connection with the legacy context. Nothing is ever sent on it."""
        probe = self._session(host, address)
        try:
            await probe.open(client_context(legacy=True))
        except ConnectFailed as exc:
            return HostVerdict(host.name, "L0", False, "validation-failure", detail=str(exc))
        finally:
            await probe.close()
        self.stats.connections += 1
        return HostVerdict(
            host.name,
            "L1",
            False,
            "tls-version-too-low",
            detail=f"negotiates only {probe.tls.version}",
            facts={"tls_version": probe.tls.version, "cipher": probe.tls.cipher},
        )

    async def _judge(self, group: _Group, host: MXHost, session: MXSession) -> HostVerdict:
        """The verdict on a freshly opened session, refreshing recipient policies once."""
        known = self._known_facts(host.name)
        if not session.starttls_offered and known is not None and known.ever_offered_starttls:
            return HostVerdict(
                host.name,
                "L0",
                False,
                "starttls-not-supported",
                defer=True,
                detail="STARTTLS offered before and missing now: downgrade suspected",
            )
        verdict = HostVerdict(host.name, "L0", False)
        for refresh in (False, True):
            recipient = await self.policies.for_host(
                group.mx, host, self.options.mx_port, session.tls.chain, refresh=refresh
            )
            verdict = judge_host(
                host.name,
                version=session.tls.version,
                cipher=session.tls.cipher,
                cert_verdict=session.tls.cert_verdict,
                policy=self.options.tls_policy,
                recipient=recipient,
            )
            # a failure under a recipient policy is judged again after refreshing it
            if verdict.send or verdict.defer or not _policy_failure(verdict, recipient):
                break
        return verdict

    async def _connect(self, group: _Group) -> tuple[MXSession, SharedSlots] | None:
        """A session with the most preferred MX host that qualifies, holding its host slot.

        Hosts are tried in preference order. A host reached but below the required level is
        remembered in ``group.verdicts`` and skipped, like an unreachable one.
        """
        errors: list[str] = []
        strict = self.options.tls_policy.needs_modern_tls
        for host in group.hosts:
            cached = group.verdicts.get(host.name) or self._confirmed.get(host.name)
            if cached is not None and not cached.send:
                group.verdicts[host.name] = cached
                continue
            slots = self._slots(host.name)
            await slots.acquire()
            for address in host.addresses:
                session = self._session(host, address)
                try:
                    await session.open(client_context(legacy=not strict))
                except ConnectFailed as exc:
                    if exc.tls_failed and strict:
                        group.verdicts[host.name] = await self._classify_legacy(host, address)
                        break
                    errors.append(str(exc))
                    continue
                self.stats.connections += 1
                self._save_facts(session)
                verdict = await self._judge(group, host, session)
                if verdict.send:
                    group.verdicts[host.name] = verdict
                    session.verdict = verdict
                    return session, slots
                await session.close()
                if verdict.reason in STABLE_REASONS and not verdict.defer:
                    verdict = await self._confirm(group, host, address, verdict, strict)
                group.verdicts[host.name] = verdict
                break
            slots.release()
        group.unreachable = errors
        return None

    async def _confirm(
        self, group: _Group, host: MXHost, address: str, first: HostVerdict, strict: bool
    ) -> HostVerdict:
        """One confirming connection before a stable shortfall (no STARTTLS, old TLS) counts."""
        if host.name in self._confirmed:
            return self._confirmed[host.name]
        again = self._session(host, address)
        try:
            await again.open(client_context(legacy=not strict))
        except ConnectFailed as exc:
            if exc.tls_failed and strict:
                verdict = await self._classify_legacy(host, address)
            else:
                return HostVerdict(
                    host.name, first.level, False, "connection_failed", defer=True, detail=str(exc)
                )
        else:
            self.stats.connections += 1
            verdict = await self._judge(group, host, again)
            await again.close()
        if verdict.send or verdict.reason != first.reason:
            # the host changed its answer between two connections: try again later
            return HostVerdict(
                host.name,
                first.level,
                False,
                first.reason,
                defer=True,
                detail="inconsistent answers on two connections",
            )
        self._confirmed[host.name] = verdict
        return verdict

    def _conclude(self, group: _Group) -> tuple[str, str, Outcome | None]:
        """Why nothing could be sent to this group, as (reason, text, outcome template)."""
        tried = "; ".join(
            f"{v.host} {v.level} {v.reason}" + (f" ({v.detail})" if v.detail else "")
            for v in group.verdicts.values()
        )
        unreachable = "; ".join(group.unreachable)
        text = "MX tried: " + "; ".join(x for x in (tried, unreachable) if x)
        deferring = [v for v in group.verdicts.values() if v.defer]
        if deferring:
            return deferring[0].reason or "deferred", text, None
        reached_all = group.verdicts and len(group.verdicts) == len(group.hosts)
        if reached_all and not group.unreachable:
            verdicts = list(group.verdicts.values())
            best = max(verdicts, key=lambda v: LEVELS.index(v.level))
            outcome = Outcome(
                State.INSECURE_CHANNEL,
                mx_host=verdicts[0].host,
                reason=verdicts[0].reason,
                permanence="permanent",
                reply_status="5.7.10",
                reply_text=text[:1000],
                tls_level=best.level,
                tls_version=best.facts.get("tls_version"),
                tls_cipher=best.facts.get("cipher"),
                tls_certificate=best.facts.get("certificate"),
            )
            return verdicts[0].reason or "insecure_channel", text, outcome
        return "connection_failed", text, None

    async def _worker(self, group: _Group) -> None:
        carry: _Booked | None = None  # a message booked for later, held across a pause
        while (carry is not None or not group.queue.empty()) and not STOP.is_set():
            if carry is not None:
                await _sleep_until(carry.ready_at)
                if STOP.is_set():
                    return
            async with self._global_slots:
                if group.domain_slots is not None:
                    await group.domain_slots.acquire()
                try:
                    connected = await self._connect(group)
                    if connected is None:
                        if carry is not None:
                            group.queue.put_nowait((carry.claim, carry.tries))
                        if group.connected == 0:
                            self._give_up(group)
                        return
                    session, slots = connected
                    group.connected += 1
                    try:
                        carry = await self._send_on(session, group, carry)
                    finally:
                        group.connected -= 1
                        await session.close()
                        slots.release()
                finally:
                    if group.domain_slots is not None:
                        group.domain_slots.release()

    def _give_up(self, group: _Group) -> None:
        """No qualifying MX host for this destination: every waiting message ends
        insecure_channel (all hosts reached, none good enough) or is deferred
        (unreachable hosts, suspected downgrade, bogus DNSSEC)."""
        reason, text, outcome = self._conclude(group)
        while not group.queue.empty():
            claim, _ = group.queue.get_nowait()
            if outcome is not None:
                self._record(claim, outcome)
            else:
                self._defer(claim, reason, text)

    async def _take_permit(self) -> None:
        """One permit from the shared limit; blocks of them are fetched as needed."""
        if self.options.permits is None:
            return
        async with self._permit_lock:
            if self._permits == 0:
                started = time.monotonic()
                granted = await asyncio.to_thread(self.options.permits, self.options.permit_block)
                self.stats.pacing.waited_seconds += time.monotonic() - started
                self._permits = max(1, granted)
            self._permits -= 1

    def _book(self, claim: Claim, tries: int, mx_host: str) -> _Booked:
        """The message's slot under the pacing rules (now, when nothing limits it)."""
        now = time.monotonic()
        if not self.options.pacing.active:
            return _Booked(claim, tries, now)
        delay = self.pacer.reserve(claim.domain, mx_host, now)
        if delay > 0:
            self.stats.pacing.paced_messages += 1
            self.stats.pacing.waited_seconds += delay
        return _Booked(claim, tries, now + delay)

    async def _send_on(
        self, session: MXSession, group: _Group, carry: _Booked | None
    ) -> _Booked | None:
        """Send queued messages on one session; returns a message booked too far ahead to
        keep the connection waiting for it (the caller reconnects when its time comes)."""
        while session.sent < self.options.messages_per_connection:
            if STOP.is_set():
                return carry  # never attempted: released when the run ends
            if carry is not None:
                booked, carry = carry, None
            elif group.queue.empty():
                return None
            else:
                claim, tries = group.queue.get_nowait()
                await self._take_permit()
                booked = self._book(claim, tries, session.mx_host)
            wait = booked.ready_at - time.monotonic()
            if wait > self.options.pause_after:
                self.stats.pacing.pauses += 1
                return booked
            if wait > 0:
                await _sleep_until(booked.ready_at)
                if STOP.is_set():
                    return booked
            claim, tries = booked.claim, booked.tries
            try:
                rendered = self.render(claim)
            except TemplateError as exc:
                self._record(
                    claim,
                    Outcome(
                        State.FAILED,
                        reason="render_error",
                        permanence="permanent",
                        reply_text=str(exc)[:1000],
                    ),
                )
                continue
            try:
                reply = await session.send(
                    rendered.envelope_from or self.options.sender,
                    claim.address,
                    rendered.data,
                    before_body=self._before_body(claim, rendered.message_id),
                )
            except ClaimLost:
                # the lease went to another worker before the body left: not ours to record
                self._done.add(claim.delivery_id)
                self.stats.outcomes["claim_lost"] += 1
                return None
            except SessionLost as exc:
                if exc.after_data:
                    self._record(
                        claim,
                        Outcome(
                            State.UNCERTAIN,
                            mx_host=session.mx_host,
                            reason="connection_lost_after_data",
                            reply_text=str(exc)[:1000],
                            message_id=rendered.message_id,
                            tls_version=session.tls.version,
                            tls_cipher=session.tls.cipher,
                            tls_level=session.level,
                        ),
                    )
                elif tries >= 2:
                    self._defer(claim, "connection_lost", str(exc), session.mx_host)
                else:
                    group.queue.put_nowait((claim, tries + 1))  # nothing was sent: try again
                return None
            self._reply_outcome(claim, session, rendered.message_id, reply)
            if not session.is_open:
                return None
        return carry

    def _before_body(self, claim: Claim, message_id: str) -> Callable[[], Awaitable[bool]]:
        async def mark() -> bool:
            if claim.delivery_id in self._marked:
                return True  # marked on a connection that broke before the body left
            assert self._commits is not None
            owned = await self._commits.submit(MarkSending(claim, message_id))
            if owned:
                self._marked.add(claim.delivery_id)
            return owned

        return mark

    async def _renew_leases(self, tokens: set[str]) -> None:
        """Keep our claims while a long (paced) run works through them."""
        period = max(1.0, self.options.lease.total_seconds() / 3)
        while True:
            await asyncio.sleep(period)
            await asyncio.to_thread(self.ledger.extend_leases, tokens, self.options.lease)

    # ---- entry point -------------------------------------------------------------------

    async def run(self, claims: Sequence[Claim]) -> DeliveryStats:
        started = time.perf_counter()
        self._commits = GroupCommitter(self.ledger)
        try:
            by_domain: dict[str, list[Claim]] = {}
            for claim in claims:
                by_domain.setdefault(claim.domain, []).append(claim)
            results = await asyncio.gather(*(self.resolver.resolve(d) for d in by_domain))
            groups: dict[tuple[tuple[str, ...], str], _Group] = {}
            for domain_claims, result in zip(by_domain.values(), results, strict=True):
                if result.error is not None:
                    for claim in domain_claims:
                        self._dns_outcome(claim, result)
                    continue
                # recipient policies (MTA-STS) and provider limits are per domain
                domain_slots = self.pacer.domain_slots(result.domain)
                per_domain = self._checks_policies or domain_slots is not None
                key = (tuple(h.name for h in result.hosts), result.domain if per_domain else "")
                group = groups.get(key)
                if group is None:
                    group = groups[key] = _Group(result, asyncio.Queue(), domain_slots)
                for claim in domain_claims:
                    group.queue.put_nowait((claim, 0))
            workers = []
            for group in groups.values():
                # every allowed connection, as long as each gets a fair share of messages
                wanted = math.ceil(group.queue.qsize() / self.options.min_messages_per_connection)
                for _ in range(max(1, min(self.options.connections_per_host, wanted))):
                    workers.append(self._worker(group))
            renewal = asyncio.create_task(self._renew_leases({c.token for c in claims}))
            try:
                await asyncio.gather(*workers)
            finally:
                renewal.cancel()
            await asyncio.gather(*self._writes)  # every outcome durable before we return
        finally:
            await self._commits.close()
            leftover = [c for c in claims if c.delivery_id not in self._done]
            if leftover:
                self.ledger.release(leftover)
            self.stats.seconds = time.perf_counter() - started
        return self.stats


@dataclass(frozen=True)
class _Booked:
    """A message with the moment pacing lets it leave (``time.monotonic`` clock)."""

    claim: Claim
    tries: int
    ready_at: float


async def _sleep_until(when: float) -> None:
    """Wait until ``when``, waking early when the process is asked to stop."""
    while not STOP.is_set():
        wait = when - time.monotonic()
        if wait <= 0:
            return
        await asyncio.sleep(min(wait, 0.5))


def _policy_failure(verdict: HostVerdict, recipient: RecipientPolicy) -> bool:
    """Did the host fail because of what the recipient published (worth a policy refresh)?"""
    return recipient.dane == "mismatch" or (recipient.sts_enforced and not verdict.send)
