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
    # PEC receipts (recapito.pec.collector); ``accepted`` is the provider's SMTP reply
    PEC_ACCEPTED = "pec_accepted"  # acceptance receipt (accettazione)
    PEC_REJECTED = "pec_rejected"  # non-accettazione: the provider refused the message
    NOT_PEC = "not_pec"  # the recipient is not a PEC mailbox (``esterno``): no legal value
    DELIVERY_WARNING = "delivery_warning"  # 12 h preavviso-errore-consegna
    DELIVERY_TIMEOUT = "delivery_timeout"  # no delivery receipt within 24 h
    DELIVERY_ERROR = "delivery_error"  # errore-consegna (or virus at the recipient's provider)


# Outcomes a worker may write on a row it holds a claim on.
SEND_OUTCOMES = frozenset(
    {State.ACCEPTED, State.DEFERRED, State.FAILED, State.INSECURE_CHANNEL, State.SUPPRESSED}
)

# PEC receipts arrive in any order: a receipt moves a row forward, never back (a delivery
# receipt still counts after the 12 h warning or the 24 h timeout; ``esterno`` ends not_pec).
PEC_FROM_SUBMITTED = frozenset(
    {
        State.PEC_ACCEPTED,
        State.PEC_REJECTED,
        State.NOT_PEC,
        State.DELIVERY_WARNING,
        State.DELIVERY_TIMEOUT,
        State.DELIVERED,
        State.DELIVERY_ERROR,
    }
)
# PEC states still waiting for a receipt (their send stage is over: nothing is resent)
PEC_AWAITING = frozenset({State.PEC_ACCEPTED, State.DELIVERY_WARNING, State.DELIVERY_TIMEOUT})
PEC_TRANSITIONS: dict[State, frozenset[State]] = {
    State.PEC_ACCEPTED: frozenset(
        {
            State.NOT_PEC,
            State.DELIVERY_WARNING,
            State.DELIVERY_TIMEOUT,
            State.DELIVERED,
            State.DELIVERY_ERROR,
        }
    ),
    State.DELIVERY_WARNING: frozenset(
        {State.NOT_PEC, State.DELIVERY_TIMEOUT, State.DELIVERED, State.DELIVERY_ERROR}
    ),
    State.DELIVERY_TIMEOUT: frozenset({State.NOT_PEC, State.DELIVERED, State.DELIVERY_ERROR}),
    State.PEC_REJECTED: frozenset(),
    State.NOT_PEC: frozenset(),
    State.DELIVERY_ERROR: frozenset(),
}

TRANSITIONS: dict[State, frozenset[State]] = {
    State.PLANNED: frozenset({State.CLAIMED, State.SUPPRESSED}),
    State.CLAIMED: SEND_OUTCOMES | {State.SENDING, State.PLANNED, State.EXPIRED},
    State.SENDING: SEND_OUTCOMES | {State.UNCERTAIN, State.EXPIRED},
    State.DEFERRED: frozenset({State.CLAIMED, State.EXPIRED, State.SUPPRESSED}),
    # a bounce proves an uncertain message was accepted after all
    State.UNCERTAIN: frozenset({State.PLANNED, State.ACCEPTED, State.FAILED, State.BOUNCED})
    | PEC_FROM_SUBMITTED,
    State.ACCEPTED: frozenset({State.BOUNCED, State.DELIVERED}) | PEC_FROM_SUBMITTED,
    State.DELIVERED: frozenset({State.BOUNCED}),
    State.FAILED: frozenset({State.PLANNED}),  # only by an operator's resend
    State.SUPPRESSED: frozenset(),
    State.INSECURE_CHANNEL: frozenset(),
    State.EXPIRED: frozenset(),
    State.BOUNCED: frozenset(),
    **PEC_TRANSITIONS,
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
        State.PEC_ACCEPTED,
        State.PEC_REJECTED,
        State.NOT_PEC,
        State.DELIVERY_WARNING,
        State.DELIVERY_TIMEOUT,
        State.DELIVERY_ERROR,
    }
)


def can_transition(current: State, new: State) -> bool:
    return new in TRANSITIONS[current]
