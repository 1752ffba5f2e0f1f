"""Sending modes and approval inside the campaign flows (orchestration only).

* Approval: above ``approval_threshold`` recipients the run publishes a preview artifact
  and pauses (``pause_flow_run`` with an ``ApprovalInput`` form) before anything is sent.
* Slots (``recapito.sending.slots``): the chunks of slots that have come are sent by the
  run; each future slot becomes a scheduled run of the ``campaign-slot`` deployment
  (one per slot, idempotency key campaign + slot, so a re-run never schedules twice), or,
  without that deployment, the run waits for it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import FlowPauseTimeout, ObjectNotFound
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from recapito.campaign import CampaignParams
from recapito.sending.approval import preview_markdown
from recapito.sending.slots import split_due
from tasks.sending import approval_preview, needs_approval, record_approval

SLOT_DEPLOYMENT = "campaign-slot/campaign-slot"
APPROVAL_POLL_SECONDS = 3


class ApprovalInput(RunInput):
    """The approver's answer, a form in the Prefect UI when the run is paused."""

    approve: bool = Field(False, description="Deliver the campaign (false rejects it)")
    note: str = Field("", description="Why (kept in the ledger with the decision)")


def artifact_key(name: str) -> str:
    return "campaign-" + "".join(c if c.isalnum() else "-" for c in name.lower())[:80]


def approval_gate(params: CampaignParams, prepared: dict[str, Any]) -> bool:
    """True when the campaign may be delivered: under the threshold, approved before,
    or approved now. A rejection (or no answer in time) is recorded, nothing is sent."""
    if params.approval_threshold is None or not needs_approval(params):
        return True  # (no task run at all for campaigns without a threshold)
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    data = approval_preview(params)
    create_markdown_artifact(
        preview_markdown(data),
        key=f"{artifact_key(params.name)}-approval",
        description="approval preview: counts and a sample with masked addresses",
    )
    logger.info(
        "campaign %r: %s recipients, above the approval threshold of %s: waiting for approval",
        params.name,
        data["recipients"],
        params.approval_threshold,
    )
    form = ApprovalInput.with_initial_data(
        description=f"Approve campaign **{params.name}** ({data['recipients']:,} recipients)? "
        "See the approval artifact.",
        approve=False,
    )
    try:
        answer = pause_flow_run(
            wait_for_input=form,
            timeout=int(params.approval_timeout_hours * 3600),
            poll_interval=APPROVAL_POLL_SECONDS,
            key=f"approval-{prepared['campaign_id']}",  # lowercase, digits, dashes only
        )
    except FlowPauseTimeout:
        record_approval(params.name, False, "no answer before the approval timeout")
        logger.warning("campaign %r: no approval in time, rejected", params.name)
        return False
    status = record_approval(params.name, answer.approve, answer.note)
    logger.info("campaign %r: %s", params.name, status)
    return bool(answer.approve)


def due_now(
    params: CampaignParams, prepared: dict[str, Any]
) -> tuple[dict[int, str], dict[int, str], dict[str, list[int]]]:
    """E-mail and PEC chunks (chunk -> token) to send now, and the future slots."""
    chunks = {int(k): v for k, v in prepared["chunks"].items()}
    pec = {int(k): v for k, v in (prepared.get("pec_chunks") or {}).items()}
    plan: dict[str, list[int]] = prepared.get("slots") or {}
    if not plan:
        return chunks, pec, {}
    due, future = split_due(plan, datetime.now(UTC))
    keep = set(due)
    # a future slot whose rows are all sent (a re-run) needs nothing more
    open_ = set(chunks) | set(pec)
    future = {at: c for at, c in future.items() if open_ & set(c)}
    return (
        {c: t for c, t in chunks.items() if c in keep},
        {c: t for c, t in pec.items() if c in keep},
        future,
    )


def _slot_deployment(params: CampaignParams) -> Any:
    if params.slot_dispatch == "in_flow":
        return None
    if params.slot_dispatch == "auto":
        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None or ctx.flow_run.deployment_id is None:
            return None  # run in-process (CLI, demo, tests): no worker to run slot runs
    from prefect import get_client

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(SLOT_DEPLOYMENT)
        except ObjectNotFound:
            if params.slot_dispatch == "deployment":
                raise
            return None


def schedule_slots(
    params: CampaignParams, prepared: dict[str, Any], future: dict[str, list[int]]
) -> dict[str, list[int]]:
    """Future slots as scheduled runs of the campaign-slot deployment; returns the slots
    this run must wait for itself (all of them when there is no such deployment)."""
    if not future:
        return {}
    logger = get_run_logger()
    deployment = _slot_deployment(params)
    rows = []
    for at, chunk_list in sorted(future.items()):
        when = datetime.fromisoformat(at)
        run_id = "(this run waits)"
        if deployment is not None:
            run = run_deployment(
                deployment.id,
                parameters={"params": params.model_dump(mode="json"), "slot": at},
                scheduled_time=when,
                timeout=0,
                idempotency_key=f"recapito:{prepared['campaign_key']}:slot:{at}",
                flow_run_name=f"{params.name} slot {when:%Y-%m-%d %H:%M:%S} UTC",
                tags=["recapito", "campaign-slot"],
            )
            run_id = str(getattr(run, "id", run))  # sync call: a FlowRun
        rows.append(
            {
                "slot_utc": at,
                "slot_local": when.astimezone(ZoneInfo(params.default_timezone)).isoformat(),
                "chunks": len(chunk_list),
                "flow_run": run_id,
            }
        )
    create_table_artifact(
        rows,
        key=f"{artifact_key(params.name)}-slots",
        description=f"future slots of {params.sending_mode} sending",
    )
    logger.info(
        "%s future slots %s", len(rows), "scheduled" if deployment else "waited for in this run"
    )
    return {} if deployment is not None else future
