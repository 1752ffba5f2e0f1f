"""Tasks for sending modes and approval: each calls one core function."""

from __future__ import annotations

from typing import Any

from prefect import task

from recapito import campaign as core
from recapito.config import Settings
from recapito.sending import approval
from tasks.campaign import transient_only


@task(name="needs-approval", retries=2, retry_condition_fn=transient_only)
def needs_approval(params: core.CampaignParams) -> bool:
    return approval.needs_approval(params, Settings.load())


@task(name="approval-preview", retries=2, retry_condition_fn=transient_only)
def approval_preview(params: core.CampaignParams) -> dict[str, Any]:
    """Counts per channel and TLS level, the slots, and one sample with masked addresses."""
    settings = Settings.load()
    data = approval.preview(params, settings)
    approval.mark_awaiting(settings, params.name)
    return data


@task(name="record-approval", retries=2, retry_condition_fn=transient_only)
def record_approval(name: str, approved: bool, note: str) -> str:
    return approval.record_decision(Settings.load(), name, approved, note)


@task(name="slot-status", retries=2, retry_condition_fn=transient_only)
def slot_status(name: str, plan: dict[str, list[int]]) -> bool:
    """True (and the campaign ``scheduled``) while future slots still hold planned rows."""
    return approval.future_slot_status(Settings.load(), name, plan)
