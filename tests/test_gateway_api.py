"""The OpenAI-compatible HTTP API through the whole pipeline: ingress -> Kafka -> router -> worker -> fake."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import Fakes
from tests.stack import RunningStack

MSG = [{"role": "user", "content": "hello gateway"}]


@pytest.fixture
def client(stack: RunningStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-test-master", max_retries=0, timeout=60)


def test_sdk_chat_non_streaming(client: openai.OpenAI, fakes: Fakes) -> None:
    resp = client.chat.completions.create(model="gpt-test", messages=MSG, temperature=0.3)  # type: ignore[arg-type]
    assert resp.choices[0].message.content == "Echo: hello gateway"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens > 0
    upstream = fakes.main.calls("/chat/completions")
    assert len(upstream) == 1
    assert upstream[0].body["model"] == "gpt-4o-mini"  # the deployment's model id, not the group name
    assert upstream[0].body["temperature"] == 0.3
    assert upstream[0].headers["authorization"] == "Bearer sk-upstream-secret"  # ${ENV} interpolated


def test_sdk_chat_streaming_in_order_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="gpt-test", stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "one two three four"}])
    chunks: list[Any] = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: one two three four"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]


def test_streaming_without_include_usage_has_no_usage_chunk(client: openai.OpenAI, fakes: Fakes) -> None:
    chunks: list[Any] = list(client.chat.completions.create(model="gpt-test", messages=MSG,  # type: ignore[arg-type]
                                                            stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    # ...while upstream we always ask for usage, so the call can be priced.
    assert fakes.main.calls()[0].body["stream_options"] == {"include_usage": True}


def test_raw_sse_framing_ends_with_done(stack: RunningStack) -> None:
    body = {"model": "gpt-test", "messages": MSG, "stream": True}
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, headers=stack.headers(),
                      timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_models_lists_configured_groups(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"gpt-test", "faulty", "failover"} <= ids


def test_route_header_and_request_id(stack: RunningStack) -> None:
    r = httpx.post(f"{stack.url}/v1/chat/completions", json={"model": "gpt-test", "messages": MSG},
                   headers=stack.headers(), timeout=60)
    assert r.status_code == 200
    assert r.headers["x-switchyard-route"] == "group=gpt-test; deployment=gpt-test/0; attempt=0"
    assert len(r.headers["x-request-id"]) == 32


# ---- errors -------------------------------------------------------------------------------------


def _post(stack: RunningStack, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/chat/completions", content=content,
                      headers={**stack.headers(), "content-type": "application/json", **(headers or {})}, timeout=60)


def _error(r: httpx.Response) -> dict[str, object]:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert r.headers.get("x-request-id")
    return dict(err)


def test_invalid_json_is_400(stack: RunningStack) -> None:
    r = _post(stack, b'{"model": "gpt-test", "messages": [')
    assert r.status_code == 400
    assert _error(r)["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-test"}, "messages"),
        ({"messages": MSG}, "model"),
        ({"model": "gpt-test", "messages": []}, "messages"),
        ({"model": "gpt-test", "messages": MSG, "temperature": 5}, "temperature"),
        ({"model": "gpt-test", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "gpt-test", "messages": MSG, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_schema_errors_name_the_parameter(stack: RunningStack, fakes: Fakes, body: dict[str, object],
                                          param: str) -> None:
    r = _post(stack, orjson.dumps(body))
    assert r.status_code == 400
    err = _error(r)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert fakes.main.calls() == []  # bad input costs nothing downstream


def test_missing_and_wrong_key_are_401(stack: RunningStack) -> None:
    body = orjson.dumps({"model": "gpt-test", "messages": MSG})
    r = httpx.post(f"{stack.url}/v1/chat/completions", content=body, timeout=30)
    assert r.status_code == 401 and _error(r)["code"] == "missing_api_key"
    r = _post(stack, body, {"authorization": "Bearer sk-wrong"})
    assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MSG)  # type: ignore[arg-type]
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_oversized_body_is_413(stack: RunningStack) -> None:
    big = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "x" * (9 << 20)}]})
    r = _post(stack, big)
    assert r.status_code == 413
    assert _error(r)["code"] == "body_too_large"


def test_provider_auth_error_is_a_generic_502(client: openai.OpenAI, fakes: Fakes) -> None:
    """The gateway's own credentials were refused: the operator's problem, and the provider's text (a masked
    key here; an account id or IAM role on Bedrock) is not the caller's to read."""
    fakes.faulty.inject(status=401, message="Incorrect API key provided: sk-faul****ulty")
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="faulty", messages=MSG)  # type: ignore[arg-type]
    assert info.value.status_code == 502 and info.value.code == "upstream_auth_error"
    assert "sk-faul" not in str(info.value) and "Incorrect API key" not in str(info.value)
    assert len(fakes.faulty.calls()) == 1  # not retried: the same credentials fail again


def test_provider_context_length_is_400_with_code(client: openai.OpenAI, fakes: Fakes) -> None:
    fakes.faulty.inject(status=400, message="This model's maximum context length is 128000 tokens.")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="faulty", messages=MSG)  # type: ignore[arg-type]
    assert info.value.code == "context_length_exceeded"


def test_stream_cut_after_chunks_ends_with_error_event(stack: RunningStack, fakes: Fakes) -> None:
    fakes.faulty.inject(cut_after=3)
    body = {"model": "faulty", "messages": [{"role": "user", "content": "a b c d e f g"}], "stream": True}
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, headers=stack.headers(),
                      timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = orjson.loads(events[-2])
    assert last["error"]["code"] == "stream_interrupted"
    text = "".join(orjson.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-2])
    assert text == "Echo: a"  # the chunks before the cut, once each: no duplicate text


def test_unknown_route_is_openai_style_404(stack: RunningStack) -> None:
    r = httpx.get(f"{stack.url}/v1/nothing-here", headers=stack.headers(), timeout=10)
    assert r.status_code == 404
    _error(r)


# These use their own deployment: timeouts open its circuit breaker for a while.
def test_deadline_exceeded_is_504(stack: RunningStack, fakes: Fakes) -> None:
    fakes.slow.inject(latency_ms=3000, times=10)
    r = _post(stack, orjson.dumps({"model": "slow", "messages": MSG}), {"x-switchyard-timeout": "1"})
    assert r.status_code == 504
    assert _error(r)["type"] == "timeout_error"


def test_silent_upstream_hits_first_byte_timeout_then_504(stack: RunningStack, fakes: Fakes) -> None:
    fakes.slow.inject(silent=True, times=10)
    r = _post(stack, orjson.dumps({"model": "slow", "messages": MSG}), {"x-switchyard-timeout": "5"})
    assert r.status_code == 504


def test_embeddings_through_the_pipeline(client: openai.OpenAI, fakes: Fakes) -> None:
    resp = client.embeddings.create(model="gpt-test", input=["first text", "second text"])
    assert [d.index for d in resp.data] == [0, 1] and len(resp.data[0].embedding) == 16
    assert resp.usage.prompt_tokens > 0
    assert fakes.main.calls("/embeddings")[0].body["input"] == ["first text", "second text"]


def test_legacy_completions_map_onto_chat(client: openai.OpenAI, fakes: Fakes) -> None:
    resp = client.completions.create(model="gpt-test", prompt="say this", max_tokens=20)
    assert resp.object == "text_completion" and resp.choices[0].text == "Echo: say this"
    assert resp.choices[0].finish_reason == "stop" and resp.usage is not None
    sent = fakes.main.calls("/chat/completions")[0].body
    assert sent["messages"] == [{"role": "user", "content": "say this"}] and sent["max_tokens"] == 20
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gpt-test", prompt="stream this", stream=True) if c.choices)
    assert streamed == "Echo: stream this"


def test_legacy_completions_refuse_what_chat_cannot_do(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="gpt-test", prompt="x", echo=True)
    assert info.value.body["param"] == "echo"  # type: ignore[index]
