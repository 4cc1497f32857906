"""Routing a request's first attempt at the edge: ingress picks the deployment and writes the envelope
straight to that provider's topic, so an interactive request crosses Kafka twice (to a worker, back to ingress)
instead of three times.

Guarantees:
- The decision is the routers' own (`shared/routing.py`) over the same deployment health: this replica follows
  `llm.events` into a HealthBook from the same replay window, with the same settings (shared/health_feed.py,
  SWITCHYARD_BREAKER_*), so it sees the cooldowns, probes and in-flight counts a router would. Its own
  decisions count as in flight here, and a worker's `start` event counts them for every router and replica.
- `start()` returns once the replay has caught up (or its timeout passed, with a warning), so the first request
  routed here already avoids a deployment that is cooling down.
- What routing refuses (no deployment fits, every one cooling down past the deadline) is the request's answer,
  raised as a GatewayError before anything is written; an unexpected fault in routing is a 500
  `routing_error`, never a crash.
- Everything after the first attempt is the routers': a failed attempt comes back to `llm.requests` with its
  history, and batch lines are written there too, so their pacing and retries are decided where they were.
- Following `llm.events` never stops ingress: a failure of the feed is logged and it is started afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from opentelemetry.trace import SpanKind

from switchyard.shared import tracing
from switchyard.shared.breaker import BreakerSettings, HealthBook
from switchyard.shared.config_schema import GatewayConfig
from switchyard.shared.contracts import RequestEnvelope, now_ms
from switchyard.shared.errors import GatewayError
from switchyard.shared.health_feed import HealthFeed
from switchyard.shared.routing import route

log = logging.getLogger("switchyard.ingress")
RESTART_S = 1.0


class FirstAttempt:
    """The deployment health this replica follows, and the first-attempt decision made from it."""

    def __init__(self, bootstrap: str, config: GatewayConfig) -> None:
        self.bootstrap = bootstrap
        self.config = config
        self.book = HealthBook(BreakerSettings.from_env())
        self.rng = random.Random()
        self._feed: HealthFeed | None = None
        self._follow: asyncio.Task[None] | None = None

    @property
    def following(self) -> bool:
        """Whether `llm.events` is being followed (since `start()`; the dashboard shows breaker states only then)."""
        return self._follow is not None and not self._follow.done()

    async def start(self) -> None:
        """Replay recent health and keep following it (aiokafka clients are made in the running loop)."""
        self._feed = HealthFeed(self.bootstrap, self.book, "ingress-events")
        await self._feed.start()
        self._follow = asyncio.create_task(self._keep_following(self._feed))

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
        if self._feed is not None:
            with contextlib.suppress(Exception):
                await self._feed.stop()

    async def _keep_following(self, feed: HealthFeed) -> None:
        while True:
            try:
                await feed.follow()
            except Exception as e:
                log.warning("following llm.events failed; starting afresh", extra={"error": repr(e)[:300]})
                with contextlib.suppress(Exception):
                    await feed.stop()
                await asyncio.sleep(RESTART_S)
                self._feed = feed = HealthFeed(self.bootstrap, self.book, "ingress-events")
                with contextlib.suppress(Exception):
                    await feed.start()

    def route(self, envelope: RequestEnvelope, parent: tracing.Hop | None) -> tuple[str, tracing.Hop]:
        """Decide the envelope's deployment (set on it) and return the provider topic it goes to, with the
        `route` span whose context the envelope carries there. Raises the request's answer when there is none."""
        context = parent.context if parent is not None else None
        hop = tracing.start("route", context, SpanKind.INTERNAL) if tracing.enabled() else tracing.Hop(None, context)
        try:
            decision = route(envelope, self.config, self.book, now_ms(), self.rng)
        except GatewayError as e:
            hop.end(error=e.code if e.code == "routing_error" else e.type)
            raise
        topic = decision.apply(envelope)
        hop.set(decision.span_attributes(envelope))
        hop.end()
        return topic, hop
