"""The OpenAI Responses API: the translation as units (checked against the openai SDK's own models), then
the official openai SDK through the whole stack against the OpenAI-compatible and the Anthropic fakes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from sqlalchemy import text

from switchyard.devstack.demo_provider import completion_for, stream_events
from switchyard.services.ingress import responses_api as api
from switchyard.services.ingress import responses_output as out
from switchyard.services.ingress.responses_stream import ResponseStream
from switchyard.services.ingress.validation import ChatCompletionRequest, validate
from switchyard.shared.db import make_engine
from switchyard.shared.errors import GatewayError
from tests.conftest import Fakes
from tests.fakes.server import FakeProvider, free_port
from tests.stack import MASTER_KEY, RunningStack
from tests.test_ingress_without_database import Spawn, assert_unavailable
from tests.test_ingress_without_database import spawn as spawn  # noqa: F401  (the fixture)

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
TOOL: Any = {"type": "function", "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SCHEMA: Any = {"type": "json_schema", "name": "city", "strict": True,
          "schema": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
                     "additionalProperties": False}}


def bad(body: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        api.to_chat_request(body)
    assert info.value.status == 400
    return info.value


# ------------------------------------------------------------------ translation units


def test_request_maps_to_a_valid_chat_request() -> None:
    chat = api.to_chat_request({
        "model": "m", "instructions": "be brief", "max_output_tokens": 50, "temperature": 0.2, "top_p": 0.9,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "look: "},
                                         {"type": "input_image", "image_url": "https://x/cat.png"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ],
        "tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"}, "text": {"format": SCHEMA},
        "metadata": {"team": "a"}, "store": True, "stream": True,
    })
    validate(ChatCompletionRequest, chat)
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look: "},
                                     {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    assert chat["max_completion_tokens"] == 50 and chat["temperature"] == 0.2 and chat["top_p"] == 0.9
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "parameters": TOOL["parameters"]}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "city", "schema": SCHEMA["schema"], "strict": True}}
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    for gateway_only in ("metadata", "store", "previous_response_id", "instructions", "input"):
        assert gateway_only not in chat


def test_history_comes_before_the_input_and_after_the_instructions() -> None:
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Echo: hi"}]
    chat = api.to_chat_request({"model": "m", "input": "again", "instructions": "new rules"}, history)
    assert chat["messages"] == [{"role": "system", "content": "new rules"}, *history,
                                {"role": "user", "content": "again"}]


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x"}, "model"),
    ({"model": "m"}, "input"),
    ({"model": "m", "input": 5}, "input"),
    ({"model": "m", "input": []}, "input"),
    ({"model": "m", "input": ["x"]}, "input[0]"),
    ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0].type"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0].file_id"),
    ({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
     "input[0].arguments"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"model": "m", "input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"model": "m", "input": "x", "tool_choice": "sometimes"}, "tool_choice"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "input": "x", "temperature": 3}, "temperature"),
    ({"model": "m", "input": "x", "metadata": {"k": 1}}, "metadata.k"),
    ({"model": "m", "input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"model": "m", "input": "x", "store": "yes"}, "store"),
    ({"model": "m", "input": "x", "background": True}, "background"),
    ({"model": "m", "input": "x", "reasoning": "high"}, "reasoning"),
])
def test_bad_requests_are_400s_naming_the_parameter(body: dict[str, Any], param: str) -> None:
    assert bad(body).param == param


def test_a_chat_completion_becomes_a_response_the_sdk_parses() -> None:
    body = {"model": "gpt-test", "input": "hello", "metadata": {"a": "b"}, "tools": [TOOL]}
    answer = out.from_chat_completion(completion_for({"messages": [{"role": "user", "content": "hello"}]}), body,
                                      "resp_1")
    parsed = Response.model_validate(answer)
    assert parsed.id == "resp_1" and parsed.status == "completed" and parsed.output_text == "Echo: hello"
    assert parsed.model == "gpt-test" and parsed.metadata == {"a": "b"} and parsed.to_dict()["store"] is True
    assert parsed.usage is not None and parsed.usage.input_tokens > 0 and parsed.usage.output_tokens > 0
    assert parsed.usage.total_tokens == parsed.usage.input_tokens + parsed.usage.output_tokens
    call = out.from_chat_completion(completion_for({"messages": [{"role": "user", "content": "hi"}],
                                                    "tools": [{"type": "function", "function": {"name": "f"}}]}),
                                    body, "resp_2")
    item = Response.model_validate(call).output[0]
    assert item.type == "function_call" and item.name == "f" and orjson.loads(item.arguments) == {"query": "hi"}
    cut = completion_for({"messages": [{"role": "user", "content": "a b c d"}], "max_tokens": 2})
    cut["choices"][0]["finish_reason"] = "length"
    incomplete = Response.model_validate(out.from_chat_completion(cut, body, "resp_3"))
    assert incomplete.status == "incomplete" and incomplete.incomplete_details is not None
    assert incomplete.incomplete_details.reason == "max_output_tokens"


def _stream(chat_body: dict[str, Any], body: dict[str, Any]) -> list[dict[str, Any]]:
    translator = ResponseStream(out.skeleton("resp_s", body))
    events = [e for chunk in stream_events({**chat_body, "stream_options": {"include_usage": True}})
              for e in translator.feed(chunk)]
    return events + translator.finish()


def test_a_chunk_stream_becomes_typed_events_in_sequence() -> None:
    events = _stream({"messages": [{"role": "user", "content": "one two three"}]}, {"model": "m", "input": "x"})
    for event in events:
        EVENTS.validate_python(event)  # every event is one the SDK knows, with all its fields
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Echo: one two three"
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "Echo: one two three" and final.usage is not None and final.usage.output_tokens > 0


def test_a_streamed_tool_call_sends_argument_deltas_then_done() -> None:
    events = _stream({"messages": [{"role": "user", "content": "weather in Oslo"}],
                      "tools": [{"type": "function", "function": {"name": "get_weather"}}]},
                     {"model": "m", "input": "x", "tools": [TOOL]})
    for event in events:
        EVENTS.validate_python(event)
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert len(deltas) > 1 and "".join(deltas) == done["arguments"]
    assert orjson.loads(done["arguments"]) == {"query": "weather in Oslo"}
    final = Response.model_validate(events[-1]["response"])
    assert final.output[0].type == "function_call" and final.output[0].name == "get_weather"


def test_a_failure_mid_stream_ends_with_response_failed() -> None:
    translator = ResponseStream(out.skeleton("resp_f", {"model": "m", "input": "x"}))
    events = translator.feed({"choices": [{"index": 0, "delta": {"content": "partial"}}]})
    events += translator.fail(GatewayError(502, "upstream cut the stream"))
    assert translator.finish() == []  # one terminal event only
    for event in events:
        EVENTS.validate_python(event)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "upstream cut the stream"}


# ------------------------------------------------------------------ through the stack, with the openai SDK

PROVIDERS = ["gpt-test", "claude"]


def _fake(fakes: Fakes, model: str) -> FakeProvider:
    return fakes.main if model == "gpt-test" else fakes.anthropic


def _upstream_messages(fakes: Fakes, model: str) -> list[dict[str, Any]]:
    if model == "gpt-test":
        return list(fakes.main.calls("/chat/completions")[-1].body["messages"])
    return list(fakes.anthropic.calls("/v1/messages")[-1].body["messages"])


def _client(stack: RunningStack, key: str = "sk-test-master") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def client(stack: RunningStack) -> openai.OpenAI:
    return _client(stack)


@pytest.mark.parametrize("model", PROVIDERS)
def test_create_retrieve_list_input_items_and_delete(client: openai.OpenAI, model: str) -> None:
    created = client.responses.create(model=model, input="hello responses", instructions="answer briefly",
                                      metadata={"ticket": "T-1"})
    assert created.id.startswith("resp_") and created.status == "completed" and created.object == "response"
    assert created.output_text == "Echo: hello responses"
    assert created.output[0].type == "message" and created.output[0].content[0].type == "output_text"
    assert created.usage is not None and created.usage.input_tokens > 0 and created.usage.output_tokens > 0
    assert created.usage.total_tokens == created.usage.input_tokens + created.usage.output_tokens
    assert created.model == model and created.metadata == {"ticket": "T-1"} and created.to_dict()["store"] is True
    assert created.instructions == "answer briefly"

    stored = client.responses.retrieve(created.id)
    assert stored.model_dump() == created.model_dump()
    items = client.responses.input_items.list(created.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [  # type: ignore[union-attr,index]
        ("message", "user", "hello responses")]

    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(created.id)
    assert info.value.status_code == 404 and created.id in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


@pytest.mark.parametrize("model", PROVIDERS)
def test_streamed_events_accumulate_in_the_sdk(client: openai.OpenAI, model: str) -> None:
    with client.responses.stream(model=model, input="stream these words please") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[1] == "response.in_progress"
    assert kinds[-1] == "response.completed"
    for needed in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
                   "response.output_text.done", "response.content_part.done", "response.output_item.done"):
        assert needed in kinds
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert final.output_text == "Echo: stream these words please" and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens > 0
    assert client.responses.retrieve(final.id).output_text == final.output_text  # stored before completed


def test_stream_has_no_done_marker_and_stream_true_works(stack: RunningStack, client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="gpt-test", input="plain stream", stream=True))
    assert events[-1].type == "response.completed"
    raw = httpx.post(f"{stack.url}/v1/responses", headers=stack.headers(), timeout=60,
                     json={"model": "gpt-test", "input": "raw", "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in raw.text and raw.text.startswith("event: response.created\ndata: ")


@pytest.mark.parametrize("model", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True])
def test_function_tool_round_trip(client: openai.OpenAI, fakes: Fakes, model: str, stream: bool) -> None:
    def create(**kw: Any) -> Any:
        if not stream:
            return client.responses.create(model=model, tools=[TOOL], **kw)
        with client.responses.stream(model=model, tools=[TOOL], **kw) as s:
            kinds = [e.type for e in s]
            assert kinds[-1] == "response.completed"
            return s.get_final_response()

    first = create(input="weather in Oslo?")
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert orjson.loads(calls[0].arguments) == {"query": "weather in Oslo?"}

    second = create(previous_response_id=first.id,
                    input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}])
    assert second.status == "completed" and second.output_text.startswith("Echo: ")
    assert not [item for item in second.output if item.type == "function_call"]
    sent = _upstream_messages(fakes, model)
    if model == "gpt-test":
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
        assert sent[1]["tool_calls"][0]["id"] == calls[0].call_id and sent[2]["content"] == "sunny, 21 C"
    else:  # the Anthropic wire format: a tool_use answered by a tool_result with the same id
        assert sent[1]["content"][-1]["type"] == "tool_use" and sent[1]["content"][-1]["id"] == calls[0].call_id
        assert sent[2]["content"][0] == {"type": "tool_result", "tool_use_id": calls[0].call_id,
                                         "content": "sunny, 21 C"}

    # Without the store: the caller sends the call and its output back itself.
    third = client.responses.create(model=model, tools=[TOOL], store=False, input=[  # type: ignore[misc,list-item]
        {"role": "user", "content": "weather in Oslo?"}, calls[0].model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}])
    assert third.status == "completed" and third.output_text.startswith("Echo: ") and third.to_dict()["store"] is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(third.id)


@pytest.mark.parametrize("model", PROVIDERS)
def test_previous_response_id_continues_the_conversation(client: openai.OpenAI, fakes: Fakes, model: str) -> None:
    first = client.responses.create(model=model, input="my name is Ada", instructions="first rules")
    second = client.responses.create(model=model, input="what is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.output_text == "Echo: what is my name?"
    sent = _upstream_messages(fakes, model)
    texts = [m["content"] if isinstance(m["content"], str) else m["content"][0]["text"] for m in sent]
    assert texts == ["my name is Ada", "Echo: my name is Ada", "what is my name?"]
    if model == "gpt-test":  # the instructions of an earlier response are not carried over
        assert all(m["role"] != "system" for m in sent)
    else:
        assert "system" not in fakes.anthropic.calls("/v1/messages")[-1].body
    third = client.responses.create(model="gpt-test", input="and now?", previous_response_id=second.id)
    assert third.output_text == "Echo: and now?"  # continued on another provider
    assert len(fakes.main.calls("/chat/completions")[-1].body["messages"]) == 5


def test_text_format_json_schema_reaches_the_provider(client: openai.OpenAI, fakes: Fakes) -> None:
    created = client.responses.create(model="gpt-test", input="a city", text={"format": SCHEMA})
    assert created.text is not None and created.text.format is not None
    assert created.text.format.type == "json_schema"
    sent = fakes.main.calls("/chat/completions")[-1].body
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["schema"] == SCHEMA["schema"]


def test_errors_are_openai_shaped(stack: RunningStack, client: openai.OpenAI, fakes: Fakes) -> None:
    with pytest.raises(openai.NotFoundError) as missing_model:
        client.responses.create(model="no-such-model", input="x")
    assert missing_model.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad_input:
        client.responses.create(model="gpt-test", input=[{"role": "robot", "content": "x"}])  # type: ignore[misc,list-item]
    assert bad_input.value.param == "input[0].role"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model="gpt-test", input="x", previous_response_id="resp_nope")
    assert unknown.value.param == "previous_response_id"
    with pytest.raises(openai.AuthenticationError):
        _client(stack, "sk-wrong").responses.create(model="gpt-test", input="x")
    fakes.main.inject(status=400, message="Invalid schema for response_format")
    with pytest.raises(openai.BadRequestError) as upstream:
        client.responses.create(model="gpt-test", input="x")
    assert "Invalid schema" in upstream.value.message
    r = httpx.post(f"{stack.url}/v1/responses", headers=stack.headers(), content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(f"{stack.url}/v1/responses/resp_x/input_items", params={"limit": "0"}, headers=stack.headers())
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_a_stream_cut_upstream_ends_with_response_failed(client: openai.OpenAI, fakes: Fakes) -> None:
    fakes.main.inject(cut_after=3)
    events = list(client.responses.create(model="gpt-test", input="one two three four five six", stream=True))
    assert events[-1].type == "response.failed"
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None and failed.error.message
    assert [e.sequence_number for e in events] == list(range(len(events)))


def _key(stack: RunningStack, **spec: Any) -> str:
    r = httpx.post(f"{stack.url}/v1/keys", json=spec, headers=stack.headers(), timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def test_stored_responses_are_visible_to_their_key_and_team_only(stack: RunningStack) -> None:
    owner = _client(stack, _key(stack, name="resp-owner", team="alpha"))
    teammate = _client(stack, _key(stack, name="resp-teammate", team="alpha"))
    stranger = _client(stack, _key(stack, name="resp-stranger", team="beta"))
    created = owner.responses.create(model="gpt-test", input="private")
    assert teammate.responses.retrieve(created.id).id == created.id
    assert teammate.responses.create(model="gpt-test", input="more", previous_response_id=created.id).output_text
    for call in (lambda: stranger.responses.retrieve(created.id),
                 lambda: stranger.responses.input_items.list(created.id),
                 lambda: stranger.responses.delete(created.id),
                 lambda: stranger.responses.create(model="gpt-test", input="x", previous_response_id=created.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert owner.responses.retrieve(created.id).output_text == "Echo: private"


async def test_usage_and_spend_are_recorded_like_chat(stack: RunningStack) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{stack.url}/v1/responses", headers=stack.headers(),
                            json={"model": "gpt-test", "input": "count me"})
    assert r.status_code == 200
    body = r.json()
    request_id = r.headers["x-request-id"]
    assert body["id"] == "resp_" + request_id
    engine = make_engine(stack.database_url, pool_size=1)
    try:
        deadline = time.time() + 20
        while True:
            async with engine.connect() as conn:
                rows = (await conn.execute(text("SELECT * FROM usage WHERE request_id = :rid AND status <> 0"),
                                           {"rid": request_id})).mappings().all()
            if rows or time.time() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()
    assert len(rows) == 1
    assert rows[0]["prompt_tokens"] == body["usage"]["input_tokens"]
    assert rows[0]["completion_tokens"] == body["usage"]["output_tokens"]
    assert rows[0]["model_group"] == "gpt-test" and rows[0]["cost_usd"] > 0


def test_without_postgresql_answers_are_still_served_and_say_they_were_not_stored(spawn: Spawn) -> None:
    ingress = spawn(f"postgresql://switchyard@127.0.0.1:{free_port()}/switchyard")  # nothing listens there
    master = {"authorization": f"Bearer {MASTER_KEY}"}
    r = httpx.post(f"{ingress.url}/v1/responses", headers=master, timeout=60,
                   json={"model": "gpt-test", "input": "not stored"})
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"][0]["text"] == "Echo: not stored" and r.json()["store"] is False
    streamed = httpx.post(f"{ingress.url}/v1/responses", headers=master, timeout=60,
                          json={"model": "gpt-test", "input": "not stored", "stream": True})
    last = orjson.loads(streamed.text.strip().split("\n")[-1].removeprefix("data: "))
    assert last["type"] == "response.completed" and last["response"]["store"] is False
    rid = r.json()["id"]
    assert_unavailable(httpx.get(f"{ingress.url}/v1/responses/{rid}", headers=master, timeout=60),
                       "database_unavailable")
    assert_unavailable(httpx.post(f"{ingress.url}/v1/responses", headers=master, timeout=60, json={
        "model": "gpt-test", "input": "more", "previous_response_id": rid}), "database_unavailable")
    assert ingress.proc.poll() is None
