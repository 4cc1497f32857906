"""The accounting database: table definitions (SQLAlchemy Core), migrations, and an engine for tools and tests.

Schema changes go through alembic migrations in shared/migrations/versions; these table objects mirror them
(alembic's metadata, and what tests and tools query). The services themselves talk to PostgreSQL through
asyncpg (shared/pg.py) with SQL text, and never import this module: SQLAlchemy would cost each of them about
21 MB (docs/decisions/ingress-memory.md).
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
    LargeBinary,
    MetaData,
    Numeric,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON, JSONB, REAL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from switchyard.shared.batch import BATCH_STAGES
from switchyard.shared.settings import asyncpg_url

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
    Column("cache_hit", Boolean, nullable=False, server_default="false"),
    Column("cost_saved_usd", Numeric(20, 10), nullable=False, server_default="0"),
    Column("guardrails", JSONB),
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
    Column("guardrails", JSONB, nullable=False, server_default="[]"),
    Column("log_prompts", Boolean),
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
    Column("reserved_usd", Numeric(20, 10), nullable=False, server_default="0"),
    Column("budget_usd", Numeric(20, 10)),
)

response_cache = Table(
    "response_cache",
    metadata,
    Column("scope", Text, primary_key=True),
    Column("exact_key", Text, primary_key=True),
    Column("semantic_key", Text),
    Column("embedding", ARRAY(REAL)),
    Column("model_group", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("entry", JSON, nullable=False),
    Column("size_bytes", Integer, nullable=False),
)
"""The response cache (services/ingress/cache_store.py): one row per (tenant scope, exact request key)."""

rate_counters = Table(
    "rate_counters",
    metadata,
    Column("key_id", Text, primary_key=True),
    Column("kind", Text, primary_key=True),
    Column("window_start", DateTime(timezone=True), primary_key=True),
    Column("used", BigInteger, nullable=False),
    Column("granted", BigInteger, nullable=False, server_default="0"),
)


def make_engine(url: str, pool_size: int = 5, *, connect_timeout_s: float = 60.0,
                command_timeout_s: float | None = None, pool_timeout_s: float = 30.0) -> AsyncEngine:
    """An asyncpg engine. The timeouts (asyncpg's and SQLAlchemy's defaults unless given) let a caller that
    must not hang on a stopped or silent PostgreSQL fail its call instead."""
    return create_async_engine(asyncpg_url(url), pool_size=pool_size, max_overflow=5, pool_pre_ping=True,
                               pool_timeout=pool_timeout_s,
                               connect_args={"timeout": connect_timeout_s, "command_timeout": command_timeout_s})


MIGRATIONS = Path(__file__).parent / "migrations"


def upgrade_blocking(url: str, revision: str = "heads") -> None:
    """Run alembic migrations up to `revision` (blocking; call from a thread inside async code). The default,
    every head, also applies migrations that branches added side by side on the same parent."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", asyncpg_url(url).replace("%", "%%"))
    command.upgrade(cfg, revision)


async def upgrade(url: str) -> None:
    await asyncio.to_thread(upgrade_blocking, url)


# The Files and Batches APIs (migration 0004): files as chunked bytea, batches with a driver lease.
files = Table(
    "files",
    metadata,
    Column("id", Text, primary_key=True),
    Column("key_id", Text, nullable=False),
    Column("team", Text),
    Column("filename", Text, nullable=False),
    Column("purpose", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
)

file_chunks = Table(
    "file_chunks",
    metadata,
    Column("file_id", Text, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

batches = Table(
    "batches",
    metadata,
    Column("id", Text, primary_key=True),
    Column("key_id", Text, nullable=False),
    Column("team", Text),
    Column("key_metadata", JSONB, nullable=False),
    Column("endpoint", Text, nullable=False),
    Column("input_file_id", Text, nullable=False),
    Column("completion_window", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("metadata", JSONB),
    Column("errors", JSONB),
    Column("output_file_id", Text),
    Column("error_file_id", Text),
    Column("total", Integer, nullable=False),
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    *(Column(f"{stage}_at", DateTime(timezone=True)) for stage in BATCH_STAGES),
    Column("driver", Text),
    Column("lease_until", DateTime(timezone=True)),
    Column("reply_offset", BigInteger, nullable=False),
)

batch_lines = Table(
    "batch_lines",
    metadata,
    Column("batch_id", Text, primary_key=True),
    Column("line", Integer, primary_key=True),
    Column("custom_id", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("submitted", Boolean, nullable=False),
    Column("status", Text, nullable=False),
    Column("result", LargeBinary),
)

prompt_log = Table(
    "prompt_log",
    metadata,
    Column("request_id", Text, primary_key=True),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("key_id", Text),
    Column("model", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("status", Integer, nullable=False),
    Column("route", Text),
    Column("attempts", Integer, nullable=False),
    Column("request", JSONB),
    Column("answer", JSONB),
    Column("error", JSONB),
    Column("timings", JSONB, nullable=False),
    Column("usage", JSONB),
    Column("guardrails", JSONB, nullable=False),
)
"""The prompt log (shared/prompt_log.py): one row per finished request with prompt logging on."""

responses = Table(
    "responses",
    metadata,
    Column("id", Text, primary_key=True),
    Column("key_id", Text, nullable=False),
    Column("team", Text),
    Column("previous_id", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("response", JSONB, nullable=False),
    Column("input_items", JSONB, nullable=False),
    Column("turn", JSONB, nullable=False),
)
"""Stored Responses API answers (services/ingress/responses_store.py), chained by previous_id."""
