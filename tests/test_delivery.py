"""The delivery engine against the sandbox's real DNS and MX servers."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from recapito.delivery.dns import MXResolver
from recapito.delivery.engine import DeliveryOptions, DeliveryRun
from recapito.ledger import Claim, Ledger, PlannedDelivery
from recapito.render.template import RenderedMessage, load_template, message_id_for
from recapito.sandbox.runtime import Sandbox

SENDER = "news@banca-esempio.test"


def _template(tmp_path: Path) -> Path:
    root = tmp_path / "tpl"
    root.mkdir()
    (root / "template.toml").write_text('subject = "Ciao {{ nome }}"\n')
    (root / "body.html").write_text("<p>Ciao {{ nome }}</p>")
    return root


def _run(
    ledger: Ledger,
    box: Sandbox,
    tmp_path: Path,
    camp: str,
    chunk: int = 0,
    retry_after: timedelta = timedelta(minutes=5),
) -> dict[str, int]:
    template = load_template(
        _template(tmp_path) if not (tmp_path / "tpl").exists() else tmp_path / "tpl"
    )
    campaign = ledger.get_campaign(camp)
    assert campaign is not None

    def render(claim: Claim) -> RenderedMessage:
        return template.render(
            {"nome": claim.contact_id},
            sender=SENDER,
            recipient=claim.address,
            message_id=message_id_for(camp, claim.delivery_id, "banca-esempio.test"),
            headers={"X-Recapito-Campaign": camp, "X-Recapito-Delivery": str(claim.delivery_id)},
        )

    options = DeliveryOptions(
        sender=SENDER,
        helo_name="mta.banca-esempio.test",
        mx_port=box.mx_port,
        extra_ca_file=box.ca_file,
        connections_per_host=2,
        messages_per_connection=3,
        retry_after=retry_after,
    )
    claims = ledger.claim_chunk(campaign.id, chunk, worker="test")
    run = DeliveryRun(ledger, options, render, MXResolver(box.dns_address))
    stats = asyncio.run(run.run(claims))
    return dict(stats.outcomes)


def test_every_posture_ends_in_the_right_state(sandbox: Sandbox, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    camp = f"postures-{tag}"
    c = ledger.ensure_campaign(camp, sender=SENDER, template_hash="t" * 64, params={})
    cases = {
        "tls13": ("postaveloce.test", "accepted", "TLSv1.3", "L3"),
        "tls12": ("casella.test", "accepted", "TLSv1.2", "L3"),
        "self": ("aziendale.test", "accepted", "TLSv1.3", "L2"),
        "plain": ("vecchiaposta.test", "accepted", None, "L0"),
        "expired": ("studio-legale.test", "accepted", "TLSv1.3", "L2"),
        "wrongname": ("hosting-condiviso.test", "accepted", "TLSv1.3", "L2"),
        "failover": ("doppio-mx.test", "accepted", "TLSv1.3", "L3"),
        "implicit": ("solo-a.test", "accepted", "TLSv1.2", "L2"),
        "grey": ("webposta.test", "deferred", None, None),
        "cessato": ("comune-esempio.test", "failed", None, None),
        "nullmx": ("nessuna-posta.test", "failed", None, None),
        "nx": ("dominio-inesistente.test", "failed", None, None),
    }
    # several recipients on the big domain exercise connection reuse and rotation
    rows = [PlannedDelivery(f"{k}", f"{k}.{tag}@{d}", d, 0) for k, (d, *_) in cases.items()]
    rows += [
        PlannedDelivery(f"bulk{i}", f"bulk{i}.{tag}@mailitalia.test", "mailitalia.test", 0)
        for i in range(20)
    ]
    ledger.plan(c.id, rows)
    outcomes = _run(ledger, sandbox, tmp_path, camp)
    assert outcomes == {"accepted": 28, "deferred": 1, "failed": 3}
    by_contact = {r["contact_id"]: r for r in ledger.deliveries_of(c.id)}
    for key, (_, state, version, level) in cases.items():
        row = by_contact[key]
        assert row["state"] == state, (key, row)
        if state == "accepted":
            assert (row["tls_version"], row["tls_level"]) == (version, level), key
            assert row["reply_code"] == 250 and row["message_id"].startswith(f"<{camp}.")
    assert by_contact["failover"]["mx_host"] == "mx.tls13.sandbox.test"
    # the certificate verdict of each delivery is kept in its event
    import json

    sent = {e["delivery_id"]: json.loads(e["data_json"]) for e in ledger.events_of(c.id, "sent")}
    assert sent[by_contact["self"]["id"]]["tls_certificate"] == "certificate-not-trusted"
    assert sent[by_contact["tls13"]["id"]]["tls_certificate"] == "valid"
    assert by_contact["grey"]["reason"] == "greylisted"
    assert by_contact["cessato"]["reason"] == "user_unknown"
    assert by_contact["cessato"]["reply_status"] == "5.1.1"
    assert by_contact["nullmx"]["reply_status"] == "5.1.10"
    assert by_contact["nx"]["reason"] == "domain_invalid"
    # hard bounces at send time are suppressed for every later campaign
    suppressed = ledger.suppressed_among(r["address"] for r in by_contact.values())
    assert suppressed == {by_contact[k]["address"].lower() for k in ("cessato", "nullmx", "nx")}
    # what the MX servers stored matches the ledger, once per accepted delivery
    stored = [m for m in sandbox.messages() if m.header("X-Recapito-Campaign") == camp]
    accepted_ids = {str(r["id"]) for r in by_contact.values() if r["state"] == "accepted"}
    assert sorted(m.delivery_id for m in stored) == sorted(accepted_ids)
    tls_of = {m.delivery_id: m.x_sandbox_tls for m in stored}
    assert tls_of[str(by_contact["plain"]["id"])] == "none"
    facts = ledger.get_mx_facts("mx.plain.sandbox.test")
    assert facts is not None and facts.starttls_offered is False
    facts = ledger.get_mx_facts("mx.selfsigned.sandbox.test")
    assert facts is not None and facts.cert_verdict == "certificate-not-trusted"
    assert ledger.get_mx_facts("mx.expired.sandbox.test").cert_verdict == "certificate-expired"  # type: ignore[union-attr]
    assert (
        ledger.get_mx_facts("mx.wrongname.sandbox.test").cert_verdict  # type: ignore[union-attr]
        == "certificate-host-mismatch"
    )
    ledger.close()


def test_greylisted_mail_passes_on_retry(sandbox: Sandbox, tmp_path: Path) -> None:
    import time

    from recapito.sandbox.world import GREYLIST_DELAY_SECONDS

    tag = uuid.uuid4().hex[:8]
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    camp = f"grey-{tag}"
    c = ledger.ensure_campaign(camp, sender=SENDER, template_hash="t" * 64, params={})
    ledger.plan(c.id, [PlannedDelivery("g", f"g.{tag}@webposta.test", "webposta.test", 0)])
    assert _run(ledger, sandbox, tmp_path, camp, retry_after=timedelta(0)) == {"deferred": 1}
    time.sleep(GREYLIST_DELAY_SECONDS + 0.2)
    assert _run(ledger, sandbox, tmp_path, camp) == {"accepted": 1}
    row = ledger.deliveries_of(c.id)[0]
    assert row["attempts"] == 2 and row["state"] == "accepted"
    kinds = [e["kind"] for e in ledger.events_of(c.id)]
    assert kinds == ["deferred", "sent"]
    ledger.close()


def test_unreachable_destination_is_deferred_not_lost(sandbox: Sandbox, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    camp = f"dead-{tag}"
    c = ledger.ensure_campaign(camp, sender=SENDER, template_hash="t" * 64, params={})
    ledger.plan(
        c.id,
        [
            PlannedDelivery(str(i), f"{i}.{tag}@postaveloce.test", "postaveloce.test", 0)
            for i in range(3)
        ],
    )
    # a resolver pointed at a port where no DNS server listens: DNS timeout -> deferred
    template = load_template(_template(tmp_path))
    claims = ledger.claim_chunk(c.id, 0, worker="t")
    options = DeliveryOptions(sender=SENDER, helo_name="x.test", mx_port=sandbox.mx_port)

    def render(claim: Claim) -> RenderedMessage:
        return template.render(
            {"nome": "x"}, sender=SENDER, recipient=claim.address, message_id="<x@y>"
        )

    run = DeliveryRun(ledger, options, render, MXResolver(("127.0.0.1", 9), timeout=1.0))
    stats = asyncio.run(run.run(claims))
    assert dict(stats.outcomes) == {"deferred": 3}
    assert {r["reason"] for r in ledger.deliveries_of(c.id)} == {"dns_temporary"}
    ledger.close()


def test_backoff_grows_and_gives_up_after_the_window(sandbox: Sandbox, tmp_path: Path) -> None:
    import sqlalchemy as sa

    from recapito.ledger.schema import deliveries
    from recapito.ledger.store import utcnow

    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    c = ledger.ensure_campaign("backoff", sender=SENDER, template_hash="t" * 64, params={})
    ledger.plan(
        c.id,
        [PlannedDelivery(str(i), f"{i}@postaveloce.test", "postaveloce.test", 0) for i in range(2)],
    )
    options = DeliveryOptions(
        sender=SENDER,
        helo_name="x.test",
        mx_port=sandbox.mx_port,
        retry_after=timedelta(minutes=5),
        retry_factor=1.5,
        give_up_after=timedelta(hours=72),
    )
    run = DeliveryRun(
        ledger,
        options,
        lambda claim: None,  # type: ignore[arg-type,return-value]
        MXResolver(("127.0.0.1", 9), timeout=0.5),
    )
    now = utcnow()
    first = Claim(1, c.id, "0", "x", "d", 0, attempt=1, token="t", first_attempt_at=now)
    third = Claim(1, c.id, "0", "x", "d", 0, attempt=3, token="t", first_attempt_at=now)
    d1 = run._next_attempt(first)
    d3 = run._next_attempt(third)
    assert d1 is not None and d3 is not None
    assert abs((d1 - now).total_seconds() - 300) < 5
    assert abs((d3 - now).total_seconds() - 300 * 1.5**2) < 5
    late = Claim(
        1,
        c.id,
        "0",
        "x",
        "d",
        0,
        attempt=9,
        token="t",
        first_attempt_at=now - timedelta(hours=71, minutes=59),
    )
    assert run._next_attempt(late) is None

    # through the engine: a row first tried 73 hours ago expires instead of deferring again
    claims = ledger.claim_chunk(c.id, 0, worker="t")
    with ledger.engine.begin() as conn:
        conn.execute(
            sa.update(deliveries)
            .where(deliveries.c.contact_id == "0")
            .values(first_attempt_at=now - timedelta(hours=73))
        )
    claims = [
        replace(cl, first_attempt_at=now - timedelta(hours=73)) if cl.contact_id == "0" else cl
        for cl in claims
    ]
    asyncio.run(run.run(claims))
    rows = {r["contact_id"]: r for r in ledger.deliveries_of(c.id)}
    assert rows["0"]["state"] == "expired" and rows["0"]["reason"] == "expired"
    assert "last: dns_temporary" in rows["0"]["reply_text"]
    assert rows["1"]["state"] == "deferred" and rows["1"]["first_attempt_at"] is not None
    assert sorted(e["kind"] for e in ledger.events_of(c.id)) == ["deferred", "expired"]
    ledger.close()
