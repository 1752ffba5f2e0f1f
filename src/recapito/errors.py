"""Errors the core raises, as data the orchestration layer can act on.

``RecapitoError`` and its subclasses carry a message meant for a human: the CLI prints
it on one line and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations


class RecapitoError(Exception):
    """Base class: an error with a message fit to show to the user as it is."""


class InputError(RecapitoError):
    """Bad user input: a contact file, a mapping, a filter, a parameter."""


class TemplateError(RecapitoError):
    """A template that cannot be compiled or rendered (names the template and the cause)."""


class ConfigError(RecapitoError):
    """A setting that is missing or malformed."""


class LedgerError(RecapitoError):
    """The ledger refused an operation (unknown campaign, illegal state change...)."""


class TransientError(RecapitoError):
    """Worth retrying later (network, DNS timeout, 4xx)."""


class PermanentError(RecapitoError):
    """Retrying will not help."""
