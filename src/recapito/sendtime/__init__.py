"""Send-time planning: the campaign's local-time window and the best time per contact
(DESIGN §9). Prefect-free; the campaign flow schedules its slots from ``best_times``."""

from recapito.sendtime.history import EngagementHistory
from recapito.sendtime.model import (
    BestTimeModel,
    Profiles,
    best_times,
    plan_best_times,
    profiles,
)
from recapito.sendtime.window import (
    HOURS_PER_WEEK,
    WEEKDAYS,
    SendWindow,
    easter,
    italian_holidays,
    next_slots,
)

__all__ = [
    "HOURS_PER_WEEK",
    "WEEKDAYS",
    "BestTimeModel",
    "EngagementHistory",
    "Profiles",
    "SendWindow",
    "best_times",
    "easter",
    "italian_holidays",
    "next_slots",
    "plan_best_times",
    "profiles",
]
