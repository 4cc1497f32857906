"""Deployment health, derived only from `llm.events`, so every router replica agrees and a restarted
router rebuilds it by re-reading the recent past. Pure state, no I/O: routers decide with it, and ingress's
dashboard follows the same events into its own book (shared/health_feed.py), so the state it shows is the
routers' own, not a guess from usage rows.

Circuit breaker per deployment, with three states:

- closed: traffic flows. It trips (opens) after `failures_to_open` consecutive failures, or when
  more than `error_ratio` of at least `min_samples` outcomes in the last `window_s` failed, or at
  once when a failure carries Retry-After / retry-after-ms (a 429, or a 503 that says when to come
  back). A 429 without it counts like any failure: with several API keys per deployment, one key's
  limit does not mean the deployment is full. Failures that are the request's own fault (400, 413,
  422) do not count.
- open: the deployment gets no traffic for `cooldown_s`, or for as long as the provider's
  Retry-After said (capped at `max_cooldown_s`).
- half-open: once the cooldown is over, one probe call is let through (per router replica; a
  worker's `start` event also marks the probe as taken for every replica). A success of a call that
  began after the trip closes the breaker and forgets the old outcomes; a failure opens it again.
  If the probe's outcome has not arrived within `probe_timeout_s`, another probe may go.

Times are event times (the worker's clock, seconds), so a router that replays old events ends up
in the same state as one that saw them live. In-flight counts (least-busy) come from workers'
`start` events and from this router's own routing decisions, keyed by (request id, attempt) so
both count once; the `end` event clears them. Workers send a `start` event only where a replica needs
it: for a least-busy group's calls and for probes (`RequestEnvelope.announce_start`, set by routing).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

from switchyard.shared.contracts import AttemptEvent

CLIENT_FAULT_STATUSES = frozenset({400, 413, 422, 499})
"""Failures caused by the request itself (499: its client went away and the call was stopped): they
say nothing about the deployment's health."""


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


MAX_STARTED = 100_000
"""The most calls without an outcome one deployment's entry remembers (the oldest are forgotten first)."""


@dataclass(frozen=True)
class BreakerSettings:
    """Tuning of the breaker and of latency scoring; `from_env()` reads the `SWITCHYARD_BREAKER_*` variables."""

    failures_to_open: int = 3
    window_s: float = 30.0
    min_samples: int = 10
    error_ratio: float = 0.5
    cooldown_s: float = 10.0
    max_cooldown_s: float = 600.0
    probe_timeout_s: float = 10.0
    ewma_alpha: float = 0.3
    latency_half_life_s: float = 10.0
    in_flight_ttl_s: float = 600.0

    @classmethod
    def from_env(cls) -> BreakerSettings:
        return cls(
            failures_to_open=int(_env_float("SWITCHYARD_BREAKER_FAILURES", cls.failures_to_open)),
            window_s=_env_float("SWITCHYARD_BREAKER_WINDOW_S", cls.window_s),
            min_samples=int(_env_float("SWITCHYARD_BREAKER_MIN_SAMPLES", cls.min_samples)),
            error_ratio=_env_float("SWITCHYARD_BREAKER_ERROR_RATIO", cls.error_ratio),
            cooldown_s=_env_float("SWITCHYARD_BREAKER_COOLDOWN_S", cls.cooldown_s),
            max_cooldown_s=_env_float("SWITCHYARD_BREAKER_MAX_COOLDOWN_S", cls.max_cooldown_s),
            probe_timeout_s=_env_float("SWITCHYARD_BREAKER_PROBE_TIMEOUT_S", cls.probe_timeout_s),
        )


@dataclass
class DeploymentHealth:
    consecutive_failures: int = 0
    opened_at: float = 0.0
    """When the breaker last tripped (0: closed). Only calls that began after this can close it."""
    open_until: float = 0.0
    """No traffic before this time (cooldown or Retry-After)."""
    probe_until: float = 0.0
    """While half-open: a probe is out until then, so other requests stay away."""
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)
    latency_ms: float | None = None
    ttft_ms: float | None = None
    sampled_at: float = 0.0
    started: dict[tuple[str, int], float] = field(default_factory=dict)
    """(request id, attempt) -> when the call started or was routed, for calls without an outcome yet."""

    @property
    def tripped(self) -> bool:
        return self.opened_at > 0.0

    def state(self, now: float) -> str:
        """`closed`, `open` (cooling down) or `half-open` (waiting for a probe's success)."""
        if now < self.open_until:
            return "open"
        return "half-open" if self.tripped else "closed"


class HealthBook:
    """Every deployment's breaker, latency and in-flight count, fed by `apply(event)`."""

    def __init__(self, settings: BreakerSettings | None = None) -> None:
        self.settings = settings or BreakerSettings()
        self.deployments: dict[str, DeploymentHealth] = {}

    def get(self, deployment: str) -> DeploymentHealth:
        health = self.deployments.get(deployment)
        if health is None:
            health = self.deployments[deployment] = DeploymentHealth()
        return health

    # ---- feeding ----------------------------------------------------------------------------------

    def apply(self, event: AttemptEvent) -> None:
        """Fold one attempt event into the deployment's state (events of a deployment arrive in order)."""
        s = self.settings
        h = self.get(event.deployment)
        key = (event.request_id, event.attempt)
        at = event.ts_ms / 1000.0
        if event.phase == "start":
            if time.time() - at < s.in_flight_ttl_s:
                self._note_start(h, key, at)
            if h.tripped and at >= h.open_until:
                h.probe_until = max(h.probe_until, at + s.probe_timeout_s)
            return
        h.started.pop(key, None)
        began = at - event.latency_ms / 1000.0
        if event.ok:
            self._record(h, at, True)
            h.latency_ms = self._peak_ewma(h.latency_ms, event.latency_ms)
            if event.ttft_ms is not None:
                h.ttft_ms = self._peak_ewma(h.ttft_ms, event.ttft_ms)
            h.sampled_at = max(h.sampled_at, at)
            if not h.tripped:
                h.consecutive_failures = 0
            elif began >= h.opened_at:
                # A call that began after the trip succeeded: the deployment is back.
                h.opened_at = h.open_until = h.probe_until = 0.0
                h.consecutive_failures = 0
                h.outcomes.clear()
                h.outcomes.append((at, True))
            return
        if event.status in CLIENT_FAULT_STATUSES:
            return
        self._record(h, at, False)
        h.consecutive_failures += 1
        if event.latency_ms > (h.latency_ms or 0.0):
            # A slow failure (a timeout) is also a latency sample; a fast one says nothing about speed.
            h.latency_ms = self._peak_ewma(h.latency_ms, event.latency_ms)
            h.sampled_at = max(h.sampled_at, at)
        if event.retry_after_s:
            # The provider said how long to stay away: honour it, whatever the counters say.
            self._trip(h, at, min(event.retry_after_s, s.max_cooldown_s))
            return
        failures = sum(1 for _, ok in h.outcomes if not ok)
        ratio_trips = len(h.outcomes) >= s.min_samples and failures > s.error_ratio * len(h.outcomes)
        if h.tripped:
            if began >= h.opened_at:
                self._trip(h, at, s.cooldown_s)  # the half-open probe (or a later call) failed: open again
        elif h.consecutive_failures >= s.failures_to_open or ratio_trips:
            self._trip(h, at, s.cooldown_s)

    def note_routed(self, deployment: str, request_id: str, attempt: int, now: float) -> None:
        """This router sent a call to `deployment`: count it in flight, and take the probe if half-open."""
        h = self.get(deployment)
        self._note_start(h, (request_id, attempt), now)
        if h.tripped and now >= h.open_until:
            h.probe_until = max(h.probe_until, now + self.settings.probe_timeout_s)

    def _note_start(self, h: DeploymentHealth, key: tuple[str, int], at: float) -> None:
        """Count a call in flight, and forget the oldest entries of calls that never ended: those past the TTL
        (entries are kept in insertion order, which is about time order, so this is amortised O(1)) and any
        beyond MAX_STARTED, so attempts whose outcome never comes cannot grow memory under any strategy."""
        h.started.pop(key, None)
        h.started[key] = at
        ttl = self.settings.in_flight_ttl_s
        while h.started:
            oldest_key = next(iter(h.started))
            if len(h.started) <= MAX_STARTED and at - h.started[oldest_key] <= ttl:
                break
            del h.started[oldest_key]

    def _record(self, h: DeploymentHealth, at: float, ok: bool) -> None:
        h.outcomes.append((at, ok))
        while h.outcomes and h.outcomes[0][0] < at - self.settings.window_s:
            h.outcomes.popleft()

    @staticmethod
    def _trip(h: DeploymentHealth, at: float, cooldown: float) -> None:
        h.opened_at = max(h.opened_at, at)
        h.open_until = max(h.open_until, at + cooldown)
        h.probe_until = 0.0

    def _peak_ewma(self, old: float | None, new: float) -> float:
        """Peak-sensitive EWMA: a slower sample counts at once, faster ones pull the value down gradually."""
        if old is None or new >= old:
            return new
        return old + self.settings.ewma_alpha * (new - old)

    # ---- reading ----------------------------------------------------------------------------------

    def available(self, deployment: str, now: float) -> bool:
        """Whether a new request may go there now: closed, or half-open with no probe out."""
        h = self.deployments.get(deployment)
        if h is None:
            return True
        if now < h.open_until:
            return False
        return not (h.tripped and now < h.probe_until)

    def tripped(self, deployment: str) -> bool:
        """Whether the deployment's breaker is open or half-open: a call sent there is a probe."""
        h = self.deployments.get(deployment)
        return h is not None and h.tripped

    def cooldown_left(self, deployment: str, now: float) -> float:
        """Seconds until the deployment's cooldown ends (0 when it is not cooling down)."""
        h = self.deployments.get(deployment)
        return 0.0 if h is None else max(0.0, h.open_until - now)

    def latency_score(self, deployment: str, stream: bool, now: float) -> float | None:
        """Recent latency in ms (time to first token for streams when known), decaying while unsampled.

        The decay (half-life `latency_half_life_s`) lets a deployment that was slow get one request
        again now and then, so a recovered deployment is noticed; None means never measured.
        """
        h = self.deployments.get(deployment)
        if h is None or h.latency_ms is None:
            return None
        base = h.ttft_ms if (stream and h.ttft_ms is not None) else h.latency_ms
        age = max(0.0, now - h.sampled_at)
        return float(base * 0.5 ** (age / self.settings.latency_half_life_s))

    def in_flight(self, deployment: str, now: float) -> int:
        """Calls started (or routed by this router) without an outcome yet; entries expire after a TTL."""
        h = self.deployments.get(deployment)
        if h is None:
            return 0
        stale = [k for k, t in h.started.items() if now - t > self.settings.in_flight_ttl_s]
        for k in stale:
            del h.started[k]
        return len(h.started)
