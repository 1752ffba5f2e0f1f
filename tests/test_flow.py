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
    from recapito.campaign import campaign_dir

    audience = pl.read_parquet(campaign_dir(settings, "flow-test") / "audience.parquet")
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


def test_rerun_retries_deferred_mail_once_due(prefect_harness: None, home: Path) -> None:
    """Greylisted mail: deferred by the first run, accepted by a later run of the campaign."""
    import time

    from flows.campaign import campaign_flow
    from recapito.sandbox.world import GREYLIST_DELAY_SECONDS

    contacts = home / "grey.csv"
    contacts.write_text("email;nome\ngrey.rerun@webposta.test;Gina\n", encoding="utf-8")
    params = CampaignParams(
        name="grey-rerun",
        contacts=str(contacts),
        template=str(_minimal_template(home)),
        sender="comunicazioni@banca-esempio.test",
        retry_after_seconds=1,
    )
    first = campaign_flow(params)
    assert first["funnel"]["deferred"] == 1 and first["status"] == "waiting_retry"
    time.sleep(max(GREYLIST_DELAY_SECONDS, 1.0) + 0.5)
    second = campaign_flow(params)
    assert second["funnel"]["accepted"] == 1 and second["funnel"]["deferred"] == 0
    assert second["status"] == "completed"


def _minimal_template(home: Path) -> Path:
    tpl = home / "tpl-min"
    if not tpl.exists():
        tpl.mkdir()
        (tpl / "template.toml").write_text('subject = "Ciao {{ nome }}"\n')
        (tpl / "body.html").write_text("<p>Ciao {{ nome }}</p>")
    return tpl


def test_rerun_with_other_audience_parameters_is_refused(prefect_harness: None, home: Path) -> None:
    from flows.campaign import campaign_flow
    from recapito.errors import InputError

    contacts = str(_contacts(home / "contacts.csv"))
    base = {
        "contacts": contacts,
        "template": str(DEMO_TEMPLATE),
        "sender": "comunicazioni@banca-esempio.test",
    }
    campaign_flow(CampaignParams(name="same-name", **base))
    with pytest.raises(InputError, match=r"created with filter=None, now filter="):
        campaign_flow(CampaignParams(name="same-name", filter='provincia = "MI"', **base))


def test_names_that_look_alike_never_share_a_folder(home: Path) -> None:
    from recapito.campaign import campaign_dir

    settings = Settings.load()
    assert campaign_dir(settings, "qa coll2") != campaign_dir(settings, "qa_coll2")
    assert campaign_dir(settings, "qa coll2") == campaign_dir(settings, "qa coll2")


def test_template_breaking_the_sandbox_stops_before_planning(
    prefect_harness: None, home: Path
) -> None:
    from flows.campaign import campaign_flow
    from recapito.errors import TemplateError

    tpl = home / "evil"
    tpl.mkdir()
    (tpl / "template.toml").write_text('subject = "x"\n')
    (tpl / "body.html").write_text("{{ nome.__class__.__mro__ }}")
    params = CampaignParams(
        name="evil",
        contacts=str(_contacts(home / "contacts.csv")),
        template=str(tpl),
        sender="comunicazioni@banca-esempio.test",
    )
    with pytest.raises(TemplateError, match="unsafe"):
        campaign_flow(params)
    ledger = Ledger(Settings.load().db_url)
    assert ledger.get_campaign("evil") is None  # nothing planned, nothing sent
    ledger.close()


def test_rows_held_by_a_dead_worker_go_out_once_its_lease_expires(
    prefect_harness: None, home: Path, sandbox: Sandbox
) -> None:
    """A worker died holding a chunk: a run during its lease leaves the rows alone (they
    are in flight); the first run after the lease sends every row exactly once."""
    import sqlalchemy as sa

    from flows.campaign import campaign_flow
    from recapito.campaign import prepare
    from recapito.ledger.schema import deliveries

    params = CampaignParams(
        name="dead-worker",
        contacts=str(_contacts(home / "contacts.csv")),
        template=str(DEMO_TEMPLATE),
        sender="comunicazioni@banca-esempio.test",
    )
    settings = Settings.load()
    prepared = prepare(params, settings)
    ledger = Ledger(settings.db_url)
    held = ledger.claim_chunk(prepared.campaign_id, 0, worker="dead-host:1")
    assert len(held) == 5
    during = campaign_flow(params)
    assert during["funnel"]["in_flight"] == 5 and during["funnel"]["accepted"] == 0
    with ledger.engine.begin() as conn:  # the lease runs out
        conn.execute(
            sa.update(deliveries)
            .where(deliveries.c.campaign_id == prepared.campaign_id)
            .values(lease_until=sa.func.datetime("now", "-1 hour"))
        )
    after = campaign_flow(params)
    assert after["funnel"]["in_flight"] == 0
    assert (after["funnel"]["accepted"], after["funnel"]["failed"]) == (3, 2)
    again = campaign_flow(params)  # nothing left: nothing more is sent
    check = compare_with_maildirs(ledger, "dead-worker", sandbox.maildir_root)
    assert (check["stored"], check["duplicates"], check["missing"]) == (3, 0, 0)
    assert again["status"] == "completed"
    ledger.close()


def test_rerun_with_another_tls_policy_is_refused(prefect_harness: None, home: Path) -> None:
    from flows.campaign import campaign_flow
    from recapito.errors import InputError

    base = {
        "contacts": str(_contacts(home / "contacts.csv")),
        "template": str(DEMO_TEMPLATE),
        "sender": "comunicazioni@banca-esempio.test",
    }
    campaign_flow(CampaignParams(name="policy-fixed", **base))
    with pytest.raises(InputError, match=r"tls_policy='opportunistic', now tls_policy='secure:L4'"):
        campaign_flow(CampaignParams(name="policy-fixed", tls_policy="secure:L4", **base))
