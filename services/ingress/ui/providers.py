"""What the Providers page knows that PostgreSQL does not: each deployment's breaker state as the routers hold
it, and how many requests wait in Kafka for each provider's worker pool.

Guarantees:
- Breaker states are the routers' own: this ingress follows `llm.events` into the same HealthBook the routers
  use (shared/breaker.py, shared/health_feed.py: same events, same replay window, same settings from
  SWITCHYARD_BREAKER_*), so it reaches the same state by the same rule. It starts following on the first
  Providers request (an ingress whose dashboard nobody opens reads no events) and stops with ingress.
- The backlog of a pool is its consumer group's lag: log end minus committed offset, summed over the pool's
  topics (`llm.provider.<name>` and its batch topic), so it counts what was produced and not yet finished,
  including requests a worker holds while pacing them. Measured at most every BACKLOG_TTL_S (one measurement
  shared by concurrent requests); a failed measurement gives `null` with the reason, never an error page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from switchyard.shared import topics
from switchyard.shared.breaker import BreakerSettings, HealthBook
from switchyard.shared.health_feed import HealthFeed
from switchyard.shared.tansu import unfinished

log = logging.getLogger("switchyard.ingress.ui")
BACKLOG_TTL_S = 3.0
BACKLOG_TIMEOUT_S = 10.0
FEED_START_TIMEOUT_S = 20.0


class ProviderWatch:
    """Breaker states and pool backlogs for the dashboard of one ingress process."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.book = HealthBook(BreakerSettings.from_env())
        self._feed: HealthFeed | None = None
        self._follow: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._measuring = asyncio.Lock()
        self._backlog: dict[str, int] = {}
        self._backlog_error: str | None = None
        self._backlog_at = float("-inf")

    async def states(self, deployments: list[str]) -> dict[str, str] | None:
        """Each deployment's breaker state now (`closed`, `half-open`, `open`); None when `llm.events` cannot
        be followed (the broker is unreachable): the page says the state is unknown rather than guess."""
        if not await self._ensure_feed():
            return None
        now = time.time()
        return {d: (h.state(now) if (h := self.book.deployments.get(d)) is not None else "closed")
                for d in deployments}

    async def _ensure_feed(self) -> bool:
        async with self._starting:
            if self._follow is not None and not self._follow.done():
                return True
            if self._feed is not None:  # the last one stopped (the broker went away): start afresh
                with contextlib.suppress(Exception):
                    await self._feed.stop()
                self._feed, self.book = None, HealthBook(self.book.settings)
            feed = HealthFeed(self.bootstrap, self.book, "ingress-events")
            try:
                await asyncio.wait_for(feed.start(), FEED_START_TIMEOUT_S)
            except Exception as e:
                log.warning("cannot follow llm.events for the dashboard", extra={"error": repr(e)[:300]})
                with contextlib.suppress(Exception):
                    await feed.stop()
                return False
            self._feed = feed
            self._follow = asyncio.create_task(feed.follow())
            return True

    async def backlogs(self, providers: list[str]) -> tuple[dict[str, int], str | None]:
        """Messages not yet finished per provider pool (by provider name), and the error of the last failed
        measurement (None when it succeeded); cached for BACKLOG_TTL_S."""
        async with self._measuring:
            if time.monotonic() - self._backlog_at >= BACKLOG_TTL_S:
                groups = {topics.worker_group(p): [topics.provider_topic(p), topics.provider_topic(p, batch=True)]
                          for p in providers}
                try:
                    lag = await unfinished(self.bootstrap, groups, timeout_s=BACKLOG_TIMEOUT_S)
                    self._backlog = {p: lag[topics.worker_group(p)] for p in providers}
                    self._backlog_error = None
                except Exception as e:
                    log.warning("cannot measure the worker pools' backlog", extra={"error": repr(e)[:300]})
                    self._backlog, self._backlog_error = {}, "The broker did not answer; try again shortly."
                self._backlog_at = time.monotonic()
            return dict(self._backlog), self._backlog_error

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._follow
        if self._feed is not None:
            with contextlib.suppress(Exception):
                await self._feed.stop()
