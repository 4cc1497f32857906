"""Budgets reserved at admission, so concurrent requests cannot overspend a budget without bound.

Accounting adds what each call cost to `spend_totals` after the call (and blocks the scope on `llm.keys`
once a total crosses its budget); that alone lets everything in flight, plus accounting's lag, overspend.
So ingress also holds each request's *estimated* cost on the same rows while it runs:

- **Admission.** For every budget that applies to the key (its own, its team's, its project's), one UPSERT
  adds the estimate to `spend_totals.reserved_usd` of the budget's current period, only where
  `cost_usd + reserved_usd + estimate <= budget`. If any scope refuses, the transaction rolls back and the
  request gets a 429 `budget_exceeded` naming the scope, before anything is sent downstream. The rows are
  taken in one fixed order (scope, id, period, start), the order accounting uses too, so replicas never
  deadlock on them.
- **Estimate.** Input tokens (characters / 4) plus `max_tokens` (or 256) for each of `n` choices, priced at
  the most expensive deployment of the model group and its fallbacks (shared/pricing.py). Unpriced models
  estimate 0 and hold nothing.
- **Settlement.** When the request ends, its hold is released `SETTLE_GRACE_S` later (accounting has
  written the actual cost by then, so the spend is never invisible in between; meanwhile it counts twice,
  which only refuses early).

The overshoot bound: the budget can be exceeded by at most the sum, over requests in flight or settled
less than `SETTLE_GRACE_S` before accounting wrote them, of (actual cost − estimated cost); it is 0 for
requests that set `max_tokens` and whose prompt is no larger than estimated. While PostgreSQL is
unreachable, admission holds nothing (one warning per outage) and the post-hoc block is the only limit.
A replica killed with requests in flight leaves their holds until the period ends (refusing early, never
overspending).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from switchyard.services.ingress.auth import Identity
from switchyard.services.ingress.database import DATABASE_ERRORS, DatabaseOutage
from switchyard.shared.config_schema import GatewayConfig
from switchyard.shared.contracts import Usage
from switchyard.shared.errors import GatewayError
from switchyard.shared.periods import period_end, period_start
from switchyard.shared.pg import Connection, Database, Query
from switchyard.shared.pricing import cost
from switchyard.shared.service import BackgroundTasks
from switchyard.shared.tokens import estimate_input_tokens, estimate_total_tokens

log = logging.getLogger("switchyard.ingress.budgets")

SETTLE_GRACE_ENV = "SWITCHYARD_BUDGET_SETTLE_S"
RESERVE_TIMEOUT_S = 3.0
BUDGETS_REFRESH_S = 10.0
"""How old the replica's copy of the budgets may get before a reservation reloads it."""

Row = tuple[str, str, str, datetime]
"""(scope, scope id, period, period start): one row of spend_totals."""

_RESERVE = Query("""
INSERT INTO spend_totals AS t (scope, scope_id, period, period_start, cost_usd, tokens, requests,
                               reserved_usd, budget_usd)
SELECT scope, scope_id, period, period_start, 0, 0, 0, CAST(:amount AS numeric), budget
FROM unnest(CAST(:scopes AS text[]), CAST(:ids AS text[]), CAST(:periods AS text[]),
            CAST(:starts AS timestamptz[]), CAST(:budgets AS numeric[]))
     WITH ORDINALITY AS u(scope, scope_id, period, period_start, budget, n)
WHERE CAST(:amount AS numeric) <= budget
ORDER BY n
ON CONFLICT (scope, scope_id, period, period_start) DO UPDATE
SET reserved_usd = t.reserved_usd + EXCLUDED.reserved_usd, budget_usd = EXCLUDED.budget_usd
WHERE t.cost_usd + t.reserved_usd + EXCLUDED.reserved_usd <= EXCLUDED.budget_usd
RETURNING t.scope, t.scope_id
""")
"""Hold `amount` on each row where it still fits its budget; the rows come in the caller's (sorted) order."""

_RELEASE = Query("""
UPDATE spend_totals AS t SET reserved_usd = GREATEST(0, t.reserved_usd - CAST(:amount AS numeric))
FROM (SELECT * FROM unnest(CAST(:scopes AS text[]), CAST(:ids AS text[]), CAST(:periods AS text[]),
                           CAST(:starts AS timestamptz[]))) AS v(scope, scope_id, period, period_start)
WHERE (t.scope, t.scope_id, t.period, t.period_start) = (v.scope, v.scope_id, v.period, v.period_start)
""")

_KEY_BUDGETS = Query("SELECT key_id, budget_usd, budget_period FROM virtual_keys WHERE budget_usd IS NOT NULL")
_BUDGETS = Query("SELECT scope, scope_id, budget_usd, budget_period FROM budgets")

Budgets = dict[tuple[str, str], tuple[Decimal, str]]
"""(scope, scope id) -> (amount in USD, period)."""


async def every_budget(conn: Connection) -> Budgets:
    """Every budget: keys' (a key's period is `month` unless it names one), teams' and projects'."""
    found: Budgets = {}
    for r in await conn.fetch(_KEY_BUDGETS):
        found[("key", r["key_id"])] = (Decimal(r["budget_usd"]), r["budget_period"] or "month")
    for b in await conn.fetch(_BUDGETS):
        found[(b["scope"], b["scope_id"])] = (Decimal(b["budget_usd"]), b["budget_period"])
    return found


class _Refused(Exception):
    """A scope refused the hold: rolls the transaction back (no scope holds anything)."""


def settle_grace_s() -> float:
    return float(os.environ.get(SETTLE_GRACE_ENV) or 5.0)


@dataclass(frozen=True)
class Hold:
    """What one admitted request holds: `amount` USD on each of `rows`."""

    rows: tuple[Row, ...]
    amount: Decimal


def _columns(rows: tuple[Row, ...]) -> dict[str, list[Any]]:
    return {"scopes": [r[0] for r in rows], "ids": [r[1] for r in rows], "periods": [r[2] for r in rows],
            "starts": [r[3] for r in rows]}


def estimate_cost(config: GatewayConfig, model: str, body: dict[str, Any]) -> Decimal:
    """The most the request may cost by its estimate, at the dearest deployment it may reach."""
    prompt = estimate_input_tokens(body)
    usage = Usage(prompt_tokens=prompt, completion_tokens=max(0, estimate_total_tokens(body) - prompt))
    names = [model, *(str(f) for f in body.get("fallbacks") or [])]
    group = config.group(model)
    if group is not None:
        names += group.fallbacks
    prices = [cost(d.provider, d.model, usage)[0] for name in names if (g := config.group(name)) is not None
              for d in g.deployments]
    return max(prices, default=Decimal(0))


class BudgetHolds:
    def __init__(self, database: Database, config: GatewayConfig, grace_s: float | None = None) -> None:
        self.database = database
        self.config = config
        self.grace_s = settle_grace_s() if grace_s is None else grace_s
        self._budgets: Budgets = {}
        self._loaded_at = -BUDGETS_REFRESH_S
        self._background = BackgroundTasks()
        self.outage = DatabaseOutage(log, "budget holds", "budgets are enforced only after spend is accounted "
                                     "until it answers", retry_s=2.0)

    async def _load(self) -> None:
        """Every budget (keys', teams', projects'), refreshed at most every BUDGETS_REFRESH_S."""
        if time.monotonic() - self._loaded_at < BUDGETS_REFRESH_S:
            return
        async with self.database.connection() as conn:
            found = await every_budget(conn)
        self._budgets, self._loaded_at = found, time.monotonic()

    def _rows(self, identity: Identity, now: datetime) -> list[tuple[Row, Decimal]]:
        scopes = [("key", identity.key_id), ("team", identity.metadata.get("team")),
                  ("project", identity.metadata.get("project"))]
        rows = []
        for scope, scope_id in scopes:
            found = self._budgets.get((scope, scope_id)) if scope_id else None
            if found is not None:
                rows.append(((scope, str(scope_id), found[1], period_start(found[1], now)), found[0]))
        return sorted(rows)  # the one lock order of spend_totals rows (accounting sorts the same way)

    async def reserve(self, identity: Identity, model: str, body: dict[str, Any]) -> Hold | None:
        """Hold the request's estimated cost on each budget of the key; a 429 when one would be exceeded."""
        if identity.is_master or not self.outage.may_try():
            return None
        amount = estimate_cost(self.config, model, body)
        if amount <= 0:
            return None
        try:
            async with asyncio.timeout(RESERVE_TIMEOUT_S):
                await self._load()
                now = datetime.now(UTC)
                wanted = self._rows(identity, now)
                if not wanted:
                    return None
                rows = tuple(r for r, _ in wanted)
                held: set[tuple[str, str]] = set()
                try:
                    async with self.database.transaction() as conn:
                        held = {(r["scope"], r["scope_id"]) for r in await conn.fetch(_RESERVE, {
                            **_columns(rows), "budgets": [b for _, b in wanted], "amount": amount})}
                        if len(held) < len(rows):
                            raise _Refused
                except _Refused:
                    pass  # rolled back: nothing is held
        except DATABASE_ERRORS as e:
            self.outage.failed(e)
            return None
        self.outage.recovered()
        refused = [(r, b) for r, b in wanted if (r[0], r[1]) not in held]
        if refused:
            (scope, scope_id, period, _), budget = refused[0]
            until = period_end(period, now)
            raise GatewayError(429, f"Budget exceeded for {scope} {scope_id} ({period} budget of ${budget}): this "
                               f"request's estimated cost of ${amount:.6f} does not fit what is left (spent, and held "
                               f"by requests in flight); the period resets at {until.isoformat()}.",
                               type="budget_exceeded", code="budget_exceeded",
                               retry_after_s=min(60.0, max(1.0, (until - now).total_seconds())))
        return Hold(rows, amount)

    def settle(self, hold: Hold | None) -> None:
        """Release the hold once accounting has had `grace_s` to write the actual cost (in the background)."""
        if hold is not None:
            self._background.spawn(self._release(hold, self.grace_s))

    async def _release(self, hold: Hold, after_s: float = 0.0) -> None:
        await asyncio.sleep(after_s)
        try:
            async with asyncio.timeout(RESERVE_TIMEOUT_S):
                await self.database.execute(_RELEASE, {**_columns(hold.rows), "amount": hold.amount})
        except DATABASE_ERRORS as e:
            self.outage.failed(e)  # the hold stays until the period ends: refuses early, never overspends

    async def drain(self) -> None:
        """Wait for the releases under way (each after its grace)."""
        await self._background.drain()
