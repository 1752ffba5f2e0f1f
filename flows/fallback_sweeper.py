"""The fallback sweeper flow: every few minutes, the due fallback steps of every campaign
with a policy (DESIGN §8): triggers from the delivery states, SMS through Twilio, paper to
the print queue, the next step scheduled. Never one suspended flow per recipient."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from tasks.fallback import sweep_fallbacks


@flow(name="fallback-sweeper", log_prints=False)
def fallback_sweeper_flow(
    campaign: str | None = None, token_block: str | None = None
) -> dict[str, Any]:
    """Sweep the due fallback steps (of ``campaign``, or of every campaign)."""
    result = sweep_fallbacks(campaign, token_block)
    logger = get_run_logger()
    for name, c in result["counts"].items():
        logger.info("campaign %r: %s", name, c)  # counts only, never recipients
    if result["funnel"]:
        create_table_artifact(
            key="fallback-funnel",
            table=result["funnel"],
            description="Fallback steps per campaign and channel, by state",
        )
    return result
