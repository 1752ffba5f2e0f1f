"""Sending modes (immediate, scheduled, waves, contact time zone, best time), the business
calendar, approval previews and transactional messages. Prefect-free."""

from recapito.sending.calendar import SendWindow, easter_sunday, is_business_day
from recapito.sending.slots import assign_slots, slot_plan, slot_times, split_due

__all__ = [
    "SendWindow",
    "assign_slots",
    "easter_sunday",
    "is_business_day",
    "slot_plan",
    "slot_times",
    "split_due",
]
