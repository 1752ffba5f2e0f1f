"""Delivery states and the transitions the ledger allows (DESIGN §3).

``planned → claimed → sending → accepted | deferred | failed | insecure_channel``;
``deferred → claimed`` again when due. ``sending`` is committed just before the message
body goes out: a ``sending`` row whose lease ran out is ``uncertain`` (the server may have
accepted it), never resent without an operator's decision; a ``claimed`` row whose lease
ran out never got that far and simply goes back to ``planned``. Post-send states
(bounced, delivered, opened...) come from collectors: the bounce collector moves an
``accepted``, ``delivered`` or ``uncertain`` row to ``bounced`` (``recapito.collect.bounces``).
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    PLANNED = "planned"
    CLAIMED = "claimed"
    SENDING = "sending"
    ACCEPTED = "accepted"
    DEFERRED = "deferred"
    FAILED = "failed"
    SUPPRESSED = "suppressed"
    INSECURE_CHANNEL = "insecure_channel"
    UNCERTAIN = "uncertain"
    EXPIRED = "expired"
    BOUNCED = "bounced"
    DELIVERED = "delivered"


# Outcomes a worker may write on a row it holds a claim on.
SEND_OUTCOMES = frozenset(
    {State.ACCEPTED, State.DEFERRED, State.FAILED, State.INSECURE_CHANNEL, State.SUPPRESSED}
)

TRANSITIONS: dict[State, frozenset[State]] = {
    State.PLANNED: frozenset({State.CLAIMED, State.SUPPRESSED}),
    State.CLAIMED: SEND_OUTCOMES | {State.SENDING, State.PLANNED, State.EXPIRED},
    State.SENDING: SEND_OUTCOMES | {State.UNCERTAIN, State.EXPIRED},
    State.DEFERRED: frozenset({State.CLAIMED, State.EXPIRED, State.SUPPRESSED}),
    # a bounce proves an uncertain message was accepted after all
    State.UNCERTAIN: frozenset({State.PLANNED, State.ACCEPTED, State.FAILED, State.BOUNCED}),
    State.ACCEPTED: frozenset({State.BOUNCED, State.DELIVERED}),
    State.DELIVERED: frozenset({State.BOUNCED}),
    State.FAILED: frozenset({State.PLANNED}),  # only by an operator's resend
    State.SUPPRESSED: frozenset(),
    State.INSECURE_CHANNEL: frozenset(),
    State.EXPIRED: frozenset(),
    State.BOUNCED: frozenset(),
}

# States that can be claimed for sending.
CLAIMABLE = frozenset({State.PLANNED, State.DEFERRED})
# States that end the send stage of a delivery (nothing more will be attempted by itself).
FINAL = frozenset(
    {
        State.ACCEPTED,
        State.FAILED,
        State.SUPPRESSED,
        State.INSECURE_CHANNEL,
        State.EXPIRED,
        State.BOUNCED,
        State.DELIVERED,
    }
)


def can_transition(current: State, new: State) -> bool:
    return new in TRANSITIONS[current]
