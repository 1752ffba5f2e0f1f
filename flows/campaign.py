"""The campaign flow: target → plan → deliver chunks in parallel → report artifacts."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.sending import approval_gate, due_now, schedule_slots
from recapito.campaign import CampaignParams
from recapito.report import domain_rows, funnel_markdown, pacing_markdown, text_summary
from tasks.campaign import build_report, deliver_chunk, due_retries, prepare_campaign
from tasks.pec import check_pec_credentials, deliver_pec_chunk
from tasks.sending import slot_status


def _deliver(
    params: CampaignParams,
    prepared: dict[str, Any],
    chunks: dict[int, str],
    round_: int,
    progress: UUID | None,
) -> None:
    """Run chunk tasks with at most ``parallel_chunks`` in flight (chunk -> retry token)."""
    logger = get_run_logger()
    pending: list[PrefectFuture[dict[str, Any]]] = []
    queue = sorted(chunks)
    done = 0
    paced = {"paced_messages": 0.0, "paced_seconds": 0.0, "paced_pauses": 0.0}
    pacing_status: dict[str, Any] | None = None
    while queue or pending:
        while queue and len(pending) < params.parallel_chunks:
            chunk = queue.pop(0)
            pending.append(
                deliver_chunk.submit(
                    params,
                    chunk,
                    prepared["campaign_key"],
                    prepared["template_hash"],
                    round_,
                    chunks[chunk],
                )
            )
        if not pending:
            break
        finished, not_done = wait(pending, timeout=1.0)
        for future in finished:
            result = future.result()
            done += 1
            logger.info(
                "chunk %s (round %s): %s claimed, outcomes %s",
                result.get("chunk"),
                round_,
                result.get("claimed"),
                result.get("outcomes"),
            )
            for key in paced:
                paced[key] += float(result.get(key, 0) or 0)
            if "pacing" in result:
                pacing_status = result["pacing"]
        pending = list(not_done)
        if finished and progress is not None:
            update_progress_artifact(progress, progress=100.0 * done / len(chunks))
        if finished and pacing_status is not None:
            create_markdown_artifact(
                pacing_markdown(pacing_status, paced, done, len(chunks)),
                key=f"{_artifact_key(params.name)}-pacing",
                description="campaign pacing (rate, waves) while delivering",
            )


def _deliver_pec(params: CampaignParams, prepared: dict[str, Any]) -> None:
    """PEC chunk tasks (chunk -> token of its planned PEC rows), ``parallel_chunks`` at once."""
    chunks = {int(k): v for k, v in prepared.get("pec_chunks", {}).items()}
    if not chunks:
        return
    logger = get_run_logger()
    expiring = check_pec_credentials(list(params.pec_mailbox_blocks))
    if expiring:
        logger.warning("%s PEC mailbox credential(s) expire soon", len(expiring))
    queue = sorted(chunks)
    pending: list[PrefectFuture[dict[str, Any]]] = []
    while queue or pending:
        while queue and len(pending) < params.parallel_chunks:
            chunk = queue.pop(0)
            pending.append(
                deliver_pec_chunk.submit(
                    params,
                    chunk,
                    prepared["campaign_key"],
                    prepared["template_hash"],
                    chunks[chunk],
                )
            )
        finished, not_done = wait(pending, timeout=1.0)
        for future in finished:
            result = future.result()
            logger.info(
                "PEC chunk %s: %s claimed, outcomes %s, per mailbox %s",
                result.get("chunk"),
                result.get("claimed"),
                result.get("outcomes"),
                result.get("per_mailbox"),
            )
        pending = list(not_done)


def _artifact_key(name: str) -> str:
    return "campaign-" + "".join(c if c.isalnum() else "-" for c in name.lower())[:80]


@flow(
    name="campaign",
    task_runner=ThreadPoolTaskRunner(max_workers=16),  # type: ignore[arg-type]
    log_prints=False,
    flow_run_name="campaign-{params.name}",
)
def campaign_flow(params: CampaignParams) -> dict[str, Any]:
    logger = get_run_logger()
    prepared = prepare_campaign(params)
    # chunks that still hold planned rows -> token of that work (JSON keys are strings)
    chunks = {int(k): v for k, v in prepared["chunks"].items()}
    counts = prepared["counts"]
    logger.info(
        "targeted %s of %s contacts (%s rejected, %s filtered out) in %s chunks",
        counts.get("targeted"),
        counts.get("contacts"),
        counts.get("rejected"),
        counts.get("filtered_out"),
        len(chunks),
    )
    if not approval_gate(params, prepared):  # above approval_threshold: pause for approval
        report = build_report(params.name)
        create_markdown_artifact(
            funnel_markdown(report), key=_artifact_key(params.name), description="campaign funnel"
        )
        return report
    # sending modes: chunks whose slot has come go now; later slots are scheduled runs of
    # the campaign-slot deployment, or waited for here (flows/sending.py)
    all_chunks = chunks
    chunks, pec_now, future = due_now(params, prepared)
    waiting = schedule_slots(params, prepared, future)
    progress = create_progress_artifact(
        progress=0.0, key=f"{_artifact_key(params.name)}-progress", description="chunks delivered"
    )
    _deliver(params, prepared, chunks, 0, progress)
    _deliver_pec(params, {**prepared, "pec_chunks": pec_now})
    pec_all = {int(k): v for k, v in prepared.get("pec_chunks", {}).items()}
    for at, slot_chunks in sorted(waiting.items()):
        wait = (datetime.fromisoformat(at) - datetime.now(UTC)).total_seconds()
        logger.info("slot %s: waiting %.0f s for its %s chunks", at, wait, len(slot_chunks))
        time.sleep(max(0.0, wait))
        _deliver(
            params, prepared, {c: all_chunks[c] for c in slot_chunks if c in all_chunks}, 0, None
        )
        _deliver_pec(
            params, {**prepared, "pec_chunks": {c: pec_all[c] for c in slot_chunks if c in pec_all}}
        )
    # deferred mail (greylisting, 4xx): what is already due is retried now, and the run
    # waits up to retry_within_run_seconds for more to come due
    deadline = time.monotonic() + params.retry_within_run_seconds
    round_ = 0
    while True:
        due = due_retries(params, max(0.0, deadline - time.monotonic()))
        if not due["chunks"]:
            break
        round_ += 1
        logger.info(
            "retry round %s: %s chunks with deferred mail, due in %.1f s",
            round_,
            len(due["chunks"]),
            due["wait_seconds"],
        )
        time.sleep(due["wait_seconds"])
        _deliver(params, prepared, due["chunks"], round_, None)
        if time.monotonic() >= deadline:
            break
    report = build_report(params.name, finish=True)
    if prepared.get("slots") and slot_status(params.name, prepared["slots"]):
        report["status"] = "scheduled"  # slots still to come (scheduled campaign-slot runs)
    key = _artifact_key(params.name)
    create_markdown_artifact(funnel_markdown(report), key=key, description="campaign funnel")
    create_table_artifact(domain_rows(report), key=f"{key}-domains", description="per domain")
    logger.info(text_summary(report))
    return report
