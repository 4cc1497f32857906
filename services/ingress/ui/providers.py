"""What the Providers page knows that PostgreSQL does not: each deployment's breaker state as the routers hold
it, and how many requests wait in Kafka for each provider's worker pool.

Guarantees:
- Breaker states are the routers' own: they are read from the HealthBook this ingress routes first attempts by
  (services/ingress/first_attempt.py), which follows `llm.events` by the routers' rule. While it is not following
  (the broker is unreachable), the page says the state is unknown rather than guess.
- The backlog of a pool is its consumer group's lag: log end minus committed offset, summed over the pool's
  topics (`llm.provider.<name>` and its batch topic), so it counts what was produced and not yet finished,
  including requests a worker holds while pacing them. Measured at most every BACKLOG_TTL_S (one measurement
  shared by concurrent requests); a failed measurement gives `null` with the reason, never an error page.
"""

from __future__ import annotations

import asyncio
import logging
import time

from switchyard.services.ingress.first_attempt import FirstAttempt
from switchyard.shared import topics
from switchyard.shared.tansu import unfinished

log = logging.getLogger("switchyard.ingress.ui")
BACKLOG_TTL_S = 3.0
BACKLOG_TIMEOUT_S = 10.0


class ProviderWatch:
    """Breaker states and pool backlogs for the dashboard of one ingress process."""

    def __init__(self, bootstrap: str, health: FirstAttempt) -> None:
        self.bootstrap = bootstrap
        self.health = health
        self._measuring = asyncio.Lock()
        self._backlog: dict[str, int] = {}
        self._backlog_error: str | None = None
        self._backlog_at = float("-inf")

    def states(self, deployments: list[str]) -> dict[str, str] | None:
        """Each deployment's breaker state now (`closed`, `half-open`, `open`); None while `llm.events` is not
        being followed."""
        if not self.health.following:
            return None
        now = time.time()
        return {d: (h.state(now) if (h := self.health.book.deployments.get(d)) is not None else "closed")
                for d in deployments}

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
