"""responses: stored Responses API answers (store=true), for retrieval and previous_response_id.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("team", sa.Text),
        sa.Column("previous_id", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("response", JSONB, nullable=False),
        sa.Column("input_items", JSONB, nullable=False),
        sa.Column("turn", JSONB, nullable=False),
    )
    op.create_index("responses_created", "responses", ["created_at"])


def downgrade() -> None:
    op.drop_table("responses")
