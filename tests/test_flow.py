"""The campaign flow under a real (test) Prefect server, against the sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from recapito.campaign import CampaignParams
from recapito.config import Settings
from recapito.ledger import Ledger
from recapito.sandbox.check import compare_with_maildirs
from recapito.sandbox.runtime import Sandbox

pytestmark = pytest.mark.prefect

DEMO_TEMPLATE = Path(__file__).parents[1] / "src" / "recapito" / "sandbox" / "demo_template"


@pytest.fixture
def home(sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A RECAPITO_HOME of its own, pointed at the shared sandbox."""
    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path))
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    yield tmp_path


def _contacts(path: Path) -> Path:
    rows = [
        # id;nome;email;segmento;citta;provincia;consenso_email
        ("C1", "Anna", "anna.flow@postaveloce.test", "private", "Milano", "MI", "true"),
        ("C2", "Luca", "luca.flow@vecchiaposta.test", "retail", "Roma", "RM", "true"),
        ("C3", "Sara", "sara.cessato@comune-esempio.test", "retail", "Roma", "RM", "true"),
        ("C4", "Ugo", "ugo.flow@nessuna-posta.test", "retail", "Bari", "BA", "true"),
        ("C5", "Eva", "ANNA.FLOW@postaveloce.test", "retail", "Bari", "BA", "true"),  # dup
        ("C6", "Ivo", "ivo.flow@@postaveloce.test", "retail", "Bari", "BA", "true"),  # bad
        ("C7", "Pia", "pia.flow@mailitalia.test", "business", "Torino", "TO", "false"),
        ("C8", "Leo", "leo.flow@mailitalia.test", "business", "Torino", "TO", "true"),
    ]
    lines = ["id;nome;email;segmento;citta;provincia;consenso_email"]
    lines += [";".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_campaign_flow_end_to_end(prefect_harness: None, home: Path, sandbox: Sandbox) -> None:
    from flows.campaign import campaign_flow

    params = CampaignParams(
        name="flow-test",
        contacts=str(_contacts(home / "contacts.csv")),
        template=str(DEMO_TEMPLATE),
        sender="comunicazioni@banca-esempio.test",
        chunk_size=10,
    )
    report = campaign_flow(params)
    funnel = report["funnel"]
    assert funnel["contacts"] == 8
    assert funnel["targeted"] == 5  # C5 duplicate, C6 invalid, C7 no consent
    assert funnel["rejected"] == 3
    assert (funnel["accepted"], funnel["failed"], funnel["deferred"]) == (3, 2, 0)
    assert report["tls_versions"] == {"TLSv1.3": 2, "none": 1}
    assert report["rejections"] == {"duplicate": 1, "bad_local_part": 1, "no_consent": 1}
    settings = Settings.load()
    ledger = Ledger(settings.db_url)
    try:
        check = compare_with_maildirs(ledger, "flow-test", sandbox.maildir_root)
        assert (check["accepted"], check["missing"], check["duplicates"]) == (3, 0, 0)
        # running the same campaign again sends nothing more
        again = campaign_flow(params)
        assert again["funnel"]["accepted"] == 3
        check = compare_with_maildirs(ledger, "flow-test", sandbox.maildir_root)
        assert (check["stored"], check["duplicates"]) == (3, 0)
    finally:
        ledger.close()
    audience = pl.read_parquet(home / "campaigns" / "flow-test" / "audience.parquet")
    assert audience.height == 5


def test_undefined_placeholder_stops_before_sending(prefect_harness: None, home: Path) -> None:
    from flows.campaign import campaign_flow

    tpl = home / "tpl"
    tpl.mkdir()
    (tpl / "template.toml").write_text('subject = "Saldo {{ saldo_conto }}"\n')
    (tpl / "body.html").write_text("<p>{{ nome }}</p>")
    params = CampaignParams(
        name="bad-template",
        contacts=str(_contacts(home / "contacts.csv")),
        template=str(tpl),
        sender="comunicazioni@banca-esempio.test",
    )
    from recapito.errors import TemplateError

    with pytest.raises(TemplateError, match="'saldo_conto'"):
        campaign_flow(params)
    ledger = Ledger(Settings.load().db_url)
    assert ledger.get_campaign("bad-template") is None
    ledger.close()
