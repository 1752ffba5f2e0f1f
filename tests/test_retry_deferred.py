"""Deferred mail retried by the scheduled retry-deferred flow; automatic chunk sizing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import pytest
import sqlalchemy as sa
import yaml

from recapito.campaign import CampaignParams, chunk_size_for, prepare
from recapito.config import Settings
from recapito.ledger import Ledger, Outcome, PlannedDelivery, State
from recapito.ledger.schema import deliveries
from recapito.ledger.store import utcnow
from recapito.sandbox.check import compare_with_maildirs
from recapito.sandbox.runtime import Sandbox
from recapito.sandbox.world import GREYLIST_DELAY_SECONDS

ROOT = Path(__file__).parents[1]
SENDER = "comunicazioni@banca-esempio.test"


@pytest.fixture
def home(sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A RECAPITO_HOME of its own, pointed at the shared sandbox."""
    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path))
    monkeypatch.delenv("RECAPITO_DB_URL", raising=False)
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    yield tmp_path


def _template(home: Path) -> Path:
    tpl = home / "tpl"
    tpl.mkdir(exist_ok=True)
    (tpl / "template.toml").write_text('subject = "Ciao {{ nome }}"\n')
    (tpl / "body.html").write_text("<p>Ciao {{ nome }}</p>")
    return tpl


def _task_runs(flow_run_id: UUID) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client._client.post(
            "/task_runs/count", json={"flow_runs": {"id": {"any_": [str(flow_run_id)]}}}
        )
        response.raise_for_status()
        return int(response.json())


def _make_due(ledger: Ledger, campaign_id: int) -> int:
    """Time passes: every deferred row of the campaign is due now."""
    with ledger.engine.begin() as conn:
        result = conn.execute(
            sa.update(deliveries)
            .where(
                sa.and_(
                    deliveries.c.campaign_id == campaign_id,
                    deliveries.c.state == State.DEFERRED.value,
                )
            )
            .values(next_attempt_at=sa.func.datetime("now", "-1 second"))
        )
        return int(result.rowcount)


@pytest.mark.prefect
def test_greylisted_mail_goes_out_with_the_retry_deferred_flow(
    prefect_harness: None, home: Path, sandbox: Sandbox
) -> None:
    from flows.campaign import campaign_flow
    from flows.retry_deferred import retry_deferred_flow

    contacts = home / "grey.csv"
    contacts.write_text(
        "email;nome\n"
        "gina.retryflow@webposta.test;Gina\n"
        "gino.retryflow@webposta.test;Gino\n"
        "anna.retryflow@postaveloce.test;Anna\n"
        "sara.cessato.retryflow@comune-esempio.test;Sara\n",
        encoding="utf-8",
    )
    params = CampaignParams(
        name="grey-scheduled",
        contacts=str(contacts),
        template=str(_template(home)),
        sender=SENDER,
    )  # retry_after_seconds 300: nothing is retried inside the campaign run
    first = campaign_flow(params)
    funnel = first["funnel"]
    assert (funnel["accepted"], funnel["deferred"], funnel["failed"]) == (1, 2, 1)
    assert first["status"] == "waiting_retry"

    # nothing due yet: the scheduled run finds nothing, with one task run, quickly
    started = time.monotonic()
    state = retry_deferred_flow(return_state=True)
    idle = state.result()
    assert idle["campaigns"] == {}
    assert time.monotonic() - started < 30
    assert _task_runs(state.state_details.flow_run_id) == 1

    settings = Settings.load()
    ledger = Ledger(settings.db_url)
    try:
        camp = ledger.get_campaign("grey-scheduled")
        assert camp is not None
        time.sleep(GREYLIST_DELAY_SECONDS + 0.2)  # the greylisting MX now takes the pair
        assert _make_due(ledger, camp.id) == 2
        done = retry_deferred_flow()
        assert done["campaigns"]["grey-scheduled"]["claimed"] == 2
        assert done["campaigns"]["grey-scheduled"].get("accepted") == 2
        assert done["statuses"] == {"grey-scheduled": "completed"}
        states = ledger.state_counts(camp.id)
        assert (states.get("accepted"), states.get("failed")) == (3, 1)
        assert not states.get("deferred")
        check = compare_with_maildirs(ledger, "grey-scheduled", sandbox.maildir_root)
        assert (check["accepted"], check["stored"], check["missing"]) == (3, 3, 0)
        assert (check["duplicates"], check["unexpected"]) == (0, 0)
        # again: nothing is due, nothing is sent twice
        assert retry_deferred_flow()["campaigns"] == {}
        check = compare_with_maildirs(ledger, "grey-scheduled", sandbox.maildir_root)
        assert (check["stored"], check["duplicates"]) == (3, 0)
        # the campaign's own re-run agrees: nothing left to send
        assert campaign_flow(params)["funnel"]["accepted"] == 3
        check = compare_with_maildirs(ledger, "grey-scheduled", sandbox.maildir_root)
        assert (check["stored"], check["duplicates"]) == (3, 0)
    finally:
        ledger.close()


@pytest.mark.prefect
def test_retry_deferred_for_one_campaign_leaves_the_others(
    prefect_harness: None, home: Path, sandbox: Sandbox
) -> None:
    from flows.campaign import campaign_flow
    from flows.retry_deferred import retry_deferred_flow

    names = ("grey-one", "grey-other")
    for name in names:
        contacts = home / f"{name}.csv"
        contacts.write_text(f"email;nome\n{name}.x@webposta.test;Pia\n", encoding="utf-8")
        campaign_flow(
            CampaignParams(
                name=name, contacts=str(contacts), template=str(_template(home)), sender=SENDER
            )
        )
    ledger = Ledger(Settings.load().db_url)
    try:
        time.sleep(GREYLIST_DELAY_SECONDS + 0.2)
        ids = {}
        for name in names:
            camp = ledger.get_campaign(name)
            assert camp is not None
            ids[name] = camp.id
            assert _make_due(ledger, camp.id) == 1
        result = retry_deferred_flow(campaign="grey-one")
        assert set(result["campaigns"]) == {"grey-one"}
        assert ledger.state_counts(ids["grey-one"]) == {"accepted": 1}
        assert ledger.state_counts(ids["grey-other"]) == {"deferred": 1}
    finally:
        ledger.close()


def test_a_retry_claim_takes_due_deferred_rows_only(tmp_path: Path) -> None:
    """Planned rows belong to the campaign's run; sent, failed, uncertain rows are settled."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        camp = ledger.ensure_campaign("c", sender=SENDER, template_hash="h" * 64, params={})
        ledger.plan(
            camp.id, [PlannedDelivery(str(i), f"u{i}@d.test", "d.test", 0) for i in range(5)]
        )
        claims = ledger.claim_chunk(camp.id, 0, worker="w")
        ledger.record(claims[0], Outcome(State.ACCEPTED, reply_code=250))
        ledger.record(claims[1], Outcome(State.FAILED, reply_code=550, reason="user_unknown"))
        now = utcnow()
        soon = Outcome(State.DEFERRED, reply_code=451, next_attempt_at=now + timedelta(hours=1))
        due = Outcome(State.DEFERRED, reply_code=451, next_attempt_at=now - timedelta(seconds=10))
        ledger.record(claims[2], soon)
        ledger.record(claims[3], due)
        ledger.release([claims[4]])  # back to planned
        assert ledger.campaigns_with_due_deferred() == [camp.id]
        taken = ledger.claim_chunk(camp.id, 0, worker="retry", only_deferred=True)
        assert [c.delivery_id for c in taken] == [claims[3].delivery_id]
        assert ledger.claim_chunk(camp.id, 0, worker="retry", only_deferred=True) == []
        assert ledger.state_counts(camp.id)["planned"] == 1
    finally:
        ledger.close()


def test_deployment_runs_every_five_minutes_in_rome_time() -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["name"] == "retry-deferred"]
    (schedule,) = deployment["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.timezone == "Europe/Rome" and cron.cron == "*/5 * * * *"
    flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
    assert flow.name == "retry-deferred"


# ---- automatic chunk sizing (DESIGN §4: ≤ ~1–2k task runs per flow run) -----------------


@pytest.mark.parametrize(
    ("recipients", "size"),
    [(0, 1_000), (5, 1_000), (999_000, 1_000), (1_500_001, 1_001), (500_000_000, 50_000)],
)
def test_automatic_chunk_size(recipients: int, size: int) -> None:
    assert chunk_size_for(recipients) == size


def test_half_a_million_recipients_make_few_chunks_and_task_runs() -> None:
    recipients = 500_000
    chunks = -(-recipients // chunk_size_for(recipients))
    assert chunks <= 1_500
    # the campaign flow: target-and-plan + one task per chunk + due-retries + report
    assert 1 + chunks + 1 + 1 <= 2_000


def test_explicit_chunk_size_is_kept() -> None:
    assert chunk_size_for(500_000, 200) == 200
    params = CampaignParams(name="x", contacts="c.csv", template="t", sender=SENDER)
    assert params.chunk_size is None
    with pytest.raises(ValueError):
        CampaignParams(name="x", contacts="c.csv", template="t", sender=SENDER, chunk_size=5)


def test_prepare_sizes_chunks_automatically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path))
    monkeypatch.delenv("RECAPITO_DB_URL", raising=False)
    contacts = tmp_path / "c.csv"
    rows = [f"u{i}@postaveloce.test;N{i}" for i in range(2_500)]
    contacts.write_text("email;nome\n" + "\n".join(rows) + "\n", encoding="utf-8")
    base = {"contacts": str(contacts), "template": str(_template(tmp_path)), "sender": SENDER}
    auto = prepare(CampaignParams(name="auto", **base), Settings.load())
    assert sorted(auto.chunks) == [0, 1, 2] and auto.counts["chunk_size"] == 1_000
    explicit = prepare(CampaignParams(name="explicit", chunk_size=500, **base), Settings.load())
    assert len(explicit.chunks) == 5 and explicit.counts["chunk_size"] == 500


@pytest.mark.prefect
def test_campaign_flow_task_runs_are_prepare_chunks_and_report(
    prefect_harness: None, home: Path
) -> None:
    from flows.campaign import campaign_flow

    contacts = home / "many.csv"
    rows = [f"t{i}.count@postaveloce.test;N{i}" for i in range(30)]
    contacts.write_text("email;nome\n" + "\n".join(rows) + "\n", encoding="utf-8")
    params = CampaignParams(
        name="count-runs",
        contacts=str(contacts),
        template=str(_template(home)),
        sender=SENDER,
        chunk_size=10,
    )
    state = campaign_flow(params, return_state=True)
    assert state.result()["funnel"]["accepted"] == 30
    # target-and-plan, 3 deliver-chunk, due-retries, campaign-report
    assert _task_runs(state.state_details.flow_run_id) == 1 + 3 + 1 + 1
