"""Dead letters: what the broker can never accept where it was meant to go, kept on `llm.dead` with the reason.

A message is buried only when no answer can take its place: a reply whose topic or partition does not exist
(nobody could read an error there either), an envelope whose reply destination does not exist (the router
has nowhere to answer it), an envelope that cannot be read far enough to find its id and reply topic
(UNREADABLE, shared/answers.py). A reply that is merely too large is sent in parts, or answered with an
error (workers).

A dead letter is the original message, unchanged (key, value, Kafka headers), plus the DEAD_HEADER_*
headers of shared/topics.py: the reason, in a code and in words, the destination it is to be replayed to,
the service that gave up, the time and the request id. `switchyard dead list` reads them back and
`switchyard dead replay` sends them to their destination again; each replay that is delivered leaves a
marker on `llm.dead` (DEAD_HEADER_REPLAYED, empty value), so the list tells what is still pending.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from switchyard.shared import topics
from switchyard.shared.contracts import now_ms
from switchyard.shared.kafka import make_producer, start_client
from switchyard.shared.kafka_delivery import Headers, send_and_wait
from switchyard.shared.kafka_destinations import DeliveryRefused, destinations

log = logging.getLogger("switchyard.dead")

UNREADABLE = "unreadable"
"""The reason of a dead letter that is no message its stage can read (an envelope that does not validate
and names no reply topic that exists); the broker's refusals have the REFUSED_* codes of
switchyard.shared.kafka_destinations."""

UNSTORABLE = "unstorable"
"""The reason of a dead letter whose message PostgreSQL refuses for good (shared/storable.py): a value no
column of its table can hold. Replayed to the topic it was consumed from, once the cause is fixed."""

_DEAD_HEADERS = frozenset({topics.DEAD_HEADER_REASON, topics.DEAD_HEADER_ERROR, topics.DEAD_HEADER_TOPIC,
                           topics.DEAD_HEADER_PARTITION, topics.DEAD_HEADER_SERVICE, topics.DEAD_HEADER_TS,
                           topics.DEAD_HEADER_REQUEST_ID, topics.DEAD_HEADER_REPLAYED})


def _own(headers: Iterable[tuple[str, bytes]] | None) -> Headers:
    """The message's own headers, without any dead-letter header an earlier burial added."""
    return [(k, v) for k, v in headers or () if k not in _DEAD_HEADERS]


def dead_headers(refused: DeliveryRefused, *, service: str, request_id: str | None,
                 headers: Iterable[tuple[str, bytes]] | None = None,
                 replay_to: tuple[str, int | None] | None = None) -> Headers:
    """The original headers plus the ones that say why, where to (`replay_to`, else where it was refused),
    who and when."""
    topic, partition = replay_to or (refused.topic, refused.partition)
    out = _own(headers)
    out += [(topics.DEAD_HEADER_REASON, refused.reason.encode()),
            (topics.DEAD_HEADER_ERROR, refused.message.encode()),
            (topics.DEAD_HEADER_TOPIC, topic.encode()),
            (topics.DEAD_HEADER_SERVICE, service.encode()),
            (topics.DEAD_HEADER_TS, str(now_ms()).encode())]
    if partition is not None:
        out.append((topics.DEAD_HEADER_PARTITION, str(partition).encode()))
    if request_id:
        out.append((topics.DEAD_HEADER_REQUEST_ID, request_id.encode()))
    return out


async def bury(producer: AIOKafkaProducer, refused: DeliveryRefused, value: bytes, *, key: bytes | None,
               service: str, request_id: str | None = None, headers: Iterable[tuple[str, bytes]] | None = None,
               replay_to: tuple[str, int | None] | None = None) -> Any:
    """Put a message on `llm.dead`, acknowledged, with `refused` as its reason; a replay sends it to
    `replay_to` (topic, partition), by default where it was refused. Raises like `send_and_wait` (a
    dead-letter topic that cannot take it either refuses)."""
    log.error("dead-lettering a message", extra={"reason": refused.reason, "error": refused.message,
                                                  "topic": refused.topic, "partition": refused.partition,
                                                  "request_id": request_id})
    return await send_and_wait(producer, topics.DEAD, value, key=key,
                               headers=dead_headers(refused, service=service, request_id=request_id,
                                                    headers=headers, replay_to=replay_to))


async def send_or_bury(producer: AIOKafkaProducer, topic: str, value: bytes, *, key: bytes | None, service: str,
                       partition: int | None = None, request_id: str | None = None,
                       headers: Iterable[tuple[str, bytes]] | None = None) -> Any:
    """Deliver a message; if the broker can never accept it there, bury it instead. For what has no other
    answer to give (usage, events, replies whose destination is gone)."""
    try:
        return await send_and_wait(producer, topic, value, key=key, partition=partition,
                                   headers=_own(headers) or None)
    except DeliveryRefused as refused:
        return await bury(producer, refused, value, key=key, service=service, request_id=request_id,
                          headers=headers)


async def bury_consumed(producer: AIOKafkaProducer, record: ConsumerRecord[bytes, bytes], reason: str, error: str, *,
                        service: str, request_id: str | None = None) -> Any:
    """Dead-letter a consumed message its service can never handle (UNREADABLE, UNSTORABLE), unchanged, to be
    replayed to the topic it came from (partitioned by its key again); returns once `llm.dead` has it, so the
    caller may commit its offset."""
    refused = DeliveryRefused(reason, error, status=422, topic=record.topic, partition=None)
    return await bury(producer, refused, record.value or b"", key=record.key, service=service,
                      request_id=request_id, headers=record.headers)


# ---- reading and replaying (`switchyard dead`) ---------------------------------------------------------


@dataclass
class DeadLetter:
    """One dead letter as read back from `llm.dead`; `id` is its place there (`partition-offset`)."""

    id: str
    reason: str
    error: str
    topic: str
    partition: int | None
    service: str
    ts_ms: int
    request_id: str | None
    key: bytes | None = field(repr=False)
    value: bytes = field(repr=False)
    headers: Headers = field(repr=False)
    replayed: bool = False

    def summary(self) -> dict[str, Any]:
        """What `switchyard dead list` shows (JSON)."""
        return {"id": self.id, "reason": self.reason, "error": self.error, "topic": self.topic,
                "partition": self.partition, "request_id": self.request_id, "service": self.service,
                "ts_ms": self.ts_ms, "bytes": len(self.value), "replayed": self.replayed}


def _header(headers: dict[str, bytes], name: str) -> str:
    return headers.get(name, b"").decode(errors="replace")


async def read_dead(bootstrap: str) -> list[DeadLetter]:
    """Every dead letter `llm.dead` still holds, oldest first, each marked `replayed` once a replay of it
    was delivered."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                fetch_max_wait_ms=100, max_partition_fetch_bytes=topics.MAX_MESSAGE_BYTES,
                                client_id="switchyard-dead")
    await start_client(consumer, "dead-reader")
    try:
        parts = [TopicPartition(topics.DEAD, p) for p in sorted(await destinations(consumer).partitions(topics.DEAD)
                                                                or ())]
        if not parts:
            return []
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        letters: list[DeadLetter] = []
        replayed: set[str] = set()
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    headers = {k: v for k, v in record.headers or ()}
                    if topics.DEAD_HEADER_REPLAYED in headers:
                        replayed.add(_header(headers, topics.DEAD_HEADER_REPLAYED))
                        continue
                    partition = _header(headers, topics.DEAD_HEADER_PARTITION)
                    letters.append(DeadLetter(
                        id=f"{tp.partition}-{record.offset}", reason=_header(headers, topics.DEAD_HEADER_REASON),
                        error=_header(headers, topics.DEAD_HEADER_ERROR),
                        topic=_header(headers, topics.DEAD_HEADER_TOPIC),
                        partition=int(partition) if partition.lstrip("-").isdigit() else None,
                        service=_header(headers, topics.DEAD_HEADER_SERVICE),
                        ts_ms=int(_header(headers, topics.DEAD_HEADER_TS) or record.timestamp),
                        request_id=_header(headers, topics.DEAD_HEADER_REQUEST_ID) or None,
                        key=record.key, value=record.value or b"", headers=list(record.headers or ())))
        for letter in letters:
            letter.replayed = letter.id in replayed
        return letters
    finally:
        await _stop(consumer)


async def _stop(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer without a group. aiokafka cancels a helper task of such a consumer on stop and awaits
    it; when the consumer stops before that task ever ran, the task's cancellation is raised here although
    nobody cancelled us: swallow that one, never a real cancellation of the caller."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


@dataclass
class Replayed:
    """The outcome of replaying one dead letter: `error` is None when its destination acknowledged it."""

    id: str
    topic: str
    partition: int | None
    error: str | None = None


async def replay(bootstrap: str, ids: Iterable[str] | None = None) -> list[Replayed]:
    """Send dead letters to their destination again, with their own key, value and headers: those named by
    `ids`, or (None) every one not replayed yet. A replay the broker refuses again, or that cannot be
    delivered, is reported in its `Replayed.error` (the letter stays pending); an unknown id is reported too."""
    letters = {letter.id: letter for letter in await read_dead(bootstrap)}
    wanted = [i for i in letters if not letters[i].replayed] if ids is None else list(ids)
    results: list[Replayed] = []
    producer = make_producer(bootstrap, client_id="switchyard-dead")
    await start_client(producer, "dead-replay")
    try:
        for letter_id in wanted:
            letter = letters.get(letter_id)
            if letter is None:
                results.append(Replayed(letter_id, "", None, "no such dead letter"))
                continue
            result = Replayed(letter.id, letter.topic, letter.partition)
            try:
                await send_and_wait(producer, letter.topic, letter.value, key=letter.key, partition=letter.partition,
                                    headers=_own(letter.headers) or None, attempts=3)
                await send_and_wait(producer, topics.DEAD, b"", key=letter.id.encode(),
                                    headers=[(topics.DEAD_HEADER_REPLAYED, letter.id.encode())])
            except DeliveryRefused as e:
                result.error = f"{e.reason}: {e.message}"
            except KafkaError as e:
                result.error = f"not delivered: {e!r}"
            results.append(result)
    finally:
        await producer.stop()
    return results
