"""Guardrails and the prompt log against the real stack (Apache Kafka, PostgreSQL, every service, a fake provider).

The fake provider echoes the last user message ("Echo: ..."), word by word on streams, and records what it got.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from switchyard.shared.settings import asyncpg_url
from tests.fakes.openai_fake import FakeOpenAI
from tests.stack import MASTER_KEY, RunningStack, start_stack, warm_up

CARD, EMAIL, SSN = "4111 1111 1111 1111", "ana.perez@example.com", "123-45-6789"


def config(url: str) -> str:
    dep = f"deployments: [{{provider: openai, model: gpt-4o-mini, api_base: '{url}/v1', api_key: sk-up}}]"
    return f"""
models:
  - {{name: guarded, {dep}}}
  - {{name: out, {dep}}}
  - {{name: json-only, {dep}}}
  - {{name: quiet, log_prompts: false, {dep}}}
guardrails:
  - {{name: pii, stage: input, action: mask, detectors: [email, phone, credit_card, iban, ssn, ip_address, secret],
     patterns: ["(?i)project falcon"], models: [guarded, quiet]}}
  - {{name: no-ssn, stage: input, action: block, detectors: [ssn], models: [out]}}
  - {{name: note-ip, stage: input, action: log, detectors: [ip_address], models: [out]}}
  - {{name: out-pii, stage: output, action: mask, detectors: [credit_card, email], models: [out]}}
  - {{name: out-stop, stage: output, action: block, patterns: ["(?i)forbidden"], models: [out]}}
  - {{name: answer-is-json, stage: output, action: block, json_schema: {{type: object, required: [answer]}},
     models: [json-only]}}
  - {{name: keyed, stage: input, action: block, patterns: ["(?i)codename"], models: []}}
logging:
  prompts: true
  redact: [email, phone, credit_card, secret]
  retention_days: 30
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    f = FakeOpenAI().start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def gstack(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(Path(tmp_path_factory.mktemp("guardrails")), config(fake.url),
                          extra_env={"SWITCHYARD_RETENTION_INTERVAL_S": "1"})
    try:
        warm_up(running, "out")
        yield running
    finally:
        running.stop()


def chat(stack: RunningStack, model: str, content: str, key: str = MASTER_KEY, **extra: Any) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": content}], **extra})


def wait_for(fn: Any, timeout_s: float = 120) -> Any:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def sql(stack: RunningStack, query: str, **params: Any) -> list[Any]:
    async def run() -> list[Any]:
        eng = create_async_engine(asyncpg_url(stack.database_url))
        try:
            async with eng.begin() as conn:
                result = await conn.execute(text(query), params)
                return list(result.all()) if result.returns_rows else []
        finally:
            await eng.dispose()

    return asyncio.run(run())


async def topic_dump(bootstrap: str, only: str | None = None) -> bytes:
    """Every message of every gateway topic (or of the topic `only`), from the beginning."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        names = [t for t in await consumer.topics() if t.startswith("llm.") and only in (None, t)]
        consumer.subscribe(names)
        out = bytearray()
        idle = 0
        while idle < 3:
            batches = await consumer.getmany(timeout_ms=1000)
            idle = idle + 1 if not batches else 0
            for records in batches.values():
                for r in records:
                    out += (r.value or b"") + b"\n"
        return bytes(out)
    finally:
        await consumer.stop()


def test_mask_keeps_pii_from_provider_topics_logs_and_log_store(gstack: RunningStack, fake: FakeOpenAI) -> None:
    fake.reset()
    prompt = f"My card is {CARD}, mail me at {EMAIL} about Project Falcon"
    r = chat(gstack, "guarded", prompt)
    assert r.status_code == 200, r.text
    request_id = r.headers["x-request-id"]
    sent = orjson.dumps([c.body for c in fake.calls("/chat/completions")]).decode()
    assert "[CREDIT_CARD]" in sent and "[EMAIL]" in sent and "[PATTERN]" in sent
    assert CARD not in sent and EMAIL not in sent and "Falcon" not in sent
    assert r.json()["choices"][0]["message"]["content"] == "Echo: My card is [CREDIT_CARD], mail me at [EMAIL] about " \
                                                          "[PATTERN]"
    # The prompt log holds the masked request and answer, the route, timings and tokens.
    entry = wait_for(lambda: (lambda x: x.json() if x.status_code == 200 else None)(
        httpx.get(f"{gstack.url}/v1/logs/{request_id}", headers=gstack.headers(), timeout=30)))
    assert entry["request"]["messages"][0]["content"].startswith("My card is [CREDIT_CARD]")
    assert "[EMAIL]" in entry["answer"]["choices"][0]["message"]["content"]
    assert entry["route"].startswith("group=guarded") and entry["attempts"] == 1
    assert entry["timings"]["total_ms"] > 0 and entry["tokens"]["total_tokens"] > 0
    assert {(d["guardrail"], d["action"], d["detector"]) for d in entry["guardrails"]} >= {
        ("pii", "mask", "credit_card"), ("pii", "mask", "email"), ("pii", "mask", "pattern")}
    # The decisions reach the request's usage row.
    rows = wait_for(lambda: sql(gstack, "SELECT guardrails::text FROM usage WHERE request_id = :r AND "
                                         "guardrails IS NOT NULL", r=request_id))
    assert "credit_card" in rows[0][0]
    # Nothing unredacted anywhere: the log store, every topic, every service's log lines.
    store = " ".join(str(row) for row in sql(gstack, "SELECT p::text FROM prompt_log p"))
    dump = asyncio.run(topic_dump(gstack.bootstrap)).decode(errors="replace")
    assert request_id in dump  # the dump did read the request's messages
    log_files = (gstack.cwd / ".switchyard" / "logs").glob("*")
    logs = gstack.log() + "".join(p.read_text(errors="replace") for p in log_files)
    assert "ingress ready" in logs  # the services' own log files were read
    for sink, content in (("prompt_log", store), ("topics", dump), ("logs", logs)):
        for secret in (CARD, EMAIL, "4111111111111111"):
            assert secret not in content, f"{secret!r} reached {sink}"


def test_block_is_a_400_and_costs_no_provider_call(gstack: RunningStack, fake: FakeOpenAI) -> None:
    fake.reset()
    client = openai.OpenAI(base_url=f"{gstack.url}/v1", api_key=MASTER_KEY)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="out", messages=[{"role": "user", "content": f"ssn {SSN}"}])
    assert refused.value.code == "guardrail_violation"
    assert "no-ssn" in refused.value.message and SSN not in refused.value.message
    assert fake.calls("/chat/completions") == []
    entry = log_entry(gstack, refused.value.response.headers["x-request-id"])
    assert ("no-ssn", "block", "input", "ssn") in decided(entry)  # a block's decision survives its refusal


def log_entry(stack: RunningStack, request_id: str) -> dict[str, Any]:
    return wait_for(lambda: (lambda x: x.json() if x.status_code == 200 else None)(
        httpx.get(f"{stack.url}/v1/logs/{request_id}", headers=stack.headers(), timeout=30)))


def decided(entry: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    return {(d["guardrail"], d["action"], d["stage"], d["detector"]) for d in entry["guardrails"]}


def test_output_mask_split_across_stream_chunks(gstack: RunningStack, fake: FakeOpenAI) -> None:
    client = openai.OpenAI(base_url=f"{gstack.url}/v1", api_key=MASTER_KEY)
    raw = client.chat.completions.with_raw_response.create(
        model="out", stream=True, messages=[{"role": "user", "content": f"pay with {CARD} now"}])
    streamed_id = raw.headers["x-request-id"]
    pieces = [c.choices[0].delta.content or "" for c in raw.parse() if c.choices]
    text = "".join(pieces)
    assert text == "Echo: pay with [CREDIT_CARD] now"
    assert not any("4111" in p for p in pieces)
    # The same guardrail on a whole answer; `log` notes an IP without touching it.
    r = chat(gstack, "out", f"from 10.1.2.3 mail {EMAIL}")
    assert r.json()["choices"][0]["message"]["content"] == "Echo: from 10.1.2.3 mail [EMAIL]"
    assert "x-switchyard-guardrails" not in r.headers  # the worker's decisions are for ingress, not the client
    # The worker masked both before producing them: the provider's words never crossed llm.replies.
    replies = asyncio.run(topic_dump(gstack.bootstrap, "llm.replies")).decode(errors="replace")
    assert streamed_id in replies and r.headers["x-request-id"] in replies  # the dump did read both answers
    assert "[CREDIT_CARD]" in replies and "[EMAIL]" in replies
    for secret in ("4111", EMAIL, "ana.perez"):
        assert secret not in replies, f"{secret!r} reached llm.replies"
    # The output decisions (taken in the worker) reach the prompt log and the usage row, as input ones do.
    assert ("out-pii", "mask", "output", "credit_card") in decided(log_entry(gstack, streamed_id))
    whole = log_entry(gstack, r.headers["x-request-id"])
    assert {("out-pii", "mask", "output", "email"), ("note-ip", "log", "input", "ip_address")} <= decided(whole)
    assert whole["answer"]["choices"][0]["message"]["content"] == "Echo: from 10.1.2.3 mail [EMAIL]"
    rows = wait_for(lambda: sql(gstack, "SELECT guardrails::text FROM usage WHERE request_id = :r AND "
                                         "guardrails IS NOT NULL", r=streamed_id))
    assert "out-pii" in rows[0][0] and "4111" not in rows[0][0]


def test_output_block_ends_a_stream_and_refuses_an_answer(gstack: RunningStack) -> None:
    r = chat(gstack, "out", "this word is forbidden here")
    assert r.status_code == 400 and r.json()["error"]["code"] == "guardrail_violation"
    assert "out-stop" in r.json()["error"]["message"] and "forbidden" not in r.json()["error"]["message"]
    body = httpx.post(f"{gstack.url}/v1/chat/completions", headers=gstack.headers(), timeout=60,
                      json={"model": "out", "stream": True, "messages": [
                          {"role": "user", "content": "one two three four five six seven eight nine ten " * 20
                           + "and then forbidden words"}]})
    events = [line[6:] for line in body.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and orjson.loads(events[-2])["error"]["code"] == "guardrail_violation"
    shown = "".join(c["delta"].get("content") or "" for e in events[:-2] for c in orjson.loads(e)["choices"])
    assert shown.startswith("Echo: one two") and "forbidden" not in shown  # text before the window was shown
    replies = asyncio.run(topic_dump(gstack.bootstrap, "llm.replies")).decode(errors="replace")
    assert body.headers["x-request-id"] in replies and "forbidden" not in replies
    entry = log_entry(gstack, body.headers["x-request-id"])
    assert ("out-stop", "block", "output", "pattern") in decided(entry) and entry["status"] == 400


def test_schema_guardrail_blocks_a_non_json_answer(gstack: RunningStack) -> None:
    r = chat(gstack, "json-only", "not json at all")
    assert r.status_code == 400 and r.json()["error"]["code"] == "guardrail_violation"
    assert "answer-is-json" in r.json()["error"]["message"]
    body = httpx.post(f"{gstack.url}/v1/chat/completions", headers=gstack.headers(), timeout=60,
                      json={"model": "json-only", "stream": True,
                            "messages": [{"role": "user", "content": "still not json"}]}).text
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and orjson.loads(events[-2])["error"]["code"] == "guardrail_violation"
    assert ("answer-is-json", "block", "output", "json_schema") in decided(log_entry(gstack, r.headers["x-request-id"]))


def test_key_guardrails_and_log_access(gstack: RunningStack) -> None:
    created = gstack.cli("keys", "create", "--guardrail", "keyed", "--json")
    assert created.returncode == 0, created.stderr
    key = orjson.loads(created.stdout)["key"]
    assert orjson.loads(created.stdout)["guardrails"] == ["keyed"]
    refused = chat(gstack, "out", "the codename is blue", key=key)
    assert refused.status_code == 400 and "keyed" in refused.json()["error"]["message"]
    assert chat(gstack, "out", "the codename is blue").status_code == 200  # the master key names no guardrail
    bad = httpx.post(f"{gstack.url}/v1/keys", headers=gstack.headers(), json={"guardrails": ["nope"]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guardrails"
    for path in ("/v1/logs", f"/v1/logs/{uuid.uuid4().hex}"):
        r = httpx.get(f"{gstack.url}{path}", headers={"authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 403
    listed = gstack.cli("logs", "--since", "1h")
    assert listed.returncode == 0 and orjson.loads(listed.stdout)


def test_per_model_opt_out_and_retention(gstack: RunningStack) -> None:
    r = chat(gstack, "quiet", "hello")
    request_id = r.headers["x-request-id"]
    marker = chat(gstack, "guarded", "after the quiet one")  # records go in order of arrival per partition
    wait_for(lambda: httpx.get(f"{gstack.url}/v1/logs/{marker.headers['x-request-id']}", headers=gstack.headers(),
                               timeout=30).status_code == 200)
    assert httpx.get(f"{gstack.url}/v1/logs/{request_id}", headers=gstack.headers(), timeout=30).status_code == 404
    old = datetime.now(UTC) - timedelta(days=31)
    sql(gstack, "INSERT INTO prompt_log (request_id, ts, model, kind, stream, status, attempts, timings, guardrails)"
                " VALUES ('old-one', :ts, 'guarded', 'chat', false, 200, 1, '{}', '[]')", ts=old)
    wait_for(lambda: not sql(gstack, "SELECT 1 FROM prompt_log WHERE request_id = 'old-one'"))
    assert sql(gstack, "SELECT 1 FROM prompt_log WHERE request_id = :r", r=marker.headers["x-request-id"])
