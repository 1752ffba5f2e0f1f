"""Send-time reply classification: an SMTP reply becomes a ledger state and a reason.

The reason comes from the same table as returned bounces (``recapito.bounces.classify``:
provider → text in English and Italian → enhanced status → reply code → unknown), so a
mailbox that is "piena" at send time and in a DSN gets the same name. This module adds only
what is particular to a live reply: the ledger state. Anything not recognised is
``unknown``, which never suppresses.
"""

from __future__ import annotations

from dataclasses import dataclass

from recapito.bounces.classify import classify, find_status
from recapito.ledger.states import State


@dataclass(frozen=True)
class ReplyVerdict:
    state: State
    reason: str
    permanence: str  # "permanent" | "temporary" | "none"
    status: str | None  # enhanced status code if any


def enhanced_status(text: str) -> str | None:
    return find_status(text)


def classify_reply(code: int, text: str, provider: str | None = None) -> ReplyVerdict:
    """Map a final SMTP reply for one recipient to a ledger outcome."""
    status = enhanced_status(text)
    if 200 <= code < 300:
        return ReplyVerdict(State.ACCEPTED, "accepted", "none", status)
    reason, _permanence, _scope, _confidence = classify(code, status, text, provider)
    if 400 <= code < 500:
        return ReplyVerdict(State.DEFERRED, reason, "temporary", status)
    if reason == "greylisted":
        reason = "unknown"  # a 5xx that mentions greylisting: do not guess
    if reason == "insecure_channel":
        # the remote demands a TLS we did not use: a dedicated outcome, not a bounce
        return ReplyVerdict(State.INSECURE_CHANNEL, reason, "permanent", status)
    return ReplyVerdict(State.FAILED, reason, "permanent", status)
