"""Settings: bad values are one clear error, never a silent new ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from recapito.config import Settings
from recapito.errors import ConfigError, LedgerError
from recapito.ledger import Ledger


def test_home_that_is_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        Settings.load({"RECAPITO_HOME": str(afile)})


def test_explicit_sqlite_ledger_in_a_missing_directory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'typo' / 'ledger.db'}"
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load({"RECAPITO_HOME": str(tmp_path), "RECAPITO_DB_URL": url})
    assert not (tmp_path / "typo").exists()


def test_default_ledger_lives_in_home(tmp_path: Path) -> None:
    settings = Settings.load({"RECAPITO_HOME": str(tmp_path / "new")})
    assert settings.db_url == f"sqlite:///{tmp_path / 'new' / 'recapito.db'}"


def test_unsupported_and_unreachable_ledgers() -> None:
    with pytest.raises(ConfigError, match="unsupported database"):
        Ledger("mysql://x")
    with pytest.raises(LedgerError, match=r"unreachable .*check RECAPITO_DB_URL"):
        Ledger("postgresql://u:secret@127.0.0.1:1/x")
    try:
        Ledger("postgresql://u:secret@127.0.0.1:1/x")
    except LedgerError as exc:
        assert "secret" not in str(exc)


@pytest.mark.parametrize(
    ("name", "value"),
    [("RECAPITO_DNS", "nope"), ("RECAPITO_MX_PORT", "x"), ("RECAPITO_HTTPS_PORT", "99999")],
)
def test_malformed_values(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.load({"RECAPITO_HOME": str(tmp_path), name: value})
