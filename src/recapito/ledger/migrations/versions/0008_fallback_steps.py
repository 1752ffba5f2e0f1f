"""fallback_steps: the fallback chain of a delivery, one row per step

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "fallback_steps",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("campaign_id", BigId, nullable=False),
        sa.Column("delivery_id", BigId, nullable=False),
        sa.Column("contact_id", sa.String(200), nullable=False),
        sa.Column("rule_index", sa.Integer),
        sa.Column("step_index", sa.Integer, nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("fallback_due_at", TS),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("claim_token", sa.String(64)),
        sa.Column("lease_until", TS),
        sa.Column("address", sa.String(320)),
        sa.Column("provider_id", sa.String(64)),
        sa.Column("provider_status", sa.String(32)),
        sa.Column("outcome", sa.String(64)),
        sa.Column("error_code", sa.Integer),
        sa.Column("sent_at", TS),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.id"], name="fk_fallback_steps_campaign_id_campaigns"
        ),
        sa.ForeignKeyConstraint(
            ["delivery_id"], ["deliveries.id"], name="fk_fallback_steps_delivery_id_deliveries"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_fallback_steps"),
        sa.UniqueConstraint(
            "delivery_id", "step_index", name="uq_fallback_steps_delivery_id_step_index"
        ),
    )
    op.create_index(
        "ix_fallback_steps_state_fallback_due_at", "fallback_steps", ["state", "fallback_due_at"]
    )
    op.create_index("ix_fallback_steps_provider_id", "fallback_steps", ["provider_id"])


def downgrade() -> None:
    op.drop_index("ix_fallback_steps_provider_id", table_name="fallback_steps")
    op.drop_index("ix_fallback_steps_state_fallback_due_at", table_name="fallback_steps")
    op.drop_table("fallback_steps")
