"""From loaded contacts to a campaign audience.

``target(loaded, mapping, filter_text, suppressed)`` applies a column mapping, a filter,
consent, address validation, the suppression list and deduplication, and returns the
audience, the rejected contacts with a reason each, and the counts for the funnel.

Order of the steps, and why:

1. **mapping** → canonical columns (below); original columns are kept for templates.
2. **filter** → contacts outside it are *excluded* (``filtered_out``), not rejected. The
   filter runs first so that rejections describe the campaign's own audience, and so a
   contact outside the filter never displaces one inside it as a "duplicate".
3. **rejections**, first applicable reason wins:
   ``no_consent`` (consent column mapped and not a true-like value),
   the address reason (``empty``, ``missing_at``, ``bad_domain``… see ``addresses``),
   ``suppressed`` (address on the suppression list),
   ``duplicate`` (same ``dedupe_key`` as an earlier eligible contact: the first is kept),
   ``duplicate_id`` (same contact id as an earlier eligible contact).
   Records the loader could not read count as ``malformed_row``.

Canonical columns of the audience: ``contact_id`` (mapped id, else ``L<line>``),
``email`` (normalised), ``email_domain``, ``dedupe_key``, ``pec`` (normalised, null when
absent or invalid), ``phone``, ``first_name``, ``last_name``, ``timezone``,
``postal_address``, ``postcode``, ``city``, ``province`` (trimmed text, null when empty
or unmapped), ``consent_sms`` (Boolean, null when unmapped), then ``_line`` and the
source's own columns. A source column whose name clashes with a canonical one and is not
its source is kept as ``<name>_source``. The audience is sorted by ``email_domain`` then
``contact_id`` so that consecutive chunks share MX hosts.

``counts`` always holds ``contacts`` (records seen, unreadable ones included),
``filtered_out``, ``rejected``, ``targeted`` and ``rejected_<reason>`` for every reason in
``REJECTION_REASONS``; ``contacts == filtered_out + rejected + targeted``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import polars as pl

from recapito.contacts.addresses import REASONS as ADDRESS_REASONS
from recapito.contacts.addresses import validate_addresses
from recapito.contacts.filters import TRUE_WORDS, compile_filter
from recapito.contacts.mapping import ColumnMapping, resolve
from recapito.contacts.sources import LINE_COLUMN, Loaded
from recapito.errors import InputError

REJECTION_REASONS = (
    "malformed_row",
    "no_consent",
    *ADDRESS_REASONS,
    "suppressed",
    "duplicate",
    "duplicate_id",
)
CANONICAL_COLUMNS = (
    "contact_id",
    "email",
    "email_domain",
    "dedupe_key",
    "pec",
    "phone",
    "first_name",
    "last_name",
    "timezone",
    "postal_address",
    "postcode",
    "city",
    "province",
    "consent_sms",
)
REJECTED_SCHEMA = pl.Schema(
    {
        "line": pl.Int64(),
        "contact_id": pl.String(),
        "address": pl.String(),
        "reason": pl.String(),
        "detail": pl.String(),
    }
)

_INTERNAL = frozenset({"_address_reason", "_raw_email", "_consent"})

SuppressionLookup = Callable[[list[str]], Iterable[str]]
Suppressed = SuppressionLookup | Collection[str] | None


@dataclass
class Targeted:
    """The audience, the rejections and the funnel counts of one targeting run."""

    audience: pl.DataFrame
    rejected: pl.DataFrame
    counts: dict[str, int]
    mapping: ColumnMapping

    def reject(self, rows: pl.DataFrame) -> None:
        """Rows of the audience found unsendable after targeting (e.g. a channel rule sent
        them to e-mail and their e-mail address is invalid): ``rows`` (line, contact_id,
        address, reason, detail) join the rejections and leave the targeted count."""
        if rows.height == 0:
            return
        self.rejected = pl.concat(
            [self.rejected.cast(REJECTED_SCHEMA), rows.cast(REJECTED_SCHEMA)]
        ).sort("line", maintain_order=True, nulls_last=True)
        self.counts["rejected"] += rows.height
        self.counts["targeted"] -= rows.height
        for reason, n in rows.group_by("reason").len().iter_rows():
            key = f"rejected_{reason}"
            self.counts[key] = self.counts.get(key, 0) + int(n)


def _text(frame: pl.DataFrame, column: str | None) -> pl.Expr:
    """A mapped column as trimmed text, null when blank or unmapped."""
    if column is None:
        return pl.lit(None, dtype=pl.String)
    text = pl.col(column).cast(pl.String).str.strip_chars()
    return pl.when(text == "").then(None).otherwise(text)


def _truthy(frame: pl.DataFrame, column: str) -> pl.Expr:
    """A consent-like column as Boolean: only true-like values count as consent."""
    dtype = frame.schema[column]
    if dtype == pl.Boolean:
        return pl.col(column).fill_null(False)
    if dtype.is_numeric():
        return (pl.col(column) != 0).fill_null(False)
    lowered = pl.col(column).cast(pl.String).str.strip_chars().str.to_lowercase()
    return lowered.is_in(list(TRUE_WORDS)).fill_null(False)


def _lookup_suppressed(keys: list[str], suppressed: Suppressed, batch: int) -> list[str]:
    if suppressed is None or not keys:
        return []
    if callable(suppressed):
        hits: set[str] = set()
        for start in range(0, len(keys), batch):
            hits.update(k.strip().lower() for k in suppressed(keys[start : start + batch]))
        return sorted(hits)
    return sorted({k.strip().lower() for k in suppressed})


def target(
    source: Loaded | pl.DataFrame,
    mapping: ColumnMapping | str | None = None,
    filter_text: str | None = None,
    suppressed: Suppressed = None,
    *,
    require_email: bool = True,
    suppression_batch: int = 10_000,
) -> Targeted:
    """Build the audience of a campaign from loaded contacts.

    ``mapping`` is a ``ColumnMapping``, a mapping string or file path, or None for
    detection from the header. ``suppressed`` is a collection of addresses or a function
    that receives a list of dedupe keys (lowercased addresses, at most
    ``suppression_batch`` per call) and returns those that are suppressed.

    With ``require_email=False`` an invalid or missing e-mail address is not a rejection:
    the contact stays in the audience with a null ``email`` (for PEC- or SMS-only
    campaigns) and ``email_error`` says why.
    """
    if isinstance(source, Loaded):
        frame, load_rejections = source.frame, source.rejected
    else:
        frame, load_rejections = source, []
    if LINE_COLUMN not in frame.columns:
        frame = frame.with_row_index(LINE_COLUMN, offset=1)
    frame = frame.with_columns(pl.col(LINE_COLUMN).cast(pl.Int64))
    if not frame[LINE_COLUMN].is_sorted():  # "keep first" means first in the source
        frame = frame.sort(LINE_COLUMN, maintain_order=True)
    columns = [c for c in frame.columns if c != LINE_COLUMN]
    wanted = mapping if isinstance(mapping, ColumnMapping) else ColumnMapping.load(mapping)
    resolved = resolve(wanted, columns)
    email_col = resolved.column("email")
    if email_col is None and require_email:
        raise InputError(
            "mapping: no e-mail column found; map one with email=COLUMN "
            f"(available columns: {', '.join(columns) or '(none)'})"
        )

    # Canonical columns next to the originals.
    raw_email = (
        frame[email_col].cast(pl.String)
        if email_col
        else pl.Series("email", [None] * frame.height, dtype=pl.String)
    )
    checked = validate_addresses(raw_email)
    pec_col = resolved.column("pec")
    pec_checked = (
        validate_addresses(frame[pec_col].cast(pl.String))["address"]
        if pec_col
        else pl.Series("pec", [None] * frame.height, dtype=pl.String)
    )
    id_text = _text(frame, resolved.column("id"))
    consent_col = resolved.column("consent_email")
    consent_sms_col = resolved.column("consent_sms")
    canonical = frame.select(
        pl.coalesce(id_text, pl.format("L{}", pl.col(LINE_COLUMN))).alias("contact_id"),
        checked["address"].alias("email"),
        checked["domain"].alias("email_domain"),
        checked["dedupe_key"].alias("dedupe_key"),
        pec_checked.alias("pec"),
        _text(frame, resolved.column("phone")).alias("phone"),
        _text(frame, resolved.column("first_name")).alias("first_name"),
        _text(frame, resolved.column("last_name")).alias("last_name"),
        _text(frame, resolved.column("timezone")).alias("timezone"),
        _text(frame, resolved.column("address")).alias("postal_address"),
        _text(frame, resolved.column("postcode")).alias("postcode"),
        _text(frame, resolved.column("city")).alias("city"),
        _text(frame, resolved.column("province")).alias("province"),
        (
            _truthy(frame, consent_sms_col) if consent_sms_col else pl.lit(None, dtype=pl.Boolean)
        ).alias("consent_sms"),
        pl.col(LINE_COLUMN),
    )
    sources_of = {
        "email": email_col,
        "pec": pec_col,
        "phone": resolved.column("phone"),
        "first_name": resolved.column("first_name"),
        "last_name": resolved.column("last_name"),
        "timezone": resolved.column("timezone"),
        "postcode": resolved.column("postcode"),
        "city": resolved.column("city"),
        "province": resolved.column("province"),
        "consent_sms": consent_sms_col,
        "postal_address": resolved.column("address"),
        "contact_id": resolved.column("id"),
    }
    kept: list[pl.Expr] = []
    for c in columns:
        if c not in CANONICAL_COLUMNS:
            kept.append(pl.col(c))
        elif sources_of.get(c) != c:
            kept.append(pl.col(c).alias(f"{c}_source"))
        # else: the canonical column replaces its own source column
    originals = frame.select(kept)
    work = pl.concat([canonical, originals], how="horizontal").with_columns(
        checked["reason"].alias("_address_reason"),
        raw_email.alias("_raw_email"),
        (_truthy(frame, consent_col) if consent_col else pl.lit(True)).alias("_consent"),
    )
    # one contiguous copy now, and the pieces it was built from let go: otherwise every
    # later step copies them again while the originals stay alive (2-3x the memory at
    # 500k contacts)
    work = work.rechunk()
    del frame, canonical, originals, checked, pec_checked, raw_email

    total = work.height + len(load_rejections)
    # 2. filter: excluded, not rejected.
    if filter_text is not None and filter_text.strip():
        visible = {c: t for c, t in work.schema.items() if c not in _INTERNAL}
        # An unknown column lists the source's columns (by the name they have here) and
        # the canonical columns that carry data; _line and dedupe_key still work but are
        # not advertised.
        own = [
            c if c not in CANONICAL_COLUMNS or sources_of.get(c) == c else f"{c}_source"
            for c in columns
        ]
        derived = ("contact_id", "email", "email_domain")
        advertised = [c for c in CANONICAL_COLUMNS if c in derived or sources_of.get(c) is not None]
        expr = compile_filter(filter_text, visible, shown=own, canonical=advertised)
        work = work.filter(expr)
    filtered_out = total - len(load_rejections) - work.height

    # 3. rejections, first applicable reason wins.
    address_reason = pl.col("_address_reason") if require_email else pl.lit(None, dtype=pl.String)
    reason = pl.when(~pl.col("_consent")).then(pl.lit("no_consent")).otherwise(address_reason)
    work = work.with_columns(reason.alias("_reason"))
    open_rows = pl.col("_reason").is_null() & pl.col("dedupe_key").is_not_null()
    keys = work.select(pl.col("dedupe_key").filter(open_rows).unique().sort()).to_series().to_list()
    hits = _lookup_suppressed(keys, suppressed, suppression_batch)
    if hits:
        work = work.with_columns(
            pl.when(open_rows & pl.col("dedupe_key").is_in(hits))
            .then(pl.lit("suppressed"))
            .otherwise(pl.col("_reason"))
            .alias("_reason")
        )
    # Duplicates among the rows still eligible; rows are in source order, so the first
    # occurrence is the one kept.
    eligible_key = pl.when(open_rows).then(pl.col("dedupe_key"))
    work = work.with_columns(
        pl.when(open_rows & ~eligible_key.is_first_distinct())
        .then(pl.lit("duplicate"))
        .otherwise(pl.col("_reason"))
        .alias("_reason")
    )
    still_open = pl.col("_reason").is_null()
    eligible_id = pl.when(still_open).then(pl.col("contact_id"))
    work = work.with_columns(
        pl.when(still_open & ~eligible_id.is_first_distinct())
        .then(pl.lit("duplicate_id"))
        .otherwise(pl.col("_reason"))
        .alias("_reason")
    )

    chosen = work.lazy().filter(pl.col("_reason").is_null())
    if not require_email:
        chosen = chosen.with_columns(pl.col("_address_reason").alias("email_error"))
    audience = (
        chosen.drop("_reason", "_address_reason", "_raw_email", "_consent")
        .sort(["email_domain", "contact_id"], nulls_last=True)
        .collect()
    )
    # lazily, so only these columns of the refused rows are ever copied
    rejected = (
        work.lazy()
        .filter(pl.col("_reason").is_not_null())
        .select(
            pl.col(LINE_COLUMN).alias("line"),
            pl.col("contact_id"),
            pl.col("_raw_email").alias("address"),
            pl.col("_reason").alias("reason"),
            pl.lit(None, dtype=pl.String).alias("detail"),
        )
        .collect()
    )
    if load_rejections:
        unreadable = pl.DataFrame(
            {
                "line": [r.line for r in load_rejections],
                "contact_id": [None] * len(load_rejections),
                "address": [None] * len(load_rejections),
                "reason": ["malformed_row"] * len(load_rejections),
                "detail": [r.reason for r in load_rejections],
            },
            schema=REJECTED_SCHEMA,
        )
        rejected = pl.concat([rejected.cast(REJECTED_SCHEMA), unreadable], how="vertical")
    rejected = rejected.cast(REJECTED_SCHEMA).sort("line", maintain_order=True)

    by_reason = dict(rejected.group_by("reason").len().iter_rows())
    counts = {
        "contacts": total,
        "filtered_out": filtered_out,
        "rejected": rejected.height,
        "targeted": audience.height,
    }
    for name in REJECTION_REASONS:
        counts[f"rejected_{name}"] = int(by_reason.get(name, 0))
    return Targeted(audience=audience, rejected=rejected, counts=counts, mapping=resolved)
