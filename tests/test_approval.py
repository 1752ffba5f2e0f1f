"""Approval: a campaign above its threshold pauses before delivery until resumed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from recapito.campaign import CampaignParams
from recapito.config import Settings
from recapito.ledger import Ledger
from recapito.sandbox.check import compare_with_maildirs
from recapito.sandbox.runtime import Sandbox

pytestmark = pytest.mark.prefect

SENDER = "comunicazioni@banca-esempio.test"


@pytest.fixture
def home(sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path))
    monkeypatch.delenv("RECAPITO_DB_URL", raising=False)
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    yield tmp_path


def _params(home: Path, name: str, n: int = 4) -> CampaignParams:
    tpl = home / "tpl"
    tpl.mkdir(exist_ok=True)
    (tpl / "template.toml").write_text('subject = "Ciao {{ nome }}"\n')
    (tpl / "body.html").write_text("<p>Ciao {{ nome }}, scrivi a {{ email }}</p>")
    lines = ["id;nome;email"] + [f"{name}{i};Nome{i};{name}.{i}@postaveloce.test" for i in range(n)]
    contacts = home / f"{name}.csv"
    contacts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return CampaignParams(
        name=name,
        contacts=str(contacts),
        template=str(tpl),
        sender=SENDER,
        approval_threshold=2,
    )


class Approver(threading.Thread):
    """Waits for paused runs of campaign ``name`` and answers each with the next answer."""

    def __init__(self, name: str, answers: list[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.name_ = name
        self.answers = answers
        self.resumed: list[UUID] = []
        self.artifact: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        from prefect import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterKey,
            FlowRunFilter,
            FlowRunFilterName,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        with get_client(sync_client=True) as client:
            while not self.stop.is_set() and self.answers:
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        name=FlowRunFilterName(any_=[f"campaign-{self.name_}"]),
                        state=FlowRunFilterState(
                            type=FlowRunFilterStateType(any_=[StateType.PAUSED])
                        ),
                    )
                )
                for run in runs:
                    if self.artifact is None:
                        found = client.read_artifacts(
                            artifact_filter=ArtifactFilter(
                                key=ArtifactFilterKey(any_=[f"campaign-{self.name_}-approval"])
                            )
                        )
                        self.artifact = str(found[0].data) if found else ""
                    client.resume_flow_run(run.id, run_input=self.answers.pop(0))
                    self.resumed.append(run.id)
                time.sleep(0.5)


def _task_runs(flow_run_id: UUID, name: str) -> int:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)),
        )
    return len(runs)


def test_approved_campaign_resumes_without_redoing_work(
    prefect_harness: None, home: Path, sandbox: Sandbox
) -> None:
    from flows.campaign import campaign_flow

    params = _params(home, "appr-yes")
    approver = Approver("appr-yes", [{"approve": True, "note": "ok, visto"}])
    approver.start()
    state = campaign_flow(params, return_state=True)
    approver.stop.set()
    report = state.result()
    assert len(approver.resumed) == 1
    assert report["funnel"]["accepted"] == 4 and report["status"] == "completed"
    # the preview: counts and a sample, the addresses masked
    assert approver.artifact and "4 recipients" in approver.artifact
    assert "a***@postaveloce.test" in approver.artifact
    assert "appr-yes.0@" not in approver.artifact
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    assert _task_runs(flow_run_id, "target-and-plan") == 1  # prepared once, before the pause
    ledger = Ledger(Settings.load().db_url)
    try:
        camp = ledger.get_campaign("appr-yes")
        assert camp is not None
        assert camp.counts["approval"]["approved"] is True
        assert camp.counts["approval"]["note"] == "ok, visto"
        assert [e["kind"] for e in ledger.events_of(camp.id, "approval")] == ["approval"]
    finally:
        ledger.close()
    # approved once: a re-run neither asks again nor resends
    watcher = Approver("appr-yes", [{"approve": False, "note": "should not be asked"}])
    watcher.start()
    again = campaign_flow(params)
    watcher.stop.set()
    assert watcher.resumed == [] and again["funnel"]["accepted"] == 4
    ledger = Ledger(Settings.load().db_url)
    try:
        check = compare_with_maildirs(ledger, "appr-yes", sandbox.maildir_root)
    finally:
        ledger.close()
    assert (check["stored"], check["duplicates"]) == (4, 0)


def test_rejected_campaign_ends_cleanly_and_sends_nothing(
    prefect_harness: None, home: Path, sandbox: Sandbox
) -> None:
    from flows.campaign import campaign_flow

    params = _params(home, "appr-no")
    approver = Approver("appr-no", [{"approve": False, "note": "testo da rivedere"}])
    approver.start()
    state = campaign_flow(params, return_state=True)
    approver.stop.set()
    assert state.is_completed()
    report = state.result()
    assert report["status"] == "rejected"
    assert report["funnel"]["accepted"] == 0 and report["funnel"]["pending"] == 4
    assert _task_runs(state.state_details.flow_run_id, "deliver-chunk") == 0  # type: ignore[arg-type]
    ledger = Ledger(Settings.load().db_url)
    try:
        check = compare_with_maildirs(ledger, "appr-no", sandbox.maildir_root)
    finally:
        ledger.close()
    assert check["stored"] == 0


def test_small_campaign_needs_no_approval(prefect_harness: None, home: Path) -> None:
    from flows.campaign import campaign_flow

    report = campaign_flow(_params(home, "appr-small", n=2))  # at the threshold: no pause
    assert report["funnel"]["accepted"] == 2 and report["status"] == "completed"
