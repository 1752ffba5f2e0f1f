"""``recapito bounce classify PATH… [--json]``: what each returned message says."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from recapito.bounces.correlate import HasEngine, correlate
from recapito.bounces.parse import BounceRecipient, BounceReport, parse_bounce
from recapito.errors import InputError, RecapitoError


def _files(paths: tuple[str, ...]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.exists():
            yield path
        else:
            raise InputError(f"{name}: no such file or folder")


def _ledger() -> Any:
    """The ledger, when one is configured and exists; None otherwise (no correlation)."""
    from recapito.config import Settings
    from recapito.ledger import Ledger

    try:
        settings = Settings.load()
        sqlite = settings.db_url.startswith("sqlite:///")
        if sqlite and not Path(settings.db_url.removeprefix("sqlite:///")).exists():
            return None
        return Ledger(settings.db_url, run_migrations=False)
    except RecapitoError:
        return None


def _keyring() -> Any:
    from recapito.config import Settings
    from recapito.identity.verp import VerpKeyring

    try:
        settings = Settings.load()
        if settings.verp_keys or settings.verp_keys_file is not None:
            return VerpKeyring.from_settings(settings)
        path = settings.home / "secrets" / "verp-keys"
        return VerpKeyring.parse(path.read_text(encoding="utf-8")) if path.exists() else None
    except (RecapitoError, OSError, UnicodeDecodeError):
        return None


def _rows(report: BounceReport) -> list[BounceRecipient | None]:
    if report.is_bounce:
        return list(report.failed)
    return list(report.recipients[:1]) or [None]


def _line(
    path: Path, report: BounceReport, record: BounceRecipient | None, delivery: int | None
) -> dict[str, Any]:
    return {
        "file": str(path),
        "is_bounce": report.is_bounce,
        "kind": report.kind,
        "recipient": record.recipient if record else None,
        "reason": record.reason if record else "unknown",
        "status": record.status if record else None,
        "permanence": record.permanence if record else None,
        "delivery_id": delivery,
    }


@click.group("bounce")
def bounce() -> None:
    """Read returned messages (DSNs, complaints, auto-replies)."""


@bounce.command("classify")
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def bounce_classify(paths: tuple[str, ...], as_json: bool) -> None:
    """Classify bounce messages (files, or folders of them): one line per failed recipient;
    a message that is not a bounce gets one line too (auto_reply, delayed_warning, …)."""
    files = list(_files(paths))
    ledger: HasEngine | None = _ledger()
    keyring = _keyring() if ledger is not None else None
    try:
        for path in files:
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise InputError(f"{path}: {exc.strerror or exc}") from None
            try:
                report = parse_bounce(raw)
            except InputError as exc:
                raise InputError(f"{path}: {exc}") from None
            for record in _rows(report):
                delivery = None
                if ledger is not None:
                    recipient = record.recipient if record else None
                    delivery = correlate(report, ledger, keyring, recipient=recipient)
                line = _line(path, report, record, delivery)
                if as_json:
                    click.echo(json.dumps(line))
                    continue
                what = line["reason"] if report.is_bounce else report.kind
                if report.is_bounce or report.kind != line["reason"]:
                    what = f"{report.kind}/{line['reason']}" if not report.is_bounce else what
                click.echo(
                    f"{path}: {line['recipient'] or '-'} {what} "
                    f"{line['status'] or '-'} {line['permanence'] or '-'} "
                    + (f"delivery {delivery}" if delivery is not None else "not correlated")
                )
    finally:
        close = getattr(ledger, "close", None)
        if close is not None:
            close()
