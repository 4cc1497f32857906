"""Holding new admissions while `switchyard up` rotates the Tansu fallback broker.

Tansu keeps every message in memory and slows down on long logs, and has no retention, so the supervisor
restarts it empty once its logs are large (switchyard/devstack/tansu_rotation.py). A restart loses what the broker
held, so it may happen only when nothing acknowledged is unprocessed. Ingress's part: on HOLD_SIGNAL, every
request (and key event) about to be written to Kafka waits here, it is not refused, until RELEASE_SIGNAL or
HOLD_TTL_S after the last HOLD_SIGNAL, whichever comes first (a supervisor that dies mid-hold cannot stall
ingress). `/health` reports `held` and `sending`; with `waiting` (callers whose reply has not all arrived) the
supervisor knows when this replica owes nothing to the broker.

Guarantee: a request counts in `sending` from the moment it passes the hold, with no await in between, and
stays counted until it is registered as waiting; so a `/health` answer that says `held` and 0 of both means
nothing of this replica's is in the broker or on its way, and nothing will be until the hold ends.

Installed on Tansu only (`is_tansu()`); on Apache Kafka nothing signals it and the hold is never set.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from switchyard.shared.tansu import HOLD_SIGNAL, HOLD_TTL_S, RELEASE_SIGNAL

POLL_S = 0.02
"""How often a held admission looks whether the hold ended (only while held)."""


class AdmissionHold:
    def __init__(self) -> None:
        self._until = 0.0
        self.sending = 0
        """Admissions past the hold that are not yet waiting for a reply (or whose key event is being sent)."""

    @property
    def held(self) -> bool:
        return time.monotonic() < self._until

    def hold(self, ttl_s: float = HOLD_TTL_S) -> None:
        """Hold new admissions for `ttl_s` from now."""
        self._until = time.monotonic() + ttl_s

    def release(self) -> None:
        self._until = 0.0

    def install(self) -> bool:
        """Hold on HOLD_SIGNAL, release on RELEASE_SIGNAL. Python signal handlers run in the main thread between
        bytecodes and only set a number, so they are safe anywhere. Called before the server starts listening, so
        a process that answers `/health` has them (the supervisor signals only such a process). False (nothing
        installed) outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False

        def on_hold(*_: Any) -> None:
            self.hold()

        def on_release(*_: Any) -> None:
            self.release()

        signal.signal(HOLD_SIGNAL, on_hold)
        signal.signal(RELEASE_SIGNAL, on_release)
        return True

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Wait while held, then count the admission as `sending` for the block."""
        # Polled, not an Event: the hold also ends by time, and a signal handler must not touch the event loop.
        while self.held:  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)
        self.sending += 1
        try:
            yield
        finally:
            self.sending -= 1
