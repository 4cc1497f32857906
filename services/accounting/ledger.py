"""Usage events to priced rows, written in batches, idempotently (unique event id)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from services.accounting.budgets import update_totals
from shared.contracts import KeyEvent, UsageEvent
from shared.db import usage
from shared.pricing import cost


def to_row(event: UsageEvent) -> dict[str, Any]:
    usd, priced = cost(event.provider, event.provider_model, event.usage)
    meta = event.metadata
    return {
        "event_id": event.event_id,
        "request_id": event.request_id,
        "attempt": event.attempt,
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
        "prompt_tokens": event.usage.prompt_tokens,
        "completion_tokens": event.usage.completion_tokens,
        "cached_tokens": event.usage.cached_tokens,
        "reasoning_tokens": event.usage.reasoning_tokens,
        "cost_usd": usd,
        "priced": priced,
        "status": event.status,
        "ok": event.ok,
        "stream": event.stream,
        "latency_ms": event.latency_ms,
        "priority": event.priority,
        "redelivered": event.redelivered,
    }


async def write_batch(engine: AsyncEngine, rows: list[dict[str, Any]]) -> tuple[int, list[KeyEvent]]:
    """Insert rows and update spend totals in one transaction; rows already stored (same event id) are
    skipped and add nothing to the totals. Returns (rows inserted, budget events to publish)."""
    if not rows:
        return 0, []
    async with engine.begin() as conn:
        result = await conn.execute(insert(usage).on_conflict_do_nothing(index_elements=["event_id"])
                                    .returning(usage.c.event_id), rows)
        inserted = {r.event_id for r in result}
        events = await update_totals(conn, [r for r in rows if r["event_id"] in inserted])
        return len(inserted), events
