"""Analyst notebooks execute against a ledger; deployments point at real flows."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from recapito.ledger import Ledger, Outcome, PlannedDelivery, State

ROOT = Path(__file__).parents[1]


def test_campaign_overview_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'recapito.db'}")
    camp = ledger.ensure_campaign("nb", sender="a@b.test", template_hash="h" * 64, params={})
    ledger.plan(
        camp.id,
        [PlannedDelivery(str(i), f"u{i}@d{i % 3}.test", f"d{i % 3}.test", 0) for i in range(9)],
    )
    claims = ledger.claim_chunk(camp.id, 0, worker="nb")
    for claim in claims[:6]:
        ledger.record(claim, Outcome(State.ACCEPTED, reply_code=250, tls_version="TLSv1.3"))
    for claim in claims[6:]:
        ledger.record(claim, Outcome(State.FAILED, reply_code=550, reason="user_unknown"))
    ledger.close()
    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path))
    monkeypatch.delenv("RECAPITO_DB_URL", raising=False)
    nb = nbformat.read(ROOT / "notebooks" / "campaign_overview.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )
    assert "nb planned" in outputs or "nb created" in outputs
    assert "TLSv1.3" in outputs and "accepted" in outputs


def test_deployments_reference_loadable_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    monkeypatch.chdir(ROOT)
    names = set()
    for deployment in spec["deployments"]:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        names.add(flow.name)
        assert deployment["work_pool"]["name"] == "recapito-local"
    assert "campaign" in names
    assert os.path.exists(ROOT / "flows" / "campaign.py")
