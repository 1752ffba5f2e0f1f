"""Bounces: parse returned messages (DSN, ARF, auto-replies, free-text notices), classify
them by the reasons of DESIGN §7, and correlate them to deliveries."""

from recapito.bounces.classify import HARD_REASONS, REASONS, classify, is_hard
from recapito.bounces.parse import BounceRecipient, BounceReport, parse_bounce

__all__ = [
    "HARD_REASONS",
    "REASONS",
    "BounceRecipient",
    "BounceReport",
    "classify",
    "is_hard",
    "parse_bounce",
]
