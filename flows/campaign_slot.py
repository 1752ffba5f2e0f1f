"""The campaign-slot flow: deliver the chunks of one slot of a campaign.

The campaign flow schedules one run of this flow's deployment per future slot (waves,
contact time zones, best times, a later ``send_at``), so the slots are visible in the UI
as scheduled runs. A slot run prepares the campaign again (the audience snapshot and the
ledger rows exist: nothing is re-planned) and sends only the planned rows of its slot's
chunks; a run repeated, or late, never sends a delivery twice.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.campaign import _deliver, _deliver_pec
from flows.sending import artifact_key
from recapito.campaign import CampaignParams
from recapito.report import funnel_markdown
from tasks.campaign import build_report, prepare_campaign
from tasks.sending import needs_approval, slot_status


@flow(
    name="campaign-slot",
    task_runner=ThreadPoolTaskRunner(max_workers=16),  # type: ignore[arg-type]
    log_prints=False,
    flow_run_name="campaign-{params.name}-slot",
)
def campaign_slot_flow(params: CampaignParams, slot: str) -> dict[str, Any]:
    """Send the planned rows of the chunks of ``slot`` (ISO UTC, as the campaign planned)."""
    logger = get_run_logger()
    prepared = prepare_campaign(params)
    plan: dict[str, list[int]] = prepared.get("slots") or {}
    if slot not in plan:
        raise ValueError(f"campaign {params.name!r} has no slot {slot} (slots: {len(plan)})")
    if needs_approval(params):
        logger.warning("campaign %r is not approved: slot %s not sent", params.name, slot)
        return build_report(params.name)
    mine = set(plan[slot])
    chunks = {int(k): v for k, v in prepared["chunks"].items() if int(k) in mine}
    pec = {int(k): v for k, v in (prepared.get("pec_chunks") or {}).items() if int(k) in mine}
    logger.info("slot %s: %s chunks still hold planned rows", slot, len(chunks) + len(pec))
    _deliver(params, prepared, chunks, 0, None)
    _deliver_pec(params, {**prepared, "pec_chunks": pec})
    report = build_report(params.name, finish=True)
    if slot_status(params.name, plan):
        report["status"] = "scheduled"
    create_markdown_artifact(
        funnel_markdown(report), key=artifact_key(params.name), description="campaign funnel"
    )
    return report
