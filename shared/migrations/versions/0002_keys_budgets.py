"""virtual keys, team/project budgets, spend totals per period, rate-limit counters.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "virtual_keys",
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("key_hash", sa.Text, nullable=False, unique=True),
        sa.Column("key_prefix", sa.Text, nullable=False),
        sa.Column("name", sa.Text),
        sa.Column("team", sa.Text),
        sa.Column("project", sa.Text),
        sa.Column("user_id", sa.Text),
        sa.Column("allowed_models", JSONB, nullable=False, server_default="[]"),
        sa.Column("rpm", sa.Integer),
        sa.Column("tpm", sa.Integer),
        sa.Column("max_parallel", sa.Integer),
        sa.Column("budget_usd", sa.Numeric(20, 6)),
        sa.Column("budget_period", sa.Text),
        sa.Column("alert_thresholds", JSONB, nullable=False, server_default="[0.8]"),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("metadata", JSONB, nullable=False, server_default="{}"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "budgets",
        sa.Column("scope", sa.Text, primary_key=True),
        sa.Column("scope_id", sa.Text, primary_key=True),
        sa.Column("budget_usd", sa.Numeric(20, 6), nullable=False),
        sa.Column("budget_period", sa.Text, nullable=False),
        sa.Column("alert_thresholds", JSONB, nullable=False, server_default="[0.8]"),
    )
    op.create_table(
        "spend_totals",
        sa.Column("scope", sa.Text, primary_key=True),
        sa.Column("scope_id", sa.Text, primary_key=True),
        sa.Column("period", sa.Text, primary_key=True),
        sa.Column("period_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("cost_usd", sa.Numeric(20, 10), nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "rate_counters",
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("used", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for table in ("rate_counters", "spend_totals", "budgets", "virtual_keys"):
        op.drop_table(table)
