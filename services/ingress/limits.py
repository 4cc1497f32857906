"""Per-key RPM / TPM limits that hold across ingress replicas: a counter table with batched reservations.

Each replica reserves a block of the current minute's allowance for a key from PostgreSQL
(one atomic UPDATE for up to `BLOCK_FRACTION` of the limit) and spends it locally, so the
database sees one round trip per block, not per request, and the replicas together can
never admit more than the limit per window: a reservation never takes the counter past it.
Unused reservations lapse with their window (replicas may under-admit by at most one block
each). Tokens are reserved by estimate and corrected by the actual usage afterwards.
Parallel requests are counted per replica.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.errors import GatewayError

WINDOW_S = 60
BLOCK_FRACTION = 0.05

@dataclass
class Allowance:
    window: int = 0
    local: int = 0
    """Reserved for this replica and not yet spent."""
    used_global: int = 0
    """The shared counter after this replica's last reservation (for the remaining-header)."""


def _window(now: float) -> int:
    return int(now // WINDOW_S) * WINDOW_S


class RateLimiter:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._allowances: dict[tuple[str, str], Allowance] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._in_flight: dict[str, int] = {}

    async def _reserve(self, key_id: str, kind: str, window: int, want: int, limit: int) -> tuple[int, int]:
        """Atomically take up to `want` from the shared counter; returns (granted, counter after)."""
        params = {"key_id": key_id, "kind": kind, "window": datetime.fromtimestamp(window, UTC), "limit": limit}
        async with self.engine.begin() as conn:
            await conn.execute(text("INSERT INTO rate_counters (key_id, kind, window_start, used) "
                                    "VALUES (:key_id, :kind, :window, 0) ON CONFLICT DO NOTHING"), params)
            before = int((await conn.execute(text(
                "SELECT used FROM rate_counters WHERE key_id = :key_id AND kind = :kind AND window_start = :window "
                "FOR UPDATE"), params)).scalar_one())
            granted = max(0, min(want, limit - before))
            if granted:
                await conn.execute(text("UPDATE rate_counters SET used = used + :granted WHERE key_id = :key_id "
                                        "AND kind = :kind AND window_start = :window"), {**params, "granted": granted})
        return granted, before + granted

    async def take(self, key_id: str, kind: str, limit: int, amount: int, now: float | None = None) -> Allowance:
        """Spend `amount` of this minute's allowance, reserving a block when the local share runs out."""
        now = now or time.time()
        window = _window(now)
        lock = self._locks.setdefault((key_id, kind), asyncio.Lock())
        async with lock:
            allowance = self._allowances.setdefault((key_id, kind), Allowance())
            if allowance.window != window:
                allowance.window, allowance.local, allowance.used_global = window, 0, 0
            if allowance.local < amount:
                block = max(amount - allowance.local, math.ceil(limit * BLOCK_FRACTION))
                granted, allowance.used_global = await self._reserve(key_id, kind, window, block, limit)
                allowance.local += granted
            if allowance.local < amount:
                reset = window + WINDOW_S - now
                unit = "requests" if kind == "requests" else "tokens"
                raise GatewayError(429, f"Rate limit reached for this key: {limit} {unit} per minute. "
                                   f"Try again in {math.ceil(reset)}s.", code="rate_limit_exceeded",
                                   retry_after_s=reset, headers=self.headers(kind, limit, allowance, now))
            allowance.local -= amount
            return allowance

    def correct(self, key_id: str, delta_tokens: int) -> None:
        """Apply actual usage minus the admission estimate to this replica's token allowance."""
        allowance = self._allowances.get((key_id, "tokens"))
        if allowance is not None and allowance.window == _window(time.time()):
            allowance.local -= delta_tokens

    @staticmethod
    def headers(kind: str, limit: int, allowance: Allowance, now: float | None = None) -> dict[str, str]:
        now = now or time.time()
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
