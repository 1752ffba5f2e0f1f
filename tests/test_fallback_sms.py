"""Fallback policy, sweeper and SMS through the sandbox's Twilio-compatible API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from recapito.fallback.callbacks import TwilioHook
from recapito.fallback.policy import PolicyError, load_policies, parse_policy
from recapito.fallback.sms import (
    SmsError,
    TwilioSettings,
    TwilioSms,
    advances,
    normalize_phone,
    normalize_text,
    render_sms,
    segments,
    sign,
)
from recapito.fallback.sweeper import (
    PaperQueue,
    SmsChannel,
    SweepConfig,
    Sweeper,
    enroll,
    funnel,
    opt_out,
    steps_of,
)
from recapito.identity.verp import keyring_from_entries
from recapito.ledger import Ledger, Outcome, PlannedDelivery, State
from recapito.ledger.schema import deliveries, events, fallback_steps
from recapito.ledger.store import utcnow
from recapito.sandbox import twilio as tw
from recapito.tracking.service import TrackingApp, running
from recapito.tracking.store import TrackingStore
from recapito.tracking.tokens import TokenSigner

POLICY = (
    "email → on insecure_channel|hard_bounce|failed|not_pec → sms → paper; "
    "wait 24h for delivered|opened → sms → wait 48h → paper"
)
TOKEN = "sandbox-auth-token"
SID = "AC" + "1" * 32


# ---- policy -------------------------------------------------------------------------------


def test_policy_parses_the_issue_example() -> None:
    p = parse_policy(
        "email → on insecure_channel|hard_bounce|pec_error|not_pec → sms; "
        "wait 24h for delivered|opened -> sms -> wait 48h -> paper"
    )
    assert p.primary == "email"
    assert p.rules[0].triggers == {"insecure_channel", "hard_bounce", "pec_error", "not_pec"}
    assert [s.channel for s in p.rules[1].steps] == ["sms", "paper"]
    assert p.rules[1].window == timedelta(hours=24)
    assert p.rules[1].steps[0].wait == timedelta(hours=48)
    assert p.trigger_rule("not_pec") == 0 and p.window_rule() == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty policy"),
        ("sms → on insecure_channel → paper", "must start with the primary channel"),
        ("email → on bogus → sms", "unknown trigger bogus"),
        ("email → on insecure_channel → fax", "unknown channel 'fax'"),
        ("email → wait 24 for delivered → sms", "bad duration"),
        ("email → wait 24h for read → sms", "unknown confirmation read"),
        ("email → on insecure_channel", "no fallback channel"),
        ("email → on insecure_channel → sms → wait 2h", "ends with a wait"),
        ("email → on insecure_channel → wait 2h → sms", "before any channel"),
        ("email → on not_pec → sms; on not_pec → paper", "appears in two clauses"),
        ("email → on not_pec → sms;", "empty clause"),
        ("email → maybe → sms", "expected 'on A|B'"),
        ("email → on a| → sms", "empty trigger"),
    ],
)
def test_policy_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("|", r"\|")):
        parse_policy(text)


def test_policies_from_toml() -> None:
    got = load_policies('[policies]\nnotice = "pec → on not_pec → paper"\n')
    assert got["notice"].primary == "pec"
    with pytest.raises(PolicyError, match=r"policies\.bad"):
        load_policies('[policies]\nbad = "pec → on nothing → paper"\n')


# ---- SMS pieces ---------------------------------------------------------------------------


def test_numbers_text_and_segments() -> None:
    assert normalize_phone("347 123 4567") == "+393471234567"
    assert normalize_phone("+39 333 123 4501") == "+393331234501"
    with pytest.raises(SmsError) as landline:
        normalize_phone("06 1234 5678")
    assert (landline.value.kind, landline.value.code) == ("hard", 21614)
    with pytest.raises(SmsError):
        normalize_phone("12")
    assert normalize_text("PERCHÈ “sì” — ok…") == 'PERCHE\' "sì" - ok...'
    assert segments("a" * 160).count == 1 and segments("a" * 161).count == 2
    assert segments("a" * 306).count == 2 and segments("a" * 307).count == 3
    assert segments("€" * 80).count == 1 and segments("€" * 81).count == 2  # 2 septets each
    assert segments("ć" * 70).encoding == "UCS-2" and segments("ć" * 70).count == 1
    assert segments("ć" * 71).count == 2 and segments("ć" * 135).count == 3
    assert render_sms("Gentile {{ nome }}, ", {"nome": "Àlvaro"}) == "Gentile A'lvaro,"
    with pytest.raises(SmsError, match="segments"):
        render_sms("{{ x }}", {"x": "a" * 500}, max_segments=3)
    assert advances(None, "queued") and advances("sent", "delivered")
    assert not advances("delivered", "sent") and not advances("sent", "bogus")


# ---- end to end in the sandbox ---------------------------------------------------------------


@dataclass
class World:
    ledger: Ledger
    campaign_id: int
    ids: dict[str, int]
    sandbox: tw.TwilioSandbox
    api: tw.TwilioSandboxServer
    tracking_url: str
    sweeper: Sweeper


PHONES = {
    "insecure": "347 123 4567",
    "bounced": "+39 333 123 4501",
    "landline": "06 1234 5678",
    "blocked": tw.BLOCKED,
    "unreachable": tw.UNREACHABLE,
    "unavailable": tw.UNAVAILABLE,
    "opted": "+393471110000",
    "quiet": "+393471119999",
    "pec": "+393471112222",
}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    camp = ledger.ensure_campaign("fb", sender="n@bank.test", template_hash="h" * 64, params={})
    ledger.plan(
        camp.id,
        [PlannedDelivery(c, f"{c}@example.test", "example.test", 0) for c in PHONES if c != "pec"]
        + [PlannedDelivery("pec", "pec@pec.example.test", "pec.example.test", 0, channel="pec")],
    )
    ids: dict[str, int] = {}
    for claim in ledger.claim_chunk(camp.id, 0, worker="t"):
        c = claim.contact_id
        ids[c] = claim.delivery_id
        if c == "quiet" or c == "bounced":
            out = Outcome(State.ACCEPTED, reply_code=250)
        else:
            out = Outcome(State.INSECURE_CHANNEL, reason="tls_below_floor")
        ledger.record(claim, out)
    with ledger.engine.begin() as conn:  # the bounce and PEC receipt collectors' verdicts
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id == ids["bounced"])
            .values(state="bounced", permanence="permanent", reason="user_unknown")
        )
        conn.execute(
            deliveries.update()
            .where(deliveries.c.campaign_id == camp.id, deliveries.c.channel == "pec")
            .values(state="not_pec")
        )
    opt_out(ledger, "+393471110000")
    sandbox = tw.TwilioSandbox(SID, TOKEN, delay=0.02)
    api = tw.TwilioSandboxServer(sandbox).start()
    signer = TokenSigner(keyring_from_entries([("k1", "fallback-secret-0123456789")]))
    app = TrackingApp(TrackingStore(ledger), signer, twilio=TwilioHook(ledger, TOKEN))
    with running(app) as service:
        settings = TwilioSettings(
            SID,
            TOKEN,
            "+393330000000",
            base_url=api.url,
            status_callback=f"{service.url}/twilio/status",
        )
        channel = SmsChannel(
            ledger, TwilioSms(settings), "Banca: {{ contact_id }}, la contatteremo per posta."
        )
        sweeper = Sweeper(
            ledger,
            parse_policy(POLICY),
            {"sms": channel, "paper": PaperQueue()},
            SweepConfig(retry_delay=timedelta(minutes=30)),
        )
        enroll(ledger, camp.id, sweeper.policy, PHONES)
        yield World(ledger, camp.id, ids, sandbox, api, service.url, sweeper)
    api.stop()
    ledger.close()


def _steps(w: World, contact: str) -> list[dict[str, object]]:
    return [s for s in steps_of(w.ledger, w.campaign_id) if s["contact_id"] == contact]


def _wait_callbacks(w: World) -> None:
    assert w.api.wait_idle()
    time.sleep(0.05)


def test_sweeper_routes_as_the_policy_says(world: World) -> None:
    w = world
    t0 = utcnow()
    assert enroll(w.ledger, w.campaign_id, w.sweeper.policy, PHONES) == 0  # again: no duplicates
    first = w.sweeper.sweep(t0)  # watch rows: triggers fire
    assert first["triggered"] == 8 and first["watching"] == 1
    second = w.sweeper.sweep(t0)  # the sms steps go out
    assert second["sent"] == 4  # insecure, bounced, not_pec, unreachable
    # hard failures (landline, blocked at Twilio, opted out) and one soft (503)
    assert second["failed"] == 3 and second["retry"] == 1
    _wait_callbacks(w)

    sent_to = [r.to for r in w.sandbox.requests]
    assert sorted(sent_to) == sorted(
        [
            "+393471234567",
            "+393331234501",
            "+393471112222",
            tw.BLOCKED,
            tw.UNREACHABLE,
            tw.UNAVAILABLE,
        ]
    )  # landline and opted-out never reached Twilio
    assert w.sandbox.requests[0].params["ValidityPeriod"] == "14400"
    assert "Body" in w.sandbox.requests[0].params

    ok = _steps(w, "insecure")
    assert [s["channel"] for s in ok] == ["email", "sms", "paper"]
    assert ok[1]["state"] == "delivered" and ok[1]["provider_status"] == "delivered"
    assert ok[2]["state"] == "pending"  # never needed
    assert _steps(w, "bounced")[0]["outcome"] == "hard_bounce"
    assert _steps(w, "bounced")[1]["state"] == "delivered"
    pec = _steps(w, "pec")
    assert (pec[0]["channel"], pec[0]["outcome"], pec[1]["state"]) == (
        "pec",
        "not_pec",
        "delivered",
    )
    # the late 'sent' after 'delivered' was accepted by the service and ignored
    late = next(r for r in w.sandbox.requests if r.to == "+393471234567")
    assert late.callbacks == [("sent", 204), ("delivered", 204), ("sent", 204)]
    for contact in ("landline", "blocked", "opted"):
        s = _steps(w, contact)
        assert s[1]["state"] == "failed" and s[2]["state"] == "due", contact
    assert _steps(w, "blocked")[1]["error_code"] == 21610
    assert _steps(w, "opted")[1]["error_code"] == 21610

    # next sweep: the papers go; unreachable's undelivered (30003, soft) is retried later
    t0 = utcnow()  # the callbacks made their steps due at the time they came
    third = w.sweeper.sweep(t0)
    assert third["sent"] == 3 and third["retry"] == 1
    assert {s["state"] for s in _steps(w, "landline")[2:]} == {"done"}
    before = len(w.sandbox.requests)
    assert w.sweeper.sweep(t0) == {}  # nothing due: nothing sent
    assert len(w.sandbox.requests) == before

    # 30 minutes later: the one delayed retry of each soft failure, then the next channel
    t1 = t0 + timedelta(minutes=31)
    assert w.sweeper.sweep(t1)["sent"] == 1  # unreachable again (503 fails again, hard now)
    _wait_callbacks(w)
    assert w.sweeper.sweep(t1)["failed"] == 1  # unreachable: undelivered twice
    assert len([r for r in w.sandbox.requests if r.to == tw.UNREACHABLE]) == 2
    assert len([r for r in w.sandbox.requests if r.to == tw.UNAVAILABLE]) == 2
    w.sweeper.sweep(t1)
    assert _steps(w, "unreachable")[2]["state"] == "done"  # paper
    assert _steps(w, "unavailable")[2]["state"] == "done"

    # the accepted message without confirmation: after 24 h its own chain, sms then wait
    t2 = t0 + timedelta(hours=25)
    assert w.sweeper.sweep(t2)["triggered"] == 1
    assert w.sweeper.sweep(t2)["sent"] == 1
    _wait_callbacks(w)
    quiet = _steps(w, "quiet")
    assert quiet[0]["outcome"] == "unconfirmed"
    assert quiet[1]["state"] == "delivered" and quiet[2]["state"] == "pending"

    f = funnel(w.ledger, w.campaign_id)
    assert f["sms"] == {"delivered": 4, "failed": 5}
    with w.ledger.engine.connect() as conn:
        kinds = {r[0] for r in conn.execute(sa.select(events.c.kind).distinct())}
    assert {"fallback_triggered", "fallback_attempt", "fallback_sent", "sms_status"} <= kinds


def test_retried_sweeps_never_send_twice(world: World) -> None:
    w = world
    t0 = utcnow()
    w.sweeper.sweep(t0)
    # a worker died between the attempt row and Twilio's answer: that row stays 'sending'
    with w.ledger.engine.begin() as conn:
        conn.execute(
            fallback_steps.update()
            .where(
                fallback_steps.c.delivery_id == w.ids["insecure"],
                fallback_steps.c.step_index == 1,
            )
            .values(state="sending", claim_token="dead", lease_until=t0, attempts=1)
        )
    # two sweeps at once (a Prefect retry racing the original) and then again
    other = Sweeper(w.ledger, w.sweeper.policy, w.sweeper.senders, worker="other")
    a = w.sweeper.sweep(t0 + timedelta(seconds=1))
    b = other.sweep(t0 + timedelta(seconds=1))
    w.sweeper.sweep(t0 + timedelta(seconds=1))
    _wait_callbacks(w)
    assert a.get("uncertain") == 1 and "uncertain" not in b
    per_number: dict[str, int] = {}
    for r in w.sandbox.requests:
        per_number[r.to] = per_number.get(r.to, 0) + 1
    assert "+393471234567" not in per_number  # uncertain: never resent blindly
    assert max(per_number.values()) == 1
    assert _steps(w, "insecure")[1]["state"] == "uncertain"


def test_forged_callbacks_are_rejected(world: World) -> None:
    w = world
    t0 = utcnow()
    w.sweeper.sweep(t0)
    w.sweeper.sweep(t0)
    _wait_callbacks(w)
    step = _steps(w, "bounced")[1]
    sid = str(step["provider_id"])
    url = f"{w.tracking_url}/twilio/status"
    params = {"MessageSid": sid, "MessageStatus": "failed", "ErrorCode": "30005"}
    forged = httpx.post(url, data=params, headers={"X-Twilio-Signature": "bm9wZQ=="})
    assert forged.status_code == 403
    unsigned = httpx.post(url, data=params)
    assert unsigned.status_code == 403
    wrong_key = httpx.post(url, data=params, headers={"X-Twilio-Signature": sign("x", url, params)})
    assert wrong_key.status_code == 403
    assert _steps(w, "bounced")[1]["provider_status"] == "delivered"
    # a signed regression is accepted but changes nothing
    ok = httpx.post(url, data=params, headers={"X-Twilio-Signature": sign(TOKEN, url, params)})
    assert ok.status_code == 204
    assert _steps(w, "bounced")[1]["state"] == "delivered"
    # STOP reply: signed inbound webhook puts the number in the opt-out store
    inbound = f"{w.tracking_url}/twilio/inbound"
    stop = {"From": "+393471234567", "Body": "stop", "MessageSid": "SMx"}
    r = httpx.post(inbound, data=stop, headers={"X-Twilio-Signature": sign(TOKEN, inbound, stop)})
    assert r.status_code == 204
    from recapito.fallback.sweeper import is_opted_out

    assert is_opted_out(w.ledger, "+393471234567")


def test_sweep_all_uses_the_campaign_policy_and_audience_phones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polars as pl

    from recapito.campaign import campaign_dir
    from recapito.config import Settings
    from recapito.fallback.run import sweep_all, twilio_settings

    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path))
    monkeypatch.delenv("RECAPITO_DB_URL", raising=False)
    settings = Settings.load()
    ledger = Ledger(settings.db_url)
    params = {"fallback_policy": "email → on insecure_channel → sms → paper"}
    camp = ledger.ensure_campaign(
        "flow", sender="n@bank.test", template_hash="h" * 64, params=params
    )
    ledger.ensure_campaign("other", sender="n@bank.test", template_hash="h" * 64, params={})
    ledger.plan(camp.id, [PlannedDelivery("a", "a@x.test", "x.test", 0)])
    for claim in ledger.claim_chunk(camp.id, 0, worker="t"):
        ledger.record(claim, Outcome(State.INSECURE_CHANNEL, reason="tls_below_floor"))
    folder = campaign_dir(settings, "flow")
    folder.mkdir(parents=True)
    pl.DataFrame({"contact_id": ["a"], "phone": ["3471234567"]}).write_parquet(
        folder / "audience.parquet"
    )
    sandbox = tw.TwilioSandbox(SID, TOKEN, delay=0.02)
    api = tw.TwilioSandboxServer(sandbox).start()
    try:
        env = {
            "RECAPITO_TWILIO_ACCOUNT_SID": SID,
            "RECAPITO_TWILIO_AUTH_TOKEN": TOKEN,
            "RECAPITO_TWILIO_BASE_URL": api.url,
        }
        twilio = twilio_settings(env)
        assert twilio is not None and TOKEN not in repr(twilio)
        assert twilio_settings({}) is None
        first = sweep_all(ledger, settings=settings, twilio=twilio)
        assert first == {"flow": {"triggered": 1, "enrolled": 1}}
        assert sweep_all(ledger, settings=settings, twilio=None)["flow"] == {"no_sender": 1}
        assert sandbox.requests == []  # SMS not configured: the step waits, nothing skipped
        later = utcnow() + timedelta(hours=1)
        assert sweep_all(ledger, settings=settings, twilio=twilio, now=later)["flow"] == {"sent": 1}
        assert [r.to for r in sandbox.requests] == ["+393471234567"]
        # the flow's task, as the worker runs it (settings from the environment)
        from tasks.fallback import sweep_fallbacks

        monkeypatch.setenv("RECAPITO_DB_URL", settings.db_url)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        result = sweep_fallbacks.fn("flow")
        assert result["counts"] == {"flow": {}}
        assert result["funnel"] == [
            {"campaign": "flow", "channel": "paper", "pending": 1},
            {"campaign": "flow", "channel": "sms", "sent": 1},
        ]
    finally:
        api.stop()
        ledger.close()


def test_campaign_parameter_is_checked_when_filled_in() -> None:
    from pydantic import ValidationError

    from recapito.campaign import CampaignParams

    base = {"name": "x", "contacts": "c.csv", "template": "t", "sender": "n@bank.test"}
    ok = CampaignParams(**base, fallback_policy="email → on insecure_channel → sms → paper")
    assert ok.fallback_policy is not None
    with pytest.raises(ValidationError, match="unknown trigger"):
        CampaignParams(**base, fallback_policy="email → on nobody → sms")


def test_sandbox_runs_the_twilio_api(sandbox: object, tmp_path: Path) -> None:
    """The sandbox starts the Twilio-compatible API as a child; its settings reach the SMS."""
    from recapito.fallback.run import twilio_settings
    from recapito.fallback.sweeper import record_sms_status
    from recapito.sandbox.runtime import Sandbox

    assert isinstance(sandbox, Sandbox)
    env = sandbox.env()
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    hook = TwilioHook(ledger, env["RECAPITO_TWILIO_AUTH_TOKEN"])
    signer = TokenSigner(keyring_from_entries([("k1", "fallback-secret-0123456789")]))
    app = TrackingApp(TrackingStore(ledger), signer, twilio=hook)
    with running(app) as service:
        settings = twilio_settings(env, tracking_url=service.url)
        assert settings is not None and settings.base_url == env["RECAPITO_TWILIO_BASE_URL"]
        sent = TwilioSms(settings).send("+393471234567", "prova")
        assert sent.sid.startswith("SM") and sent.status == "queued"
        with pytest.raises(SmsError) as blocked:
            TwilioSms(settings).send(tw.BLOCKED, "prova")
        assert (blocked.value.kind, blocked.value.code) == ("hard", 21610)
        with pytest.raises(SmsError) as soft:
            TwilioSms(settings).send(tw.UNAVAILABLE, "prova")
        assert soft.value.kind == "soft"
        # the step the sweeper would have written, then the signed callbacks move it
        camp = ledger.ensure_campaign("sbx", sender="n@b.test", template_hash="h" * 64, params={})
        ledger.plan(camp.id, [PlannedDelivery("a", "a@x.test", "x.test", 0)])
        delivery_id = ledger.deliveries_of(camp.id)[0]["id"]
        now = utcnow()
        with ledger.engine.begin() as conn:
            conn.execute(
                fallback_steps.insert().values(
                    campaign_id=camp.id,
                    delivery_id=delivery_id,
                    contact_id="a",
                    step_index=1,
                    channel="sms",
                    state="sent",
                    provider_id=sent.sid,
                    created_at=now,
                    updated_at=now,
                )
            )
        deadline = time.monotonic() + 10
        state = None
        while time.monotonic() < deadline and state != "delivered":
            time.sleep(0.1)
            state = steps_of(ledger, camp.id)[0]["state"]
        assert state == "delivered"
        assert record_sms_status(ledger, sent.sid, "sent") == "ignored"
    ledger.close()


def test_push_through_the_fcm_sandbox_invalidates_unregistered_tokens(tmp_path: Path) -> None:
    from recapito.fallback.push import DeviceRegistry, FcmPush, PushChannel
    from recapito.sandbox.fcm import FcmSandbox

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    camp = ledger.ensure_campaign("push", sender="n@b.test", template_hash="h" * 64, params={})
    contacts = ["both", "gone", "none"]
    ledger.plan(camp.id, [PlannedDelivery(c, f"{c}@x.test", "x.test", 0) for c in contacts])
    for claim in ledger.claim_chunk(camp.id, 0, worker="t"):
        ledger.record(claim, Outcome(State.INSECURE_CHANNEL, reason="tls_below_floor"))
    registry = DeviceRegistry(ledger)
    registry.register("both", "unregistered-old")
    registry.register("both", "good-phone", "ios")
    registry.register("gone", "unregistered-only")
    fcm_box = FcmSandbox("oauth-abc")
    server = tw.TwilioSandboxServer(fcm_box).start()
    fcm = FcmPush("demo-project", lambda: "oauth-abc", endpoint=server.url)
    try:
        policy = parse_policy("email → on insecure_channel → push → paper")
        push = PushChannel(ledger, fcm, "Banca", "Una comunicazione per lei")
        sweeper = Sweeper(ledger, policy, {"push": push, "paper": PaperQueue()})
        enroll(ledger, camp.id, policy, {})
        now = utcnow()
        sweeper.sweep(now)
        assert sweeper.sweep(now) == {"sent": 1, "failed": 2}
        by_contact = {(s["contact_id"], s["channel"]): s for s in steps_of(ledger, camp.id)}
        assert by_contact[("both", "push")]["state"] == "done"
        assert str(by_contact[("both", "push")]["provider_id"]).startswith("projects/demo")
        assert by_contact[("gone", "push")]["state"] == "failed"
        assert by_contact[("none", "push")]["outcome"] == "hard:None"  # no device at all
        assert by_contact[("gone", "paper")]["state"] == "due"
        assert registry.active("both") == ["good-phone"]  # UNREGISTERED invalidated
        assert registry.active("gone") == []
        assert len(fcm_box.requests) == 3
        assert fcm_box.requests[0]["notification"]["title"] == "Banca"
    finally:
        fcm.close()
        server.stop()
        ledger.close()


def test_callbacks_that_overtake_the_answer_still_count(world: World) -> None:
    """Twilio's callbacks can arrive before the sweeper has recorded Twilio's answer."""
    w = world
    channel = w.sweeper.senders["sms"]
    assert isinstance(channel, SmsChannel)

    class SlowAnswer(TwilioSms):
        def send(self, to: str, body: str, *, reference: str | None = None) -> Any:
            sent = super().send(to, body, reference=reference)
            assert w.api.wait_idle()  # every callback came while the step was 'sending'
            return sent

    channel.sms = SlowAnswer(channel.sms.settings)
    t0 = utcnow()
    w.sweeper.sweep(t0)
    w.sweeper.sweep(t0)
    step = _steps(w, "insecure")[1]
    assert step["state"] == "sent" and step["provider_status"] == "delivered"
    w.sweeper.sweep(t0 + timedelta(minutes=16))  # the recheck sees the delivery
    assert _steps(w, "insecure")[1]["state"] == "delivered"
