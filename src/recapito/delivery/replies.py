"""Send-time reply classification: an SMTP reply becomes a ledger state and a reason.

First version: enhanced status code, then the reply code, with a few well-known texts
(English and Italian). The bounce issue brings the full classifier; this one never
suppresses on a guess: anything it does not recognise is ``unknown``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from recapito.ledger.states import State

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")

_TEXT_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"grey ?list|gray ?list|try again later|riprova(re)? più tardi", re.I),
        "greylisted",
    ),
    (
        re.compile(r"starttls|encryption (is )?(needed|required)|must issue a starttls", re.I),
        "insecure_channel",
    ),
    (
        re.compile(r"mailbox (is )?full|over ?quota|casella piena|quota (superata|exceeded)", re.I),
        "mailbox_full",
    ),
    (
        re.compile(
            r"user unknown|no such user|unknown user|does not exist|mailbox unavailable|"
            r"utente (sconosciuto|inesistente)|indirizzo inesistente|casella inesistente",
            re.I,
        ),
        "user_unknown",
    ),
    (re.compile(r"spam|blocked|blacklist|block ?list|reputation", re.I), "spam_rejected"),
    (re.compile(r"too large|size limit|message size|troppo grande", re.I), "message_too_large"),
    (re.compile(r"relay(ing)? (access )?denied|not permitted to relay", re.I), "relay_denied"),
)

_ENHANCED_RULES: dict[str, str] = {
    "1.1": "user_unknown",
    "1.2": "domain_invalid",
    "1.10": "domain_invalid",
    "1.6": "mailbox_moved",
    "2.1": "mailbox_disabled",
    "2.2": "mailbox_full",
    "2.3": "message_too_large",
    "3.4": "message_too_large",
    "4.1": "remote_temporary",
    "4.7": "expired",
    "7.1": "recipient_policy",
    "7.10": "insecure_channel",
    "7.11": "insecure_channel",
    "7.26": "auth_failure",
    "7.27": "auth_failure",
}


@dataclass(frozen=True)
class ReplyVerdict:
    state: State
    reason: str
    permanence: str  # "permanent" | "temporary" | "none"
    status: str | None  # enhanced status code if any


def enhanced_status(text: str) -> str | None:
    match = _ENHANCED.search(text)
    return ".".join(match.groups()) if match else None


def classify_reply(code: int, text: str) -> ReplyVerdict:
    """Map a final SMTP reply for one recipient to a ledger outcome."""
    status = enhanced_status(text)
    if 200 <= code < 300:
        return ReplyVerdict(State.ACCEPTED, "accepted", "none", status)
    temporary = 400 <= code < 500
    reason = "unknown"
    for pattern, name in _TEXT_RULES:
        if pattern.search(text):
            reason = name
            break
    if reason == "unknown" and status is not None:
        _, subject_detail = status.split(".", 1)
        reason = _ENHANCED_RULES.get(subject_detail, "unknown")
    if temporary:
        if reason in ("unknown", "user_unknown", "domain_invalid"):
            reason = "remote_temporary" if reason == "unknown" else reason
        if status == "4.7.1" and reason == "recipient_policy":
            reason = "greylisted"
        return ReplyVerdict(State.DEFERRED, reason, "temporary", status)
    if reason == "greylisted":
        reason = "unknown"
    if reason == "insecure_channel":
        # the remote demands a TLS we did not use: a dedicated outcome, not a bounce
        return ReplyVerdict(State.INSECURE_CHANNEL, reason, "permanent", status)
    return ReplyVerdict(State.FAILED, reason, "permanent", status)
