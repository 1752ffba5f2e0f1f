"""The contacts commands: demo-data and contacts check."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from recapito.contacts.cli import contacts, demo_data


def test_demo_data_writes_both_formats(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        demo_data, ["--contacts", "2000", "--seed", "3", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["contacts"] == 2000 and report["seed"] == 3
    assert report["broken_csv_rows"] == 2
    assert Path(report["files"]["csv"]) == out / "contacts.csv"
    assert pl.read_parquet(out / "contacts.parquet").height == 2000


def test_demo_data_default_dir_and_single_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECAPITO_HOME", str(tmp_path))
    result = CliRunner().invoke(demo_data, ["--contacts", "100", "--format", "parquet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "contacts.parquet").is_file()
    assert not (tmp_path / "demo" / "contacts.csv").exists()
    assert "parquet:" in result.output


def test_contacts_check(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "demo"
    assert runner.invoke(demo_data, ["--contacts", "3000", "--out", str(out)]).exit_code == 0
    result = runner.invoke(
        contacts,
        ["check", str(out / "contacts.csv"), "--filter", 'provincia = "MI"', "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    counts = report["counts"]
    assert counts["contacts"] == 3000
    assert counts["rejected_malformed_row"] == 3
    assert counts["contacts"] == counts["rejected"] + counts["filtered_out"] + counts["targeted"]
    assert report["delimiter"] == ";"
    assert report["mapping"]["email"] == "email"

    text = runner.invoke(contacts, ["check", str(out / "contacts.csv")])
    assert text.exit_code == 0
    assert "targeted:" in text.output


def test_contacts_check_bad_input_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(contacts, ["check", str(tmp_path / "nope.csv")])
    assert result.exit_code != 0
    assert "no such file" in result.output
    assert result.output.strip().count("\n") == 0
    bad_filter = tmp_path / "c.csv"
    bad_filter.write_text("email\na@b.it\n", encoding="utf-8")
    result = CliRunner().invoke(contacts, ["check", str(bad_filter), "--filter", "emial = 1"])
    assert result.exit_code != 0
    assert "unknown column 'emial' at position 1" in result.output
