"""The Bedrock adapter (Converse, ConverseStream, InvokeModel embeddings) against a real HTTP fake that
checks SigV4 signatures and speaks the AWS binary event stream; plus the signer against AWS's vectors."""

from __future__ import annotations

import base64
import struct
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from switchyard.services.workers.calls import CallFailed, CallResult, call, make_client
from switchyard.services.workers.providers import sigv4
from switchyard.services.workers.providers.base import CallContext
from switchyard.services.workers.providers.bedrock import BedrockAdapter, EventStreamDecoder
from switchyard.shared.config_schema import Deployment
from switchyard.shared.errors import GatewayError
from tests.fakes.bedrock_fake import FakeBedrock, encode_frame, event_frame


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeBedrock]:
    server = FakeBedrock().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _clean(fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.reset()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_BEARER_TOKEN_BEDROCK",
                 "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)


MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
REGION = "us-west-2"
BODY: dict[str, Any] = {"model": "my-group", "messages": [{"role": "user", "content": "hello there"}]}
LOOKUP: dict[str, Any] = {"type": "function", "function": {
    "name": "lookup", "description": "Look something up",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
PNG = "data:image/png;base64,iVBORw0KGgo="
CREDS: dict[str, dict[str, Any]] = {
    "akid": {"aws_access_key_id": "AKIDFAKE", "aws_secret_access_key": "fake-secret/key+value"},
    "temp": {"aws_access_key_id": "ASIATEMP", "aws_secret_access_key": "temp-secret",
             "aws_session_token": "session-token-123"},
    "bearer": {"api_key": "bedrock-api-key"},
    "wrong-secret": {"aws_access_key_id": "AKIDFAKE", "aws_secret_access_key": "not-the-secret"},
    "wrong-token": {"aws_access_key_id": "ASIATEMP", "aws_secret_access_key": "temp-secret",
                    "aws_session_token": "stale"},
    "bad-bearer": {"api_key": "nope"},
    "none": {},
}


def ctx(fake: FakeBedrock, body: dict[str, Any], stream: bool = False, creds: str = "akid", model: str = MODEL,
        strict: bool = False, region: str | None = REGION, api_base: str | None = "") -> CallContext:
    dep = Deployment(provider="bedrock", model=model, api_base=fake.url if api_base == "" else api_base,
                     region=region, first_byte_timeout_s=5.0, id="b/0", **CREDS[creds])
    return CallContext(deployment=dep, body=body, stream=stream, api_key=dep.api_key, request_id="r1", strict=strict)


async def run(fake: FakeBedrock, body: dict[str, Any], **kw: Any) -> CallResult:
    kind = kw.pop("kind", "chat")
    async with make_client() as client:
        return await call(client, BedrockAdapter(), ctx(fake, body, **kw), kind=kind)


async def run_stream(fake: FakeBedrock, body: dict[str, Any], **kw: Any) -> tuple[CallResult, list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []

    async def sink(c: dict[str, Any]) -> None:
        got.append(c)

    async with make_client() as client:
        result = await call(client, BedrockAdapter(), ctx(fake, body, stream=True, **kw), on_chunk=sink)
    return result, got


async def fails(fake: FakeBedrock, body: dict[str, Any], **kw: Any) -> tuple[CallFailed, list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []

    async def sink(c: dict[str, Any]) -> None:
        got.append(c)

    kind = kw.pop("kind", "chat")
    async with make_client() as client:
        with pytest.raises(CallFailed) as info:
            await call(client, BedrockAdapter(), ctx(fake, body, **kw), kind=kind, on_chunk=sink)
    return info.value, got


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


def user(text: str) -> dict[str, Any]:
    return {"model": "g", "messages": [{"role": "user", "content": text}]}


# ---- SigV4 ----------------------------------------------------------------------------------

AWS_KEY = sigv4.Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
AWS_TIME = datetime(2015, 8, 30, 12, 36, 0, tzinfo=UTC)


def test_sigv4_signs_the_documented_iam_list_users_example() -> None:
    # The worked example of AWS's "Create a signed AWS API request" documentation.
    headers = sigv4.sign("GET", "https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08",
                         {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}, b"", AWS_KEY,
                         "us-east-1", "iam", AWS_TIME)
    assert headers["x-amz-date"] == "20150830T123600Z"
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7")
    canonical = sigv4.canonical_request("GET", "/", "Action=ListUsers&Version=2010-05-08", headers,
                                        ["content-type", "host", "x-amz-date"], sigv4.EMPTY_SHA256, "iam")
    assert sigv4.sha256_hex(canonical.encode()) == "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
    key = sigv4.signing_key(AWS_KEY.secret_access_key, "20150830", "us-east-1", "iam")
    assert key.hex() == "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"


@pytest.mark.parametrize(
    ("case", "method", "url", "headers", "body", "signature"),
    [  # cases of AWS's SigV4 test suite (service "service", us-east-1, 20150830T123600Z)
        ("get-vanilla", "GET", "https://example.amazonaws.com/", {}, b"",
         "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        ("get-vanilla-query-order-key-case", "GET", "https://example.amazonaws.com/?Param2=value2&Param1=value1", {},
         b"", "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
        ("get-utf8", "GET", "https://example.amazonaws.com/\u1234", {}, b"",
         "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85"),
        ("post-vanilla", "POST", "https://example.amazonaws.com/", {}, b"",
         "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
        ("post-x-www-form-urlencoded", "POST", "https://example.amazonaws.com/",
         {"Content-Type": "application/x-www-form-urlencoded"}, b"Param1=value1",
         "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"),
    ],
)
def test_sigv4_test_suite(case: str, method: str, url: str, headers: dict[str, str], body: bytes,
                          signature: str) -> None:
    signed = sigv4.sign(method, url, headers, body, AWS_KEY, "us-east-1", "service", AWS_TIME)
    assert signed["authorization"].endswith(f"Signature={signature}"), case


def test_sigv4_double_encodes_the_bedrock_path_like_botocore() -> None:
    # Reference computed with botocore 1.44's SigV4Auth for the same request, credentials and clock:
    # the model id's ":" travels as %3A and is signed as %253A, and the session token is signed.
    url = "https://bedrock-runtime.us-west-2.amazonaws.com/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse"
    creds = sigv4.Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "SESSIONTOKEN/abc+def==")
    signed = sigv4.sign("POST", url, {"content-type": "application/json"},
                        b'{"messages":[{"role":"user","content":[{"text":"hello"}]}]}', creds, "us-west-2",
                        "bedrock", datetime(2024, 5, 1, 9, 30, 0, tzinfo=UTC))
    assert signed["host"] == "bedrock-runtime.us-west-2.amazonaws.com"
    assert signed["x-amz-security-token"] == "SESSIONTOKEN/abc+def=="
    assert signed["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240501/us-west-2/bedrock/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, "
        "Signature=1b384ac1dc6b462406e59337fa2fce8f7e573f887f256601d78c0c8977986185")
    assert sigv4.canonical_uri("/model/a%3A0/converse", "bedrock") == "/model/a%253A0/converse"
    assert sigv4.canonical_uri("/a/./b/../c//d/", "bedrock") == "/a/c/d/"
    assert sigv4.host_header("http://127.0.0.1:8080/x") == "127.0.0.1:8080"
    assert sigv4.host_header("https://h.example:443/x") == "h.example"


@pytest.mark.parametrize("creds", ["akid", "temp"])
async def test_sigv4_signature_is_verified_by_the_fake(fake: FakeBedrock, creds: str) -> None:
    result = await run(fake, BODY, creds=creds)
    assert result.response is not None and fake.auth_failures == []
    sent = fake.calls()[0]
    auth = sigv4.parse_authorization(sent.headers["authorization"])
    assert auth is not None
    assert (auth.service, auth.region, auth.date) == ("bedrock", REGION, sent.headers["x-amz-date"][:8])
    assert {"host", "x-amz-date", "content-type"} <= set(auth.signed_headers)
    assert ("x-amz-security-token" in sent.headers) == (creds == "temp")
    assert ("x-amz-security-token" in auth.signed_headers) == (creds == "temp")
    assert sent.path == f"/model/{MODEL}/converse"  # sent as .../v1%3A0/converse, decoded by the server


@pytest.mark.parametrize(
    ("creds", "region", "failure"),
    [
        ("wrong-secret", REGION, "InvalidSignatureException"),
        ("akid", "eu-west-1", "InvalidSignatureException"),  # the region is part of the signature's scope
        ("wrong-token", REGION, "UnrecognizedClientException"),
        ("bad-bearer", REGION, "UnrecognizedClientException"),
    ],
)
async def test_bad_credentials_are_refused_and_map_to_401(fake: FakeBedrock, creds: str, region: str,
                                                         failure: str) -> None:
    error, _ = await fails(fake, BODY, creds=creds, region=region)
    assert (error.error.status, error.error.code, error.error.retryable) == (401, "invalid_api_key", False)
    assert fake.auth_failures == [failure]


async def test_bedrock_api_key_is_a_bearer_token(fake: FakeBedrock) -> None:
    result = await run(fake, BODY, creds="bearer")
    assert result.response is not None
    sent = fake.calls()[0].headers
    assert sent["authorization"] == "Bearer bedrock-api-key" and "x-amz-date" not in sent


async def test_credentials_from_the_environment(fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIATEMP")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "temp-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-123")
    monkeypatch.setenv("AWS_REGION", REGION)
    result = await run(fake, BODY, creds="none", region=None)
    assert result.response is not None and fake.auth_failures == []
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "bedrock-api-key")
    await run(fake, BODY, creds="none", region=None)
    assert fake.calls()[-1].headers["authorization"] == "Bearer bedrock-api-key"


async def test_no_credentials_fail_before_any_call(fake: FakeBedrock) -> None:
    error, _ = await fails(fake, BODY, creds="none")
    assert (error.error.status, error.error.retryable) == (401, False)
    assert "no credentials" in error.error.message and fake.calls() == []


def test_urls_region_and_model_id_encoding(fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch) -> None:
    arn = "arn:aws:bedrock:eu-central-1:123456789012:inference-profile/eu.anthropic.claude-3-haiku-20240307-v1:0"
    up = BedrockAdapter().chat_request(ctx(fake, BODY, model=arn, region="eu-central-1", api_base=None))
    assert up.url == ("https://bedrock-runtime.eu-central-1.amazonaws.com/model/arn%3Aaws%3Abedrock%3Aeu-central-1"
                      "%3A123456789012%3Ainference-profile%2Feu.anthropic.claude-3-haiku-20240307-v1%3A0/converse")
    assert "/eu-central-1/bedrock/aws4_request" in up.headers["authorization"]
    up = BedrockAdapter().chat_request(ctx(fake, BODY, stream=True, region=None,
                                           api_base="https://bedrock-runtime.ap-south-1.amazonaws.com"))
    assert up.url.endswith("/converse-stream") and "/ap-south-1/bedrock/" in up.headers["authorization"]
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ca-central-1")
    up = BedrockAdapter().chat_request(ctx(fake, BODY, region=None, api_base=None))
    assert up.url.startswith("https://bedrock-runtime.ca-central-1.amazonaws.com/model/")


# ---- request translation --------------------------------------------------------------------


async def test_request_translation(fake: FakeBedrock) -> None:
    body = {
        "model": "g",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools.", "cache_control": {
                "type": "ephemeral"}}]},
            {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": PNG}}]},
            {"role": "user", "content": "and quickly"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": '{"query": "a"}'}},
                {"id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": '{"query": "b"}'}}]},
            {"role": "tool", "tool_call_id": "call_a", "content": '{"answer": 42}'},
            {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "plain"}]},
            {"role": "user", "content": "thanks"},
        ],
        "tools": [{**LOOKUP, "cache_control": {"type": "ephemeral"}}],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        "temperature": 0.3, "top_p": 0.9, "max_completion_tokens": 50, "stop": ["END", ""], "user": "u-1",
        "metadata": {"team": "x"}, "stream_options": {"include_usage": True},
        "additionalModelRequestFields": {"top_k": 5},
    }
    result = await run(fake, body)
    b = fake.calls()[0].body
    assert b["system"] == [{"text": "Be brief."}, {"text": "Use tools."}, {"cachePoint": {"type": "default"}}]
    assert [m["role"] for m in b["messages"]] == ["user", "assistant", "user"]
    first, assistant, results = b["messages"]
    assert first["content"] == [{"text": "what is this?"},
                                {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}},
                                {"text": "and quickly"}]
    assert assistant["content"] == [
        {"text": "Let me check."},
        {"toolUse": {"toolUseId": "call_a", "name": "lookup", "input": {"query": "a"}}},
        {"toolUse": {"toolUseId": "call_b", "name": "lookup", "input": {"query": "b"}}}]
    assert results["content"] == [
        {"toolResult": {"toolUseId": "call_a", "content": [{"text": '{"answer": 42}'}]}},
        {"toolResult": {"toolUseId": "call_b", "content": [{"text": "plain"}]}},
        {"text": "thanks"}]
    assert b["toolConfig"] == {"tools": [{"toolSpec": {"name": "lookup", "description": "Look something up",
                                                       "inputSchema": {"json": LOOKUP["function"]["parameters"]}}},
                                         {"cachePoint": {"type": "default"}}],
                               "toolChoice": {"tool": {"name": "lookup"}}}
    assert b["inferenceConfig"] == {"maxTokens": 50, "temperature": 0.3, "topP": 0.9, "stopSequences": ["END"]}
    assert b["additionalModelRequestFields"] == {"top_k": 5}
    assert set(b) == {"messages", "system", "toolConfig", "inferenceConfig", "additionalModelRequestFields"}
    assert result.dropped_params == []


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("auto", None),
        ("required", {"any": {}}),
        ({"type": "function", "function": {"name": "lookup"}}, {"tool": {"name": "lookup"}}),
    ],
)
async def test_tool_choice(fake: FakeBedrock, choice: Any, expected: Any) -> None:
    await run(fake, {**BODY, "tools": [LOOKUP], "tool_choice": choice})
    config = fake.calls()[0].body["toolConfig"]
    assert config.get("toolChoice") == expected and config["tools"][0]["toolSpec"]["name"] == "lookup"


async def test_tool_choice_none(fake: FakeBedrock) -> None:
    # nothing in the history: tools are not offered, so the model cannot call one
    result = await run(fake, {**BODY, "tools": [LOOKUP], "tool_choice": "none"})
    assert "toolConfig" not in fake.calls()[0].body and result.dropped_params == []
    assert result.response is not None and result.response["choices"][0]["finish_reason"] == "stop"
    # a history with tool blocks needs toolConfig, and Converse cannot forbid a call: reported
    history = {"model": "g", "tools": [LOOKUP], "tool_choice": "none", "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"}]}
    result = await run(fake, history)
    assert "toolChoice" not in fake.calls()[1].body["toolConfig"] and result.dropped_params == ["tool_choice"]
    with pytest.raises(CallFailed) as info:
        await run(fake, history, strict=True)
    assert (info.value.error.status, info.value.error.param) == (400, "tool_choice")


async def test_tool_history_without_tools_gets_open_tool_specs(fake: FakeBedrock) -> None:
    body = {"model": "g", "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": ""}]}
    result = await run(fake, body)
    sent = fake.calls()[0].body
    assert sent["toolConfig"] == {"tools": [{"toolSpec": {"name": "search", "inputSchema": {"json": {
        "type": "object"}}}}]}
    assert sent["messages"][2]["content"] == [{"toolResult": {"toolUseId": "c1", "content": []}}]
    assert result.response is not None  # the fake accepted the history


async def test_documents_and_assistant_prefill(fake: FakeBedrock) -> None:
    pdf = "data:application/pdf;base64,JVBERi0xLjQK"
    body = {"model": "g", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "summarise"},
                                     {"type": "file", "file": {"file_data": pdf, "filename": "Q3 report (v2).pdf"}}]},
        {"role": "assistant", "content": "Summary:  "}]}
    await run(fake, body)
    sent = fake.calls()[0].body["messages"]
    assert sent[0]["content"][1] == {"document": {"format": "pdf", "name": "Q3 report (v2)",
                                                  "source": {"bytes": "JVBERi0xLjQK"}}}
    assert sent[1]["content"] == [{"text": "Summary:"}]  # Bedrock refuses a prefill ending in whitespace


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}}]}],
         "messages[0].content[0]"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0="}}]}],
         "messages[0].content[0]"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}],
         "messages[0].content[0]"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}],
         "messages[1].tool_calls[0].function.arguments"),
        ([{"role": "function", "name": "f", "content": "x"}], "messages[0].role"),
        ([{"role": "system", "content": "only a system prompt"}], "messages"),
    ],
)
async def test_untranslatable_input_is_a_400_before_any_call(fake: FakeBedrock, messages: list[dict[str, Any]],
                                                            param: str) -> None:
    error, _ = await fails(fake, {"model": "g", "messages": messages})
    assert (error.error.status, error.error.param, error.error.retryable) == (400, param, False)
    assert fake.calls() == []


async def test_unsupported_params_are_dropped_or_refused_when_strict(fake: FakeBedrock) -> None:
    body = {**BODY, "seed": 7, "n": 2, "logit_bias": {"1": 2}, "response_format": {"type": "json_object"},
            "top_k": 3, "presence_penalty": 0, "logprobs": False, "parallel_tool_calls": True, "reasoning_effort": None}
    result = await run(fake, body)
    assert result.dropped_params == ["seed", "n", "logit_bias", "top_k", "response_format"]
    assert set(fake.calls()[0].body) == {"messages"}  # the fake refuses any field Converse does not have
    assert (await run(fake, {**BODY, "response_format": {"type": "text"}, "n": 1})).dropped_params == []
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(CallFailed) as info:
        await run(fake, {**BODY, "response_format": schema}, strict=True)
    assert (info.value.error.status, info.value.error.param, info.value.error.code) == (
        400, "response_format", "unsupported_parameter")
    assert len(fake.calls()) == 2


# ---- responses ------------------------------------------------------------------------------


async def test_text_completion_and_usage(fake: FakeBedrock) -> None:
    result = await run(fake, user("hello there friend"))
    assert result.response is not None
    choice = result.response["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Echo: hello there friend", "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert result.response["id"] == "chatcmpl-r1" and result.response["model"] == MODEL
    usage = result.response["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert result.usage.prompt_tokens == usage["prompt_tokens"]


async def test_tool_use_becomes_tool_calls(fake: FakeBedrock) -> None:
    result = await run(fake, {**user("weather in Paris"), "tools": [LOOKUP]})
    assert result.response is not None
    choice = result.response["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (tool_call,) = choice["message"]["tool_calls"]
    assert tool_call["id"].startswith("tooluse_") and tool_call["function"]["name"] == "lookup"
    assert orjson.loads(tool_call["function"]["arguments"]) == {"query": "weather in Paris"}


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
     ("guardrail_intervened", "content_filter"), ("content_filtered", "content_filter"), ("something_new", "stop")],
)
async def test_stop_reasons_map_to_finish_reasons(fake: FakeBedrock, stop_reason: str, finish: str) -> None:
    fake.respond([{"text": "x"}], stop_reason)
    result = await run(fake, user("hi"))
    assert result.response is not None and result.response["choices"][0]["finish_reason"] == finish


async def test_max_tokens_stop_sequences_and_guardrail_from_the_fake(fake: FakeBedrock) -> None:
    result = await run(fake, {**user("one two three four"), "max_tokens": 2})
    assert result.response is not None
    assert result.response["choices"][0]["message"]["content"] == "Echo: one"
    assert result.response["choices"][0]["finish_reason"] == "length"
    result = await run(fake, {**user("one two three"), "stop": "three"})
    assert result.response is not None and result.response["choices"][0]["message"]["content"] == "Echo: one two "
    result = await run(fake, user("[[guardrail]] tell me"))
    assert result.response is not None and result.response["choices"][0]["finish_reason"] == "content_filter"


async def test_reasoning_content_is_kept_apart(fake: FakeBedrock) -> None:
    blocks: list[dict[str, Any]] = [
        {"reasoningContent": {"reasoningText": {"text": "Thinking.", "signature": "sig"}}}, {"text": "Done."}]
    fake.respond(blocks)
    result = await run(fake, user("hi"))
    assert result.response is not None
    message = result.response["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("Done.", "Thinking.")
    fake.respond(blocks)
    _, chunks = await run_stream(fake, user("hi"))
    ds = deltas(chunks)
    assert "".join(d.get("reasoning_content") or "" for d in ds) == "Thinking."
    assert "".join(d.get("content") or "" for d in ds) == "Done."


async def test_cache_tokens_count_in_prompt_tokens(fake: FakeBedrock) -> None:
    long_system = "You are a careful assistant. " * 40
    body = {"model": "g", "messages": [
        {"role": "system", "content": [{"type": "text", "text": long_system, "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": "hi"}]}
    first = await run(fake, body)
    second = await run(fake, body)
    streamed, _ = await run_stream(fake, body)
    assert first.response is not None and second.response is not None
    assert first.usage.cached_tokens == 0 and second.usage.cached_tokens > 50
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == streamed.usage.prompt_tokens
    assert streamed.usage.cached_tokens == second.usage.cached_tokens
    assert second.response["usage"]["prompt_tokens_details"] == {"cached_tokens": second.usage.cached_tokens}


def test_usage_mapping_from_bedrock_counts() -> None:
    from switchyard.services.workers.providers.bedrock import usage_from_bedrock

    usage = usage_from_bedrock({"inputTokens": 10, "outputTokens": 5, "totalTokens": 135,
                                "cacheReadInputTokens": 100, "cacheWriteInputTokens": 20})
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (130, 5, 135)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 100}


# ---- streaming ------------------------------------------------------------------------------


async def test_stream_text_role_first_and_usage_chunk_last(fake: FakeBedrock) -> None:
    result, chunks = await run_stream(fake, user("hello there friend"))
    ds = deltas(chunks)
    assert ds[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in ds) == "Echo: hello there friend"
    assert len([d for d in ds if d.get("content")]) == 4  # word by word, as the fake streamed it
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-r1" for c in chunks)
    assert result.chunks_sent == len(chunks)
    assert result.usage_chunk is not None and result.usage_chunk["choices"] == []
    assert fake.calls()[0].path.endswith("/converse-stream")
    non_stream = await run(fake, user("hello there friend"))
    assert result.usage == non_stream.usage and result.usage.completion_tokens > 0


async def test_stream_text_and_tool_use_input_deltas_with_index(fake: FakeBedrock) -> None:
    fake.respond([
        {"text": "Checking both."},
        {"toolUse": {"toolUseId": "tooluse_a", "name": "get_weather", "input": {"city": "Paris", "unit": "celsius"}}},
        {"toolUse": {"toolUseId": "tooluse_b", "name": "get_time", "input": {"tz": "Europe/Paris"}}},
    ], "tool_use")
    _, chunks = await run_stream(fake, {**user("weather and time"), "tools": [LOOKUP]})
    ds = deltas(chunks)
    assert "".join(d.get("content") or "" for d in ds) == "Checking both."
    tool_deltas = [tc for d in ds for tc in d.get("tool_calls", [])]
    starts = [tc for tc in tool_deltas if "id" in tc]
    assert [(tc["index"], tc["id"], tc["function"]["name"]) for tc in starts] == [
        (0, "tooluse_a", "get_weather"), (1, "tooluse_b", "get_time")]
    args = {0: "", 1: ""}
    for tc in tool_deltas:
        args[tc["index"]] += tc["function"]["arguments"]
    assert orjson.loads(args[0]) == {"city": "Paris", "unit": "celsius"}
    assert orjson.loads(args[1]) == {"tz": "Europe/Paris"}
    order = [tc["index"] for tc in tool_deltas]
    assert order == sorted(order) and len([i for i in order if i == 0]) > 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("kind", "message", "status", "code", "retryable"),
    [
        ("throttlingException", "Too many tokens, please wait before trying again.", 429, "rate_limit_exceeded",
         True),
        ("serviceUnavailableException", "Bedrock is unable to process your request.", 503, "overloaded", True),
        ("modelStreamErrorException", "The model stream failed.", 502, "upstream_error", True),
        ("internalServerException", "An internal server error occurred.", 502, "upstream_error", True),
        ("validationException", "Input is too long for requested model.", 400, "context_length_exceeded", False),
    ],
)
async def test_in_stream_exception_frames_become_mapped_errors(fake: FakeBedrock, kind: str, message: str,
                                                               status: int, code: str, retryable: bool) -> None:
    fake.stream_exception(after=3, kind=kind, message=message)  # messageStart + two words, then the exception
    failure, got = await fails(fake, user("one two three four"), stream=True)
    err = failure.error
    assert (err.status, err.code, err.retryable) == (status, code, retryable)
    assert message in err.message
    assert failure.chunks_sent == len(got) == 3  # role chunk + two words reached the caller first


async def test_stream_exception_before_any_chunk_is_safe_to_retry(fake: FakeBedrock) -> None:
    fake.stream_exception(after=0)
    failure, got = await fails(fake, user("hi"), stream=True)
    assert (failure.error.status, failure.chunks_sent, got) == (429, 0, [])


async def test_stream_cut_halfway_is_a_retryable_error_after_chunks(fake: FakeBedrock) -> None:
    fake.inject(cut_after=3)
    failure, got = await fails(fake, user("one two three four five"), stream=True)
    assert (failure.error.status, failure.error.code, failure.error.retryable) == (502, "stream_interrupted", True)
    assert failure.chunks_sent == len(got) == 3


async def test_stream_cut_inside_a_frame(fake: FakeBedrock) -> None:
    fake.cut_inside_frame = True
    fake.inject(cut_after=2)
    failure, got = await fails(fake, user("one two three"), stream=True)
    assert (failure.error.status, failure.error.code) == (502, "stream_interrupted")
    assert "inside an event frame" in failure.error.message and len(got) == 2


async def test_stream_without_metadata_is_incomplete(fake: FakeBedrock) -> None:
    frames = 1 + 2 + 1 + 1  # messageStart, "Echo:" "hi", contentBlockStop, messageStop; metadata cut
    fake.inject(cut_after=frames)
    failure, got = await fails(fake, user("hi"), stream=True)
    assert (failure.error.status, failure.error.code) == (502, "stream_interrupted")
    assert got[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stream_crc_mismatch_is_a_502(fake: FakeBedrock) -> None:
    fake.corrupt_crc_at = 2
    failure, got = await fails(fake, user("one two three"), stream=True)
    assert (failure.error.status, failure.error.code, failure.error.retryable) == (502, "bad_upstream_response", True)
    assert "checksum" in failure.error.message and len(got) == 2


async def test_streamed_call_answered_with_an_error_status(fake: FakeBedrock) -> None:
    fake.inject_error("ThrottlingException", 429, "Too many requests, please wait before trying again.")
    failure, got = await fails(fake, user("hi"), stream=True)
    assert (failure.error.status, failure.error.code, failure.chunks_sent, got) == (429, "rate_limit_exceeded", 0, [])


def _header(name: str, kind: int, value: bytes) -> bytes:
    return bytes([len(name)]) + name.encode() + bytes([kind]) + value


def test_decoder_reads_every_header_type_and_checks_both_crcs() -> None:
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    headers = b"".join([
        _header("t", 0, b""), _header("f", 1, b""), _header("b", 2, struct.pack(">b", -3)),
        _header("s", 3, struct.pack(">h", 300)), _header("i", 4, struct.pack(">i", -70000)),
        _header("l", 5, struct.pack(">q", 2**40)), _header("y", 6, struct.pack(">H", 2) + b"\x00\xff"),
        _header(":event-type", 7, struct.pack(">H", 8) + b"metadata"),
        _header("ts", 8, struct.pack(">q", 1_700_000_000_000)), _header("u", 9, ident.bytes)])
    payload = b'{"usage":{"inputTokens":1}}'
    prelude = struct.pack(">II", 12 + len(headers) + len(payload) + 4, len(headers))
    head = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + payload
    frame = head + struct.pack(">I", zlib.crc32(head))
    decoder = EventStreamDecoder()
    out = []
    for i in range(len(frame)):  # one byte at a time: frames straddle every possible read boundary
        out += decoder.feed(frame[i:i + 1])
    ((decoded, body),) = out
    assert decoded == {"t": True, "f": False, "b": -3, "s": 300, "i": -70000, "l": 2**40, "y": b"\x00\xff",
                       ":event-type": "metadata", "ts": 1_700_000_000_000, "u": ident.bytes}
    assert body == payload and decoder.pending == 0
    assert EventStreamDecoder().feed(encode_frame({":event-type": "x"}, b"{}"))[0][0] == {":event-type": "x"}
    for broken in (frame[:8] + b"\x00\x00\x00\x00" + frame[12:], frame[:-1] + bytes([frame[-1] ^ 1])):
        with pytest.raises(GatewayError) as info:
            EventStreamDecoder().feed(broken)
        assert (info.value.status, info.value.code) == (502, "bad_upstream_response")
    assert len(event_frame("messageStop", {"stopReason": "end_turn"})) > 16


def test_error_frames_raise_mapped_errors() -> None:
    from switchyard.services.workers.providers.bedrock import _frame_event

    with pytest.raises(GatewayError) as info:
        _frame_event({":message-type": "error", ":error-code": "ThrottlingException",
                      ":error-message": "Rate exceeded"}, b"")
    assert (info.value.status, info.value.code, info.value.message) == (429, "rate_limit_exceeded",
                                                                        "bedrock: Rate exceeded")
    with pytest.raises(GatewayError) as info:
        _frame_event({":message-type": "exception", ":exception-type": "modelTimeoutException"}, b"not json")
    assert (info.value.status, info.value.code, info.value.message) == (504, "timeout", "bedrock: not json")
    with pytest.raises(GatewayError) as info:
        _frame_event({":message-type": "event", ":event-type": "contentBlockDelta"}, b"{broken")
    assert (info.value.status, info.value.code) == (502, "bad_upstream_response")
    event = _frame_event({":message-type": "event", ":event-type": "messageStop"}, b'{"stopReason": "end_turn"}')
    assert event is not None and (event.event, event.json(), event.data) == ("messageStop",
                                                                            {"stopReason": "end_turn"}, "")


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "http", "message", "status", "code", "retryable"),
    [
        ("ValidationException", 400, "Malformed input request", 400, None, False),
        ("ValidationException", 400, "Input is too long for requested model.", 400, "context_length_exceeded", False),
        ("ValidationException", 400, "prompt is too long: 210000 tokens > 200000 maximum", 400,
         "context_length_exceeded", False),
        ("ValidationException", 400, "Input tokens exceed the configured limit of 272000 tokens.", 400,
         "context_length_exceeded", False),
        ("ValidationException", 400, "max_tokens: 90000 > 64000, which is the maximum allowed", 400, None, False),
        ("AccessDeniedException", 403, "You don't have access to the model with the specified model ID.", 403,
         "permission_denied", False),
        ("UnrecognizedClientException", 403, "The security token included in the request is invalid.", 401,
         "invalid_api_key", False),
        ("ResourceNotFoundException", 404, "Model not found.", 404, "model_not_found", False),
        ("ThrottlingException", 429, "Too many requests, please wait before trying again.", 429,
         "rate_limit_exceeded", True),
        ("ServiceQuotaExceededException", 400, "Your request exceeds the service quota for your account.", 429,
         "rate_limit_exceeded", True),
        ("ModelNotReadyException", 429, "The model is not ready to serve inference requests.", 503, "overloaded",
         True),
        ("ModelTimeoutException", 408, "The request took too long to process.", 504, "timeout", True),
        ("ModelErrorException", 424, "The request failed due to an error while processing the model.", 502,
         "upstream_error", True),
        ("InternalServerException", 500, "An internal server error occurred.", 502, "upstream_error", True),
        ("ServiceUnavailableException", 503, "Bedrock is unable to process your request.", 503, "overloaded", True),
        ("SomethingNewException", 500, "new", 502, "upstream_error", True),  # unknown type: by HTTP status
    ],
)
async def test_error_table(fake: FakeBedrock, kind: str, http: int, message: str, status: int, code: str | None,
                           retryable: bool) -> None:
    fake.inject_error(kind, http, message)
    failure, _ = await fails(fake, user("hi"))
    err = failure.error
    assert (err.status, err.code, err.retryable) == (status, code, retryable)
    assert err.message == f"bedrock: {message}"
    if code == "context_length_exceeded":
        assert err.param == "messages"
    assert failure.chunks_sent == 0


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ({"status": 429, "retry_after": 3}, 429, "rate_limit_exceeded"),
        ({"status": 503}, 503, "overloaded"),
        ({"malformed": True}, 502, "bad_upstream_response"),
        ({"silent": True}, 504, "upstream_timeout"),
    ],
)
async def test_transport_faults(fake: FakeBedrock, fault: dict[str, Any], status: int, code: str) -> None:
    fake.inject(**fault)
    failure, _ = await fails(fake, user("hi"))
    assert (failure.error.status, failure.error.code, failure.error.retryable) == (status, code, True)
    assert failure.error.retry_after_s == fault.get("retry_after")


def test_error_type_from_the_body_when_the_header_is_missing() -> None:
    adapter = BedrockAdapter()
    err = adapter.map_error(400, b'{"__type": "com.amazon.coral.validate#ValidationException", '
                                 b'"Message": "Input is too long for requested model."}', httpx.Headers())
    assert (err.status, err.code, err.message) == (400, "context_length_exceeded",
                                                   "bedrock: Input is too long for requested model.")
    err = adapter.map_error(403, b'{"message": "nope"}',
                            httpx.Headers({"x-amzn-ErrorType": "ExpiredTokenException:http://internal.amazon.com/"}))
    assert (err.status, err.code) == (401, "invalid_api_key")


# ---- embeddings -----------------------------------------------------------------------------

TITAN = "amazon.titan-embed-text-v2:0"
COHERE = "cohere.embed-english-v3"


async def test_titan_embeddings(fake: FakeBedrock) -> None:
    result = await run(fake, {"model": "e", "input": "hello world", "dimensions": 256}, kind="embeddings",
                       model=TITAN)
    sent = fake.calls()[0]
    assert sent.path == f"/model/{TITAN}/invoke" and sent.body == {"inputText": "hello world", "dimensions": 256}
    assert fake.auth_failures == []
    assert result.response is not None
    (item,) = result.response["data"]
    assert item["index"] == 0 and len(item["embedding"]) == 256
    assert result.response["usage"] == {"prompt_tokens": 3, "total_tokens": 3}  # inputTextTokenCount
    assert result.usage.prompt_tokens == 3
    as_b64 = await run(fake, {"model": "e", "input": ["hello world"], "dimensions": 256,
                              "encoding_format": "base64"}, kind="embeddings", model=TITAN)
    assert as_b64.response is not None
    raw = base64.b64decode(as_b64.response["data"][0]["embedding"])
    assert list(struct.unpack("<256f", raw)) == pytest.approx(item["embedding"], abs=1e-6)


async def test_titan_refuses_a_batch_before_any_call(fake: FakeBedrock) -> None:
    failure, _ = await fails(fake, {"model": "e", "input": ["a", "b"]}, kind="embeddings", model=TITAN)
    assert (failure.error.status, failure.error.param) == (400, "input") and fake.calls() == []


async def test_cohere_embeddings_take_lists(fake: FakeBedrock) -> None:
    result = await run(fake, {"model": "e", "input": ["first text", "second"]}, kind="embeddings", model=COHERE,
                       creds="bearer")
    sent = fake.calls()[0]
    assert sent.body == {"texts": ["first text", "second"], "input_type": "search_document"}
    assert result.response is not None
    assert [d["index"] for d in result.response["data"]] == [0, 1]
    assert result.response["data"][0]["embedding"] != result.response["data"][1]["embedding"]
    assert result.response["usage"]["prompt_tokens"] == 3 + 2  # estimated: ~4 characters a token
    await run(fake, {"model": "e", "input": "q", "input_type": "search_query", "truncate": "END"},
              kind="embeddings", model="us." + COHERE)
    assert fake.calls()[1].body == {"texts": ["q"], "input_type": "search_query", "truncate": "END"}


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        ("anthropic.claude-3-haiku-20240307-v1:0", {"input": "x"}, "model"),
        (TITAN, {"input": [1, 2, 3]}, "input"),
        (COHERE, {"input": []}, "input"),
    ],
)
async def test_bad_embeddings_requests(fake: FakeBedrock, model: str, body: dict[str, Any], param: str) -> None:
    failure, _ = await fails(fake, {"model": "e", **body}, kind="embeddings", model=model)
    assert (failure.error.status, failure.error.param) == (400, param) and fake.calls() == []


async def test_embeddings_unsupported_params_are_reported(fake: FakeBedrock) -> None:
    result = await run(fake, {"model": "e", "input": "x", "user": "u", "foo": 1}, kind="embeddings", model=TITAN)
    assert result.dropped_params == ["foo"] and fake.calls()[0].body == {"inputText": "x"}
    failure, _ = await fails(fake, {"model": "e", "input": "x", "foo": 1}, kind="embeddings", model=TITAN, strict=True)
    assert (failure.error.status, failure.error.param) == (400, "foo")
