"""Sending modes as slots: when each recipient's message may go.

A slot is a UTC time; every recipient gets one when the campaign is first prepared
(``assign_slots``), and chunks never span two slots, so a slot is a group of whole
chunks. The slot and chunk of each recipient are kept in the audience snapshot
(``_slot``, ``_chunk``), which makes the plan as fixed as the audience: running the
campaign again sends the chunks of the slots that have come due, and the ledger's claims
(planned rows only) make a slot sent twice impossible.

Modes: ``immediate`` (no slots), ``scheduled`` (one slot at ``send_at``), ``waves`` (N
recipients or a percentage per interval), ``contact_timezone`` (each contact's next
opening of its local window), ``best_time`` (``recapito.sendtime.best_times`` when that
model is installed, else the window's fallback time), all within the business calendar.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from recapito.errors import InputError
from recapito.sending.calendar import SendWindow, italian_holidays, parse_window

if TYPE_CHECKING:
    from recapito.campaign import CampaignParams
    from recapito.ledger import Ledger

SLOT_COLUMN = "_slot"
SLOT_DTYPE = pl.Datetime("us", "UTC")
DUE_TOLERANCE = timedelta(seconds=1)  # a slot this close is sent now

BestTimes = Callable[[pl.DataFrame, Any, SendWindow], pl.Series]


def send_window(params: CampaignParams, now: datetime) -> SendWindow:
    """The campaign's window: from ``send_at`` (or now) for ``best_time_horizon_hours``."""
    opens, closes = parse_window(params.send_window)
    start = max(now, params.send_at.astimezone(UTC)) if params.send_at else now
    from recapito.sending.calendar import parse_hhmm

    return SendWindow(
        start=start,
        end=start + timedelta(hours=params.best_time_horizon_hours),
        opens=opens,
        closes=closes,
        business_days_only=params.business_days_only,
        extra_holidays=frozenset(params.extra_holidays),
        timezone_column=params.timezone_column,
        default_timezone=params.default_timezone,
        fallback=parse_hhmm(params.best_time_fallback, "best_time_fallback"),
    )


def _zones(audience: pl.DataFrame, window: SendWindow) -> list[str | None]:
    column = window.timezone_column
    if column not in audience.columns:
        return [None] * audience.height
    return [None if v is None else str(v) for v in audience.get_column(column).to_list()]


def _by_zone(
    audience: pl.DataFrame, window: SendWindow, pick: Callable[[Any], datetime]
) -> list[datetime]:
    cache: dict[str | None, datetime] = {}
    out = []
    for name in _zones(audience, window):
        if name not in cache:
            cache[name] = pick(window.zone_of(name))
        out.append(cache[name])
    return out


def _best_time_model() -> BestTimes | None:
    """``recapito.sendtime.best_times(audience, ledger, window) -> pl.Series`` of UTC
    datetimes (the engagement model of DESIGN §9), when it is installed."""
    try:
        module = importlib.import_module("recapito.sendtime")
    except ImportError:
        return None
    model: BestTimes | None = getattr(module, "best_times", None)
    return model


def _model_window(window: SendWindow) -> Any:
    """The window as the model takes it: ``recapito.sendtime.window.SendWindow`` (days,
    local start/end, default zone, zone column, holiday dates, fallback) when that module
    is there, else this module's own ``SendWindow``."""
    try:
        module = importlib.import_module("recapito.sendtime.window")
    except ImportError:
        return window
    years = range(window.start.year, window.end.year + 1)
    holidays = set(window.extra_holidays)
    if window.business_days_only:
        holidays |= {d for y in years for d in italian_holidays(y)}
    return module.SendWindow(
        days=(0, 1, 2, 3, 4) if window.business_days_only else tuple(range(7)),
        start=window.opens,
        end=window.closes,
        timezone=window.default_timezone,
        timezone_column=window.timezone_column,
        holidays=frozenset(holidays),
        fallback=window.fallback,
    )


def _model_kwargs(model: BestTimes, window: SendWindow, campaign: str) -> dict[str, Any]:
    """``now`` (the campaign's start) and ``campaign`` (seeds its exploration draws) for a
    model that takes them."""
    try:
        names = inspect.signature(model).parameters
    except (TypeError, ValueError):
        return {}
    given = {"now": window.start, "campaign": campaign}
    return {k: v for k, v in given.items() if k in names}


def _fallback_times(audience: pl.DataFrame, window: SendWindow) -> list[datetime]:
    return _by_zone(
        audience, window, lambda tz: window.next_local_time(window.start, tz, window.fallback)
    )


def slot_times(
    audience: pl.DataFrame,
    params: CampaignParams,
    now: datetime,
    ledger: Ledger | None = None,
    best_times: BestTimes | None = None,
) -> list[datetime] | None:
    """One UTC slot per audience row (in its order), or None for immediate sending."""
    mode = params.sending_mode
    if mode == "immediate" or audience.height == 0:
        return None
    window = send_window(params, now)
    start = window.start
    if mode == "scheduled":
        return [start] * audience.height
    if mode == "waves":
        assert params.wave_interval_minutes is not None
        size = params.wave_size or math.ceil(audience.height * (params.wave_percent or 100) / 100)
        step = timedelta(minutes=params.wave_interval_minutes)
        return [start + (i // max(1, size)) * step for i in range(audience.height)]
    if mode == "contact_timezone":
        return _by_zone(audience, window, lambda tz: window.next_opening(start, tz))
    if mode == "best_time":
        model = best_times or _best_time_model()
        if model is None:
            return _fallback_times(audience, window)
        kwargs = _model_kwargs(model, window, params.name)
        chosen = model(audience, ledger, _model_window(window), **kwargs)
        if len(chosen) != audience.height:
            raise InputError("the best-time model returned a slot count unlike the audience")
        zones = _zones(audience, window)
        fallback = _fallback_times(audience, window)
        slots: list[datetime] = []
        for value, name, default in zip(chosen.to_list(), zones, fallback, strict=True):
            if value is None:
                slots.append(default)
                continue
            at = value if value.tzinfo else value.replace(tzinfo=UTC)
            at = max(at.astimezone(UTC), start)
            slots.append(window.next_opening(at, window.zone_of(name)))  # quiet hours first
        return slots
    raise InputError(f"unknown sending mode {mode!r}")


def assign_slots(
    audience: pl.DataFrame,
    params: CampaignParams,
    size: int,
    now: datetime,
    ledger: Ledger | None = None,
) -> pl.DataFrame:
    """The audience with ``_chunk`` (and, unless immediate, ``_slot``): chunks of at
    most ``size`` rows, never spanning two slots, numbered in slot order."""
    times = slot_times(audience, params, now, ledger)
    if times is None:
        return audience.with_columns(
            (pl.int_range(0, pl.len()) // size).cast(pl.Int32).alias("_chunk")
        )
    # to the second: slots of one second apart are one slot
    slots = pl.Series(SLOT_COLUMN, [t.replace(microsecond=0) for t in times], dtype=SLOT_DTYPE)
    framed = audience.with_columns(slots).with_row_index("_order")
    framed = framed.sort(SLOT_COLUMN, "_order")
    rank = pl.int_range(0, pl.len()).over(SLOT_COLUMN)
    framed = framed.with_columns((rank // size).alias("_local"))
    groups = framed.group_by(SLOT_COLUMN).agg(pl.col("_local").max() + 1).sort(SLOT_COLUMN)
    offsets = groups.with_columns(
        (pl.col("_local").cum_sum() - pl.col("_local")).alias("_offset")
    ).select(SLOT_COLUMN, "_offset")
    framed = framed.join(offsets, on=SLOT_COLUMN, how="left")
    return framed.with_columns(
        (pl.col("_offset") + pl.col("_local")).cast(pl.Int32).alias("_chunk")
    ).drop("_order", "_local", "_offset")


def slot_plan(audience_path: str | Path) -> dict[str, list[int]]:
    """Slot (ISO UTC) → its chunks, from the audience snapshot; empty when immediate."""
    path = Path(audience_path)
    if not path.exists():
        return {}
    frame = pl.scan_parquet(path)
    if SLOT_COLUMN not in frame.collect_schema().names():
        return {}
    pairs = frame.select(SLOT_COLUMN, "_chunk").unique().sort(SLOT_COLUMN, "_chunk").collect()
    plan: dict[str, list[int]] = {}
    for at, chunk in pairs.iter_rows():
        plan.setdefault(at.astimezone(UTC).isoformat(), []).append(int(chunk))
    return plan


def slot_sizes(audience_path: str | Path) -> dict[str, int]:
    """Recipients per slot (ISO UTC), for the artifacts."""
    path = Path(audience_path)
    frame = pl.scan_parquet(path)
    if SLOT_COLUMN not in frame.collect_schema().names():
        return {}
    counts = frame.group_by(SLOT_COLUMN).agg(pl.len()).sort(SLOT_COLUMN).collect()
    return {at.astimezone(UTC).isoformat(): int(n) for at, n in counts.iter_rows()}


def split_due(plan: dict[str, list[int]], now: datetime) -> tuple[list[int], dict[str, list[int]]]:
    """(chunks whose slot has come, future slot → chunks)."""
    due: list[int] = []
    future: dict[str, list[int]] = {}
    for at, chunks in plan.items():
        if datetime.fromisoformat(at) <= now + DUE_TOLERANCE:
            due.extend(chunks)
        else:
            future[at] = chunks
    return sorted(due), future
