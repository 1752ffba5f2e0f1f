"""Business calendar and local-time sending windows (no Prefect here).

A contact may be written to only inside its own local window (e.g. 09:00–18:00 in its
IANA time zone) on business days: Monday to Friday, minus the Italian public holidays
(and any extra closing days of the organisation). Outside the window is quiet hours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from recapito.errors import InputError


def easter_sunday(year: int) -> date:
    """Gregorian Easter (the anonymous Gregorian algorithm, Meeus/Jones/Butcher)."""
    a = year % 19
    b, c = divmod(year, 100)
    d, e = divmod(b, 4)
    f = (b + 8) // 25
    g = (b - f + 1) // 3
    h = (19 * a + b - d - g + 15) % 30
    i, k = divmod(c, 4)
    l_ = (32 + 2 * e + 2 * i - h - k) % 7
    m = (a + 11 * h + 22 * l_) // 451
    month, day = divmod(h + l_ - 7 * m + 114, 31)
    return date(year, month, day + 1)


@lru_cache(maxsize=64)
def italian_holidays(year: int) -> frozenset[date]:
    """The national public holidays of Italy (feste nazionali) in ``year``."""
    easter = easter_sunday(year)
    fixed = [(1, 1), (1, 6), (4, 25), (5, 1), (6, 2), (8, 15), (11, 1), (12, 8), (12, 25), (12, 26)]
    days = {date(year, m, d) for m, d in fixed}
    days |= {easter, easter + timedelta(days=1)}  # Pasqua, Lunedì dell'Angelo
    if year >= 2026:
        days.add(date(year, 10, 4))  # San Francesco, national holiday again from 2026
    return frozenset(days)


def is_business_day(day: date, extra_holidays: frozenset[date] = frozenset()) -> bool:
    return day.weekday() < 5 and day not in italian_holidays(day.year) and day not in extra_holidays


def parse_hhmm(text: str, what: str) -> time:
    try:
        hours, _, minutes = text.strip().partition(":")
        return time(int(hours), int(minutes or 0))
    except ValueError:
        raise InputError(f"{what}: {text!r} is not a time of day like 09:00") from None


def parse_window(text: str) -> tuple[time, time]:
    """``"09:00-18:00"`` → (09:00, 18:00); the end must come after the start."""
    start, sep, end = text.replace("–", "-").partition("-")
    if not sep:
        raise InputError(f"send window {text!r}: write it as HH:MM-HH:MM, e.g. 09:00-18:00")
    opens, closes = parse_hhmm(start, "send window"), parse_hhmm(end, "send window")
    if closes <= opens:
        raise InputError(f"send window {text!r}: it must close after it opens, the same day")
    return opens, closes


@lru_cache(maxsize=512)
def zone(name: str | None, default: str = "Europe/Rome") -> ZoneInfo:
    """The IANA zone ``name``; empty or unknown names fall back to ``default``."""
    for candidate in (name, default):
        if candidate:
            try:
                return ZoneInfo(str(candidate).strip())
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


@dataclass(frozen=True)
class SendWindow:
    """When a campaign may write to a contact.

    ``start``/``end`` (UTC) bound the whole campaign; ``opens``/``closes`` are each
    contact's local hours, in the zone of its ``timezone`` column (``default_timezone``
    when empty or unknown); with ``business_days_only`` weekends and holidays are closed.
    ``fallback`` is the local time a best-time model uses when it knows too little.
    """

    start: datetime
    end: datetime
    opens: time = time(9, 0)
    closes: time = time(18, 0)
    business_days_only: bool = True
    extra_holidays: frozenset[date] = field(default_factory=frozenset)
    timezone_column: str = "timezone"
    default_timezone: str = "Europe/Rome"
    fallback: time = time(10, 0)

    def zone_of(self, name: str | None) -> ZoneInfo:
        return zone(name, self.default_timezone)

    def _open_day(self, day: date) -> bool:
        return not self.business_days_only or is_business_day(day, self.extra_holidays)

    def allowed(self, at: datetime, tz: ZoneInfo) -> bool:
        local = at.astimezone(tz)
        return self._open_day(local.date()) and self.opens <= local.time() < self.closes

    def next_opening(self, at: datetime, tz: ZoneInfo) -> datetime:
        """``at`` itself when the window is open then, else the next opening (UTC)."""
        local = at.astimezone(tz)
        for offset in range(0, 400):
            day = local.date() + timedelta(days=offset)
            if not self._open_day(day):
                continue
            opening = datetime.combine(day, self.opens, tz)
            closing = datetime.combine(day, self.closes, tz)
            if offset == 0:
                if local >= closing:
                    continue
                if local >= opening:
                    return at.astimezone(UTC)
            return opening.astimezone(UTC)
        raise InputError("no open day in the sending calendar within 400 days")

    def next_local_time(self, at: datetime, tz: ZoneInfo, when: time) -> datetime:
        """The first open moment at local time ``when`` (clamped into the window) from ``at``."""
        when = min(max(when, self.opens), self.closes)
        local = at.astimezone(tz)
        for offset in range(0, 400):
            day = local.date() + timedelta(days=offset)
            candidate = datetime.combine(day, when, tz)
            if candidate >= local and self._open_day(day) and self.allowed(candidate, tz):
                return candidate.astimezone(UTC)
        return self.next_opening(at, tz)
