"""Campaign stages as plain functions (the Prefect tasks are thin wrappers around these).

``prepare`` targets the contacts, plans one ledger row per recipient and writes the
audience snapshot (Parquet) that the chunk workers read; ``deliver_chunk`` claims one
chunk in the ledger and sends it. Both are safe to run again: planning ignores rows that
exist, and claiming only takes rows that are still to be sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import AwareDatetime, BaseModel, Field, field_validator, model_validator

from recapito.config import Settings
from recapito.contacts.sources import ContactSource, load
from recapito.contacts.targeting import Targeted, target
from recapito.delivery.engine import DeliveryOptions, DeliveryRun, DeliveryStats, Permits
from recapito.delivery.pacing import Limit, Pacer, PacingOptions
from recapito.errors import InputError
from recapito.identity import SenderIdentity
from recapito.ledger import Claim, Ledger, PlannedDelivery
from recapito.ledger.store import utcnow
from recapito.render.lint import lint_before_sending
from recapito.render.template import (
    CompiledTemplate,
    RenderedMessage,
    load_template,
    message_id_for,
)
from recapito.security.policy import TLSPolicy
from recapito.security.recipient import mx_resolver, recipient_policies
from recapito.sending.slots import assign_slots
from recapito.tracking import Tracker, contact_allows_tracking, tracker_for

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


class CampaignParams(BaseModel):
    """What a campaign manager fills in (the deployment's parameter form)."""

    name: str = Field(description="Unique campaign name; running it again resumes it")
    contacts: str = Field(description="Contact file (CSV or Parquet) or a SQL connection URL")
    query: str | None = Field(None, description="SQL query, when contacts is a database URL")
    template: str = Field(description="Template folder (holding template.toml)")
    sender: str = Field(description="Envelope and From address, e.g. news@bank.example")
    filter: str | None = Field(None, description='e.g. provincia in ("MI", "RM")')
    mapping: str | None = Field(None, description="e.g. email=mail,phone=cellulare")
    encoding: str | None = Field(None, description="CSV encoding (detected when empty)")
    delimiter: str | None = Field(None, description="CSV delimiter (detected when empty)")
    chunk_size: int | None = Field(
        None,
        ge=10,
        le=50_000,
        description="Recipients per chunk task. Empty = automatic: max(1,000, "
        "ceil(recipients / 1,500)), at most 50,000, so that even a very large campaign "
        "stays well under 2,000 task runs (500,000 recipients: 500 chunks)",
    )
    parallel_chunks: int = Field(4, ge=1, le=64, description="Chunk tasks running at once")
    connections_per_host: int = Field(4, ge=1, le=50, description="Connections per MX host")
    messages_per_connection: int = Field(200, ge=1, le=10_000)
    tls_policy: str = Field(
        "opportunistic",
        description="opportunistic (best TLS available) or secure:L1…secure:L4 (Secure Email: "
        "below the level nothing is sent and the recipient ends insecure_channel)",
    )
    message_class_column: str | None = Field(
        None,
        description="Contact column holding each message's class (e.g. legal, marketing)",
    )
    tls_policy_by_class: dict[str, str] = Field(
        default_factory=dict,
        description='Transport policy per message class, e.g. {"legal": "secure:L3"}; '
        "other classes use tls_policy",
    )
    retry_after_seconds: int = Field(
        300, ge=0, le=86_400, description="First retry of deferred mail (4xx, greylisting)"
    )
    retry_factor: float = Field(
        1.5,
        ge=1.0,
        le=10.0,
        description="Each further retry of deferred mail waits this much longer",
    )
    give_up_after_hours: float = Field(
        72, gt=0, le=24 * 30, description="Deferred mail expires this long after its first attempt"
    )
    retry_within_run_seconds: int = Field(
        0,
        ge=0,
        le=3_600,
        description="How long this run itself waits to retry deferred mail; deferred mail "
        "already due is always retried, also when the campaign is run again later",
    )

    rate_per_minute: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Campaign pace: at most this many messages a minute",
    )
    rate_per_hour: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Campaign pace: at most this many messages an hour",
    )
    wave_size: int | None = Field(
        None, ge=1, description="Waves: this many messages, then wait for the next interval"
    )
    wave_interval_minutes: float | None = Field(
        None,
        gt=0,
        le=7 * 24 * 60,
        allow_inf_nan=False,
        description="Waves: one wave starts every so many minutes",
    )
    domain_limits: dict[str, str] = Field(
        default_factory=dict,
        description='Receiving providers\' limits per recipient domain, e.g. {"libero.it": '
        '"conn=2,rate=120/min"}; a key starting with a dot covers subdomains',
    )
    mx_limits: dict[str, str] = Field(
        default_factory=dict,
        description='Limits per MX host, e.g. {".mail.protection.outlook.com": "conn=5"}',
    )
    tracking: bool = Field(
        True,
        description="Rewrite links to click URLs and add an open pixel (needs "
        "RECAPITO_TRACKING_URL); a contact column 'tracking' set to false turns it off for "
        "that contact. List-Unsubscribe headers are added either way",
    )
    shared_rate_limit: bool = Field(
        False,
        description="Enforce the campaign rate across every worker with a Prefect global "
        "concurrency limit (needed when chunk tasks run on several processes or hosts)",
    )
    rules: str | None = Field(
        None,
        description="Channel rules file (TOML or YAML, see recapito.pec.rules): which "
        "recipients get PEC and through which PEC mailbox; empty = everyone by e-mail",
    )
    pec_mailbox_blocks: list[str] = Field(
        default_factory=list,
        description="Prefect PEC mailbox blocks the rules may use (names); empty = the "
        "mailboxes of RECAPITO_PEC_MAILBOXES_FILE (the sandbox)",
    )
    pec_max_wait_seconds: float = Field(
        900,
        ge=0,
        le=86_400,
        description="PEC: how long a chunk waits out provider traffic limits before "
        "deferring the rest to a later run",
    )

    # ---- sending modes (recapito.sending; DESIGN §9) ----
    sending_mode: Literal["immediate", "scheduled", "waves", "contact_timezone", "best_time"] = (
        Field(
            "immediate",
            description="immediate; scheduled (at send_at); waves (wave_size or wave_percent "
            "every wave_interval_minutes); contact_timezone (inside send_window of each "
            "contact's timezone); best_time (each contact's best hour, inside the window). "
            "Slots are fixed when the campaign is first prepared",
        )
    )
    send_at: AwareDatetime | None = Field(
        None, description="Start of sending, with its time zone, e.g. 2026-05-04T09:30+02:00"
    )
    wave_percent: float | None = Field(
        None, gt=0, le=100, description="Waves: this share of the recipients per interval"
    )
    send_window: str = Field(
        "09:00-18:00", description="Local hours of each contact in which mail may go"
    )
    timezone_column: str = Field("timezone", description="Contact column with an IANA zone")
    default_timezone: str = Field("Europe/Rome", description="Zone of contacts without one")
    business_days_only: bool = Field(
        True, description="No sending on weekends and Italian public holidays"
    )
    extra_holidays: list[date] = Field(
        default_factory=list, description="Further closing days (e.g. the patron saint's day)"
    )
    best_time_horizon_hours: int = Field(
        168, ge=1, le=24 * 14, description="Best time: slots within this many hours of the start"
    )
    best_time_fallback: str = Field(
        "10:00", description="Best time: local time used when a contact's history is thin"
    )
    slot_dispatch: Literal["auto", "deployment", "in_flow"] = Field(
        "auto",
        description="Future slots as scheduled runs of the campaign-slot deployment "
        "(deployment; auto when it exists and the campaign runs from a deployment) or "
        "waited for inside this run (in_flow)",
    )
    approval_threshold: int | None = Field(
        None,
        ge=0,
        description="Above this many recipients the run pauses for approval before delivery",
    )
    fallback_policy: str | None = Field(
        None,
        description="Fallback for recipients not reached, e.g. 'email → on insecure_channel|"
        "hard_bounce → sms → paper; wait 24h for delivered|opened → sms' (the sweeper)",
    )

    @field_validator("fallback_policy")
    @classmethod
    def _fallback_policy_parses(cls, value: str | None) -> str | None:
        if value:
            from recapito.fallback.policy import PolicyError, parse_policy

            try:
                parse_policy(value)
            except PolicyError as exc:
                raise ValueError(str(exc)) from None
        return value

    approval_timeout_hours: float = Field(
        24, gt=0, le=24 * 14, description="An unanswered approval request rejects the campaign"
    )

    @field_validator("domain_limits", "mx_limits")
    @classmethod
    def _limits(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            try:
                Limit.parse(text, key)
            except InputError as exc:
                raise ValueError(str(exc)) from None
        return {k.strip().lower(): v for k, v in value.items()}

    @model_validator(mode="after")
    def _waves(self) -> CampaignParams:
        if self.sending_mode == "waves":
            if self.wave_interval_minutes is None or (self.wave_size is None) == (
                self.wave_percent is None
            ):
                raise ValueError(
                    "sending_mode waves needs wave_interval_minutes and one of "
                    "wave_size or wave_percent"
                )
        elif (self.wave_size is None) != (self.wave_interval_minutes is None):
            raise ValueError(
                "waves need both a size and an interval (--wave-size and --wave-interval; "
                "campaign parameters wave_size and wave_interval_minutes)"
            )
        elif self.wave_percent is not None:
            raise ValueError("wave_percent needs sending_mode waves")
        if self.sending_mode == "scheduled" and self.send_at is None:
            raise ValueError("sending_mode scheduled needs send_at")
        from recapito.sending.calendar import parse_hhmm, parse_window

        try:
            parse_window(self.send_window)
            parse_hhmm(self.best_time_fallback, "best_time_fallback")
        except InputError as exc:
            raise ValueError(str(exc)) from None
        if self.shared_rate_limit and not (self.rate_per_minute or self.rate_per_hour):
            raise ValueError("shared_rate_limit needs rate_per_minute or rate_per_hour")
        return self

    def pacing(self, scope: str) -> PacingOptions:
        """The engine's pacing rules for this campaign (``scope`` names the campaign)."""
        return PacingOptions(
            per_minute=self.rate_per_minute,
            per_hour=self.rate_per_hour,
            # in sending_mode waves the slots are the waves (no in-process wave gate)
            wave_size=None if self.sending_mode == "waves" else self.wave_size,
            wave_interval=None
            if self.wave_interval_minutes is None or self.sending_mode == "waves"
            else self.wave_interval_minutes * 60,
            domain_limits={k: Limit.parse(v, k) for k, v in self.domain_limits.items()},
            mx_limits={k: Limit.parse(v, k) for k, v in self.mx_limits.items()},
            scope=scope,
        )

    @property
    def paced(self) -> bool:
        waves = self.wave_size and self.sending_mode != "waves"
        return bool(self.rate_per_minute or self.rate_per_hour or waves)

    @field_validator("contacts")
    @classmethod
    def _contacts(cls, value: str) -> str:
        # a file is kept by its absolute path: a re-run from another folder, or a worker
        # elsewhere, finds the same file and recognises the same campaign
        text = value.strip()
        if "://" not in text and Path(text).expanduser().is_file():
            return str(Path(text).expanduser().resolve())
        return text

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use letters, digits, space, dot, dash or underscore (max 100)")
        return value

    @field_validator("tls_policy")
    @classmethod
    def _tls_policy(cls, value: str) -> str:
        return TLSPolicy.parse(value).label

    @field_validator("tls_policy_by_class")
    @classmethod
    def _class_policies(cls, value: dict[str, str]) -> dict[str, str]:
        return {str(k): TLSPolicy.parse(v).label for k, v in value.items()}

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        local, at, domain = value.strip().rpartition("@")
        if not at or not local or "." not in domain or any(c.isspace() for c in value.strip()):
            raise ValueError(f"{value!r} is not an e-mail address")
        return value.strip()

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2].lower()


@dataclass(frozen=True)
class Prepared:
    campaign_id: int
    name: str
    chunks: dict[int, str]  # chunks with planned rows -> token of those rows
    counts: dict[str, Any]
    audience_path: str
    template_hash: str
    pec_chunks: dict[int, str] | None = None  # chunks with planned PEC rows -> token


AUTO_CHUNK_MIN = 1_000
AUTO_CHUNK_MAX = 50_000
AUTO_CHUNK_TARGET = 1_500  # chunks at most, while the chunk size stays within its bounds


def chunk_size_for(recipients: int, chunk_size: int | None = None) -> int:
    """Recipients per chunk: the explicit ``chunk_size``, or the automatic size.

    Automatic: at least ``AUTO_CHUNK_MIN`` (a task run costs ~20–30 ms of orchestration,
    DESIGN §4), and large enough that the campaign has at most ``AUTO_CHUNK_TARGET``
    chunks, up to ``AUTO_CHUNK_MAX`` recipients per chunk.
    """
    if chunk_size:
        return chunk_size
    return min(AUTO_CHUNK_MAX, max(AUTO_CHUNK_MIN, math.ceil(recipients / AUTO_CHUNK_TARGET)))


def campaign_dir(settings: Settings, name: str) -> Path:
    """The campaign's own folder: readable name plus a digest of the exact name, so names
    that differ only in characters the file system cannot take never share a folder."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return settings.home / "campaigns" / f"{safe}-{digest}"


# Parameters that decide who gets what, and how safely: a re-run must keep them.
_AUDIENCE_PARAMS = (
    "contacts",
    "query",
    "filter",
    "mapping",
    "encoding",
    "delimiter",
    "sender",
    "tls_policy",
    "message_class_column",
    "tls_policy_by_class",
    "rules",
)


def _check_same_audience(params: CampaignParams, stored: dict[str, Any]) -> None:
    for key in _AUDIENCE_PARAMS:
        before, now = stored.get(key), getattr(params, key)
        if key == "tls_policy" and before is None:
            before = "opportunistic"
        if key == "tls_policy_by_class" and before is None:
            before = {}
        if key == "contacts" and _same_file(before, now):
            continue  # the same file, spelled another way (relative, absolute, ./)
        if before != now:
            raise InputError(
                f"campaign {params.name!r} was created with {key}={before!r}, now {key}={now!r}: "
                "re-run it with the same parameters, or choose a new campaign name"
            )


def _same_file(before: Any, now: Any) -> bool:
    if not isinstance(before, str) or not isinstance(now, str) or "://" in before + now:
        return False
    try:
        return Path(before).resolve() == Path(now).resolve() or Path(before).samefile(now)
    except OSError:
        return False


def _check_class_column(params: CampaignParams, columns: list[str]) -> None:
    column = params.message_class_column
    if column is not None and column not in columns:
        raise InputError(
            f"message class column {column!r} is not a contact column "
            f"(available: {', '.join(c for c in columns if not c.startswith('_'))})"
        )


def _sample_render(
    template: CompiledTemplate, audience: pl.DataFrame, params: CampaignParams
) -> None:
    """Render the first recipient before anything is planned: a template that breaks the
    sandbox or fails on real data stops the campaign here, not at every recipient."""
    if audience.height == 0:
        return
    first = audience.head(1).to_dicts()[0]
    template.render(
        {**first, "campaign": params.name, "unsubscribe_url": "https://example.invalid/u/0"},
        sender=params.sender,
        recipient=str(first.get("email") or "sample@example.invalid"),
        message_id=message_id_for(params.name, 0, params.sender_domain),
    )


def _source(params: CampaignParams) -> ContactSource:
    return ContactSource.parse(
        params.contacts,
        query=params.query,
        encoding=params.encoding,
        delimiter=params.delimiter,
    )


_SAMPLE_BYTES = 64 * 1024


def _head_sample(source: ContactSource, directory: Path) -> ContactSource:
    """A copy of the first lines of a CSV file (cut at a line end), to check it quickly."""
    assert source.path is not None
    path = Path(source.path)
    with path.open("rb") as handle:
        head = handle.read(_SAMPLE_BYTES)
    encoding = (source.encoding or "").lower()
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or "16" in encoding or "32" in encoding:
        return source  # wide encodings cannot be cut at a newline byte: check the whole file
    if len(head) == _SAMPLE_BYTES and b"\n" in head:
        head = head[: head.rindex(b"\n") + 1]
    sample = directory / f"sample{path.suffix or '.csv'}"
    sample.write_bytes(head)
    return ContactSource.from_path(sample, encoding=source.encoding, delimiter=source.delimiter)


def preflight(params: CampaignParams) -> None:
    """Checks cheap enough to run before any orchestration starts.

    The template must compile, a contact file must exist and be readable, and the mapping,
    the filter and the template's placeholders must work on the first rows of the file, so
    the commonest mistakes are reported at once, in one line. (``prepare`` checks all of it
    again on the whole audience.)
    """
    template = load_template(params.template)
    Ledger(Settings.load().db_url).close()  # reachable (and migrated) before anything starts
    source = _source(params)
    if source.kind == "sql" or source.path is None:
        return
    path = Path(source.path)
    name = f"contacts file {path}"
    if not path.exists():
        raise InputError(f"{name}: no such file")
    if path.is_dir():
        raise InputError(f"{name}: is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{name}: permission denied")
    if path.stat().st_size == 0:
        raise InputError(f"{name}: the file is empty")
    with tempfile.TemporaryDirectory(prefix="recapito-preflight-") as tmp:
        sample = source if source.kind == "parquet" else _head_sample(source, Path(tmp))
        try:
            loaded = load(sample)
        except InputError as exc:
            raise InputError(str(exc).replace(str(sample.path), str(path))) from None
        targeted = target(loaded, params.mapping, params.filter, None)
        _check_class_column(params, targeted.audience.columns)
        template.check_variables(targeted.audience.columns)
        _sample_render(template, targeted.audience, params)
        if params.rules:  # every rule condition must compile against the contact columns
            from recapito.pec.rules import check_rules, load_rules

            check_rules(load_rules(params.rules), targeted.audience.schema, params.sender)
        lint_before_sending(template, targeted.audience, sender=params.sender, campaign=params.name)


def prepare(params: CampaignParams, settings: Settings) -> Prepared:
    """Target, check the template against the data, plan the ledger rows."""
    template = load_template(params.template)  # fails before anything else on a bad template
    SenderIdentity.from_settings(settings)  # a bad DKIM or VERP key stops it here too
    tracker_for(settings, params.sender)  # and a bad tracking key
    out = campaign_dir(settings, params.name)
    audience_path = out / "audience.parquet"
    ledger = Ledger(settings.db_url)
    try:
        existing = ledger.get_campaign(params.name)
        if existing is not None and existing.status != "created" and audience_path.exists():
            # a re-run: the audience is the snapshot the ledger rows were planned from
            _check_same_audience(params, existing.params)
            campaign = ledger.ensure_campaign(
                params.name,
                sender=params.sender,
                template_hash=template.digest,
                params=params.model_dump(),
            )
            audience = pl.read_parquet(audience_path)
            template.check_variables(audience.columns)
            counts: dict[str, Any] = dict(existing.counts)
        else:
            loaded = load(_source(params))
            # given the whole Loaded, target() also counts the unreadable rows as rejections
            targeted = target(
                loaded,
                params.mapping,
                params.filter,
                ledger.suppressed_among,
                require_email=not _routes_to_pec(params),  # PEC contacts need no e-mail
            )
            size = chunk_size_for(targeted.audience.height, params.chunk_size)
            # _chunk, and with a sending mode the _slot of each row (chunks never span slots)
            audience = assign_slots(targeted.audience, params, size, utcnow(), ledger)
            _check_class_column(params, audience.columns)
            template.check_variables(audience.columns)
            _sample_render(template, audience, params)
            audience = _classify(params, settings, audience, out, targeted)
            # template lint: errors (clipped size, javascript: links...) stop the campaign
            lint_before_sending(
                template, audience, sender=params.sender, campaign=params.name, log_warnings=True
            )
            campaign = ledger.ensure_campaign(
                params.name,
                sender=params.sender,
                template_hash=template.digest,
                params=params.model_dump(),
            )
            out.mkdir(parents=True, exist_ok=True)
            tmp = audience_path.with_suffix(".tmp")
            audience.write_parquet(tmp)
            os.replace(tmp, audience_path)
            ledger.replace_rejections(
                campaign.id,
                targeted.rejected.select("line", "contact_id", "address", "reason").to_dicts(),
            )
            # the rows refused, with line numbers and reasons, for whoever fixes the source
            targeted.rejected.write_csv(out / "rejected.csv")
            counts = dict(targeted.counts)
            counts["chunk_size"] = size
        ledger.expire_stale_claims(
            campaign.id, dead_workers=dead_local_workers(ledger, campaign.id)
        )
        counts["planned_new"] = ledger.plan(campaign.id, _planned_rows(audience))
        ledger.update_campaign(campaign.id, status="planned", counts=counts)
        chunks = ledger.planned_chunks(campaign.id, channel="email")
        pec_chunks = ledger.planned_chunks(campaign.id, channel="pec")
    finally:
        ledger.close()
    return Prepared(
        campaign_id=campaign.id,
        name=params.name,
        chunks=chunks,
        counts=counts,
        audience_path=str(audience_path),
        template_hash=template.digest,
        pec_chunks=pec_chunks,
    )


def _routes_to_pec(params: CampaignParams) -> bool:
    """The campaign's rules may send someone by PEC (contacts then need no e-mail)."""
    if not params.rules:
        return False
    from recapito.pec.rules import load_rules

    return load_rules(params.rules).routes_to_pec


def _classify(
    params: CampaignParams,
    settings: Settings,
    audience: pl.DataFrame,
    out: Path,
    targeted: Targeted,
) -> pl.DataFrame:
    """Channel and PEC mailbox per recipient from the campaign's rules file (a copy of
    the file is kept beside the audience snapshot, for ``recapito rules explain``).
    Recipients a rule sends to e-mail without a valid e-mail address become rejections
    of ``targeted``."""
    if not params.rules:
        return audience
    from recapito.pec.mailboxes import configured_mailboxes
    from recapito.pec.rules import classify, load_rules, without_email_address

    rules = load_rules(params.rules)
    names = list(params.pec_mailbox_blocks) or list(configured_mailboxes(settings.home))
    decided = classify(audience, rules, sender=params.sender, mailboxes=names)
    decided, unsendable = without_email_address(decided)
    targeted.reject(unsendable)
    out.mkdir(parents=True, exist_ok=True)
    suffix = Path(params.rules).suffix.lower() or ".toml"
    (out / f"rules{suffix}").write_bytes(Path(params.rules).read_bytes())
    return decided


def _planned_rows(audience: pl.DataFrame) -> Any:
    """One ledger row per recipient: e-mail, or PEC with the rule and mailbox chosen."""
    if "_channel" not in audience.columns:
        for cid, addr, dom, ch in audience.select(
            "contact_id", "email", "email_domain", "_chunk"
        ).iter_rows():
            yield PlannedDelivery(str(cid), str(addr), str(dom), int(ch))
        return
    columns = ("contact_id", "_address", "_domain", "_chunk", "_channel", "_rule")
    for cid, addr, dom, ch, channel, rule, box, box_rule in audience.select(
        *columns, "_mailbox", "_mailbox_rule"
    ).iter_rows():
        yield PlannedDelivery(
            str(cid),
            str(addr),
            str(dom),
            int(ch),
            channel=str(channel),
            rule=rule,
            mailbox_rule=box_rule,
            pec_mailbox=box,
        )


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_local_workers(ledger: Ledger, campaign_id: int) -> list[str]:
    """Workers of this host holding claims of the campaign whose process is gone (killed,
    crashed): their claims need not wait for the lease to run out. Workers of other hosts
    are left to their lease."""
    host = socket.gethostname()
    dead = []
    for worker in ledger.claim_holders(campaign_id):
        name, sep, pid_text = worker.rpartition(":")
        if not sep or name != host or not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            dead.append(worker)
        except PermissionError:
            continue  # alive, owned by someone else
    return dead


def chunk_renderer(
    template: CompiledTemplate,
    audience: pl.DataFrame,
    params: CampaignParams,
    identity: SenderIdentity | None = None,
    tracker: Tracker | None = None,
) -> Any:
    """Renders one delivery; with ``identity`` the message also gets its signed VERP
    return path (MAIL FROM) and, when the sender's domain has a key, a DKIM signature.
    With ``tracker`` it gets the List-Unsubscribe headers and, unless tracking is off for
    the campaign or the contact, tracked links and an open pixel."""
    rows = {str(r["contact_id"]): r for r in audience.drop("_chunk").to_dicts()}

    def render(claim: Claim) -> RenderedMessage:
        context = rows.get(claim.contact_id, {})
        msg_id = message_id_for(params.name, claim.delivery_id, params.sender_domain)
        headers = {
            "X-Recapito-Campaign": params.name,
            "X-Recapito-Delivery": str(claim.delivery_id),
        }
        transform = None
        values = {**context, "campaign": params.name}
        if tracker is not None:
            headers.update(tracker.headers(claim.delivery_id))
            values["unsubscribe_url"] = tracker.body_link(claim.delivery_id)
            transform = tracker.transform(
                claim.delivery_id, params.tracking and contact_allows_tracking(context)
            )
        message = template.render(
            values,
            sender=params.sender,
            recipient=claim.address,
            message_id=msg_id,
            headers=headers,
            transform=transform,
        )
        if identity is None:
            return message
        return identity.apply(message, claim.delivery_id, params.sender)

    return render


def deliver_chunk(
    params: CampaignParams,
    chunk: int,
    settings: Settings,
    *,
    only_deferred: bool = False,
    permits: Permits | None = None,
) -> dict[str, Any]:
    """Claim one chunk and send it; returns the chunk's outcome counts.

    ``permits`` (from the tasks layer) takes blocks of sending permits from a limit shared
    by every worker, on top of this process's own pacing.

    With ``only_deferred`` just the chunk's deferred rows that are due are taken (the
    retry-deferred flow), never its planned ones."""
    template = load_template(params.template)
    ledger = Ledger(settings.db_url, run_migrations=False)
    try:
        campaign = ledger.get_campaign(params.name)
        if campaign is None:
            raise InputError(f"campaign {params.name!r} is not prepared")
        claims = ledger.claim_chunk(
            campaign.id, chunk, worker=_worker_name(), only_deferred=only_deferred, channel="email"
        )
        if not claims:
            return {"chunk": chunk, "claimed": 0, "outcomes": {}}
        audience_path = campaign_dir(settings, params.name) / "audience.parquet"
        # only this chunk's rows: row-group statistics skip most of the file, so a chunk
        # task of a 500k audience no longer loads all of it (0.2 s and ~150 MB each time)
        audience = pl.scan_parquet(audience_path).filter(pl.col("_chunk") == chunk).collect()
        audience = audience.drop([c for c in _RULE_COLUMNS if c in audience.columns])
        renderer = chunk_renderer(
            template,
            audience,
            params,
            SenderIdentity.from_settings(settings),
            tracker_for(settings, params.sender),
        )
        policies = recipient_policies(settings, store=ledger)
        stats = DeliveryStats()
        for label, part in _claims_by_policy(claims, audience, params).items():
            options = DeliveryOptions(
                sender=params.sender,
                helo_name=settings.helo_name,
                mx_port=settings.mx_port,
                extra_ca_file=settings.tls_ca_file,
                connections_per_host=params.connections_per_host,
                messages_per_connection=params.messages_per_connection,
                retry_after=timedelta(seconds=params.retry_after_seconds),
                retry_factor=params.retry_factor,
                give_up_after=timedelta(hours=params.give_up_after_hours),
                tls_policy=TLSPolicy.parse(label),
                pacing=params.pacing(f"{campaign.id}:{params.name}"),
                permits=permits,
            )
            run = DeliveryRun(ledger, options, renderer, mx_resolver(settings), policies)
            stats.merge(asyncio.run(run.run(part)))
    finally:
        ledger.close()
    result = {"chunk": chunk, "claimed": len(claims), **stats.as_dict()}
    if params.paced:
        result["pacing"] = Pacer(params.pacing(f"{campaign.id}:{params.name}")).status()
    return result


_RULE_COLUMNS = ("_channel", "_rule", "_address", "_domain", "_mailbox", "_mailbox_rule")


def _claims_by_policy(
    claims: list[Claim], audience: pl.DataFrame, params: CampaignParams
) -> dict[str, list[Claim]]:
    """Split a chunk's claims by the transport policy of each message's class."""
    column = params.message_class_column
    if not params.tls_policy_by_class or column is None:
        return {params.tls_policy: claims}
    if column not in audience.columns:
        raise InputError(f"message_class_column {column!r} is not a contact column")
    class_of = {
        str(cid): ("" if cls is None else str(cls).strip())
        for cid, cls in audience.select("contact_id", column).iter_rows()
    }
    split: dict[str, list[Claim]] = {}
    for claim in claims:
        cls = class_of.get(claim.contact_id, "")
        split.setdefault(params.tls_policy_by_class.get(cls, params.tls_policy), []).append(claim)
    return split


def due_retries(
    params: CampaignParams, settings: Settings, within_seconds: float
) -> dict[str, Any]:
    """Chunks holding deferred deliveries due within ``within_seconds``, and the wait."""
    ledger = Ledger(settings.db_url, run_migrations=False)
    try:
        campaign = ledger.get_campaign(params.name)
        if campaign is None:
            raise InputError(f"campaign {params.name!r} is not prepared")
        # e-mail only: a PEC chunk task waits for its own traffic-limit deferrals, and PEC
        # rows deferred longer are left to the retry-deferred flow's PEC path
        chunks, latest = ledger.due_deferred(
            campaign.id, timedelta(seconds=within_seconds), channel="email"
        )
    finally:
        ledger.close()
    wait = 0.0
    if latest is not None:
        wait = max(0.0, (latest - utcnow()).total_seconds())
    return {"chunks": chunks, "wait_seconds": wait}


# ---- retry-deferred (the scheduled flow that retries deferred mail of every campaign) ----


@dataclass(frozen=True)
class RetryTarget:
    """One campaign with deferred mail due now: its parameters as it was created with,
    and its chunks holding such mail (chunk -> token of those rows), e-mail and PEC apart."""

    name: str
    params: CampaignParams
    campaign_key: str
    template_hash: str
    chunks: dict[int, str]
    pec_chunks: dict[int, str] = field(default_factory=dict)


def due_retry_targets(
    settings: Settings, campaign: str | None = None
) -> tuple[list[RetryTarget], dict[str, str]]:
    """The campaigns (all, or just ``campaign``) with deferred mail due now.

    Returns the targets and the campaigns skipped with the reason: one whose template
    changed since it was created is never retried (the mail would differ from what the
    rest of its recipients got); its deferred rows wait for the operator.
    """
    ledger = Ledger(settings.db_url, run_migrations=False)
    targets: list[RetryTarget] = []
    skipped: dict[str, str] = {}
    try:
        if campaign is None:
            found = [ledger.campaign_by_id(i) for i in ledger.campaigns_with_due_deferred()]
        else:
            one = ledger.get_campaign(campaign)
            if one is None:
                raise InputError(f"no campaign named {campaign!r} in the ledger")
            found = [one]
        for camp in found:
            chunks, _latest = ledger.due_deferred(camp.id, timedelta(0), channel="email")
            pec_chunks, _latest = ledger.due_deferred(camp.id, timedelta(0), channel="pec")
            if not chunks and not pec_chunks:
                continue
            try:
                params = CampaignParams.model_validate(camp.params)
                digest = load_template(params.template).digest
            except Exception as exc:  # bad stored parameters, template gone or broken
                skipped[camp.name] = f"cannot load its parameters or template: {exc}"
                continue
            if digest != camp.template_hash:
                skipped[camp.name] = "its template changed since the campaign was created"
                continue
            targets.append(
                RetryTarget(
                    name=camp.name,
                    params=params,
                    campaign_key=f"{camp.id}@{camp.created_at.isoformat()}",
                    template_hash=camp.template_hash,
                    chunks=chunks,
                    pec_chunks=pec_chunks,
                )
            )
    finally:
        ledger.close()
    return targets, skipped


def finish_retries(settings: Settings, names: list[str]) -> dict[str, str]:
    """After a retry pass: a campaign waiting for retries whose mail is all settled is
    ``completed``. Campaigns in any other status (a run in progress) are left alone."""
    ledger = Ledger(settings.db_url, run_migrations=False)
    statuses: dict[str, str] = {}
    try:
        for name in names:
            camp = ledger.get_campaign(name)
            if camp is None:
                continue
            status = camp.status
            if status == "waiting_retry":
                states = ledger.state_counts(camp.id)
                if not any(states.get(s, 0) for s in ("planned", "claimed", "sending", "deferred")):
                    status = "completed"
                    ledger.update_campaign(camp.id, status=status)
            statuses[name] = status
    finally:
        ledger.close()
    return statuses
