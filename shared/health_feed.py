"""Following `llm.events` into a HealthBook: what every router does to keep deployment health, and what
ingress does so its dashboard shows the routers' real breaker states.

Guarantees:
- Every partition of `llm.events` is read (no consumer group: each reader sees every event), starting
  HEALTH_REPLAY_MS back, so a reader started now folds the same recent past as one that ran all along and,
  the breaker being a function of events and their times, ends up in the same state as every router.
- `start()` returns once the replay has caught up with the log's end (or CATCH_UP_TIMEOUT_S passed, with a
  warning), so the first decision or answer made from the book knows which deployments are cooling down.
- A malformed event, or one of a newer contract version, is skipped (logged), never fatal.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from switchyard.shared import topics
from switchyard.shared.breaker import HealthBook
from switchyard.shared.contracts import CONTRACT_VERSION, AttemptEvent, now_ms
from switchyard.shared.kafka import LaggingFetch, make_consumer, start_client, topic_partitions

log = logging.getLogger("switchyard.health")
HEALTH_REPLAY_MS = 120_000
CATCH_UP_TIMEOUT_S = 15.0
FIRST_ATTEMPT_WAIT_MS = 50
"""How long the broker may hold a fetch of a reader that routes first attempts (ingress) while events flow: a
cooldown reaches it within this. A fetch returns sooner once 16 KiB of events wait, and at idle as soon as one
event arrives (LaggingFetch)."""
RETRY_WAIT_MS = 250
"""The same for a reader that routes only retries and batch lines (routers): a retry already skips the deployment
that failed it, so the rest of the health may be a little older."""


class HealthFeed:
    """Keeps `book` up to date from `llm.events`: `start()`, then run `follow()` until cancelled, then `stop()`."""

    def __init__(self, bootstrap: str, book: HealthBook, client: str, wait_ms: int = FIRST_ATTEMPT_WAIT_MS) -> None:
        self.book = book
        self.client = client
        self.lag = LaggingFetch(wait_ms, 16 << 10)
        self.events: AIOKafkaConsumer = make_consumer(bootstrap=bootstrap, group_id=None, tansu_fetch_wait_ms=wait_ms,
                                                     **self.lag.options())
        self.caught_up = False

    async def start(self) -> None:
        await start_client(self.events, self.client)
        parts = await topic_partitions(self.events, topics.EVENTS)
        self.events.assign(parts)
        offsets = await self.events.offsets_for_times({tp: now_ms() - HEALTH_REPLAY_MS for tp in parts})
        for tp in parts:
            found = offsets.get(tp)
            if found is None:
                await self.events.seek_to_end(tp)
            else:
                self.events.seek(tp, found.offset)
        await self.catch_up(parts)

    async def catch_up(self, parts: list[TopicPartition]) -> None:
        """Replay recent events up to the current end, so the book knows which deployments are cooling down."""
        ends = await self.events.end_offsets(parts)
        deadline = asyncio.get_running_loop().time() + CATCH_UP_TIMEOUT_S
        while True:
            behind = [tp for tp, end in ends.items() if await self.events.position(tp) < end]
            if not behind:
                self.caught_up = True
                return
            if asyncio.get_running_loop().time() > deadline:
                log.warning("health replay incomplete; going on", extra={"partitions": len(behind),
                                                                         "client": self.client})
                return
            await self.read(timeout_ms=200)

    async def stop(self) -> None:
        await self.events.stop()

    async def follow(self) -> None:
        while True:
            await self.read(timeout_ms=self.lag.read_timeout_ms)

    async def read(self, timeout_ms: int) -> None:
        batches = await self.events.getmany(timeout_ms=timeout_ms, max_records=2000)
        self.lag.follow(self.events, bool(batches))
        for records in batches.values():
            for record in records:
                try:
                    event = AttemptEvent.model_validate_json(record.value)
                except ValidationError:
                    log.error("dropping malformed event", extra={"offset": record.offset})
                    continue
                if event.v <= CONTRACT_VERSION:
                    self.book.apply(event)
