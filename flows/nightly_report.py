"""The nightly report flow: Parquet exports of the ledger per campaign, and an artifact
linking them (deployments/prefect.yaml: every night at 02:30 Europe/Rome)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.reports import export_ledger


@flow(name="nightly-report", log_prints=False)
def nightly_report_flow(days: float | None = 7) -> dict[str, Any]:
    """Export the campaigns changed in the last ``days`` (every campaign with None)."""
    result = export_ledger(days)
    create_markdown_artifact(
        result["markdown"], key="nightly-report", description="ledger exports (Parquet)"
    )
    get_run_logger().info(
        "exported %s campaigns (%s deliveries) to %s",
        result["campaigns"],
        result["deliveries"],
        result["directory"],
    )
    return {k: v for k, v in result.items() if k != "markdown"}
