"""MTA-STS policy cache

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 18:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mta_sts_policies",
        sa.Column("domain", sa.String(length=255), nullable=False),
        sa.Column("policy_id", sa.String(length=32), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("mx_patterns", sa.Text(), nullable=False),
        sa.Column("max_age", sa.Integer(), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("policy_sha256", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("domain", name=op.f("pk_mta_sts_policies")),
    )


def downgrade() -> None:
    op.drop_table("mta_sts_policies")
