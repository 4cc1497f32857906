"""Usage events to priced rows, written in batches, idempotently (unique event id).

Each provider call arrives twice under one event id: the worker's write-ahead record (status
IN_DOUBT, sent before calling) and its outcome. The outcome completes the in-doubt row; a
record that arrives again (Kafka delivers at least once) never undoes an outcome. Spend totals
count outcomes only. When an attempt's call was made more than once (a worker died after
calling but before committing, and the request was redelivered), every call but the first
by start time is marked `redelivered`, whatever order the rows arrive in.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from switchyard.services.accounting.budgets import update_totals
from switchyard.shared.contracts import IN_DOUBT, KeyEvent, Usage, UsageEvent
from switchyard.shared.pg import Column, Connection, Database, Query, column_arrays, unnest_rows
from switchyard.shared.pricing import cost


def to_row(event: UsageEvent) -> dict[str, Any]:
    usd, priced = cost(event.provider, event.provider_model, event.usage)
    saved, tokens = (usd, Usage()) if event.cache_hit else (Decimal(0), event.usage)
    if event.cache_hit:  # answered by the cache: no provider tokens, no cost; what the call would have cost is saved
        usd = Decimal(0)
    meta = event.metadata
    return {
        "event_id": event.event_id,
        "request_id": event.request_id,
        "attempt": event.attempt,
        "call_seq": event.call_seq,
        "ts": datetime.fromtimestamp(event.ts_ms / 1000.0, tz=UTC),
        "kind": event.kind,
        "provider": event.provider,
        "deployment": event.deployment,
        "model_group": event.model_group,
        "provider_model": event.provider_model,
        "key_id": event.key_id,
        "team": meta.get("team"),
        "project": meta.get("project"),
        "user_id": meta.get("user"),
        "metadata": meta,
        "prompt_tokens": tokens.prompt_tokens,
        "completion_tokens": tokens.completion_tokens,
        "cached_tokens": tokens.cached_tokens,
        "reasoning_tokens": tokens.reasoning_tokens,
        "cost_usd": usd,
        "priced": priced,
        "status": event.status,
        "ok": event.ok,
        "stream": event.stream,
        "latency_ms": event.latency_ms,
        "ttft_ms": event.ttft_ms,
        "total_ms": event.total_ms,
        "priority": event.priority,
        "redelivered": event.redelivered,
        "cache_hit": event.cache_hit,
        "cost_saved_usd": saved,
    }


_KEPT = ("event_id", "ts", "redelivered", "guardrails")
"""Columns an outcome leaves as the row has them: the call's identity and start (from its write-ahead record),
and the guardrail decisions, which only the prompt-log writer sets and may set before the outcome lands."""

_MARK_REPEATED_CALLS = Query("""
UPDATE usage AS u SET redelivered = r.n > 1
FROM (SELECT event_id, row_number() OVER (PARTITION BY request_id, attempt, call_seq ORDER BY ts, event_id) AS n
      FROM usage
      WHERE (request_id, attempt, call_seq) IN (
          SELECT * FROM unnest(CAST(:request_ids AS text[]), CAST(:attempts AS int[]), CAST(:calls AS int[])))
     ) AS r
WHERE u.event_id = r.event_id AND u.redelivered <> (r.n > 1)
""")


USAGE_COLUMNS: tuple[Column, ...] = (
    ("event_id", "text"), ("request_id", "text"), ("attempt", "integer"), ("call_seq", "integer"),
    ("ts", "timestamp with time zone"), ("kind", "text"), ("provider", "text"), ("deployment", "text"),
    ("model_group", "text"), ("provider_model", "text"), ("key_id", "text"), ("team", "text"), ("project", "text"),
    ("user_id", "text"), ("metadata", "jsonb"), ("prompt_tokens", "bigint"), ("completion_tokens", "bigint"),
    ("cached_tokens", "bigint"), ("reasoning_tokens", "bigint"), ("cost_usd", "numeric(20,10)"),
    ("priced", "boolean"), ("status", "integer"), ("ok", "boolean"), ("stream", "boolean"),
    ("latency_ms", "double precision"), ("ttft_ms", "double precision"), ("total_ms", "double precision"),
    ("priority", "text"), ("redelivered", "boolean"), ("cache_hit", "boolean"), ("cost_saved_usd", "numeric(20,10)"),
)
"""What `to_row` fills: every column of `usage` (shared/db.py; tests/test_accounting.py checks they agree) but
`guardrails` (the prompt-log writer's)."""

_NAMES = tuple(name for name, _ in USAGE_COLUMNS)

_UPSERT = Query(
    f"INSERT INTO usage ({', '.join(_NAMES)}) {unnest_rows(USAGE_COLUMNS)} "
    f"ON CONFLICT (event_id) DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in _NAMES if c not in _KEPT)} "
    f"WHERE usage.status = {IN_DOUBT} AND EXCLUDED.status <> {IN_DOUBT} RETURNING event_id")
"""Store rows, or complete their in-doubt write-ahead records: one statement for any batch size."""


def _one_per_call(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per event id, the outcome where the batch has it: an UPSERT may touch a row only once."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen = best.get(row["event_id"])
        if seen is None or (seen["status"] == IN_DOUBT and row["status"] != IN_DOUBT):
            best[row["event_id"]] = row
    return list(best.values())


async def _mark_repeated_calls(conn: Connection, calls: set[tuple[str, int, int]]) -> None:
    if calls:
        request_ids, attempts, seqs = (list(column) for column in zip(*sorted(calls), strict=True))
        await conn.execute(_MARK_REPEATED_CALLS, {"request_ids": request_ids, "attempts": attempts, "calls": seqs})


async def write_batch(database: Database, rows: list[dict[str, Any]]) -> tuple[int, list[KeyEvent]]:
    """Store rows, complete in-doubt ones, mark repeated calls, and update spend totals, in one transaction.

    Returns (rows inserted or completed, budget events to publish). A row already stored with an
    outcome is left alone and adds nothing to the totals, so a replayed batch changes nothing.
    """
    rows = _one_per_call(rows)
    if not rows:
        return 0, []
    async with database.transaction() as conn:
        written = {r["event_id"] for r in await conn.fetch(_UPSERT, column_arrays(USAGE_COLUMNS, rows))}
        new = [r for r in rows if r["event_id"] in written]
        await _mark_repeated_calls(conn, {(r["request_id"], r["attempt"], r["call_seq"]) for r in new})
        events = await update_totals(conn, [r for r in new if r["status"] != IN_DOUBT])
        return len(written), events
