"""The provider calls a worker process holds, by request id, and the follower of `llm.cancel` that stops them.

Ingress publishes a `CancelRequest` when a client goes away before its answer. Every worker
process reads all of `llm.cancel` (no consumer group: each process must see every signal, since any of them
may hold the call) from its end at start: a signal older than the process concerns no call it holds.

What it guarantees:
- a signal for a request this process holds stops that request's call (`Cancel`): a call under way ends
  at once with its connection closed, one still waiting for its turn (the pacer, a not-before time) never
  starts; the worker still publishes what the call owes (usage with status 499, its attempt event) and
  commits the request's offset as done, so it is neither retried nor redelivered;
- a signal for a request it does not hold (another worker's, one already answered) changes nothing;
- an unreadable signal is dropped with a log line that does not quote it; following stops nothing else
  (a broker that goes away is retried by the consumer, and the loop keeps running).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from switchyard.services.workers.calls import Cancel
from switchyard.shared import topics
from switchyard.shared.answers import problems
from switchyard.shared.contracts import CancelRequest
from switchyard.shared.kafka import make_consumer, start_client, topic_partitions

log = logging.getLogger("switchyard.worker")
RETRY_S = 1.0


class Cancels:
    """Request id -> the `Cancel` handles of the calls this process holds for it (a redelivered request can be
    held twice for a moment: both stop)."""

    def __init__(self) -> None:
        self._held: dict[str, set[Cancel]] = {}
        self._consumer: AIOKafkaConsumer | None = None

    @contextmanager
    def holding(self, request_id: str) -> Iterator[Cancel]:
        """Hold a request while it is handled: a signal for it, meanwhile, cancels the handle yielded."""
        cancel = Cancel()
        held = self._held.setdefault(request_id, set())
        held.add(cancel)
        try:
            yield cancel
        finally:
            held.discard(cancel)
            if not held:
                self._held.pop(request_id, None)

    def cancel(self, request_id: str) -> int:
        """Stop every call held for `request_id`; how many there were (0: not ours, or already done)."""
        held = self._held.get(request_id, ())
        for cancel in held:
            cancel.cancel()
        return len(held)

    async def start(self, bootstrap: str) -> None:
        """Assign every partition of `llm.cancel` and take position at its end, before any call is held."""
        consumer = make_consumer(bootstrap=bootstrap, group_id=None, tansu_fetch_wait_ms=50,
                                 auto_offset_reset="latest")
        await start_client(consumer, "worker-cancels")
        parts = await topic_partitions(consumer, topics.CANCEL)
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        for tp in parts:
            await consumer.position(tp)  # resolved now: a signal published from here on is read
        self._consumer = consumer

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def follow(self) -> None:
        """Apply every signal as it arrives, until cancelled."""
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("Cancels.follow before start")
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except asyncio.CancelledError:
                raise
            except Exception:  # the consumer retries the broker itself; never let following end the worker
                log.exception("reading llm.cancel failed; retrying")
                await asyncio.sleep(RETRY_S)
                continue
            for records in batches.values():
                for record in records:
                    self.apply(record.value)

    def apply(self, raw: bytes | None) -> None:
        try:
            signal = CancelRequest.model_validate_json(raw or b"")
        except ValidationError as e:
            log.warning("dropping a cancel signal that cannot be read", extra={"problems": problems(e)})
            return
        if self.cancel(signal.request_id):
            log.info("stopping a provider call: its client went away", extra={"request_id": signal.request_id})
