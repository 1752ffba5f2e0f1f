"""Nightly report task: one core call."""

from __future__ import annotations

from typing import Any

from prefect import task

from recapito import exports
from recapito.config import Settings
from tasks.campaign import transient_only


@task(name="export-ledger", retries=2, retry_condition_fn=transient_only)
def export_ledger(days: float | None) -> dict[str, Any]:
    out, exported = exports.export_campaigns(Settings.load(), days=days)
    return {
        "directory": str(out),
        "markdown": exports.report_markdown(out, exported),
        "campaigns": len(exported),
        "deliveries": sum(e.deliveries for e in exported),
    }
