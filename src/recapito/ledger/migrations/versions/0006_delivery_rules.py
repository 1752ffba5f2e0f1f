"""deliveries.rule, mailbox_rule, pec_mailbox: which channel rule fired, and for PEC rows
the mailbox chosen (and the mailbox rule that chose it)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rule", sa.String(100), nullable=True))
        batch_op.add_column(sa.Column("mailbox_rule", sa.String(100), nullable=True))
        batch_op.add_column(sa.Column("pec_mailbox", sa.String(100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("pec_mailbox")
        batch_op.drop_column("mailbox_rule")
        batch_op.drop_column("rule")
