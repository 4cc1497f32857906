"""Large bodies and large answers on Apache Kafka, end to end (no mocks):

- a 5 MB chat request is answered, and so is a body just under ingress's 8 MiB limit (never a 503 after
  retries or a 504 at the deadline); one byte over is a 413 at once;
- a 3 MB embeddings reply is delivered whole;
- an embeddings reply larger than a Kafka message may be (22 MiB) is sent in parts and joined by ingress
  (and by a batch job), with one provider call; a reply topic created with Kafka's default 1 MiB limit
  gets its answer in parts too.
The splitting and joining themselves (shared/parts.py, ingress's Pending) are checked without a broker.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from switchyard.services.ingress.replies import Pending
from switchyard.services.ingress.validation import MAX_BODY_BYTES
from switchyard.shared import topics
from switchyard.shared.contracts import Reply, RequestEnvelope
from switchyard.shared.kafka_delivery import encode
from switchyard.shared.parts import PART_BYTES, Assembler, pieces, split
from tests import test_delivery_failures
from tests.conftest import Fakes
from tests.stack import RunningStack
from tests.test_delivery_failures import create_limited_topic, produce_envelope, read_replies, restarts

restarts_before = test_delivery_failures.restarts_before
"""The stack's restart counts before this module's tests (a module fixture): none may restart."""

# ---- parts, without a broker ---------------------------------------------------------------------------


def _answer(size: int) -> dict[str, Any]:
    text = ("é€😀\"\\ plain " * (size // 20 + 1))[: size // 2]
    return {"object": "list", "data": [{"index": 0, "text": text}], "usage": {"prompt_tokens": 3}}


def test_parts_never_cut_a_character_and_each_fits_a_default_kafka_topic() -> None:
    data = orjson.dumps(_answer(3 << 20))
    texts = pieces(data)
    assert "".join(texts).encode() == data and len(texts) > 1
    response = Reply(id="r", type="response", data=orjson.loads(data), call="c1", custom_id="row")
    messages = split(response, data)
    assert [m.type for m in messages] == ["part"] * len(texts) + ["response"]
    assert [m.seq for m in messages] == list(range(len(messages)))
    assert messages[-1].parts == len(texts) and messages[-1].data is None
    assert all(len(encode(m)) < 1 << 20 for m in messages)  # Kafka's default message.max.bytes
    assert all(len(t.encode()) <= PART_BYTES for t in texts)


def test_ingress_joins_parts_out_of_order_and_duplicated() -> None:
    answer = _answer(2 << 20)
    messages = split(Reply(id="r", type="response", data=answer, call="c1"), orjson.dumps(answer))
    pending = Pending()
    for m in [messages[1], messages[0], messages[-1], messages[0], *messages[2:]]:
        pending.offer(m)
    assert pending.queue.qsize() == 1 and pending.finished
    whole = pending.queue.get_nowait()
    assert (whole.type, whole.data) == ("response", answer)


def test_a_call_redone_midway_replaces_the_parts_of_the_one_it_redoes() -> None:
    first = _answer(2 << 20)
    second = {**first, "usage": {"prompt_tokens": 4}}
    dead = split(Reply(id="r", type="response", data=first, call="dead"), orjson.dumps(first))
    redone = split(Reply(id="r", type="response", data=second, call="redone"), orjson.dumps(second))
    pending = Pending()
    for m in [*dead[:2], *redone, dead[2], dead[0]]:  # the first worker died after two parts
        pending.offer(m)
    assert pending.queue.qsize() == 1
    assert pending.queue.get_nowait().data == second


def test_a_batch_reader_joins_parts_per_call_and_forgets_them() -> None:
    answer = _answer(1 << 20)
    messages = split(Reply(id="r", type="response", data=answer, call="c1", custom_id="row"), orjson.dumps(answer))
    assembler = Assembler()
    assert [assembler.offer(m) for m in messages[:-1]] == [None] * (len(messages) - 1)
    whole = assembler.offer(messages[-1])
    assert whole is not None and whole.data == answer and whole.custom_id == "row"
    assembler.forget("r")
    assert assembler.offer(messages[-1]) is None  # its parts are gone: nothing half-joined


# ---- on the stack --------------------------------------------------------------------------------------


def _post(stack: RunningStack, path: str, body: bytes | dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(f"{stack.url}{path}", content=content, timeout=180,
                      headers={**stack.headers(), "content-type": "application/json", "x-switchyard-timeout": "120"})


def _chat_body(content_bytes: int, marker: str) -> bytes:
    """A chat body of exactly `content_bytes` bytes (ASCII), its one user message padded to fit."""
    head = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": marker}]})
    pad = "x" * (content_bytes - len(head))
    return orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": marker + pad}]})


def test_a_5_mb_chat_request_is_answered(stack: RunningStack, fakes: Fakes, restarts_before: dict[str, int]) -> None:
    marker = uuid.uuid4().hex
    body = _chat_body(5_000_000, marker)
    r = _post(stack, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text[:500]
    content = r.json()["choices"][0]["message"]["content"]
    assert content.startswith(f"Echo: {marker}") and len(content) > 4_999_000
    [call] = [c for c in fakes.main.calls("/chat/completions") if marker in c.body["messages"][0]["content"]]
    assert len(call.body["messages"][0]["content"]) == len(content) - len("Echo: ")
    assert restarts(stack) == restarts_before


def test_a_body_just_under_the_ingress_limit_is_answered_and_one_over_is_a_413(
        stack: RunningStack, restarts_before: dict[str, int]) -> None:
    marker = uuid.uuid4().hex
    r = _post(stack, "/v1/chat/completions", _chat_body(MAX_BODY_BYTES - 28, marker))
    assert r.status_code == 200, r.text[:500]  # not a 503 after retries, not a 504 at the deadline
    assert r.json()["choices"][0]["message"]["content"].startswith(f"Echo: {marker}")

    r = _post(stack, "/v1/chat/completions", _chat_body(MAX_BODY_BYTES + 1, marker))
    assert r.status_code == 413, r.text[:500]
    assert r.json()["error"]["code"] == "body_too_large"
    assert restarts(stack) == restarts_before


def test_a_3_mb_embeddings_reply_is_delivered(stack: RunningStack, fakes: Fakes,
                                              restarts_before: dict[str, int]) -> None:
    inputs = [f"document {i}" for i in range(110)]
    r = _post(stack, "/v1/embeddings", {"model": "gpt-test", "input": inputs, "dimensions": 1536})
    assert r.status_code == 200, r.text[:500]
    assert len(r.content) > 3_000_000
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(110)) and {len(d["embedding"]) for d in data} == {1536}
    assert len(fakes.main.calls("/embeddings")) == 1
    assert restarts(stack) == restarts_before


def test_an_embeddings_reply_larger_than_a_message_arrives_whole(stack: RunningStack, fakes: Fakes,
                                                                  restarts_before: dict[str, int]) -> None:
    # 300 inputs x 4096 dimensions is about 22 MiB of JSON: more than a message may have (16 MiB).
    inputs = [f"item {i}" for i in range(300)]
    r = _post(stack, "/v1/embeddings", {"model": "gpt-test", "input": inputs, "dimensions": 4096})
    assert r.status_code == 200, r.text[:500]
    assert len(r.content) > topics.MAX_MESSAGE_BYTES
    body = r.json()
    assert [d["index"] for d in body["data"]] == list(range(300))
    assert {len(d["embedding"]) for d in body["data"]} == {4096}
    assert body["usage"]["prompt_tokens"] > 0
    assert len(fakes.main.calls("/embeddings")) == 1  # called once: delivered, not refused and redone

    r = _post(stack, "/v1/embeddings", {"model": "gpt-test", "input": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert restarts(stack) == restarts_before


def test_a_batch_job_gets_an_answer_larger_than_a_message(stack: RunningStack, fakes: Fakes, tmp_path: Path,
                                                          restarts_before: dict[str, int]) -> None:
    line = {"custom_id": "big", "url": "/v1/embeddings",
            "body": {"model": "gpt-test", "input": [f"row {i}" for i in range(300)], "dimensions": 4096}}
    small = {"custom_id": "small", "url": "/v1/embeddings", "body": {"model": "gpt-test", "input": "one"}}
    (tmp_path / "in.jsonl").write_bytes(orjson.dumps(line) + b"\n" + orjson.dumps(small) + b"\n")
    result = stack.cli("batch", "run", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                       timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = {r["custom_id"]: r for r in map(orjson.loads, (tmp_path / "out.jsonl").read_bytes().splitlines())}
    assert out["big"]["response"]["status_code"] == 200
    vectors = out["big"]["response"]["body"]["data"]
    assert len(vectors) == 300 and {len(v["embedding"]) for v in vectors} == {4096}
    assert out["small"]["response"]["status_code"] == 200
    assert len(fakes.main.calls("/embeddings")) == 2
    assert restarts(stack) == restarts_before


async def test_a_reply_topic_with_kafka_s_default_limit_gets_a_large_answer_in_parts(
        stack: RunningStack, fakes: Fakes, restarts_before: dict[str, int]) -> None:
    """A batch producer's reply topic created with Kafka's default limit (about 1 MiB): the broker refuses the
    11 MB answer (30,000 inputs, as in the issue) whole, even compressed, so it is sent in parts that topic
    accepts, and a reader joins them (shared/parts.Assembler)."""
    reply_topic = f"test.small-replies.{uuid.uuid4().hex[:8]}"
    await create_limited_topic(stack.bootstrap, reply_topic, 1048588)
    env = RequestEnvelope(id=uuid.uuid4().hex, kind="embeddings", model="gpt-test", reply_topic=reply_topic,
                          reply_partition=0, priority="batch", custom_id="wide",
                          body={"model": "gpt-test", "input": [f"doc {i}" for i in range(30_000)]})
    await produce_envelope(stack.bootstrap, env)
    deadline = time.time() + 120
    while True:
        records = await read_replies(stack.bootstrap, reply_topic, want=100_000, timeout_s=3)
        assembler = Assembler()
        answers = [a for a in map(assembler.offer, records) if a is not None]
        if answers or time.time() > deadline:
            break
    assert len(answers) == 1, [r.type for r in records]
    whole = answers[0]
    assert (whole.id, whole.type, whole.custom_id) == (env.id, "response", "wide"), whole.data
    assert whole.parts >= 2 and len([r for r in records if r.type == "part"]) == whole.parts
    assert whole.data is not None and [d["index"] for d in whole.data["data"]] == list(range(30_000))
    assert len(fakes.main.calls("/embeddings")) == 1
    assert restarts(stack) == restarts_before


async def test_a_reply_no_part_of_which_fits_its_topic_is_a_413(stack: RunningStack, fakes: Fakes,
                                                                restarts_before: dict[str, int]) -> None:
    """A reply topic that takes only 2,000 bytes a message: neither the answer nor its parts fit, so the
    request is answered there with a 413 `reply_too_large` (an error fits), once, and the worker carries on."""
    reply_topic = f"test.tiny-replies.{uuid.uuid4().hex[:8]}"
    await create_limited_topic(stack.bootstrap, reply_topic, 2000)
    env = RequestEnvelope(id=uuid.uuid4().hex, kind="embeddings", model="gpt-test", reply_topic=reply_topic,
                          reply_partition=0, priority="batch", custom_id="tiny",
                          body={"model": "gpt-test", "input": [f"doc {i}" for i in range(3000)]})
    await produce_envelope(stack.bootstrap, env)
    [reply] = await read_replies(stack.bootstrap, reply_topic, want=1)
    assert (reply.id, reply.type, reply.status) == (env.id, "error", 413), reply
    assert reply.data is not None and reply.data["error"]["code"] == "reply_too_large"
    assert "fewer inputs" in reply.data["error"]["message"]
    assert len(fakes.main.calls("/embeddings")) == 1
    r = _post(stack, "/v1/embeddings", {"model": "gpt-test", "input": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert restarts(stack) == restarts_before
