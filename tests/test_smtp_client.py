"""The delivery SMTP client against scripted servers on 127.0.0.1.

A small asyncio server plays the MX so each test controls the wire exactly: whether
PIPELINING is offered, when replies are sent, what is refused.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from recapito.delivery.dns import MXResolver
from recapito.delivery.engine import DeliveryOptions, DeliveryRun
from recapito.delivery.smtp import ClaimLost, MXSession, SessionLost
from recapito.ledger import Claim, Ledger, PlannedDelivery
from recapito.ledger.batch import GroupCommitter
from recapito.ledger.states import State
from recapito.ledger.store import MarkSending, Outcome, RecordOutcome
from recapito.render.template import RenderedMessage
from recapito.sandbox.dns import AuthoritativeServer, Zone, ZoneRecord


@dataclass
class Script:
    """What the scripted server offers and how it answers."""

    pipelining: bool = True
    strict_pipelining: bool = False  # answer nothing until MAIL, RCPT and DATA are in
    rcpt_reply: bytes = b"250 2.1.5 Ok"
    data_reply: bytes = b"354 go ahead"
    commands: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)


async def _serve(
    script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(b"220 mx.script.test ESMTP\r\n")
    pending: list[bytes] = []
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line.strip().split(b" ")[0].upper()
            script.commands.append(line.strip())
            if verb == b"EHLO":
                extra = b"250-PIPELINING\r\n" if script.pipelining else b""
                writer.write(b"250-mx.script.test\r\n" + extra + b"250 SIZE 10000000\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            elif verb in (b"MAIL", b"RCPT", b"DATA", b"RSET"):
                answer = {
                    b"MAIL": b"250 2.1.0 Ok",
                    b"RCPT": script.rcpt_reply,
                    b"DATA": script.data_reply,
                    b"RSET": b"250 2.0.0 Ok",
                }[verb]
                pending.append(answer + b"\r\n")
                if script.strict_pipelining and verb != b"DATA":
                    continue  # a client waiting for this answer would wait forever
                writer.write(b"".join(pending))
                pending.clear()
                if verb == b"DATA" and answer.startswith(b"354"):
                    body = bytearray()
                    while not body.endswith(b"\r\n.\r\n"):
                        chunk = await reader.readline()
                        if not chunk:
                            return
                        body += chunk
                    script.bodies.append(bytes(body))
                    writer.write(b"250 2.0.0 queued\r\n")
            else:
                writer.write(b"502 5.5.2 no\r\n")
            await writer.drain()
    finally:
        writer.close()


async def _with_server(script: Script, work: Callable[[int], Awaitable[None]]) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve(script, r, w), "127.0.0.1", 0, limit=1 << 20
    )
    port = server.sockets[0].getsockname()[1]
    try:
        await work(port)
    finally:
        server.close()
        await server.wait_closed()


def _session(port: int) -> MXSession:
    return MXSession(
        "mx.script.test",
        "127.0.0.1",
        port,
        helo_name="mta.bank.test",
        extra_ca_file=None,
        connect_timeout=5,
        command_timeout=3,
    )


def test_pipelining_sends_the_envelope_in_one_go_and_commits_meanwhile() -> None:
    script = Script(strict_pipelining=True)
    marks: list[str] = []

    async def work(port: int) -> None:
        session = _session(port)
        await session.open()

        async def before_body() -> bool:
            marks.append("sending")
            return True

        reply = await session.send(
            "a@bank.test", "u@x.test", b"Subject: x\r\n\r\nhi\r\n", before_body
        )
        assert (reply.code, reply.stage) == (250, "data")
        await session.close()

    asyncio.run(_with_server(script, work))
    assert marks == ["sending"]
    assert script.bodies == [b"Subject: x\r\n\r\nhi\r\n.\r\n"]


def test_without_pipelining_each_command_waits_for_its_answer() -> None:
    script = Script(pipelining=False)

    async def work(port: int) -> None:
        session = _session(port)
        await session.open()
        for i in range(3):
            reply = await session.send("a@bank.test", f"u{i}@x.test", b"\r\nhi\r\n")
            assert reply.code == 250
        await session.close()

    asyncio.run(_with_server(script, work))
    assert len(script.bodies) == 3
    assert [c.split(b":")[0] for c in script.commands[1:4]] == [b"MAIL FROM", b"RCPT TO", b"DATA"]


def test_dot_stuffing_and_bare_line_feeds() -> None:
    script = Script()
    message = b"Subject: dots\n\n.first line starts with a dot\nmiddle\n.\n..two\nend"

    async def work(port: int) -> None:
        session = _session(port)
        await session.open()
        await session.send("a@bank.test", "u@x.test", message)
        await session.close()

    asyncio.run(_with_server(script, work))
    assert script.bodies == [
        b"Subject: dots\r\n\r\n..first line starts with a dot\r\nmiddle\r\n..\r\n...two\r\n"
        b"end\r\n.\r\n"
    ]


def test_refused_recipient_is_a_reply_and_the_next_transaction_starts_with_rset() -> None:
    script = Script(rcpt_reply=b"550 5.1.1 no such user", data_reply=b"554 5.5.1 no recipients")

    async def work(port: int) -> None:
        session = _session(port)
        await session.open()
        first = await session.send("a@bank.test", "gone@x.test", b"\r\nhi\r\n")
        assert (first.code, first.stage) == (550, "rcpt")
        assert session.is_open
        script.rcpt_reply, script.data_reply = b"250 Ok", b"354 go"
        second = await session.send("a@bank.test", "here@x.test", b"\r\nhi\r\n")
        assert second.code == 250
        await session.close()

    asyncio.run(_with_server(script, work))
    verbs = [c.split(b" ")[0] for c in script.commands]
    assert verbs.count(b"RSET") == 1
    assert verbs.index(b"RSET") < len(verbs) - 4  # before the second MAIL
    assert len(script.bodies) == 1


def test_a_server_that_wants_a_body_for_a_refused_recipient_gets_none() -> None:
    script = Script(rcpt_reply=b"550 5.1.1 no such user", data_reply=b"354 go ahead")

    async def work(port: int) -> None:
        session = _session(port)
        await session.open()
        reply = await session.send("a@bank.test", "gone@x.test", b"\r\nhi\r\n")
        assert reply.code == 550
        assert not session.is_open  # cut rather than hand over an empty message

    asyncio.run(_with_server(script, work))
    assert script.bodies == []


def test_a_lost_claim_cuts_the_connection_before_the_body() -> None:
    script = Script()

    async def work(port: int) -> None:
        session = _session(port)
        await session.open()

        async def not_ours() -> bool:
            return False

        with pytest.raises(ClaimLost):
            await session.send("a@bank.test", "u@x.test", b"\r\nhi\r\n", not_ours)
        assert not session.is_open
        with pytest.raises(SessionLost) as lost:
            await session.send("a@bank.test", "u@x.test", b"\r\nhi\r\n")
        assert lost.value.after_data is False

    asyncio.run(_with_server(script, work))
    assert script.bodies == []


def test_non_ascii_address_without_smtputf8_is_refused_locally() -> None:
    script = Script()

    async def work(port: int) -> None:
        session = _session(port)
        await session.open()
        reply = await session.send("a@bank.test", "josé@x.test", b"\r\nhi\r\n")
        assert reply.code == 553 and "SMTPUTF8" in reply.text
        await session.close()

    asyncio.run(_with_server(script, work))
    assert not any(c.startswith(b"MAIL") for c in script.commands)


def _ledger_with_claims(tmp_path: Path, n: int) -> tuple[Ledger, list[Claim]]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    camp = ledger.ensure_campaign("g", sender="a@bank.test", template_hash="h" * 64, params={})
    ledger.plan(camp.id, [PlannedDelivery(f"C{i}", f"u{i}@x.test", "x.test", 0) for i in range(n)])
    return ledger, ledger.claim_chunk(camp.id, 0, worker="t")


def test_group_commit_batches_writes_and_keeps_their_order(tmp_path: Path) -> None:
    ledger, claims = _ledger_with_claims(tmp_path, 200)

    async def run() -> GroupCommitter:
        commits = GroupCommitter(ledger)
        marked = await commits.write([MarkSending(c) for c in claims])
        assert all(marked)
        again = await commits.write([MarkSending(claims[0])])
        assert again == [False]  # only once
        futures = [
            commits.submit(RecordOutcome(c, Outcome(State.ACCEPTED, reply_code=250)))
            for c in claims
        ]
        await asyncio.gather(*futures)
        await commits.close()
        return commits

    commits = asyncio.run(run())
    assert commits.writes == 401
    assert commits.batches < 20  # many writes per transaction
    assert ledger.state_counts(claims[0].campaign_id) == {"accepted": 200}
    assert len(ledger.events_of(claims[0].campaign_id)) == 200
    ledger.close()


class _Recorder:
    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.received.append(envelope.content)  # type: ignore[attr-defined]
        return "250 2.0.0 Ok"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_claim_taken_over_by_another_worker_is_never_sent(tmp_path: Path) -> None:
    """The lease ran out and another worker re-claimed the row: the body must not leave."""
    ledger, claims = _ledger_with_claims(tmp_path, 3)
    # another worker's claim on the second row, as after an expired lease
    with ledger.engine.begin() as conn:
        from recapito.ledger.schema import deliveries

        conn.execute(
            deliveries.update()
            .where(deliveries.c.id == claims[1].delivery_id)
            .values(claim_token="someone-else")
        )
    recorder = _Recorder()
    port, dns_port = _free_port(), _free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    zone = Zone()
    zone.add(ZoneRecord("x.test", "MX", "10 mx.x.test."))
    zone.add(ZoneRecord("mx.x.test", "A", "127.0.0.1"))
    dns = AuthoritativeServer(zone, "127.0.0.1", dns_port)
    controller.start()
    dns.start()
    try:

        def render(claim: Claim) -> RenderedMessage:
            body = f"Message-ID: <{claim.delivery_id}@bank.test>\r\n\r\nhello\r\n".encode()
            return RenderedMessage(f"<{claim.delivery_id}@bank.test>", "s", body)

        options = DeliveryOptions(
            sender="a@bank.test", helo_name="mta.bank.test", mx_port=port, connections_per_host=1
        )
        run = DeliveryRun(ledger, options, render, MXResolver(("127.0.0.1", dns_port)))
        stats = asyncio.run(run.run(claims))
    finally:
        controller.stop()
        dns.stop()
    assert stats.outcomes["claim_lost"] == 1
    assert len(recorder.received) == 2
    assert f"<{claims[1].delivery_id}@bank.test>".encode() not in b"".join(recorder.received)
    rows = {r["id"]: r["state"] for r in ledger.deliveries_of(claims[0].campaign_id)}
    assert rows[claims[1].delivery_id] == "claimed"  # left to its new owner
    ledger.close()
