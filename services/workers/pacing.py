"""Provider pacing: each deployment's declared limits (RPM, TPM, max concurrent, per API key) are
kept by the workers, so the provider never sees more than it allows and the backlog waits in
Kafka instead of failing.

- Every API key of a deployment has its own sliding 60-second window of calls and tokens and
  its own concurrency count; calls rotate over the keys that have room.
- Several worker processes share a deployment's limits in proportion to the partitions each
  one owns (`share`): messages are spread evenly over partitions, so the shares add up to the
  whole limit.
- A key that got a 429 is paused for the provider's Retry-After.
- Interactive requests go first: a batch request waits while an interactive one is waiting for
  the same deployment. An interactive request that cannot get a slot before its deadline gets
  a retryable 429, so the router can send it elsewhere; batch requests wait as long as needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from shared.config import Deployment
from shared.contracts import RequestEnvelope
from shared.errors import GatewayError
from shared.metrics import PACING_QUEUE_DEPTH
from shared.tokens import estimate_total_tokens

WINDOW_S = 60.0
DEFAULT_PAUSE_S = 5.0


@dataclass
class KeyPace:
    key: str | None
    calls: deque[list[float]] = field(default_factory=deque)
    """[start time, tokens] of each call in the last window (tokens corrected after the call)."""
    in_flight: int = 0
    paused_until: float = 0.0

    def prune(self, now: float) -> None:
        while self.calls and self.calls[0][0] <= now - WINDOW_S:
            self.calls.popleft()

    def tokens(self) -> float:
        return sum(c[1] for c in self.calls)


@dataclass
class Lease:
    """One call's claim on a key: the key to use and its window entry (corrected after the call)."""

    pace: KeyPace
    entry: list[float]

    @property
    def key(self) -> str | None:
        return self.pace.key


@dataclass
class Limits:
    rpm: float | None
    tpm: float | None
    concurrent: float | None


@dataclass
class DeploymentPace:
    keys: list[KeyPace]
    next_index: int = 0
    interactive_waiting: int = 0
    waiting: int = 0
    """Requests of any priority waiting in `slot` for room under the limits (`switchyard_pacing_queue_depth`)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class Pacer:
    def __init__(self, share: Callable[[], float] = lambda: 1.0) -> None:
        self.share = share
        self._deployments: dict[str, DeploymentPace] = {}

    def _pace(self, dep: Deployment) -> DeploymentPace:
        pace = self._deployments.get(dep.id)
        if pace is None:
            keys = [KeyPace(k) for k in dep.all_api_keys()] or [KeyPace(None)]
            pace = self._deployments[dep.id] = DeploymentPace(keys)
        return pace

    def limits(self, dep: Deployment) -> Limits:
        share = self.share()

        def part(limit: int | None) -> float | None:
            return None if limit is None else max(1.0, math.floor(limit * share))

        return Limits(part(dep.rpm), part(dep.tpm), part(dep.max_concurrent))

    def _free_in(self, kp: KeyPace, limits: Limits, tokens: float, now: float) -> float:
        """Seconds until this key could take a call of `tokens` (0: now; inf: only when a call ends)."""
        kp.prune(now)
        wait = max(0.0, kp.paused_until - now)
        if limits.concurrent is not None and kp.in_flight >= limits.concurrent:
            wait = max(wait, math.inf)
        if limits.rpm is not None and len(kp.calls) >= limits.rpm:
            wait = max(wait, kp.calls[0][0] + WINDOW_S - now)
        if limits.tpm is not None and kp.tokens() + tokens > limits.tpm and kp.calls:
            freed, needed, i = 0.0, kp.tokens() + tokens - limits.tpm, 0
            while freed < needed and i < len(kp.calls):
                freed += kp.calls[i][1]
                i += 1
            wait = max(wait, kp.calls[i - 1][0] + WINDOW_S - now)
        return wait

    @asynccontextmanager
    async def slot(self, dep: Deployment, env: RequestEnvelope) -> AsyncIterator[Lease]:
        """Wait for a key with room under the deployment's limits; yields it for the call."""
        pace = self._pace(dep)
        tokens = float(estimate_total_tokens(env.body))
        interactive = env.priority == "interactive"
        if interactive:
            pace.interactive_waiting += 1
        pace.waiting += 1
        try:
            while True:
                now = time.time()
                limits = self.limits(dep)
                waits = []
                chosen = None
                for i in range(len(pace.keys)):
                    kp = pace.keys[(pace.next_index + i) % len(pace.keys)]
                    wait = self._free_in(kp, limits, tokens, now)
                    if wait == 0 and (interactive or pace.interactive_waiting == 0):
                        chosen = kp
                        pace.next_index = (pace.next_index + i + 1) % len(pace.keys)
                        break
                    waits.append(wait)
                if chosen is not None:
                    break
                wait = min(waits) if waits else 0.05  # inf: free only when a call ends
                if interactive and all(kp.paused_until > now for kp in pace.keys):
                    # The provider said stop on every key: let the router fail over now instead of waiting here.
                    raise GatewayError(429, f"Deployment {dep.id} is rate limited by the provider.",
                                       code="rate_limit_exceeded",
                                       retry_after_s=min(kp.paused_until for kp in pace.keys) - now)
                if interactive and now + (0.0 if wait == math.inf else wait) >= env.deadline_ms / 1000:
                    raise GatewayError(429, f"Deployment {dep.id} is at its configured rate limit.",
                                       code="rate_limit_exceeded", retry_after_s=1.0 if wait == math.inf else wait)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pace.changed.wait(), timeout=min(wait, 1.0))
        finally:
            pace.waiting -= 1
            if interactive:
                pace.interactive_waiting -= 1
        entry = [time.time(), tokens]
        chosen.calls.append(entry)
        chosen.in_flight += 1
        try:
            yield Lease(chosen, entry)
        finally:
            # Count the call from when it ended: the provider saw it somewhere in between, so its window
            # entry can only expire after ours (no 429 from sending the next call a little early).
            entry[0] = max(entry[0], time.time())
            chosen.in_flight -= 1
            pace.notify()

    @staticmethod
    def record_usage(lease: Lease, actual_tokens: int) -> None:
        """Replace the call's token estimate with what the provider reported."""
        lease.entry[1] = float(actual_tokens)

    def observe_failure(self, dep: Deployment, lease: Lease, error: GatewayError) -> None:
        if error.status == 429:
            lease.pace.paused_until = max(lease.pace.paused_until,
                                          time.time() + (error.retry_after_s or DEFAULT_PAUSE_S))
            self._pace(dep).notify()

    def export_depth(self) -> None:
        """Set `switchyard_pacing_queue_depth` per deployment (run at scrape time, not per request)."""
        for dep_id, pace in self._deployments.items():
            PACING_QUEUE_DEPTH.labels(dep_id).set(pace.waiting)

    def any_key_free(self, dep: Deployment) -> bool:
        now = time.time()
        return any(kp.paused_until <= now for kp in self._pace(dep).keys)
