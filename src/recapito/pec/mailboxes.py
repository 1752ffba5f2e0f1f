"""The sender's PEC mailboxes: where to submit, where receipts arrive, and the provider's limits.

In production each mailbox is a Prefect block (``tasks.pec.PecMailboxBlock``, the password a
``SecretStr``) that the tasks layer turns into a ``PecMailbox``; for the sandbox and the demo
they come from a JSON file named by ``RECAPITO_PEC_MAILBOXES_FILE`` (written by the sandbox,
mode 0600)::

    {"mailboxes": [{"name": "postaveloce-1", "address": "campagne@pec.postaveloce.test",
                    "smtp_host": "smtps.pec.postaveloce.test", "smtp_port": 465,
                    "smtp_address": "127.0.0.1", "imap_host": "localhost", "imap_port": 993,
                    "username": "campagne@pec.postaveloce.test", "password": "…",
                    "per_minute": 6, "per_day": 1000, "connections": 1,
                    "max_size": 31457280, "receipt_kind": "breve",
                    "credential_expires": "2026-01-31", "ca_file": "/…/ca.pem"}]}

Passwords never appear in ``repr`` or in logs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recapito.errors import ConfigError

RECEIPT_KINDS = ("completa", "breve", "sintetica")
MAILBOXES_FILE_SETTING = "RECAPITO_PEC_MAILBOXES_FILE"


@dataclass(frozen=True)
class PecMailbox:
    """One PEC mailbox of the sender (plain data: the core never sees Prefect blocks)."""

    name: str
    address: str  # the From and MAIL FROM of every message (= the login, for PEC)
    smtp_host: str  # name on the provider's certificate
    username: str
    password: str = field(repr=False)
    smtp_port: int = 465  # implicit TLS
    smtp_address: str | None = None  # connect here instead of resolving smtp_host
    imap_host: str | None = None
    imap_port: int = 993
    imap_address: str | None = None
    per_minute: float = 6.0  # messages a minute (provider contract)
    per_day: int | None = None  # messages a day
    connections: int = 1  # concurrent SMTP connections
    max_size: int = 30 * 1024 * 1024  # bytes per message (size x recipients)
    receipt_kind: str = "breve"  # X-TipoRicevuta asked for
    credential_expires: dt.date | None = None
    ca_file: Path | None = None  # extra trust anchors (the sandbox CA); system store too

    def __post_init__(self) -> None:
        what = f"PEC mailbox {self.name!r}"
        if self.receipt_kind not in RECEIPT_KINDS:
            raise ConfigError(f"{what}: receipt_kind must be one of {', '.join(RECEIPT_KINDS)}")
        if "@" not in self.address:
            raise ConfigError(f"{what}: address {self.address!r} is not an e-mail address")
        if self.per_minute <= 0 or self.connections < 1 or self.max_size < 1:
            raise ConfigError(f"{what}: limits must be above zero")
        if self.per_day is not None and self.per_day < 1:
            raise ConfigError(f"{what}: per_day must be at least 1")

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    def public(self) -> dict[str, Any]:
        """Everything but the password (artifacts, ``--json`` output)."""
        return {
            "name": self.name,
            "address": self.address,
            "smtp": f"{self.smtp_host}:{self.smtp_port}",
            "imap": f"{self.imap_host}:{self.imap_port}" if self.imap_host else None,
            "per_minute": self.per_minute,
            "per_day": self.per_day,
            "connections": self.connections,
            "max_size": self.max_size,
            "receipt_kind": self.receipt_kind,
            "credential_expires": (
                self.credential_expires.isoformat() if self.credential_expires else None
            ),
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Path | None = None) -> PecMailbox:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        name = str(data.get("name", "?"))
        if unknown:
            raise ConfigError(f"PEC mailbox {name!r}: unknown field(s) {', '.join(unknown)}")
        values = dict(data)
        for key in ("name", "address", "smtp_host", "username", "password"):
            if not isinstance(values.get(key), str) or not values[key]:
                raise ConfigError(f"PEC mailbox {name!r}: {key} is missing")
        expires = values.get("credential_expires")
        if isinstance(expires, str):
            try:
                values["credential_expires"] = dt.date.fromisoformat(expires)
            except ValueError:
                raise ConfigError(
                    f"PEC mailbox {name!r}: credential_expires {expires!r} is not YYYY-MM-DD"
                ) from None
        ca = values.get("ca_file")
        if ca:
            path = Path(str(ca))
            if not path.is_absolute() and base is not None:
                path = base / path
            values["ca_file"] = path
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"PEC mailbox {name!r}: {exc}") from None


def load_mailboxes_file(path: Path) -> dict[str, PecMailbox]:
    """The mailboxes of a JSON file (see the module docstring), by name."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{MAILBOXES_FILE_SETTING}={path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{MAILBOXES_FILE_SETTING}={path}: not JSON ({exc})") from None
    items = data.get("mailboxes") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected {{'mailboxes': [...]}}")
    out: dict[str, PecMailbox] = {}
    for item in items:
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: every mailbox must be an object")
        box = PecMailbox.from_mapping(item, path.parent)
        if box.name in out:
            raise ConfigError(f"{path}: mailbox name {box.name!r} used twice")
        out[box.name] = box
    return out


def mailboxes_file(home: Path, env: Mapping[str, str] | None = None) -> Path | None:
    """Where the mailboxes file is: the environment first, then the sandbox's settings."""
    environ = os.environ if env is None else env
    value = environ.get(MAILBOXES_FILE_SETTING)
    if not value:
        settings = home / "sandbox" / "settings.json"
        try:
            value = json.loads(settings.read_text(encoding="utf-8")).get(MAILBOXES_FILE_SETTING)
        except (OSError, ValueError, AttributeError):
            value = None
    return Path(value) if value else None


def configured_mailboxes(home: Path, env: Mapping[str, str] | None = None) -> dict[str, PecMailbox]:
    """The mailboxes from the settings (none when no file is configured)."""
    path = mailboxes_file(home, env)
    return {} if path is None else load_mailboxes_file(path)


@dataclass(frozen=True)
class ExpiryWarning:
    mailbox: str
    address: str
    expires: dt.date
    days_left: int

    @property
    def expired(self) -> bool:
        return self.days_left < 0


def expiring_credentials(
    mailboxes: Sequence[PecMailbox], *, within_days: int = 14, today: dt.date | None = None
) -> list[ExpiryWarning]:
    """Mailboxes whose credentials expire within ``within_days`` (or already did)."""
    day = today or dt.datetime.now(dt.UTC).date()
    out = []
    for box in mailboxes:
        if box.credential_expires is None:
            continue
        left = (box.credential_expires - day).days
        if left <= within_days:
            out.append(ExpiryWarning(box.name, box.address, box.credential_expires, left))
    return sorted(out, key=lambda w: (w.days_left, w.mailbox))


def expiry_markdown(warnings: Sequence[ExpiryWarning], within_days: int) -> str:
    if not warnings:
        return f"# PEC credentials\n\nNo mailbox credential expires within {within_days} days.\n"
    lines = [
        "# PEC credentials expiring",
        "",
        "Renew these app passwords before they expire: a PEC mailbox whose credentials "
        "expired refuses every submission.",
        "",
        "| mailbox | address | expires | days left |",
        "|---|---|---|---:|",
    ]
    for w in warnings:
        left = "**expired**" if w.expired else str(w.days_left)
        lines.append(f"| {w.mailbox} | {w.address} | {w.expires.isoformat()} | {left} |")
    return "\n".join(lines) + "\n"
