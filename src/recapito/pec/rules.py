"""Channel and PEC-mailbox rules: data (TOML or YAML), evaluated in order, first match wins.

A rules file, given per campaign (``CampaignParams.rules``)::

    pec_column = "pec"            # contact column holding a PEC address (default "pec")
    default_channel = "email"     # when no channel rule matches

    [[channel]]                   # channel rules, in order
    name = "legal-to-pec"
    when = 'classe = "legal"'     # the contact filter language (recapito.contacts.filters)
    channel = "pec"               # a pec rule fires only when its address is present

    [[channel]]
    name = "certified-domain"
    domains = ["pec.postaveloce.test", "legalmail-esempio.test"]  # or domains_file = "…"
    channel = "pec"               # address defaults to "email" for a domains rule

    [[channel]]
    name = "everyone-else"
    channel = "email"

    [[mailbox]]                   # PEC mailbox rules, in order (only for pec rows)
    name = "legal-spread"
    when = 'classe = "legal"'
    senders = ["legale@bank.example"]       # campaign senders it applies to (empty: any)
    mailboxes = { aruba-1 = 3, legalmail-1 = 1 }   # weights
    quota = { legalmail-1 = 500 }           # at most this many recipients in a campaign

A condition may use every contact column plus ``email_domain``, ``pec_domain`` (the
domain of the ``pec_column`` address) and ``sender`` (the campaign sender). A channel
rule may combine ``when`` and ``domains``: both must hold. A pec rule reads its address
from ``address`` (a column name): by default ``pec_column``, or ``email`` for a rule with
``domains``; a pec rule whose address is empty or not an address does not match, so the
next rule is tried. A mailbox rule whose mailboxes have all used their quota lets the
next rule try; a pec recipient no mailbox rule takes gets no mailbox (its delivery fails
with ``no_pec_mailbox``). Without any mailbox rule, the mailboxes available are used
with equal weights (rule ``default-mailboxes``).

Every decision keeps the rule that fired (``deliveries.rule`` and ``mailbox_rule``);
``trace`` says, for one contact, what each rule made of it (``recapito rules explain``).
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from recapito.contacts.filters import compile_filter
from recapito.errors import InputError

CHANNELS = ("pec", "email")
DEFAULT_RULE = "default"
DEFAULT_MAILBOX_RULE = "default-mailboxes"
NO_MAILBOX = "no_pec_mailbox"


class RulesError(InputError):
    """A rules file that cannot be read or does not make sense."""


@dataclass(frozen=True)
class ChannelRule:
    name: str
    channel: str
    when: str | None = None
    domains: frozenset[str] = frozenset()
    address: str | None = None  # column holding the address for this channel

    def describe(self) -> str:
        parts = []
        if self.when:
            parts.append(f"when {self.when}")
        if self.domains:
            shown = ", ".join(sorted(self.domains)[:5])
            more = f" (+{len(self.domains) - 5})" if len(self.domains) > 5 else ""
            parts.append(f"recipient domain in [{shown}{more}]")
        cond = " and ".join(parts) or "always"
        return f"{self.name}: {cond} -> {self.channel}"


@dataclass(frozen=True)
class MailboxRule:
    name: str
    mailboxes: Mapping[str, float]  # mailbox name -> weight
    when: str | None = None
    senders: frozenset[str] = frozenset()
    quota: Mapping[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        parts = []
        if self.when:
            parts.append(f"when {self.when}")
        if self.senders:
            parts.append(f"sender in [{', '.join(sorted(self.senders))}]")
        cond = " and ".join(parts) or "always"
        weights = ", ".join(f"{k}={v:g}" for k, v in self.mailboxes.items())
        quota = ", ".join(f"{k}<={v}" for k, v in self.quota.items())
        return f"{self.name}: {cond} -> {weights}" + (f" (quota {quota})" if quota else "")

    def applies_to_sender(self, sender: str) -> bool:
        if not self.senders:
            return True
        sender = sender.strip().lower()
        domain = sender.rpartition("@")[2]
        return sender in self.senders or domain in self.senders or f"@{domain}" in self.senders


@dataclass(frozen=True)
class RuleSet:
    channel_rules: tuple[ChannelRule, ...]
    mailbox_rules: tuple[MailboxRule, ...] = ()
    pec_column: str = "pec"
    default_channel: str = "email"
    source: str = ""  # where it was read from
    digest: str = ""  # SHA-256 of the file's bytes

    @property
    def mailbox_names(self) -> set[str]:
        return {name for rule in self.mailbox_rules for name in rule.mailboxes}

    @property
    def routes_to_pec(self) -> bool:
        """Some recipient may go by PEC: then a contact needs no valid e-mail address."""
        return self.default_channel == "pec" or any(r.channel == "pec" for r in self.channel_rules)

    def channel_rule(self, name: str) -> ChannelRule | None:
        return next((r for r in self.channel_rules if r.name == name), None)

    def mailbox_rule(self, name: str) -> MailboxRule | None:
        return next((r for r in self.mailbox_rules if r.name == name), None)


# ---- loading -----------------------------------------------------------------------------


def load_rules(path: str | Path) -> RuleSet:
    """Read a rules file (``.toml``, or ``.yaml``/``.yml``)."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise RulesError(f"rules file {file}: {exc.strerror or exc}") from None
    return parse_rules(raw, source=str(file), suffix=file.suffix.lower(), base=file.parent)


def parse_rules(
    raw: bytes, *, source: str = "<rules>", suffix: str = ".toml", base: Path | None = None
) -> RuleSet:
    what = f"rules file {source}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RulesError(f"{what}: not UTF-8 text") from None
    data: Any
    if suffix in (".yaml", ".yml"):
        import yaml  # type: ignore[import-untyped]  # only for YAML rules files

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RulesError(f"{what}: invalid YAML ({exc})") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RulesError(f"{what}: invalid TOML ({exc})") from None
    if not isinstance(data, dict):
        raise RulesError(f"{what}: expected a table of settings and rules")
    known = {"pec_column", "default_channel", "channel", "mailbox"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RulesError(f"{what}: unknown key(s) {', '.join(unknown)} (known: {sorted(known)})")
    pec_column = _text(data.get("pec_column", "pec"), f"{what}: pec_column")
    default = _text(data.get("default_channel", "email"), f"{what}: default_channel")
    if default not in CHANNELS:
        raise RulesError(f"{what}: default_channel must be one of {', '.join(CHANNELS)}")
    names: set[str] = set()
    channel_rules = []
    for i, item in enumerate(_list(data.get("channel", []), f"{what}: channel"), 1):
        rule = _channel_rule(item, f"{what}: channel rule {i}", base)
        if rule.name in names:
            raise RulesError(f"{what}: rule name {rule.name!r} used twice")
        names.add(rule.name)
        channel_rules.append(rule)
    mailbox_rules = []
    for i, item in enumerate(_list(data.get("mailbox", []), f"{what}: mailbox"), 1):
        mrule = _mailbox_rule(item, f"{what}: mailbox rule {i}")
        if mrule.name in names:
            raise RulesError(f"{what}: rule name {mrule.name!r} used twice")
        names.add(mrule.name)
        mailbox_rules.append(mrule)
    return RuleSet(
        channel_rules=tuple(channel_rules),
        mailbox_rules=tuple(mailbox_rules),
        pec_column=pec_column,
        default_channel=default,
        source=source,
        digest=hashlib.sha256(raw).hexdigest(),
    )


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RulesError(f"{what}: expected a non-empty text")
    return value.strip()


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise RulesError(f"{what}: expected a list of rules ([[…]] in TOML)")
    return value


def _check_keys(item: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise RulesError(f"{what}: unknown key(s) {', '.join(unknown)} (known: {sorted(allowed)})")


def _channel_rule(item: Any, what: str, base: Path | None) -> ChannelRule:
    if not isinstance(item, dict):
        raise RulesError(f"{what}: expected a table")
    _check_keys(item, {"name", "when", "domains", "domains_file", "channel", "address"}, what)
    name = _text(item.get("name"), f"{what}: name")
    what = f"{what} ({name})"
    channel = _text(item.get("channel"), f"{what}: channel").lower()
    if channel not in CHANNELS:
        raise RulesError(f"{what}: channel must be one of {', '.join(CHANNELS)}, not {channel!r}")
    when = item.get("when")
    if when is not None:
        when = _text(when, f"{what}: when")
    domains: set[str] = set()
    listed = item.get("domains", [])
    if not isinstance(listed, list) or not all(isinstance(d, str) for d in listed):
        raise RulesError(f"{what}: domains must be a list of domain names")
    domains.update(_domain(d) for d in listed)
    if "domains_file" in item:
        file = Path(_text(item["domains_file"], f"{what}: domains_file"))
        if not file.is_absolute() and base is not None:
            file = base / file
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise RulesError(f"{what}: domains_file {file}: {exc.strerror or exc}") from None
        domains.update(_domain(x) for x in lines if x.strip() and not x.lstrip().startswith("#"))
    address = item.get("address")
    if address is not None:
        address = _text(address, f"{what}: address")
    return ChannelRule(name, channel, when, frozenset(d for d in domains if d), address)


def _domain(text: str) -> str:
    return text.strip().lower().lstrip("@").rstrip(".")


def _mailbox_rule(item: Any, what: str) -> MailboxRule:
    if not isinstance(item, dict):
        raise RulesError(f"{what}: expected a table")
    _check_keys(item, {"name", "when", "senders", "sender", "mailboxes", "quota"}, what)
    name = _text(item.get("name"), f"{what}: name")
    what = f"{what} ({name})"
    when = item.get("when")
    if when is not None:
        when = _text(when, f"{what}: when")
    senders = item.get("senders", item.get("sender", []))
    if isinstance(senders, str):
        senders = [senders]
    if not isinstance(senders, list) or not all(isinstance(s, str) for s in senders):
        raise RulesError(f"{what}: senders must be a list of addresses or domains")
    raw = item.get("mailboxes")
    if isinstance(raw, list) and all(isinstance(m, str) for m in raw):
        raw = {m: 1 for m in raw}
    if not isinstance(raw, dict) or not raw:
        raise RulesError(f"{what}: mailboxes must name at least one mailbox (with weights)")
    weights: dict[str, float] = {}
    for mailbox, weight in raw.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise RulesError(f"{what}: weight of {mailbox!r} must be a number above zero")
        weights[str(mailbox)] = float(weight)
    quota_raw = item.get("quota", {})
    if not isinstance(quota_raw, dict):
        raise RulesError(f"{what}: quota must map mailboxes to a number of recipients")
    quota: dict[str, int] = {}
    for mailbox, limit in quota_raw.items():
        if mailbox not in weights:
            raise RulesError(f"{what}: quota for {mailbox!r}, which the rule does not list")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise RulesError(f"{what}: quota of {mailbox!r} must be a whole number >= 0")
        quota[str(mailbox)] = limit
    return MailboxRule(
        name=name,
        mailboxes=weights,
        when=when,
        senders=frozenset(s.strip().lower() for s in senders if s.strip()),
        quota=quota,
    )


# ---- evaluation ----------------------------------------------------------------------------


def _with_helpers(frame: pl.DataFrame, rules: RuleSet, sender: str) -> pl.DataFrame:
    """The audience plus the helper columns conditions may use."""
    extra: list[pl.Expr] = []
    if "email_domain" not in frame.columns:
        if "email" in frame.columns:
            domain = pl.col("email").cast(pl.String).str.split("@").list.last().str.to_lowercase()
            extra.append(domain.alias("email_domain"))
        else:
            extra.append(pl.lit(None, pl.String).alias("email_domain"))
    if rules.pec_column in frame.columns:
        pec = pl.col(rules.pec_column).cast(pl.String).str.strip_chars()
        extra.append(
            pl.when(pec.str.contains("@"))
            .then(pec.str.split("@").list.last().str.to_lowercase())
            .otherwise(None)
            .alias("pec_domain")
        )
    else:
        extra.append(pl.lit(None, pl.String).alias("pec_domain"))
    extra.append(pl.lit(sender, pl.String).alias("sender"))
    return frame.with_columns(extra)


def _condition(text: str | None, schema: pl.Schema, what: str) -> pl.Expr:
    if text is None:
        return pl.lit(True)
    try:
        return compile_filter(text, schema)
    except InputError as exc:
        raise RulesError(f"{what}: {exc}") from None


def _address_column(rule: ChannelRule, rules: RuleSet) -> str:
    if rule.address:
        return rule.address
    if rule.channel == "email":
        return "email"
    return "email" if rule.domains else rules.pec_column


def _address_expr(column: str, frame: pl.DataFrame) -> pl.Expr:
    if column not in frame.columns:
        return pl.lit(None, pl.String)
    text = pl.col(column).cast(pl.String).str.strip_chars()
    return pl.when(text.str.contains(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")).then(text).otherwise(None)


def _rule_masks(frame: pl.DataFrame, rules: RuleSet) -> list[tuple[ChannelRule, pl.Expr, pl.Expr]]:
    """(rule, does it match, the address it would use) for every channel rule."""
    out = []
    for rule in rules.channel_rules:
        column = _address_column(rule, rules)
        if column not in frame.columns and rule.address is not None:
            raise RulesError(
                f"rule {rule.name!r}: address column {column!r} is not a contact column"
            )
        address = _address_expr(column, frame)
        mask = _condition(rule.when, frame.schema, f"rule {rule.name!r}")
        if rule.domains:
            domain = address.str.split("@").list.last().str.to_lowercase()
            mask = mask & domain.is_in(sorted(rule.domains)).fill_null(False)
        mask = mask & address.is_not_null()
        out.append((rule, mask.fill_null(False), address))
    return out


def classify(
    audience: pl.DataFrame,
    rules: RuleSet,
    *,
    sender: str,
    mailboxes: Sequence[str] = (),
) -> pl.DataFrame:
    """The audience with ``_channel``, ``_rule``, ``_address``, ``_domain``, ``_mailbox``
    and ``_mailbox_rule`` columns (the helper columns are not kept).

    ``mailboxes``: the PEC mailboxes that exist; a rule naming another one is an error,
    and without mailbox rules they are used with equal weights.
    """
    known = set(mailboxes)
    if known:
        missing = sorted(rules.mailbox_names - known)
        if missing:
            raise RulesError(
                f"mailbox rules name unknown PEC mailbox(es) {', '.join(missing)} "
                f"(configured: {', '.join(sorted(known))})"
            )
    frame = _with_helpers(audience, rules, sender)
    masks = _rule_masks(frame, rules)
    rule_expr: Any = pl.lit(DEFAULT_RULE)
    channel_expr: Any = pl.lit(rules.default_channel)
    address_expr: Any = _address_expr("email", frame)
    if masks:
        chain_rule: Any = pl
        chain_channel: Any = pl
        chain_address: Any = pl
        for rule, mask, address in masks:
            chain_rule = chain_rule.when(mask).then(pl.lit(rule.name))
            chain_channel = chain_channel.when(mask).then(pl.lit(rule.channel))
            chain_address = chain_address.when(mask).then(address)
        rule_expr = chain_rule.otherwise(rule_expr)
        channel_expr = chain_channel.otherwise(channel_expr)
        address_expr = chain_address.otherwise(address_expr)
    decided = frame.with_columns(
        rule_expr.alias("_rule"), channel_expr.alias("_channel"), address_expr.alias("_address")
    )
    # default channel pec without a PEC address falls back to e-mail
    if rules.default_channel == "pec":
        fallback = _address_expr(rules.pec_column, decided)
        decided = decided.with_columns(
            pl.when((pl.col("_rule") == DEFAULT_RULE) & fallback.is_not_null())
            .then(fallback)
            .otherwise(pl.col("_address"))
            .alias("_address"),
            pl.when((pl.col("_rule") == DEFAULT_RULE) & fallback.is_null())
            .then(pl.lit("email"))
            .otherwise(pl.col("_channel"))
            .alias("_channel"),
        )
    decided = decided.with_columns(
        pl.col("_address").str.split("@").list.last().str.to_lowercase().alias("_domain")
    )
    mailbox, mailbox_rule = _assign_mailboxes(decided, rules, sender, sorted(known))
    helpers = [c for c in ("email_domain", "pec_domain", "sender") if c not in audience.columns]
    return decided.with_columns(
        pl.Series("_mailbox", mailbox, pl.String),
        pl.Series("_mailbox_rule", mailbox_rule, pl.String),
    ).drop(helpers)


def without_email_address(decided: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split a classified audience (targeted with ``require_email=False``): the rows a rule
    sent to e-mail whose e-mail address is missing or invalid cannot be sent and are
    rejections (reason: the address's, e.g. ``empty`` or ``missing_at``; detail: the rule
    that chose e-mail). Returns (the audience kept, those rows as line / contact_id /
    address / reason / detail)."""
    stuck = (pl.col("_channel") == "email") & pl.col("_address").is_null()
    reason = (
        pl.col("email_error").fill_null("empty")
        if "email_error" in decided.columns
        else pl.lit("empty")
    )
    rejected = decided.filter(stuck).select(
        pl.col("_line").cast(pl.Int64).alias("line")
        if "_line" in decided.columns
        else pl.lit(None, dtype=pl.Int64).alias("line"),
        pl.col("contact_id").cast(pl.String),
        pl.col("email").cast(pl.String).alias("address"),  # null: the invalid one is gone
        reason.alias("reason"),
        pl.format(
            "channel e-mail (rule {}): no PEC rule applies and the e-mail address is "
            "missing or invalid ({})",
            pl.col("_rule"),
            reason,
        ).alias("detail"),
    )
    return decided.filter(~stuck), rejected


def _assign_mailboxes(
    frame: pl.DataFrame, rules: RuleSet, sender: str, known: list[str]
) -> tuple[list[str | None], list[str | None]]:
    """Mailbox per pec row: the first mailbox rule matching it with quota left, then a
    smooth weighted round robin among that rule's mailboxes (deterministic)."""
    n = frame.height
    mailbox: list[str | None] = [None] * n
    chosen_rule: list[str | None] = [None] * n
    is_pec = frame.get_column("_channel").eq("pec").to_list()
    if not any(is_pec):
        return mailbox, chosen_rule
    mrules = list(rules.mailbox_rules)
    if not mrules:
        if not known:
            return mailbox, chosen_rule
        mrules = [MailboxRule(DEFAULT_MAILBOX_RULE, {m: 1.0 for m in known})]
    applicable = [r for r in mrules if r.applies_to_sender(sender)]
    matches: list[list[bool]] = []
    for rule in applicable:
        expr = _condition(rule.when, frame.schema, f"mailbox rule {rule.name!r}").fill_null(False)
        matches.append(frame.with_columns(expr.alias("_m")).get_column("_m").to_list())
    used: dict[tuple[str, str], int] = {}
    current: dict[tuple[str, str], float] = {}
    for i in range(n):
        if not is_pec[i]:
            continue
        for k, rule in enumerate(applicable):
            if not matches[k][i]:
                continue
            open_ = [
                m
                for m in rule.mailboxes
                if m not in rule.quota or used.get((rule.name, m), 0) < rule.quota[m]
            ]
            if not open_:
                continue
            total = sum(rule.mailboxes[m] for m in open_)
            for m in open_:
                current[(rule.name, m)] = current.get((rule.name, m), 0.0) + rule.mailboxes[m]
            pick = max(open_, key=lambda m: current[(rule.name, m)])
            current[(rule.name, pick)] -= total
            used[(rule.name, pick)] = used.get((rule.name, pick), 0) + 1
            mailbox[i] = pick
            chosen_rule[i] = rule.name
            break
    return mailbox, chosen_rule


@dataclass(frozen=True)
class RuleTrace:
    """What each rule made of one contact (``recapito rules explain``)."""

    channel: list[tuple[str, str, bool]]  # (rule, description, matched)
    mailbox: list[tuple[str, str, bool]]


def trace(row: Mapping[str, Any], rules: RuleSet, *, sender: str) -> RuleTrace:
    """Evaluate every rule on one contact (a row of the audience snapshot)."""
    frame = _with_helpers(pl.DataFrame([dict(row)]), rules, sender)
    channel = []
    for rule, mask, _address in _rule_masks(frame, rules):
        hit = bool(frame.select(mask.alias("m")).item())
        channel.append((rule.name, rule.describe(), hit))
    mailbox = []
    for mrule in rules.mailbox_rules:
        expr = _condition(mrule.when, frame.schema, f"mailbox rule {mrule.name!r}")
        hit = mrule.applies_to_sender(sender) and bool(
            frame.select(expr.fill_null(False).alias("m")).item()
        )
        mailbox.append((mrule.name, mrule.describe(), hit))
    return RuleTrace(channel, mailbox)


def check_rules(rules: RuleSet, columns: pl.Schema | Sequence[str], sender: str) -> None:
    """Compile every condition against the audience columns (preflight)."""
    schema = (
        columns if isinstance(columns, pl.Schema) else pl.Schema({c: pl.String for c in columns})
    )
    frame = _with_helpers(pl.DataFrame(schema=schema), rules, sender)
    _rule_masks(frame, rules)
    for mrule in rules.mailbox_rules:
        _condition(mrule.when, frame.schema, f"mailbox rule {mrule.name!r}")


def rules_markdown(rows: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The report's "recipients by rule" table (``Ledger.rule_table``); nothing when every
    recipient went by e-mail without rules."""
    if not rows or all(r.get("rule") == "-" for r in rows):
        return []
    lines = [
        "",
        "## Recipients by rule",
        "",
        "| rule | channel | PEC mailbox | recipients | accepted | delivered | failed |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rule']} | {r['channel']} | {r['mailbox']} | {int(r['recipients']):,} | "
            f"{int(r.get('accepted', 0)):,} | {int(r.get('delivered', 0)):,} | "
            f"{int(r.get('failed', 0)):,} |"
        )
    return lines
