"""Deployment health, derived only from `llm.events`, so every router replica agrees and a restarted
router rebuilds it by re-reading the recent past.

Circuit breaker per deployment: it opens after `FAILURES_TO_OPEN` consecutive failures, or when
more than half of at least `MIN_SAMPLES` outcomes in the window failed; while open the deployment
is skipped for `COOLDOWN_S` (or the provider's Retry-After on a 429). After that it is half-open:
traffic flows again, one failure reopens it, one success closes it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from shared.contracts import AttemptEvent

FAILURES_TO_OPEN = 3
WINDOW_S = 30.0
MIN_SAMPLES = 10
COOLDOWN_S = 10.0
EWMA_ALPHA = 0.3


@dataclass
class DeploymentHealth:
    consecutive_failures: int = 0
    open_until: float = 0.0
    half_open: bool = False
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)
    latency_ms: float | None = None
    ttft_ms: float | None = None
    started: set[tuple[str, int]] = field(default_factory=set)

    @property
    def in_flight(self) -> int:
        return len(self.started)


class HealthBook:
    def __init__(self) -> None:
        self.deployments: dict[str, DeploymentHealth] = {}

    def get(self, deployment: str) -> DeploymentHealth:
        health = self.deployments.get(deployment)
        if health is None:
            health = self.deployments[deployment] = DeploymentHealth()
        return health

    def apply(self, event: AttemptEvent) -> None:
        h = self.get(event.deployment)
        key = (event.request_id, event.attempt)
        if event.phase == "start":
            if time.time() * 1000 - event.ts_ms < 600_000:
                h.started.add(key)
            return
        h.started.discard(key)
        at = event.ts_ms / 1000.0
        h.outcomes.append((at, event.ok))
        while h.outcomes and h.outcomes[0][0] < at - WINDOW_S:
            h.outcomes.popleft()
        if event.ok:
            h.consecutive_failures = 0
            h.half_open = False
            h.open_until = 0.0
            h.latency_ms = _ewma(h.latency_ms, event.latency_ms)
            if event.ttft_ms is not None:
                h.ttft_ms = _ewma(h.ttft_ms, event.ttft_ms)
            return
        if event.status in (400, 401, 403, 404) and event.error_type != "rate_limit_error":
            return  # the request's fault, or a config error: not a sign of an unhealthy deployment
        h.consecutive_failures += 1
        failures = sum(1 for _, ok in h.outcomes if not ok)
        ratio_trips = len(h.outcomes) >= MIN_SAMPLES and failures * 2 > len(h.outcomes)
        cooldown = COOLDOWN_S
        if event.status == 429 and event.retry_after_s:
            cooldown = event.retry_after_s
        if event.status == 429 or h.half_open or h.consecutive_failures >= FAILURES_TO_OPEN or ratio_trips:
            h.open_until = max(h.open_until, at + cooldown)
            h.half_open = True
        # A slow deployment's failures also count against its latency score.
        h.latency_ms = _ewma(h.latency_ms, max(event.latency_ms, h.latency_ms or 0.0))

    def available(self, deployment: str, now: float | None = None) -> bool:
        h = self.deployments.get(deployment)
        return h is None or (now or time.time()) >= h.open_until

    def cooldown_left(self, deployment: str, now: float | None = None) -> float:
        h = self.deployments.get(deployment)
        return 0.0 if h is None else max(0.0, h.open_until - (now or time.time()))


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + EWMA_ALPHA * (new - old)
