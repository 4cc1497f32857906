"""Kafka plumbing every service shares: client factories, topic creation, safe sends, offset tracking.

Delivery is at-least-once everywhere: a consumer commits an offset only after what it owes
for that message is acknowledged. Idempotent producers are off because the embedded
broker does not support them; duplicates are dropped downstream by id instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from pydantic import BaseModel
from pydantic_core import to_json

log = logging.getLogger("switchyard.kafka")


def _acks() -> int | str:
    value = os.environ.get("KAFKA_ACKS", "all")
    return value if value == "all" else int(value)


def make_producer(bootstrap: str, **overrides: Any) -> AIOKafkaProducer:
    """A producer tuned for small messages at low latency.

    No linger: aiokafka still batches whatever is queued while the previous request to the partition's
    leader is in flight, so bursts batch by themselves; a 1 ms linger added ~1.2 ms to every send's
    acknowledgement and ~2 ms to every hop (bench/kafka_probe.py), three hops per request.
    """
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "linger_ms": 0,
        "acks": _acks(),
        "request_timeout_ms": 15000,
        "retry_backoff_ms": 50,
        "max_batch_size": 1 << 20,
        "max_request_size": 8 << 20,
        "client_id": "switchyard",
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def hot_fetch_wait_ms(default: int = 5) -> int:
    """How long the broker may hold an empty fetch of a latency-critical consumer (requests, provider
    topics, replies): SWITCHYARD_FETCH_WAIT_MS, else `default`.

    Apache Kafka answers a waiting fetch as soon as data arrives, so there a long wait (deploy/ sets
    500) costs no latency and saves the idle polling: with 5 ms, each idle consumer sends ~200 empty
    fetches a second (an idle stack burns ~0.5 core, half of it in the broker; bench/README.md). The
    embedded Tansu broker answers only when the wait ends (bench/kafka_probe.py), so `switchyard up`
    keeps it short.
    """
    value = os.environ.get("SWITCHYARD_FETCH_WAIT_MS", "")
    return int(value) if value.strip().isdigit() else default


def make_consumer(*topics: str, bootstrap: str, group_id: str | None, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer with manual commits and a short fetch wait (the broker holds empty fetches that long)."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": hot_fetch_wait_ms(),
        "max_poll_records": 500,
        "session_timeout_ms": 10000,
        "heartbeat_interval_ms": 1000,
        "max_partition_fetch_bytes": 8 << 20,
        "client_id": "switchyard",
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def start_client(client: AIOKafkaProducer | AIOKafkaConsumer, what: str, timeout_s: float = 60.0) -> None:
    """Start a client, retrying while the broker comes up (or comes back)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            await client.start()
            return
        except KafkaError as e:
            if loop.time() > deadline:
                raise
            log.warning("waiting for Kafka", extra={"client": what, "error": repr(e)})
            await asyncio.sleep(0.5)


async def ensure_topics(bootstrap: str, topics: dict[str, int], replication_factor: int = 1,
                        timeout_s: float = 60.0) -> list[str]:
    """Create the topics that do not exist yet (idempotent); returns the names created."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="switchyard-admin")
        try:
            await admin.start()
            break
        except KafkaError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.3)
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, parts, replication_factor) for name, parts in topics.items() if name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
        return [t.name for t in missing]
    finally:
        await admin.close()


def encode(message: BaseModel) -> bytes:
    return to_json(message)


async def send(producer: AIOKafkaProducer, topic: str, value: bytes, *, key: bytes | None = None,
               partition: int | None = None, attempts: int = 20) -> asyncio.Future[Any]:
    """Queue a message and return the future of its acknowledgement.

    Retries enqueueing while the broker is briefly unreachable (e.g. just after a restart).
    """
    for i in range(attempts):
        try:
            return await producer.send(topic, value, key=key, partition=partition)
        except (KafkaConnectionError, KafkaError) as e:
            if i == attempts - 1:
                raise
            log.warning("send failed, retrying", extra={"topic": topic, "error": repr(e)})
            await asyncio.sleep(min(2.0, 0.05 * 2**i))
    raise AssertionError("unreachable")


async def send_and_wait(producer: AIOKafkaProducer, topic: str, value: bytes, *, key: bytes | None = None,
                        partition: int | None = None, attempts: int = 20) -> Any:
    """Send and wait for the broker's acknowledgement, retrying transient failures."""
    for i in range(attempts):
        try:
            fut = await send(producer, topic, value, key=key, partition=partition)
            return await fut
        except KafkaError as e:
            if i == attempts - 1:
                raise
            log.warning("delivery failed, retrying", extra={"topic": topic, "error": repr(e)})
            await asyncio.sleep(min(2.0, 0.05 * 2**i))
    raise AssertionError("unreachable")


def deliver(producer: AIOKafkaProducer, topic: str, value: bytes, *, key: bytes | None = None,
            partition: int | None = None) -> asyncio.Task[Any]:
    """Start delivering a message; the task ends when the broker acknowledged it (retrying on the way).

    Callers collect these tasks and commit their input offset only after all are done.
    """
    return asyncio.ensure_future(send_and_wait(producer, topic, value, key=key, partition=partition))


class OffsetTracker:
    """Tracks in-flight offsets per partition so commits never pass the oldest unfinished message."""

    def __init__(self) -> None:
        self._inflight: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def started(self, tp: TopicPartition, offset: int) -> None:
        self._inflight.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def finished(self, tp: TopicPartition, offset: int) -> None:
        pending = self._inflight.get(tp)
        if pending is not None:
            pending.discard(offset)

    @property
    def inflight(self) -> int:
        return sum(len(v) for v in self._inflight.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit now: the oldest unfinished offset, or the next one when all are done."""
        out: dict[TopicPartition, int] = {}
        for tp, nxt in self._next.items():
            pending = self._inflight.get(tp)
            offset = min(pending) if pending else nxt
            if self._committed.get(tp) != offset:
                out[tp] = offset
        return out

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop state for revoked partitions: their unfinished messages will be redelivered elsewhere."""
        for tp in partitions:
            self._inflight.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
