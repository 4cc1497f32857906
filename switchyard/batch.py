"""Batch jobs through Kafka, no HTTP: `switchyard batch run IN.jsonl --out OUT.jsonl`.

Input lines are OpenAI batch lines (`custom_id`, `method`, `url`, `body`). Each becomes a
request envelope with its own reply topic (`llm.batch.<job>`) and `priority: batch`, so the
gateway paces it behind interactive traffic; results are written as they arrive, one line
per request, in OpenAI's batch output format. An answer sent in parts (too large for one message,
shared/parts.py) is joined before it is written.

A job outlives a restart of the Tansu fallback broker (`switchyard up`), which loses every queued message:
the job writes a marker into its reply partition first, checks every LOST_CHECK_S that the marker is still
there, and when the broker lost it, re-creates the reply topic, reads it from its beginning and sends
the requests still unanswered again (same ids: an answer that arrives twice is written once).
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
import uuid
from pathlib import Path
from typing import TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from switchyard.shared import topics
from switchyard.shared.batch import LineError, envelope_for, parse_line, result_line, terminal
from switchyard.shared.contracts import now_ms
from switchyard.shared.kafka import Producer, ensure_topics, make_consumer, make_producer, start_client
from switchyard.shared.kafka_delivery import encode, send, send_and_wait
from switchyard.shared.parts import Assembler
from switchyard.shared.tansu import is_tansu

DEFAULT_WINDOW_S = 24 * 3600

LOST_CHECK_S = 5.0
"""How often a waiting job checks that the broker still holds its marker (one fetch of one record)."""

MARKER_KEY = b"switchyard.batch.marker"
"""The key of the record a job writes into its own reply partition (and skips when reading replies)."""

class Progress:
    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.stream = stream
        self.started = time.monotonic()
        self._last = 0.0

    def tick(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if time.monotonic() - self._last > 0.1 or self.done == self.total:
            self._last = time.monotonic()
            self.draw()

    def draw(self) -> None:
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        rate = self.done / max(1e-6, time.monotonic() - self.started)
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                          f"({self.failed} failed, {rate:.1f}/s)")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()

async def _submit(producer: Producer, envelopes: dict[str, bytes]) -> None:
    acks = [await send(producer, topics.REQUESTS, raw, key=rid.encode()) for rid, raw in envelopes.items()]
    await asyncio.gather(*acks)

async def _mark(producer: Producer, tp: TopicPartition) -> int:
    """Write the job's marker into its reply partition; returns its offset."""
    meta = await send_and_wait(producer, tp.topic, b"{}", key=MARKER_KEY, partition=tp.partition)
    return int(meta.offset)

async def marker_lost(probe: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> bool:
    """True when the reply partition no longer holds the job's marker at `offset`: the broker lost the log,
    and the requests and replies it held with it (the embedded Tansu restarted; Apache Kafka keeps a log for
    days, so only a job on Tansu checks). False while the broker cannot answer. `probe` is assigned `tp` and
    kept paused between checks, so that it fetches one record per check, not every reply."""
    polled = probe.last_poll_timestamp(tp)
    probe.seek(tp, offset)
    probe.resume(tp)
    try:
        records = (await probe.getmany(tp, timeout_ms=2000, max_records=1)).get(tp) or []
    finally:
        probe.pause(tp)
    if records:
        return bool(records[0].offset != offset or records[0].key != MARKER_KEY)
    highwater = probe.highwater(tp)  # from a fetch at `offset`, if one was answered just now
    return probe.last_poll_timestamp(tp) != polled and highwater is not None and highwater <= offset

async def run_batch(in_path: Path, out_path: Path, bootstrap: str, window_s: float = DEFAULT_WINDOW_S,
                    key_id: str = "batch", quiet: bool = False) -> dict[str, int]:
    job = uuid.uuid4().hex[:16]
    reply_topic = f"{topics.BATCH_REPLY_PREFIX}{job}"
    await ensure_topics(bootstrap, {reply_topic: 1})
    producer = make_producer(bootstrap)
    consumer = make_consumer(bootstrap=bootstrap, group_id=None, tansu_fetch_wait_ms=20)
    probe = make_consumer(bootstrap=bootstrap, group_id=None, tansu_fetch_wait_ms=20)
    await start_client(producer, "batch-producer")
    await start_client(consumer, "batch-consumer")
    await start_client(probe, "batch-probe")
    tp = TopicPartition(reply_topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    probe.assign([tp])
    probe.pause(tp)
    waiting: dict[str, str] = {}
    assembler = Assembler()
    envelopes: dict[str, bytes] = {}
    lines = (await asyncio.to_thread(in_path.read_text)).splitlines()
    progress = Progress(sum(1 for line in lines if line.strip()), io.StringIO() if quiet else sys.stderr)
    counts = {"total": progress.total, "succeeded": 0, "failed": 0}
    loop = asyncio.get_running_loop()
    with out_path.open("wb") as out:  # noqa: ASYNC230 - small sequential appends
        try:
            marker = await _mark(producer, tp)
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    custom_id, kind, body = parse_line(number, line)
                except LineError as e:
                    rid = uuid.uuid4().hex
                    out.write(result_line(f"line-{number}", rid, 400, {"error": {
                        "message": str(e), "type": "invalid_request_error", "param": None, "code": "invalid_line"}}))
                    counts["failed"] += 1
                    progress.tick(False)
                    continue
                rid = uuid.uuid4().hex
                waiting[rid] = custom_id
                env = envelope_for(rid, custom_id, kind, body, reply_topic, now_ms() + int(window_s * 1000), key_id)
                envelopes[rid] = encode(env)
            await _submit(producer, envelopes)
            next_check = loop.time() + LOST_CHECK_S
            while waiting:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        if record.key == MARKER_KEY:
                            continue
                        reply = terminal(record.value, assembler)
                        if reply is None or reply.id not in waiting:
                            continue  # a part (kept until its response), a duplicate, or unreadable
                        custom_id = waiting.pop(reply.id)
                        envelopes.pop(reply.id, None)
                        assembler.forget(reply.id)
                        ok = reply.type == "response"
                        out.write(result_line(custom_id, reply.id, reply.status, reply.data))
                        out.flush()
                        counts["succeeded" if ok else "failed"] += 1
                        progress.tick(ok)
                if waiting and is_tansu() and loop.time() >= next_check:
                    try:
                        lost = bool(await ensure_topics(bootstrap, {reply_topic: 1}, timeout_s=10.0)
                                    or await marker_lost(probe, tp, marker))
                    except (KafkaError, OSError):
                        lost = False  # the broker is away: check again later
                    if lost:
                        progress.stream.write(f"\nthe broker lost this job's {len(waiting)} unanswered requests "
                                              "(it restarted?); sending them again\n")
                        marker = await _mark(producer, tp)
                        await consumer.seek_to_beginning(tp)  # the new log holds only what was written since
                        await _submit(producer, envelopes)
                    next_check = loop.time() + LOST_CHECK_S
        finally:
            await probe.stop()
            await consumer.stop()
            await producer.stop()
    return counts
