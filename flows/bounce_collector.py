"""The bounce collector flow: poll the bounce mailbox, update the ledger, file the messages.

Scheduled every few minutes (deployments/prefect.yaml). Credentials come from the
environment (``RECAPITO_BOUNCE_IMAP_*``) or the sandbox settings, never from parameters.
The artifact holds counts only, never addresses.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.bounces import collect_bounce_mailbox


@flow(name="bounce-collector", log_prints=False)
def bounce_collector_flow(limit: int | None = None) -> dict[str, Any]:
    """Collect the unseen messages of the bounce mailbox (at most ``limit`` per run)."""
    logger = get_run_logger()
    result = collect_bounce_mailbox(limit)
    logger.info(
        "bounce mailbox: %s seen, %s archived, %s quarantined, %s deliveries bounced",
        result["seen"],
        result["archived"],
        result["quarantined"],
        result["bounced"],
    )
    rows = [
        ("messages seen", result["seen"]),
        ("archived", result["archived"]),
        ("quarantined", result["quarantined"]),
        ("too large (quarantined unread)", result["too_large"]),
        ("deliveries bounced", result["bounced"]),
        ("bounce events", result["bounce_events"]),
        ("complaints", result["complaints"]),
        ("addresses suppressed", result["suppressed"]),
        ("not correlated", result["uncorrelated"]),
        ("already processed", result["duplicates"]),
    ]
    kinds = result.get("by_kind") or {}
    markdown = "\n".join(
        ["# Bounce collector", "", "| | messages |", "|---|---:|"]
        + [f"| {label} | {n:,} |" for label, n in rows]
        + ["", "| kind | messages |", "|---|---:|"]
        + [f"| {k} | {n:,} |" for k, n in sorted(kinds.items())]
    )
    create_markdown_artifact(markdown, key="bounce-collector", description="bounce mailbox poll")
    return result
