"""A lagging reader (shared/kafka.py's LaggingFetch: accounting, the health feeds) against a real broker: while
messages flow it batches its fetches, and once a read finds nothing it stops asking every interval and waits for
the next message instead, which still reaches it.

Idle fetches were most of an idle stack's Python CPU (ingress's health feed asked 20 times a second). The fetch
requests are counted at the consumer's own client, as they leave for the broker.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.protocol.fetch import FetchRequest

from switchyard.shared.kafka import LaggingFetch, ensure_topics, make_consumer, make_producer, start_client
from tests.stack import RunningStack

WAIT_MS = 50


@contextmanager
def counting_fetches(consumer: AIOKafkaConsumer) -> Iterator[list[float]]:
    """The times at which `consumer` sends a fetch request, while the block runs."""
    sent: list[float] = []
    client = consumer._client
    real_send = client.send

    async def send(node_id: int, request: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(request, FetchRequest):
            sent.append(asyncio.get_running_loop().time())
        return await real_send(node_id, request, *args, **kwargs)

    client.send = send
    try:
        yield sent
    finally:
        client.send = real_send


async def fetches_in(consumer: AIOKafkaConsumer, lag: LaggingFetch | None, seconds: float) -> int:
    """Read for `seconds` as a lagging reader does (`follow` after each read, unless `lag` is None: a reader that
    never adapts); the fetches sent meanwhile."""
    with counting_fetches(consumer) as sent:
        end = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < end:
            batches = await consumer.getmany(timeout_ms=2 * WAIT_MS)
            if lag is not None:
                lag.follow(consumer, bool(batches))
    return len(sent)


async def test_an_idle_lagging_reader_waits_for_the_next_message_instead_of_asking_every_interval(
        stack: RunningStack) -> None:
    topic = f"test.lagging.{uuid.uuid4().hex[:8]}"
    await ensure_topics(stack.bootstrap, {topic: 1})
    part = TopicPartition(topic, 0)
    lag = LaggingFetch(WAIT_MS, 16 << 10)
    consumer = make_consumer(bootstrap=stack.bootstrap, group_id=None, **lag.options())
    producer = make_producer(stack.bootstrap)
    await start_client(consumer, "test-lagging")
    await start_client(producer, "test-lagging-producer")
    try:
        consumer.assign([part])
        await consumer.seek_to_end(part)
        batching = await fetches_in(consumer, None, 1.0)  # the fixed settings: a fetch every 50 ms
        await fetches_in(consumer, lag, 0.3)  # the adapting reader: its first empty read ends the batching
        idle = await fetches_in(consumer, lag, 1.0)
        assert batching >= 8, batching  # a fetch every 50 ms: about 20 in that second
        assert idle <= 4, idle  # the broker holds each fetch up to 500 ms: about 2

        await (await producer.send(topic, b"after a quiet spell"))
        read: list[bytes] = []
        async with asyncio.timeout(30):
            while not read:
                batches = await consumer.getmany(timeout_ms=2 * WAIT_MS)
                lag.follow(consumer, bool(batches))
                read += [r.value or b"" for records in batches.values() for r in records]
        assert read == [b"after a quiet spell"]
        assert (consumer._fetcher._fetch_min_bytes, consumer._fetcher._fetch_max_wait_ms) == (16 << 10, WAIT_MS)
    finally:
        await consumer.stop()
        await producer.stop()


async def test_an_idle_lagging_reader_reads_rarely_and_a_busy_one_every_two_intervals(stack: RunningStack) -> None:
    """The read timeout follows the reader's state: two batching intervals while it batches (a read that finds
    nothing in them ends the batching), and while idle twice the broker's hold, so an idle reader's loop does not
    spin (ingress's health feed read ten times a second for nothing)."""
    topic = f"test.lagging.{uuid.uuid4().hex[:8]}"
    await ensure_topics(stack.bootstrap, {topic: 1})
    part = TopicPartition(topic, 0)
    lag = LaggingFetch(WAIT_MS, 16 << 10)
    consumer = make_consumer(bootstrap=stack.bootstrap, group_id=None, **lag.options())
    await start_client(consumer, "test-lagging-reads")
    try:
        consumer.assign([part])
        await consumer.seek_to_end(part)
        assert lag.read_timeout_ms == 2 * WAIT_MS
        lag.follow(consumer, bool(await consumer.getmany(timeout_ms=lag.read_timeout_ms)))  # finds nothing
        assert lag.read_timeout_ms >= 2 * 500
        reads = 0
        end = asyncio.get_running_loop().time() + 2.0
        while asyncio.get_running_loop().time() < end:
            lag.follow(consumer, bool(await consumer.getmany(timeout_ms=lag.read_timeout_ms)))
            reads += 1
        assert reads <= 3, reads  # 2 s at 1 s a read; at 100 ms, 20
    finally:
        await consumer.stop()
