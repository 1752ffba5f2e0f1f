"""A synthetic engagement world for the best-time backtest, tests and notebooks.

Contacts have a hidden preferred local hour (their segment's centre plus personal noise), a
responsiveness, a time zone, and some read mail through Apple Mail Privacy Protection (every
message gets a machine open minutes after delivery, the person's own opens are invisible
and only their clicks show) or sit behind a link-scanning gateway (scanner clicks). The chance
that a message sent at local time ``t`` is opened by the person within two hours is

    responsiveness × (floor + (1 - floor) · exp(-d² / 2σ²)) × weekday factor

with ``d`` the circular distance in hours between ``t`` and the preferred hour. Past campaigns
are sent at varied times: some as one blast, some spread over the week.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt
import polars as pl

from recapito.sendtime.history import EngagementHistory

SEGMENTS = ("office", "commuter", "lunch", "evening")
SEGMENT_SHARE = (0.4, 0.25, 0.15, 0.2)
SEGMENT_HOUR = (9.5, 18.5, 13.0, 21.0)
# weekday factors Monday..Sunday per segment
SEGMENT_DAYS = (
    (1.0, 1.05, 1.05, 1.0, 0.9, 0.6, 0.5),
    (1.0, 1.0, 1.0, 1.0, 0.95, 0.7, 0.7),
    (0.95, 1.0, 1.0, 1.0, 1.0, 0.8, 0.8),
    (0.9, 0.95, 1.0, 1.0, 0.9, 1.1, 1.15),
)
ZONES = ("Europe/Rome", "Europe/London", "America/New_York", "Asia/Tokyo")
ZONE_SHARE = (0.85, 0.07, 0.05, 0.03)
PREFERENCE_NOISE_H = 1.5
PEAK_WIDTH_H = 1.5
FLOOR = 0.12
PROMPT = timedelta(hours=2)


@dataclass
class World:
    contacts: pl.DataFrame  # contact_id, segment, timezone (+ hidden: pref_hour, resp, mpp)
    history: EngagementHistory
    start: datetime  # first past campaign
    now: datetime  # the held-out campaign's "now" (after the last past campaign)

    @property
    def audience(self) -> pl.DataFrame:
        return self.contacts.select("contact_id", "segment", "timezone")


def local_time(
    at: npt.NDArray[np.datetime64], zones: npt.NDArray[np.str_]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Weekday (Monday 0) and fractional hour of UTC instants in each row's zone."""
    frame = pl.DataFrame({"at": at.astype("datetime64[us]"), "tz": zones}).with_row_index("i")
    parts = []
    for (zone,), part in frame.partition_by("tz", as_dict=True).items():
        local = pl.col("at").dt.replace_time_zone("UTC").dt.convert_time_zone(str(zone))
        parts.append(
            part.select(
                "i",
                (local.dt.weekday().cast(pl.Int64) - 1).alias("wd"),
                (
                    local.dt.hour().cast(pl.Float64)
                    + local.dt.minute().cast(pl.Float64) / 60.0
                    + local.dt.second().cast(pl.Float64) / 3600.0
                ).alias("h"),
            )
        )
    merged = pl.concat(parts).sort("i")
    return (
        merged.get_column("wd").to_numpy().astype(np.int64),
        merged.get_column("h").to_numpy().astype(np.float64),
    )


def open_probability(
    contacts: pl.DataFrame, rows: npt.NDArray[np.int64], at: npt.NDArray[np.datetime64]
) -> npt.NDArray[np.float64]:
    """True chance that contact ``rows[i]`` opens within two hours a message sent at ``at[i]``."""
    zones = contacts.get_column("timezone").to_numpy()[rows]
    weekday, hour = local_time(at, zones)
    pref = contacts.get_column("pref_hour").to_numpy()[rows]
    seg = contacts.get_column("segment_code").to_numpy()[rows]
    resp = contacts.get_column("resp").to_numpy()[rows]
    d = np.abs(hour - pref)
    d = np.minimum(d, 24 - d)
    bump = FLOOR + (1 - FLOOR) * np.exp(-(d**2) / (2 * PEAK_WIDTH_H**2))
    days = np.array(SEGMENT_DAYS)[seg, weekday]
    result: npt.NDArray[np.float64] = np.clip(resp * bump * days, 0.0, 1.0)
    return result


def make_contacts(n: int, rng: np.random.Generator) -> pl.DataFrame:
    seg = rng.choice(len(SEGMENTS), size=n, p=SEGMENT_SHARE)
    pref = (np.array(SEGMENT_HOUR)[seg] + rng.normal(0, PREFERENCE_NOISE_H, n)) % 24
    zone = rng.choice(len(ZONES), size=n, p=ZONE_SHARE)
    return pl.DataFrame(
        {
            "contact_id": [f"C{i:07d}" for i in range(n)],
            "segment": np.array(SEGMENTS)[seg],
            "segment_code": seg,
            "timezone": np.array(ZONES)[zone],
            "pref_hour": pref,
            "resp": rng.beta(2.0, 4.0, n),
            "mpp": rng.random(n) < 0.35,  # Apple Mail Privacy Protection
            "scanned": rng.random(n) < 0.10,  # behind a link-scanning gateway
        }
    )


def past_send_times(
    n: int, week_start: datetime, blast: bool, rng: np.random.Generator
) -> npt.NDArray[np.datetime64]:
    """Send instants (UTC) of one past campaign in the week starting ``week_start``."""
    base = np.datetime64(week_start.replace(tzinfo=None), "s")
    if blast:  # one morning, sent out over about an hour and a half
        day = int(rng.integers(0, 5))
        hour = float(rng.choice([8.0, 9.0, 10.0, 14.0]))
        offset_s = (day * 24 + hour) * 3600 + rng.uniform(0, 5400, n)
    else:  # spread: any day, any hour from 07 to 22 UTC
        offset_s = rng.integers(0, 7, n) * 86400 + rng.uniform(7, 22, n) * 3600
    return (base + offset_s.astype("timedelta64[s]")).astype("datetime64[us]")


def simulate(
    n_contacts: int = 20_000,
    campaigns: int = 8,
    *,
    seed: int = 7,
    blast_share: float = 0.4,
    start: datetime = datetime(2026, 1, 5, tzinfo=UTC),  # a Monday
) -> World:
    """Contacts and the tracked history of ``campaigns`` past weekly campaigns."""
    rng = np.random.default_rng(seed)
    contacts = make_contacts(n_contacts, rng)
    mpp = contacts.get_column("mpp").to_numpy()
    scanned = contacts.get_column("scanned").to_numpy()
    resp = contacts.get_column("resp").to_numpy()
    sends: list[pl.DataFrame] = []
    hits: list[pl.DataFrame] = []
    next_id = 1
    for week in range(campaigns):
        who = np.flatnonzero(rng.random(n_contacts) < 0.9)
        at = past_send_times(
            who.size, start + timedelta(weeks=week), rng.random() < blast_share, rng
        )
        ids = np.arange(next_id, next_id + who.size, dtype=np.int64)
        next_id += who.size
        sends.append(
            pl.DataFrame(
                {
                    "contact_id": contacts.get_column("contact_id").to_numpy()[who],
                    "delivery_id": ids,
                    "sent_at": at,
                }
            )
        )
        p = open_probability(contacts, who, at)
        prompt = rng.random(who.size) < p
        late = ~prompt & (rng.random(who.size) < 0.5 * resp[who])
        opened = prompt | late
        delay_s = np.where(
            prompt, rng.uniform(60, PROMPT.total_seconds(), who.size), rng.uniform(7200, 172800)
        )
        human_open = opened & ~mpp[who]  # MPP hides the person's own pixel fetch
        clicked = opened & (rng.random(who.size) < 0.3)
        events = [
            (human_open, delay_s, "open", "human"),
            (clicked, delay_s + rng.uniform(5, 300, who.size), "click", "human"),
            (mpp[who], rng.uniform(30, 900, who.size), "open", "machine"),
            (scanned[who], rng.uniform(1, 60, who.size), "click", "scanner"),
        ]
        for mask, delay, kind, klass in events:
            hits.append(
                pl.DataFrame(
                    {
                        "delivery_id": ids[mask],
                        "at": at[mask] + (delay[mask] * 1e6).astype("timedelta64[us]"),
                        "kind": kind,
                        "class": klass,
                    }
                )
            )
    history = EngagementHistory.from_frames(
        pl.concat(sends).with_columns(pl.col("sent_at").dt.replace_time_zone("UTC")),
        pl.concat(hits).with_columns(pl.col("at").dt.replace_time_zone("UTC")),
    )
    now = start + timedelta(weeks=campaigns)
    return World(contacts, history, start, now)
