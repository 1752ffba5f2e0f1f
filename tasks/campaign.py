"""Campaign tasks: each calls one core function; retries only on transient errors."""

from __future__ import annotations

from typing import Any

import sqlalchemy.exc
from prefect import Task, get_client, task
from prefect.client.schemas.objects import TaskRun
from prefect.concurrency.sync import rate_limit
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.states import State

from recapito import campaign as core
from recapito.config import Settings
from recapito.delivery.engine import Permits
from recapito.errors import TransientError
from recapito.ledger import Ledger
from recapito.report import campaign_report
from recapito.sending.slots import slot_plan


def transient_only(task_: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry on network and database hiccups, never on bad input or a bad template."""
    try:
        state.result()
    except (TransientError, OSError, TimeoutError, sqlalchemy.exc.OperationalError):
        return True
    except Exception:
        return False
    return False


def chunk_cache_key(_ctx: TaskRunContext, parameters: dict[str, Any]) -> str:
    """campaign:channel:chunk:template-hash (+ retry round), the campaign being its ledger row.

    The ledger row id and creation time are part of the key so that a fresh ledger (a new
    database, a test run) never inherits the cached results of another one.
    """
    params: core.CampaignParams = parameters["params"]
    return (
        f"recapito:{params.name}:{parameters['campaign_key']}:email:"
        f"{parameters['chunk']}:{parameters['template_hash']}:round{parameters['round']}"
        f":{parameters['work_token']}"
    )


@task(name="target-and-plan", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def prepare_campaign(params: core.CampaignParams) -> dict[str, Any]:
    prepared = core.prepare(params, Settings.load())
    ledger = Ledger(Settings.load().db_url, run_migrations=False)
    try:
        campaign = ledger.campaign_by_id(prepared.campaign_id)
    finally:
        ledger.close()
    return {
        "campaign_id": prepared.campaign_id,
        "campaign_key": f"{campaign.id}@{campaign.created_at.isoformat()}",
        "chunks": {str(k): v for k, v in prepared.chunks.items()},
        "pec_chunks": {str(k): v for k, v in (prepared.pec_chunks or {}).items()},
        "counts": prepared.counts,
        "template_hash": prepared.template_hash,
        "audience_path": prepared.audience_path,
        # sending modes: slot (ISO UTC) -> its chunks; empty when sending immediately
        "slots": slot_plan(prepared.audience_path),
    }


@task(
    name="deliver-chunk",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=transient_only,
    cache_key_fn=chunk_cache_key,
    persist_result=True,
    task_run_name="deliver-chunk-{chunk}-round-{round}",
)
def deliver_chunk(
    params: core.CampaignParams,
    chunk: int,
    campaign_key: str,
    template_hash: str,
    round: int,
    work_token: str,
) -> dict[str, Any]:
    """Send one chunk. Round 0 sends its planned rows; later rounds retry its deferred mail.
    ``work_token`` identifies those rows, so a cached result is reused only for the same work
    (rows released after a crash, or newly due, make a new token)."""
    return core.deliver_chunk(params, chunk, Settings.load(), permits=shared_permits(params))


def ensure_global_limit(name: str, limit: int, decay: float | None) -> None:
    """Create or update a Prefect global concurrency limit (with slot decay: a rate), once:
    left alone when it already holds these values; several tasks may race to create it."""
    with get_client(sync_client=True) as client:
        try:
            current = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            current = None
        if current is not None and (current.limit, current.slot_decay_per_second) == (
            limit,
            decay,
        ):
            return
        try:
            client.upsert_global_concurrency_limit_by_name(
                name, limit=limit, slot_decay_per_second=decay
            )
        except ObjectAlreadyExists:
            # another task created it at the same moment: make sure it is current
            client.upsert_global_concurrency_limit_by_name(
                name, limit=limit, slot_decay_per_second=decay
            )


def shared_rate_limit_name(params: core.CampaignParams) -> str:
    return f"recapito-rate-{params.name}"


def shared_permits(params: core.CampaignParams) -> Permits | None:
    """Sending permits from a Prefect global concurrency limit with slot decay, so every
    worker of the campaign, on any host, shares its rate (DESIGN §4)."""
    if not params.shared_rate_limit:
        return None
    per_second = (params.rate_per_minute or 0) / 60 or (params.rate_per_hour or 0) / 3600
    if params.rate_per_minute and params.rate_per_hour:
        per_second = min(params.rate_per_minute / 60, params.rate_per_hour / 3600)
    name = shared_rate_limit_name(params)
    # room for a few seconds of messages; slots free up at the campaign's rate
    capacity = max(1, min(1000, round(per_second * 10)))
    ensure_global_limit(name, capacity, per_second)
    block = max(1, min(capacity, 10))

    def take(n: int) -> int:
        granted = min(n, block)
        rate_limit(name, occupy=granted, strict=True)
        return granted

    return take


@task(name="due-retries", retries=2, retry_condition_fn=transient_only)
def due_retries(params: core.CampaignParams, within_seconds: float) -> dict[str, Any]:
    return core.due_retries(params, Settings.load(), within_seconds)


@task(name="campaign-report", retries=2, retry_condition_fn=transient_only)
def build_report(name: str, finish: bool = False) -> dict[str, Any]:
    """The campaign's figures; with ``finish`` also its status after this run:
    ``completed`` when nothing is left to send, ``waiting_retry`` while deferred mail
    remains (run the campaign again to retry it once due)."""
    ledger = Ledger(Settings.load().db_url, run_migrations=False)
    try:
        campaign = ledger.get_campaign(name)
        if campaign is not None and finish:
            states = ledger.state_counts(campaign.id)
            open_rows = sum(states.get(s, 0) for s in ("planned", "claimed", "deferred"))
            ledger.update_campaign(
                campaign.id, status="waiting_retry" if open_rows else "completed"
            )
        return campaign_report(ledger, name)
    finally:
        ledger.close()


# ---- retry-deferred -------------------------------------------------------------------------


@task(name="find-due-retries", retries=2, retry_condition_fn=transient_only)
def find_due_retries(campaign: str | None = None) -> dict[str, Any]:
    """The campaigns with deferred mail due now (``targets``) and those skipped, with why."""
    targets, skipped = core.due_retry_targets(Settings.load(), campaign)
    return {
        "targets": [
            {
                "name": t.name,
                "params": t.params,
                "campaign_key": t.campaign_key,
                "template_hash": t.template_hash,
                "chunks": t.chunks,
                "pec_chunks": t.pec_chunks,
            }
            for t in targets
        ],
        "skipped": skipped,
    }


def retry_cache_key(ctx: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Like ``chunk_cache_key``, plus the flow run: a retried or restarted retry-deferred
    run skips the chunks it already did, but a later scheduled run never reuses them."""
    params: core.CampaignParams = parameters["params"]
    return (
        f"recapito:{params.name}:{parameters['campaign_key']}:email:{parameters['chunk']}:"
        f"{parameters['template_hash']}:retry:{parameters['work_token']}:{ctx.task_run.flow_run_id}"
    )


@task(
    name="retry-chunk",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=transient_only,
    cache_key_fn=retry_cache_key,
    persist_result=True,
    task_run_name="retry-{params.name}-chunk-{chunk}",
)
def retry_chunk(
    params: core.CampaignParams,
    chunk: int,
    campaign_key: str,
    template_hash: str,
    work_token: str,
) -> dict[str, Any]:
    """Send the due deferred rows of one chunk, through the same engine and ledger path
    as the campaign run; planned, sent and uncertain rows are never taken."""
    return core.deliver_chunk(
        params, chunk, Settings.load(), only_deferred=True, permits=shared_permits(params)
    )


@task(name="finish-retries", retries=2, retry_condition_fn=transient_only)
def finish_retries(names: list[str]) -> dict[str, str]:
    return core.finish_retries(Settings.load(), names)
