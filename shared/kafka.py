"""Kafka plumbing every service shares: client factories, topic creation, safe sends, offset tracking.

Delivery is at-least-once everywhere: a consumer commits an offset only after what it owes
for that message is acknowledged. Idempotent producers are off because the embedded
broker does not support them; duplicates are dropped downstream by id instead.

Every consumer made here is a `Consumer`, which rewinds a partition whose log was re-created under
it (the embedded broker restarted): see its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from pydantic import BaseModel
from pydantic_core import to_json

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


def make_producer(bootstrap: str, **overrides: Any) -> Producer:
    """A producer tuned for small messages at low latency (see `Producer` for its metadata fix).

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
    return Producer(**options)


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


RECREATED_LOG_CHECK_S = 1.0
"""How often a `Consumer` compares its positions with the partitions' high watermarks (a local check)."""


class Consumer(AIOKafkaConsumer):  # type: ignore[misc]
    """An AIOKafkaConsumer that notices when a partition's log was re-created under it, and reads the new log
    from its beginning.

    Why: the embedded broker (`switchyard up`) keeps everything in memory. When it restarts, the supervisor
    re-creates the topics and every log starts again at offset 0, but each consumer keeps its position in the
    old log (say 5000). Tansu answers a fetch past the log end with an empty response and the new high
    watermark, not OFFSET_OUT_OF_RANGE, so aiokafka's `auto_offset_reset` never fires: the consumer waits,
    silently, until the new log grows past 5000, and then skips everything before. Group consumers
    usually rejoin (the new broker does not know their member id) and find no committed offset, but a
    manually assigned one never does (each ingress replica's reply partition, the ingress key events, the
    router's health events, a batch job's replies), and a group member that committed its old position
    to the new broker before rejoining is stuck the same way.

    How: at most every RECREATED_LOG_CHECK_S, `getmany`/`getone` compare each assigned, unpaused partition's
    position with the high watermark of its last fetch response: both are local, so the hot path costs no
    broker round trip. A position beyond the high watermark on two checks in a row is confirmed with one
    ListOffsets (`end_offsets`); the partitions still beyond their log end are sought to the *beginning*,
    not to the end: everything in a re-created log was written after the restart (replies and requests
    the services still owe), so it is read, not skipped. Duplicates this may redeliver are dropped by id
    downstream, as for any redelivery.

    Harmless on Apache Kafka: a log there never shrinks below what a consumer has read (a consumer
    reads only up to the high watermark, and unclean leader election is off), and a fetch past its end
    gets OFFSET_OUT_OF_RANGE. The two checks in a row, a second apart, and the ListOffsets confirmation
    ride out a high watermark that is briefly stale (right after a seek, or just after a leader moved).
    (Tansu's ListOffsets may report less than the true end after a multi-record batch, never more, so on
    Tansu the confirmation never holds back a real rewind; its fetch high watermark is exact.)
    """

    def __init__(self, *topics: str, **options: Any) -> None:
        super().__init__(*topics, **options)
        self._next_log_check = 0.0
        self._suspects: set[TopicPartition] = set()
        self.rewinds = 0
        """Partitions sought to their beginning because their log was re-created (for logs and tests)."""

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[ConsumerRecord]]:
        await self._maybe_check_logs()
        return await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)

    async def getone(self, *partitions: TopicPartition) -> ConsumerRecord:
        await self._maybe_check_logs()
        return await super().getone(*partitions)

    async def _maybe_check_logs(self) -> None:
        now = asyncio.get_running_loop().time()
        if now < self._next_log_check:
            return
        self._next_log_check = now + RECREATED_LOG_CHECK_S
        try:
            await self.rewind_recreated_logs()
        except Exception as e:  # noqa: BLE001 - a failed check must never stop consumption; the next one retries
            log.warning("could not check for re-created logs", extra={"error": repr(e)})

    def _beyond_highwater(self) -> dict[TopicPartition, int]:
        """Assigned, unpaused partitions whose position is past the high watermark of their last fetch."""
        subscription = self._subscription.subscription
        assignment = subscription.assignment if subscription is not None else None
        if assignment is None:
            return {}
        out: dict[TopicPartition, int] = {}
        for tp in assignment.tps:
            state = assignment.state_value(tp)
            if (state is None or state.paused or not state.has_valid_position or state.highwater is None
                    or state.position <= state.highwater):
                continue
            out[tp] = state.position
        return out

    async def rewind_recreated_logs(self) -> list[TopicPartition]:
        """Seek to the beginning the partitions whose log ends before this consumer's position (seen on two
        calls in a row, then confirmed by the broker); returns them. `getmany` calls it every
        RECREATED_LOG_CHECK_S by itself."""
        beyond = self._beyond_highwater()
        confirm = {tp: pos for tp, pos in beyond.items() if tp in self._suspects}
        self._suspects = set(beyond)
        if not confirm:
            return []
        ends = await asyncio.wait_for(self.end_offsets(list(confirm)), timeout=5.0)
        assigned = self.assignment()
        recreated = [tp for tp, pos in confirm.items() if tp in assigned and ends.get(tp, pos) < pos]
        if not recreated:
            return []
        log.warning("log re-created under this consumer (broker restarted?): reading it from the beginning",
                    extra={"partitions": {f"{tp.topic}[{tp.partition}]": [confirm[tp], ends[tp]]
                                          for tp in recreated}})
        await self.seek_to_beginning(*recreated)
        self._suspects.difference_update(recreated)
        self.rewinds += len(recreated)
        return recreated


def make_consumer(*topics: str, bootstrap: str, group_id: str | None, **overrides: Any) -> Consumer:
    """A consumer with manual commits and a short fetch wait (the broker holds empty fetches that long)
    that rewinds a partition whose log was re-created (see `Consumer`)."""
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
    return Consumer(*topics, **options)


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
