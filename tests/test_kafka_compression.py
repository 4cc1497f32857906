"""Producers compress with LZ4 in its fast mode, and what they write is read back intact through a real broker.

aiokafka alone compresses at LZ4 level 9, several times slower for no gain on our messages
(shared/kafka_compression.py); Kafka and every consumer must still read the frames as before.
"""

from __future__ import annotations

import asyncio
import random
import string
import uuid

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.codec import lz4_decode, lz4_encode
from aiokafka.record.default_records import DefaultRecordBase, DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from switchyard.shared.kafka import ensure_topics, make_producer, start_client
from switchyard.shared.kafka_compression import LZ4_LEVEL
from tests.stack import RunningStack

LZ4 = 3
"""Kafka's attribute code for LZ4 in a record batch."""


def prompt_body(size: int = 130_000) -> bytes:
    """A chat request whose prompt is `size` bytes of word-like text (compressible, like real prompts)."""
    rng = random.Random(7)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(3000)]
    text = " ".join(rng.choice(words) for _ in range(size // 5))[:size]
    return orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": text}]})


def batch(value: bytes, compression: int) -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=compression, is_transactional=False,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=1 << 22)
    builder.append(0, timestamp=1, key=b"request-1", value=value, headers=[])
    return bytes(builder.build())


async def test_a_producers_batches_are_lz4_frames_from_the_fast_mode() -> None:
    await make_producer("127.0.0.1:9").stop()  # every producer is made there; this one never connects
    body = prompt_body()
    plain, compressed = batch(body, 0), batch(body, LZ4)
    header = DefaultRecordBase.HEADER_STRUCT.size
    records = plain[header:]
    assert compressed[header:] == lz4_encode(records, LZ4_LEVEL)
    assert len(compressed[header:]) != len(lz4_encode(records, 9))  # aiokafka's own level gives other frames
    assert lz4_decode(compressed[header:]) == records
    (record,) = list(MemoryRecords(compressed).next_batch())
    assert record.value == body


async def test_a_large_body_compressed_in_fast_mode_is_consumed_intact(stack: RunningStack) -> None:
    topic = f"test.compression.{uuid.uuid4().hex[:8]}"
    await ensure_topics(stack.bootstrap, {topic: 1})
    bodies = [prompt_body(), prompt_body(2_000), b"{}"]
    producer = make_producer(stack.bootstrap)
    await start_client(producer, "test-compression")
    try:
        for body in bodies:
            await (await producer.send(topic, body, key=b"request-1"))
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, fetch_max_wait_ms=100)
    await start_client(consumer, "test-compression-reader")
    try:
        part = TopicPartition(topic, 0)
        consumer.assign([part])
        await consumer.seek_to_beginning(part)
        read: list[bytes] = []
        async with asyncio.timeout(60):
            while len(read) < len(bodies):
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    read += [r.value for r in records]
    finally:
        await consumer.stop()
    assert read == bodies
