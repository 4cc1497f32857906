"""usage: the timings of each call (time to first token, total time since ingress accepted the request).

`latency_ms` (the provider call's own time) was already there; rows stored before this revision have no
ttft_ms / total_ms (NULL), which the latency percentiles skip.

Revision ID: 0008_usage_timings
Revises: 0007_prompt_log
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_usage_timings"
down_revision = "0007_prompt_log"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage", sa.Column("ttft_ms", sa.Float, nullable=True))
    op.add_column("usage", sa.Column("total_ms", sa.Float, nullable=True))


def downgrade() -> None:
    op.drop_column("usage", "total_ms")
    op.drop_column("usage", "ttft_ms")
