"""Limits and budgets that hold across replicas: one-statement rate reservations, budget holds.

- `rate_counters.granted`: what the last reservation of a row granted, returned by the one UPSERT that
  reserves (services/ingress/limits.py), so a reservation is one round trip; `window_start` is indexed so
  old windows are deleted cheaply.
- `spend_totals.reserved_usd`: estimated cost of admitted requests not yet settled (services/ingress/budgets.py);
  `spend_totals.budget_usd`: the budget the last reservation was checked against.

Revision ID: 0009_limits
Revises: 0008_usage_timings
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_limits"
down_revision = "0008_usage_timings"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rate_counters", sa.Column("granted", sa.BigInteger, nullable=False, server_default="0"))
    op.create_index("rate_counters_window", "rate_counters", ["window_start"])
    op.add_column("spend_totals", sa.Column("reserved_usd", sa.Numeric(20, 10), nullable=False, server_default="0"))
    op.add_column("spend_totals", sa.Column("budget_usd", sa.Numeric(20, 10)))


def downgrade() -> None:
    op.drop_column("spend_totals", "budget_usd")
    op.drop_column("spend_totals", "reserved_usd")
    op.drop_index("rate_counters_window", "rate_counters")
    op.drop_column("rate_counters", "granted")
