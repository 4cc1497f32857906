"""Issue 17 against the real stack (Apache Kafka, PostgreSQL, every service, a fake provider recording what it got):
- error text is redacted before it leaves the gateway or is stored: a provider error that echoes the prompt's
  email and card, and errors that quote a caller's input (a model name that is an API key);
- a batch line made with a key that names guardrails gets that key's input guardrails (mask, block) and output
  guardrails, as the same key's interactive requests do.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from openai import OpenAI

from tests.fakes.anthropic_fake import FakeAnthropic
from tests.fakes.openai_fake import FakeOpenAI
from tests.stack import MASTER_KEY, RunningStack, start_stack, warm_up
from tests.test_batches_api import finished, results, wait_for
from tests.test_guardrails import log_entry, sql, topic_dump
from tests.test_guardrails import wait_for as wait_until

pytestmark = pytest.mark.timeout(600)

CARD, EMAIL = "4111 1111 1111 1111", "ana.perez@example.com"
KEY_LIKE = "sk-proj-abcDEF1234567890abcdEFGH5678"


def config(url: str, anthropic_url: str) -> str:
    dep = f"deployments: [{{provider: openai, model: gpt-4o-mini, api_base: '{url}/v1', api_key: sk-up}}]"
    claude = f"deployments: [{{provider: anthropic, model: claude-x, api_base: '{anthropic_url}', api_key: sk-ant}}]"
    return f"""
models:
  - {{name: plain, {dep}}}
  - {{name: claude-in, {claude}}}
  - {{name: claude-out, {claude}}}
guardrails:
  - {{name: claude-in-mask, stage: input, action: mask, detectors: [email], models: [claude-in]}}
  - {{name: claude-out-mask, stage: output, action: mask, detectors: [email], models: [claude-out]}}
  - {{name: key-mask, stage: input, action: mask, detectors: [email, credit_card], models: []}}
  - {{name: key-block, stage: input, action: block, patterns: ["(?i)codename"], models: []}}
  - {{name: key-out, stage: output, action: mask, detectors: [ip_address], models: []}}
logging:
  prompts: true
  redact: [email, phone, credit_card, secret]
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    f = FakeOpenAI().start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    f = FakeAnthropic().start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def estack(fake: FakeOpenAI, claude: FakeAnthropic, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(Path(tmp_path_factory.mktemp("guardrail-sinks")), config(fake.url, claude.url))
    try:
        warm_up(running, "plain")
        yield running
    finally:
        running.stop()


def sdk(stack: RunningStack, key: str = MASTER_KEY) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_a_provider_error_echoing_the_prompt_reaches_no_sink_unredacted(estack: RunningStack,
                                                                        fake: FakeOpenAI) -> None:
    """No guardrail applies to `plain`: only the redaction policy stands between the echo and every sink."""
    fake.reset()
    fake.inject(status=400, message=f"Invalid content near '{EMAIL}' and '{CARD}' in messages[0]")
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(estack).chat.completions.create(
            model="plain", messages=[{"role": "user", "content": f"mail {EMAIL}, card {CARD}"}])
    message = refused.value.message
    assert "[EMAIL]" in message and "[CREDIT_CARD]" in message, message
    assert EMAIL not in message and CARD not in message
    assert len(fake.calls("/chat/completions")) == 1  # the provider did answer with the echo
    request_id = refused.value.response.headers["x-request-id"]
    entry = log_entry(estack, request_id)  # the prompt log keeps the error, redacted as well
    stored = orjson.dumps(entry).decode()
    assert "[EMAIL]" in orjson.dumps(entry["error"]).decode()
    replies = asyncio.run(topic_dump(estack.bootstrap, "llm.replies")).decode(errors="replace")
    assert request_id in replies  # the dump did read the error reply
    for sink, content in (("prompt log", stored), ("llm.replies", replies)):
        assert EMAIL not in content and CARD not in content, f"the echo reached {sink}"


def test_an_error_quoting_the_callers_input_is_redacted(estack: RunningStack) -> None:
    """A model name that is an API key (a classic paste slip): the 404 names the model, with the key masked."""
    with pytest.raises(openai.NotFoundError) as missing:
        sdk(estack).chat.completions.create(model=KEY_LIKE, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    assert KEY_LIKE not in missing.value.message and "[SECRET]" in missing.value.message
    r = httpx.post(f"{estack.url}/v1/messages", headers={"x-api-key": MASTER_KEY, "anthropic-version": "2023-06-01"},
                   json={"model": f"model-of-{EMAIL}", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
                   timeout=60)
    assert r.status_code == 404 and EMAIL not in r.text and "[EMAIL]" in r.text, r.text


def wait_for_rows(stack: RunningStack, query: str, **params: Any) -> list[Any]:
    return list(wait_until(lambda: sql(stack, query, **params)))


def actions(stack: RunningStack, guardrail: str, action: str) -> float:
    """switchyard_guardrail_actions_total{guardrail, action} on the stack's ingress."""
    for metric in httpx.get(f"{stack.url}/metrics", timeout=30).text.splitlines():
        if metric.startswith("switchyard_guardrail_actions_total{") and f'guardrail="{guardrail}"' in metric \
                and f'action="{action}"' in metric:
            return float(metric.rsplit(" ", 1)[1])
    return 0.0


def submit(client: OpenAI, lines: list[dict[str, Any]]) -> Any:
    raw = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    file = client.files.create(file=("batch.jsonl", io.BytesIO(raw)), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")


def line(custom_id: str, content: str, model: str = "plain") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}]}}


def answer_text(result: dict[str, Any]) -> str:
    return str(result["response"]["body"]["choices"][0]["message"]["content"])


def test_batch_lines_get_the_keys_input_and_output_guardrails(estack: RunningStack, fake: FakeOpenAI) -> None:
    created = httpx.post(f"{estack.url}/v1/keys", headers=estack.headers(), timeout=30,
                         json={"guardrails": ["key-mask", "key-block", "key-out"]})
    assert created.status_code in (200, 201), created.text
    key = created.json()["key"]
    client = sdk(estack, key)
    fake.reset()
    batch = submit(client, [line("masked", f"mail {EMAIL} card {CARD}"), line("blocked", "the codename is blue"),
                            line("answer-masked", "server 10.1.2.3 is down")])
    batch = wait_for(client, batch.id, finished)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
    out = {r["custom_id"]: r for r in results(client, batch.output_file_id)}
    errors = {r["custom_id"]: r for r in results(client, batch.error_file_id)}
    # mask: the provider (and so the answer) saw only the placeholders, as for an interactive request
    assert answer_text(out["masked"]) == "Echo: mail [EMAIL] card [CREDIT_CARD]"
    sent = orjson.dumps([c.body for c in fake.calls("/chat/completions")]).decode()
    assert "[EMAIL]" in sent and EMAIL not in sent and CARD not in sent
    # block: the line's answer is the 400 guardrail_violation, and the provider never got it
    refusal = errors["blocked"]["response"]
    assert refusal["status_code"] == 400 and refusal["body"]["error"]["code"] == "guardrail_violation"
    assert "key-block" in refusal["body"]["error"]["message"] and "codename" not in refusal["body"]["error"]["message"]
    assert "codename" not in sent and len(fake.calls("/chat/completions")) == 2
    # output: the worker applied the key's output guardrail to the answer
    assert answer_text(out["answer-masked"]) == "Echo: server [IP_ADDRESS] is down"
    # the decisions are counted on the metric, the worker's output ones included
    assert actions(estack, "key-mask", "mask") >= 1 and actions(estack, "key-block", "block") >= 1
    assert actions(estack, "key-out", "mask") >= 1
    # the same key, interactively, gets the same answers
    same = client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "server 10.1.2.3"}])
    assert same.choices[0].message.content == "Echo: server [IP_ADDRESS]"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "codename"}])
    # the input decisions reach the line's usage row (line 1 is `masked`), never the text
    rows = wait_for_rows(estack, "SELECT guardrails::text FROM usage WHERE request_id = :r AND guardrails IS NOT NULL",
                         r=f"{batch.id}-1")
    assert "key-mask" in rows[0][0] and "credit_card" in rows[0][0] and "4111" not in rows[0][0]
    # nothing unmasked went through Kafka for the batch's lines
    dump = asyncio.run(topic_dump(estack.bootstrap, "llm.requests")).decode(errors="replace")
    lines = "\n".join(envelope for envelope in dump.splitlines() if batch.id in envelope)
    assert "[EMAIL]" in lines and EMAIL not in lines and CARD not in lines and "codename" not in lines


def test_a_batch_of_the_master_key_is_not_given_a_keys_guardrails(estack: RunningStack) -> None:
    """The key's guardrails are its own: the same lines under a key naming none pass unchanged."""
    client = sdk(estack)
    batch = wait_for(client, submit(client, [line("one", "the codename is blue"), line("two", "server 10.1.2.3")]).id,
                     finished)
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 2, batch
    out = {r["custom_id"]: answer_text(r) for r in results(client, batch.output_file_id)}
    assert out == {"one": "Echo: the codename is blue", "two": "Echo: server 10.1.2.3"}


def test_a_batch_line_error_quoting_the_line_is_redacted(estack: RunningStack) -> None:
    client = sdk(estack)
    batch = wait_for(client, submit(client, [line("bad", "hi", model=KEY_LIKE)]).id, finished)
    assert batch.status == "failed" and batch.errors is not None and batch.errors.data
    message = batch.errors.data[0].message or ""
    assert batch.errors.data[0].code == "model_not_found" and KEY_LIKE not in message and "[SECRET]" in message


@pytest.mark.parametrize(("model", "stage"), [("claude-in", "input"), ("claude-out", "output")])
def test_guardrails_on_an_anthropic_model_refuse_anthropics_own_tools_with_a_400_naming_the_param(
        estack: RunningStack, claude: FakeAnthropic, model: str, stage: str) -> None:
    """Guardrails read and mask the OpenAI form, so a guarded request is translated; a web-search tool has no
    translation, so it is refused by name, never sent with the tool dropped."""
    claude.reset()
    client = anthropic.Anthropic(base_url=estack.url, api_key=MASTER_KEY, max_retries=0, timeout=60)
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=model, max_tokens=50, messages=[{"role": "user", "content": "news?"}],
                               tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}])
    message = refused.value.message
    assert "tools[0].type: " in message and f"{stage} guardrails" in message, message
    assert claude.calls("/v1/messages") == []
    answer: Any = client.messages.create(model=model, max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert answer.content[0].text == "Echo: hi"  # without it, served (translated) as before
