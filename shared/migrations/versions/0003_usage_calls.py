"""usage: calls recorded before they are made (status 0 "in doubt"), and which call of an attempt a row is.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage", sa.Column("call_seq", sa.Integer, nullable=False, server_default="0"))
    # Accounting finds the other calls of one attempt by this index to mark the repeated ones.
    op.create_index("usage_request_call", "usage", ["request_id", "attempt", "call_seq"])
    op.drop_index("usage_request", table_name="usage")


def downgrade() -> None:
    op.create_index("usage_request", "usage", ["request_id"])
    op.drop_index("usage_request_call", table_name="usage")
    op.drop_column("usage", "call_seq")
