"""inbound_messages: collector mailboxes' messages, keyed by SHA-256 (bounces, receipts)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "inbound_messages",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("mailbox", sa.String(400), nullable=False),
        sa.Column("message_id", sa.String(998)),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("disposition", sa.String(16), nullable=False),
        sa.Column("campaign_id", BigId),
        sa.Column("delivery_id", BigId),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("evidence_path", sa.String(400)),
        sa.Column("detail_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.id"], name="fk_inbound_messages_campaign_id_campaigns"
        ),
        sa.ForeignKeyConstraint(
            ["delivery_id"], ["deliveries.id"], name="fk_inbound_messages_delivery_id_deliveries"
        ),
        sa.PrimaryKeyConstraint("sha256", name="pk_inbound_messages"),
    )
    op.create_index(
        "ix_inbound_messages_source_message_id", "inbound_messages", ["source", "message_id"]
    )
    op.create_index("ix_inbound_messages_delivery", "inbound_messages", ["delivery_id"])


def downgrade() -> None:
    op.drop_index("ix_inbound_messages_delivery", table_name="inbound_messages")
    op.drop_index("ix_inbound_messages_source_message_id", table_name="inbound_messages")
    op.drop_table("inbound_messages")
