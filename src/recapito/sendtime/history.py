"""Engagement history for the send-time model: what was sent to whom and when, and how
people (not machines) responded.

``sends``: one row per delivered e-mail — ``contact_id`` (String), ``delivery_id`` (Int64),
``sent_at`` (UTC, when the MX accepted it). ``engagements``: tracking hits — ``delivery_id``,
``at`` (UTC), ``kind`` (``open``/``click``) and ``class`` (``human``/``machine``/
``scanner``). Only ``human`` hits ever count: machine opens (Apple Mail Privacy Protection,
image proxies) and scanner clicks (security gateways) fire at delivery whatever the hour and
would make every send hour look engaging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import sqlalchemy as sa

from recapito.errors import InputError
from recapito.ledger import Ledger, State
from recapito.ledger.schema import deliveries, events, tracking_hits

SENDS_SCHEMA = pl.Schema(
    {
        "contact_id": pl.String(),
        "delivery_id": pl.Int64(),
        "sent_at": pl.Datetime("us", "UTC"),
    }
)
ENGAGEMENTS_SCHEMA = pl.Schema(
    {
        "delivery_id": pl.Int64(),
        "at": pl.Datetime("us", "UTC"),
        "kind": pl.String(),
        "class": pl.String(),
    }
)
# a bounced message never reached a person: it is no exposure
_NOT_EXPOSED = (State.BOUNCED.value,)


def _utc(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    dtype = frame.schema[column]
    if not isinstance(dtype, pl.Datetime):
        raise InputError(f"history column {column!r} must be a datetime, not {dtype}")
    col = pl.col(column)
    col = col.dt.replace_time_zone("UTC") if dtype.time_zone is None else col
    return frame.with_columns(col.dt.convert_time_zone("UTC").dt.cast_time_unit("us"))


def _conform(frame: pl.DataFrame, schema: pl.Schema, name: str) -> pl.DataFrame:
    missing = [c for c in schema if c not in frame.columns]
    if missing:
        raise InputError(f"{name} lacks columns {missing}")
    frame = frame.select(list(schema))
    for column, dtype in schema.items():
        if isinstance(dtype, pl.Datetime):
            frame = _utc(frame, column)
        else:
            frame = frame.with_columns(pl.col(column).cast(dtype))
    return frame


@dataclass(frozen=True)
class EngagementHistory:
    sends: pl.DataFrame
    engagements: pl.DataFrame

    @classmethod
    def from_frames(cls, sends: pl.DataFrame, engagements: pl.DataFrame) -> EngagementHistory:
        return cls(
            _conform(sends, SENDS_SCHEMA, "sends"),
            _conform(engagements, ENGAGEMENTS_SCHEMA, "engagements"),
        )

    @classmethod
    def empty(cls) -> EngagementHistory:
        return cls(pl.DataFrame(schema=SENDS_SCHEMA), pl.DataFrame(schema=ENGAGEMENTS_SCHEMA))

    @classmethod
    def from_ledger(
        cls, ledger: Ledger, *, since: datetime | None = None, channel: str = "email"
    ) -> EngagementHistory:
        """Accepted deliveries of ``channel`` (their first ``sent`` event; bounced ones
        left out) and the human tracking hits on them, from ``since`` on."""
        sent_at = sa.func.min(events.c.at)
        sends_q = (
            sa.select(
                deliveries.c.contact_id,
                deliveries.c.id.label("delivery_id"),
                sent_at.label("sent_at"),
            )
            .join(events, events.c.delivery_id == deliveries.c.id)
            .where(
                events.c.kind == "sent",
                deliveries.c.channel == channel,
                deliveries.c.state.not_in(_NOT_EXPOSED),
            )
            .group_by(deliveries.c.id, deliveries.c.contact_id)
        )
        hits_q = (
            sa.select(
                tracking_hits.c.delivery_id,
                tracking_hits.c.at,
                tracking_hits.c.kind,
                tracking_hits.c["class"],
            )
            .join(deliveries, deliveries.c.id == tracking_hits.c.delivery_id)
            .where(tracking_hits.c["class"] == "human", deliveries.c.channel == channel)
        )
        if since is not None:
            sends_q = sends_q.where(events.c.at >= since)
            hits_q = hits_q.where(tracking_hits.c.at >= since)
        with ledger.engine.connect() as conn:
            sends = _frame(conn.execute(sends_q).all(), SENDS_SCHEMA)
            hits = _frame(conn.execute(hits_q).all(), ENGAGEMENTS_SCHEMA)
        return cls.from_frames(sends, hits)

    def labelled(self, response_window: timedelta) -> pl.DataFrame:
        """One row per send: ``contact_id``, ``sent_at``, ``engaged`` (a human open or click
        within ``response_window`` of the send)."""
        human = (
            self.engagements.lazy()
            .filter(pl.col("class") == "human")
            .join(self.sends.lazy().select("delivery_id", "sent_at"), on="delivery_id")
            .filter(
                (pl.col("at") >= pl.col("sent_at"))
                & (pl.col("at") - pl.col("sent_at") <= response_window)
            )
            .select("delivery_id")
            .unique()
            .with_columns(pl.lit(True).alias("engaged"))
        )
        return (
            self.sends.lazy()
            .join(human, on="delivery_id", how="left")
            .select("contact_id", "sent_at", pl.col("engaged").fill_null(False))
            .collect()
        )


def _frame(rows: Sequence[Any], schema: pl.Schema) -> pl.DataFrame:
    naive = pl.Schema(
        {
            name: pl.Datetime("us") if isinstance(dtype, pl.Datetime) else dtype
            for name, dtype in schema.items()
        }
    )
    if not rows:
        return pl.DataFrame(schema=schema)
    columns = list(zip(*(tuple(r) for r in rows), strict=True))
    data = {}
    for (name, dtype), values in zip(naive.items(), columns, strict=True):
        if isinstance(dtype, pl.Datetime):
            # SQLite hands back naive UTC, PostgreSQL aware datetimes: make both naive UTC
            values = tuple(
                v if v is None or v.tzinfo is None else v.astimezone(UTC).replace(tzinfo=None)
                for v in values
            )
        data[name] = pl.Series(name, values, dtype=dtype)
    return pl.DataFrame(data)
