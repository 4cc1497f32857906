"""response_cache: the response cache shared by every ingress replica; usage rows of cache hits.

Revision ID: 0006_cache
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSON, REAL

revision = "0006_cache"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Backward compatible: existing rows are provider calls (no hit, nothing saved).
    op.add_column("usage", sa.Column("cache_hit", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("usage", sa.Column("cost_saved_usd", sa.Numeric(20, 10), nullable=False, server_default="0"))
    op.create_table(
        "response_cache",
        sa.Column("scope", sa.Text, primary_key=True),
        sa.Column("exact_key", sa.Text, primary_key=True),
        sa.Column("semantic_key", sa.Text),
        sa.Column("embedding", ARRAY(REAL)),
        sa.Column("model_group", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("entry", JSON, nullable=False),  # json, not jsonb: a replay keeps the original key order
        sa.Column("size_bytes", sa.Integer, nullable=False),
    )
    # A semantic lookup reads the newest entries of one (scope, context) only: this index bounds it.
    op.create_index("response_cache_semantic", "response_cache", ["scope", "semantic_key", "created_at"],
                    postgresql_where=sa.text("semantic_key IS NOT NULL"))
    op.create_index("response_cache_expiry", "response_cache", ["expires_at"])
    op.create_index("response_cache_created", "response_cache", ["created_at"])


def downgrade() -> None:
    op.drop_table("response_cache")
    op.drop_column("usage", "cost_saved_usd")
    op.drop_column("usage", "cache_hit")
