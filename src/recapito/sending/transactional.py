"""Transactional messages: one message to one contact through the campaign path.

Each message is a one-recipient campaign named ``tx-<template>-<day>-<key>``: the same
targeting (suppressions, address checks), channel rules, Secure Email policy, ledger rows
and artifacts as any campaign. The key is the caller's ``message_key`` (an order number, a
request id) or a digest of the request, so a request repeated the same day (a retried API
call, an event delivered twice) resumes the same campaign and never sends twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from recapito.campaign import CampaignParams
from recapito.config import Settings
from recapito.errors import InputError

_SAFE = re.compile(r"[^a-z0-9-]+")


def _slug(text: str, limit: int) -> str:
    return _SAFE.sub("-", text.lower()).strip("-")[:limit] or "x"


def message_params(
    settings: Settings,
    *,
    template: str,
    contact: Mapping[str, Any],
    sender: str,
    message_key: str | None = None,
    rules: str | None = None,
    tls_policy: str = "opportunistic",
    pec_mailbox_blocks: list[str] | None = None,
    tracking: bool = True,
    now: datetime | None = None,
) -> CampaignParams:
    """The one-recipient campaign of a message; writes its contact file (0600) once."""
    if not contact:
        raise InputError("a message needs the contact's fields (at least email or pec)")
    fields = {str(k): "" if v is None else str(v) for k, v in contact.items()}
    fields.setdefault("id", message_key or "")
    day = (now or datetime.now(UTC)).strftime("%Y%m%d")
    request = json.dumps(
        {"template": template, "contact": fields, "sender": sender, "rules": rules},
        sort_keys=True,
    )
    digest = hashlib.sha256(request.encode()).hexdigest()[:16]
    key = _slug(message_key, 40) if message_key else digest
    if not fields["id"]:
        fields["id"] = key
    name = f"tx-{_slug(Path(template).name, 30)}-{day}-{key}"
    folder = settings.home / "transactional" / day
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / f"{name}.parquet"
    frame = pl.DataFrame({k: [v] for k, v in fields.items()})
    if path.exists():
        if pl.read_parquet(path).to_dicts() != frame.to_dicts():
            raise InputError(
                f"message key {message_key!r} was used today for another message: use a new key"
            )
    else:
        tmp = path.with_suffix(".tmp")
        frame.write_parquet(tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return CampaignParams(
        name=name,
        contacts=str(path),
        template=template,
        sender=sender,
        rules=rules,
        tls_policy=tls_policy,
        pec_mailbox_blocks=list(pec_mailbox_blocks or []),
        tracking=tracking,
        chunk_size=10,
        parallel_chunks=1,
        retry_after_seconds=60,
    )


def message_outcome(settings: Settings, name: str) -> dict[str, Any]:
    """The message's delivery: channel, state, reason, TLS (never the address)."""
    from recapito.ledger import Ledger

    ledger = Ledger(settings.db_url, run_migrations=False)
    try:
        camp = ledger.get_campaign(name)
        if camp is None:
            raise InputError(f"no message {name!r}")
        rows = ledger.deliveries_of(camp.id)
        rejected = ledger.rejection_counts(camp.id)
    finally:
        ledger.close()
    if not rows:
        return {"campaign": name, "state": "rejected", "reasons": rejected}
    row = rows[0]
    keys = ("channel", "state", "reason", "reply_code", "tls_version", "tls_level", "message_id")
    return {"campaign": name, "delivery_id": row.get("id"), **{k: row.get(k) for k in keys}}
