"""pec_receipts: PEC receipts keyed by (receipt Message-ID, type, recipient)

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "pec_receipts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("receipt_key", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("mailbox", sa.String(400), nullable=False),
        sa.Column("campaign_id", BigId),
        sa.Column("delivery_id", BigId),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("receipt_kind", sa.String(16)),
        sa.Column("errore", sa.String(32)),
        sa.Column("errore_esteso", sa.Text),
        sa.Column("recipient", sa.String(320)),
        sa.Column("recipient_tipo", sa.String(16)),
        sa.Column("identificativo", sa.String(400)),
        sa.Column("msgid", sa.String(400)),
        sa.Column("provider", sa.String(200)),
        sa.Column("signature", sa.String(16), nullable=False),
        sa.Column("signature_reason", sa.String(64)),
        sa.Column("issued_at", TS),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("delay_s", sa.Float),
        sa.Column("new_state", sa.String(32)),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.id"], name="fk_pec_receipts_campaign_id_campaigns"
        ),
        sa.ForeignKeyConstraint(
            ["delivery_id"], ["deliveries.id"], name="fk_pec_receipts_delivery_id_deliveries"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_pec_receipts"),
        sa.UniqueConstraint("receipt_key", name="uq_pec_receipts_receipt_key"),
    )
    op.create_index("ix_pec_receipts_identificativo", "pec_receipts", ["identificativo"])
    op.create_index("ix_pec_receipts_delivery", "pec_receipts", ["delivery_id"])
    op.create_index("ix_pec_receipts_campaign_kind", "pec_receipts", ["campaign_id", "kind"])


def downgrade() -> None:
    op.drop_index("ix_pec_receipts_campaign_kind", table_name="pec_receipts")
    op.drop_index("ix_pec_receipts_delivery", table_name="pec_receipts")
    op.drop_index("ix_pec_receipts_identificativo", table_name="pec_receipts")
    op.drop_table("pec_receipts")
