"""Offline address validation and normalisation."""

from __future__ import annotations

import polars as pl
import pytest

from recapito.contacts.addresses import check_address, normalise_domain, validate_addresses

CASES: list[tuple[str | None, str | None, str | None]] = [
    # raw, normalised address, reason
    ("Mario.Rossi@PostaVeloce.TEST", "Mario.Rossi@postaveloce.test", None),
    ("  anna@mailitalia.test\t", "anna@mailitalia.test", None),
    ("a+tag@example.com", "a+tag@example.com", None),
    ("o'brien@example.ie", "o'brien@example.ie", None),
    ("x@example.com.", "x@example.com", None),
    ("utente@Bücher.DE", "utente@xn--bcher-kva.de", None),
    ("utente@MÜNCHEN.de", "utente@xn--mnchen-3ya.de", None),
    ("utente@xn--bcher-kva.de", "utente@xn--bcher-kva.de", None),
    ("", None, "empty"),
    ("   ", None, "empty"),
    (None, None, "empty"),
    ("mario rossi@x.it", None, "whitespace"),
    ("mario.rossi@x .it", None, "whitespace"),
    ("mario.rossix.it", None, "missing_at"),
    ("mario..rossi@x.it", None, "double_dot"),
    ("mario@x..it", None, "double_dot"),
    ("a" * 65 + "@x.it", None, "too_long"),
    ("a@" + "b" * 64 + ".it", None, "too_long"),
    ("a@" + ".".join(["b" * 60] * 5) + ".it", None, "too_long"),
    (".mario@x.it", None, "bad_local_part"),
    ("mario.@x.it", None, "bad_local_part"),
    ("a@b@x.it", None, "bad_local_part"),
    ('"quoted"@x.it', None, "bad_local_part"),
    ("niccolò@x.it", None, "bad_local_part"),
    ("@x.it", None, "bad_local_part"),
    ("mario@", None, "bad_domain"),
    ("mario@localhost", None, "bad_domain"),
    ("mario@[192.0.2.1]", None, "bad_domain"),
    ("mario@x.123", None, "bad_domain"),
    ("mario@-x.it", None, "bad_domain"),
    ("mario@x_y.it", None, "bad_domain"),
]


@pytest.mark.parametrize(("raw", "address", "reason"), CASES)
def test_check_address(raw: str | None, address: str | None, reason: str | None) -> None:
    result = check_address(raw)
    assert (result.address, result.reason) == (address, reason)
    if address is not None:
        assert result.ok
        assert result.dedupe_key == address.lower()
        assert result.domain == address.rpartition("@")[2]


def test_vectorised_matches_scalar() -> None:
    raws = [c[0] for c in CASES]
    frame = validate_addresses(pl.Series(raws, dtype=pl.String))
    assert frame.columns == ["address", "domain", "dedupe_key", "reason"]
    assert frame.height == len(raws)
    for raw, row in zip(raws, frame.iter_rows(named=True), strict=True):
        one = check_address(raw)
        assert (row["address"], row["domain"], row["dedupe_key"], row["reason"]) == (
            one.address,
            one.domain,
            one.dedupe_key,
            one.reason,
        ), raw


def test_dedupe_key_ignores_case_and_spaces() -> None:
    frame = validate_addresses(
        pl.Series([" Mario.Rossi@PostaVeloce.test", "mario.rossi@postaveloce.TEST "])
    )
    assert frame["address"].to_list() == [
        "Mario.Rossi@postaveloce.test",
        "mario.rossi@postaveloce.test",
    ]
    assert frame["dedupe_key"].n_unique() == 1


def test_idn_domain_normalised_in_bulk() -> None:
    raws = pl.Series(["a@città.it", "b@CITTÀ.it", "c@città.it"] * 1000)
    frame = validate_addresses(raws)
    assert frame["domain"].unique().to_list() == ["xn--citt-3na.it"]
    assert frame["reason"].null_count() == frame.height


def test_normalise_domain() -> None:
    assert normalise_domain("Example.COM") == ("example.com", None)
    assert normalise_domain("") == (None, "bad_domain")
    assert normalise_domain("ex ample.com")[1] == "bad_domain"


def test_empty_series() -> None:
    frame = validate_addresses(pl.Series([], dtype=pl.String))
    assert frame.height == 0
    assert frame.columns == ["address", "domain", "dedupe_key", "reason"]
