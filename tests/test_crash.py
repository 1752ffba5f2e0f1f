"""SIGKILL in the middle of a chunk: run again, and every message is in the sink exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import sqlalchemy as sa

from recapito.campaign import CampaignParams, prepare
from recapito.config import Settings
from recapito.ledger import Ledger
from recapito.ledger.schema import deliveries
from recapito.sandbox.runtime import Sandbox

WORKER = """
import json, sys
from recapito.campaign import CampaignParams, deliver_chunk
from recapito.config import Settings
params = CampaignParams.model_validate(json.loads(sys.argv[1]))
deliver_chunk(params, 0, Settings.load())
"""


def test_sigkill_mid_chunk_then_rerun(sandbox: Sandbox, tmp_path: Path) -> None:
    env = {**os.environ, "RECAPITO_HOME": str(tmp_path), **sandbox.env()}
    settings = Settings.load(env)
    contacts = tmp_path / "c.csv"
    domains = ("mailitalia.test", "postaveloce.test", "casella.test")
    lines = ["id;email;nome"] + [f"K{i};crash{i}@{domains[i % 3]};Nome{i}" for i in range(2400)]
    contacts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "template.toml").write_text('subject = "Ciao {{ nome }}"\n')
    (tpl / "body.html").write_text("<p>Ciao {{ nome }}</p>" * 200)
    params = CampaignParams(
        name="crash",
        contacts=str(contacts),
        template=str(tpl),
        sender="c@banca-esempio.test",
        chunk_size=5000,
    )
    prepared = prepare(params, settings)
    ledger = Ledger(settings.db_url)

    worker = subprocess.Popen([sys.executable, "-c", WORKER, params.model_dump_json()], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        accepted = ledger.state_counts(prepared.campaign_id).get("accepted", 0)
        if accepted >= 300 or worker.poll() is not None:
            break
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait(30)
    at_kill = ledger.state_counts(prepared.campaign_id)
    assert at_kill.get("accepted", 0) >= 300 and at_kill.get("claimed", 0) > 0, at_kill
    assert at_kill.get("sending", 0) <= 4 * 3  # at most one per open connection

    # the dead worker's lease runs out; the next run takes over
    with ledger.engine.begin() as conn:
        conn.execute(
            sa.update(deliveries)
            .where(deliveries.c.campaign_id == prepared.campaign_id)
            .values(lease_until=sa.func.datetime("now", "-1 hour"))
        )
    again = prepare(params, settings)
    from recapito.campaign import deliver_chunk

    for chunk in again.chunks:
        deliver_chunk(params, chunk, settings)
    rows = ledger.deliveries_of(prepared.campaign_id)
    states = Counter(r["state"] for r in rows)
    assert set(states) <= {"accepted", "uncertain"}, states
    assert states["uncertain"] == at_kill.get("sending", 0)
    # the Message-ID is committed with "sending": an operator can look an uncertain one up
    assert all(r["message_id"] for r in rows if r["state"] == "uncertain")

    stored = Counter(
        m.delivery_id for m in sandbox.messages() if m.header("X-Recapito-Campaign") == "crash"
    )
    accepted_ids = {str(r["id"]) for r in rows if r["state"] == "accepted"}
    uncertain_ids = {str(r["id"]) for r in rows if r["state"] == "uncertain"}
    assert max(stored.values()) == 1  # nothing twice
    assert accepted_ids <= set(stored)  # nothing accepted is missing
    assert set(stored) - accepted_ids <= uncertain_ids  # the only doubt is the in-flight few
    events = ledger.events_of(prepared.campaign_id)
    released = [e for e in events if e["kind"] == "released"]
    assert len(released) == at_kill["claimed"]
    assert json.loads(released[0]["data_json"])["why"] == "lease expired before sending"
    ledger.close()


def _small_campaign(
    sandbox: Sandbox, tmp_path: Path, name: str, n: int
) -> tuple[dict[str, str], Settings, CampaignParams]:
    env = {**os.environ, "RECAPITO_HOME": str(tmp_path), **sandbox.env()}
    settings = Settings.load(env)
    contacts = tmp_path / "c.csv"
    domains = ("mailitalia.test", "postaveloce.test", "casella.test")
    lines = ["id;email;nome"] + [f"K{i};{name}{i}@{domains[i % 3]};Nome{i}" for i in range(n)]
    contacts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "template.toml").write_text('subject = "Ciao {{ nome }}"\n')
    (tpl / "body.html").write_text("<p>Ciao {{ nome }}</p>")
    params = CampaignParams(
        name=name,
        contacts=str(contacts),
        template=str(tpl),
        sender="c@banca-esempio.test",
        chunk_size=5000,
        rate_per_minute=600,  # 10 a second: slow enough to stop in the middle
    )
    return env, settings, params


# the worker runs the chunk in a thread and waits for it, as Prefect's task runner does;
# the signal handling is the CLI's
THREADED_WORKER = """
import json, sys, threading
from recapito.campaign import CampaignParams, deliver_chunk
from recapito.cli import _sigterm_like_ctrl_c
from recapito.config import Settings
params = CampaignParams.model_validate(json.loads(sys.argv[1]))
_sigterm_like_ctrl_c()
done = threading.Event()
def chunk():
    try:
        deliver_chunk(params, 0, Settings.load())
    finally:
        done.set()
threading.Thread(target=chunk).start()
try:
    while not done.wait(0.2):
        pass
except KeyboardInterrupt:
    done.wait()  # as Prefect's cancel_all: the chunk thread stops on its own
    sys.exit(130)
"""


def _wait_accepted(ledger: Ledger, campaign_id: int, n: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.state_counts(campaign_id).get("accepted", 0) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"worker did not reach {n} accepted: {ledger.state_counts(campaign_id)}")


def test_sigterm_stops_sending_and_gives_back_the_rest(sandbox: Sandbox, tmp_path: Path) -> None:
    env, settings, params = _small_campaign(sandbox, tmp_path, "term", 200)
    prepared = prepare(params, settings)
    ledger = Ledger(settings.db_url)
    worker = subprocess.Popen(
        [sys.executable, "-c", THREADED_WORKER, params.model_dump_json()], env=env
    )
    _wait_accepted(ledger, prepared.campaign_id, 10, worker)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 130  # stopped, not still sending at 10 a second
    states = ledger.state_counts(prepared.campaign_id)
    # nothing held: what was never attempted is planned again at once
    assert states.get("claimed", 0) == 0 and states.get("sending", 0) == 0, states
    assert 10 <= states["accepted"] < 200 and states["planned"] > 0, states
    again = prepare(params.model_copy(update={"rate_per_minute": None}), settings)
    from recapito.campaign import deliver_chunk

    for chunk in again.chunks:
        deliver_chunk(params.model_copy(update={"rate_per_minute": None}), chunk, settings)
    assert ledger.state_counts(prepared.campaign_id) == {"accepted": 200}
    stored = Counter(
        m.delivery_id for m in sandbox.messages() if m.header("X-Recapito-Campaign") == "term"
    )
    assert len(stored) == 200 and max(stored.values()) == 1
    ledger.close()


def test_claims_of_a_killed_local_worker_are_taken_back_without_waiting(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """The worker process is gone (same host, its pid no longer exists): the next run does
    not wait 30 minutes for the lease."""
    env, settings, params = _small_campaign(sandbox, tmp_path, "killed", 200)
    prepared = prepare(params, settings)
    ledger = Ledger(settings.db_url)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, params.model_dump_json()], env=env)
    _wait_accepted(ledger, prepared.campaign_id, 10, worker)
    worker.send_signal(signal.SIGKILL)
    worker.wait(30)
    at_kill = ledger.state_counts(prepared.campaign_id)
    assert at_kill.get("claimed", 0) > 0, at_kill
    again = prepare(params, settings)  # no lease manipulation
    after = ledger.state_counts(prepared.campaign_id)
    assert after.get("claimed", 0) == 0, after
    assert after["planned"] == at_kill["claimed"]
    assert after.get("uncertain", 0) == at_kill.get("sending", 0)
    assert 0 in again.chunks
    ledger.close()
