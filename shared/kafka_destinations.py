"""Where a message may be sent: which topics and partitions the cluster has, and the refusals of what it can never take.

A send the broker can never accept (too large, no such topic or partition, an illegal name, not allowed) is a
`DeliveryRefused`, raised at once and never retried: whoever owes the delivery answers instead or dead-letters
it (shared/dead.py). `Destinations` tells a missing destination from a broker that is briefly unreachable,
which stays a transient KafkaError.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.protocol.admin import DescribeConfigsRequest
from aiokafka.protocol.metadata import MetadataRequest

from switchyard.shared.tansu import is_tansu
from switchyard.shared.topics import MAX_MESSAGE_BYTES

log = logging.getLogger("switchyard.kafka")

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

MIN_LIMIT = 1024
"""Messages up to this size are sent without asking for their topic's limit: no reply topic is made that small."""

_TOPIC_RESOURCE = 2
"""DescribeConfigs' resource type for a topic."""


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
        self._limits: dict[str, int] = {}
        self._limit_lookups: dict[str, asyncio.Task[int]] = {}

    async def limit(self, topic: str) -> int:
        """The most bytes a message to `topic` may have: its `max.message.bytes`, asked of a broker once per
        topic. Our own topics take MAX_MESSAGE_BYTES, which is also what every producer of ours sends at most;
        a topic made by someone else (a batch producer's reply topic) may take less. A message over it must be
        refused here, before it is sent: aiokafka's idempotent producer does not roll a partition's sequence
        number back when the broker refuses a batch, so every later send to that partition would fail with
        OutOfOrderSequenceNumber. Where the broker will not say (Tansu, no DescribeConfigs right, no broker
        reachable), MAX_MESSAGE_BYTES, and the broker's own check stands."""
        found = self._limits.get(topic)
        if found is not None:
            return found
        lookup = self._limit_lookups.get(topic)
        if lookup is None:  # one question in flight per topic; `_fetch_limit` takes it out when answered
            lookup = self._limit_lookups[topic] = asyncio.ensure_future(self._fetch_limit(topic))
        return await asyncio.shield(lookup)

    async def _fetch_limit(self, topic: str) -> int:
        try:
            return await self._ask_limit(topic)
        finally:
            self._limit_lookups.pop(topic, None)

    async def _ask_limit(self, topic: str) -> int:
        limit = MAX_MESSAGE_BYTES
        node = self._client.get_random_node()
        if node is not None and not is_tansu():
            try:
                response = await self._client.send(node, DescribeConfigsRequest(
                    [(_TOPIC_RESOURCE, topic, ["max.message.bytes"])]))
                for error_code, _, _, _, entries in response.resources:
                    for name, value, *_ in entries if error_code == 0 else ():
                        if name == "max.message.bytes" and str(value).isdigit():
                            limit = int(value)
            except KafkaError as e:  # not known now: asked again on the next send
                log.info("could not read a topic's message limit", extra={"topic": topic, "error": repr(e)})
                return limit
            except Exception as e:  # an answer this client cannot read: the broker's own check stands
                log.warning("could not read a topic's message limit", extra={"topic": topic, "error": repr(e)})
        self._limits[topic] = limit
        return limit

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

    async def check(self, topic: str, partition: int | None = None, size: int = 0) -> None:
        """Return when `topic` (and `partition`, when given) exists or may exist and takes a message of `size`
        bytes (`limit`); raise DeliveryRefused when it does not, even in fresh metadata. A KafkaError from the
        broker is transient and propagates."""
        if not _LEGAL_TOPIC.fullmatch(topic):
            raise DeliveryRefused(REFUSED_INVALID_TOPIC, f"{topic!r} is not a legal Kafka topic name", status=400,
                                  topic=topic, partition=partition)
        if partition is not None and partition < 0:
            raise DeliveryRefused(REFUSED_UNKNOWN_PARTITION, f"partition {partition} of {topic} does not exist",
                                  status=404, topic=topic, partition=partition)
        if size > MIN_LIMIT and size > (limit := await self.limit(topic)):
            raise too_large(topic, partition, size, limit)
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
