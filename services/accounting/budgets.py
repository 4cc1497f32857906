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

from switchyard.shared.contracts import KeyEvent
from switchyard.shared.periods import PERIODS, period_end, period_start
from switchyard.shared.pg import Column, Connection, Query, column_arrays, unnest_rows

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


_KEY_BUDGETS = Query("SELECT key_id, budget_usd, budget_period, alert_thresholds FROM virtual_keys "
                     "WHERE key_id = ANY(:key_ids) AND budget_usd IS NOT NULL")
_SCOPE_BUDGETS = Query("SELECT b.scope, b.scope_id, b.budget_usd, b.budget_period, b.alert_thresholds "
                       "FROM budgets b JOIN unnest(CAST(:scopes AS text[]), CAST(:ids AS text[])) AS s(scope, id) "
                       "ON b.scope = s.scope AND b.scope_id = s.id")


async def _budgets_for(conn: Connection, scopes: set[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    found: dict[tuple[str, str], Any] = {}
    key_ids = [sid for scope, sid in scopes if scope == "key"]
    if key_ids:
        for r in await conn.fetch(_KEY_BUDGETS, {"key_ids": key_ids}):
            found[("key", r["key_id"])] = (Decimal(r["budget_usd"]), r["budget_period"] or "month",
                                           list(r["alert_thresholds"]))
    others = [(scope, sid) for scope, sid in scopes if scope != "key"]
    if others:
        params = {"scopes": [scope for scope, _ in others], "ids": [sid for _, sid in others]}
        for b in await conn.fetch(_SCOPE_BUDGETS, params):
            found[(b["scope"], b["scope_id"])] = (Decimal(b["budget_usd"]), b["budget_period"],
                                                  list(b["alert_thresholds"]))
    return found


TOTALS_COLUMNS: tuple[Column, ...] = (
    ("scope", "text"), ("scope_id", "text"), ("period", "text"), ("period_start", "timestamp with time zone"),
    ("cost_usd", "numeric(20,10)"), ("tokens", "bigint"), ("requests", "bigint"))
"""The columns of spend_totals (shared/db.py) a batch adds to."""

_ADD_TO_TOTALS = Query(
    f"INSERT INTO spend_totals ({', '.join(name for name, _ in TOTALS_COLUMNS)}) {unnest_rows(TOTALS_COLUMNS)} "
    "ON CONFLICT (scope, scope_id, period, period_start) DO UPDATE SET "
    "cost_usd = spend_totals.cost_usd + EXCLUDED.cost_usd, tokens = spend_totals.tokens + EXCLUDED.tokens, "
    "requests = spend_totals.requests + EXCLUDED.requests "
    "RETURNING scope, scope_id, period, period_start, cost_usd")
"""Add a batch's sums to the totals, in the order given (`ordered_values`): one statement for any number."""


async def update_totals(conn: Connection, rows: list[dict[str, Any]]) -> list[KeyEvent]:
    """Add new rows to the totals (inside the caller's transaction); returns budget events to publish."""
    sums = aggregate(rows)
    if not sums:
        return []
    totals = await conn.fetch(_ADD_TO_TOTALS, column_arrays(TOTALS_COLUMNS, ordered_values(sums)))
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
