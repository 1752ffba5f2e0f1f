"""Broken connections: before DATA the message is retried, after DATA it is uncertain."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from recapito.delivery.dns import MXResolver
from recapito.delivery.engine import DeliveryOptions, DeliveryRun
from recapito.ledger import Claim, Ledger, PlannedDelivery
from recapito.render.template import RenderedMessage
from recapito.sandbox.dns import AuthoritativeServer, Zone, ZoneRecord


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultyHandler:
    """Drops the connection at a chosen stage, for the first ``times`` transactions."""

    def __init__(self, stage: str, times: int) -> None:
        self.stage = stage
        self.times = times
        self.accepted: list[bytes] = []

    def _maybe_drop(self, server: Any, stage: str) -> bool:
        if stage == self.stage and self.times > 0:
            self.times -= 1
            server.transport.close()
            return True
        return False

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if self._maybe_drop(server, "rcpt"):
            return "421 closing"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self._maybe_drop(server, "data"):
            return "421 closing"
        self.accepted.append(envelope.content)
        return "250 2.0.0 Ok"


@pytest.fixture
def dns_port() -> Iterator[int]:
    port = _free_port()
    zone = Zone()
    zone.add(ZoneRecord("faulty.test", "MX", "10 mx.faulty.test."))
    zone.add(ZoneRecord("mx.faulty.test", "A", "127.0.0.1"))
    server = AuthoritativeServer(zone, "127.0.0.1", port)
    server.start()
    yield port
    server.stop()


def _deliver(tmp_path: Path, handler: FaultyHandler, dns_port: int, n: int) -> Ledger:
    port = _free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
        c = ledger.ensure_campaign("f", sender="a@bank.test", template_hash="h" * 64, params={})
        ledger.plan(
            c.id, [PlannedDelivery(str(i), f"u{i}@faulty.test", "faulty.test", 0) for i in range(n)]
        )

        def render(claim: Claim) -> RenderedMessage:
            body = f"Message-ID: <{claim.delivery_id}@bank.test>\r\n\r\nhello\r\n".encode()
            return RenderedMessage(f"<{claim.delivery_id}@bank.test>", "s", body)

        options = DeliveryOptions(
            sender="a@bank.test", helo_name="mta.bank.test", mx_port=port, connections_per_host=1
        )
        claims = ledger.claim_chunk(c.id, 0, worker="t")
        run = DeliveryRun(ledger, options, render, MXResolver(("127.0.0.1", dns_port)))
        asyncio.run(run.run(claims))
        return ledger
    finally:
        controller.stop()


def test_drop_before_data_is_retried_on_a_new_connection(tmp_path: Path, dns_port: int) -> None:
    handler = FaultyHandler("rcpt", times=1)
    ledger = _deliver(tmp_path, handler, dns_port, 3)
    assert ledger.state_counts(1) == {"accepted": 3}
    assert len(handler.accepted) == 3  # each exactly once
    ledger.close()


def test_drop_after_data_makes_the_delivery_uncertain(tmp_path: Path, dns_port: int) -> None:
    handler = FaultyHandler("data", times=1)
    ledger = _deliver(tmp_path, handler, dns_port, 3)
    counts = ledger.state_counts(1)
    assert counts == {"uncertain": 1, "accepted": 2}
    row = next(r for r in ledger.deliveries_of(1) if r["state"] == "uncertain")
    assert row["reason"] == "connection_lost_after_data"
    assert row["message_id"] is not None
    # an uncertain delivery is never claimed again without an operator's decision
    assert ledger.claim_chunk(1, 0, worker="again") == []
    assert len(handler.accepted) == 2
    ledger.close()
