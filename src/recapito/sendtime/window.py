"""A campaign's sending window in each contact's local time, and the slots inside it.

Hours of the week are numbered in **local** time: ``0`` is Monday 00:00–01:00, ``24 * d + h``
is hour ``h`` of weekday ``d`` (Monday = 0, as ``date.weekday()``). A window allows the hours
whose slot ``[max(h:00, start), min(h+1:00, end))`` is not empty on its ``days``; holidays are
dates (in the contact's own calendar) on which nothing is sent.

``next_slots`` turns a chosen hour of the week into the first instant at or after ``now`` when
that slot is open in the contact's time zone, skipping holidays, across DST changes (a local
time that does not exist, e.g. 02:30 on the spring-forward night, moves one hour later; an
ambiguous one takes its first occurrence).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import numpy.typing as npt
import polars as pl

from recapito.errors import InputError

HOURS_PER_WEEK = 168
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MAX_WEEKS = 60  # holidays never close the same weekday for more than a year


def _minutes(t: time) -> int:
    return t.hour * 60 + t.minute


def valid_timezone(name: str | None) -> bool:
    if not name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class SendWindow:
    """Where in the week a campaign may deliver, in each contact's local time.

    ``days``: weekdays allowed (Monday = 0). ``start``/``end``: local wall-clock bounds
    (``end`` exclusive; ``time(0)`` as ``end`` means midnight). ``timezone``: the zone of
    contacts whose ``timezone_column`` is missing, empty or not an IANA name.
    ``holidays``: local dates closed for sending (the business calendar, e.g.
    ``italian_holidays(2026)``). ``fallback``: the local time used when there is no usable
    history (moved to ``start`` when outside the window).
    """

    days: tuple[int, ...] = (0, 1, 2, 3, 4)
    start: time = time(9, 0)
    end: time = time(18, 0)
    timezone: str = "Europe/Rome"
    timezone_column: str = "timezone"
    holidays: frozenset[date] = field(default_factory=frozenset)
    fallback: time = time(10, 0)

    def __post_init__(self) -> None:
        days = tuple(sorted(set(self.days)))
        if not days or any(d < 0 or d > 6 for d in days):
            raise InputError("window days must be weekdays 0 (Monday) to 6 (Sunday)")
        object.__setattr__(self, "days", days)
        object.__setattr__(self, "holidays", frozenset(self.holidays))
        if self._end_minutes <= _minutes(self.start):
            raise InputError(f"window start {self.start} is not before its end {self.end}")
        if not valid_timezone(self.timezone):
            raise InputError(f"unknown time zone {self.timezone!r}")

    @property
    def _end_minutes(self) -> int:
        return 24 * 60 if self.end == time(0) else _minutes(self.end)

    def slot_bounds(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Start and end minute (within the day) of every hour-of-week slot; empty slots
        (outside the window, or on a day not allowed) have start >= end."""
        hours = np.arange(HOURS_PER_WEEK, dtype=np.int64)
        hour = hours % 24
        lo = np.maximum(hour * 60, _minutes(self.start))
        hi = np.minimum((hour + 1) * 60, self._end_minutes)
        day_ok = np.isin(hours // 24, np.array(self.days))
        hi = np.where(day_ok, hi, lo)
        return lo, hi

    def allowed_hours(self) -> npt.NDArray[np.bool_]:
        """Boolean mask over the 168 hours of the week."""
        lo, hi = self.slot_bounds()
        return hi > lo

    def fallback_hour(self) -> int:
        """Hour of the day of the fallback time, inside the window."""
        minutes = _minutes(self.fallback)
        if not _minutes(self.start) <= minutes < self._end_minutes:
            minutes = _minutes(self.start)
        return minutes // 60

    def contact_zones(self, audience: pl.DataFrame) -> pl.Series:
        """Each contact's IANA zone: its column when valid, else the window's default."""
        n = audience.height
        if self.timezone_column not in audience.columns:
            return pl.Series("timezone", [self.timezone] * n, dtype=pl.String)
        raw = audience.get_column(self.timezone_column).cast(pl.String).str.strip_chars()
        distinct = raw.drop_nulls().unique().to_list()
        good = [z for z in distinct if valid_timezone(z)]
        return (
            pl.select(
                pl.when(raw.is_in(good)).then(raw).otherwise(pl.lit(self.timezone)).alias("tz")
            )
            .to_series()
            .rename("timezone")
        )


def next_slots(
    hour_of_week: npt.NDArray[np.int64],
    zones: pl.Series,
    window: SendWindow,
    now: datetime,
) -> pl.Series:
    """First instant >= ``now`` (UTC) at which each contact's chosen local hour of the week
    is open: ``hour_of_week`` must be allowed by the window (``-1`` = the fallback: the
    earliest allowed day at the window's fallback time). Returns ``send_at`` (UTC)."""
    if now.tzinfo is None:
        raise InputError("now must be timezone-aware")
    now_utc = now.astimezone(UTC)
    n = len(hour_of_week)
    out = np.empty(n, dtype="datetime64[us]")
    zone_values = zones.to_numpy()
    lo, hi = window.slot_bounds()
    holidays = np.array(sorted(window.holidays), dtype="datetime64[D]")
    for zone in zones.unique().to_list():
        rows = np.flatnonzero(zone_values == zone)
        if rows.size == 0:
            continue
        tz = ZoneInfo(zone)
        local_now = now_utc.astimezone(tz)
        today = np.datetime64(local_now.date(), "D")
        now_min = local_now.hour * 60 + local_now.minute
        how = hour_of_week[rows].astype(np.int64)
        fallback = how < 0
        if fallback.any():
            how = how.copy()
            how[fallback] = _fallback_how(window, lo, hi, local_now, holidays)
        delta = (how // 24 - local_now.weekday()) % 7
        passed = (delta == 0) & (hi[how] <= now_min)
        days = today + (delta + 7 * passed).astype("timedelta64[D]")
        if holidays.size:
            for _ in range(_MAX_WEEKS):
                closed = np.isin(days, holidays)
                if not closed.any():
                    break
                days = days + (7 * closed).astype("timedelta64[D]")
        local = days.astype("datetime64[us]") + (lo[how] * 60_000_000).astype("timedelta64[us]")
        out[rows] = _to_utc(local, zone)
    now_np = np.datetime64(now_utc.replace(tzinfo=None), "us")
    return pl.Series("send_at", np.maximum(out, now_np)).dt.replace_time_zone("UTC")


def _fallback_how(
    window: SendWindow,
    lo: npt.NDArray[np.int64],
    hi: npt.NDArray[np.int64],
    local_now: datetime,
    holidays: npt.NDArray[np.datetime64],
) -> int:
    """The hour of the week of the first open fallback slot from ``local_now`` on."""
    hour = window.fallback_hour()
    closed = set(holidays.astype(object).tolist())
    now_min = local_now.hour * 60 + local_now.minute
    for k in range(7 * _MAX_WEEKS):
        day = local_now.date() + timedelta(days=k)
        how = day.weekday() * 24 + hour
        if hi[how] <= lo[how] or day in closed or (k == 0 and hi[how] <= now_min):
            continue
        return int(how)
    raise InputError("the sending window has no open slot in the next year")


def _to_utc(local: npt.NDArray[np.datetime64], zone: str) -> npt.NDArray[np.datetime64]:
    naive = pl.Series("t", local)
    aware = naive.dt.replace_time_zone(zone, ambiguous="earliest", non_existent="null")
    if aware.null_count():  # the spring-forward gap: the same wall clock one hour later
        later = (naive + timedelta(hours=1)).dt.replace_time_zone(
            zone, ambiguous="earliest", non_existent="null"
        )
        aware = aware.fill_null(later)
    utc = aware.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    result: npt.NDArray[np.datetime64] = utc.to_numpy().astype("datetime64[us]")
    return result


def easter(year: int) -> date:
    """Gregorian Easter Sunday (anonymous Gregorian algorithm)."""
    a, b, c = year % 19, year // 100, year % 100
    d, e = b // 4, b % 4
    f = (b + 8) // 25
    g = (b - f + 1) // 3
    h = (19 * a + b - d - g + 15) % 30
    i, k = c // 4, c % 4
    ell = (32 + 2 * e + 2 * i - h - k) % 7
    m = (a + 11 * h + 22 * ell) // 451
    month = (h + ell - 7 * m + 114) // 31
    day = (h + ell - 7 * m + 114) % 31 + 1
    return date(year, month, day)


def italian_holidays(years: Iterable[int]) -> frozenset[date]:
    """Italy's national public holidays (a business calendar for ``SendWindow.holidays``)."""
    fixed = ((1, 1), (1, 6), (4, 25), (5, 1), (6, 2), (8, 15), (11, 1), (12, 8), (12, 25), (12, 26))
    found: set[date] = set()
    for year in years:
        found.update(date(year, m, d) for m, d in fixed)
        found.add(easter(year) + timedelta(days=1))  # Pasquetta
    return frozenset(found)
