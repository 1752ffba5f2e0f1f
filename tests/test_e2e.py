"""The ``make demo`` path on 2,000 contacts, checked against the sandbox Maildirs."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from recapito.ledger import Ledger
from recapito.sandbox import imap as sandbox_imap
from recapito.sandbox.maildir import read_maildirs

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_path_delivers_every_accepted_message_exactly_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RECAPITO_"))}
    env["RECAPITO_HOME"] = str(tmp_path / "var")
    env["HOME"] = str(tmp_path)  # the Prefect client's own files stay out of the user's home
    cmd = [
        sys.executable,
        "-m",
        "recapito.cli",
        "demo",
        "--contacts",
        "2000",
        "--exit",
        "--name",
        "e2e",
        "--mx-port",
        "0",
        "--dns-port",
        "0",
        "--prefect-port",
        str(_free_port()),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "0 missing, 0 duplicated, 0 unexpected" in output
    assert "Prefect UI: http://127.0.0.1:" in output
    # the simulated audience: people and machines both opened and clicked
    tracking = re.search(
        r"opened by ([\d,]+) people \+ ([\d,]+) machine opens .*clicked by ([\d,]+) people "
        r"\+ ([\d,]+) scanner clicks.*, 0 errors\]",
        output,
    )
    assert tracking is not None, output[-4000:]
    assert all(int(n.replace(",", "")) > 0 for n in tracking.groups()), tracking.group(0)

    # check independently: ledger rows against the Maildirs the MX servers wrote
    home = tmp_path / "var"
    ledger = Ledger(f"sqlite:///{home / 'recapito.db'}", run_migrations=False)
    campaign = ledger.get_campaign("e2e")
    assert campaign is not None
    all_rows = ledger.deliveries_of(campaign.id)
    ledger.close()
    rows = [r for r in all_rows if r["channel"] == "email"]
    states = Counter(r["state"] for r in rows)
    # every contact in a final state; the mailboxes that fail after accepting were
    # collected from the bounce mailbox by the collector
    assert set(states) <= {"accepted", "failed", "bounced"}, states
    assert states["accepted"] > 1500
    assert states["bounced"] > 0
    collected = re.search(r"Bounce collector: [\d,]+ messages in the bounce mailbox", output)
    assert collected, output[-3000:]
    stored = Counter(m.delivery_id for m in read_maildirs(home / "sandbox" / "maildir"))
    accepted = {str(r["id"]) for r in rows if r["state"] == "accepted"}
    assert set(stored) == accepted
    assert max(stored.values()) == 1
    message_ids = [r["message_id"] for r in rows if r["state"] == "accepted"]
    assert len(set(message_ids)) == len(message_ids)
    # PEC (with Dovecot): legal notices to contacts with a PEC address went through the two
    # sandbox providers; their signed receipts were collected and moved the rows on
    pec_rows = [r for r in all_rows if r["channel"] == "pec"]
    assert bool(pec_rows) == sandbox_imap.available()
    if pec_rows:
        pec_states = Counter(r["state"] for r in pec_rows)
        assert set(pec_states) <= {"delivered", "delivery_error", "not_pec"}, pec_states
        assert pec_states["delivered"] >= 0.7 * len(pec_rows), pec_states
        assert {r["pec_mailbox"] for r in pec_rows} == {
            "campagne-postaveloce",
            "notifiche-legalmail",
        }
        line = re.search(
            r"PEC: [\d,]+ recipients, ([\d,]+) submitted -> ([\d,]+) accepted -> "
            r"([\d,]+) delivered, ([\d,]+) errors, ([\d,]+) not_pec, 0 pending; "
            r"time to delivery median .*; receipt signatures valid [\d,]+\n",
            output,
        )
        assert line is not None, output[-3000:]
        assert int(line.group(3).replace(",", "")) == pec_states["delivered"]
        assert "PEC receipt collector:" in output
    # nothing is left running
    assert not (home / "sandbox" / "state.json").exists()


def test_sigterm_stops_everything_the_demo_started(tmp_path: Path) -> None:
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RECAPITO_"))}
    env["RECAPITO_HOME"] = str(tmp_path / "var")
    env["HOME"] = str(tmp_path)
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "recapito.cli",
        "demo",
        "--contacts",
        "200",
        "--name",
        "term",
        "--mx-port",
        "0",
        "--dns-port",
        "0",
        "--prefect-port",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if "Servers stay up" in line or time.monotonic() > deadline:
            break
    assert any("Servers stay up" in line for line in lines), "".join(lines)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    output = "".join(lines) + rest
    assert "stopping the Prefect server" in output and "stopping the sandbox" in output
    assert not (tmp_path / "var" / "sandbox" / "state.json").exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the Prefect server is gone
