"""``recapito pec …``: PEC diagnostics. ``recapito pec parse FILE… [--json]`` reads receipts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from recapito.errors import InputError


def _files(paths: tuple[str, ...]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.eml") if p.is_file())
        elif path.exists():
            yield path
        else:
            raise InputError(f"{name}: no such file or folder")


@click.group("pec")
def pec() -> None:
    """PEC (posta elettronica certificata): receipts and mailboxes."""


@pec.command("parse")
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file per line.")
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Trust anchors for the signatures (PEM); default RECAPITO_PEC_CA_FILE.",
)
@click.option("--no-verify", is_flag=True, help="Skip the signature check (status unchecked).")
def pec_parse(paths: tuple[str, ...], as_json: bool, ca_file: Path | None, no_verify: bool) -> None:
    """Read PEC receipts (files, or folders of .eml): type (X-Ricevuta / X-Trasporto, or
    not-pec), msgid, identificativo, sender, recipients with tipo, consegna, errore and
    errore-esteso, the daticert date with its zone, receipt kind and signature status."""
    from recapito.pec.collector import trust_store
    from recapito.pec.receipts import parse_receipt
    from recapito.pec.smime import TrustStore

    try:
        trust = TrustStore.from_pem_file(ca_file) if ca_file is not None else trust_store()
    except ValueError as exc:
        raise InputError(f"{ca_file}: {exc}") from None
    for path in _files(paths):
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise InputError(f"{path}: {exc.strerror or exc}") from None
        receipt = parse_receipt(raw, trust, not no_verify)
        line: dict[str, Any] = {"file": str(path), **receipt.as_json()}
        if as_json:
            click.echo(json.dumps(line, ensure_ascii=False))
            continue
        recipients = ", ".join(f"{r['address']} ({r['tipo']})" for r in line["recipients"])
        signature = receipt.signature
        why = f" ({signature.reason})" if signature.reason else ""
        digest = f" {signature.digest}" if signature.digest else ""
        click.echo(
            f"{path}: {line['type']} [{line['kind']}]"
            + (f" {line['receipt_kind']}" if line["receipt_kind"] else "")
            + f"\n  msgid {line['msgid'] or '-'} · identificativo {line['identificativo'] or '-'}"
            + f"\n  sender {line['sender'] or '-'} → {recipients or '-'}"
            + (f" · consegna {line['consegna']}" if line["consegna"] else "")
            + f"\n  errore {line['errore'] or '-'}"
            + (f" ({line['errore_esteso']})" if line["errore_esteso"] else "")
            + f" · date {line['date'] or '-'} · provider {line['provider'] or '-'}"
            + f"\n  signature {signature.status}{digest}{why}"
            + (f"\n  problems: {'; '.join(receipt.problems)}" if receipt.problems else "")
        )
