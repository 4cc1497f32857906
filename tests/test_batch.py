"""Batch jobs without HTTP: the CLI over a JSONL file, and any Kafka producer writing envelopes."""

from __future__ import annotations

import uuid

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from switchyard.shared import topics
from switchyard.shared.contracts import Reply, RequestEnvelope
from switchyard.shared.kafka import ensure_topics
from tests.stack import RunningStack


def test_batch_cli_writes_one_result_per_line(stack: RunningStack) -> None:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-test", "messages": [{"role": "user", "content": f"item {i}"}]}} for i in range(20)]
    lines.append({"custom_id": "bad-model", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "missing-model", "messages": [{"role": "user", "content": "x"}]}})
    (stack.cwd / "in.jsonl").write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\nnot json\n")
    result = stack.cli("batch", "run", "in.jsonl", "--out", "out.jsonl")
    assert result.returncode == 1  # some lines failed
    assert "20 succeeded, 2 failed" in result.stdout
    assert "22/22" in result.stderr  # the progress bar reached the end
    out = [orjson.loads(line) for line in (stack.cwd / "out.jsonl").read_bytes().splitlines()]
    by_id = {o["custom_id"]: o for o in out}
    assert len(out) == 22
    for i in range(20):
        resp = by_id[f"req-{i}"]["response"]
        assert resp["status_code"] == 200
        assert resp["body"]["choices"][0]["message"]["content"] == f"Echo: item {i}"
    assert by_id["bad-model"]["response"]["status_code"] == 404
    assert by_id["line-22"]["response"]["body"]["error"]["code"] == "invalid_line"


async def test_any_kafka_producer_can_submit_envelopes(stack: RunningStack) -> None:
    """The README example: produce an envelope naming your own reply topic, read the answer there."""
    reply_topic = f"my-app.replies.{uuid.uuid4().hex[:8]}"
    await ensure_topics(stack.bootstrap, {reply_topic: 1})
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, fetch_max_wait_ms=10)
    await producer.start()
    await consumer.start()
    try:
        consumer.assign([TopicPartition(reply_topic, 0)])
        await consumer.seek_to_beginning()
        envelope = RequestEnvelope(id=uuid.uuid4().hex, model="gpt-test", reply_topic=reply_topic,
                                   priority="batch", custom_id="doc-1",
                                   body={"model": "gpt-test", "messages": [{"role": "user", "content": "from kafka"}]})
        await producer.send_and_wait(topics.REQUESTS, envelope.model_dump_json().encode(), key=envelope.id.encode())
        record = await consumer.getone()
        reply = Reply.model_validate_json(record.value)
    finally:
        await consumer.stop()
        await producer.stop()
    assert reply.id == envelope.id and reply.custom_id == "doc-1"
    assert reply.type == "response" and reply.data is not None
    assert reply.data["choices"][0]["message"]["content"] == "Echo: from kafka"
