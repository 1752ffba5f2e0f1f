"""Contacts: sources (CSV, Parquet, SQL), column mapping, address checks, filters, targeting.

The submodules are imported on demand; the names below are the public API.
"""

from __future__ import annotations

from recapito.contacts.addresses import AddressCheck, check_address, validate_addresses
from recapito.contacts.filters import FilterError, apply_filter, compile_filter
from recapito.contacts.mapping import ColumnMapping, detect, resolve
from recapito.contacts.sources import ContactSource, Loaded, Rejection, load
from recapito.contacts.targeting import REJECTION_REASONS, Targeted, target

__all__ = [
    "REJECTION_REASONS",
    "AddressCheck",
    "ColumnMapping",
    "ContactSource",
    "FilterError",
    "Loaded",
    "Rejection",
    "Targeted",
    "apply_filter",
    "check_address",
    "compile_filter",
    "detect",
    "load",
    "resolve",
    "target",
    "validate_addresses",
]
