"""Per-key RPM / TPM limits that hold across ingress replicas: a counter table with batched reservations.

Each replica reserves a block of the current minute's allowance for a key from PostgreSQL
(one atomic UPSERT, one round trip, for up to `BLOCK_FRACTION` of the limit) and spends it locally, so the
database sees one round trip per block, not per request, and the replicas together can
never admit more than the limit per window: a reservation never takes the counter past it.
Unused reservations lapse with their window (replicas may under-admit by at most one block
each). Tokens are reserved by estimate (prompt plus `max_tokens` or 256, times `n`) and corrected by the
actual usage afterwards: usage beyond the estimate is charged to the shared counter, so no replica forgives it.
Rows of ended windows are deleted (every `PRUNE_EVERY_S` by each replica).
Parallel requests are counted per replica.

When PostgreSQL is unreachable (or a reservation fails or times out), a replica limits on its
own count instead of failing the request: it spends what it had reserved, then admits up to
`local_share` of the limit per window counting everything it admitted in that window
(SWITCHYARD_LOCAL_LIMIT_SHARE, default 1.0: the whole limit, so one replica alone keeps the limit
and N replicas admit at most N x the limit; set 1/N to keep N replicas within it, at the price of
under-admitting when traffic is uneven). It logs one warning per outage, probes PostgreSQL again
every `RETRY_DB_S`, and on the first reservation that succeeds adds what it admitted unreserved in
that window to the shared counter, so the other replicas see it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from switchyard.services.ingress.database import DATABASE_ERRORS, DatabaseOutage
from switchyard.shared.errors import GatewayError
from switchyard.shared.pg import Database, Query
from switchyard.shared.service import BackgroundTasks

log = logging.getLogger("switchyard.ingress.limits")

WINDOW_S = 60
BLOCK_FRACTION = 0.05
RESERVE_TIMEOUT_S = 3.0
"""Bound on one reservation (the database's connect/command timeouts come first); past it, count locally."""
PRUNE_EVERY_S = 60.0
"""How often a replica deletes the counter rows of ended windows."""
RETRY_DB_S = 2.0
"""While PostgreSQL is unreachable, one reservation every this many seconds probes it; others count locally."""
LOCAL_SHARE_ENV = "SWITCHYARD_LOCAL_LIMIT_SHARE"

_RESERVE = Query("""
INSERT INTO rate_counters AS c (key_id, kind, window_start, used, granted)
VALUES (:key_id, :kind, :window,
        CAST(:add AS bigint) + LEAST(CAST(:want AS bigint), GREATEST(0, CAST(:limit AS bigint) - :add)),
        LEAST(CAST(:want AS bigint), GREATEST(0, CAST(:limit AS bigint) - :add)))
ON CONFLICT (key_id, kind, window_start) DO UPDATE
SET used = c.used + CAST(:add AS bigint)
           + LEAST(CAST(:want AS bigint), GREATEST(0, CAST(:limit AS bigint) - c.used - :add)),
    granted = LEAST(CAST(:want AS bigint), GREATEST(0, CAST(:limit AS bigint) - c.used - :add))
RETURNING c.used, c.granted
""")
"""A reservation: add what is owed, grant what the limit still allows (at most `want`), in one statement."""

_PRUNE = Query("DELETE FROM rate_counters WHERE window_start < :before")


def local_share_from_env() -> float:
    value = float(os.environ.get(LOCAL_SHARE_ENV) or 1.0)
    if not 0 < value <= 1:
        raise ValueError(f"{LOCAL_SHARE_ENV} must be in (0, 1], not {value}")
    return value


@dataclass
class Allowance:
    window: int = 0
    local: int = 0
    """Reserved for this replica and not yet spent."""
    used_global: int = 0
    """The shared counter after this replica's last reservation (for the remaining-header)."""
    spent: int = 0
    """What this replica admitted in this window (reserved or not): its local count."""
    unreserved: int = 0
    """Admitted while PostgreSQL was unreachable beyond what was reserved: added to the counter later."""
    local_cap: int | None = None
    """Set while the last admission was on the local count (PostgreSQL unreachable): the local limit."""

    def reset(self, window: int) -> None:
        self.window, self.local, self.used_global, self.spent, self.unreserved = window, 0, 0, 0, 0
        self.local_cap = None


def _window(now: float) -> int:
    return int(now // WINDOW_S) * WINDOW_S


class RateLimiter:
    def __init__(self, database: Database, local_share: float | None = None) -> None:
        self.database = database
        """Used on the request path: give it short connect/command/pool timeouts."""
        self.local_share = local_share_from_env() if local_share is None else local_share
        self._allowances: dict[tuple[str, str], Allowance] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._in_flight: dict[str, int] = {}
        self._background = BackgroundTasks()
        self._pruned_at = 0.0
        self.outage = DatabaseOutage(log, "rate limits", f"each key is limited on this replica's own count "
                                     f"({self.local_share:g} of its limit per minute) until it answers",
                                     retry_s=RETRY_DB_S)

    async def _reserve(self, key_id: str, kind: str, window: int, want: int, limit: int,
                       unreserved: int = 0) -> tuple[int, int]:
        """Atomically take up to `want` from the shared counter, first adding `unreserved` (what this replica
        admitted or was charged on its own count: outage admissions, TPM corrections); returns (granted, counter
        after). One statement (committed by itself), one round trip: the row lock of the UPSERT serialises replicas."""
        params = {"key_id": key_id, "kind": kind, "window": datetime.fromtimestamp(window, UTC), "limit": limit,
                  "want": want, "add": unreserved}
        row = await self.database.fetchrow(_RESERVE, params)
        assert row is not None  # an UPSERT returns its row
        return int(row["granted"]), int(row["used"])

    async def _prune(self, now: float) -> None:
        """Delete counter rows of windows that ended (kept one extra window for late corrections)."""
        try:
            await self.database.execute(_PRUNE, {"before": datetime.fromtimestamp(_window(now) - WINDOW_S, UTC)})
        except DATABASE_ERRORS as e:
            self.outage.failed(e)

    def _maybe_prune(self, now: float) -> None:
        if now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        self._background.spawn(self._prune(now))

    async def drain(self) -> None:
        """Wait for the background work under way (corrections to the shared counter, pruning)."""
        await self._background.drain()

    async def _try_reserve(self, key_id: str, kind: str, window: int, want: int, limit: int,
                           unreserved: int) -> tuple[int, int] | None:
        """`_reserve`, or None when PostgreSQL is unreachable (known down, failing, or too slow)."""
        if not self.outage.may_try():
            return None
        try:
            result = await asyncio.wait_for(self._reserve(key_id, kind, window, want, limit, unreserved),
                                            RESERVE_TIMEOUT_S)
        except DATABASE_ERRORS as e:
            self.outage.failed(e)
            return None
        self.outage.recovered()
        return result

    def local_cap(self, limit: int) -> int:
        """What one replica admits per window on its own count while PostgreSQL is unreachable."""
        return max(1, math.floor(limit * self.local_share))

    async def take(self, key_id: str, kind: str, limit: int, amount: int, now: float | None = None) -> Allowance:
        """Spend `amount` of this minute's allowance, reserving a block when the local share runs out."""
        now = now or time.time()
        window = _window(now)
        self._maybe_prune(now)
        lock = self._locks.setdefault((key_id, kind), asyncio.Lock())
        async with lock:
            allowance = self._allowances.setdefault((key_id, kind), Allowance())
            if allowance.window != window:
                allowance.reset(window)
            if allowance.local < amount:
                block = max(amount - allowance.local, math.ceil(limit * BLOCK_FRACTION))
                reserved = await self._try_reserve(key_id, kind, window, block, limit, allowance.unreserved)
                if reserved is None:
                    return self._take_locally(allowance, kind, limit, amount, now)
                granted, allowance.used_global = reserved
                allowance.local += granted
                allowance.unreserved, allowance.local_cap = 0, None
            if allowance.local < amount:
                raise self._limited(kind, limit, allowance, now)
            allowance.local -= amount
            allowance.spent += amount
            return allowance

    def _take_locally(self, allowance: Allowance, kind: str, limit: int, amount: int, now: float) -> Allowance:
        """PostgreSQL is unreachable: admit on this replica's own count, up to `local_share` of the limit."""
        allowance.local_cap = self.local_cap(limit)
        if allowance.spent + amount > allowance.local_cap:
            raise self._limited(kind, limit, allowance, now)
        covered = min(max(allowance.local, 0), amount)
        allowance.local -= covered
        allowance.unreserved += amount - covered
        allowance.spent += amount
        return allowance

    def _limited(self, kind: str, limit: int, allowance: Allowance, now: float) -> GatewayError:
        reset = allowance.window + WINDOW_S - now
        unit = "requests" if kind == "requests" else "tokens"
        return GatewayError(429, f"Rate limit reached for this key: {limit} {unit} per minute. "
                            f"Try again in {math.ceil(reset)}s.", code="rate_limit_exceeded",
                            retry_after_s=reset, headers=self.headers(kind, limit, allowance, now))

    def correct(self, key_id: str, delta_tokens: int) -> None:
        """Apply actual usage minus the admission estimate to the key's token allowance, across replicas.

        Tokens used beyond the estimate come first out of this replica's unspent reservation; the rest is
        added to the shared counter at once (in the background), so every replica's next reservation sees
        it and the excess is never forgiven. Tokens estimated but not used are kept by this replica.
        """
        allowance = self._allowances.get((key_id, "tokens"))
        if allowance is None or allowance.window != _window(time.time()) or not delta_tokens:
            return
        allowance.spent += delta_tokens
        if delta_tokens < 0:
            allowance.local -= delta_tokens
            return
        covered = min(max(allowance.local, 0), delta_tokens)
        allowance.local -= covered
        if delta_tokens > covered:
            self._background.spawn(self._charge(key_id, allowance.window, delta_tokens - covered))

    async def _charge(self, key_id: str, window: int, tokens: int) -> None:
        """Add `tokens` to the shared counter (under the key's lock, like a reservation); while PostgreSQL is
        unreachable they wait in `unreserved` and go with this replica's next reservation."""
        async with self._locks.setdefault((key_id, "tokens"), asyncio.Lock()):
            allowance = self._allowances.get((key_id, "tokens"))
            if allowance is None or allowance.window != window:
                return
            charged = await self._try_reserve(key_id, "tokens", window, 0, 0, allowance.unreserved + tokens)
            if charged is None:
                allowance.unreserved += tokens
            else:
                allowance.used_global, allowance.unreserved = charged[1], 0

    @staticmethod
    def headers(kind: str, limit: int, allowance: Allowance, now: float | None = None) -> dict[str, str]:
        now = now or time.time()
        if allowance.local_cap is not None:  # counting locally: what this replica may still admit
            remaining = max(0, allowance.local_cap - allowance.spent)
        else:
            remaining = max(0, limit - allowance.used_global) + max(0, allowance.local)
        reset = max(0.0, allowance.window + WINDOW_S - now)
        return {f"x-ratelimit-limit-{kind}": str(limit), f"x-ratelimit-remaining-{kind}": str(min(limit, remaining)),
                f"x-ratelimit-reset-{kind}": f"{reset:.0f}s"}

    def enter(self, key_id: str, max_parallel: int | None) -> None:
        count = self._in_flight.get(key_id, 0)
        if max_parallel is not None and count >= max_parallel:
            raise GatewayError(429, f"Too many parallel requests for this key (limit {max_parallel}).",
                               code="max_parallel_requests", retry_after_s=1)
        self._in_flight[key_id] = count + 1

    def leave(self, key_id: str) -> None:
        count = self._in_flight.get(key_id, 0) - 1
        if count <= 0:
            self._in_flight.pop(key_id, None)
        else:
            self._in_flight[key_id] = count
