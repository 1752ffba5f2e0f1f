"""Sending modes: calendar, slots, waves and scheduled slot runs under a real Prefect server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl
import pytest
import sqlalchemy as sa

from recapito.campaign import CampaignParams, campaign_dir
from recapito.config import Settings
from recapito.ledger import Ledger
from recapito.ledger.schema import deliveries
from recapito.sandbox.check import compare_with_maildirs
from recapito.sandbox.runtime import Sandbox
from recapito.sending.calendar import SendWindow, easter_sunday, is_business_day
from recapito.sending.slots import assign_slots, slot_plan, slot_times, split_due

ROME = ZoneInfo("Europe/Rome")
SENDER = "comunicazioni@banca-esempio.test"


@pytest.fixture
def home(sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
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


def _contacts(home: Path, tag: str, n: int, zones: list[str] | None = None) -> Path:
    path = home / f"{tag}.csv"
    lines = ["id;nome;email;timezone"]
    domains = ("postaveloce.test", "mailitalia.test")
    for i in range(n):
        zone = zones[i % len(zones)] if zones else "Europe/Rome"
        lines.append(f"{tag}{i};Nome{i};{tag}.{i}@{domains[i % 2]};{zone}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _params(home: Path, tag: str, n: int, **extra: object) -> CampaignParams:
    return CampaignParams.model_validate(
        {
            "name": tag,
            "contacts": str(_contacts(home, tag, n)),
            "template": str(_template(home)),
            "sender": SENDER,
            "chunk_size": 10,
            **extra,
        }
    )


# ---- calendar and slots (plain functions) ---------------------------------------------------


def test_italian_business_calendar() -> None:
    assert easter_sunday(2026) == date(2026, 4, 5)
    assert easter_sunday(2025) == date(2025, 4, 20)
    assert not is_business_day(date(2026, 4, 6))  # Pasquetta
    assert not is_business_day(date(2026, 6, 2))  # Festa della Repubblica
    assert not is_business_day(date(2026, 5, 2))  # Saturday
    assert is_business_day(date(2026, 5, 4))
    assert not is_business_day(date(2026, 5, 4), frozenset({date(2026, 5, 4)}))


def test_window_opening_honours_quiet_hours_weekends_and_holidays() -> None:
    w = SendWindow(start=datetime(2026, 1, 1, tzinfo=UTC), end=datetime(2026, 12, 31, tzinfo=UTC))
    friday_evening = datetime(2026, 5, 8, 19, 0, tzinfo=ROME)
    assert w.next_opening(friday_evening, ROME) == datetime(2026, 5, 11, 9, 0, tzinfo=ROME)
    inside = datetime(2026, 5, 11, 11, 30, tzinfo=ROME)
    assert w.next_opening(inside, ROME) == inside
    before_easter = datetime(2026, 4, 3, 18, 30, tzinfo=ROME)  # Friday after closing
    assert w.next_opening(before_easter, ROME) == datetime(2026, 4, 7, 9, 0, tzinfo=ROME)
    new_york = ZoneInfo("America/New_York")
    # 10:00 in Rome is 04:00 in New York: that contact waits for its own 09:00
    at = datetime(2026, 5, 11, 10, 0, tzinfo=ROME)
    assert w.next_opening(at, new_york) == datetime(2026, 5, 11, 9, 0, tzinfo=new_york)


def test_slots_per_mode_and_chunks_never_span_slots() -> None:
    audience = pl.DataFrame(
        {
            "contact_id": [str(i) for i in range(10)],
            "timezone": ["Europe/Rome", "America/New_York", "", "Australia/Sydney", "Nowhere/X"]
            * 2,
        }
    )
    monday_10 = datetime(2026, 5, 11, 8, 0, tzinfo=UTC)  # 10:00 in Rome
    base = {"name": "s", "contacts": "c.csv", "template": "t", "sender": SENDER}

    waves = CampaignParams.model_validate(
        {**base, "sending_mode": "waves", "wave_percent": 30, "wave_interval_minutes": 60}
    )
    times = slot_times(audience, waves, monday_10)
    assert times is not None
    assert sorted(set(times)) == [monday_10 + timedelta(hours=k) for k in range(4)]  # 3+3+3+1

    tz = CampaignParams.model_validate({**base, "sending_mode": "contact_timezone"})
    times = slot_times(audience, tz, monday_10)
    assert times is not None
    assert times[0] == monday_10 and times[2] == monday_10 and times[4] == monday_10  # Rome
    assert times[1] == datetime(2026, 5, 11, 9, 0, tzinfo=ZoneInfo("America/New_York"))
    assert times[3] == datetime(2026, 5, 12, 9, 0, tzinfo=ZoneInfo("Australia/Sydney"))

    send_at = datetime(2026, 5, 12, 15, 30, tzinfo=ROME)
    sched = CampaignParams.model_validate(
        {**base, "sending_mode": "scheduled", "send_at": send_at.isoformat()}
    )
    assert slot_times(audience, sched, monday_10) == [send_at] * 10

    best = CampaignParams.model_validate({**base, "sending_mode": "best_time"})

    def model(frame: pl.DataFrame, ledger: object, window: object) -> pl.Series:
        # hour 03:00 UTC is quiet hours in Rome: moved to the window's opening
        picks = [datetime(2026, 5, 11, 14, 0, tzinfo=UTC), datetime(2026, 5, 12, 3, 0)]
        return pl.Series([picks[i % 2] for i in range(frame.height)])

    times = slot_times(audience, best, monday_10, best_times=model)
    assert times is not None
    assert times[0] == datetime(2026, 5, 11, 14, 0, tzinfo=UTC)
    assert times[5] == datetime(2026, 5, 12, 7, 0, tzinfo=UTC)  # 09:00 in Rome
    assert times[1] == datetime(2026, 5, 12, 9, 0, tzinfo=ZoneInfo("America/New_York"))

    planned = assign_slots(audience, waves, 2, monday_10)
    per_chunk = planned.group_by("_chunk").agg(pl.col("_slot").n_unique().alias("slots"))
    assert per_chunk["slots"].max() == 1
    assert planned["_chunk"].n_unique() == 7  # 3 waves of 3 (2 chunks each) + 1


def test_send_at_must_carry_a_time_zone() -> None:
    base = {"name": "s", "contacts": "c.csv", "template": "t", "sender": SENDER}
    with pytest.raises(ValueError, match="timezone"):
        CampaignParams.model_validate(
            {**base, "sending_mode": "scheduled", "send_at": "2026-05-12T15:30:00"}
        )
    with pytest.raises(ValueError, match="needs send_at"):
        CampaignParams.model_validate({**base, "sending_mode": "scheduled"})


# ---- under Prefect, against the sandbox ---------------------------------------------------------


def _sent_at(name: str) -> dict[int, datetime]:
    """First attempt time of each chunk's deliveries (UTC)."""
    ledger = Ledger(Settings.load().db_url)
    try:
        camp = ledger.get_campaign(name)
        assert camp is not None
        with ledger.engine.connect() as conn:
            rows = conn.execute(
                sa.select(deliveries.c.chunk, sa.func.min(deliveries.c.first_attempt_at))
                .where(deliveries.c.campaign_id == camp.id)
                .group_by(deliveries.c.chunk)
            ).all()
    finally:
        ledger.close()
    return {int(c): (t if t.tzinfo else t.replace(tzinfo=UTC)) for c, t in rows if t}


def test_waves_wait_in_the_flow_and_never_resend(
    prefect_harness: None, home: Path, sandbox: Sandbox
) -> None:
    from flows.campaign import campaign_flow

    params = _params(
        home,
        "waves-inflow",
        6,
        sending_mode="waves",
        wave_size=2,
        wave_interval_minutes=0.05,  # 3 s
        slot_dispatch="in_flow",
    )
    report = campaign_flow(params)
    assert report["funnel"]["accepted"] == 6 and report["status"] == "completed"
    sent = _sent_at("waves-inflow")
    assert sorted(sent) == [0, 1, 2]
    plan = slot_plan(campaign_dir(Settings.load(), "waves-inflow") / "audience.parquet")
    slots = sorted(plan)
    assert [plan[at] for at in slots] == [[0], [1], [2]]
    for chunk, at in enumerate(slots):  # no wave before its time
        assert sent[chunk] >= datetime.fromisoformat(at) - timedelta(seconds=1)
    assert (sent[2] - sent[0]).total_seconds() >= 4  # waves 3 s apart
    again = campaign_flow(params)
    assert again["funnel"]["accepted"] == 6
    ledger = Ledger(Settings.load().db_url)
    try:
        check = compare_with_maildirs(ledger, "waves-inflow", sandbox.maildir_root)
    finally:
        ledger.close()
    assert (check["stored"], check["missing"], check["duplicates"]) == (6, 0, 0)


def test_future_slots_become_scheduled_runs_of_the_slot_deployment(
    prefect_harness: None, home: Path, sandbox: Sandbox
) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectAlreadyExists

    from flows.campaign import campaign_flow
    from flows.campaign_slot import campaign_slot_flow

    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name="recapito-test", type="process"))
        flow_id = client.create_flow_from_name("campaign-slot")
        deployment_id = client.create_deployment(
            flow_id,
            "campaign-slot",
            entrypoint="flows/campaign_slot.py:campaign_slot_flow",
            work_pool_name="recapito-test",
        )
    params = _params(
        home,
        "waves-deploy",
        6,
        sending_mode="waves",
        wave_size=2,
        wave_interval_minutes=60,
        slot_dispatch="deployment",
    )
    report = campaign_flow(params)
    assert report["funnel"]["accepted"] == 2 and report["funnel"]["pending"] == 4
    assert report["status"] == "scheduled"
    campaign_flow(params)  # a re-run schedules nothing twice and sends nothing more

    audience = campaign_dir(Settings.load(), "waves-deploy") / "audience.parquet"
    plan = slot_plan(audience)
    assert len(plan) == 3
    _due, future = split_due(plan, datetime.now(UTC))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    assert len(runs) == 2
    assert all(r.state is not None and r.state.is_scheduled() for r in runs)
    assert sorted(r.parameters["slot"] for r in runs) == sorted(future)
    for run in runs:
        expected = datetime.fromisoformat(run.parameters["slot"])
        assert run.expected_start_time is not None
        assert abs((run.expected_start_time - expected).total_seconds()) < 1

    first_future = sorted(future)[0]
    slot_report = campaign_slot_flow(params, first_future)
    assert slot_report["funnel"]["accepted"] == 4 and slot_report["funnel"]["pending"] == 2
    assert slot_report["status"] == "scheduled"
    again = campaign_slot_flow(params, first_future)  # a repeated slot run sends nothing
    assert again["funnel"]["accepted"] == 4
    ledger = Ledger(Settings.load().db_url)
    try:
        check = compare_with_maildirs(ledger, "waves-deploy", sandbox.maildir_root)
    finally:
        ledger.close()
    assert (check["stored"], check["duplicates"]) == (4, 0)


def test_contact_time_zone_slots_group_chunks_by_opening(home: Path) -> None:
    """Preparing a contact-time-zone campaign: every chunk belongs to one opening time."""
    from recapito.campaign import prepare

    zones = ["Europe/Rome", "America/Los_Angeles", "Asia/Tokyo", "Australia/Sydney"]
    path = _contacts(home, "tzprep", 8, zones)
    params = CampaignParams(
        name="tzprep",
        contacts=str(path),
        template=str(_template(home)),
        sender=SENDER,
        chunk_size=10,
        sending_mode="contact_timezone",
        send_window="09:00-18:00",
    )
    prepared = prepare(params, Settings.load())
    audience = pl.read_parquet(prepared.audience_path)
    window = SendWindow(start=datetime.now(UTC), end=datetime.now(UTC))
    for row in audience.iter_rows(named=True):
        tz = ZoneInfo(row["timezone"])
        local = row["_slot"].astimezone(tz)
        assert time(9, 0) <= local.time() < time(18, 0)
        assert is_business_day(local.date())
        assert window.allowed(row["_slot"], tz)
    per_chunk = audience.group_by("_chunk").agg(pl.col("_slot").n_unique().alias("n"))
    assert per_chunk["n"].max() == 1


def test_best_time_campaign_uses_the_send_time_model(home: Path) -> None:
    """With recapito.sendtime installed, best_time slots come from its model (no history
    here: each contact's fallback time), inside the window and on business days."""
    from recapito.campaign import prepare

    pytest.importorskip("recapito.sendtime")
    zones = ["Europe/Rome", "America/New_York"]
    params = CampaignParams(
        name="besttime",
        contacts=str(_contacts(home, "besttime", 6, zones)),
        template=str(_template(home)),
        sender=SENDER,
        sending_mode="best_time",
        best_time_fallback="11:00",
    )
    audience = pl.read_parquet(prepare(params, Settings.load()).audience_path)
    for row in audience.iter_rows(named=True):
        local = row["_slot"].astimezone(ZoneInfo(row["timezone"]))
        assert time(9, 0) <= local.time() < time(18, 0) and is_business_day(local.date())
        assert row["_slot"] >= datetime.now(UTC) - timedelta(minutes=5)
