"""Best time per contact (recapito.sendtime): exposure correction, shrinkage, the window in
local time (holidays, DST), exploration, machine opens, the ledger loader, speed."""

from __future__ import annotations

import time as clock
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa

from recapito.errors import InputError
from recapito.ledger import Ledger, Outcome, PlannedDelivery, State
from recapito.ledger.schema import events, tracking_hits
from recapito.sendtime import (
    BestTimeModel,
    EngagementHistory,
    SendWindow,
    best_times,
    easter,
    italian_holidays,
    next_slots,
    plan_best_times,
    profiles,
)

ROME = ZoneInfo("Europe/Rome")
NOW = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)  # a Monday, 01:00 in Rome
WIDE = SendWindow(start=time(8), end=time(21))
WEEK0 = date(2026, 1, 5)  # a Monday


def how(day: int, hour: int) -> int:
    return day * 24 + hour


class Builder:
    """Sends at local Rome hours of the week (in past weeks), engaged or not, with optional
    machine opens and scanner clicks."""

    def __init__(self) -> None:
        self.sends: list[dict[str, object]] = []
        self.hits: list[dict[str, object]] = []

    def send(
        self,
        contact: str,
        day: int,
        hour: int,
        *,
        engaged: bool = False,
        week: int = 0,
        delay: timedelta = timedelta(minutes=20),
        kind: str = "open",
        machine: bool = False,
        scanner: bool = False,
    ) -> None:
        local = datetime.combine(WEEK0 + timedelta(weeks=week, days=day), time(hour), ROME)
        at = local.astimezone(UTC)
        delivery = len(self.sends) + 1
        self.sends.append({"contact_id": contact, "delivery_id": delivery, "sent_at": at})
        if engaged:
            self.hits.append(
                {"delivery_id": delivery, "at": at + delay, "kind": kind, "class": "human"}
            )
        if machine:
            self.hits.append(
                {"delivery_id": delivery, "at": at + timedelta(minutes=2), "kind": "open"}
                | {"class": "machine"}
            )
        if scanner:
            self.hits.append(
                {"delivery_id": delivery, "at": at + timedelta(seconds=5), "kind": "click"}
                | {"class": "scanner"}
            )

    def population(self, n: int, rate_at: dict[int, float] | None = None, seg: str = "p") -> None:
        """``n`` contacts sent once at every weekday hour 08..20 over the weeks, engaged at
        ``rate_at`` (hour of the week -> share) else 20 % (deterministically: a flat profile
        is flat)."""
        for i in range(n):
            for w, (day, hour) in enumerate((d, h) for d in range(5) for h in range(8, 21)):
                rate = (rate_at or {}).get(how(day, hour), 0.2)
                engaged = (i * 37 + w * 11) % 100 < rate * 100
                self.send(f"{seg}{i}", day, hour, engaged=engaged, week=w % 8)

    def history(self) -> EngagementHistory:
        sends = pl.DataFrame(
            {
                "contact_id": [s["contact_id"] for s in self.sends],
                "delivery_id": [s["delivery_id"] for s in self.sends],
                "sent_at": [s["sent_at"] for s in self.sends],
            }
        )
        hits = (
            pl.DataFrame(self.hits)
            if self.hits
            else pl.DataFrame(
                schema={"delivery_id": pl.Int64, "at": pl.Datetime("us", "UTC")}
                | {"kind": pl.String, "class": pl.String}
            )
        )
        return EngagementHistory.from_frames(sends, hits)


def plan_for(
    b: Builder, contacts: list[str], segments: list[str] | None = None, **kwargs: object
) -> pl.DataFrame:
    audience = pl.DataFrame({"contact_id": contacts})
    if segments is not None:
        audience = audience.with_columns(pl.Series("segment", segments))
    return plan_best_times(
        audience,
        b.history(),
        kwargs.pop("window", WIDE),  # type: ignore[arg-type]
        campaign="c1",
        now=NOW,
        explore=0.0,
        **kwargs,  # type: ignore[arg-type]
    )


# --- the model ---------------------------------------------------------------------------


def test_exposure_correction_rate_beats_raw_count() -> None:
    b = Builder()
    b.population(40)
    # many sends at Monday 09:00 with some opens, few at Thursday 16:00 all opened
    for w in range(12):
        b.send("x", 0, 9, engaged=w < 5, week=w)
    for w in range(4):
        b.send("x", 3, 16, engaged=True, week=w)
    row = plan_for(b, ["x"]).row(0, named=True)
    assert row["reason"] == "model"
    assert row["hour_of_week"] == how(3, 16)  # 4/4 beats 5/12 though 5 opens > 4


def test_late_opens_at_an_unexposed_hour_show_no_preference_for_it() -> None:
    b = Builder()
    b.population(40)
    # only ever sent at 09:00, always opened at 19:00 (10 h later): no evidence about 19:00
    for w in range(10):
        b.send("y", 1, 9, engaged=True, week=w, delay=timedelta(hours=10))
    row = plan_for(b, ["y"]).row(0, named=True)
    assert row["hour_of_week"] % 24 != 19
    # and the 09:00 sends count as not engaged (the open came long after)
    labelled = b.history().labelled(BestTimeModel().response_window)
    assert not labelled.filter(pl.col("contact_id") == "y")["engaged"].any()


def test_shrinkage_toward_segment_prior() -> None:
    b = Builder()
    tuesday_10 = how(1, 10)
    b.population(60, {tuesday_10: 0.9, how(1, 9): 0.5, how(1, 11): 0.5}, seg="a")
    b.population(60, {how(3, 14): 0.9}, seg="b")
    b.send("thin", 2, 15, engaged=True)  # one lucky open on Wednesday 15:00
    for w in range(10):
        b.send("strong", 2, 15, engaged=True, week=w)
        b.send("strong", 1, 10, engaged=False, week=w)
    # segments are read from the audience: the populations are part of it
    people = [f"a{i}" for i in range(60)] + [f"b{i}" for i in range(60)]
    contacts = ["thin", "strong", "new_a", "new_b", *people]
    segments = ["a", "a", "a", "b"] + ["a"] * 60 + ["b"] * 60
    plan = plan_for(b, contacts, segments)
    rows = {r["contact_id"]: r for r in plan.iter_rows(named=True)}
    assert rows["thin"]["hour_of_week"] == tuesday_10  # one open does not beat the segment
    assert rows["strong"]["hour_of_week"] == how(2, 15)  # ten do
    assert rows["new_a"]["reason"] == "prior" and rows["new_a"]["hour_of_week"] == tuesday_10
    assert rows["new_b"]["reason"] == "prior" and rows["new_b"]["hour_of_week"] == how(3, 14)


def test_machine_opens_and_scanner_clicks_are_ignored() -> None:
    clean, noisy = Builder(), Builder()
    rng = np.random.default_rng(3)
    for b in (clean, noisy):
        b.population(30)
    for w in range(8):
        for d, h in ((0, 9), (2, 17), (4, 12)):
            engaged = bool(rng.random() < 0.4)
            clean.send("m", d, h, engaged=engaged, week=w)
            # MPP-like: every message 'opened' by a machine at once, plus scanner clicks
            noisy.send("m", d, h, engaged=engaged, week=w, machine=True, scanner=(d, h) == (0, 9))
    a = plan_for(clean, ["m", "p1"])
    c = plan_for(noisy, ["m", "p1"])
    assert a["hour_of_week"].to_list() == c["hour_of_week"].to_list()
    assert np.allclose(a["score"].to_numpy(), c["score"].to_numpy(), rtol=1e-12)


def test_clicks_count_as_engagement() -> None:
    b = Builder()
    b.population(30)
    for w in range(6):
        b.send("k", 4, 18, engaged=True, kind="click", week=w)
        b.send("k", 0, 8, week=w)
    assert plan_for(b, ["k"])["hour_of_week"][0] == how(4, 18)


def test_fallback_when_history_is_thin_or_missing() -> None:
    audience = pl.DataFrame({"contact_id": ["a", "b"], "timezone": ["Europe/Rome", None]})
    plan = plan_best_times(audience, None, SendWindow(), campaign="c", now=NOW, explore=0)
    assert plan["reason"].to_list() == ["fallback", "fallback"]
    # Monday 2 March 2026, 10:00 in Rome (CET)
    assert plan["send_at"].to_list() == [datetime(2026, 3, 2, 9, tzinfo=UTC)] * 2
    b = Builder()
    b.send("a", 0, 9, engaged=True)
    thin = plan_best_times(audience, b.history(), SendWindow(), campaign="c", now=NOW, explore=0)
    assert set(thin["reason"]) == {"fallback"}


def test_plan_keeps_audience_order_duplicates_and_unknown_contacts() -> None:
    b = Builder()
    b.population(10)
    audience = pl.DataFrame({"contact_id": ["zz", "p1", "p1", "p3"]})
    times = best_times(audience, b.history(), WIDE, campaign="c", now=NOW, explore=0.0)
    assert times.len() == 4 and times.dtype == pl.Datetime("us", "UTC")
    assert times[1] == times[2]
    assert all(t >= NOW for t in times)


def test_profiles_are_exposure_corrected() -> None:
    b = Builder()
    for w in range(20):
        b.send(f"u{w}", 0, 9, engaged=w < 2)  # lots of sends at 9, 10 % engaged
    for w in range(4):
        b.send(f"v{w}", 0, 15, engaged=w < 2)  # few at 15, 50 % engaged
    prof = profiles(b.history(), model=BestTimeModel(neighbour_weights=(), same_hour_weight=0))
    assert prof.engaged[how(0, 9)] == prof.engaged[how(0, 15)] == 2
    assert prof.global_rate[how(0, 15)] > prof.global_rate[how(0, 9)]
    assert prof.frame().height == 168


# --- exploration ------------------------------------------------------------------------


def test_exploration_is_deterministic_per_contact_and_campaign() -> None:
    b = Builder()
    b.population(5)
    audience = pl.DataFrame({"contact_id": [f"c{i}" for i in range(2000)]})
    hist = b.history()

    def plan(campaign: str, explore: float) -> pl.DataFrame:
        return plan_best_times(audience, hist, WIDE, campaign=campaign, now=NOW, explore=explore)

    first, again, other = plan("spring", 0.3), plan("spring", 0.3), plan("autumn", 0.3)
    assert first.equals(again)
    explored = first["reason"] == "explore"
    assert 0.25 < explored.mean() < 0.35  # type: ignore[operator]
    assert not explored.equals(other["reason"] == "explore")
    allowed = np.flatnonzero(WIDE.allowed_hours())
    assert set(first.filter(explored)["hour_of_week"].to_list()) <= set(allowed.tolist())
    assert len(set(first.filter(explored)["hour_of_week"].to_list())) > 30  # spread out
    assert (plan("spring", 0.0)["reason"] != "explore").all()
    assert (plan("spring", 1.0)["reason"] == "explore").all()
    # a larger share explores a superset of the contacts (same draws)
    wider = plan("spring", 0.5)["reason"] == "explore"
    assert (wider | ~explored).all()
    with pytest.raises(InputError):
        plan("spring", 1.5)


def test_exploration_draws_are_pinned() -> None:
    """Our own hash: the same draws on any machine and library version (a campaign planned
    again after an upgrade explores the same contacts)."""
    from recapito.sendtime.model import _explore_draws

    u, v = _explore_draws(pl.Series(["C0000001", "ünïcode", ""]), "spring")
    assert np.allclose(u, [0.49478826132601905, 0.08506763447181775, 0.7586427493975398])
    assert np.allclose(v, [0.45441004057145096, 0.9561865355313519, 0.6545813527359132])


# --- the window -------------------------------------------------------------------------


def test_window_hours_and_validation() -> None:
    w = SendWindow()
    assert w.allowed_hours().sum() == 45  # Mon-Fri 09-18
    assert w.allowed_hours()[how(0, 9)] and not w.allowed_hours()[how(0, 18)]
    assert not w.allowed_hours()[how(5, 10)]
    half = SendWindow(start=time(9, 30), end=time(12, 15))
    lo, hi = half.slot_bounds()
    assert (lo[how(0, 9)], hi[how(0, 9)]) == (570, 600)
    assert (lo[how(0, 12)], hi[how(0, 12)]) == (720, 735)
    assert SendWindow(start=time(14), fallback=time(10)).fallback_hour() == 14
    with pytest.raises(InputError):
        SendWindow(start=time(18), end=time(9))
    with pytest.raises(InputError):
        SendWindow(days=(7,))
    with pytest.raises(InputError):
        SendWindow(timezone="Mars/Olympus")


def _slot(hour_of_week: int, zone: str, now: datetime, window: SendWindow) -> datetime:
    result = next_slots(np.array([hour_of_week]), pl.Series([zone]), window, now)[0]
    assert isinstance(result, datetime)
    return result


def test_next_slot_in_local_time_across_zones_and_dst() -> None:
    w = SendWindow(start=time(8), end=time(20))
    monday = datetime(2026, 3, 23, 12, tzinfo=UTC)
    # Rome is still on CET (UTC+1) until Sunday 29 March 2026
    assert _slot(how(1, 10), "Europe/Rome", monday, w) == datetime(2026, 3, 24, 9, tzinfo=UTC)
    # New York is already on EDT (UTC-4) since 8 March
    expected = datetime(2026, 3, 24, 14, tzinfo=UTC)
    assert _slot(how(1, 10), "America/New_York", monday, w) == expected
    # the next Monday 10:00 in Rome is after the change: CEST, UTC+2
    sunday = datetime(2026, 3, 29, 12, tzinfo=UTC)
    assert _slot(how(0, 10), "Europe/Rome", sunday, w) == datetime(2026, 3, 30, 8, tzinfo=UTC)
    # autumn: back to CET on 25 October 2026
    assert _slot(how(0, 10), "Europe/Rome", datetime(2026, 10, 25, tzinfo=UTC), w) == datetime(
        2026, 10, 26, 9, tzinfo=UTC
    )


def test_next_slot_same_day_passed_slot_and_nonexistent_time() -> None:
    w = SendWindow(start=time(8), end=time(20))
    inside = datetime(2026, 3, 24, 9, 25, tzinfo=UTC)  # Tuesday 10:25 in Rome
    assert _slot(how(1, 10), "Europe/Rome", inside, w) == inside  # the slot is open: now
    after = datetime(2026, 3, 24, 10, 0, tzinfo=UTC)  # 11:00: Tuesday 10:00 has passed
    assert _slot(how(1, 10), "Europe/Rome", after, w) == datetime(2026, 3, 31, 8, tzinfo=UTC)
    night = SendWindow(days=tuple(range(7)), start=time(0), end=time(0))
    # 02:30 on 29 March 2026 does not exist in Rome: 03:00 CEST
    saturday = datetime(2026, 3, 28, 12, tzinfo=UTC)
    assert _slot(how(6, 2), "Europe/Rome", saturday, night) == datetime(2026, 3, 29, 1, tzinfo=UTC)


def test_holidays_move_to_the_next_open_week() -> None:
    assert easter(2026) == date(2026, 4, 5)
    holidays = italian_holidays([2026])
    assert date(2026, 4, 6) in holidays and date(2026, 12, 8) in holidays
    w = SendWindow(holidays=holidays)
    friday = datetime(2026, 4, 3, 12, tzinfo=UTC)
    # Monday 6 April is Pasquetta: the Monday after, 10:00 CEST
    assert _slot(how(0, 10), "Europe/Rome", friday, w) == datetime(2026, 4, 13, 8, tzinfo=UTC)
    # the fallback goes to the first open day
    assert _slot(-1, "Europe/Rome", friday, w) == datetime(2026, 4, 7, 8, tzinfo=UTC)


def test_contact_zones_fall_back_to_the_default() -> None:
    w = SendWindow()
    audience = pl.DataFrame({"timezone": ["Europe/London", "", None, "Not/AZone", " Asia/Tokyo"]})
    assert w.contact_zones(audience).to_list() == [
        "Europe/London",
        "Europe/Rome",
        "Europe/Rome",
        "Europe/Rome",
        "Asia/Tokyo",
    ]
    assert w.contact_zones(pl.DataFrame({"x": [1]})).to_list() == ["Europe/Rome"]
    with pytest.raises(InputError):
        next_slots(np.array([10]), pl.Series(["Europe/Rome"]), w, datetime(2026, 1, 1))


def test_history_hours_are_read_in_the_contacts_zone() -> None:
    b = Builder()
    b.population(20)
    # sent Thursday 16:00 Rome = 15:00 UTC = 10:00 New York: engaged there every time
    for w in range(8):
        b.send("ny", 3, 16, engaged=True, week=w)
    audience = pl.DataFrame({"contact_id": ["ny"], "timezone": ["America/New_York"]})
    plan = plan_best_times(audience, b.history(), WIDE, campaign="c", now=NOW, explore=0)
    assert plan["hour_of_week"][0] == how(3, 10)  # Thursday 10:00 local
    assert plan["send_at"][0].astimezone(ZoneInfo("America/New_York")).hour == 10


# --- the ledger -------------------------------------------------------------------------


def test_history_from_ledger(tmp_path: object) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    camp = ledger.ensure_campaign("past", sender="a@b.test", template_hash="h" * 64, params={})
    ledger.plan(camp.id, [PlannedDelivery(f"c{i}", f"u{i}@d.test", "d.test", 0) for i in range(4)])
    claims = ledger.claim_chunk(camp.id, 0, worker="t")
    for claim in claims[:3]:
        ledger.record(claim, Outcome(State.ACCEPTED, reply_code=250))
    ledger.record(claims[3], Outcome(State.FAILED, reply_code=550, reason="user_unknown"))
    by_contact = {c.contact_id: c.delivery_id for c in claims}
    sent = datetime(2026, 2, 3, 9, 0, tzinfo=UTC)
    with ledger.engine.begin() as conn:
        conn.execute(events.update().where(events.c.kind == "sent").values(at=sent))
        conn.execute(sa.text("update deliveries set state = 'bounced' where contact_id = 'c2'"))
        for contact, klass, minutes in (("c0", "human", 30), ("c1", "machine", 1)):
            conn.execute(
                tracking_hits.insert().values(
                    campaign_id=camp.id,
                    delivery_id=by_contact[contact],
                    kind="open",
                    **{"class": klass},
                    at=sent + timedelta(minutes=minutes),
                    method="GET",
                )
            )
    hist = EngagementHistory.from_ledger(ledger)
    labelled = hist.labelled(timedelta(hours=3)).sort("contact_id")
    assert labelled["contact_id"].to_list() == ["c0", "c1"]  # c2 bounced, c3 failed
    assert labelled["engaged"].to_list() == [True, False]  # the machine open is no engagement
    assert labelled["sent_at"][0] == sent
    assert EngagementHistory.from_ledger(ledger, since=sent + timedelta(days=1)).sends.height == 0
    audience = pl.DataFrame({"contact_id": ["c0", "c9"]})
    times = best_times(audience, ledger, SendWindow(), campaign="next", now=NOW)
    assert times.len() == 2 and times.null_count() == 0
    ledger.close()


# --- speed ------------------------------------------------------------------------------


def test_half_a_million_contacts_in_seconds() -> None:
    n, per = 500_000, 2
    rng = np.random.default_rng(0)
    ids = pl.Series("contact_id", [f"K{i}" for i in range(n)])
    contact = np.repeat(np.arange(n), per)
    base = np.datetime64("2026-01-05T07:00:00", "us")
    offsets = rng.integers(0, 60 * 24 * 42, contact.size).astype("timedelta64[m]")
    sends = pl.DataFrame(
        {
            "contact_id": ids.gather(contact),
            "delivery_id": np.arange(contact.size, dtype=np.int64),
            "sent_at": base + offsets,
        }
    )
    engaged = rng.random(contact.size) < 0.2
    hits = pl.DataFrame(
        {
            "delivery_id": np.flatnonzero(engaged).astype(np.int64),
            "at": (base + offsets[engaged]) + np.timedelta64(15, "m"),
            "kind": "open",
            "class": "human",
        }
    )
    history = EngagementHistory.from_frames(sends, hits)
    audience = pl.DataFrame(
        {
            "contact_id": ids,
            "segment": rng.choice(["a", "b", "c"], n),
            "timezone": rng.choice(["Europe/Rome", "Europe/London"], n),
        }
    )
    started = clock.perf_counter()
    times = best_times(audience, history, SendWindow(), campaign="big", now=NOW)
    elapsed = clock.perf_counter() - started
    assert times.len() == n and times.null_count() == 0
    assert elapsed < 10, f"{elapsed:.1f} s for 500k contacts"
