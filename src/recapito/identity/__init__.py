"""Sender identity: the signed VERP return path and DKIM signatures (Prefect-free core)."""

from recapito.identity.dkim import DkimKey, DkimSigner
from recapito.identity.sender import SenderIdentity
from recapito.identity.verp import VerpError, VerpKeyring, parse_verp, verp_address

__all__ = [
    "DkimKey",
    "DkimSigner",
    "SenderIdentity",
    "VerpError",
    "VerpKeyring",
    "parse_verp",
    "verp_address",
]
