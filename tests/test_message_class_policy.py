"""``tls_policy`` per message class: legal mail secure, marketing opportunistic, same domain."""

from __future__ import annotations

from pathlib import Path

import pytest

from recapito.campaign import CampaignParams, deliver_chunk, prepare
from recapito.config import Settings
from recapito.errors import InputError
from recapito.ledger import Ledger
from recapito.sandbox.runtime import Sandbox


@pytest.fixture
def settings(sandbox: Sandbox, tmp_path: Path) -> Settings:
    return Settings.load({"RECAPITO_HOME": str(tmp_path), **sandbox.env()})


def _params(tmp_path: Path, **extra: object) -> CampaignParams:
    contacts = tmp_path / "c.csv"
    contacts.write_text(
        "id;email;classe\n"
        "L1;legale.classe@aziendale.test;legal\n"
        "M1;promo.classe@aziendale.test;marketing\n"
        "X1;altro.classe@aziendale.test;\n",
        encoding="utf-8",
    )
    tpl = tmp_path / "tpl"
    tpl.mkdir(exist_ok=True)
    (tpl / "template.toml").write_text("subject = \"Comunicazione {{ classe | default('') }}\"\n")
    (tpl / "body.html").write_text("<p>x</p>")
    return CampaignParams(
        name="classes",
        contacts=str(contacts),
        template=str(tpl),
        sender="c@banca-esempio.test",
        **extra,  # type: ignore[arg-type]
    )


def test_each_class_gets_its_own_policy(settings: Settings, tmp_path: Path) -> None:
    params = _params(
        tmp_path,
        message_class_column="classe",
        tls_policy_by_class={"legal": "secure:L3"},
    )
    prepared = prepare(params, settings)
    result = deliver_chunk(params, next(iter(prepared.chunks)), settings)
    assert result["outcomes"] == {"insecure_channel": 1, "accepted": 2}
    ledger = Ledger(settings.db_url)
    rows = {r["contact_id"]: r for r in ledger.deliveries_of(prepared.campaign_id)}
    ledger.close()
    # aziendale.test's MX has a self-signed certificate (L2): below L3 for legal mail only
    assert rows["L1"]["state"] == "insecure_channel"
    assert rows["L1"]["reason"] == "certificate-not-trusted"
    assert rows["M1"]["state"] == "accepted" and rows["M1"]["tls_level"] == "L2"
    assert rows["X1"]["state"] == "accepted"


def test_unknown_class_column_is_named(settings: Settings, tmp_path: Path) -> None:
    params = _params(tmp_path, message_class_column="tipo", tls_policy_by_class={"a": "L2"})
    with pytest.raises(InputError, match="message class column 'tipo'"):
        prepare(params, settings)


def test_class_policies_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls policy"):
        _params(tmp_path, tls_policy_by_class={"legal": "secure:L9"})
