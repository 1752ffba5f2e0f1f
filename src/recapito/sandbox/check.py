"""Compare what the ledger says was accepted with what the sandbox MX servers stored.

Used by ``make demo`` and by the end-to-end test: every accepted delivery must be in
exactly one Maildir, nothing twice, and nothing stored that the ledger does not know.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from recapito.errors import InputError
from recapito.ledger import Ledger
from recapito.sandbox.maildir import iter_maildirs


def compare_with_maildirs(ledger: Ledger, campaign_name: str, maildir_root: Path) -> dict[str, Any]:
    campaign = ledger.get_campaign(campaign_name)
    if campaign is None:
        raise InputError(f"no campaign named {campaign_name!r} in the ledger")
    # e-mail rows only: PEC messages go to the PEC providers, which store receipts instead
    rows = [r for r in ledger.deliveries_of(campaign.id) if r.get("channel", "email") == "email"]
    accepted = {str(r["id"]) for r in rows if r["state"] == "accepted"}
    not_accepted = {str(r["id"]) for r in rows if r["state"] != "accepted"}
    uncertain = {str(r["id"]) for r in rows if r["state"] == "uncertain"}
    stored: Counter[str] = Counter()
    for message in iter_maildirs(maildir_root):
        if message.header("X-Recapito-Campaign") != campaign_name:
            continue
        if message.delivery_id is not None:
            stored[message.delivery_id] += 1
    missing = accepted - set(stored)
    duplicates = {d for d, n in stored.items() if n > 1}
    # a stored message of a delivery the ledger did not record as accepted (uncertain
    # deliveries may legitimately have arrived: they are reported, not counted as errors)
    unexpected = {
        d for d in stored if d in not_accepted - uncertain or d not in accepted | not_accepted
    }
    return {
        "accepted": len(accepted),
        "stored": sum(stored.values()),
        "missing": len(missing),
        "duplicates": len(duplicates),
        "unexpected": len(unexpected),
        "uncertain_stored": len(uncertain & set(stored)),
        "missing_ids": sorted(missing)[:20],
        "duplicate_ids": sorted(duplicates)[:20],
        "unexpected_ids": sorted(unexpected)[:20],
    }
