"""The demo contact generator: determinism, promised shares, and its CSV/Parquet files."""

from __future__ import annotations

import io
import re
from pathlib import Path
from zoneinfo import available_timezones

import polars as pl
import pytest

from recapito import demo_data
from recapito.contacts.addresses import validate_addresses
from recapito.contacts.sources import ContactSource, load
from recapito.contacts.targeting import target
from recapito.errors import InputError
from recapito.sandbox import world

N = 10_000


@pytest.fixture(scope="module")
def frame() -> pl.DataFrame:
    return demo_data.generate(N, seed=42)


def test_deterministic(frame: pl.DataFrame) -> None:
    assert frame.equals(demo_data.generate(N, seed=42))
    assert not frame.equals(demo_data.generate(N, seed=43))
    small = demo_data.generate(50, seed=7)
    assert small.equals(demo_data.generate(50, seed=7))
    assert demo_data.generate(0).height == 0


def test_columns_and_types(frame: pl.DataFrame) -> None:
    assert frame.columns == list(demo_data.COLUMNS)
    assert frame.height == N
    assert frame.schema["consenso_email"] == pl.Boolean
    assert frame.schema["consenso_sms"] == pl.Boolean
    assert frame.schema["data_nascita"] == pl.Date
    assert frame["id"][0] == "C0000001" and frame["id"][-1] == "C0010000"
    assert frame["id"].n_unique() == N
    assert frame["cap"].str.contains(r"^\d{5}$").all()
    assert set(frame["segmento"].unique()) == {"retail", "private", "business"}
    assert frame["data_nascita"].min() is not None
    assert frame.select(pl.col("nome", "cognome", "citta").null_count()).sum_horizontal()[0] == 0


def test_address_shares_are_exact(frame: pl.DataFrame) -> None:
    checked = validate_addresses(frame["email"])
    reasons = dict(checked["reason"].value_counts().iter_rows())
    assert reasons == {
        None: N - 30 - 50,
        "empty": round(0.003 * N),
        "missing_at": 17,
        "whitespace": 17,
        "double_dot": 16,
    }
    valid = checked.filter(pl.col("reason").is_null())
    later_copies = valid.filter(~pl.col("dedupe_key").is_first_distinct())
    assert later_copies.height == round(0.01 * N)
    assert valid["dedupe_key"].n_unique() == N - 30 - 50 - 100
    # the copies differ from their original in case or whitespace only
    raw = frame.with_columns(checked["dedupe_key"]).filter(pl.col("dedupe_key").is_not_null())
    groups = raw.group_by("dedupe_key").agg(pl.col("email")).filter(pl.col("email").list.len() > 1)
    for emails in groups["email"].to_list():
        assert len(emails) == 2 and emails[0] != emails[1]
    # rejected-mailbox markers: only on the domain of the rejecting MX
    local = pl.col("address").str.extract(r"^(.*)@", 1)
    marked = valid.filter(local.str.contains("|".join(world.REJECTED_LOCAL_MARKERS))).unique(
        "dedupe_key"
    )
    assert marked.height == round(0.02 * N)
    assert set(marked["domain"].unique()) == {demo_data.MARKER_DOMAIN}
    rejecting = world.MX_BY_POSTURE["rejecting"].host
    assert world.DOMAINS_BY_NAME[demo_data.MARKER_DOMAIN].mx[0][1] == rejecting


def test_domains_follow_world_weights(frame: pl.DataFrame) -> None:
    domains = validate_addresses(frame["email"])["domain"].drop_nulls()
    shares = (domains.value_counts(normalize=True)).rows()
    share = {d: s for d, s in shares}
    weights = dict(world.email_domains())
    total = sum(weights.values())
    assert set(share) == set(weights)
    for name, weight in weights.items():
        assert abs(share[name] - weight / total) < 0.02, name


def test_other_fields(frame: pl.DataFrame) -> None:
    pec = frame["pec"].drop_nulls()
    assert 0.13 < pec.len() / N < 0.17
    assert set(validate_addresses(pec)["domain"].unique()) == set(world.pec_domains())
    cities = {c[0]: c[3] for c in demo_data.CITIES}
    pairs = frame.select("citta", "provincia").unique().rows()
    assert all(cities[c] == p for c, p in pairs)
    assert frame["provincia"].str.contains(r"^[A-Z]{2}$").all()
    tz = frame["fuso_orario"]
    assert (tz == "Europe/Rome").mean() > 0.93  # type: ignore[operator]
    assert set(tz.unique()) <= available_timezones()
    assert 0.90 < frame["consenso_email"].mean() < 0.94  # type: ignore[operator]
    assert 0.72 < frame["consenso_sms"].mean() < 0.78  # type: ignore[operator]
    phones = frame["cellulare"]
    mobile = phones.str.replace_all(r"[\s-]", "").str.contains(r"^(\+39|0039)?3\d{9}$")
    assert 0.82 < mobile.sum() / N < 0.88
    assert 0.05 < phones.null_count() / N < 0.09
    addresses = frame["indirizzo"]
    assert addresses.str.contains("\n").sum() > 50
    assert addresses.str.contains(";").sum() > 20


def test_csv_export_loads_back(tmp_path: Path, frame: pl.DataFrame) -> None:
    path = tmp_path / "contacts.csv"
    broken = demo_data.write_csv(frame, path)
    assert len(broken) == round(0.001 * N)
    data = path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbfid;nome;cognome;email;")
    assert b"\r\n" in data

    loaded = load(ContactSource.from_path(path))
    assert loaded.delimiter == ";"
    assert loaded.encoding == "utf-8-sig"
    assert loaded.frame.height == N - len(broken)
    assert len(loaded.rejected) == len(broken)
    # each rejection points at the physical line where the broken record is
    lines = io.StringIO(data.decode("utf-8-sig"), newline="").readlines()
    for rejection, record_id in zip(loaded.rejected, broken, strict=True):
        assert lines[rejection.line - 1].startswith(f"{record_id};")
        assert re.fullmatch(r"\d+ fields, expected 15", rejection.reason)
    # the other rows come back as written (empty fields as null, booleans as sì/no)
    kept = frame.filter(~pl.col("id").is_in(broken))
    back = loaded.frame
    assert back["id"].to_list() == kept["id"].to_list()
    for column in ("nome", "cognome", "indirizzo", "cellulare", "pec", "cap"):
        assert back[column].to_list() == kept[column].to_list(), column
    expected_email = kept["email"].replace("", None)
    assert back["email"].to_list() == expected_email.to_list()
    assert set(back["consenso_email"].unique()) == {"sì", "no"}

    result = target(loaded.frame)
    assert result.counts["rejected_malformed_row"] == 0  # a frame, not Loaded, has none
    result = target(loaded, None, "consenso_email = true")
    assert result.counts["contacts"] == N
    assert result.counts["rejected_malformed_row"] == len(broken)


def test_csv_without_broken_rows(tmp_path: Path) -> None:
    small = demo_data.generate(200, seed=1)
    path = tmp_path / "clean.csv"
    assert demo_data.write_csv(small, path, broken_share=0.0) == []
    loaded = load(ContactSource.from_path(path))
    assert loaded.frame.height == 200 and loaded.rejected == []
    with pytest.raises(InputError, match="broken_share"):
        demo_data.write_csv(small, path, broken_share=2.0)


def test_parquet_round_trip(tmp_path: Path, frame: pl.DataFrame) -> None:
    path = demo_data.write_parquet(frame, tmp_path / "sub" / "contacts.parquet")
    assert pl.read_parquet(path).equals(frame)


def test_negative_count() -> None:
    with pytest.raises(InputError, match="zero or more"):
        demo_data.generate(-1)
