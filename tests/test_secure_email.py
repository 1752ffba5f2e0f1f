"""Secure Email: every sandbox posture under every policy, against the real MX servers."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from recapito.config import Settings
from recapito.delivery.engine import DeliveryOptions, DeliveryRun
from recapito.ledger import Claim, Ledger, PlannedDelivery
from recapito.render.template import RenderedMessage, message_id_for
from recapito.sandbox.runtime import Sandbox
from recapito.security.policy import TLSPolicy
from recapito.security.recipient import mx_resolver, recipient_policies

SENDER = "news@banca-esempio.test"
POLICIES = ["opportunistic", "secure:L1", "secure:L2", "secure:L3", "secure:L4"]
SENT, INS, DEF = "accepted", "insecure_channel", "deferred"
# domain -> expected state per policy (opportunistic, L1, L2, L3, L4), reason when not sent
MATRIX: dict[str, tuple[tuple[str, ...], str | None]] = {
    "mailitalia.test": ((SENT, SENT, SENT, SENT, INS), "validation-failure"),  # TLS 1.3, valid cert
    "casella.test": ((SENT, SENT, SENT, SENT, INS), "validation-failure"),  # TLS 1.2 only
    "aziendale.test": ((SENT, SENT, SENT, INS, INS), "certificate-not-trusted"),  # self-signed
    "studio-legale.test": ((SENT, SENT, SENT, INS, INS), "certificate-expired"),
    "hosting-condiviso.test": ((SENT, SENT, SENT, INS, INS), "certificate-host-mismatch"),
    "vecchiaposta.test": ((SENT, INS, INS, INS, INS), "starttls-not-supported"),  # no STARTTLS
    # TLS 1.0/1.1 only: classified on a separate connection, never sent through it at L2+
    "vecchio-tls.test": ((SENT, SENT, INS, INS, INS), "tls-version-too-low"),
    # dead primary MX: a qualifying secondary gets the mail; when the secondary does not
    # qualify, the unreachable primary might have: deferred, never insecure_channel
    "doppio-mx.test": ((SENT, SENT, SENT, SENT, DEF), "connection_failed"),
    # MTA-STS: enforce lifts a listed, valid MX to L4 and is a floor in every mode
    "sts-enforce.test": ((SENT, SENT, SENT, SENT, SENT), None),
    "sts-testing.test": ((SENT, SENT, SENT, SENT, INS), "validation-failure"),  # report only
    "sts-none.test": ((SENT, SENT, SENT, SENT, INS), "validation-failure"),
    "sts-enforce-badcert.test": ((INS,) * 5, "certificate-host-mismatch"),
    "sts-enforce-mismatch.test": ((INS,) * 5, "validation-failure"),  # MX not listed
    # a policy that cannot be fetched or parsed counts as no policy (RFC 8461 §5)
    "sts-broken.test": ((SENT, SENT, SENT, SENT, INS), "validation-failure"),
    "sts-redirect.test": ((SENT, SENT, SENT, SENT, INS), "validation-failure"),
    "sts-badwebcert.test": ((SENT, SENT, SENT, SENT, INS), "validation-failure"),
    # DANE (DNSSEC-signed zones behind the sandbox's validating resolver): a TLSA match is
    # L4 even though the certificate does not name the MX; a mismatch is a floor everywhere
    "dane-ok.test": ((SENT,) * 5, None),
    "dane-ta.test": ((SENT,) * 5, None),
    "dane-mismatch.test": ((INS,) * 5, "tlsa-invalid"),
    "dane-notlsa.test": ((SENT, SENT, SENT, INS, INS), "certificate-host-mismatch"),
    "dane-bogus.test": ((DEF,) * 5, "dnssec-invalid"),  # TLSA fails validation
    "bogus-mx.dane-bogus.test": ((DEF,) * 5, "dnssec-invalid"),  # MX fails validation
    "bogus-a.dane-bogus.test": ((DEF,) * 5, "dnssec-invalid"),  # A fails validation
}


def _run(box: Sandbox, ledger: Ledger, camp: str, policy: str) -> None:
    campaign = ledger.get_campaign(camp)
    assert campaign is not None

    def render(claim: Claim) -> RenderedMessage:
        mid = message_id_for(camp, claim.delivery_id, "banca-esempio.test")
        data = (
            f"From: {SENDER}\r\nTo: {claim.address}\r\nSubject: t\r\nMessage-ID: {mid}\r\n"
            f"X-Recapito-Campaign: {camp}\r\nX-Recapito-Delivery: {claim.delivery_id}\r\n\r\nx\r\n"
        ).encode()
        return RenderedMessage(mid, "t", data)

    options = DeliveryOptions(
        sender=SENDER,
        helo_name="mta.banca-esempio.test",
        mx_port=box.mx_port,
        extra_ca_file=box.ca_file,
        tls_policy=TLSPolicy.parse(policy),
    )
    settings = Settings.load({**os.environ, **box.env(), "RECAPITO_HOME": str(box.home)})
    policies = recipient_policies(settings, store=ledger)
    claims = ledger.claim_chunk(campaign.id, 0, worker="matrix")
    run = DeliveryRun(ledger, options, render, mx_resolver(settings), policies)
    asyncio.run(run.run(claims))


@pytest.mark.parametrize("policy_index", range(len(POLICIES)), ids=POLICIES)
def test_posture_policy_matrix(sandbox: Sandbox, tmp_path: Path, policy_index: int) -> None:
    policy = POLICIES[policy_index]
    tag = uuid.uuid4().hex[:8]
    camp = f"matrix-{policy.replace(':', '-')}-{tag}"
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    c = ledger.ensure_campaign(camp, sender=SENDER, template_hash="t" * 64, params={})
    ledger.plan(
        c.id,
        [
            PlannedDelivery(f"{domain}#{i}", f"u{i}.{tag}@{domain}", domain, 0)
            for domain in MATRIX
            for i in range(2)
        ],
    )
    _run(sandbox, ledger, camp, policy)
    rows = ledger.deliveries_of(c.id)
    for row in rows:
        expected_states, reason = MATRIX[row["domain"]]
        expected = expected_states[policy_index]
        assert row["state"] == expected, (policy, row["domain"], row["reason"], row["reply_text"])
        if expected == INS:
            assert row["reason"] == reason, (policy, row["domain"], row["reply_text"])
            assert row["reply_status"] == "5.7.10"
            assert row["reply_text"].startswith("MX tried: ")
            assert row["tls_level"] is not None
        if expected == DEF:
            assert row["reason"] == reason
    # what the MX servers really received: nothing below the floor, ever
    stored = [m for m in sandbox.messages() if m.header("X-Recapito-Campaign") == camp]
    accepted = {str(r["id"]) for r in rows if r["state"] == SENT}
    assert {m.delivery_id for m in stored} == accepted and len(stored) == len(accepted)
    floor = {"secure:L1": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")}.get(
        policy, ("TLSv1.2", "TLSv1.3")
    )
    if policy != "opportunistic":
        assert all(m.x_sandbox_tls in floor for m in stored), [
            (m.domain, m.x_sandbox_tls) for m in stored
        ]
    levels = {r["domain"]: r["tls_level"] for r in rows if r["state"] == SENT}
    if policy == "opportunistic":
        assert levels["vecchiaposta.test"] == "L0"
        assert levels["aziendale.test"] == "L2"
        assert levels["mailitalia.test"] == "L3"
        assert levels["sts-enforce.test"] == "L4"
        assert levels["sts-testing.test"] == "L3"
        assert levels["dane-ok.test"] == "L4" and levels["dane-ta.test"] == "L4"
        assert levels["dane-notlsa.test"] == "L2"
        assert levels["vecchio-tls.test"] == "L1"
    ledger.close()


def test_stable_shortfall_is_confirmed_once_per_host(sandbox: Sandbox, tmp_path: Path) -> None:
    """No STARTTLS: one confirming connection, then every recipient of the host is decided."""
    tag = uuid.uuid4().hex[:8]
    camp = f"confirm-{tag}"
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    c = ledger.ensure_campaign(camp, sender=SENDER, template_hash="t" * 64, params={})
    ledger.plan(
        c.id,
        [
            PlannedDelivery(str(i), f"u{i}.{tag}@vecchiaposta.test", "vecchiaposta.test", 0)
            for i in range(30)
        ],
    )
    _run(sandbox, ledger, camp, "secure:L2")
    assert ledger.state_counts(c.id) == {"insecure_channel": 30}
    events = ledger.events_of(c.id, "insecure_channel")
    assert len(events) == 30
    ledger.close()


def test_policy_parsing() -> None:
    assert TLSPolicy.parse("opportunistic").mode == "opportunistic"
    assert TLSPolicy.parse("secure").min_level == "L3"
    assert TLSPolicy.parse("L2") == TLSPolicy("secure", "L2")
    assert TLSPolicy.parse("secure:l4").label == "secure:L4"
    for bad in ("secure:L0", "secure:L9", "paranoid", ""):
        with pytest.raises(ValueError, match="tls policy"):
            TLSPolicy.parse(bad)


def test_starttls_missing_after_being_offered_is_a_suspected_downgrade(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """An MX remembered as offering STARTTLS that now offers none: defer, never send."""
    from datetime import timedelta

    from recapito.ledger import MXFacts
    from recapito.ledger.store import utcnow

    tag = uuid.uuid4().hex[:8]
    camp = f"downgrade-{tag}"
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    now = utcnow()
    ledger.save_mx_facts(
        MXFacts(
            "mx.plain.sandbox.test",
            True,
            True,
            "TLSv1.3",
            "X",
            "L3",
            "valid",
            now,
            now + timedelta(days=1),
        )
    )
    c = ledger.ensure_campaign(camp, sender=SENDER, template_hash="t" * 64, params={})
    ledger.plan(c.id, [PlannedDelivery("1", f"u.{tag}@vecchiaposta.test", "vecchiaposta.test", 0)])
    _run(sandbox, ledger, camp, "opportunistic")
    row = ledger.deliveries_of(c.id)[0]
    assert row["state"] == "deferred" and row["reason"] == "starttls-not-supported"
    assert "downgrade suspected" in row["reply_text"]
    assert not [m for m in sandbox.messages() if m.header("X-Recapito-Campaign") == camp]
    ledger.close()


def test_flapping_mx_is_deferred_once_it_stops_offering_starttls(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """The sandbox's flapping MX offers STARTTLS on its first connections only."""
    from recapito.sandbox.runtime import probe_mx
    from recapito.sandbox.world import FLAPPING_TLS_CONNECTIONS, MX_BY_POSTURE

    tag = uuid.uuid4().hex[:8]
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    first = ledger.ensure_campaign(f"flap1-{tag}", sender=SENDER, template_hash="t" * 64, params={})
    ledger.plan(first.id, [PlannedDelivery("1", f"a.{tag}@instabile.test", "instabile.test", 0)])
    _run(sandbox, ledger, f"flap1-{tag}", "opportunistic")
    row = ledger.deliveries_of(first.id)[0]
    assert row["state"] == "accepted" and row["tls_version"] == "TLSv1.3", row
    server = MX_BY_POSTURE["flapping"]
    for _ in range(FLAPPING_TLS_CONNECTIONS):  # use up the connections that still offer TLS
        probe_mx(server.address, sandbox.mx_port)
    second = ledger.ensure_campaign(
        f"flap2-{tag}", sender=SENDER, template_hash="t" * 64, params={}
    )
    ledger.plan(second.id, [PlannedDelivery("1", f"b.{tag}@instabile.test", "instabile.test", 0)])
    _run(sandbox, ledger, f"flap2-{tag}", "opportunistic")
    row = ledger.deliveries_of(second.id)[0]
    assert row["state"] == "deferred", row
    assert row["reason"] == "starttls-not-supported" and "downgrade" in row["reply_text"]
    received = [m for m in sandbox.messages() if m.header("X-Recapito-Campaign") == f"flap2-{tag}"]
    assert received == []  # nothing went out in cleartext
    ledger.close()
