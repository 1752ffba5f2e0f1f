"""Preflight: quick checks of a campaign's inputs before orchestration starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from recapito.campaign import CampaignParams, preflight
from recapito.errors import InputError

DEMO_TEMPLATE = Path(__file__).parents[1] / "src" / "recapito" / "sandbox" / "demo_template"
HEADER = "email;nome;segmento;citta;provincia\n"


def _params(contacts: str, **extra: str) -> CampaignParams:
    return CampaignParams(
        name="p",
        contacts=contacts,
        template=str(DEMO_TEMPLATE),
        sender="c@banca-esempio.test",
        **extra,  # type: ignore[arg-type]
    )


def test_wide_encoding_file_larger_than_the_sample(tmp_path: Path) -> None:
    rows = "".join(f"u{i}@postaveloce.test;Nome{i};retail;Roma;RM\n" for i in range(3000))
    path = tmp_path / "wide.csv"
    path.write_text(HEADER + rows, encoding="utf-16")
    assert path.stat().st_size > 64 * 1024
    preflight(_params(str(path), encoding="utf-16"))
    preflight(_params(str(path)))  # detected from the BOM


def test_large_utf8_file_is_checked_on_its_head(tmp_path: Path) -> None:
    rows = "".join(f"u{i}@postaveloce.test;Nicolò{i};retail;Forlì;FC\n" for i in range(5000))
    path = tmp_path / "big.csv"
    path.write_text(HEADER + rows, encoding="utf-8")
    preflight(_params(str(path)))
    with pytest.raises(InputError, match="unknown column 'provinca'"):
        preflight(_params(str(path), filter='provinca = "FC"'))


def test_web_url_is_not_a_contact_file() -> None:
    with pytest.raises(InputError, match="URLs are not supported as contact files"):
        preflight(_params("https://crm.example.test/export.csv"))


def test_database_url_needs_a_query() -> None:
    with pytest.raises(InputError, match="needs a query"):
        preflight(_params("sqlite:////tmp/recapito-none.db"))


def test_the_same_contacts_file_spelled_another_way_resumes_the_campaign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-run with ./file, an absolute path, or from another folder is the same campaign."""
    from recapito.campaign import CampaignParams, _check_same_audience

    (tmp_path / "c.csv").write_text("email\na@b.test\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    first = CampaignParams(name="x", contacts="c.csv", template="t", sender="n@bank.test")
    assert first.contacts == str(tmp_path / "c.csv")
    again = CampaignParams(name="x", contacts="./c.csv", template="t", sender="n@bank.test")
    _check_same_audience(again, first.model_dump())
    # campaigns stored before paths were made absolute: relative spelling still matches
    _check_same_audience(again, {**first.model_dump(), "contacts": "c.csv"})
