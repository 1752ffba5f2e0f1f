"""The retry-deferred flow: deferred mail (greylisting, 4xx) and PEC, of every campaign, once due.

Scheduled every few minutes (deployments/prefect.yaml). One task finds the campaigns with
deferred rows due now; when there are none the run ends there. Otherwise each chunk holding
such rows is sent again through the campaign's own engine path and ledger (deferred PEC
rows through the PEC path: provider traffic limits, 4xx), at most ``parallel_chunks`` of a
campaign at a time.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.campaign import find_due_retries, finish_retries, retry_chunk
from tasks.pec import retry_pec_chunk


@flow(
    name="retry-deferred",
    task_runner=ThreadPoolTaskRunner(max_workers=8),  # type: ignore[arg-type]
    log_prints=False,
)
def retry_deferred_flow(campaign: str | None = None) -> dict[str, Any]:
    """Retry the deferred mail that is due, of ``campaign`` or of every campaign."""
    logger = get_run_logger()
    due = find_due_retries(campaign)
    for name, reason in due["skipped"].items():
        logger.warning("campaign %r not retried: %s", name, reason)
    if not due["targets"]:
        logger.info("no deferred mail is due")
        return {"campaigns": {}, "skipped": due["skipped"]}
    summary: dict[str, dict[str, int]] = {}
    for target in due["targets"]:
        params = target["params"]
        counts = summary.setdefault(target["name"], {"chunks": 0, "claimed": 0})
        pending: list[PrefectFuture[dict[str, Any]]] = []
        # e-mail chunks through the engine, PEC chunks through the PEC path (its mailboxes
        # and their shared limits): each task takes only its channel's due deferred rows
        queue = [(retry_chunk, c, t) for c, t in sorted(target["chunks"].items())]
        queue += [(retry_pec_chunk, c, t) for c, t in sorted(target.get("pec_chunks", {}).items())]
        while queue or pending:
            while queue and len(pending) < params.parallel_chunks:
                task_, chunk, token = queue.pop(0)
                pending.append(
                    task_.submit(
                        params, chunk, target["campaign_key"], target["template_hash"], token
                    )
                )
            finished, not_done = wait(pending, timeout=1.0)
            for future in finished:
                result = future.result()
                counts["chunks"] += 1
                counts["claimed"] += int(result.get("claimed", 0))
                for outcome, n in (result.get("outcomes") or {}).items():
                    counts[outcome] = counts.get(outcome, 0) + int(n)
            pending = list(not_done)
        logger.info("campaign %r: retried %s", target["name"], counts)
    statuses = finish_retries(sorted(summary))
    return {"campaigns": summary, "statuses": statuses, "skipped": due["skipped"]}
