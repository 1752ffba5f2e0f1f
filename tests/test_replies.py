"""Send-time SMTP reply classification."""

from __future__ import annotations

import pytest

from recapito.delivery.replies import classify_reply
from recapito.ledger import State


@pytest.mark.parametrize(
    ("code", "text", "state", "reason", "status"),
    [
        (250, "2.0.0 Ok: queued as 1234", State.ACCEPTED, "accepted", "2.0.0"),
        (
            550,
            "5.1.1 <x@y>: Recipient address rejected: User unknown",
            State.FAILED,
            "user_unknown",
            "5.1.1",
        ),
        (550, "5.1.1 Utente inesistente", State.FAILED, "user_unknown", "5.1.1"),
        (451, "4.7.1 Greylisted, please try again later", State.DEFERRED, "greylisted", "4.7.1"),
        (452, "4.2.2 Mailbox full", State.DEFERRED, "mailbox_full", "4.2.2"),
        (552, "5.2.2 casella piena", State.FAILED, "mailbox_full", "5.2.2"),
        (
            530,
            "5.7.0 Must issue a STARTTLS command first",
            State.INSECURE_CHANNEL,
            "insecure_channel",
            "5.7.0",
        ),
        (554, "5.7.1 Message rejected as spam", State.FAILED, "spam_rejected", "5.7.1"),
        (421, "Service not available", State.DEFERRED, "remote_temporary", None),
        (550, "Denied", State.FAILED, "unknown", None),
        (550, "5.1.10 null MX", State.FAILED, "domain_invalid", "5.1.10"),
    ],
)
def test_classify(code: int, text: str, state: State, reason: str, status: str | None) -> None:
    verdict = classify_reply(code, text)
    assert (verdict.state, verdict.reason, verdict.status) == (state, reason, status)
    assert (
        verdict.permanence
        == {
            State.ACCEPTED: "none",
            State.DEFERRED: "temporary",
            State.FAILED: "permanent",
            State.INSECURE_CHANNEL: "permanent",
        }[state]
    )
