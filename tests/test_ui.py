"""`make serve` end to end, looked at in the Prefect UI with headless Chromium.

Starts ``python -m recapito.serve`` (Prefect server, sandbox, process worker, every
deployment of deployments/prefect.yaml) on free ports and a home of its own, launches the
campaign deployment and the send-message deployment through the REST API (as the README's
curl example does), waits for the worker to run them, then opens the campaign's flow run
in the UI, finds its artifacts and saves a screenshot under var/.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[1]
CHROMIUM = Path("/usr/bin/chromium")
PORTS = ("--mx-port", "0", "--dns-port", "0")
TEMPLATE = ROOT / "src" / "recapito" / "sandbox" / "demo_template"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium missing (.ci/run installs chromium)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    method = "POST" if data else "GET"
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method=method
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.load(resp)


def _wait_done(api: str, run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api(f"{api}/flow_runs/{run_id}")
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return dict(run)
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not finished in {timeout} s")


def test_serve_deployments_and_campaign_run_in_the_ui(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(RECAPITO_HOME=str(tmp_path), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("RECAPITO_DB_URL", None)
    log = (tmp_path / "serve.log").open("w+b")
    serve = subprocess.Popen(
        [sys.executable, "-m", "recapito.serve", "--prefect-port", str(port), *PORTS],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while b"Prefect UI:" not in (tmp_path / "serve.log").read_bytes():
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(1)
        deployments = {d["name"]: d for d in _api(f"{api}/deployments/filter", {})}
        assert {
            "campaign",
            "campaign-slot",
            "send-message",
            "retry-deferred",
            "bounce-collector",
            "pec-receipts",
            "nightly-report",
        } <= set(deployments)
        nightly = deployments["nightly-report"]["schedules"][0]["schedule"]
        assert (nightly["cron"], nightly["timezone"]) == ("30 2 * * *", "Europe/Rome")
        automations = _api(f"{api}/automations/filter", {})
        assert any("send-message" in a["name"] for a in automations)

        contacts = tmp_path / "ui-contacts.csv"
        contacts.write_text(
            "id;nome;email;citta;provincia;segmento\n"
            "U1;Anna;anna.ui@postaveloce.test;Milano;MI;private\n"
            "U2;Luca;luca.ui@mailitalia.test;Roma;RM;retail\n",
            encoding="utf-8",
        )
        params = {
            "name": "ui-test",
            "contacts": str(contacts),
            "template": str(TEMPLATE),
            "sender": "comunicazioni@banca-esempio.test",
        }
        campaign = _api(
            f"{api}/deployments/{deployments['campaign']['id']}/create_flow_run",
            {"parameters": {"params": params}},
        )
        tpl = tmp_path / "otp"
        tpl.mkdir()
        (tpl / "template.toml").write_text('subject = "Codice {{ codice }}"\n')
        (tpl / "body.html").write_text("<p>Il codice è {{ codice }}</p>")
        message = _api(
            f"{api}/deployments/{deployments['send-message']['id']}/create_flow_run",
            {
                "parameters": {
                    "template": str(tpl),
                    "contact": {"email": "eva.ui@postaveloce.test", "codice": "123"},
                    "message_key": "ui-1",
                }
            },
        )
        done = _wait_done(api, campaign["id"], 150)
        assert done["state_type"] == "COMPLETED", (tmp_path / "prefect" / "worker.log").read_text()
        sent = _wait_done(api, message["id"], 90)
        assert sent["state_type"] == "COMPLETED"

        from playwright.sync_api import sync_playwright

        ui = f"http://127.0.0.1:{port}"
        shot = ROOT / "var" / "ui-campaign-run.png"
        shot.parent.mkdir(exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=str(CHROMIUM),
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            )
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(f"{ui}/runs", wait_until="networkidle")
            page.get_by_text("campaign-ui-test").first.wait_for(timeout=30_000)
            page.goto(f"{ui}/runs/flow-run/{campaign['id']}", wait_until="networkidle")
            page.get_by_text("campaign-ui-test").first.wait_for(timeout=30_000)
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("campaign-ui-test-domains").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            raise
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()
    assert b"stopping the worker" in (tmp_path / "serve.log").read_bytes()
