"""Sending to Kafka at least once: retried while the broker is briefly unreachable, refused at once for good.

A send the broker can never accept raises `DeliveryRefused` (shared/kafka_destinations.py) without a retry;
everything else is transient and retried with backoff. A consumer commits an offset only after what it owes
for that message is acknowledged (shared/kafka_offsets.py); duplicates are dropped downstream by id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from pydantic import BaseModel
from pydantic_core import to_json

from switchyard.shared import retry
from switchyard.shared.kafka_destinations import (
    REFUSED_INVALID_TOPIC,
    REFUSED_NOT_AUTHORIZED,
    DeliveryRefused,
    destinations,
    too_large,
)

log = logging.getLogger("switchyard.kafka")


def encode(message: BaseModel) -> bytes:
    """The message as JSON, as pydantic would write it.

    orjson over the model's fields (nested models through `_fields`) is the fast path: the contracts' fields
    are JSON's own types, so the bytes are the same document, and for a reply carrying stream chunks (free
    `dict[str, Any]` values, which pydantic's serializer inspects one by one) it takes a fifth of the time:
    1.4 vs 7.4 µs for a reply of three chat chunks, which a worker sends ~8 of per stream. What orjson
    refuses (an integer past 64 bits in a caller's body) goes through pydantic, as everything did before.
    """
    try:
        return orjson.dumps(message.__dict__, default=_fields)
    except TypeError:
        return to_json(message)


def _fields(value: Any) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        return value.__dict__
    raise TypeError(f"{type(value).__name__} is not JSON")


Headers = list[tuple[str, bytes]]
"""Kafka record headers, as aiokafka takes and gives them."""

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


async def _queue(producer: AIOKafkaProducer, topic: str, value: bytes, key: bytes | None, partition: int | None,
                 headers: Headers | None) -> asyncio.Future[Any]:
    """One try at queueing: the destination checked (`Destinations`), then the message handed to aiokafka."""
    await destinations(producer).check(topic, partition, len(value))
    future: asyncio.Future[Any] = await producer.send(topic, value, key=key, partition=partition, headers=headers)
    return future


async def send(producer: AIOKafkaProducer, topic: str, value: bytes, *, key: bytes | None = None,
               partition: int | None = None, headers: Headers | None = None,
               attempts: int = 20) -> asyncio.Future[Any]:
    """Queue a message and return the future of its acknowledgement.

    Checks the destination first (`Destinations`) and raises DeliveryRefused at once for what the broker
    can never accept; retries while the broker is briefly unreachable (e.g. just after a restart).
    """
    return await _retrying(lambda: _queue(producer, topic, value, key, partition, headers),
                           lambda e: refusal(producer, e, topic, partition, len(value)),
                           what="send", topic=topic, attempts=attempts)


async def send_and_wait(producer: AIOKafkaProducer, topic: str, value: bytes, *, key: bytes | None = None,
                        partition: int | None = None, headers: Headers | None = None, attempts: int = 20) -> Any:
    """Send and wait for the broker's acknowledgement, retrying transient failures; DeliveryRefused at once
    for a permanent one."""
    async def attempt() -> Any:  # queue and acknowledgement are one attempt: one retry loop covers both
        return await (await _queue(producer, topic, value, key, partition, headers))

    return await _retrying(attempt, lambda e: refusal(producer, e, topic, partition, len(value)),
                           what="delivery", topic=topic, attempts=attempts)


async def queue_then(redeliver: Callable[[], Awaitable[Any]], producer: AIOKafkaProducer, topic: str, value: bytes, *,
                     key: bytes | None = None, partition: int | None = None,
                     headers: Headers | None = None) -> asyncio.Future[Any]:
    """Queue a message now and return the future of its acknowledgement, with no task on the way.

    Nearly every send is queued at once and acknowledged on the first try, so that try runs inline and its
    outcome is the broker's acknowledgement, forwarded by a callback. If queueing it or its acknowledgement
    fails in any way, `redeliver()` (the caller's whole delivery: retries, refusals, dead letters) runs as a
    task, and its outcome becomes the returned future's. A worker sends ~5 messages a call; a task and three
    coroutine frames for each of them cost ~8 % of its CPU (bench/results/2026-12-03-profile-rest-s31.md).
    """
    try:
        first: asyncio.Future[Any] = await _queue(producer, topic, value, key, partition, headers)
    except (KafkaError, AssertionError, ValueError, DeliveryRefused):
        return asyncio.ensure_future(redeliver())
    outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def settle(ack: asyncio.Future[Any]) -> None:
        if not ack.cancelled() and ack.exception() is None:
            if not outcome.done():
                outcome.set_result(ack.result())
            return
        asyncio.ensure_future(redeliver()).add_done_callback(lambda done: forward(done, outcome))

    first.add_done_callback(settle)
    return outcome


def forward(done: asyncio.Future[Any], outcome: asyncio.Future[Any]) -> None:
    """Give `outcome` the outcome of `done` (unless it already has one)."""
    if outcome.done():
        return
    if done.cancelled():
        outcome.cancel()
    elif (error := done.exception()) is not None:
        outcome.set_exception(error)
    else:
        outcome.set_result(done.result())


def deliver(producer: AIOKafkaProducer, topic: str, value: bytes, *, key: bytes | None = None,
            partition: int | None = None, headers: Headers | None = None) -> asyncio.Task[Any]:
    """Start delivering a message; the task ends when the broker acknowledged it (retrying on the way), or
    fails with DeliveryRefused.

    Callers collect these tasks and commit their input offset only after all are done.
    """
    return asyncio.ensure_future(send_and_wait(producer, topic, value, key=key, partition=partition,
                                               headers=headers))
