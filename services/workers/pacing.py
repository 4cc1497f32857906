"""Provider pacing: each deployment's declared limits (RPM, TPM, max concurrent, per API key) are
kept by the workers, so the provider never sees more than it allows and the backlog waits in
Kafka instead of failing.

- Every API key of a deployment has its own sliding 60-second window of calls and tokens and
  its own concurrency count; calls rotate over the keys that have room. A call counts while it
  runs and for 60 s after it ends (the provider saw it somewhere in between). Ended calls enter
  the window in the order they end, on a monotonic clock, so the window stays in time order and
  a long call never holds up the expiry of the calls behind it.
- Several worker processes share a deployment's limits by the partitions each one owns: the
  limit is split over the partitions (`part_of`), so the parts of all owners add up to the limit
  exactly, never more. A process that owns no partition (during a rebalance) starts nothing. A
  process whose part rounds to 0 (a limit smaller than the number of workers) starts nothing on
  that limit: keep limits at least the number of worker processes.
- A deployment without RPM and TPM limits keeps no window: only its concurrency, if limited, and 429
  pauses apply.
- A key that got a 429 is paused for the provider's Retry-After.
- Waiters queue per deployment, interactive before batch, first come first served; only the
  head of the queue looks for room, and a call's end wakes only the head (which wakes the next
  when it got a slot), so a call end costs O(1) wake-ups and the token sums are kept running.
- An interactive request waits for a slot at most `interactive_wait_s`, and never past half the
  time it had left when it arrived: then it gets a retryable 429 while there is still time for
  the router to send it elsewhere. Batch requests wait as long as needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from switchyard.shared.config_schema import Deployment
from switchyard.shared.contracts import RequestEnvelope
from switchyard.shared.errors import GatewayError
from switchyard.shared.metrics import PACING_QUEUE_DEPTH
from switchyard.shared.tokens import estimate_total_tokens

WINDOW_S = 60.0
DEFAULT_PAUSE_S = 5.0
INTERACTIVE_WAIT_S = 10.0
"""The longest an interactive request waits for room before it is handed back to the router."""


def part_of(limit: int, owned: Collection[int], partitions: int) -> int:
    """This process's part of `limit` when it owns `owned` of `partitions`: the limit is split over the
    partitions (the remainder spread evenly over them), so the parts of all owners sum to the limit."""
    base, extra = divmod(limit, partitions)
    bonus = {(j * partitions) // extra for j in range(extra)} if extra else set()
    return sum(base + (1 if p in bonus else 0) for p in owned if 0 <= p < partitions)


@dataclass
class KeyPace:
    key: str | None
    ended: deque[tuple[float, float]] = field(default_factory=deque)
    """(end time, tokens) of each call that ended in the last window, in end order."""
    ended_tokens: float = 0.0
    in_flight: int = 0
    in_flight_tokens: float = 0.0
    paused_until: float = 0.0

    def prune(self, now: float) -> None:
        while self.ended and self.ended[0][0] <= now - WINDOW_S:
            self.ended_tokens -= self.ended.popleft()[1]
        if not self.ended:
            self.ended_tokens = 0.0  # no float drift

    def calls(self) -> int:
        return len(self.ended) + self.in_flight

    def tokens(self) -> float:
        return self.ended_tokens + self.in_flight_tokens


@dataclass
class Lease:
    """One call's claim on a key: the key to use and the call's token count (corrected after the call)."""

    pace: KeyPace
    tokens: float

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
    waiters: dict[bool, deque[asyncio.Future[None]]] = field(
        default_factory=lambda: {True: deque(), False: deque()})
    """Who waits for a slot: interactive (True) and batch (False), each first come first served."""

    def head(self) -> asyncio.Future[None] | None:
        for queue in (self.waiters[True], self.waiters[False]):
            if queue:
                return queue[0]
        return None

    def notify(self) -> None:
        """Wake the head of the queue (it wakes the next when it gets a slot)."""
        head = self.head()
        if head is not None and not head.done():
            head.set_result(None)


class Pacer:
    def __init__(self, owned: Callable[[], Collection[int] | None] = lambda: None, partitions: int = 1,
                 clock: Callable[[], float] = time.monotonic, interactive_wait_s: float = INTERACTIVE_WAIT_S) -> None:
        """`owned`: the partitions this process owns (None: it is alone and takes whole limits)."""
        self.owned = owned
        self.partitions = partitions
        self.clock = clock
        self.interactive_wait_s = interactive_wait_s
        self._deployments: dict[str, DeploymentPace] = {}

    def _pace(self, dep: Deployment) -> DeploymentPace:
        pace = self._deployments.get(dep.id)
        if pace is None:
            keys = [KeyPace(k) for k in dep.all_api_keys()] or [KeyPace(None)]
            pace = self._deployments[dep.id] = DeploymentPace(keys)
        return pace

    def limits(self, dep: Deployment) -> Limits:
        owned = self.owned()

        def part(limit: int | None) -> float | None:
            return None if limit is None else float(limit if owned is None else
                                                    part_of(limit, owned, self.partitions))

        return Limits(part(dep.rpm), part(dep.tpm), part(dep.max_concurrent))

    def _free_in(self, kp: KeyPace, limits: Limits, tokens: float, now: float) -> float:
        """Seconds until this key could take a call of `tokens` (0: now; inf: only when a call ends or the
        process's part grows)."""
        kp.prune(now)
        wait = max(0.0, kp.paused_until - now)
        if limits.concurrent is not None and kp.in_flight >= limits.concurrent:
            return math.inf
        if limits.rpm is not None and kp.calls() >= limits.rpm:
            if kp.in_flight >= limits.rpm or not kp.ended:
                return math.inf
            wait = max(wait, kp.ended[kp.calls() - int(limits.rpm)][0] + WINDOW_S - now)
        if limits.tpm is not None and kp.tokens() + tokens > limits.tpm:
            needed, freed = kp.tokens() + tokens - limits.tpm, 0.0
            for end, spent in kp.ended:
                freed += spent
                if freed >= needed:
                    return max(wait, end + WINDOW_S - now)
            return math.inf  # only calls in flight (or a call larger than the part) can free it
        return wait

    def _choose(self, pace: DeploymentPace, limits: Limits, tokens: float, now: float) -> tuple[KeyPace | None,
                                                                                               float]:
        waits = []
        for i in range(len(pace.keys)):
            kp = pace.keys[(pace.next_index + i) % len(pace.keys)]
            wait = self._free_in(kp, limits, tokens, now)
            if wait == 0:
                pace.next_index = (pace.next_index + i + 1) % len(pace.keys)
                return kp, 0.0
            waits.append(wait)
        return None, min(waits)

    @asynccontextmanager
    async def slot(self, dep: Deployment, env: RequestEnvelope) -> AsyncIterator[Lease]:
        """Wait for a key with room under the deployment's limits; yields it for the call."""
        pace = self._pace(dep)
        # A deployment without RPM or TPM limits keeps no window: nothing reads it, and at a thousand calls a
        # second a minute of ended calls is tens of thousands of entries held for nothing.
        windowed = dep.rpm is not None or dep.tpm is not None
        tokens = float(estimate_total_tokens(env.body))
        interactive = env.priority == "interactive"
        arrived = self.clock()
        give_up = arrived + min(self.interactive_wait_s, max(0.0, (env.deadline_ms / 1000 - time.time()) / 2))
        me: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = pace.waiters[interactive]
        queue.append(me)
        chosen: KeyPace | None = None
        try:
            while True:
                now = self.clock()
                wait = math.inf
                if pace.head() is me:
                    chosen, wait = self._choose(pace, self.limits(dep), tokens, now)
                    if chosen is not None:
                        break
                if interactive:
                    if all(kp.paused_until > now for kp in pace.keys):
                        # The provider said stop on every key: let the router fail over now instead of waiting.
                        raise GatewayError(429, f"Deployment {dep.id} is rate limited by the provider.",
                                           code="rate_limit_exceeded",
                                           retry_after_s=min(kp.paused_until for kp in pace.keys) - now)
                    if now + wait > give_up or now >= give_up:
                        raise GatewayError(429, f"Deployment {dep.id} is at its configured rate limit.",
                                           code="rate_limit_exceeded",
                                           retry_after_s=1.0 if wait == math.inf else max(wait, 0.1))
                    wait = min(wait, give_up - now)
                if me.done():  # woken before: wait on a fresh future in the same place in the queue
                    fresh = asyncio.get_running_loop().create_future()
                    queue[queue.index(me)], me = fresh, fresh
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(me), timeout=None if wait == math.inf else wait)
        finally:
            with contextlib.suppress(ValueError):
                queue.remove(me)
            if chosen is not None or pace.head() is not None:
                pace.notify()  # the next waiter looks (there may be room for it too, or we gave up the head)
        assert chosen is not None
        chosen.in_flight += 1
        chosen.in_flight_tokens += tokens
        lease = Lease(chosen, tokens)
        try:
            yield lease
        finally:
            chosen.in_flight -= 1
            chosen.in_flight_tokens -= lease.tokens
            if windowed:
                chosen.ended.append((self.clock(), lease.tokens))
                chosen.ended_tokens += lease.tokens
            pace.notify()

    def record_usage(self, lease: Lease, actual_tokens: int) -> None:
        """Replace the call's token estimate with what the provider reported (the call is still in flight)."""
        lease.pace.in_flight_tokens += float(actual_tokens) - lease.tokens
        lease.tokens = float(actual_tokens)

    def observe_failure(self, dep: Deployment, lease: Lease, error: GatewayError) -> None:
        if error.status == 429:
            lease.pace.paused_until = max(lease.pace.paused_until,
                                          self.clock() + (error.retry_after_s or DEFAULT_PAUSE_S))
            self._pace(dep).notify()

    def export_depth(self) -> None:
        """Set `switchyard_pacing_queue_depth` per deployment (run at scrape time, not per request)."""
        for dep_id, pace in self._deployments.items():
            PACING_QUEUE_DEPTH.labels(dep_id).set(len(pace.waiters[True]) + len(pace.waiters[False]))

    def any_key_free(self, dep: Deployment) -> bool:
        now = self.clock()
        return any(kp.paused_until <= now for kp in self._pace(dep).keys)
