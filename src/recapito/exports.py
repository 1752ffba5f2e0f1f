"""Nightly exports: the ledger's deliveries per campaign as Parquet, for analysts.

``export_campaigns`` writes ``$RECAPITO_HOME/exports/<day>/campaigns/<campaign>.parquet``
(one row per delivery, without the address and the claim token: contacts are known by
``contact_id``), and, when the analyst's workbench is installed, its ledger tables
(``<day>/<table>.parquet``, read by the notebooks' ``export_dir``). Files are mode 0600
in folders 0700: they describe people.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import sqlalchemy as sa

from recapito.campaign import campaign_dir
from recapito.config import Settings
from recapito.ledger import Ledger
from recapito.ledger.schema import campaigns, deliveries

_DROPPED = ("address", "claim_token")


@dataclass(frozen=True)
class CampaignExport:
    campaign: str
    status: str
    path: Path
    deliveries: int
    states: dict[str, int]


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _write(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    frame.write_parquet(tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    names = [c.name for c in deliveries.columns if c.name not in _DROPPED]
    data = {n: [r.get(n) for r in rows] for n in names}
    return pl.DataFrame(data, infer_schema_length=None, strict=False)


def export_campaigns(
    settings: Settings, *, days: float | None = 7, now: datetime | None = None
) -> tuple[Path, list[CampaignExport]]:
    """Export every campaign changed in the last ``days`` (all with None)."""
    now = now or datetime.now(UTC)
    out = _private_dir(settings.home / "exports" / now.strftime("%Y-%m-%d"))
    folder = _private_dir(out / "campaigns")
    ledger = Ledger(settings.db_url, run_migrations=False)
    exported: list[CampaignExport] = []
    try:
        query = sa.select(campaigns.c.name).order_by(campaigns.c.id)
        if days is not None:
            since = (now - timedelta(days=days)).replace(tzinfo=None)
            query = query.where(campaigns.c.updated_at >= since)
        with ledger.engine.connect() as conn:
            names = [str(r[0]) for r in conn.execute(query)]
        for name in names:
            camp = ledger.get_campaign(name)
            if camp is None:
                continue
            rows = [
                {k: v for k, v in r.items() if k not in _DROPPED}
                for r in ledger.deliveries_of(camp.id)
            ]
            path = folder / f"{campaign_dir(settings, name).name}.parquet"
            _write(_frame(rows), path)
            exported.append(
                CampaignExport(name, camp.status, path, len(rows), ledger.state_counts(camp.id))
            )
    finally:
        ledger.close()
    _workbench_tables(settings, out)
    return out, exported


def _workbench_tables(settings: Settings, out: Path) -> None:
    """The notebooks' tables (recapito.workbench.export_tables), when it is installed."""
    try:
        workbench = importlib.import_module("recapito.workbench")
    except ImportError:
        return
    export = getattr(workbench, "export_tables", None)
    if export is None:
        return
    for path in export(settings.db_url, out):
        os.chmod(path, 0o600)


def report_markdown(out: Path, exported: list[CampaignExport]) -> str:
    lines = [
        "# Nightly report and exports",
        "",
        f"Exports in [`{out}`]({out.as_uri()}) (Parquet, mode 0600; no addresses).",
        "",
        "| campaign | status | deliveries | accepted | failed | deferred | export |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for e in exported:
        s = e.states
        lines.append(
            f"| {e.campaign} | {e.status} | {e.deliveries:,} | {s.get('accepted', 0):,} | "
            f"{s.get('failed', 0):,} | {s.get('deferred', 0):,} | "
            f"[{e.path.name}]({e.path.as_uri()}) |"
        )
    if not exported:
        lines.append("| (no campaign changed in the period) | | | | | | |")
    return "\n".join(lines)
