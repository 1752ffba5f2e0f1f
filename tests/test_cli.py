"""The command line: bad input gives one clear line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO_TEMPLATE = Path(__file__).parents[1] / "src" / "recapito" / "sandbox" / "demo_template"


def _run(
    tmp_path: Path, *args: str, timeout: float = 240, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RECAPITO_"))}
    env.update(
        RECAPITO_HOME=str(tmp_path / "var"),
        HOME=str(tmp_path),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, "-m", "recapito.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr


@pytest.mark.parametrize(
    ("contacts", "expected"),
    [
        ("missing.csv", "missing.csv: no such file"),
        (".", "is a directory"),
        ("empty.csv", "the file is empty"),
    ],
)
def test_unreadable_contact_file_is_one_line(tmp_path: Path, contacts: str, expected: str) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    path = str(tmp_path / contacts) if contacts != "." else str(tmp_path)
    result = _run(
        tmp_path,
        "campaign",
        "run",
        "--name",
        "x",
        "--contacts",
        path,
        "--template",
        str(DEMO_TEMPLATE),
    )
    _one_line_error(result, expected)


def test_bad_parameters_are_one_line(tmp_path: Path) -> None:
    result = _run(
        tmp_path,
        "campaign",
        "run",
        "--name",
        "bad/name",
        "--contacts",
        "x.csv",
        "--template",
        str(DEMO_TEMPLATE),
    )
    _one_line_error(result, "--name")
    result = _run(
        tmp_path,
        "campaign",
        "run",
        "--name",
        "ok",
        "--contacts",
        "x.csv",
        "--template",
        str(DEMO_TEMPLATE),
        "--sender",
        "not-an-address",
    )
    _one_line_error(result, "--sender")
    result = _run(
        tmp_path,
        "campaign",
        "run",
        "--name",
        "ok",
        "--contacts",
        "x.csv",
        "--template",
        str(DEMO_TEMPLATE),
        "--tls-policy",
        "paranoid",
    )
    _one_line_error(result, "--tls-policy")
    result = _run(
        tmp_path,
        "campaign",
        "run",
        "--name",
        "ok",
        "--contacts",
        "x.csv",
        "--template",
        str(tmp_path / "nope"),
    )
    _one_line_error(result, "no template.toml")


def test_unknown_campaign_report_is_one_line(tmp_path: Path) -> None:
    _one_line_error(_run(tmp_path, "campaign", "report", "nope"), "no campaign named 'nope'")


def test_undefined_placeholder_fails_before_sending(tmp_path: Path) -> None:
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "template.toml").write_text('subject = "Saldo {{ saldo_conto }}"\n')
    (tpl / "body.html").write_text("<p>{{ nome }}</p>")
    contacts = tmp_path / "c.csv"
    contacts.write_bytes(b"email;nome\nanna@postaveloce.test;Anna\n")
    result = _run(
        tmp_path,
        "campaign",
        "run",
        "--name",
        "x",
        "--contacts",
        str(contacts),
        "--template",
        str(tpl),
    )
    _one_line_error(result, "template 'tpl': undefined placeholder 'saldo_conto'")
    report = _run(tmp_path, "campaign", "report", "x")
    _one_line_error(report, "no campaign named 'x'")  # nothing was planned, nothing sent


def test_report_json(tmp_path: Path) -> None:
    from recapito.ledger import Ledger, PlannedDelivery

    home = tmp_path / "var"
    ledger = Ledger(f"sqlite:///{home / 'recapito.db'}")
    camp = ledger.ensure_campaign("rep", sender="a@b.test", template_hash="h" * 64, params={})
    ledger.plan(camp.id, [PlannedDelivery("1", "x@y.test", "y.test", 0)])
    ledger.close()
    result = _run(tmp_path, "campaign", "report", "rep", "--json")
    assert result.returncode == 0, result.stderr
    import json

    data = json.loads(result.stdout)
    assert data["funnel"]["targeted"] == 1 and data["funnel"]["pending"] == 1


def test_unreachable_services_and_state_dir_are_one_line(tmp_path: Path) -> None:
    contacts = tmp_path / "c.csv"
    contacts.write_text(
        "email;nome;segmento;citta;provincia\nanna@postaveloce.test;Anna;retail;Roma;RM\n",
        encoding="utf-8",
    )
    args = [
        "campaign",
        "run",
        "--name",
        "x",
        "--contacts",
        str(contacts),
        "--template",
        str(DEMO_TEMPLATE),
    ]
    result = _run(tmp_path, *args, PREFECT_API_URL="http://127.0.0.1:9/api")
    _one_line_error(result, "PREFECT_API_URL")
    db = "postgresql://nobody@127.0.0.1:9/x"
    result = _run(tmp_path, "campaign", "report", "x", timeout=60, RECAPITO_DB_URL=db)
    _one_line_error(result, "check RECAPITO_DB_URL")
    home = "/proc/recapito-cannot-be-here"
    result = _run(tmp_path, "campaign", "report", "x", timeout=60, RECAPITO_HOME=home)
    _one_line_error(result, "/proc/recapito-cannot-be-here")


def test_option_names_in_validation_errors(tmp_path: Path) -> None:
    result = _run(
        tmp_path,
        "campaign",
        "run",
        "--name",
        "x",
        "--contacts",
        "x.csv",
        "--template",
        str(DEMO_TEMPLATE),
        "--retry-after",
        "-1",
    )
    _one_line_error(result, "--retry-after: Input should be greater than or equal to 0")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--filter", 'provinca = "MI"'], "unknown column 'provinca'"),
        (["--mapping", "email=posta"], "column 'posta' for email not found"),
    ],
)
def test_mistakes_in_filter_and_mapping_stop_before_orchestration(
    tmp_path: Path, extra: list[str], expected: str
) -> None:
    contacts = tmp_path / "c.csv"
    contacts.write_text("email;nome;provincia\nanna@postaveloce.test;Anna;MI\n", encoding="utf-8")
    result = _run(
        tmp_path,
        "campaign",
        "run",
        "--name",
        "x",
        "--contacts",
        str(contacts),
        "--template",
        str(DEMO_TEMPLATE),
        *extra,
    )
    _one_line_error(result, expected)
    assert "Task run" not in result.stderr and "Flow run" not in result.stderr


def test_resend_uncertain_is_an_explicit_operator_command(tmp_path: Path) -> None:
    from datetime import timedelta

    from recapito.ledger import Ledger, PlannedDelivery

    home = tmp_path / "var"
    ledger = Ledger(f"sqlite:///{home / 'recapito.db'}")
    camp = ledger.ensure_campaign("rs", sender="a@b.test", template_hash="h" * 64, params={})
    ledger.plan(camp.id, [PlannedDelivery(str(i), f"x{i}@y.test", "y.test", 0) for i in range(3)])
    claims = ledger.claim_chunk(camp.id, 0, worker="dead", lease=timedelta(seconds=-1))
    ledger.mark_sending(claims[0])
    ledger.expire_stale_claims(camp.id)
    ledger.close()
    _one_line_error(_run(tmp_path, "campaign", "resend", "rs"), "exactly one of")
    result = _run(tmp_path, "campaign", "resend", "rs", "--uncertain", "--json")
    assert result.returncode == 0, result.stderr
    assert '"requeued": 1' in result.stdout


def test_resend_failed_with_a_reason_no_row_has_is_an_error(tmp_path: Path) -> None:
    """A mistyped --reason used to put nothing back and exit 0."""
    from recapito.ledger import Ledger, Outcome, PlannedDelivery, State

    home = tmp_path / "var"
    ledger = Ledger(f"sqlite:///{home / 'recapito.db'}")
    camp = ledger.ensure_campaign("rf", sender="a@b.test", template_hash="h" * 64, params={})
    ledger.plan(camp.id, [PlannedDelivery(str(i), f"x{i}@y.test", "y.test", 0) for i in range(2)])
    claims = ledger.claim_chunk(camp.id, 0, worker="w")
    for claim in claims:
        ledger.record(claim, Outcome(State.FAILED, reason="spam_rejected", permanence="permanent"))
    ledger.close()
    _one_line_error(
        _run(tmp_path, "campaign", "resend", "rf", "--failed", "--reason", "bogus_reason"),
        "--reason 'bogus_reason': no failed delivery of 'rf' has it; "
        "failed reasons here: spam_rejected (2)",
    )
    result = _run(tmp_path, "campaign", "resend", "rf", "--failed", "--reason", "spam_rejected")
    assert result.returncode == 0, result.stderr


def test_output_into_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    """`recapito … | head -1` used to print 'Error: Broken pipe'."""
    env = {**os.environ, "RECAPITO_HOME": str(tmp_path / "var")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recapito.cli",
            "bounce",
            "classify",
            str(Path(__file__).parent / "fixtures" / "bounces"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err
