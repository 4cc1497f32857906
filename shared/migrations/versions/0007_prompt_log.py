"""prompt_log: stored (redacted) requests and answers; guardrail decisions on usage rows; per-key guardrails.

Revision ID: 0007_prompt_log
Revises: 0006_cache
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007_prompt_log"
down_revision = "0006_cache"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prompt_log",
        sa.Column("request_id", sa.Text, primary_key=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.Text),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("route", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("request", JSONB),
        sa.Column("answer", JSONB),
        sa.Column("error", JSONB),
        sa.Column("timings", JSONB, nullable=False),
        sa.Column("usage", JSONB),
        sa.Column("guardrails", JSONB, nullable=False),
    )
    # Retention deletes by age in small batches; reads filter by time, key and model.
    op.create_index("prompt_log_ts", "prompt_log", ["ts"])
    op.create_index("prompt_log_key_ts", "prompt_log", ["key_id", "ts"])
    op.add_column("usage", sa.Column("guardrails", JSONB))
    op.add_column("virtual_keys", sa.Column("guardrails", JSONB, nullable=False, server_default="[]"))
    op.add_column("virtual_keys", sa.Column("log_prompts", sa.Boolean))


def downgrade() -> None:
    op.drop_column("virtual_keys", "log_prompts")
    op.drop_column("virtual_keys", "guardrails")
    op.drop_column("usage", "guardrails")
    op.drop_table("prompt_log")
