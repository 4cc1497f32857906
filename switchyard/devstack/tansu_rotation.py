"""Bounding the Tansu fallback: `switchyard up` restarts it empty once its logs are large, losing nothing.

Tansu keeps every message in memory (about 1 KB each for the one-record batches replies are made of) and
reading a partition slows down as its log grows: after ~260,000 messages in `llm.replies` partition 0, fetches
crawled at 1-15 messages/s and every request timed out. It has neither retention nor DeleteRecords. So, when
the broker is Tansu and its logs hold SWITCHYARD_TANSU_ROTATE_MESSAGES (default 50,000, far below where the
slowdown was seen; 0 turns rotation off), the supervisor rotates it:

1. it holds new admissions at every ingress replica (HOLD_SIGNAL, services/ingress/hold.py): requests wait,
   they are not refused;
2. it waits until nothing acknowledged is unprocessed: every ingress replica held, with no caller waiting for a
   reply and nothing being sent, and every consumer group (router, workers, accounting) committed up to its
   logs' ends (`switchyard.shared.tansu.unfinished`), which services do only once what a message owed is acknowledged;
3. it pauses the services, checks the groups once more, restarts Tansu (its whole in-memory state goes) and
   re-creates the topics, as after a broker crash; the services read the new logs from their beginning;
4. it resumes the services and releases the hold (RELEASE_SIGNAL).

A stack that never goes quiet for SWITCHYARD_TANSU_ROTATE_HOLD_S (default 30 s: a stream longer than that, a
batch job feeding the router without pause) is not rotated: the hold is released, a warning says what was still
busy, and the next attempt comes RETRY_S later. Nothing is ever lost to a rotation; the logs then keep growing
until a quiet moment comes (sustained load belongs on Apache Kafka, which has retention). A held request waits
at most the hold plus the restart (a few seconds for the groups to rejoin Tansu), and a supervisor that dies
mid-hold costs it HOLD_TTL_S at most. Nothing here runs on Apache Kafka.

`status()` goes into `.switchyard/stack.json` under `tansu_rotation` (rotations, log size, last attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from switchyard.devstack import probe
from switchyard.shared.tansu import HOLD_SIGNAL, HOLD_TTL_S, RELEASE_SIGNAL, log_messages, unfinished

ROTATE_ENV = "SWITCHYARD_TANSU_ROTATE_MESSAGES"
DEFAULT_ROTATE_MESSAGES = 50_000
"""~50 MB of broker memory, a fifth of the log length where Tansu's reads were seen to crawl."""
HOLD_ENV = "SWITCHYARD_TANSU_ROTATE_HOLD_S"
DEFAULT_HOLD_S = 30.0
CHECK_ENV = "SWITCHYARD_TANSU_ROTATE_CHECK_S"
DEFAULT_CHECK_S = 5.0
"""How often the log size is measured (one small fetch over every partition)."""
RETRY_S = 30.0
"""After an attempt that found the stack busy through the whole hold, how long before the next."""
POLL_S = 0.25
"""While holding: how often the ingress replicas and consumer groups are asked whether anything is unprocessed."""
MEASURE_TIMEOUT_S = 3.0

T = TypeVar("T")


@dataclass(frozen=True)
class Ingress:
    """One ingress replica: where its /health answers, and its process (None while it is not running)."""

    url: str
    pid: int | None


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    try:
        number = float(value) if value else default
    except ValueError:
        raise SystemExit(f"{name} must be a number; got {value!r}") from None
    if number < 0:
        raise SystemExit(f"{name} must not be negative; got {value!r}")
    return number


def _run(coro: Coroutine[Any, Any, T]) -> T | None:
    """Run one measurement on a fresh loop (the supervisor is synchronous); None when the broker did not answer."""
    try:
        return asyncio.run(coro)
    except Exception:  # noqa: BLE001 - a failed measurement means "unknown": the next poll asks again
        return None


def rss_kb(pid: int | None) -> int | None:
    """The resident memory of a process, from /proc (None when it cannot be read)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _warn(message: str) -> None:
    print(f"switchyard: {message}", file=sys.stderr, flush=True)


class TansuRotation:
    """The rotation schedule of one stack (see the module docstring); the supervisor calls `tick` in its loop."""

    def __init__(self, bootstrap: str, topics: dict[str, int], groups: dict[str, list[str]], *,
                 threshold: int, hold_s: float = DEFAULT_HOLD_S, check_s: float = DEFAULT_CHECK_S) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.groups = groups
        self.threshold = threshold
        self.hold_s = hold_s
        self.check_s = check_s
        self.rotations = 0
        self.deferred = 0
        """Attempts given up because the stack stayed busy through the hold."""
        self.messages = 0
        self.last: dict[str, Any] = {}
        self._next_check = 0.0
        self._holding_since: float | None = None
        self._next_poll = 0.0
        self._signalled: set[int] = set()
        """The ingress processes held in this hold (only those get RELEASE_SIGNAL: it would kill another)."""

    @classmethod
    def from_env(cls, bootstrap: str, topics: dict[str, int], groups: dict[str, list[str]]) -> TansuRotation | None:
        """The rotation configured by SWITCHYARD_TANSU_ROTATE_*; None when turned off (0 messages)."""
        threshold = int(_env_number(ROTATE_ENV, DEFAULT_ROTATE_MESSAGES))
        if threshold == 0:
            return None
        return cls(bootstrap, topics, groups, threshold=threshold,
                   hold_s=_env_number(HOLD_ENV, DEFAULT_HOLD_S), check_s=_env_number(CHECK_ENV, DEFAULT_CHECK_S))

    def status(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "messages": self.messages, "rotations": self.rotations,
                "deferred": self.deferred, "holding": self._holding_since is not None, "last": self.last}

    def tick(self, ingresses: list[Ingress], broker_pid: int | None,
             rotate: Callable[[Callable[[], bool]], bool]) -> bool:
        """Advance the schedule; True when `status()` changed (stack.json is worth rewriting).

        `rotate(still_idle)` is the supervisor's: pause the services, call `still_idle()`, and only if it says
        so restart the broker empty and re-create the topics; resume the services either way; True when it
        restarted the broker.
        """
        now = time.monotonic()
        if self._holding_since is None:
            if now < self._next_check:
                return False
            self._next_check = now + self.check_s
            messages = _run(log_messages(self.bootstrap, self.topics, MEASURE_TIMEOUT_S))
            if messages is None:
                return False
            changed, self.messages = messages != self.messages, messages
            if messages < self.threshold:
                return changed
            self._holding_since = now
            self._next_poll = now
            return True
        if now < self._next_poll:
            return False
        self._next_poll = now + POLL_S
        idle, busy = self._hold(ingresses)
        armed = time.monotonic()
        lag = _run(unfinished(self.bootstrap, self.groups, MEASURE_TIMEOUT_S)) if idle else None
        if idle and lag is not None and not any(lag.values()):
            def still_idle() -> bool:
                # The services are paused now; the hold must still be in force (its TTL runs from `armed`).
                left = _run(unfinished(self.bootstrap, self.groups, MEASURE_TIMEOUT_S))
                return time.monotonic() - armed < HOLD_TTL_S / 2 and left is not None and not any(left.values())

            rss_before = rss_kb(broker_pid)
            if rotate(still_idle):
                self._release()
                self.rotations += 1
                self.last = {"at": time.time(), "rotated": True, "messages": self.messages,
                             "broker_rss_kb": rss_before, "held_s": round(time.monotonic() - self._holding_since, 3)}
                print(f"switchyard: rotated the embedded Tansu broker: its logs held {self.messages:,} messages "
                      f"({ROTATE_ENV}={self.threshold:,}), {(rss_before or 0) // 1024} MB; new admissions were "
                      f"held {self.last['held_s']:.1f} s", file=sys.stderr, flush=True)
                self.messages = 0
                self._holding_since = None
                self._next_check = time.monotonic() + self.check_s
                return True
        if now - self._holding_since < self.hold_s:
            return False
        self._release()
        self.deferred += 1
        if not idle:
            what = f"{busy} request(s) unanswered at ingress" if busy else "an ingress replica did not answer"
        elif lag is None:
            what = "the broker did not answer"
        else:
            what = "consumer groups behind: " + ", ".join(f"{group} {n}" for group, n in lag.items() if n)
        self.last = {"at": time.time(), "rotated": False, "messages": self.messages, "busy": what}
        _warn(f"could not rotate the embedded Tansu broker ({self.messages:,} messages, {ROTATE_ENV}="
              f"{self.threshold:,}): still busy after holding new requests {self.hold_s:g} s ({what}); "
              f"next attempt in {RETRY_S:g} s. Tansu slows down as its logs grow: sustained load needs Apache Kafka.")
        self._holding_since = None
        self._next_check = time.monotonic() + RETRY_S
        return True

    def _hold(self, ingresses: list[Ingress]) -> tuple[bool, int]:
        """(every replica held and owing nothing, callers waiting or being sent in all), re-arming each hold.

        Only a replica that answered /health is signalled: it installs its handler before it listens, and an
        unhandled HOLD_SIGNAL would kill a process still starting. One that does not answer cannot vouch for
        itself, so the stack is not idle.
        """
        idle, busy = True, 0
        for ingress in ingresses:
            status, health = probe.get(f"{ingress.url}/health")
            if status != 200 or not isinstance(health, dict):
                idle = False
                continue
            if ingress.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ingress.pid, HOLD_SIGNAL)
                    self._signalled.add(ingress.pid)
            owed = int(health.get("waiting") or 0) + int(health.get("sending") or 0)
            busy += owed
            idle = idle and bool(health.get("held")) and owed == 0
        return idle, busy

    def _release(self) -> None:
        for pid in self._signalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, RELEASE_SIGNAL)
        self._signalled.clear()
