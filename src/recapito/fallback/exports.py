"""Data-cleaning export for contact centres: whom to call for a better e-mail address.

One row per recipient the platform could not reach by e-mail for a reason that a phone
call can fix: ``insecure_channel`` (their provider's MX offers no acceptable TLS) and hard
bounces (``user_unknown``, ``domain_invalid``, ``mailbox_moved``, ``mailbox_disabled``,
found at send time or by the bounce collector, unless the bounce said it was temporary).

Columns, and nothing else (no e-mail address, no message content):

``key``            pseudonymous key: ``<key id>-<HMAC-SHA256(contact id)>`` (32 hex digits),
                   keyed by ``RECAPITO_EXPORT_KEYS`` (or the generated
                   ``$RECAPITO_HOME/secrets/export-keys``), the same for a contact in every
                   campaign, so exports can be joined without the contact id
``campaign``       campaign name
``name``           first and last name from the campaign's audience snapshot
``phone``          as the contact source has it
``reason_code``    ``insecure_channel`` or the bounce reason
``failing_domain`` the recipient domain that failed
``mx_level``       TLS level reached with its MX (the delivery's, else the MX host's facts)
``date``           day of the failure (UTC, ISO 8601)

``write_cleaning_export(ledger, campaign_id, out_dir)`` writes
``cleaning-<campaign>.csv``/``.parquet`` for one campaign and merges its rows into the
rolling ``cleaning-rolling.csv``/``.parquet`` (one row per key: the latest failure wins);
with ``campaign_id=None`` it rebuilds the rolling export from every campaign. Files are
mode 0600 in a 0700 folder.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import sqlalchemy as sa

from recapito.bounces.classify import HARD_REASONS
from recapito.config import Settings
from recapito.errors import ConfigError
from recapito.fallback.paper import write_private
from recapito.identity.verp import VerpKeyring
from recapito.ledger import Ledger, State
from recapito.ledger.schema import campaigns, deliveries, mx_facts

__all__ = [
    "COLUMNS",
    "EXPORT_REASONS",
    "CleaningExport",
    "cleaning_rows",
    "export_keyring",
    "pseudonym",
    "write_cleaning_export",
]

GENERATED_EXPORT_KEYS = Path("secrets") / "export-keys"
EXPORT_REASONS = frozenset(HARD_REASONS | {"mailbox_disabled"})
COLUMNS = (
    "key",
    "campaign",
    "name",
    "phone",
    "reason_code",
    "failing_domain",
    "mx_level",
    "date",
)
SCHEMA = pl.Schema({c: pl.String() for c in COLUMNS})
ROLLING = "cleaning-rolling"
_CONTEXT = b"recapito-cleaning-export-v1"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def export_keyring(settings: Settings) -> VerpKeyring:
    """The export keyring the settings name, or the generated one under the home."""
    if settings.export_keys:
        return VerpKeyring.parse(settings.export_keys, "RECAPITO_EXPORT_KEYS")
    if settings.export_keys_file is not None:
        path = settings.export_keys_file
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"RECAPITO_EXPORT_KEYS_FILE={path}: unreadable ({exc})") from exc
        return VerpKeyring.parse(text, f"RECAPITO_EXPORT_KEYS_FILE={path}")
    return VerpKeyring.generated(settings.home, GENERATED_EXPORT_KEYS)


def pseudonym(contact_id: str, keyring: VerpKeyring) -> str:
    """The contact's pseudonymous key under the keyring's first key."""
    key_id, secret = keyring.keys[0]
    mac = hmac.new(
        secret, b"\0".join((_CONTEXT, key_id.encode(), contact_id.encode())), hashlib.sha256
    )
    return f"{key_id}-{mac.hexdigest()[:32]}"


@dataclass
class CleaningExport:
    """What one call wrote: rows of the campaign (or of the rolling export) and the files."""

    rows: int
    rolling_rows: int
    paths: list[Path] = field(default_factory=list)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def _contacts_of(settings: Settings, campaign: str) -> dict[str, tuple[str | None, str | None]]:
    """contact id → (name, phone) from the campaign's audience snapshot, when it exists."""
    from recapito.campaign import campaign_dir

    path = campaign_dir(settings, campaign) / "audience.parquet"
    if not path.exists():
        return {}
    frame = pl.read_parquet(path)
    return _contact_map(frame)


def _contact_map(frame: pl.DataFrame) -> dict[str, tuple[str | None, str | None]]:
    cols = set(frame.columns)
    wanted = [c for c in ("contact_id", "first_name", "last_name", "phone") if c in cols]
    if "contact_id" not in cols:
        return {}
    out: dict[str, tuple[str | None, str | None]] = {}
    for row in frame.select(wanted).iter_rows(named=True):
        name = _text(" ".join(str(row.get(k) or "") for k in ("first_name", "last_name")))
        out[str(row["contact_id"])] = (name, _text(row.get("phone")))
    return out


def cleaning_rows(
    ledger: Ledger,
    campaign_id: int,
    keyring: VerpKeyring,
    contacts: Mapping[str, tuple[str | None, str | None]],
) -> list[dict[str, str | None]]:
    """The export rows of one campaign (see the module docstring), ordered by delivery."""
    hard = sa.and_(
        deliveries.c.state.in_([State.BOUNCED.value, State.FAILED.value]),
        deliveries.c.reason.in_(sorted(EXPORT_REASONS)),
        sa.func.coalesce(deliveries.c.permanence, "") != "temporary",
    )
    query = (
        sa.select(
            deliveries.c.contact_id,
            deliveries.c.state,
            deliveries.c.reason,
            deliveries.c.domain,
            deliveries.c.tls_level,
            deliveries.c.updated_at,
            mx_facts.c.tls_level.label("mx_tls_level"),
            campaigns.c.name.label("campaign"),
        )
        .select_from(
            deliveries.join(campaigns, campaigns.c.id == deliveries.c.campaign_id).outerjoin(
                mx_facts, mx_facts.c.mx_host == deliveries.c.mx_host
            )
        )
        .where(
            deliveries.c.campaign_id == campaign_id,
            sa.or_(deliveries.c.state == State.INSECURE_CHANNEL.value, hard),
        )
        .order_by(deliveries.c.id)
    )
    rows: list[dict[str, str | None]] = []
    with ledger.engine.connect() as conn:
        for r in conn.execute(query).mappings():
            contact_id = str(r["contact_id"])
            name, phone = contacts.get(contact_id, (None, None))
            when = r["updated_at"]
            insecure = r["state"] == State.INSECURE_CHANNEL.value
            rows.append(
                {
                    "key": pseudonym(contact_id, keyring),
                    "campaign": str(r["campaign"]),
                    "name": name,
                    "phone": phone,
                    "reason_code": "insecure_channel" if insecure else str(r["reason"]),
                    "failing_domain": _text(r["domain"]),
                    "mx_level": _text(r["tls_level"] or r["mx_tls_level"]),
                    "date": when.date().isoformat() if isinstance(when, datetime) else None,
                }
            )
    return rows


def _frame(rows: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    data = list(rows)
    return pl.DataFrame({c: [r.get(c) for r in data] for c in COLUMNS}, schema=SCHEMA, strict=False)


def _write(frame: pl.DataFrame, base: Path) -> list[Path]:
    csv_path, parquet_path = base.with_suffix(".csv"), base.with_suffix(".parquet")
    write_private(csv_path, frame.write_csv().encode("utf-8"))
    buf = io.BytesIO()
    frame.write_parquet(buf)
    write_private(parquet_path, buf.getvalue())
    return [csv_path, parquet_path]


def _dedupe(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per key: the latest failure (a later row wins a tie)."""
    return (
        frame.with_row_index("_order")
        .sort(["date", "_order"], nulls_last=False)
        .unique(subset=["key"], keep="last", maintain_order=True)
        .sort("_order")
        .drop("_order")
    )


def write_cleaning_export(
    ledger: Ledger,
    campaign_id: int | None,
    out_dir: str | Path,
    *,
    settings: Settings | None = None,
    keyring: VerpKeyring | None = None,
    contacts: pl.DataFrame | None = None,
) -> CleaningExport:
    """Write the campaign's export and merge it into the rolling one (module docstring).

    ``contacts`` (``contact_id``, ``first_name``, ``last_name``, ``phone``) replaces the
    campaign's audience snapshot as the source of names and phones.
    """
    settings = settings or Settings.load()
    keyring = keyring or export_keyring(settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    given = _contact_map(contacts) if contacts is not None else None
    paths: list[Path] = []
    rolling_base = out / ROLLING
    if campaign_id is not None:
        camp = ledger.campaign_by_id(campaign_id)
        people = given if given is not None else _contacts_of(settings, camp.name)
        frame = _frame(cleaning_rows(ledger, campaign_id, keyring, people))
        safe = _SAFE.sub("_", camp.name)
        paths += _write(frame, out / f"cleaning-{safe}")
        previous = rolling_base.with_suffix(".parquet")
        if previous.exists():
            old = pl.read_parquet(previous).cast(SCHEMA, strict=False)
            old = old.select(COLUMNS)
            # this campaign's rows replace its earlier ones (an export run again)
            old = old.filter(pl.col("campaign") != camp.name)
            frame_all = pl.concat([old, frame], how="vertical")
        else:
            frame_all = frame
        rows = frame.height
    else:
        parts = []
        for camp in ledger.list_campaigns():
            people = given if given is not None else _contacts_of(settings, camp.name)
            parts.append(_frame(cleaning_rows(ledger, camp.id, keyring, people)))
        frame_all = pl.concat(parts, how="vertical") if parts else _frame([])
        rows = frame_all.height
    rolling = _dedupe(frame_all)
    paths += _write(rolling, rolling_base)
    return CleaningExport(rows=rows, rolling_rows=rolling.height, paths=paths)
