"""PEC receipt collector tasks: one call into the core each; retries only on transient errors."""

from __future__ import annotations

from typing import Any

from prefect import task

from recapito.config import Settings
from recapito.ledger import Ledger
from recapito.pec.collector import collect_receipts
from recapito.pec.timeouts import check_timeouts, limits_from_env
from tasks.campaign import transient_only


@task(
    name="collect-pec-receipts",
    retries=2,
    retry_delay_seconds=30,
    retry_condition_fn=transient_only,
    timeout_seconds=1800,
    tags=["recapito", "pec"],
)
def collect_pec_receipts(limit: int | None = None) -> dict[str, Any]:
    """Poll every configured PEC mailbox once; counts only."""
    return collect_receipts(Settings.load(), limit=limit)


@task(
    name="pec-timeouts",
    retries=2,
    retry_delay_seconds=30,
    retry_condition_fn=transient_only,
    timeout_seconds=600,
    tags=["recapito", "pec"],
)
def apply_pec_timeouts() -> dict[str, Any]:
    """Acceptance overdue alerts and 24 h delivery timeouts (RECAPITO_PEC_*_TIMEOUT_*)."""
    acceptance, delivery = limits_from_env()
    ledger = Ledger(Settings.load().db_url)
    try:
        return check_timeouts(ledger, acceptance_within=acceptance, delivery_within=delivery)
    finally:
        ledger.close()
