"""Targeting: mapping, consent, validation, suppression, dedupe, filter and counts."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recapito.contacts.sources import ContactSource, load
from recapito.contacts.targeting import REJECTION_REASONS, target
from recapito.errors import InputError

HEADER = "codice_cliente;nome;cognome;e-mail;cellulare;provincia;consenso_email;segmento"
ROWS = [
    "C1;Anna;Rossi;Anna.Rossi@PostaVeloce.test;+39 347 1234567;MI;sì;retail",  # 2 ok
    "C2;Luca;Bianchi;luca@mailitalia.test;;RM;no;retail",  # 3 no_consent
    "C3;Sara;Verdi;sara@@casella.test;;MI;sì;retail",  # 4 bad_local_part
    "C4;Eva;Neri; ANNA.ROSSI@postaveloce.TEST ;;MI;sì;private",  # 5 duplicate of C1
    "C5;Ugo;Gialli;;;TO;sì;retail",  # 6 empty
    "C6;Pia;Blu;pia@casella.test;;MI;sì;business",  # 7 suppressed
    "C7;Leo;Rosa;leo@Bücher.example;;RM;vero;retail",  # 8 ok, IDN
    "C1;Ada;Viola;ada@mailitalia.test;;MI;1;retail",  # 9 duplicate_id
    ";Ivo;Grigi;ivo@casella.test;;BA;sì;private",  # 10 ok, id from line
    "C9;Rita;Oro;rita@mailitalia.test;;BA;sì;business",  # 11 ok
    "C10;Rotto;Riga",  # 12 malformed
]


@pytest.fixture
def crm(tmp_path: Path) -> Path:
    path = tmp_path / "crm.csv"
    path.write_text("\n".join([HEADER, *ROWS]) + "\n", encoding="utf-8")
    return path


def test_reasons_counts_and_order(crm: Path) -> None:
    loaded = load(ContactSource.from_path(crm))
    result = target(loaded, None, None, {"PIA@casella.test "})
    rejected = {(r["line"], r["reason"]) for r in result.rejected.iter_rows(named=True)}
    assert rejected == {
        (3, "no_consent"),
        (4, "bad_local_part"),
        (5, "duplicate"),
        (6, "empty"),
        (7, "suppressed"),
        (9, "duplicate_id"),
        (12, "malformed_row"),
    }
    assert result.rejected.columns == ["line", "contact_id", "address", "reason", "detail"]
    assert result.rejected["line"].to_list() == sorted(result.rejected["line"].to_list())
    malformed = result.rejected.filter(pl.col("reason") == "malformed_row").row(0, named=True)
    assert malformed["detail"] == "3 fields, expected 8"
    dup = result.rejected.filter(pl.col("reason") == "duplicate").row(0, named=True)
    assert dup["contact_id"] == "C4"
    assert dup["address"] == " ANNA.ROSSI@postaveloce.TEST "

    audience = result.audience
    # sorted by domain, then contact id
    assert audience.select("email_domain", "contact_id").rows() == [
        ("casella.test", "L10"),
        ("mailitalia.test", "C9"),
        ("postaveloce.test", "C1"),
        ("xn--bcher-kva.example", "C7"),
    ]
    first = audience.filter(pl.col("contact_id") == "C1").row(0, named=True)
    assert first["email"] == "Anna.Rossi@postaveloce.test"  # the first one was kept
    assert first["dedupe_key"] == "anna.rossi@postaveloce.test"
    assert first["phone"] == "+39 347 1234567"
    assert (first["first_name"], first["last_name"]) == ("Anna", "Rossi")
    assert first["segmento"] == "retail"  # original columns kept for templates
    assert first["_line"] == 2

    counts = result.counts
    assert counts["contacts"] == 11
    assert counts["targeted"] == 4
    assert counts["rejected"] == 7
    assert counts["filtered_out"] == 0
    assert counts["contacts"] == counts["rejected"] + counts["filtered_out"] + counts["targeted"]
    assert all(f"rejected_{r}" in counts for r in REJECTION_REASONS)
    assert counts["rejected_duplicate"] == 1 and counts["rejected_bad_domain"] == 0


def test_filter_excludes_before_rejections(crm: Path) -> None:
    loaded = load(ContactSource.from_path(crm))
    result = target(loaded, None, 'provincia in ("MI") and segmento != "business"')
    # in: lines 2 (C1), 4 (bad), 5 (C4, same address as C1), 9 (C1 again, other address)
    assert sorted(result.audience["contact_id"].to_list()) == ["C1"]
    assert result.counts["filtered_out"] == 6
    assert result.counts["rejected_duplicate"] == 1
    assert result.counts["rejected_duplicate_id"] == 1
    assert result.counts["contacts"] == 11
    assert (
        result.counts["rejected"] + result.counts["filtered_out"] + result.counts["targeted"] == 11
    )
    # outside the filter, C1's twin would have been kept: the filter comes first
    only_private = target(loaded, None, 'segmento = "private"')
    assert sorted(only_private.audience["contact_id"].to_list()) == ["C4", "L10"]


def test_filter_on_canonical_columns(crm: Path) -> None:
    loaded = load(ContactSource.from_path(crm))
    result = target(loaded, None, 'email_domain = "mailitalia.test"')
    # line 9 reuses id C1, but the first C1 (line 2) is outside the filter
    assert result.audience["contact_id"].to_list() == ["C1", "C9"]
    assert result.audience["_line"].to_list() == [9, 11]


def test_suppression_callable_in_batches(crm: Path) -> None:
    seen: list[list[str]] = []

    def lookup(keys: list[str]) -> set[str]:
        seen.append(keys)
        return {k.upper() for k in keys if k.startswith("rita")}

    loaded = load(ContactSource.from_path(crm))
    result = target(loaded, None, None, lookup, suppression_batch=2)
    assert all(len(batch) <= 2 for batch in seen)
    assert all(k == k.lower() for batch in seen for k in batch)
    assert result.counts["rejected_suppressed"] == 1
    assert "C9" not in result.audience["contact_id"].to_list()


def test_dedupe_keeps_first_occurrence() -> None:
    frame = pl.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "email": ["X@Mail.test", "x@mail.TEST", " x@mail.test", "y@mail.test"],
        }
    )
    result = target(frame)
    assert result.audience["contact_id"].to_list() == ["a", "d"]
    assert result.rejected["contact_id"].to_list() == ["b", "c"]
    assert set(result.rejected["reason"].to_list()) == {"duplicate"}
    assert result.audience["_line"].to_list() == [1, 4]


def test_explicit_mapping_and_missing_column(crm: Path) -> None:
    loaded = load(ContactSource.from_path(crm))
    result = target(loaded, "email=e-mail,id=,consent_email=")
    # no id column: ids come from the line; no consent column: consent assumed
    assert result.counts["rejected_no_consent"] == 0
    assert set(result.audience["contact_id"].to_list()) >= {"L2", "L3"}
    with pytest.raises(InputError, match="available columns: codice_cliente"):
        target(loaded, "email=posta")


def test_no_email_column() -> None:
    frame = pl.DataFrame({"nome": ["a"], "cellulare": ["347"]})
    with pytest.raises(InputError, match="no e-mail column"):
        target(frame)
    result = target(frame, require_email=False)
    assert result.audience["phone"].to_list() == ["347"]


def test_require_email_false_keeps_contacts_without_address() -> None:
    frame = pl.DataFrame(
        {
            "id": ["1", "2", "3"],
            "email": ["", "bad", "ok@mail.test"],
            "pec": ["uno@pec.test", None, "not a pec"],
        }
    )
    result = target(frame, require_email=False)
    audience = result.audience.sort("contact_id")
    assert audience["contact_id"].to_list() == ["1", "2", "3"]
    assert audience["email_error"].to_list() == ["empty", "missing_at", None]
    assert audience["pec"].to_list() == ["uno@pec.test", None, None]


def test_name_clash_keeps_source_column() -> None:
    frame = pl.DataFrame(
        {"mail": ["a@mail.test"], "email": ["other"], "city": ["Roma"], "comune": ["Milano"]}
    )
    result = target(frame, "email=mail,city=comune")
    row = result.audience.row(0, named=True)
    assert row["email"] == "a@mail.test"
    assert row["email_source"] == "other"
    assert row["city"] == "Milano"
    assert row["city_source"] == "Roma"


def test_parquet_native_consent_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pl.DataFrame(
        {
            "id": [1, 2, 3],
            "email": ["a@mail.test", "b@mail.test", "c@mail.test"],
            "consent": [True, False, None],
        }
    ).write_parquet(path)
    result = target(load(ContactSource.from_path(path)))
    assert result.audience["contact_id"].to_list() == ["1"]
    assert result.counts["rejected_no_consent"] == 2


def test_empty_frame() -> None:
    frame = pl.DataFrame({"email": []}, schema={"email": pl.String})
    result = target(frame)
    assert result.audience.height == 0
    assert result.counts["contacts"] == 0
