"""usage: one row per provider call, unique by event id.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("event_id", sa.Text, primary_key=True),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("deployment", sa.Text, nullable=False),
        sa.Column("model_group", sa.Text, nullable=False),
        sa.Column("provider_model", sa.Text, nullable=False),
        sa.Column("key_id", sa.Text),
        sa.Column("team", sa.Text),
        sa.Column("project", sa.Text),
        sa.Column("user_id", sa.Text),
        sa.Column("metadata", JSONB, nullable=False, server_default="{}"),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("cached_tokens", sa.BigInteger, nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_usd", sa.Numeric(20, 10), nullable=False),
        sa.Column("priced", sa.Boolean, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("priority", sa.Text, nullable=False),
        sa.Column("redelivered", sa.Boolean, nullable=False),
    )
    op.create_index("usage_ts", "usage", ["ts"])
    op.create_index("usage_key_ts", "usage", ["key_id", "ts"])
    op.create_index("usage_request", "usage", ["request_id"])


def downgrade() -> None:
    op.drop_table("usage")
