"""Kafka plumbing every service shares: client factories, topic creation, safe sends, offset tracking.

Delivery is at-least-once everywhere: a consumer commits an offset only after what it owes
for that message is acknowledged. Duplicates are dropped downstream by id.

The factories are tuned for Apache Kafka: idempotent, compressing producers; consumers with long
fetch waits (the broker answers a waiting fetch as soon as data arrives); static group membership
where the process knows its replica index. On the Tansu fallback, shared/tansu.py's quirks apply instead.
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

from shared.tansu import TANSU_FETCH_WAIT_MS, RewindingConsumer, is_tansu
from shared.topics import MAX_MESSAGE_BYTES, topic_configs

log = logging.getLogger("switchyard.kafka")


def _acks() -> int | str:
    value = os.environ.get("KAFKA_ACKS", "all")
    return value if value == "all" else int(value)


class Producer(AIOKafkaProducer):  # type: ignore[misc]
    """An AIOKafkaProducer whose metadata never drops a topic it has messages queued for.

    aiokafka refreshes metadata for the topics its client tracks, or for all topics while it tracks none,
    and starts tracking a topic only when one of its sends finds it missing from the metadata. So a
    producer that sent only to topics it learnt from its first, all-topics metadata tracks nothing; its first
    send to a topic created since (a batch job's reply topic, or any topic after the embedded broker
    restarted) narrows the metadata to that one topic. A batch queued meanwhile for any other topic then
    has no leader, and since the refresh it triggers asks only for the tracked topics, it waits until
    `request_timeout_ms` and fails with NotLeaderForPartitionError: a worker's usage and events stalled
    15 s after a batch job started. Tracking every topic before its first send keeps them all in every
    refresh (one metadata round trip per topic, once).
    """

    async def send(self, topic: str, value: Any = None, key: Any = None, partition: int | None = None,
                   timestamp_ms: int | None = None, headers: Any = None) -> asyncio.Future[Any]:
        await self.client.add_topic(topic)  # done at once when already tracked
        result: asyncio.Future[Any] = await super().send(topic, value, key=key, partition=partition,
                                                         timestamp_ms=timestamp_ms, headers=headers)
        return result


REPLICA_ENV = "SWITCHYARD_REPLICA"
"""This process's index among its stage's replicas (`switchyard up` sets it; a StatefulSet's ordinal in deploy/)."""

KAFKA_FETCH_WAIT_MS = 500
"""How long Apache Kafka may hold an empty fetch: it answers as soon as data arrives, so a long wait costs no
latency and ends idle polling (SWITCHYARD_FETCH_WAIT_MS overrides)."""


def make_producer(bootstrap: str, **overrides: Any) -> Producer:
    """A producer tuned for small messages at low latency (see `Producer` for its metadata fix).

    No linger: aiokafka still batches whatever is queued while the previous request to the partition's
    leader is in flight, so bursts batch by themselves; a 1 ms linger added ~1.2 ms to every send's
    acknowledgement and ~2 ms to every hop (bench/kafka_probe.py), three hops per request.

    On Apache Kafka the producer is idempotent (a retried send is never written twice) and compresses
    with LZ4, which a large body needs to fit and a small one pays microseconds for. Tansu gets neither:
    it does not implement idempotent producers.
    """
    acks = _acks()
    kafka = not is_tansu()
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "linger_ms": 0,
        "acks": acks,
        "enable_idempotence": kafka and acks == "all",
        "compression_type": "lz4" if kafka else None,
        "request_timeout_ms": 15000,
        "retry_backoff_ms": 50,
        "max_batch_size": 1 << 20,
        "max_request_size": MAX_MESSAGE_BYTES,
        "client_id": "switchyard",
    }
    options.update(overrides)
    return Producer(**options)


def fetch_wait_ms(tansu_ms: int = TANSU_FETCH_WAIT_MS) -> int:
    """How long the broker may hold a consumer's empty fetch: SWITCHYARD_FETCH_WAIT_MS, else
    KAFKA_FETCH_WAIT_MS on Apache Kafka, else `tansu_ms` (Tansu answers only when the wait ends, so each
    consumer passes how much latency it can afford there)."""
    value = os.environ.get("SWITCHYARD_FETCH_WAIT_MS", "")
    if value.strip().isdigit():
        return int(value)
    return tansu_ms if is_tansu() else KAFKA_FETCH_WAIT_MS


def group_instance_id(group: str) -> str | None:
    """The static member id of this process in `group`, from its replica index (SWITCHYARD_REPLICA); None
    without one, or on Tansu.

    A static member that restarts within the session timeout gets its partitions back without a rebalance
    of the group: the other members keep working. Two live processes must never share an index.
    """
    replica = os.environ.get(REPLICA_ENV, "").strip()
    if not replica.isdigit() or is_tansu():
        return None
    return f"{group}-{replica}"


def make_consumer(*topics: str, bootstrap: str, group_id: str | None, tansu_fetch_wait_ms: int = TANSU_FETCH_WAIT_MS,
                  **overrides: Any) -> AIOKafkaConsumer:
    """A consumer with manual commits and the broker's fetch wait (`fetch_wait_ms`); on Tansu, one that rewinds
    a partition whose log was re-created (shared/tansu.py)."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": fetch_wait_ms(tansu_fetch_wait_ms),
        "max_poll_records": 500,
        "session_timeout_ms": 10000,
        "heartbeat_interval_ms": 1000,
        "max_partition_fetch_bytes": MAX_MESSAGE_BYTES,
        "client_id": "switchyard",
    }
    options.update(overrides)
    if is_tansu():
        return RewindingConsumer(*topics, **options)
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


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 30.0) -> list[TopicPartition]:
    """Every partition of `topic`, for a consumer that assigns them itself (no subscription).

    Such a consumer's metadata holds no topic until one is asked for: Apache Kafka answers a metadata
    request for no topics with none (Tansu answered with all of them, so `partitions_for_topic` used to
    work by accident, and on Kafka a router read no health events at all). Waits while the topic is
    being created.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        await consumer._client.add_topic(topic)  # tracked from now on (the first call refreshes the metadata)
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        if loop.time() > deadline:
            raise KafkaError(f"topic {topic} has no partitions after {timeout_s}s")
        await asyncio.sleep(0.2)
        await consumer._client.force_metadata_update()


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
        missing = [NewTopic(name, parts, replication_factor, topic_configs=topic_configs(name))
                   for name, parts in topics.items() if name not in existing]
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
        if offset < self._next.get(tp, 0):
            # The consumer went back (a `Consumer` rewound a re-created log; revoked partitions are forgotten
            # first): what was tracked belongs to the old log, and committing its offsets would skip the new one.
            log.warning("offsets went back; tracking the partition afresh",
                        extra={"partition": f"{tp.topic}[{tp.partition}]", "offset": offset,
                               "expected": self._next[tp]})
            self.forget([tp])
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
