"""Column mapping: parsing, files, detection and checks against the header."""

from __future__ import annotations

from pathlib import Path

import pytest

from recapito.contacts.mapping import ColumnMapping, detect, header_key, resolve
from recapito.errors import InputError

ITALIAN = [
    "Codice Cliente",
    "Nome",
    "Cognome",
    "E-Mail",
    "PEC",
    "Cellulare",
    "Telefono",
    "Indirizzo",
    "CAP",
    "Città",
    "Provincia",
    "Fuso orario",
    "Consenso e-mail",
    "Consenso SMS",
    "segmento",
]


def test_parse_inline_pairs() -> None:
    m = ColumnMapping.parse("email = mail_privata, pec=pec ,phone=cellulare")
    assert m.email == "mail_privata"
    assert m.pec == "pec"
    assert m.phone == "cellulare"
    assert m.id is None and m.auto


def test_parse_errors() -> None:
    with pytest.raises(InputError, match="unknown field 'emial'"):
        ColumnMapping.parse("emial=email")
    with pytest.raises(InputError, match="expected field=column"):
        ColumnMapping.parse("email=email,cellulare")
    with pytest.raises(InputError, match="given twice"):
        ColumnMapping.parse("email=a,email=b")
    with pytest.raises(InputError, match=r"field=column pairs or a \.toml/\.json file"):
        ColumnMapping.parse("just-a-word")


def test_detects_italian_headers() -> None:
    m = detect(ITALIAN)
    assert m.as_dict() == {
        "id": "Codice Cliente",
        "email": "E-Mail",
        "pec": "PEC",
        "phone": "Cellulare",
        "first_name": "Nome",
        "last_name": "Cognome",
        "address": "Indirizzo",
        "postcode": "CAP",
        "city": "Città",
        "province": "Provincia",
        "timezone": "Fuso orario",
        "consent_email": "Consenso e-mail",
        "consent_sms": "Consenso SMS",
    }


def test_detects_english_headers() -> None:
    m = detect(["customer_id", "First Name", "Last Name", "Email Address", "Mobile", "ZIP"])
    assert (m.id, m.first_name, m.last_name) == ("customer_id", "First Name", "Last Name")
    assert (m.email, m.phone, m.postcode) == ("Email Address", "Mobile", "ZIP")
    assert m.column("pec") is None and m.column("consent_email") is None


def test_explicit_entries_win_and_empty_disables() -> None:
    m = resolve(ColumnMapping.parse("phone=Telefono,pec="), ITALIAN)
    assert m.phone == "Telefono"
    assert m.column("pec") is None
    assert m.email == "E-Mail"  # still detected


def test_loose_column_match() -> None:
    m = resolve(ColumnMapping.parse("email=email,city=citta"), ITALIAN)
    assert m.email == "E-Mail"
    assert m.city == "Città"


def test_auto_off() -> None:
    m = resolve(ColumnMapping.parse("email=E-Mail,auto=false"), ITALIAN)
    assert m.as_dict() == {"email": "E-Mail"}


def test_missing_column_lists_available() -> None:
    with pytest.raises(InputError) as info:
        ColumnMapping.parse("phone=telefono_casa", ["id", "email", "cellulare"])
    text = str(info.value)
    assert "'telefono_casa'" in text and "phone" in text
    assert "available columns: id, email, cellulare" in text


def test_toml_and_json_files(tmp_path: Path) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text('[mapping]\nemail = "posta"\nphone = "cell"\n', encoding="utf-8")
    assert ColumnMapping.parse(str(toml)).as_dict() == {"email": "posta", "phone": "cell"}
    js = tmp_path / "m.json"
    js.write_text('{"email": "posta", "auto": false}', encoding="utf-8")
    m = ColumnMapping.parse(js)
    assert m.email == "posta" and not m.auto
    bad = tmp_path / "bad.toml"
    bad.write_text("email = ", encoding="utf-8")
    with pytest.raises(InputError, match="not valid TOML"):
        ColumnMapping.from_file(bad)
    with pytest.raises(InputError, match="no such file"):
        ColumnMapping.from_file(tmp_path / "none.json")


def test_none_means_detection() -> None:
    assert ColumnMapping.parse(None) == ColumnMapping()
    assert ColumnMapping.parse("", ["mail"]).email == "mail"


def test_header_key() -> None:
    assert header_key("Città") == "citta"
    assert header_key(" E-Mail ") == "email"
    assert header_key("Fuso_Orario") == "fusoorario"
