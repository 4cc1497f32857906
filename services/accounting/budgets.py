"""Running spend totals per key / team / project and period, and the events budgets raise.

Totals are updated once per batch of usage rows, in the same transaction as the rows (one
UPSERT for the whole batch, never a hot-row UPDATE per request, rows in one fixed order so replicas
never deadlock), so a replayed batch adds nothing twice. When a total crosses a budget (or an
alert threshold) in this batch, a `KeyEvent` is returned for `llm.keys`; ingress blocks the scope until the period ends.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from switchyard.shared.contracts import KeyEvent
from switchyard.shared.db import budgets, column_arrays, spend_totals, unnest_rows, virtual_keys
from switchyard.shared.periods import PERIODS, period_end, period_start

log = logging.getLogger("switchyard.accounting.budgets")

TotalKey = tuple[str, str, str, datetime]


def aggregate(rows: list[dict[str, Any]]) -> dict[TotalKey, list[Decimal | int]]:
    """Sum cost, tokens and requests of new usage rows per (scope, id, period, period start)."""
    sums: dict[TotalKey, list[Decimal | int]] = defaultdict(lambda: [Decimal(0), 0, 0])
    for row in rows:
        tokens = int(row["prompt_tokens"]) + int(row["completion_tokens"])
        for scope, scope_id in (("key", row["key_id"]), ("team", row["team"]), ("project", row["project"])):
            if not scope_id:
                continue
            for period in PERIODS:
                acc = sums[(scope, scope_id, period, period_start(period, row["ts"]))]
                acc[0] += Decimal(row["cost_usd"])
                acc[1] += tokens
                acc[2] += 1
    return sums


def ordered_values(sums: dict[TotalKey, list[Decimal | int]]) -> list[dict[str, Any]]:
    """The rows to upsert, in the one lock order of spend_totals (scope, id, period, start).

    The UPSERT locks rows in the order given; accounting replicas (and ingress's budget holds, which sort the
    same way) that all lock shared team and project rows in one order can wait for each other but never
    deadlock.
    """
    return [{"scope": k[0], "scope_id": k[1], "period": k[2], "period_start": k[3], "cost_usd": v[0],
             "tokens": v[1], "requests": v[2]} for k, v in sorted(sums.items())]


async def _budgets_for(conn: AsyncConnection, scopes: set[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    found: dict[tuple[str, str], Any] = {}
    key_ids = [sid for scope, sid in scopes if scope == "key"]
    if key_ids:
        rows = await conn.execute(select(virtual_keys.c.key_id, virtual_keys.c.budget_usd,
                                         virtual_keys.c.budget_period, virtual_keys.c.alert_thresholds)
                                  .where(virtual_keys.c.key_id.in_(key_ids), virtual_keys.c.budget_usd.is_not(None)))
        for r in rows:
            found[("key", r.key_id)] = (Decimal(r.budget_usd), r.budget_period or "month", list(r.alert_thresholds))
    others = [(scope, sid) for scope, sid in scopes if scope != "key"]
    if others:
        scoped = await conn.execute(select(budgets).where(or_(*[and_(budgets.c.scope == s, budgets.c.scope_id == i)
                                                                for s, i in others])))
        for b in scoped.mappings():
            found[(b["scope"], b["scope_id"])] = (Decimal(b["budget_usd"]), b["budget_period"],
                                                  list(b["alert_thresholds"]))
    return found


_TOTALS_COLUMNS = ("scope", "scope_id", "period", "period_start", "cost_usd", "tokens", "requests")

_ADD_TO_TOTALS = text(
    f"INSERT INTO spend_totals ({', '.join(_TOTALS_COLUMNS)}) {unnest_rows(spend_totals, _TOTALS_COLUMNS)} "
    "ON CONFLICT (scope, scope_id, period, period_start) DO UPDATE SET "
    "cost_usd = spend_totals.cost_usd + EXCLUDED.cost_usd, tokens = spend_totals.tokens + EXCLUDED.tokens, "
    "requests = spend_totals.requests + EXCLUDED.requests "
    "RETURNING scope, scope_id, period, period_start, cost_usd")
"""Add a batch's sums to the totals, in the order given (`ordered_values`): one statement for any number."""


async def update_totals(conn: AsyncConnection, rows: list[dict[str, Any]]) -> list[KeyEvent]:
    """Add new rows to the totals (inside the caller's transaction); returns budget events to publish."""
    sums = aggregate(rows)
    if not sums:
        return []
    values = column_arrays(spend_totals, _TOTALS_COLUMNS, ordered_values(sums))
    totals = (await conn.execute(_ADD_TO_TOTALS, values)).all()
    limits = await _budgets_for(conn, {(k[0], k[1]) for k in sums})
    events: list[KeyEvent] = []
    for scope, scope_id, period, start, total in totals:
        limit = limits.get((scope, scope_id))
        if limit is None or limit[1] != period:
            continue
        amount, _, thresholds = limit
        new = Decimal(total)
        old = new - Decimal(sums[(scope, scope_id, period, start)][0])
        until = period_end(period, start).timestamp()
        target = f"{scope}:{scope_id}"
        if old < amount <= new:
            log.warning("budget exceeded", extra={"scope": target, "total_usd": float(new), "budget": float(amount)})
            events.append(KeyEvent(key_id=target, action="budget_exceeded", detail={
                "until": until, "reason": f"{period} budget of ${amount}", "total_usd": float(new)}))
        for fraction in thresholds:
            mark = amount * Decimal(str(fraction))
            if old < mark <= new and mark < amount:
                log.warning("budget alert", extra={"scope": target, "fraction": fraction, "total_usd": float(new)})
                events.append(KeyEvent(key_id=target, action="budget_alert", detail={
                    "fraction": fraction, "total_usd": float(new), "budget_usd": float(amount), "period": period}))
    return events
