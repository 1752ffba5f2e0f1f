"""The ledger suite, run on SQLite and on PostgreSQL (127.0.0.1:5432, database ``test``)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from recapito.errors import LedgerError
from recapito.ledger import Ledger, MXFacts, Outcome, PlannedDelivery, State
from recapito.ledger.states import (
    FINAL,
    PEC_AWAITING,
    PEC_FROM_SUBMITTED,
    TRANSITIONS,
    can_transition,
)
from recapito.ledger.store import utcnow

PG_ADMIN_URL = os.environ.get(
    "RECAPITO_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    name = f"recapito_t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield str(sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(False))
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    led = Ledger(ledger_url)
    yield led
    led.close()


def _plan(ledger: Ledger, n: int = 10, chunk_size: int = 5) -> int:
    camp = ledger.ensure_campaign("c1", sender="news@bank.test", template_hash="h" * 64, params={})
    rows = [
        PlannedDelivery(f"C{i:03d}", f"u{i}@d{i % 2}.test", f"d{i % 2}.test", i // chunk_size)
        for i in range(n)
    ]
    assert ledger.plan(camp.id, rows) == n
    return camp.id


def test_migrations_are_idempotent(ledger_url: str) -> None:
    Ledger(ledger_url).close()
    led = Ledger(ledger_url)  # second upgrade is a no-op
    insp = sa.inspect(led.engine)
    assert {"campaigns", "deliveries", "events", "mx_facts", "suppressions"} <= set(
        insp.get_table_names()
    )
    led.close()


def test_campaign_rerun_resumes_and_template_change_is_refused(ledger: Ledger) -> None:
    a = ledger.ensure_campaign("spring", sender="a@b.test", template_hash="x" * 64, params={"k": 1})
    b = ledger.ensure_campaign("spring", sender="a@b.test", template_hash="x" * 64, params={"k": 1})
    assert a.id == b.id
    with pytest.raises(LedgerError, match="another template"):
        ledger.ensure_campaign("spring", sender="a@b.test", template_hash="y" * 64, params={})


def test_plan_is_idempotent_and_unique_per_contact_channel(ledger: Ledger) -> None:
    cid = _plan(ledger)
    again = [PlannedDelivery("C001", "u1@d1.test", "d1.test", 0)]
    assert ledger.plan(cid, again) == 0
    assert ledger.plan(cid, [PlannedDelivery("C001", "+39", "sms", 0, channel="sms")]) == 1
    assert ledger.state_counts(cid) == {"planned": 11}
    assert ledger.chunks(cid) == [0, 1]


def test_claim_is_exclusive(ledger: Ledger) -> None:
    cid = _plan(ledger)
    first = ledger.claim_chunk(cid, 0, worker="w1")
    second = ledger.claim_chunk(cid, 0, worker="w2")
    assert len(first) == 5 and second == []
    assert all(c.attempt == 1 for c in first)


def test_concurrent_claims_never_overlap(ledger: Ledger) -> None:
    cid = _plan(ledger, n=200, chunk_size=200)
    results: list[list[int]] = []
    lock = threading.Lock()

    def grab(name: str) -> None:
        got = [c.delivery_id for c in ledger.claim_chunk(cid, 0, worker=name)]
        with lock:
            results.append(got)

    threads = [threading.Thread(target=grab, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [i for r in results for i in r]
    assert len(all_ids) == 200 and len(set(all_ids)) == 200
    assert sum(1 for r in results if r) == 1


def test_record_outcomes_and_events(ledger: Ledger) -> None:
    cid = _plan(ledger)
    claims = ledger.claim_chunk(cid, 0, worker="w1")
    ok = Outcome(
        State.ACCEPTED,
        mx_host="mx.d0.test",
        reply_code=250,
        reply_text="2.0.0 Ok",
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        message_id="<m@x>",
    )
    assert ledger.record(claims[0], ok)
    later = utcnow() + timedelta(minutes=5)
    deferred = Outcome(State.DEFERRED, reply_code=451, reason="greylisted", next_attempt_at=later)
    assert ledger.record(claims[1], deferred)
    failed = Outcome(State.FAILED, reply_code=550, reply_status="5.1.1", reason="user_unknown")
    assert ledger.record(claims[2], failed)
    # the same claim cannot write twice
    assert not ledger.record(claims[0], failed)
    counts = ledger.state_counts(cid)
    assert counts == {"accepted": 1, "deferred": 1, "failed": 1, "claimed": 2, "planned": 5}
    assert ledger.tls_mix(cid) == {"TLSv1.3": 1}
    kinds = [e["kind"] for e in ledger.events_of(cid)]
    assert kinds == ["sent", "deferred", "failed", "failed"]
    assert '"late": true' in ledger.events_of(cid)[-1]["data_json"]
    # a deferred row is not claimable before it is due
    ledger.release(claims[3:])
    again = ledger.claim_chunk(cid, 0, worker="w2")
    assert {c.delivery_id for c in again} == {c.delivery_id for c in claims[3:]}
    assert all(c.attempt == 1 for c in again)  # release gave the attempt back
    table = {row["domain"]: row for row in ledger.domain_table(cid)}
    assert table["d0.test"]["total"] == 5 and table["d0.test"]["accepted"] == 1


def test_stale_claims_never_sent_go_back_to_planned(ledger: Ledger) -> None:
    cid = _plan(ledger)
    ledger.claim_chunk(cid, 0, worker="w1", lease=timedelta(seconds=-1))
    assert ledger.expire_stale_claims(cid) == {"released": 5, "uncertain": 0}
    assert ledger.state_counts(cid) == {"planned": 10}
    again = ledger.claim_chunk(cid, 0, worker="w2")
    assert len(again) == 5 and all(c.attempt == 2 for c in again)
    assert [e["kind"] for e in ledger.events_of(cid)] == ["released"] * 5


def test_stale_sending_rows_become_uncertain_and_are_not_reclaimed(ledger: Ledger) -> None:
    cid = _plan(ledger)
    claims = ledger.claim_chunk(cid, 0, worker="w1", lease=timedelta(seconds=-1))
    for claim in claims[:2]:
        assert ledger.mark_sending(claim)
    assert not ledger.mark_sending(claims[0])  # only once
    assert ledger.expire_stale_claims(cid) == {"released": 3, "uncertain": 2}
    assert ledger.state_counts(cid) == {"uncertain": 2, "planned": 8}
    again = ledger.claim_chunk(cid, 0, worker="w2")
    assert {c.delivery_id for c in again} == {c.delivery_id for c in claims[2:]}
    # the dead worker's late reply is kept as evidence but does not move the row
    assert not ledger.record(claims[0], Outcome(State.ACCEPTED, reply_code=250))
    assert ledger.state_counts(cid)["uncertain"] == 2


def test_outcome_after_sending_mark(ledger: Ledger) -> None:
    cid = _plan(ledger)
    claim = ledger.claim_chunk(cid, 0, worker="w1")[0]
    assert ledger.mark_sending(claim)
    assert ledger.state_counts(cid)["sending"] == 1
    assert ledger.record(claim, Outcome(State.ACCEPTED, reply_code=250))
    assert ledger.state_counts(cid)["accepted"] == 1


def test_suppressions_are_case_insensitive(ledger: Ledger) -> None:
    assert ledger.add_suppression("Mario.Rossi@Example.test", reason="user_unknown", source="smtp")
    assert not ledger.add_suppression("mario.rossi@example.test", reason="x", source="y")
    found = ledger.suppressed_among(["MARIO.ROSSI@example.test", "other@example.test"])
    assert found == {"mario.rossi@example.test"}


def test_mx_facts_remember_starttls(ledger: Ledger) -> None:
    now = utcnow()
    ledger.save_mx_facts(
        MXFacts("mx.a.test", True, True, "TLSv1.3", "X", "L2", None, now, now + timedelta(days=1))
    )
    ledger.save_mx_facts(
        MXFacts("mx.a.test", False, False, None, None, "L0", None, now, now + timedelta(days=1))
    )
    facts = ledger.get_mx_facts("mx.a.test")
    assert facts is not None
    assert facts.starttls_offered is False and facts.ever_offered_starttls is True


def test_rejections_replace(ledger: Ledger) -> None:
    cid = _plan(ledger)
    ledger.replace_rejections(cid, [{"line": 3, "address": "bad", "reason": "missing_at"}])
    ledger.replace_rejections(
        cid,
        [
            {"line": 3, "address": "bad", "reason": "missing_at"},
            {"line": 9, "address": "a@b.test", "reason": "duplicate"},
        ],
    )
    assert ledger.rejection_counts(cid) == {"missing_at": 1, "duplicate": 1}


def test_state_machine_table_is_consistent() -> None:
    assert set(TRANSITIONS) == set(State)
    for final in FINAL - {State.ACCEPTED, State.DELIVERED, State.FAILED} - PEC_AWAITING:
        assert TRANSITIONS[final] == frozenset()
    for waiting in PEC_AWAITING:  # only receipts move these on, never back to sending
        assert TRANSITIONS[waiting] <= PEC_FROM_SUBMITTED
    assert TRANSITIONS[State.FAILED] == {State.PLANNED}  # only by an operator's resend
    assert can_transition(State.PLANNED, State.CLAIMED)
    assert not can_transition(State.UNCERTAIN, State.CLAIMED)  # never resent blindly
    assert not can_transition(State.ACCEPTED, State.CLAIMED)


def test_operator_requeue_of_uncertain_and_failed(ledger: Ledger) -> None:
    cid = _plan(ledger)
    claims = ledger.claim_chunk(cid, 0, worker="w1", lease=timedelta(seconds=-1))
    ledger.mark_sending(claims[0])
    ledger.record(claims[1], Outcome(State.FAILED, reply_code=550, reason="user_unknown"))
    ledger.record(claims[2], Outcome(State.FAILED, reply_code=554, reason="spam_rejected"))
    ledger.expire_stale_claims(cid)
    assert ledger.requeue(cid, state=State.FAILED, reason="spam_rejected", operator="ops") == 1
    assert ledger.requeue(cid, state=State.UNCERTAIN, operator="ops") == 1
    counts = ledger.state_counts(cid)
    assert counts == {"planned": 9, "failed": 1}
    kinds = [e for e in ledger.events_of(cid) if e["kind"] == "resend_requested"]
    assert len(kinds) == 2 and '"by": "ops"' in kinds[0]["data_json"]
    with pytest.raises(LedgerError, match="only uncertain or failed"):
        ledger.requeue(cid, state=State.ACCEPTED, operator="ops")
