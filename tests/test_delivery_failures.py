"""Messages the broker can never accept, dead letters, and rebalances, on the real stack (no Kafka mocks).

- a refused send (too large, no such topic or partition) raises DeliveryRefused at once, never retried; one
  queued inline (`queue_then`) resolves to what its full delivery ended with;
- a reply over the 16 MiB limit is sent in parts (tests/test_oversized.py), and one no part of which the
  reply topic accepts is a 413 there;
- an envelope the worker fails on is answered with a 500, not redelivered into a crash loop;
- batch envelopes whose reply topic or partition does not exist land in `llm.dead`, `switchyard dead list`
  shows them, `switchyard dead replay` delivers once the topic exists and reports a replay that fails again;
- a second worker joining mid-call: the call in flight is drained (called once, the stream not cut), the
  work still waiting for its provider's limit is cancelled and redelivered, and no process restarts;
- routers and accounting commit around their groups' rebalances and keep serving;
- OffsetTracker fences what a task from before a revocation reports.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy import bindparam, text

from switchyard.services.workers.outbox import Outbox
from switchyard.shared import topics, tracing
from switchyard.shared.contracts import Reply, RequestEnvelope
from switchyard.shared.db import make_engine
from switchyard.shared.dead import bury, read_dead
from switchyard.shared.kafka import ensure_topics, make_producer, start_client
from switchyard.shared.kafka_delivery import queue_then, send_and_wait
from switchyard.shared.kafka_destinations import (
    REFUSED_TOO_LARGE,
    REFUSED_UNKNOWN_PARTITION,
    REFUSED_UNKNOWN_TOPIC,
    DeliveryRefused,
)
from switchyard.shared.kafka_offsets import OffsetTracker
from switchyard.shared.settings import read_stack
from tests.conftest import Fakes
from tests.fakes.server import free_port
from tests.stack import RunningStack, _child_env

# ---- OffsetTracker: generation fencing (no broker needed) -------------------------------------------

TP = TopicPartition("llm.provider.openai", 3)


def test_a_task_from_before_a_revocation_cannot_finish_the_new_owners_offset() -> None:
    tracker = OffsetTracker()
    stale = tracker.started(TP, 10)
    tracker.forget([TP])  # revoked while the call for offset 10 was still running
    fresh = tracker.started(TP, 10)  # assigned again: offset 10 redelivered, in flight afresh
    assert tracker.finished(stale) is False  # the old task ends: it must not clear the new claim
    assert tracker.committable() == {TP: 10}
    assert tracker.finished(fresh) is True
    assert tracker.committable() == {TP: 11}


def test_fencing_is_per_partition_and_survives_going_back() -> None:
    tracker = OffsetTracker()
    other = TopicPartition("llm.provider.openai", 4)
    a, b = tracker.started(TP, 5), tracker.started(other, 7)
    tracker.forget([TP])
    assert tracker.finished(b) is True  # the partition kept has nothing fenced
    assert tracker.finished(a) is False
    c = tracker.started(TP, 20)
    d = tracker.started(TP, 3)  # the log went back (re-created): tracked afresh, c is fenced too
    assert tracker.finished(c) is False
    assert tracker.committable()[TP] == 3
    assert tracker.finished(d) is True
    assert tracker.committable()[TP] == 4


# ---- helpers ----------------------------------------------------------------------------------------


def restarts(stack: RunningStack) -> dict[str, int]:
    return dict(read_stack(stack.cwd)["restarts"])


@pytest.fixture(scope="module")
def restarts_before(stack: RunningStack) -> Iterator[dict[str, int]]:
    before = restarts(stack)
    yield before
    assert restarts(stack) == before, "no process may restart over a message or a rebalance"


def dead_list(stack: RunningStack) -> list[dict[str, Any]]:
    result = stack.cli("dead", "list", "--json", "--limit", "1000")
    assert result.returncode == 0, result.stderr
    return list(orjson.loads(result.stdout))


def wait_dead(stack: RunningStack, request_id: str, count: int = 1, timeout_s: float = 30) -> list[dict[str, Any]]:
    deadline = time.time() + timeout_s
    while True:
        found = [d for d in dead_list(stack) if d["request_id"] == request_id]
        if len(found) >= count or time.time() > deadline:
            return found
        time.sleep(0.5)


async def read_records(bootstrap: str, topic: str, want: int, timeout_s: float = 60) -> list[ConsumerRecord[Any, Any]]:
    """The first `want` records of partition 0 of `topic` (fewer if they do not come within `timeout_s`)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=100)
    await start_client(consumer, "test-replies")
    try:
        parts = [TopicPartition(topic, 0)]  # the tests' reply topics have one partition
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        out: list[ConsumerRecord[Any, Any]] = []
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(out) < want and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out += records
        return out
    finally:
        await consumer.stop()


async def read_replies(bootstrap: str, topic: str, want: int, timeout_s: float = 60) -> list[Reply]:
    return [Reply.model_validate_json(r.value) for r in await read_records(bootstrap, topic, want, timeout_s)]


async def create_limited_topic(bootstrap: str, topic: str, max_message_bytes: int) -> None:
    """A one-partition topic that takes at most `max_message_bytes` a message (its `max.message.bytes`), as a
    batch producer's reply topic created with other settings would; returns once the metadata lists it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": str(max_message_bytes)})])
    finally:
        await admin.close()
    await ensure_topics(bootstrap, {topic: 1})


async def produce_envelope(bootstrap: str, env: RequestEnvelope) -> None:
    producer = make_producer(bootstrap)
    await start_client(producer, "test-envelopes")
    try:
        await send_and_wait(producer, topics.REQUESTS, env.model_dump_json().encode(), key=env.id.encode(),
                            headers=[("traceparent", b"00-test-01")])
    finally:
        await producer.stop()


def envelope(reply_topic: str, text: str, partition: int | None = None, model: str = "gpt-test") -> RequestEnvelope:
    return RequestEnvelope(id=uuid.uuid4().hex, model=model, reply_topic=reply_topic, reply_partition=partition,
                           priority="batch", custom_id=text,
                           body={"model": model, "messages": [{"role": "user", "content": text}]})


def calls_with(fake: Any, text: str) -> int:
    return sum(1 for r in fake.calls("/chat/completions") if text in orjson.dumps(r.body).decode())


# ---- refusals are typed and immediate ----------------------------------------------------------------


async def test_refused_sends_raise_at_once_without_retrying(stack: RunningStack) -> None:
    topic = f"test.refusals.{uuid.uuid4().hex[:8]}"
    await ensure_topics(stack.bootstrap, {topic: 2})
    producer = make_producer(stack.bootstrap)
    await start_client(producer, "test-refusals")
    try:
        cases = [
            (f"test.missing.{uuid.uuid4().hex[:8]}", None, b"x", REFUSED_UNKNOWN_TOPIC, 404),
            (topic, 2, b"x", REFUSED_UNKNOWN_PARTITION, 404),
            (topic, -1, b"x", REFUSED_UNKNOWN_PARTITION, 404),
            (topic, 0, b"x" * (topics.MAX_MESSAGE_BYTES + 1), REFUSED_TOO_LARGE, 413),
        ]
        for dest, partition, value, reason, status in cases:
            started = time.monotonic()
            with pytest.raises(DeliveryRefused) as refused:
                await send_and_wait(producer, dest, value, partition=partition)
            assert (refused.value.reason, refused.value.status) == (reason, status), refused.value
            assert time.monotonic() - started < 5, f"{reason}: refused only after retrying"
        await send_and_wait(producer, topic, b"fine", partition=1)  # the producer is still good
    finally:
        await producer.stop()


async def test_a_message_over_its_topics_own_limit_is_refused_before_sending(stack: RunningStack) -> None:
    """A reply topic someone else made with a smaller `max.message.bytes`: a message over it is refused when
    queued, never by the broker, so the idempotent producer's sequence for that partition stays whole and the
    partition takes the next message (a refusal by the broker left every later send failing with
    OutOfOrderSequenceNumber)."""
    topic = f"test.topic-limit.{uuid.uuid4().hex[:8]}"
    await create_limited_topic(stack.bootstrap, topic, 3000)
    producer = make_producer(stack.bootstrap)  # idempotent, LZ4: as the services'
    await start_client(producer, "test-topic-limit")
    try:
        await send_and_wait(producer, topic, b"before", partition=0)
        for _ in range(2):
            with pytest.raises(DeliveryRefused) as refused:
                await send_and_wait(producer, topic, os.urandom(4000), partition=0)
            assert (refused.value.reason, refused.value.limit) == (REFUSED_TOO_LARGE, 3000)
        after = await send_and_wait(producer, topic, b"after", partition=0, attempts=2)
        assert (after.topic, after.partition, after.offset) == (topic, 0, 1)
    finally:
        await producer.stop()


async def test_queue_then_gives_the_acknowledgement_or_what_the_full_delivery_ended_with(stack: RunningStack) -> None:
    """A worker queues what a call owes inline (`queue_then`): a send the broker takes resolves to its
    acknowledgement without running the fallback; one refused when queued (no such partition, too large for
    the client or for the topic's own limit) resolves to the fallback's outcome."""
    topic = f"test.queue-then.{uuid.uuid4().hex[:8]}"
    small = f"test.queue-then-small.{uuid.uuid4().hex[:8]}"
    await ensure_topics(stack.bootstrap, {topic: 2})
    await create_limited_topic(stack.bootstrap, small, 2000)
    producer = make_producer(stack.bootstrap, compression_type=None)  # the broker sees the bytes as they are
    await start_client(producer, "test-queue-then")
    fallbacks: list[str] = []

    def fallback(name: str) -> Callable[[], Awaitable[str]]:
        async def redeliver() -> str:
            fallbacks.append(name)
            return f"redelivered {name}"
        return redeliver

    try:
        taken = await (await queue_then(fallback("taken"), producer, topic, b"fine", partition=1))
        assert (taken.topic, taken.partition) == (topic, 1)
        assert fallbacks == []
        no_partition = await queue_then(fallback("no partition"), producer, topic, b"x", partition=2)
        assert await no_partition == "redelivered no partition"
        too_large = await queue_then(fallback("too large"), producer, topic, b"x" * (topics.MAX_MESSAGE_BYTES + 1))
        assert await too_large == "redelivered too large"
        over_topic_limit = await queue_then(fallback("over the topic's limit"), producer, small, b"x" * 4000,
                                            partition=0)
        assert await over_topic_limit == "redelivered over the topic's limit"
        assert fallbacks == ["no partition", "too large", "over the topic's limit"]
        assert (await (await queue_then(fallback("after"), producer, topic, b"fine"))).topic == topic
    finally:
        await producer.stop()


async def test_replies_queued_from_callbacks_leave_in_order_each_with_its_own_trace(stack: RunningStack) -> None:
    """A stream's chunk messages are queued from acknowledgement callbacks (`Outbox.reply_later`), many at
    once when one produce response acknowledges several streams: they reach the reply topic in the order
    queued, each under the trace context it was queued in, and each future resolves once it is stored."""
    topic = f"test.reply-later.{uuid.uuid4().hex[:8]}"
    await ensure_topics(stack.bootstrap, {topic: 1})
    producer = make_producer(stack.bootstrap)
    await start_client(producer, "test-reply-later")
    outbox = Outbox(producer, "test")
    env = RequestEnvelope(id=uuid.uuid4().hex, model="m", body={}, reply_topic=topic, reply_partition=0)
    traces = [f"00-{i:032x}-{i:016x}-01" for i in range(1, 21)]

    def queue(seq: int) -> asyncio.Future[Any]:  # as an acknowledgement callback does, in its stream's context
        tracing.use(tracing.parse_traceparent(traces[seq]))
        return outbox.reply_later(env, Reply(id=env.id, seq=seq, type="chunk", data={"n": seq}))

    try:
        acks = await asyncio.gather(*[contextvars.Context().run(queue, seq) for seq in range(len(traces))])
        assert all(ack.topic == topic for ack in acks)
        records = await read_records(stack.bootstrap, topic, want=len(traces))
        assert [Reply.model_validate_json(r.value).seq for r in records] == list(range(len(traces)))
        assert [dict(r.headers)["traceparent"].decode() for r in records] == traces
    finally:
        await producer.stop()


async def test_a_message_the_worker_fails_on_is_answered_not_redelivered(
        stack: RunningStack, fakes: Fakes, restarts_before: dict[str, int]) -> None:
    """A batch producer's envelope the worker cannot handle (its pacer cannot read `max_tokens`): the request
    gets a 500 and the offset moves on, where the worker used to exit and meet the message again."""
    reply_topic = f"test.poison.{uuid.uuid4().hex[:8]}"
    await ensure_topics(stack.bootstrap, {reply_topic: 1})
    poison = envelope(reply_topic, f"poison {uuid.uuid4().hex}")
    poison.body["max_tokens"] = "as many as you like"
    await produce_envelope(stack.bootstrap, poison)
    [reply] = await read_replies(stack.bootstrap, reply_topic, want=1)
    assert reply.id == poison.id and reply.type == "error" and reply.status == 500, reply
    assert reply.data is not None and reply.data["error"]["code"] == "worker_error"
    assert calls_with(fakes.main, poison.custom_id or "") == 0
    await asyncio.sleep(2)  # were it redelivered, a second answer would follow
    assert len(await read_replies(stack.bootstrap, reply_topic, want=2, timeout_s=3)) == 1
    assert restarts(stack) == restarts_before


# ---- envelopes with nowhere to be answered -------------------------------------------------------------


async def test_envelopes_without_a_reply_destination_are_dead_lettered_and_replayed(
        stack: RunningStack, fakes: Fakes, restarts_before: dict[str, int]) -> None:
    missing = f"test.late-replies.{uuid.uuid4().hex[:8]}"
    narrow = f"test.narrow-replies.{uuid.uuid4().hex[:8]}"
    await ensure_topics(stack.bootstrap, {narrow: 1})
    no_topic = envelope(missing, f"no topic {uuid.uuid4().hex}")
    no_partition = envelope(narrow, f"no partition {uuid.uuid4().hex}", partition=5)
    await produce_envelope(stack.bootstrap, no_topic)
    await produce_envelope(stack.bootstrap, no_partition)

    [dead_topic] = await asyncio.to_thread(wait_dead, stack, no_topic.id)
    [dead_partition] = await asyncio.to_thread(wait_dead, stack, no_partition.id)
    assert dead_topic["reason"] == REFUSED_UNKNOWN_TOPIC and missing in dead_topic["error"]
    assert dead_partition["reason"] == REFUSED_UNKNOWN_PARTITION and "partition 5" in dead_partition["error"]
    for dead in (dead_topic, dead_partition):
        assert dead["topic"] == topics.REQUESTS and dead["service"] == "router" and not dead["replayed"]
    assert calls_with(fakes.main, no_topic.custom_id or "") == 0  # refused before any provider call
    assert calls_with(fakes.main, no_partition.custom_id or "") == 0

    letters = {d.id: d for d in await read_dead(stack.bootstrap)}
    kept = letters[dead_topic["id"]]
    assert kept.value == no_topic.model_dump_json().encode() and kept.key == no_topic.id.encode()
    assert ("traceparent", b"00-test-01") in kept.headers  # the original headers travel with it

    table = stack.cli("dead", "list")
    assert table.returncode == 0 and dead_topic["id"] in table.stdout and no_topic.id in table.stdout
    assert REFUSED_UNKNOWN_TOPIC in table.stdout and topics.REQUESTS in table.stdout

    await ensure_topics(stack.bootstrap, {missing: 1})
    replayed = stack.cli("dead", "replay", "--id", dead_topic["id"])
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    [reply] = await read_replies(stack.bootstrap, missing, want=1)
    assert reply.id == no_topic.id and reply.type == "response" and reply.data is not None
    assert reply.data["choices"][0]["message"]["content"] == f"Echo: {no_topic.custom_id}"
    assert [d["replayed"] for d in dead_list(stack) if d["id"] == dead_topic["id"]] == [True]

    # Still no partition 5: the replay reaches the router, which dead-letters it again with its reason.
    assert stack.cli("dead", "replay", "--id", dead_partition["id"]).returncode == 0
    again = await asyncio.to_thread(wait_dead, stack, no_partition.id, 2)
    assert len(again) == 2 and again[-1]["reason"] == REFUSED_UNKNOWN_PARTITION
    assert restarts(stack) == restarts_before


async def test_a_replay_that_fails_again_is_reported(stack: RunningStack) -> None:
    """A dead reply whose topic still does not exist: the replay is refused, reported, and stays pending."""
    gone = f"test.gone.{uuid.uuid4().hex[:8]}"
    producer = make_producer(stack.bootstrap)
    await start_client(producer, "test-bury")
    try:
        reply = Reply(id=uuid.uuid4().hex, type="response", data={"ok": True})
        with pytest.raises(DeliveryRefused) as refused:
            await send_and_wait(producer, gone, reply.model_dump_json().encode(), partition=0)
        await bury(producer, refused.value, reply.model_dump_json().encode(), key=reply.id.encode(),
                   service="test", request_id=reply.id)
    finally:
        await producer.stop()
    [dead] = await asyncio.to_thread(wait_dead, stack, reply.id)
    assert dead["topic"] == gone and dead["partition"] == 0
    result = stack.cli("dead", "replay", "--id", dead["id"], "--id", "0-999999999")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{dead['id']}  FAILED: {REFUSED_UNKNOWN_TOPIC}" in result.stdout
    assert "0-999999999  FAILED: no such dead letter" in result.stdout
    assert [d["replayed"] for d in dead_list(stack) if d["id"] == dead["id"]] == [False]


# ---- a rebalance while calls are in flight --------------------------------------------------------------


def _start_service(stack: RunningStack, log_path: Path, *argv: str) -> subprocess.Popen[bytes]:
    """Another `switchyard <argv>` process on the stack's broker and database (a dynamic group member: no
    replica index), returned once its /ready answers."""
    port = free_port()
    env = _child_env({"KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap, "DATABASE_URL": stack.database_url,
                      "SWITCHYARD_CONFIG": str(stack.cwd / "switchyard.yaml"),
                      "TEST_UPSTREAM_KEY": "sk-upstream-secret",
                      "SWITCHYARD_BROKER": str(stack.info.get("broker_kind") or "kafka")})
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "switchyard.cli", *argv, "--health-port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while True:
        assert proc.poll() is None, f"{argv} exited:\n{log_path.read_text()}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, f"{argv} did not get ready:\n{log_path.read_text()}"
        time.sleep(0.2)


def _stop_service(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    proc.terminate()
    assert proc.wait(timeout=40) == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()


def _log_entries(path: Path, since: float) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("ts", 0) >= since:
            out.append(entry)
    return out


def test_a_worker_joining_mid_call_neither_repeats_nor_cuts_it(
        stack: RunningStack, fakes: Fakes, tmp_path: Path, restarts_before: dict[str, int]) -> None:
    marker = uuid.uuid4().hex[:8]
    slow_text, stream_text, queued_text = f"slow {marker}", f"stream {marker}", f"queued {marker}"
    results: dict[str, Any] = {}

    def post(name: str, body: dict[str, Any]) -> None:
        try:
            results[name] = httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=stack.headers(),
                                       timeout=120)
        except httpx.HTTPError as e:
            results[name] = e

    # Work waiting for its provider: a batch request whose first call got a 429 (the worker waits for the
    # key to be free again, past the rebalance). Then two calls in flight for 20 s: one plain, one streamed.
    # Both outlast the extra worker's start and the rebalance it causes, even on a loaded machine (with 8 s the
    # calls could end before a slow start had joined the group, and there was nothing in flight to hand over).
    reply_topic = f"test.rebalance.{marker}"
    asyncio.run(ensure_topics(stack.bootstrap, {reply_topic: 1}))
    fakes.faulty.inject(status=429, retry_after=40)
    queued = envelope(reply_topic, queued_text, model="faulty")
    asyncio.run(produce_envelope(stack.bootstrap, queued))
    fakes.main.inject(latency_ms=20_000, times=2)
    threads = [threading.Thread(target=post, args=("slow", {"model": "gpt-test",
                                                            "messages": [{"role": "user", "content": slow_text}]})),
               threading.Thread(target=post, args=("stream", {"model": "gpt-test", "stream": True,
                                                              "messages": [{"role": "user", "content": stream_text}]}))]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while calls_with(fakes.faulty, queued_text) < 1 or calls_with(fakes.main, marker) < 2:
        assert time.time() < deadline, "the calls did not start"
        time.sleep(0.05)

    joined_at = time.time()
    log_path = tmp_path / "worker-openai-extra.log"
    proc = _start_service(stack, log_path, "worker", "--provider", "openai")  # ready: the rebalance is done
    try:
        for t in threads:
            t.join(60)
        [queued_reply] = asyncio.run(read_replies(stack.bootstrap, reply_topic, want=1, timeout_s=60))

        slow, stream = results["slow"], results["stream"]
        assert isinstance(slow, httpx.Response) and slow.status_code == 200, slow
        assert slow.json()["choices"][0]["message"]["content"] == f"Echo: {slow_text}"
        assert isinstance(stream, httpx.Response) and stream.status_code == 200, stream
        events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", stream.text
        chunks = [orjson.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), stream.text
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        assert text == f"Echo: {stream_text}"
        assert calls_with(fakes.main, slow_text) == 1 and calls_with(fakes.main, stream_text) == 1

        assert queued_reply.id == queued.id and queued_reply.type == "response", queued_reply
        assert calls_with(fakes.faulty, queued_text) == 2  # the 429, then the redelivered message's call

        # The first worker gave its partitions up while the calls ran: it cancelled the waiting work and
        # drained the two calls in flight.
        [first_log] = list(stack.cwd.rglob("worker-openai-0.log"))
        gave_up = [e for e in _log_entries(first_log, joined_at) if e.get("msg") == "giving partitions up"]
        assert any(e["cancelled"] >= 1 and e["calls"] >= 2 for e in gave_up), gave_up
        assert not [e for e in _log_entries(first_log, joined_at) if "still in flight" in str(e.get("msg"))]

        r = httpx.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(), timeout=60,
                       json={"model": "gpt-test", "messages": [{"role": "user", "content": "after"}]})
        assert r.status_code == 200, r.text
    finally:
        _stop_service(proc, log_path)
    assert restarts(stack) == restarts_before


def test_routers_and_accounting_keep_going_through_rebalances(
        stack: RunningStack, tmp_path: Path, restarts_before: dict[str, int]) -> None:
    """A second router and a second accounting process join their groups and leave again under steady
    traffic: the stack's own router and accounting commit around both rebalances and keep serving."""
    stop = threading.Event()
    answered: list[str] = []
    failed: list[str] = []

    def traffic() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(f"{stack.url}/v1/chat/completions", headers=stack.headers(),
                                json={"model": "gpt-test", "messages": [{"role": "user", "content": "steady"}]})
                (answered if r.status_code == 200 else failed).append(r.headers.get("x-request-id") or r.text)
                time.sleep(0.02)

    sender = threading.Thread(target=traffic)
    sender.start()
    started_at = time.time()
    try:
        extra = [(tmp_path / "router-extra.log", ("router",)), (tmp_path / "accounting-extra.log", ("accounting",))]
        procs = [(_start_service(stack, log, *argv), log) for log, argv in extra]
        time.sleep(5)  # both groups rebalance with the newcomers in them, under traffic
        for proc, log in procs:
            _stop_service(proc, log)  # and again as they leave
        time.sleep(3)
    finally:
        stop.set()
        sender.join(90)
    assert not failed, failed[:3]
    assert len(answered) >= 20

    async def stored() -> set[str]:
        engine = make_engine(stack.database_url, pool_size=1)
        query = text("SELECT DISTINCT request_id FROM usage WHERE status = 200 AND request_id IN :ids")
        try:
            deadline = time.time() + 60
            while True:
                async with engine.connect() as conn:
                    found = {r[0] for r in await conn.execute(query.bindparams(bindparam("ids", expanding=True)),
                                                              {"ids": answered})}
                if found >= set(answered) or time.time() > deadline:
                    return found
                await asyncio.sleep(0.5)
        finally:
            await engine.dispose()

    assert set(answered) - asyncio.run(stored()) == set(), "every answered call has its usage row"
    for name in ("router-0.log", "accounting-0.log"):
        [log] = list(stack.cwd.rglob(name))
        entries = _log_entries(log, started_at)
        revoked = [e for e in entries if e.get("msg") == "partitions revoked" and e["partitions"]]
        assert len(revoked) >= 2 and all(e["committed"] for e in revoked), (name, revoked)  # join, leave
        assert not [e for e in entries if e.get("msg") == "service loop failed"]
    assert restarts(stack) == restarts_before
