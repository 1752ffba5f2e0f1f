"""send-message: one transactional message through the campaign path, under Prefect."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from recapito.config import Settings
from recapito.errors import InputError
from recapito.ledger import Ledger
from recapito.sandbox.check import compare_with_maildirs
from recapito.sandbox.runtime import Sandbox
from recapito.sending.transactional import message_params

pytestmark = pytest.mark.prefect

SENDER = "avvisi@banca-esempio.test"


@pytest.fixture
def home(sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path))
    monkeypatch.delenv("RECAPITO_DB_URL", raising=False)
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    yield tmp_path


def _template(home: Path) -> str:
    tpl = home / "otp"
    tpl.mkdir(exist_ok=True)
    (tpl / "template.toml").write_text('subject = "Il tuo codice: {{ codice }}"\n')
    (tpl / "body.html").write_text("<p>Ciao {{ nome }}, il codice è {{ codice }}.</p>")
    return str(tpl)


def test_one_message_goes_out_once_per_key(
    prefect_harness: None, home: Path, sandbox: Sandbox
) -> None:
    from flows.send_message import send_message_flow

    contact = {"nome": "Anna", "email": "tx.anna@postaveloce.test", "codice": "417 902"}
    kwargs = {"template": _template(home), "sender": SENDER, "message_key": "ORD-1001"}
    first = send_message_flow(contact=contact, **kwargs)
    assert first["state"] == "accepted" and first["channel"] == "email"
    assert first["tls_version"] == "TLSv1.3"
    assert first["campaign"].startswith("tx-otp-") and first["campaign"].endswith("-ord-1001")
    assert "tx.anna" not in str(first)  # the outcome names no address
    again = send_message_flow(contact=contact, **kwargs)  # a retried request
    assert again["delivery_id"] == first["delivery_id"] and again["state"] == "accepted"
    ledger = Ledger(Settings.load().db_url)
    try:
        check = compare_with_maildirs(ledger, first["campaign"], sandbox.maildir_root)
    finally:
        ledger.close()
    assert (check["stored"], check["duplicates"]) == (1, 0)
    assert any(b"417 902" in p.read_bytes() for p in sandbox.maildir_root.rglob("new/*"))
    contact_file = Path(Settings.load().home / "transactional")
    files = list(contact_file.rglob("*.parquet"))
    assert files and all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)


def test_suppressed_contact_gets_nothing(prefect_harness: None, home: Path) -> None:
    from flows.send_message import send_message_flow

    ledger = Ledger(Settings.load().db_url)
    ledger.add_suppression("tx.nomore@postaveloce.test", reason="unsubscribed", source="test")
    ledger.close()
    outcome = send_message_flow(
        template=_template(home),
        contact={"nome": "Ugo", "email": "tx.nomore@postaveloce.test", "codice": "1"},
        sender=SENDER,
    )
    assert outcome["state"] == "rejected" and outcome["reasons"] == {"suppressed": 1}


def test_a_key_reused_for_another_message_is_refused(home: Path) -> None:
    settings = Settings.load()
    base = {"template": _template(home), "sender": SENDER, "message_key": "K-1"}
    params = message_params(settings, contact={"email": "a@postaveloce.test"}, **base)
    assert params.name.endswith("-k-1") and params.chunk_size == 10
    assert message_params(settings, contact={"email": "a@postaveloce.test"}, **base) == params
    with pytest.raises(InputError, match="another message"):
        message_params(settings, contact={"email": "b@postaveloce.test"}, **base)


def test_nightly_export_is_private_and_names_no_address(home: Path) -> None:
    import polars as pl

    from recapito.exports import export_campaigns, report_markdown
    from recapito.ledger import PlannedDelivery

    settings = Settings.load()
    ledger = Ledger(settings.db_url)
    camp = ledger.ensure_campaign("nightly", sender=SENDER, template_hash="h" * 64, params={})
    row = PlannedDelivery("c1", "x.nightly@postaveloce.test", "postaveloce.test", 0)
    ledger.plan(camp.id, [row])
    ledger.close()
    out, exported = export_campaigns(settings, days=None)
    assert [e.campaign for e in exported] == ["nightly"] and exported[0].deliveries == 1
    path = exported[0].path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    frame = pl.read_parquet(path)
    assert "address" not in frame.columns and frame["contact_id"].to_list() == ["c1"]
    assert path.as_uri() in report_markdown(out, exported)
