"""Kafka clients every service shares: producer and consumer factories, start-up, topic discovery and creation.

The factories are tuned for Apache Kafka: idempotent, compressing producers; consumers with long
fetch waits (the broker answers a waiting fetch as soon as data arrives); static group membership
where the process knows its replica index. On the Tansu fallback, shared/tansu.py's quirks apply instead.

Sending is shared/kafka_delivery.py (at-least-once, permanent refusals raised at once), where a message may go
is shared/kafka_destinations.py, and committing consumed offsets is shared/kafka_offsets.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from switchyard.shared import kafka_partitioner, retry
from switchyard.shared.kafka_compression import use_fast_lz4
from switchyard.shared.tansu import TANSU_FETCH_WAIT_MS, RewindingConsumer, is_tansu
from switchyard.shared.topics import MAX_MESSAGE_BYTES, topic_configs

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

    Keyed messages go where any Kafka client puts them, by shared/kafka_partitioner.py's faster murmur2.

    On Apache Kafka the producer is idempotent (a retried send is never written twice) and compresses
    with LZ4 in its fast mode (shared/kafka_compression.py), which a large body needs to fit and a small one
    pays microseconds for. Tansu gets neither: it does not implement idempotent producers.
    """
    use_fast_lz4()
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
        "partitioner": kafka_partitioner.partition,
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


class LaggingFetch:
    """Fetch settings for a reader that may lag by up to `wait_ms` (accounting, the health feeds), adapted to
    its load: `options()` for `make_consumer`, and `follow(consumer, found)` after each read.

    Under load, on Apache Kafka, the broker holds each fetch until `min_bytes` have gathered or `wait_ms` passed,
    so one fetch carries hundreds of messages instead of one: the broker answers (and the reader parses) a fetch
    per interval, not per message. At idle that would still be an empty fetch every `wait_ms`, each about 1 ms
    of aiokafka's CPU: ingress's health feed alone (50 ms) cost it 20 ms a second. So once a read finds nothing,
    the reader's fetches wait for the first byte instead, for up to `fetch_wait_ms()`: the broker answers as
    soon as a message arrives (sooner than a batched fetch would), and the next read that finds messages goes
    back to batching. Nothing changes on Tansu, which holds every fetch for its whole wait anyway.

    The switch sets two attributes of aiokafka's fetcher, which it reads each time it builds a fetch request
    (`tests/test_kafka_lagging.py` fails if a release renames them); a consumer without them keeps batching.
    """

    def __init__(self, wait_ms: int, min_bytes: int = 64 << 10) -> None:
        self.wait_ms = wait_ms
        self.min_bytes = min_bytes
        self._batching = True

    @property
    def read_timeout_ms(self) -> int:
        """How long a read (`getmany`) may wait: two batching intervals while batching, since a read that finds
        nothing in that time ends it; while idle, twice the broker's hold, since the first message ends the
        wait anyway (ingress's health feed woke ten times a second for nothing)."""
        return 2 * (self.wait_ms if self._batching else max(self.wait_ms, fetch_wait_ms()))

    def options(self) -> dict[str, int]:
        """Consumer options to start with: batching."""
        if is_tansu():
            return {}
        return {"fetch_min_bytes": self.min_bytes, "fetch_max_wait_ms": self.wait_ms}

    def follow(self, consumer: AIOKafkaConsumer, found: bool) -> None:
        """After a read: batch while reads find messages, wait for the first byte once one finds none."""
        if found == self._batching or is_tansu():
            return
        fetcher = getattr(consumer, "_fetcher", None)
        if fetcher is None or not hasattr(fetcher, "_fetch_min_bytes") or not hasattr(fetcher, "_fetch_max_wait_ms"):
            return
        self._batching = found
        fetcher._fetch_min_bytes = self.min_bytes if found else 1
        fetcher._fetch_max_wait_ms = self.wait_ms if found else fetch_wait_ms()


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


FETCHER_POLL_MS = 1000
"""How often aiokafka's fetch routine wakes when nothing happened (`consumer_timeout_ms`, 200 by default). A
fetch's answer, an assignment change, a consumed buffer and a resumed partition each wake it at once; at 200 ms
its polls were a third of an idle service's event-loop wake-ups."""


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
        "consumer_timeout_ms": FETCHER_POLL_MS,
    }
    options.update(overrides)
    if is_tansu():
        return RewindingConsumer(*topics, **options)
    return AIOKafkaConsumer(*topics, **options)


async def start_client(client: AIOKafkaProducer | AIOKafkaConsumer, what: str, timeout_s: float = 60.0) -> None:
    """Start a client, retrying every 0.5 s while the broker comes up (or comes back), for `timeout_s`."""
    async for attempt in retry.attempts(KafkaError, first_s=0.5, max_s=0.5, timeout_s=timeout_s):
        with attempt:
            try:
                await client.start()
            except KafkaError as e:
                log.warning("waiting for Kafka", extra={"client": what, "error": repr(e)})
                raise


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 30.0) -> list[TopicPartition]:
    """Every partition of `topic`, for a consumer that assigns them itself (no subscription).

    Asks the broker for `topic` by name: a consumer without a subscription tracks no topic until one is added,
    and Apache Kafka answers a metadata request for no topics with none, so `partitions_for_topic` alone
    finds nothing (docs/decisions/partition-discovery.md). Waits while the topic is being created; a
    KafkaError after `timeout_s`.
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
    """Create the topics that do not exist yet (idempotent); returns the names created, once a broker's
    metadata lists them. On Apache Kafka, a topic that exists with fewer partitions than wanted gets more (a
    stack restarted with more replicas); one with more keeps them, since partitions cannot be taken away.

    On KRaft a created topic is committed to the controller's log before the brokers' metadata caches apply
    it, so for a moment a Metadata request still says it does not exist. Whoever is told of a new topic next
    (a router handed a batch's reply topic) must find it, or it refuses the message as sent to no topic."""
    async for attempt in retry.attempts(KafkaError, first_s=0.3, max_s=0.3, timeout_s=timeout_s):
        with attempt:
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="switchyard-admin")
            await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, parts, replication_factor, topic_configs=topic_configs(name))
                   for name, parts in topics.items() if name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            async for attempt in retry.attempts(KafkaError, first_s=0.05, max_s=0.05, timeout_s=timeout_s):
                with attempt:
                    if unlisted := {t.name for t in missing} - set(await admin.list_topics()):
                        raise KafkaError(f"created topics not in the brokers' metadata yet: {sorted(unlisted)}")
        if not is_tansu():
            await _grow(admin, {name: parts for name, parts in topics.items() if name in existing})
        return [t.name for t in missing]
    finally:
        await admin.close()


async def _grow(admin: AIOKafkaAdminClient, wanted: dict[str, int], timeout_s: float = 60.0) -> None:
    """Give each existing topic in `wanted` the partitions it lacks; returns once a broker's metadata lists them.

    A consumer that starts while its broker's metadata still has the old count keeps it for minutes
    (`metadata_max_age_ms`), and a message sent meanwhile to a new partition waits for nobody: so the services
    start only after the new counts are served, as for new topics above."""
    if not wanted:
        return
    short = {name: wanted[name] for name, count in (await _partition_counts(admin, wanted)).items()
             if 0 < count < wanted[name]}
    if not short:
        return
    log.info("adding partitions", extra={"topics": short})
    await admin.create_partitions({name: NewPartitions(count) for name, count in short.items()})
    async for attempt in retry.attempts(KafkaError, first_s=0.05, max_s=0.2, timeout_s=timeout_s):
        with attempt:
            counts = await _partition_counts(admin, short)
            if lacking := sorted(name for name, count in short.items() if counts.get(name, 0) < count):
                raise KafkaError(f"added partitions not in the brokers' metadata yet: {lacking}")


async def _partition_counts(admin: AIOKafkaAdminClient, names: Iterable[str]) -> dict[str, int]:
    return {found["topic"]: len(found.get("partitions") or []) for found in await admin.describe_topics(list(names))
            if not found.get("error_code")}
