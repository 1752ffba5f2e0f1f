"""Bounce collector tasks: one call into the core; retries only on transient errors."""

from __future__ import annotations

from typing import Any

from prefect import task

from recapito.collect.bounces import collect_bounces
from recapito.config import Settings
from tasks.campaign import transient_only


@task(
    name="collect-bounces",
    retries=2,
    retry_delay_seconds=30,
    retry_condition_fn=transient_only,
    timeout_seconds=1800,
    tags=["recapito", "bounces"],
)
def collect_bounce_mailbox(limit: int | None = None) -> dict[str, Any]:
    """Poll the bounce mailbox (``RECAPITO_BOUNCE_IMAP_*`` settings) once; counts only."""
    return collect_bounces(Settings.load(), limit=limit)
