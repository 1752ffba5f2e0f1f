"""Pacing: rate, waves, provider limits, shared by every run of the process.

The limiter units are checked with an explicit clock; the engine is checked end to end
against a real SMTP server (aiosmtpd) and a real DNS server on 127.0.0.1, reading the
moments at which messages and connections reached the server.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from recapito.delivery.dns import MXResolver
from recapito.delivery.engine import DeliveryOptions, DeliveryRun, DeliveryStats
from recapito.delivery.pacing import (
    Limit,
    PacingOptions,
    SharedSlots,
    TokenBucket,
    WaveGate,
    parse_rate,
)
from recapito.errors import InputError
from recapito.ledger import Claim, Ledger, PlannedDelivery
from recapito.render.template import RenderedMessage
from recapito.sandbox.dns import AuthoritativeServer, Zone, ZoneRecord

# ---- limiter units ---------------------------------------------------------------------


def test_token_bucket_spaces_messages_evenly() -> None:
    bucket = TokenBucket(per_second=10)
    delays = [bucket.reserve(now=100.0) for _ in range(5)]
    assert delays == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    # later on, the bucket is idle again: no debt is carried forward
    assert bucket.reserve(now=200.0) == 0.0


def test_token_bucket_hands_out_distinct_slots_to_concurrent_threads() -> None:
    bucket = TokenBucket(per_second=1000)
    delays: list[float] = []
    lock = threading.Lock()

    def take() -> None:
        mine = [bucket.reserve(now=5.0) for _ in range(250)]
        with lock:
            delays.extend(mine)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slots = sorted(round(d * 1000) for d in delays)
    assert slots == list(range(1000))  # each millisecond slot given exactly once


def test_wave_gate_opens_one_wave_per_interval() -> None:
    gate = WaveGate(size=3, interval=10.0)
    delays = [gate.reserve(now=0.0) for _ in range(7)]
    assert delays == [0, 0, 0, 10, 10, 10, 20]
    status = gate.status(now=1.0)
    assert status["wave"] == 1 and status["next_wave_in_s"] == 9.0


def test_wave_gate_never_lets_an_unused_window_double_the_next_wave() -> None:
    gate = WaveGate(size=2, interval=10.0)
    assert [gate.reserve(now=0.0) for _ in range(2)] == [0, 0]
    # nothing sent in the window 10-20; at 25 the wave of 20-30 holds two, then 30-40
    assert [gate.reserve(now=25.0) for _ in range(3)] == [0, 0, 5.0]


def test_shared_slots_limit_connections_across_event_loops() -> None:
    slots = SharedSlots(2)
    active = 0
    peak = 0
    lock = threading.Lock()

    async def use() -> None:
        nonlocal active, peak
        await slots.acquire()
        try:
            with lock:
                active += 1
                peak = max(peak, active)
            await asyncio.sleep(0.02)
            with lock:
                active -= 1
        finally:
            slots.release()

    async def many() -> None:
        await asyncio.gather(*(use() for _ in range(8)))

    threads = [threading.Thread(target=asyncio.run, args=(many(),)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert peak == 2
    assert slots.in_use == 0


def test_limits_and_rates_parse_with_clear_errors() -> None:
    assert parse_rate("120/min", "x") == 120
    assert parse_rate("2/s", "x") == 120
    assert parse_rate("600/h", "x") == pytest.approx(10)
    assert Limit.parse("conn=3,rate=60/min", "libero.it") == Limit(3, 60.0)
    with pytest.raises(InputError, match=r"libero\.it: unknown limit 'speed'"):
        Limit.parse("speed=3", "libero.it")
    with pytest.raises(InputError, match="unknown rate unit 'day'"):
        parse_rate("5/day", "campaign rate")
    with pytest.raises(InputError, match="must be above zero"):
        parse_rate("0/min", "campaign rate")
    with pytest.raises(InputError, match="waves need both"):
        PacingOptions(wave_size=10)


def test_provider_limits_match_a_name_or_a_suffix() -> None:
    options = PacingOptions(
        domain_limits={"libero.it": Limit(2)},
        mx_limits={".mail.protection.outlook.com": Limit(per_minute=60)},
    )
    assert options.domain_limit("LIBERO.IT") == ("libero.it", Limit(2))
    assert options.domain_limit("iol.it") is None
    found = options.mx_limit("bank-it.mail.protection.outlook.com")
    assert found is not None and found[1].per_minute == 60


# ---- the engine, paced, against a real SMTP server ---------------------------------------


@dataclass
class _Sink:
    """Records when each message and each connection arrived, and how many were open."""

    arrivals: list[tuple[float, str]] = field(default_factory=list)  # (time, rcpt domain)
    connects: list[float] = field(default_factory=list)
    open_now: int = 0
    peak_open: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        rcpt = envelope.rcpt_tos[0]  # type: ignore[attr-defined]
        with self.lock:
            self.arrivals.append((time.monotonic(), rcpt.rpartition("@")[2]))
        return "250 2.0.0 Ok"


class _CountingController(Controller):
    def __init__(self, sink: _Sink, port: int) -> None:
        super().__init__(sink, hostname="127.0.0.1", port=port)
        self.sink = sink

    def factory(self):  # type: ignore[no-untyped-def]
        proto = super().factory()
        sink = self.sink
        made, lost = proto.connection_made, proto.connection_lost

        def connection_made(transport):  # type: ignore[no-untyped-def]
            with sink.lock:
                sink.connects.append(time.monotonic())
                sink.open_now += 1
                sink.peak_open = max(sink.peak_open, sink.open_now)
            made(transport)

        def connection_lost(exc):  # type: ignore[no-untyped-def]
            with sink.lock:
                sink.open_now -= 1
            lost(exc)

        proto.connection_made = connection_made
        proto.connection_lost = connection_lost
        return proto


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mx() -> object:
    """One MX host (mx.pace.test) serving the domains fast.test and slow.test."""
    sink = _Sink()
    port, dns_port = _free_port(), _free_port()
    controller = _CountingController(sink, port)
    zone = Zone()
    for domain in ("fast.test", "slow.test"):
        zone.add(ZoneRecord(domain, "MX", "10 mx.pace.test."))
    zone.add(ZoneRecord("mx.pace.test", "A", "127.0.0.1"))
    dns = AuthoritativeServer(zone, "127.0.0.1", dns_port)
    controller.start()
    dns.start()
    sink.connects.clear()  # the controller's own readiness probe
    try:
        yield sink, port, dns_port
    finally:
        controller.stop()
        dns.stop()


def _claims(ledger: Ledger, name: str, domains: dict[str, int], chunk: int = 0) -> list[Claim]:
    camp = ledger.ensure_campaign(name, sender="a@bank.test", template_hash="h" * 64, params={})
    ledger.plan(
        camp.id,
        [
            PlannedDelivery(f"{domain}-{chunk}-{i}", f"u{chunk}.{i}@{domain}", domain, chunk)
            for domain, n in domains.items()
            for i in range(n)
        ],
    )
    return ledger.claim_chunk(camp.id, chunk, worker="pace")


def _render(claim: Claim) -> RenderedMessage:
    mid = f"<{claim.delivery_id}.{claim.campaign_id}@bank.test>"
    return RenderedMessage(mid, "s", f"Message-ID: {mid}\r\n\r\nhello\r\n".encode())


def _run(
    ledger: Ledger, claims: list[Claim], port: int, dns_port: int, **kw: object
) -> DeliveryStats:
    options = DeliveryOptions(
        sender="a@bank.test",
        helo_name="mta.bank.test",
        mx_port=port,
        **kw,  # type: ignore[arg-type]
    )
    run = DeliveryRun(ledger, options, _render, MXResolver(("127.0.0.1", dns_port)))
    return asyncio.run(run.run(claims))


def test_campaign_rate_spaces_deliveries(mx: tuple[_Sink, int, int], tmp_path: Path) -> None:
    sink, port, dns_port = mx
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    claims = _claims(ledger, "rate", {"fast.test": 12})
    stats = _run(
        ledger,
        claims,
        port,
        dns_port,
        connections_per_host=4,
        pacing=PacingOptions(per_minute=1200, scope="rate-test"),  # 20 per second
    )
    assert stats.outcomes["accepted"] == 12
    times = sorted(t for t, _ in sink.arrivals)
    assert len(times) == 12
    # 12 messages at 20/s: the last leaves 0.55 s after the first, never sooner
    assert times[-1] - times[0] >= 0.5
    assert stats.pacing.paced_messages == 11
    # four connections wait for their turns side by side: 0.55 s of pacing each at most
    assert 0.5 <= float(stats.as_dict()["paced_seconds"]) <= 4 * 0.55 + 0.1
    ledger.close()


def test_waves_close_the_connection_between_waves(
    mx: tuple[_Sink, int, int], tmp_path: Path
) -> None:
    sink, port, dns_port = mx
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    claims = _claims(ledger, "waves", {"fast.test": 9})
    stats = _run(
        ledger,
        claims,
        port,
        dns_port,
        connections_per_host=1,
        pause_after=0.3,
        pacing=PacingOptions(wave_size=4, wave_interval=1.0, scope="waves-test"),
    )
    assert stats.outcomes["accepted"] == 9
    times = sorted(t for t, _ in sink.arrivals)
    start = times[0]
    waves = [round(t - start) for t in times]
    assert waves == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    # an idle wait longer than pause_after is not spent on an open connection
    assert stats.pacing.pauses == 2
    assert len(sink.connects) == 3
    states = {r["state"] for r in ledger.deliveries_of(claims[0].campaign_id)}
    assert states == {"accepted"}
    ledger.close()


def test_a_domain_limit_slows_that_domain_only(mx: tuple[_Sink, int, int], tmp_path: Path) -> None:
    sink, port, dns_port = mx
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    claims = _claims(ledger, "domains", {"fast.test": 20, "slow.test": 6})
    stats = _run(
        ledger,
        claims,
        port,
        dns_port,
        connections_per_host=4,
        pacing=PacingOptions(domain_limits={"slow.test": Limit(connections=1, per_minute=600)}),
    )
    assert stats.outcomes["accepted"] == 26
    slow = sorted(t for t, d in sink.arrivals if d == "slow.test")
    fast = sorted(t for t, d in sink.arrivals if d == "fast.test")
    assert slow[-1] - slow[0] >= 0.45  # 6 at 10/s
    assert fast[-1] - fast[0] < slow[-1] - slow[0]
    ledger.close()


def test_connections_per_mx_host_are_shared_by_concurrent_runs(
    mx: tuple[_Sink, int, int], tmp_path: Path
) -> None:
    """Two chunk runs in two threads (as the flow runs them) share the per-host cap."""
    sink, port, dns_port = mx
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    parts = [_claims(ledger, "shared", {"fast.test": 100}, chunk=c) for c in range(2)]
    # one MX limit for every run: two connections at most, 100 messages a second
    pacing = PacingOptions(mx_limits={"mx.pace.test": Limit(connections=2, per_minute=6000)})
    results: list[DeliveryStats] = []

    def work(claims: list[Claim]) -> None:
        results.append(
            _run(
                ledger,
                claims,
                port,
                dns_port,
                connections_per_host=3,
                messages_per_connection=50,
                pacing=pacing,
            )
        )

    threads = [threading.Thread(target=work, args=(p,)) for p in parts]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.monotonic() - started
    assert sum(r.outcomes["accepted"] for r in results) == 200
    assert sink.peak_open <= 2
    assert len(sink.arrivals) == 200
    assert elapsed >= 200 / 100 - 0.1  # 100 a second across both runs
    ledger.close()


# ---- a paced campaign under Prefect ------------------------------------------------------


@pytest.mark.prefect
def test_paced_campaign_shares_its_rate_through_prefect(
    prefect_harness: None, sandbox: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rate and waves are enforced in a real flow run, the rate through a Prefect global
    concurrency limit, and the pacing artifact shows them."""
    from prefect import get_client

    from flows.campaign import _artifact_key, campaign_flow
    from recapito.campaign import CampaignParams
    from recapito.sandbox.runtime import Sandbox

    assert isinstance(sandbox, Sandbox)
    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path))
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    contacts = tmp_path / "contacts.csv"
    tag = tmp_path.name[-6:]
    rows = ["id;nome;email;segmento;citta;provincia;consenso_email"]
    rows += [f"P{i};N{i};paced{i}.{tag}@postaveloce.test;retail;Roma;RM;true" for i in range(12)]
    contacts.write_text("\n".join(rows) + "\n", encoding="utf-8")
    template = Path(__file__).parents[1] / "src" / "recapito" / "sandbox" / "demo_template"
    params = CampaignParams(
        name=f"paced-{tmp_path.name[-6:]}",
        contacts=str(contacts),
        template=str(template),
        sender="comunicazioni@banca-esempio.test",
        chunk_size=10,
        parallel_chunks=2,
        rate_per_minute=600,  # 10 a second
        shared_rate_limit=True,
        domain_limits={"postaveloce.test": "conn=1,rate=1200/min"},
    )
    started = time.monotonic()
    report = campaign_flow(params)
    elapsed = time.monotonic() - started
    assert report["funnel"]["accepted"] == 12
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(f"recapito-rate-{params.name}")
        assert limit.slot_decay_per_second == pytest.approx(10)
        artifact = client.read_latest_artifacts()  # newest per key
        keys = {a.key for a in artifact}
    assert f"{_artifact_key(params.name)}-pacing" in keys
    pacing = next(a for a in artifact if a.key == f"{_artifact_key(params.name)}-pacing")
    assert "600 messages a minute" in str(pacing.data)
    assert "domain limit postaveloce.test | 1 connections, 1200 a minute" in str(pacing.data)
    assert elapsed >= 1.0  # 12 messages at 10 a second cannot leave faster


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "5/day"], "--rate: unknown rate unit 'day'"),
        (["--rate", "0/min"], "--rate: the rate must be above zero"),
        (["--wave-size", "10"], "waves need both a size and an interval (--wave-size"),
        (["--wave-interval", "1"], "waves need both a size and an interval (--wave-size"),
        (["--wave-size", "5", "--wave-interval", "inf"], "--wave-interval: "),
        (["--rate", "inf/min"], "--rate: 'inf' is not a finite number"),
        (["--rate", "nan/min"], "--rate: 'nan' is not a finite number"),
        (["--domain-limit", "a.it=conn=2,conn=3"], "--domain-limit: a.it: conn given twice"),
        (["--mx-limit", ".=conn=2"], "--mx-limit: '.': expected a domain or host name"),
        (["--domain-limit", "libero.it"], "--domain-limit 'libero.it': expected DOMAIN="),
        (["--domain-limit", "libero.it=speed=3"], "--domain-limit: libero.it: unknown limit"),
        (["--mx-limit", "mx.test=conn=0"], "--mx-limit: mx.test: connections must be at least 1"),
    ],
)
def test_pacing_options_are_checked_before_anything_runs(
    args: list[str], message: str, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from recapito.cli import main

    base = ["campaign", "run", "--name", "x", "--contacts", str(tmp_path / "none.csv")]
    base += ["--template", str(tmp_path), "--sender", "news@bank.test"]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
