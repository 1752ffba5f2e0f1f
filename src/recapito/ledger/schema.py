"""Ledger tables (SQLAlchemy Core). The Alembic migrations create exactly these.

Portable between SQLite and PostgreSQL: timestamps are timezone-aware UTC, JSON payloads
are stored as text, ids are integers.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)

campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("sender", sa.String(320), nullable=False),
    sa.Column("template_hash", sa.String(64), nullable=False),
    sa.Column("params_json", sa.Text, nullable=False),
    sa.Column("counts_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id"), nullable=False),
    sa.Column("contact_id", sa.String(200), nullable=False),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("address", sa.String(320), nullable=False),
    sa.Column("domain", sa.String(255), nullable=False),
    sa.Column("chunk", sa.Integer, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("worker", sa.String(200)),
    sa.Column("claim_token", sa.String(64)),
    sa.Column("lease_until", TS),
    sa.Column("message_id", sa.String(400)),
    sa.Column("mx_host", sa.String(255)),
    sa.Column("reply_code", sa.Integer),
    sa.Column("reply_status", sa.String(16)),
    sa.Column("reply_text", sa.Text),
    sa.Column("reason", sa.String(64)),
    sa.Column("permanence", sa.String(16)),
    sa.Column("tls_version", sa.String(16)),
    sa.Column("tls_cipher", sa.String(100)),
    sa.Column("tls_level", sa.String(4)),
    sa.Column("next_attempt_at", TS),
    sa.Column("first_attempt_at", TS),  # set by the first claim: retries give up from here
    sa.Column("rule", sa.String(100)),  # the channel rule that chose this row's channel
    sa.Column("mailbox_rule", sa.String(100)),  # PEC: the rule that chose the mailbox
    sa.Column("pec_mailbox", sa.String(100)),  # PEC: the sender mailbox it goes through
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.UniqueConstraint("campaign_id", "contact_id", "channel"),
    sa.Index("ix_deliveries_campaign_chunk_state", "campaign_id", "chunk", "state"),
    sa.Index("ix_deliveries_state_next_attempt", "state", "next_attempt_at"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id"), nullable=False),
    sa.Column("delivery_id", BigId, sa.ForeignKey("deliveries.id")),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("at", TS, nullable=False),
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("data_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("raw_ref", sa.String(400)),
    sa.Index("ix_events_delivery", "delivery_id"),
    sa.Index("ix_events_campaign_kind", "campaign_id", "kind"),
)

mx_facts = sa.Table(
    "mx_facts",
    metadata,
    sa.Column("mx_host", sa.String(255), primary_key=True),
    sa.Column("checked_at", TS, nullable=False),
    sa.Column("expires_at", TS, nullable=False),
    sa.Column("starttls_offered", sa.Boolean, nullable=False),
    sa.Column("ever_offered_starttls", sa.Boolean, nullable=False),
    sa.Column("tls_version", sa.String(16)),
    sa.Column("tls_cipher", sa.String(100)),
    sa.Column("tls_level", sa.String(4)),
    sa.Column("cert_verdict", sa.String(64)),
)

suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("address", sa.String(320), primary_key=True),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id")),
    sa.Column("created_at", TS, nullable=False),
)

rejections = sa.Table(
    "rejections",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id"), nullable=False),
    sa.Column("line", sa.Integer),
    sa.Column("contact_id", sa.String(200)),
    sa.Column("address", sa.String(400)),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Index("ix_rejections_campaign", "campaign_id"),
)

# MTA-STS policies (RFC 8461 §5) cached per recipient domain: a policy is applied until
# ``expires_at`` (fetched_at + max_age) and refetched when the domain's TXT id changes.
mta_sts_policies = sa.Table(
    "mta_sts_policies",
    metadata,
    sa.Column("domain", sa.String(255), primary_key=True),
    sa.Column("policy_id", sa.String(32), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("mx_patterns", sa.Text, nullable=False),  # JSON list of patterns
    sa.Column("max_age", sa.Integer, nullable=False),
    sa.Column("fetched_at", TS, nullable=False),
    sa.Column("expires_at", TS, nullable=False),
    sa.Column("policy_sha256", sa.String(64), nullable=False),
)

# Tracking hits (open pixel fetches and click redirects), one row per request, with how
# the tracking service judged it (human, machine open, scanner click). Never the full IP
# address: its /24 (IPv4) or /48 (IPv6) network only.
tracking_hits = sa.Table(
    "tracking_hits",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id"), nullable=False),
    sa.Column("delivery_id", BigId, sa.ForeignKey("deliveries.id"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # open | click
    sa.Column("class", sa.String(16), nullable=False),  # human | machine | scanner
    sa.Column("reason", sa.String(64), nullable=False, server_default=""),
    sa.Column("at", TS, nullable=False),
    sa.Column("delay_s", sa.Float),  # seconds since the message was accepted
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("link_index", sa.Integer),
    sa.Column("target", sa.Text),
    sa.Column("user_agent", sa.String(400)),
    sa.Column("ip_prefix", sa.String(64)),
    sa.Index("ix_tracking_hits_campaign_kind", "campaign_id", "kind", "class"),
    sa.Index("ix_tracking_hits_delivery", "delivery_id"),
)

# Messages read from collector mailboxes (bounces now, PEC receipts later), keyed by the
# SHA-256 of their raw bytes: a message processed once is never counted again, even when a
# crash came between the ledger write and the IMAP MOVE. The raw bytes are kept as evidence
# in ``evidence_path`` (a file under the recapito home, mode 0600).
inbound_messages = sa.Table(
    "inbound_messages",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("mailbox", sa.String(400), nullable=False),
    sa.Column("message_id", sa.String(998)),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("disposition", sa.String(16), nullable=False),
    sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id")),
    sa.Column("delivery_id", BigId, sa.ForeignKey("deliveries.id")),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("evidence_path", sa.String(400)),
    sa.Column("detail_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("received_at", TS, nullable=False),
    sa.Index("ix_inbound_messages_source_message_id", "source", "message_id"),
    sa.Index("ix_inbound_messages_delivery", "delivery_id"),
)

# PEC receipts (recapito.pec.collector), one row per receipt: keyed by the receipt's
# Message-ID, its type and the recipient it is about (``receipt_key`` is their SHA-256), so a
# receipt seen twice (a re-poll, a copy with other bytes) never counts twice. ``sha256`` names
# the raw message in ``inbound_messages`` (the evidence file).
pec_receipts = sa.Table(
    "pec_receipts",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("receipt_key", sa.String(64), nullable=False, unique=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("mailbox", sa.String(400), nullable=False),
    sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id")),
    sa.Column("delivery_id", BigId, sa.ForeignKey("deliveries.id")),
    sa.Column("type", sa.String(32), nullable=False),  # X-Ricevuta / X-Trasporto value
    sa.Column("kind", sa.String(32), nullable=False),  # recapito.pec.receipts kinds
    sa.Column("receipt_kind", sa.String(16)),  # completa | breve | sintetica
    sa.Column("errore", sa.String(32)),
    sa.Column("errore_esteso", sa.Text),
    sa.Column("recipient", sa.String(320)),  # daticert consegna
    sa.Column("recipient_tipo", sa.String(16)),  # certificato | esterno
    sa.Column("identificativo", sa.String(400)),
    sa.Column("msgid", sa.String(400)),
    sa.Column("provider", sa.String(200)),  # gestore-emittente
    sa.Column("signature", sa.String(16), nullable=False),  # valid | invalid | unchecked
    sa.Column("signature_reason", sa.String(64)),
    sa.Column("issued_at", TS),  # daticert date (the provider's clock, with its zone)
    sa.Column("received_at", TS, nullable=False),
    sa.Column("delay_s", sa.Float),  # issued_at - submission (the "sent" event)
    sa.Column("new_state", sa.String(32)),  # the state it moved the delivery to, if any
    sa.Index("ix_pec_receipts_identificativo", "identificativo"),
    sa.Index("ix_pec_receipts_delivery", "delivery_id"),
    sa.Index("ix_pec_receipts_campaign_kind", "campaign_id", "kind"),
)

# Fallback steps (recapito.fallback.sweeper): one row per step of a delivery's fallback
# chain. Step 0 watches the primary delivery; steps 1… are the channels of the rule that
# fired. The sweeper claims due rows (``fallback_due_at <= now``) with a conditional UPDATE
# and writes ``sending`` before calling a provider: a ``sending`` row whose lease ran out is
# ``uncertain`` and never resent (Twilio has no idempotency key).
fallback_steps = sa.Table(
    "fallback_steps",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("campaign_id", BigId, sa.ForeignKey("campaigns.id"), nullable=False),
    sa.Column("delivery_id", BigId, sa.ForeignKey("deliveries.id"), nullable=False),
    sa.Column("contact_id", sa.String(200), nullable=False),
    sa.Column("rule_index", sa.Integer),  # the policy clause that fired (None: the watch row)
    sa.Column("step_index", sa.Integer, nullable=False),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("fallback_due_at", TS),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("claim_token", sa.String(64)),
    sa.Column("lease_until", TS),
    sa.Column("address", sa.String(320)),  # E.164 phone for sms, device/address otherwise
    sa.Column("provider_id", sa.String(64)),
    sa.Column("provider_status", sa.String(32)),
    sa.Column("outcome", sa.String(64)),  # trigger, error code or final word
    sa.Column("error_code", sa.Integer),
    sa.Column("sent_at", TS),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.UniqueConstraint("delivery_id", "step_index"),
    sa.Index("ix_fallback_steps_state_fallback_due_at", "state", "fallback_due_at"),
    sa.Index("ix_fallback_steps_provider_id", "provider_id"),
)

# Push device tokens (recapito.fallback.push): a contact's app installs; FCM's UNREGISTERED
# (or INVALID_ARGUMENT on the token) marks a token ``invalid`` and it is never used again.
# Unique on the SHA-256 of the token (tokens can be longer than an index allows).
device_tokens = sa.Table(
    "device_tokens",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("contact_id", sa.String(200), nullable=False),
    sa.Column("token", sa.String(4096), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("platform", sa.String(16), nullable=False),  # android | ios | web
    sa.Column("state", sa.String(16), nullable=False),  # active | invalid
    sa.Column("reason", sa.String(64)),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.Index("ix_device_tokens_contact_id_state", "contact_id", "state"),
)
