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
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from recapito.delivery.dns import MXHost, MXResolver, MXResult
from recapito.delivery.replies import classify_reply
from recapito.delivery.smtp import ConnectFailed, MXSession, SessionLost, SMTPReply
from recapito.errors import TemplateError
from recapito.ledger import Claim, Ledger, MXFacts, Outcome, State
from recapito.ledger.store import utcnow
from recapito.render.template import RenderedMessage

Renderer = Callable[[Claim], RenderedMessage]


@dataclass(frozen=True)
class DeliveryOptions:
    sender: str
    helo_name: str
    mx_port: int = 25
    extra_ca_file: Path | None = None
    connections_per_host: int = 4
    max_connections: int = 32
    messages_per_connection: int = 200
    connect_timeout: float = 15.0
    command_timeout: float = 60.0
    retry_after: timedelta = timedelta(minutes=5)
    mx_facts_ttl: timedelta = timedelta(hours=24)


@dataclass
class DeliveryStats:
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    tls: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "outcomes": dict(self.outcomes),
            "reasons": dict(self.reasons),
            "tls": dict(self.tls),
            "connections": self.connections,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Group:
    """Recipients whose domains share the same MX host list."""

    hosts: tuple[MXHost, ...]
    queue: asyncio.Queue[tuple[Claim, int]]
    connected: int = 0
    unreachable: list[str] = field(default_factory=list)


class DeliveryRun:
    def __init__(
        self,
        ledger: Ledger,
        options: DeliveryOptions,
        render: Renderer,
        resolver: MXResolver,
    ) -> None:
        self.ledger = ledger
        self.options = options
        self.render = render
        self.resolver = resolver
        self.stats = DeliveryStats()
        self._done: set[int] = set()  # delivery ids with a recorded outcome
        self._host_slots: dict[str, asyncio.Semaphore] = {}
        self._global_slots = asyncio.Semaphore(options.max_connections)
        self._facts_saved: set[str] = set()

    # ---- outcomes ----------------------------------------------------------------------

    def _record(self, claim: Claim, outcome: Outcome) -> None:
        self.ledger.record(claim, outcome)
        self._done.add(claim.delivery_id)
        self.stats.outcomes[outcome.state.value] += 1
        if outcome.reason and outcome.state != State.ACCEPTED:
            self.stats.reasons[outcome.reason] += 1
        if outcome.state == State.ACCEPTED:
            self.stats.tls[outcome.tls_version or "none"] += 1

    def _defer(self, claim: Claim, reason: str, text: str, mx_host: str | None = None) -> None:
        self._record(
            claim,
            Outcome(
                State.DEFERRED,
                mx_host=mx_host,
                reason=reason,
                permanence="temporary",
                reply_text=text[:1000],
                next_attempt_at=utcnow() + self.options.retry_after,
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
            self._defer(claim, "dns_temporary", f"{result.domain}: {result.detail}")

    def _reply_outcome(
        self, claim: Claim, session: MXSession, msg_id: str, reply: SMTPReply
    ) -> None:
        verdict = classify_reply(reply.code, reply.text)
        accepted = verdict.state == State.ACCEPTED
        self._record(
            claim,
            Outcome(
                verdict.state,
                mx_host=session.mx_host,
                reply_code=reply.code,
                reply_status=verdict.status,
                reply_text=f"{reply.stage}: {reply.text}"[:1000],
                reason=None if accepted else verdict.reason,
                permanence=None if accepted else verdict.permanence,
                tls_version=session.tls.version,
                tls_cipher=session.tls.cipher,
                tls_level=session.tls.level,
                message_id=msg_id,
                next_attempt_at=(
                    utcnow() + self.options.retry_after if verdict.state == State.DEFERRED else None
                ),
            ),
        )

    # ---- connections -------------------------------------------------------------------

    def _slots(self, host: str) -> asyncio.Semaphore:
        slots = self._host_slots.get(host)
        if slots is None:
            slots = self._host_slots[host] = asyncio.Semaphore(self.options.connections_per_host)
        return slots

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

    async def _connect(self, group: _Group) -> tuple[MXSession, asyncio.Semaphore] | None:
        """A session with the most preferred reachable MX host, holding its host slot."""
        errors: list[str] = []
        for host in group.hosts:
            slots = self._slots(host.name)
            await slots.acquire()
            for address in host.addresses:
                session = MXSession(
                    host.name,
                    address,
                    self.options.mx_port,
                    helo_name=self.options.helo_name,
                    extra_ca_file=self.options.extra_ca_file,
                    connect_timeout=self.options.connect_timeout,
                    command_timeout=self.options.command_timeout,
                )
                try:
                    await session.open()
                except ConnectFailed as exc:
                    errors.append(str(exc))
                    continue
                self.stats.connections += 1
                self._save_facts(session)
                return session, slots
            slots.release()
        group.unreachable = errors
        return None

    async def _worker(self, group: _Group) -> None:
        async with self._global_slots:
            while not group.queue.empty():
                connected = await self._connect(group)
                if connected is None:
                    if group.connected == 0:
                        # nobody can reach this destination: every waiting message is deferred
                        text = "; ".join(group.unreachable) or "no MX host reachable"
                        while not group.queue.empty():
                            claim, _ = group.queue.get_nowait()
                            self._defer(claim, "connection_failed", text)
                    return
                session, slots = connected
                group.connected += 1
                try:
                    await self._send_on(session, group)
                finally:
                    group.connected -= 1
                    await session.close()
                    slots.release()

    async def _send_on(self, session: MXSession, group: _Group) -> None:
        while session.sent < self.options.messages_per_connection and not group.queue.empty():
            claim, tries = group.queue.get_nowait()
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
                reply = await session.send(self.options.sender, claim.address, rendered.data)
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
                            tls_level=session.tls.level,
                        ),
                    )
                elif tries >= 2:
                    self._defer(claim, "connection_lost", str(exc), session.mx_host)
                else:
                    group.queue.put_nowait((claim, tries + 1))  # nothing was sent: try again
                return
            self._reply_outcome(claim, session, rendered.message_id, reply)
            if not session.is_open:
                return

    # ---- entry point -------------------------------------------------------------------

    async def run(self, claims: Sequence[Claim]) -> DeliveryStats:
        started = time.perf_counter()
        try:
            by_domain: dict[str, list[Claim]] = {}
            for claim in claims:
                by_domain.setdefault(claim.domain, []).append(claim)
            results = await asyncio.gather(*(self.resolver.resolve(d) for d in by_domain))
            groups: dict[tuple[str, ...], _Group] = {}
            for domain_claims, result in zip(by_domain.values(), results, strict=True):
                if result.error is not None:
                    for claim in domain_claims:
                        self._dns_outcome(claim, result)
                    continue
                key = tuple(h.name for h in result.hosts)
                group = groups.get(key)
                if group is None:
                    group = groups[key] = _Group(result.hosts, asyncio.Queue())
                for claim in domain_claims:
                    group.queue.put_nowait((claim, 0))
            workers = []
            for group in groups.values():
                wanted = math.ceil(group.queue.qsize() / self.options.messages_per_connection)
                for _ in range(max(1, min(self.options.connections_per_host, wanted))):
                    workers.append(self._worker(group))
            await asyncio.gather(*workers)
        finally:
            leftover = [c for c in claims if c.delivery_id not in self._done]
            if leftover:
                self.ledger.release(leftover)
            self.stats.seconds = time.perf_counter() - started
        return self.stats
