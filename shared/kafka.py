"""Kafka plumbing every service shares: client factories, topic creation, safe sends, offset tracking.

Delivery is at-least-once everywhere: a consumer commits an offset only after what it owes
for that message is acknowledged. Duplicates are dropped downstream by id.

A send the broker can never accept (too large, no such topic or partition, not allowed) is never retried:
it raises `DeliveryRefused` at once, and whoever owes the delivery answers instead or dead-letters it
(shared/dead.py). Everything else is transient and retried.

The factories are tuned for Apache Kafka: idempotent, compressing producers; consumers with long
fetch waits (the broker answers a waiting fetch as soon as data arrives); static group membership
where the process knows its replica index. On the Tansu fallback, shared/tansu.py's quirks apply instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.protocol.metadata import MetadataRequest
from pydantic import BaseModel
from pydantic_core import to_json

from switchyard.shared import retry
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


def lagging_fetch(wait_ms: int, min_bytes: int = 64 << 10) -> dict[str, int]:
    """Consumer options for a reader that may lag by up to `wait_ms` (accounting, routers' health events).

    On Apache Kafka the broker then holds each fetch until `min_bytes` have gathered or `wait_ms` passed,
    so under load one fetch carries hundreds of messages instead of one: the broker answers (and the
    reader parses) a fetch per interval, not per message. Nothing changes on Tansu, which holds every
    fetch for its whole wait anyway."""
    if is_tansu():
        return {}
    return {"fetch_min_bytes": min_bytes, "fetch_max_wait_ms": wait_ms}


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
    """Create the topics that do not exist yet (idempotent); returns the names created."""
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
        return [t.name for t in missing]
    finally:
        await admin.close()


def encode(message: BaseModel) -> bytes:
    return to_json(message)


Headers = list[tuple[str, bytes]]
"""Kafka record headers, as aiokafka takes and gives them."""

REFUSED_TOO_LARGE = "too_large"
REFUSED_UNKNOWN_TOPIC = "unknown_topic"
REFUSED_UNKNOWN_PARTITION = "unknown_partition"
REFUSED_INVALID_TOPIC = "invalid_topic"
REFUSED_NOT_AUTHORIZED = "not_authorized"


class DeliveryRefused(Exception):
    """The broker can never accept this message at this destination: sending it again cannot help.

    `reason` is one of the REFUSED_* codes; `status` the HTTP status that fits it when a request's caller
    is told (413 for a message over the limit, 404 for a destination that does not exist, 403 when this
    client may not write there). Not a KafkaError on purpose: code that treats KafkaError as "the broker
    is unreachable" must not mistake a refusal for it.
    """

    def __init__(self, reason: str, message: str, *, status: int, topic: str, partition: int | None,
                 size: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status
        self.topic = topic
        self.partition = partition
        self.size = size
        self.limit = limit


def too_large(topic: str, partition: int | None, size: int, limit: int = MAX_MESSAGE_BYTES) -> DeliveryRefused:
    return DeliveryRefused(REFUSED_TOO_LARGE, f"the message is {size:,} bytes, more than the {limit:,} bytes "
                           f"a message to {topic} may have", status=413, topic=topic, partition=partition,
                           size=size, limit=limit)


_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")

T = TypeVar("T")


async def _retrying(attempt: Callable[[], Awaitable[T]], refused: Callable[[BaseException], Awaitable[
        DeliveryRefused | None]], *, what: str, topic: str, attempts: int) -> T:
    """Run `attempt` until it succeeds, retrying transient KafkaErrors with backoff (the broker briefly
    unreachable, e.g. restarting), `attempts` times at most, waiting 0.05 s doubling to 2 s; what `refused`
    classifies as permanent is raised at once instead.

    The first try runs bare: nearly every send succeeds at once, and the retry machinery costs about 0.2 ms
    of CPU to build, so it is built only after a failure."""
    try:
        return await attempt()
    except (KafkaError, AssertionError, ValueError) as e:
        await _unless_transient(e, refused, last=attempts <= 1, what=what, topic=topic)
    await asyncio.sleep(0.05)
    async for this in retry.attempts(KafkaError, first_s=0.1, max_s=2.0, tries=attempts - 1):
        with this:
            try:
                return await attempt()
            except (KafkaError, AssertionError, ValueError) as e:
                await _unless_transient(e, refused, last=this.num >= attempts - 1, what=what, topic=topic)
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _unless_transient(error: Exception, refused: Callable[[BaseException], Awaitable[DeliveryRefused | None]],
                            *, last: bool, what: str, topic: str) -> None:
    """Raise what must not be retried (a permanent refusal, an error that is no KafkaError, the last attempt's
    error); else log that the operation is retried."""
    permanent = await refused(error)
    if permanent is not None:
        raise permanent from error
    if last or not isinstance(error, KafkaError):
        raise error
    log.warning(f"{what} failed, retrying", extra={"topic": topic, "error": repr(error)})


async def _transient(error: BaseException) -> None:
    return None


class Destinations:
    """Which topics and partitions the cluster has: the check that runs before a message is sent somewhere.

    Reads the client's own metadata first (no I/O when it knows the destination). On a miss it asks a
    broker for the list of every topic (one request for all the misses waiting at that moment) and keeps
    it until the next miss: a topic created a moment ago is found, a batch of envelopes naming a missing
    topic costs one round trip, and a missing topic is never added to what the client tracks (which would
    make every later refresh of the client ask for it). A topic is missing only when that list, which a
    broker answers from the cluster's own records and which never creates a topic, does not name it; one
    named with an error (no leader while a broker restarts) exists, and sending to it stays a transient
    matter. Auto-creation is off on Apache Kafka (switchyard up, deploy/), so a missing topic will not
    appear by sending to it; Tansu creates topics on first use, so there only the partition range is checked.
    """

    def __init__(self, client: AIOKafkaClient) -> None:
        self._client = client
        self._known: dict[str, frozenset[int] | None] = {}
        self._refresh: asyncio.Task[None] | None = None

    def _lookup(self, topic: str) -> tuple[bool, frozenset[int] | set[int] | None]:
        """(exists, its partitions when known)."""
        found = self._client.cluster.partitions_for_topic(topic)
        if found is not None:
            return True, found
        return topic in self._known, self._known.get(topic)

    async def _refreshed(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._fetch())
        await asyncio.shield(self._refresh)

    async def _fetch(self) -> None:
        node = self._client.get_random_node()
        if node is None:
            raise KafkaConnectionError("no broker known to ask for the topics")
        response = await self._client.send(node, MetadataRequest(None))  # every topic; creates none
        self._known = {name: frozenset(p[1] for p in partitions) if error_code == 0 else None
                       for error_code, name, *_, partitions in response.topics}

    async def partitions(self, topic: str) -> frozenset[int] | set[int] | None:
        """The partitions of `topic`, from fresh metadata on a miss; None when it does not exist (or, rarely,
        exists without known partitions just now). A KafkaError from the broker is transient and propagates."""
        parts = self._lookup(topic)[1]
        if parts is None:
            await self._refreshed()
            parts = self._lookup(topic)[1]
        return parts

    async def check(self, topic: str, partition: int | None = None) -> None:
        """Return when `topic` (and `partition`, when given) exists or may exist; raise DeliveryRefused when
        it does not, even in fresh metadata. A KafkaError from the broker is transient and propagates."""
        if not _LEGAL_TOPIC.fullmatch(topic):
            raise DeliveryRefused(REFUSED_INVALID_TOPIC, f"{topic!r} is not a legal Kafka topic name", status=400,
                                  topic=topic, partition=partition)
        if partition is not None and partition < 0:
            raise DeliveryRefused(REFUSED_UNKNOWN_PARTITION, f"partition {partition} of {topic} does not exist",
                                  status=404, topic=topic, partition=partition)
        parts = self._lookup(topic)[1]
        if parts is not None and (partition is None or partition in parts):
            return
        await self._refreshed()
        exists, parts = self._lookup(topic)
        if not exists:
            if is_tansu():
                return  # created by the send itself
            raise DeliveryRefused(REFUSED_UNKNOWN_TOPIC, f"topic {topic} does not exist", status=404,
                                  topic=topic, partition=partition)
        if partition is not None and parts is not None and partition not in parts:
            raise DeliveryRefused(REFUSED_UNKNOWN_PARTITION, f"topic {topic} has no partition {partition} "
                                  f"(it has {len(parts)})", status=404, topic=topic, partition=partition)


_destinations: weakref.WeakKeyDictionary[AIOKafkaClient, Destinations] = weakref.WeakKeyDictionary()


def destinations(client: AIOKafkaProducer | AIOKafkaConsumer) -> Destinations:
    """The destination check of a started producer's or consumer's cluster metadata (one per client)."""
    kafka_client: AIOKafkaClient = client.client if isinstance(client, AIOKafkaProducer) else client._client
    found = _destinations.get(kafka_client)
    if found is None:
        found = _destinations[kafka_client] = Destinations(kafka_client)
    return found


async def check_destination(producer: AIOKafkaProducer, topic: str, partition: int | None = None,
                            attempts: int = 20) -> None:
    """`Destinations.check`, retried while the broker is briefly unreachable: returns when the destination
    exists, raises DeliveryRefused when it does not (and KafkaError when the broker stays unreachable)."""
    await _retrying(lambda: destinations(producer).check(topic, partition), _transient,
                    what="destination check", topic=topic, attempts=attempts)


async def refusal(producer: AIOKafkaProducer, error: BaseException, topic: str, partition: int | None,
                  size: int) -> DeliveryRefused | None:
    """The DeliveryRefused that `error` (raised by a send, or by its acknowledgement) amounts to, or None
    when it is transient and the send may be retried.

    Permanent: a message over the limit (checked by the client before sending, or by the broker after
    compression), an illegal topic, a topic this client may not write, and a topic or partition that
    fresh metadata does not have. aiokafka marks UnknownTopicOrPartitionError retriable (metadata may lag),
    hence the fresh look before deciding; it asserts the partition is in its metadata, hence AssertionError
    and ValueError when a partition was named.
    """
    if isinstance(error, (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)):
        return too_large(topic, partition, size)
    if isinstance(error, InvalidTopicError):
        return DeliveryRefused(REFUSED_INVALID_TOPIC, f"the broker calls {topic!r} an invalid topic", status=400,
                               topic=topic, partition=partition)
    if isinstance(error, TopicAuthorizationFailedError):
        return DeliveryRefused(REFUSED_NOT_AUTHORIZED, f"this client may not write to {topic}", status=403,
                               topic=topic, partition=partition)
    if isinstance(error, UnknownTopicOrPartitionError) or (
            partition is not None and isinstance(error, (AssertionError, ValueError))):
        try:
            await destinations(producer).check(topic, partition)
        except DeliveryRefused as refused:
            return refused
        except KafkaError:
            return None  # no fresh look possible now: transient
    return None


async def send(producer: AIOKafkaProducer, topic: str, value: bytes, *, key: bytes | None = None,
               partition: int | None = None, headers: Headers | None = None,
               attempts: int = 20) -> asyncio.Future[Any]:
    """Queue a message and return the future of its acknowledgement.

    Checks the destination first (`Destinations`) and raises DeliveryRefused at once for what the broker
    can never accept; retries while the broker is briefly unreachable (e.g. just after a restart).
    """
    async def attempt() -> asyncio.Future[Any]:
        await destinations(producer).check(topic, partition)
        result: asyncio.Future[Any] = await producer.send(topic, value, key=key, partition=partition,
                                                          headers=headers)
        return result

    return await _retrying(attempt, lambda e: refusal(producer, e, topic, partition, len(value)),
                           what="send", topic=topic, attempts=attempts)


async def send_and_wait(producer: AIOKafkaProducer, topic: str, value: bytes, *, key: bytes | None = None,
                        partition: int | None = None, headers: Headers | None = None, attempts: int = 20) -> Any:
    """Send and wait for the broker's acknowledgement, retrying transient failures; DeliveryRefused at once
    for a permanent one."""
    async def attempt() -> Any:
        fut = await send(producer, topic, value, key=key, partition=partition, headers=headers)
        return await fut

    return await _retrying(attempt, lambda e: refusal(producer, e, topic, partition, len(value)),
                           what="delivery", topic=topic, attempts=attempts)


def deliver(producer: AIOKafkaProducer, topic: str, value: bytes, *, key: bytes | None = None,
            partition: int | None = None, headers: Headers | None = None) -> asyncio.Task[Any]:
    """Start delivering a message; the task ends when the broker acknowledged it (retrying on the way), or
    fails with DeliveryRefused.

    Callers collect these tasks and commit their input offset only after all are done.
    """
    return asyncio.ensure_future(send_and_wait(producer, topic, value, key=key, partition=partition,
                                               headers=headers))


async def commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int] | None = None) -> bool:
    """Commit, surviving a rebalance: False (logged) when the group moved on or the partitions are no
    longer this member's. What was not committed is redelivered, and duplicates are dropped downstream by
    id, so the consumer carries on instead of exiting."""
    try:
        await consumer.commit(offsets)
        return True
    except (CommitFailedError, IllegalStateError) as e:
        log.warning("commit failed (the group rebalanced); its messages will be redelivered",
                    extra={"error": repr(e)})
    except KafkaError as e:
        log.warning("commit failed; the next one will cover it", extra={"error": repr(e)})
    return False


@dataclass(frozen=True, slots=True)
class Claim:
    """One message being worked on, from the partition's generation it was fetched in (see OffsetTracker)."""

    tp: TopicPartition
    offset: int
    generation: int


class OffsetTracker:
    """Tracks in-flight offsets per partition so commits never pass the oldest unfinished message.

    Each partition has a generation, bumped whenever its state is forgotten (revoked, or its log went
    back). A message's `Claim` carries the generation it started in, and `finished` ignores a claim from an
    older one: a task that outlived its partition's revocation (a call still running after the drain)
    must not mark an offset finished for the partition's next assignment, where the same offset is the
    new owner's unfinished message.
    """

    def __init__(self) -> None:
        self._inflight: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._generation: dict[TopicPartition, int] = {}

    def started(self, tp: TopicPartition, offset: int) -> Claim:
        if offset < self._next.get(tp, 0):
            # The consumer went back (a `Consumer` rewound a re-created log; revoked partitions are forgotten
            # first): what was tracked belongs to the old log, and committing its offsets would skip the new one.
            log.warning("offsets went back; tracking the partition afresh",
                        extra={"partition": f"{tp.topic}[{tp.partition}]", "offset": offset,
                               "expected": self._next[tp]})
            self.forget([tp])
        self._inflight.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)
        return Claim(tp, offset, self._generation.get(tp, 0))

    def finished(self, claim: Claim) -> bool:
        """Mark the claimed message done; False (and nothing changes) when the claim is from an older
        generation of its partition."""
        if claim.generation != self._generation.get(claim.tp, 0):
            return False
        pending = self._inflight.get(claim.tp)
        if pending is not None:
            pending.discard(claim.offset)
        return True

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
        """Drop state for revoked partitions (their unfinished messages will be redelivered) and fence the
        claims made before."""
        for tp in partitions:
            self._inflight.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
            self._generation[tp] = self._generation.get(tp, 0) + 1


class BatchOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """The offsets of a consumer that works a batch at a time (router, accounting), committed on demand and
    when its partitions are revoked.

    Only what a finished batch covered is ever committed, so a commit while a batch is in progress (the
    revocation runs beside the consumer's loop) never passes an unfinished message. On revocation it waits
    up to `revoke_wait_s` for the batch in progress, then commits: the next owner starts after what this
    member finished instead of redoing it; a batch that finishes only after that is not recorded (its
    partitions may be someone else's by then, who redoes it). Set as the listener of the subscription.
    """

    def __init__(self, consumer: AIOKafkaConsumer, revoke_wait_s: float = 5.0) -> None:
        self.consumer = consumer
        self.revoke_wait_s = revoke_wait_s
        self._done: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._batch: dict[TopicPartition, int] = {}
        self._generation = 0
        self._batch_generation = 0

    def begin(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """A batch (as `getmany` returned it) is being worked on."""
        self._batch = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
        self._batch_generation = self._generation
        self._idle.clear()

    def done(self) -> None:
        """Everything the batch owes is acknowledged: its offsets may be committed."""
        if self._batch_generation == self._generation:
            self._done.update(self._batch)
        self._batch = {}
        self._idle.set()

    @property
    def dirty(self) -> bool:
        return any(self._committed.get(tp) != offset for tp, offset in self._done.items())

    async def commit(self) -> bool:
        assigned = self.consumer.assignment()
        offsets = {tp: o for tp, o in self._done.items() if tp in assigned and self._committed.get(tp) != o}
        if not offsets:
            return True
        if await commit(self.consumer, offsets):
            self._committed.update(offsets)
            return True
        return False

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        if not self._idle.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.revoke_wait_s)
        committed = await self.commit()
        log.info("partitions revoked", extra={"partitions": len(revoked), "committed": committed})
        self._generation += 1
        for tp in revoked:
            self._done.pop(tp, None)
            self._committed.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        pass
