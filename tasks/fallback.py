"""Thin task around the fallback sweeper (recapito.fallback.run).

The Twilio auth token comes from the environment or, when ``token_block`` names one, from a
Prefect ``Secret`` block; it is never a parameter and never logged. No retries: a sweep
that failed half-way is safe to run again (claimed rows, attempt rows before the call),
and the next scheduled run does exactly that.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import task

from recapito.config import Settings
from recapito.fallback.run import fcm_push, funnel_rows, sweep_all, twilio_settings
from recapito.ledger.store import Ledger


@task(name="fallback-sweep", retries=0, timeout_seconds=600, tags=["recapito", "fallback"])
def sweep_fallbacks(campaign: str | None = None, token_block: str | None = None) -> dict[str, Any]:
    settings = Settings.load()
    token: str | None = None
    if token_block:
        from prefect.blocks.system import Secret

        block: Any = Secret.load(token_block)
        token = str(block.get())
    twilio = twilio_settings(tracking_url=settings.tracking_url, auth_token=token)
    fcm = fcm_push()
    ledger = Ledger(settings.db_url)
    try:
        counts = sweep_all(
            ledger,
            settings=settings,
            default_policy=os.environ.get("RECAPITO_FALLBACK_POLICY") or None,
            twilio=twilio,
            fcm=fcm,
            campaign=campaign,
        )
        return {"counts": counts, "funnel": funnel_rows(ledger, campaign)}
    finally:
        ledger.close()
        if fcm is not None:
            fcm.close()
