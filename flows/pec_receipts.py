"""The PEC receipt collector flow: every PEC mailbox polled, receipts applied, timeouts checked.

Scheduled every 5 minutes (deployments/prefect.yaml). Mailboxes and credentials come from the
PEC mailbox settings (``recapito.pec.collector.receipt_mailboxes``), never from parameters.
Artifacts hold counts only, never addresses; an alert artifact appears when PEC messages
wait too long for their acceptance receipt.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from recapito.pec.timeouts import alert_markdown
from tasks.pec_receipts import apply_pec_timeouts, collect_pec_receipts


@flow(name="pec-receipts", log_prints=False)
def pec_receipts_flow(limit: int | None = None) -> dict[str, Any]:
    """Collect the unseen messages of every PEC mailbox (at most ``limit`` each), then apply
    the acceptance and delivery timeouts."""
    logger = get_run_logger()
    result = collect_pec_receipts(limit)
    timeouts = apply_pec_timeouts()
    logger.info(
        "PEC mailboxes: %s seen, %s archived, %s quarantined; %s delivery timeouts, "
        "%s awaiting acceptance too long",
        result["seen"],
        result["archived"],
        result["quarantined"],
        timeouts["delivery_timeout"],
        timeouts["acceptance_overdue"],
    )
    rows = [
        ("messages seen", result["seen"]),
        ("archived", result["archived"]),
        ("quarantined", result["quarantined"]),
        ("receipts correlated", result["correlated"]),
        ("receipts not correlated", result["uncorrelated"]),
        ("invalid signatures (quarantined)", result["rejected_signatures"]),
        ("not receipts (quarantined)", result["not_receipts"]),
        ("already processed", result["duplicates"]),
        ("delivery timeouts (24 h)", timeouts["delivery_timeout"]),
        ("acceptance overdue", timeouts["acceptance_overdue"]),
    ]
    lines = ["# PEC receipt collector", "", "| | messages |", "|---|---:|"]
    lines += [f"| {label} | {n:,} |" for label, n in rows]
    lines += ["", "| mailbox | seen | archived | quarantined |", "|---|---:|---:|---:|"]
    lines += [
        f"| {name} | {m['seen']:,} | {m['archived']:,} | {m['quarantined']:,} |"
        for name, m in sorted(result["mailboxes"].items())
    ]
    lines += [f"| {name} | unreachable | | |" for name in sorted(result["errors"])]
    lines += ["", "| kind | messages |", "|---|---:|"]
    lines += [f"| {k} | {n:,} |" for k, n in sorted(result["by_kind"].items())]
    lines += ["", "| new state | deliveries |", "|---|---:|"]
    lines += [f"| {k} | {n:,} |" for k, n in sorted(result["transitions"].items())]
    create_markdown_artifact(
        "\n".join(lines) + "\n", key="pec-receipts", description="PEC mailboxes poll"
    )
    alert = alert_markdown(timeouts)
    if alert is not None:
        create_markdown_artifact(alert, key="pec-timeouts", description="PEC timeouts alert")
    return {**result, "timeouts": timeouts}
