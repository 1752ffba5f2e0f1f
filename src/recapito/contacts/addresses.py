"""Offline e-mail address checks and normalisation.

No DNS is consulted: this only decides whether a string can be an address worth a
delivery attempt, and puts it in the form used for sending and for deduplication.

Normalisation: surrounding whitespace is stripped, the local part is kept as written
(RFC 5321 lets the receiving system treat it case-sensitively), the domain is lowercased,
a single trailing dot is dropped, and an internationalised domain is converted to its
ASCII (IDNA 2008 / UTS 46, "xn--") form. The ``dedupe_key`` is the whole normalised
address lowercased: providers treat local parts case-insensitively in practice, so two
contacts differing only by case are one mailbox.

Rejection reasons, first match wins:

``empty``           nothing there (null or blank)
``whitespace``      a space or other blank inside the address
``missing_at``      no ``@``
``double_dot``      two dots in a row in the local part or the domain
``too_long``        local part over 64 octets, domain over 253, a domain label over 63, or
                    the address over 254
``bad_local_part``  not a dot-atom of ASCII characters (quoted local parts, a second ``@``,
                    leading or trailing dot, non-ASCII characters: most MX hosts refuse
                    SMTPUTF8 local parts, so they are not attempted)
``bad_domain``      not a host name with at least two labels and an alphabetic (or IDNA)
                    top-level label; address literals such as ``[192.0.2.1]`` included

``validate_addresses`` works on a whole polars Series with string kernels; only the
distinct domains go through Python (for IDNA and label checks), so a million addresses
take a second or two. ``check_address`` is the same logic for a single string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import idna
import polars as pl

REASONS = (
    "empty",
    "whitespace",
    "missing_at",
    "double_dot",
    "too_long",
    "bad_local_part",
    "bad_domain",
)

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_\x60{|}~-]"
LOCAL_PART_PATTERN = rf"^{_ATEXT}+(?:\.{_ATEXT}+)*$"
_LOCAL_RE = re.compile(LOCAL_PART_PATTERN)
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_TLD_RE = re.compile(r"^(?:[a-z]{2,63}|xn--[a-z0-9-]{1,59})$")
_WHITESPACE_RE = re.compile(r"\s")


@dataclass(frozen=True)
class AddressCheck:
    """Outcome for one address: the normalised form, or the reason it was refused."""

    address: str | None
    domain: str | None
    dedupe_key: str | None
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.reason is None


def normalise_domain(raw: str) -> tuple[str | None, str | None]:
    """Return ``(ascii_domain, None)`` or ``(None, reason)`` for the part after the ``@``."""
    domain = raw[:-1] if raw.endswith(".") else raw
    if not domain or domain.startswith("["):
        return None, "bad_domain"
    if ".." in domain:
        return None, "double_dot"
    if domain.isascii():
        ascii_domain = domain.lower()
    else:
        try:
            ascii_domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            return None, "bad_domain"
    if len(ascii_domain) > 253:
        return None, "too_long"
    labels = ascii_domain.split(".")
    if len(labels) < 2:
        return None, "bad_domain"
    for label in labels:
        if len(label) > 63:
            return None, "too_long"
        if not _LABEL_RE.match(label):
            return None, "bad_domain"
    if not _TLD_RE.match(labels[-1]):
        return None, "bad_domain"
    return ascii_domain, None


def check_address(raw: str | None) -> AddressCheck:
    """Check and normalise one address (same rules as ``validate_addresses``)."""
    text = (raw or "").strip()
    if not text:
        return AddressCheck(None, None, None, "empty")
    if _WHITESPACE_RE.search(text):
        return AddressCheck(None, None, None, "whitespace")
    if "@" not in text:
        return AddressCheck(None, None, None, "missing_at")
    local, _, domain_raw = text.partition("@")
    if ".." in local:
        return AddressCheck(None, None, None, "double_dot")
    if "@" in domain_raw:
        return AddressCheck(None, None, None, "bad_local_part")
    if len(local.encode("utf-8")) > 64:
        return AddressCheck(None, None, None, "too_long")
    if not _LOCAL_RE.match(local):
        return AddressCheck(None, None, None, "bad_local_part")
    domain, reason = normalise_domain(domain_raw)
    if domain is None:
        return AddressCheck(None, None, None, reason)
    address = f"{local}@{domain}"
    if len(address) > 254:
        return AddressCheck(None, None, None, "too_long")
    return AddressCheck(address, domain, address.lower(), None)


def validate_addresses(values: pl.Series) -> pl.DataFrame:
    """Check a Series of raw addresses; one output row per input row, same order.

    Columns: ``address`` (normalised, null when refused), ``domain`` (ASCII, lowercase),
    ``dedupe_key`` (lowercased address) and ``reason`` (null when accepted).
    """
    frame = pl.DataFrame({"raw": values.cast(pl.String)})
    text = pl.col("raw").str.strip_chars()
    # Split at the first "@"; a second "@" is reported as a bad local part below.
    frame = frame.with_columns(text.alias("s")).with_columns(
        pl.col("s").str.count_matches("@", literal=True).alias("ats"),
        pl.col("s").str.splitn("@", 2).struct.rename_fields(["local", "domain_raw"]).alias("parts"),
    )
    frame = frame.unnest("parts")
    # Distinct domains are few: normalise them in Python, then map back.
    distinct = frame["domain_raw"].drop_nulls().unique().to_list()
    checked = [normalise_domain(d) for d in distinct]
    domain_map = {d: c[0] for d, c in zip(distinct, checked, strict=True)}
    reason_map = {d: c[1] for d, c in zip(distinct, checked, strict=True)}
    frame = frame.with_columns(
        pl.col("domain_raw")
        .replace_strict(domain_map, default=None, return_dtype=pl.String)
        .alias("domain"),
        pl.col("domain_raw")
        .replace_strict(reason_map, default=None, return_dtype=pl.String)
        .alias("domain_reason"),
    )
    s, local, domain = pl.col("s"), pl.col("local"), pl.col("domain")
    address = local + "@" + domain
    reason = (
        pl.when(s.is_null() | (s == ""))
        .then(pl.lit("empty"))
        .when(s.str.contains(r"\s"))
        .then(pl.lit("whitespace"))
        .when(pl.col("ats") == 0)
        .then(pl.lit("missing_at"))
        .when(local.str.contains("..", literal=True))
        .then(pl.lit("double_dot"))
        .when(pl.col("ats") > 1)
        .then(pl.lit("bad_local_part"))
        .when(local.str.len_bytes() > 64)
        .then(pl.lit("too_long"))
        .when(~local.str.contains(LOCAL_PART_PATTERN))
        .then(pl.lit("bad_local_part"))
        .when(pl.col("domain_reason").is_not_null())
        .then(pl.col("domain_reason"))
        .when(address.str.len_bytes() > 254)
        .then(pl.lit("too_long"))
        .otherwise(None)
    )
    frame = frame.with_columns(reason.alias("reason"))
    ok = pl.col("reason").is_null()
    return frame.select(
        pl.when(ok).then(address).otherwise(None).alias("address"),
        pl.when(ok).then(domain).otherwise(None).alias("domain"),
        pl.when(ok).then(address.str.to_lowercase()).otherwise(None).alias("dedupe_key"),
        pl.col("reason"),
    )
