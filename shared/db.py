"""The accounting database: table definitions (SQLAlchemy Core), engine factory, migrations.

Schema changes go through alembic migrations in shared/migrations/versions; these table
objects mirror them for queries and inserts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from shared.config import asyncpg_url

metadata = MetaData()

usage = Table(
    "usage",
    metadata,
    Column("event_id", Text, primary_key=True),
    Column("request_id", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("call_seq", Integer, nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("kind", Text, nullable=False),
    Column("provider", Text, nullable=False),
    Column("deployment", Text, nullable=False),
    Column("model_group", Text, nullable=False),
    Column("provider_model", Text, nullable=False),
    Column("key_id", Text),
    Column("team", Text),
    Column("project", Text),
    Column("user_id", Text),
    Column("metadata", JSONB, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("reasoning_tokens", BigInteger, nullable=False),
    Column("cost_usd", Numeric(20, 10), nullable=False),
    Column("priced", Boolean, nullable=False),
    Column("status", Integer, nullable=False),
    Column("ok", Boolean, nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("total_ms", Float),
    Column("priority", Text, nullable=False),
    Column("redelivered", Boolean, nullable=False),
)


virtual_keys = Table(
    "virtual_keys",
    metadata,
    Column("key_id", Text, primary_key=True),
    Column("key_hash", Text, nullable=False, unique=True),
    Column("key_prefix", Text, nullable=False),
    Column("name", Text),
    Column("team", Text),
    Column("project", Text),
    Column("user_id", Text),
    Column("allowed_models", JSONB, nullable=False),
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("max_parallel", Integer),
    Column("budget_usd", Numeric(20, 6)),
    Column("budget_period", Text),
    Column("alert_thresholds", JSONB, nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("metadata", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
)

budgets = Table(
    "budgets",
    metadata,
    Column("scope", Text, primary_key=True),
    Column("scope_id", Text, primary_key=True),
    Column("budget_usd", Numeric(20, 6), nullable=False),
    Column("budget_period", Text, nullable=False),
    Column("alert_thresholds", JSONB, nullable=False),
)

spend_totals = Table(
    "spend_totals",
    metadata,
    Column("scope", Text, primary_key=True),
    Column("scope_id", Text, primary_key=True),
    Column("period", Text, primary_key=True),
    Column("period_start", DateTime(timezone=True), primary_key=True),
    Column("cost_usd", Numeric(20, 10), nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("requests", BigInteger, nullable=False),
)

rate_counters = Table(
    "rate_counters",
    metadata,
    Column("key_id", Text, primary_key=True),
    Column("kind", Text, primary_key=True),
    Column("window_start", DateTime(timezone=True), primary_key=True),
    Column("used", BigInteger, nullable=False),
)


def make_engine(url: str, pool_size: int = 5, *, connect_timeout_s: float = 60.0,
                command_timeout_s: float | None = None, pool_timeout_s: float = 30.0) -> AsyncEngine:
    """An asyncpg engine. The timeouts (asyncpg's and SQLAlchemy's defaults unless given) let a caller that
    must not hang on a stopped or silent PostgreSQL fail its call instead."""
    return create_async_engine(asyncpg_url(url), pool_size=pool_size, max_overflow=5, pool_pre_ping=True,
                               pool_timeout=pool_timeout_s,
                               connect_args={"timeout": connect_timeout_s, "command_timeout": command_timeout_s})


MIGRATIONS = Path(__file__).parent / "migrations"


def upgrade_blocking(url: str, revision: str = "head") -> None:
    """Run alembic migrations up to `revision` (blocking; call from a thread inside async code)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", asyncpg_url(url).replace("%", "%%"))
    command.upgrade(cfg, revision)


async def upgrade(url: str) -> None:
    await asyncio.to_thread(upgrade_blocking, url)
