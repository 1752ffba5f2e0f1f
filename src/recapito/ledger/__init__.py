"""The delivery ledger: the source of truth for what was sent, to whom, and how."""

from recapito.ledger.states import State
from recapito.ledger.store import (
    Campaign,
    Claim,
    Ledger,
    MXFacts,
    Outcome,
    PlannedDelivery,
    create_ledger_engine,
    migrate,
)

__all__ = [
    "Campaign",
    "Claim",
    "Ledger",
    "MXFacts",
    "Outcome",
    "PlannedDelivery",
    "State",
    "create_ledger_engine",
    "migrate",
]
